"""Progressive distillation: one student step on its target lands where two teacher steps land,
the distill command writes a student that samples in its own steps by default, a killed
distillation resumes exactly, and a teacher of the wrong kind is refused in one line."""
import pytest
import torch

import cat_diffusion as cd
from helpers import TinyFaces, assert_same_weights, gaussian_oracle, tiny_model

TINY = ["--batch-size", "8", "--precision", "fp32", "--device", "cpu", "--epochs", "1"]


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_one_student_step_on_the_target_lands_where_two_teacher_steps_land(steps):
    """Along the teacher's own trajectory on the grid of 2 steps (a Gaussian-data oracle: a perfect
    denoiser), the target's one DDIM step from every even point reaches the point two further."""
    oracle = gaussian_oracle()
    x_T = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    trajectory = [x_T]
    cd.sample(oracle, 4, "student", 2 * steps, x=x_T.clone(), precision="fp32", progress=False,
              on_step=lambda i, x, x0: trajectory.append(x.double().float()))
    grid = cd.time_grid("student", steps)
    ab = torch.cat([cd.ALPHA_BAR[grid], torch.ones(1)])
    for k in range(steps):
        z = trajectory[2 * k]
        v = cd.two_step_target(oracle, z, k, steps, dtype=None)
        x0, eps = cd.predict_x0_eps(v, z, ab[k])
        torch.testing.assert_close(cd.ddim_step(x0, eps, ab[k + 1]), trajectory[2 * k + 2], atol=2e-4, rtol=0)
        if k < steps - 1:  # the target is not the teacher's own one-step answer
            own = oracle(z, grid[k].expand(len(z)))
            assert (own - v).abs().max() > 1e-3  # far above float error: one step is not two


def test_the_student_grid_halves_exactly():
    for steps in (1, 2, 4, 8, 32):
        assert torch.equal(cd.time_grid("student", 2 * steps)[::2], cd.time_grid("student", steps))
        assert cd.time_grid("student", steps)[0] == cd.T - 1 and len(cd.time_grid("student", steps)) == steps


def test_rounds_halve_from_the_teachers_steps_to_the_students():
    assert cd.halvings(64, 4) == [32, 16, 8, 4]
    assert cd.halvings(4, 1) == [2, 1]
    for start, steps in ((64, 3), (4, 4), (4, 8)):
        with pytest.raises(ValueError, match=f"not {steps}"):
            cd.halvings(start, steps)


def distill_config(**changes):
    return cd.TrainConfig(**{**dict(epochs=2, batch_size=4, lr=1e-3, warmup_steps=2, ema_decay=0.9, seed=0,
                                    device="cpu", precision="fp32", checkpoint_every=3), **changes})


def teacher_model():
    teacher = tiny_model()
    torch.nn.init.normal_(teacher.head[-1].weight, std=0.05)  # not a zero output
    return teacher.eval()


def test_distillation_lowers_the_students_loss(tmp_path):
    data, teacher = TinyFaces(), teacher_model()
    objective = cd.distillation_loss(teacher, 2, None, 1.0)
    g = torch.Generator().manual_seed(5)
    x0 = cd.to_model_range(data.faces)
    t, eps = cd.draw_noise(x0, g)
    before = objective(teacher, x0, t, eps, cd.ALPHA_BAR).item()
    student = cd.distill(teacher_model(), data, 2, distill_config(epochs=6, lr=3e-3), tmp_path)
    after = objective(student, x0, t, eps, cd.ALPHA_BAR).item()
    assert student.config["student_steps"] == 2 and after < 0.8 * before


@pytest.mark.parametrize("interrupt", [6, 20], ids=["killed in the first round", "killed in the second round"])
def test_a_killed_distillation_resumes_to_the_uninterrupted_student(tmp_path, monkeypatch, interrupt):
    data, cfg = TinyFaces(), distill_config()  # 2 epochs of 5 steps per round; rounds 2 and 1 steps
    teacher = cd.DiffusionModel(**{**teacher_model().config, "student_steps": 4})
    teacher.load_state_dict(teacher_model().state_dict())
    whole = cd.distill(teacher, data, 1, cfg, tmp_path / "a")
    real, calls = cd.two_step_target, [0]

    def killed(*args, **kwargs):
        calls[0] += 1
        if calls[0] == interrupt:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    with monkeypatch.context() as mp:
        mp.setattr(cd, "two_step_target", killed)
        with pytest.raises(KeyboardInterrupt):
            cd.distill(teacher, data, 1, cfg, tmp_path / "b")
    resumed = cd.distill(teacher, data, 1, cfg, tmp_path / "b", resume=tmp_path / "b" / "checkpoint.pt")
    assert_same_weights(resumed, whole)
    assert_same_weights(cd.load_model(None, tmp_path / "b" / "student-2.pth"),
                        cd.load_model(None, tmp_path / "a" / "student-2.pth"))


@pytest.fixture(scope="module")
def distilled(tmp_path_factory, photos):
    """A tiny teacher distilled by the command line from 8 steps to 2: S.pth and its pictures."""
    folder = tmp_path_factory.mktemp("distilled")
    teacher = cd.DiffusionModel(16, base_channels=8, student_steps=8)
    cd.save_model(teacher, folder / "T")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cd, "CACHE_DIR", folder / "face-cache")
        cd.main(["distill", "--model", str(folder / "T.pth"), "--data", str(photos), "--steps", "2",
                 "--out", str(folder / "out"), "--name", str(folder / "S"), *TINY])
    return folder


def test_the_distill_command_writes_a_student_that_samples_in_its_own_steps(distilled):
    student = cd.load_model(cd.DiffusionModel(16, base_channels=8), distilled / "S")  # the REPL's way
    assert student.config["student_steps"] == 2 and cd.sampler_of(student) == ("student", 2)
    calls = []
    first = cd.generate(student, 3, seed=4)
    cd.sample(student, 1, on_step=lambda i, x, x0: calls.append(i), progress=False)
    assert calls == [0, 1] and first.shape == (3, 3, 16, 16)
    assert torch.equal(first, cd.generate(student, 3, seed=4)) and 0 <= first.min() and first.max() <= 1
    assert sorted(p.name for p in (distilled / "out").iterdir()) == \
        ["checkpoint.pt", "steps.png", "student-2.pth", "student-4.pth"]


def test_distill_refuses_a_teacher_of_the_wrong_kind_in_one_line(distilled, photos, tmp_path, capsys):
    cd.save_model(cd.LandmarkNet(16, width=4), tmp_path / "L")
    cases = [(["--model", str(tmp_path / "L.pth")], "holds a LandmarkNet, not a DiffusionModel"),
             (["--model", str(distilled / "S.pth"), "--steps", "4"],
              "S.pth: samples in 2 steps, so it distils into 1 steps, not 4")]
    for args, message in cases:
        with pytest.raises(SystemExit) as e:
            cd.main(["distill", *args, "--data", str(photos), "--out", str(tmp_path / "o"),
                     "--name", str(tmp_path / "N"), *TINY])
        assert message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "o").exists() and not (tmp_path / "N.pth").exists()


def test_distill_resume_refuses_another_teacher(distilled, photos, tmp_path):
    other = cd.DiffusionModel(16, base_channels=8, student_steps=8)
    torch.nn.init.normal_(other.head[-1].weight)
    cd.save_model(other, tmp_path / "T2")
    before = (distilled / "out" / "checkpoint.pt").read_bytes()
    with pytest.raises(SystemExit, match="distils another teacher"):
        cd.main(["distill", "--resume", str(distilled / "out" / "checkpoint.pt"), "--model", str(tmp_path / "T2.pth")])
    assert (distilled / "out" / "checkpoint.pt").read_bytes() == before


def test_a_landmark_model_distils_with_its_guidance_built_in(tmp_path):
    teacher = tiny_model(landmarks=True)
    torch.nn.init.normal_(teacher.head[-1].weight, std=0.05)
    data = TinyFaces()
    z = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    marks = data.landmarks[:4]
    guided = cd.two_step_target(teacher.eval(), z, 0, 2, None, marks, guidance=cd.GUIDANCE)
    assert not torch.allclose(guided, cd.two_step_target(teacher, z, 0, 2, None, marks, guidance=1.0))
    unconditional = torch.full_like(marks, float("nan"))  # guidance acts only where there are landmarks
    torch.testing.assert_close(cd.two_step_target(teacher, z, 0, 2, None, unconditional, guidance=cd.GUIDANCE),
                               cd.two_step_target(teacher, z, 0, 2, None, unconditional, guidance=1.0))
    assert cd.guidance_of(teacher) == cd.GUIDANCE
    teacher = cd.DiffusionModel(**{**teacher.config, "student_steps": 4})  # a student: guidance built in
    student = cd.distill(teacher, data, 2, distill_config(epochs=1), tmp_path)
    assert student.config["landmarks"] and cd.guidance_of(student) == cd.guidance_of(teacher) == 1.0
    assert cd.sample(student, 2, landmarks=marks[0], progress=False).isfinite().all()
