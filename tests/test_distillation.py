"""Distillation: one student step on its target lands where the teacher's steps land (a distilled
teacher's own grid steps, a trained teacher's DPM-Solver++ substeps, evenly spaced in log-SNR), the
distill command writes a student that samples in its own steps by default, each of the teacher's
targets teaches `reuse` steps, a 2-step student's last step takes 3/4 of the images, the loss
weights the detail a half-size copy loses, a critic learns to tell a 1-step student's images from
real faces and adds its gradient (not its value) in proportion to the regression's, a killed
distillation resumes exactly (the kept targets and the critic too), and a teacher of the wrong kind
is refused in one line."""

import functools

import pytest
import torch

import cat_diffusion as cd
import cat_eval as ce
from helpers import TinyFaces, assert_same_weights, gaussian_oracle, live_model, tiny_model

TINY = ["--batch-size", "8", "--precision", "fp32", "--device", "cpu", "--epochs", "1"]


def student_step(v, z, k, steps):
    """One DDIM step of a `steps`-step student with prediction `v` from its grid point k."""
    ab = torch.cat([cd.ALPHA_BAR[cd.time_grid("student", steps)], torch.ones(1)])
    x0, eps = cd.predict_x0_eps(v, z, ab[k])
    return cd.ddim_step(x0, eps, ab[k + 1])


@pytest.mark.parametrize("steps, r", [(1, 2), (2, 2), (4, 2), (2, 4)])
def test_one_student_step_lands_where_r_steps_of_a_distilled_teacher_land(steps, r):
    """Along a distilled teacher's own trajectory (r steps for each of the student's; a
    Gaussian-data oracle: a perfect denoiser), the target's one DDIM step from every r-th point
    reaches the point r further."""
    oracle = gaussian_oracle()
    oracle.config["student_steps"] = r * steps
    x_T = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    trajectory = [x_T]
    cd.sample(oracle, 4, "student", r * steps, x=x_T.clone(), precision="fp32", progress=False,
              on_step=lambda i, x, x0: trajectory.append(x.double().float()))
    grid = cd.time_grid("student", steps)
    for k in range(steps):
        z = trajectory[r * k]
        v = cd.teacher_target(oracle, z, k, steps, dtype=None)
        torch.testing.assert_close(student_step(v, z, k, steps), trajectory[r * k + r], atol=2e-4, rtol=0)
        if k < steps - 1:  # the target is not the teacher's own one-step answer
            own = oracle(z, grid[k].expand(len(z)))
            assert (own - v).abs().max() > 1e-3  # far above float error: one step is not r


def substeps(ts):
    """A `teacher_grid` table's rows without the padding that repeats each row's end."""
    return [row[:1 + int((row[1:] != row[:-1]).sum())] for row in ts]


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_one_student_step_follows_a_trained_teachers_ode(steps):
    """A trained teacher (the oracle) solves each student step with DPM-Solver++ substeps: the last
    one exactly as `sample` does from there, and every one of several substeps closer to the exact
    ODE solution than the teacher's own single DDIM step is (one substep is that DDIM step)."""
    oracle, g = gaussian_oracle(), torch.Generator().manual_seed(1)
    grid = cd.time_grid("student", steps).tolist()
    rows = substeps(cd.teacher_grid(oracle, steps)[0])
    for k, t in enumerate(grid):
        z = cd.q_sample(oracle.mu.float(), cd.ALPHA_BAR[t], torch.randn(4, 3, 8, 8, generator=g))
        landed = student_step(cd.teacher_target(oracle, z, k, steps, dtype=None), z, k, steps)
        if k == steps - 1:
            exact = oracle.ode_endpoint(z, t).float()
            torch.testing.assert_close(landed, cd.sample(oracle, sampler="dpm++", steps=len(rows[k]) - 1, x=z,
                                                         t_start=t, precision="fp32", progress=False))
        else:
            exact = oracle.ode_point(z, t, grid[k + 1]).float()
        one_step = student_step(oracle(z, torch.tensor([t] * 4)), z, k, steps)
        if len(rows[k]) == 2:
            torch.testing.assert_close(landed, one_step)
        else:
            assert (landed - exact).abs().max() < (one_step - exact).abs().max() / 1.5


def test_each_image_of_a_batch_gets_the_target_of_its_own_student_step():
    """Student steps of 7, 2, 2 and 6 substeps in one batch: each image's target is the one it gets alone."""
    oracle, z = gaussian_oracle(), torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    k = torch.tensor([3, 0, 1, 2])
    together = cd.teacher_target(oracle, z, k, 4, dtype=None)
    for i in range(4):
        torch.testing.assert_close(together[i:i + 1], cd.teacher_target(oracle, z[i:i + 1], int(k[i]), 4, dtype=None))


def test_the_student_grid_halves_exactly():
    for steps in (1, 2, 4, 8, 32):
        assert torch.equal(cd.time_grid("student", 2 * steps)[::2], cd.time_grid("student", steps))
        assert cd.time_grid("student", steps)[0] == cd.T - 1 and len(cd.time_grid("student", steps)) == steps


def test_a_trained_teachers_substeps_are_distinct_and_a_students_are_its_grid():
    for steps in range(1, cd.STUDENT_MAX + 1):
        ts, ab = cd.teacher_grid(tiny_model(), steps)
        rows = substeps(ts)
        assert all(torch.all(row[1:] < row[:-1]) and torch.all(ts[k, len(row):] == row[-1]) for k, row in enumerate(rows))
        assert torch.equal(ts[:, 0], cd.time_grid("student", steps)) and torch.equal(ts[:-1, -1], ts[1:, 0])
        assert min(map(len, rows)) >= 3 and (steps > 2 or len(rows[-1]) == cd.DISTILL_SUBSTEPS + 1)  # 2+ substeps a row
        assert ab[-1, -1] == 1 and torch.all(ab[:, 1:] >= ab[:, :-1])
    student = cd.DiffusionModel(16, base_channels=8, student_steps=8)
    ts, _ = cd.teacher_grid(student, 2)
    assert ts.tolist() == [[999, 874, 749, 624, 500], [500, 375, 250, 125, -1]]


def test_a_trained_teachers_substeps_are_evenly_spaced_in_log_snr_at_least_2_a_student_step():
    """4 steps: 16 substeps spread evenly from lambda = -6 to the clean end would take 7, 1, 1 and 6;
    each row takes at least 2. 1 and 2 steps keep DISTILL_SUBSTEPS (4) coarser ones in the last row."""
    rows = substeps(cd.teacher_grid(tiny_model(), 4)[0])
    assert [len(row) - 1 for row in rows] == [7, 2, 2, 6]
    assert [len(row) - 1 for row in substeps(cd.teacher_grid(tiny_model(), 2)[0])] == [9, cd.DISTILL_SUBSTEPS]
    assert [len(row) - 1 for row in substeps(cd.teacher_grid(tiny_model(), 1)[0])] == [cd.DISTILL_SUBSTEPS]
    lam = cd.half_log_snr(cd.ALPHA_BAR).clamp(min=-6)
    h = (lam[0] - lam[-1]) / 16
    for row in (rows[0], rows[-1][:-1]):  # the last row without its step to the clean image
        assert torch.all((lam[row[1:]] - lam[row[:-1]] - h).abs() < 0.3 * h)


def test_a_student_takes_steps_its_teacher_can_teach():
    trained, student = tiny_model(), cd.DiffusionModel(16, base_channels=8, student_steps=8)
    for steps in (1, 4, cd.STUDENT_MAX):
        cd.check_student_steps(trained, steps)
    for steps in (1, 2, 4):
        cd.check_student_steps(student, steps)
    for model, steps, message in ((trained, cd.STUDENT_MAX + 1, "1 to 32 steps"),
                                  (student, 3, "distils into 1, 2, 4 steps, not 3"), (student, 8, "not 8")):
        with pytest.raises(cd.CheckpointError, match=message):
            cd.check_student_steps(model, steps)


def test_each_target_teaches_reuse_steps_and_a_checkpoints_check_keeps_them(monkeypatch):
    """The teacher solves for every `reuse`-th image of a batch, and a training call's loss is the mean
    over its targets and those of the `reuse` - 1 calls before; a call in eval mode (a checkpoint's
    check of the weights) changes none of them."""
    teacher, student, g = live_model(), live_model(seed=1).train(), torch.Generator().manual_seed(3)
    batches = [(x0, *cd.draw_noise(x0, g)) for x0 in torch.rand(4, 6, 3, 16, 16, generator=g) * 2 - 1]
    solved, real = [], cd.teacher_target
    monkeypatch.setattr(cd, "teacher_target", lambda model, z, *rest: solved.append(len(z)) or real(model, z, *rest))
    alone = cd.distillation_loss(teacher, 2, None, 1.0, reuse=1)
    own = [alone(student, x0[::3], t[::3], eps[::3], cd.ALPHA_BAR) for x0, t, eps in batches]
    objective = cd.distillation_loss(teacher, 2, None, 1.0, reuse=3)
    losses = [objective(student, *batch, cd.ALPHA_BAR) for batch in batches]
    checked = objective(student.eval(), *batches[3], cd.ALPHA_BAR)
    again = objective(student.train(), *batches[3], cd.ALPHA_BAR)
    assert solved == [2] * 10
    checks = sum(own[2:] + own[3:]) / 3  # the 4th batch's targets twice (its call, then the check's), the 3rd's
    expected = [own[0], (own[0] + own[1]) / 2, sum(own[:3]) / 3, sum(own[1:]) / 3, checks, checks]
    torch.testing.assert_close(torch.stack([*losses, checked, again]), torch.stack(expected))


@pytest.mark.parametrize("steps, pattern, cost", [(2, "flat", 1), (2, "checkerboard", 1 + 16), (1, "flat", 1),
                                                  (1, "checkerboard", 1 + 64)])
def test_the_students_loss_weights_the_detail_a_half_size_copy_loses(monkeypatch, steps, pattern, cost):
    """An error that survives halving the image (flat) costs its square; one that halving removes
    (a checkerboard) costs 1 + `detail` times as much, for a 1-step student `detail_1_step` times."""
    monkeypatch.setattr(cd, "teacher_target", lambda model, z, *rest: torch.zeros_like(z))
    error = torch.full((3, 8, 8), 0.5)
    if pattern == "checkerboard":
        error[:, ::2, 1::2] = error[:, 1::2, ::2] = -0.5

    class Erring(torch.nn.Module):
        def forward(self, z, t, landmarks=None):
            return error.expand_as(z)

    x0 = torch.zeros(4, 3, 8, 8)
    t, eps = cd.draw_noise(x0, torch.Generator().manual_seed(0))
    objective = cd.distillation_loss(live_model(), steps, None, 1.0, reuse=1, detail=16, detail_1_step=64)
    loss = objective(Erring(), x0, t, eps, cd.ALPHA_BAR)
    assert loss.item() == pytest.approx(0.25 * cost)


@pytest.mark.parametrize("steps, shares", [(1, [4]), (2, [1, 3]), (4, [1, 1, 1, 1])])
def test_a_two_step_students_last_step_takes_three_quarters_of_the_images(monkeypatch, steps, shares):
    """Over every timestep once, each student step teaches an equal share of the images, but a 2-step
    student's last step 3/4 of them (its first comes near its target sooner)."""
    drawn = []
    monkeypatch.setattr(cd, "teacher_target", lambda model, z, k, *rest: drawn.append(k) or torch.zeros_like(z))
    x0 = torch.zeros(cd.T, 3, 16, 16)
    objective = cd.distillation_loss(live_model(), steps, None, 1.0, reuse=1)
    objective(live_model(seed=1), x0, torch.arange(cd.T), torch.randn_like(x0), cd.ALPHA_BAR)
    assert torch.bincount(drawn[0], minlength=steps).tolist() == [cd.T * share // 4 for share in shares]


class Fixed(torch.nn.Module):
    """A "student" whose prediction is one tensor, so its gradient is the loss's gradient in v."""

    def __init__(self, v):
        super().__init__()
        self.v = torch.nn.Parameter(v)

    def forward(self, z, t, landmarks=None):
        return self.v


def one_step_batch(n=8, seed=0):
    x0 = cd.to_model_range(TinyFaces(n).faces)
    return x0, *cd.draw_noise(x0, torch.Generator().manual_seed(seed))


def test_the_critic_learns_to_score_real_faces_above_a_students_images():
    """Over training calls, the critic's own steps raise its scores of real faces above those of the
    student's images (what its one step makes of the noise), by more than it did at first."""
    torch.manual_seed(0)
    x0, t, eps = one_step_batch()
    student = live_model(seed=1).train()
    objective = cd.distillation_loss(live_model(), 1, None, 1.0, reuse=1, critic_warmup=1000)  # the critic alone
    with torch.no_grad():
        images = cd.predict_x0_eps(student(eps, torch.full((8,), cd.T - 1)), eps, cd.ALPHA_BAR[-1])[0]

    def margin():
        with torch.no_grad():
            real, fake = (sum(s.mean() for s in objective.critic(objective.critic.features(x))) for x in (x0, images))
        return (real - fake).item()

    before = margin()
    for _ in range(40):
        objective(student, x0, t, eps, cd.ALPHA_BAR)
    assert margin() > max(before, 0) + 1


def test_the_critics_gradient_joins_the_regressions_in_proportion_and_leaves_the_loss_value():
    """Once its warm-up is over, the critic's term adds `adversarial` times the regression's gradient
    norm (VQGAN's adaptive weight) to the gradient, while the loss value stays the regression's."""
    torch.manual_seed(0)
    x0, t, eps = one_step_batch()
    v = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 0.3
    with_critic = cd.distillation_loss(live_model(), 1, None, 1.0, reuse=1, adversarial=0.2, critic_warmup=1)
    regression = cd.distillation_loss(live_model(), 1, None, 1.0, reuse=1, adversarial=0.0)
    grads, values = [], []
    for objective in (with_critic, with_critic, regression):  # the first call: the critic's warm-up
        student = Fixed(v.clone()).train()
        values.append(objective(student, x0, t, eps, cd.ALPHA_BAR))
        values[-1].backward()
        grads.append(student.v.grad)
    assert values[0].item() == values[1].item() == values[2].item()
    torch.testing.assert_close(grads[0], grads[2])  # no term yet
    assert (grads[1] - grads[2]).norm().item() == pytest.approx(0.2 * grads[2].norm().item(), rel=1e-4)


def distill_config(**changes):
    return cd.TrainConfig(**{**dict(epochs=2, batch_size=4, lr=1e-3, warmup_steps=2, ema_decay=0.9, seed=0,
                                    device="cpu", precision="fp32", checkpoint_every=3), **changes})


def test_distillation_lowers_the_students_loss(tmp_path):
    data, teacher = TinyFaces(), live_model()
    objective = cd.distillation_loss(teacher, 2, None, 1.0)
    g = torch.Generator().manual_seed(5)
    x0 = cd.to_model_range(data.faces)
    t, eps = cd.draw_noise(x0, g)
    before = objective(teacher, x0, t, eps, cd.ALPHA_BAR).item()
    student, _ = cd.distill(live_model(), data, 2, distill_config(epochs=6, lr=3e-3), tmp_path)
    after = objective(student, x0, t, eps, cd.ALPHA_BAR).item()
    assert student.config["student_steps"] == 2 and after < 0.9 * before  # 0.81: mostly the last step, learnt least


@pytest.mark.parametrize("interrupt", [6, 12], ids=["killed in the first epoch", "killed in the second epoch"])
def test_a_killed_distillation_resumes_to_the_uninterrupted_student(tmp_path, monkeypatch, interrupt):
    data, cfg = TinyFaces(), distill_config()  # 2 epochs of 5 steps
    teacher = live_model()
    objective = functools.partial(cd.distillation_loss, critic_warmup=1)  # the critic from step 2

    def distill(*args, **kwargs):  # the critic draws from torch's generator, which the command seeds
        torch.manual_seed(0)
        return cd.distill(*args, **kwargs, objective=objective)

    whole, _ = distill(teacher, data, 1, cfg, tmp_path / "a")
    real, calls = cd.teacher_target, [0]

    def killed(*args, **kwargs):
        calls[0] += 1
        if calls[0] == interrupt:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    with monkeypatch.context() as mp:
        mp.setattr(cd, "teacher_target", killed)
        with pytest.raises(KeyboardInterrupt):
            distill(teacher, data, 1, cfg, tmp_path / "b")
    resumed, _ = distill(teacher, data, 1, cfg, tmp_path / "b", resume=tmp_path / "b" / "checkpoint.pt")
    assert_same_weights(resumed, whole)


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
        ["checkpoint.pt", "loss_curve.png", "progress.gif", "progress.png", "steps.png"]


def test_distill_trains_with_its_own_settings_not_trains(photos, tmp_path, monkeypatch):
    """Without --batch-size, --lr or --epochs, distill takes DISTILL's settings (the ones its
    students were measured with), not TrainConfig's defaults for training a model."""
    cd.save_model(cd.DiffusionModel(16, base_channels=8, student_steps=8), tmp_path / "T")
    monkeypatch.setattr(cd, "CACHE_DIR", tmp_path / "face-cache")
    cd.main(["distill", "--model", str(tmp_path / "T.pth"), "--data", str(photos), "--steps", "2",
             "--out", str(tmp_path / "out"), "--name", str(tmp_path / "S"), "--precision", "fp32", "--device", "cpu"])
    ckpt = cd.read_checkpoint(tmp_path / "out" / "checkpoint.pt", want="training")
    used, (muon, _) = ckpt["train_config"], ckpt["optimizer"]["param_groups"]
    assert {k: used[k] for k in cd.DISTILL} == cd.DISTILL
    assert used["epochs"] != cd.TrainConfig.epochs and used["betas"] != cd.TrainConfig.betas
    assert bool(muon["params"]) == cd.DISTILL["muon"]  # the optimiser DISTILL names, not only its record


def test_distill_refuses_a_teacher_of_the_wrong_kind_in_one_line(distilled, photos, tmp_path, capsys):
    cd.save_model(ce.LandmarkNet(16, width=4), tmp_path / "L")
    cases = [(["--model", str(tmp_path / "L.pth")], "holds a LandmarkNet, not a DiffusionModel"),
             (["--model", str(distilled / "S.pth"), "--steps", "4"],
              "S.pth: samples in 2 steps, so it distils into 1 steps, not 4")]
    for args, message in cases:
        with pytest.raises(SystemExit) as e:
            cd.main(["distill", *args, "--data", str(photos), "--out", str(tmp_path / "o"),
                     "--name", str(tmp_path / "N"), *TINY])
        assert message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "o").exists() and not (tmp_path / "N.pth").exists()


def test_distill_and_serve_take_a_training_checkpoint_as_the_model(distilled, photos, tmp_path):
    """A training checkpoint (.pt) is a model file too: its EMA weights are the teacher, and the
    layouts it has not got are looked up in it, not in a `.pt.pth` after the work (they were)."""
    cd.main(["distill", "--model", str(distilled / "out" / "checkpoint.pt"), "--data", str(photos), "--steps", "1",
             "--out", str(tmp_path / "o"), "--name", str(tmp_path / "S1"), *TINY])
    assert cd.load_model(None, tmp_path / "S1").config["student_steps"] == 1
    assert "layouts" not in cd.read_checkpoint(tmp_path / "S1.pth")


def test_distill_resume_refuses_another_teacher(distilled, photos, tmp_path):
    other = cd.DiffusionModel(16, base_channels=8, student_steps=8)
    torch.nn.init.normal_(other.head[-1].weight)
    cd.save_model(other, tmp_path / "T2")
    before = (distilled / "out" / "checkpoint.pt").read_bytes()
    with pytest.raises(SystemExit, match="distils another teacher"):
        cd.main(["distill", "--resume", str(distilled / "out" / "checkpoint.pt"), "--model", str(tmp_path / "T2.pth")])
    assert (distilled / "out" / "checkpoint.pt").read_bytes() == before


def test_a_landmark_model_distils_with_its_guidance_built_in(tmp_path):
    teacher = live_model(landmarks=True)
    data = TinyFaces()
    z = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    marks = data.landmarks[:4]
    guided = cd.teacher_target(teacher.eval(), z, 0, 2, None, marks, guidance=cd.GUIDANCE)
    assert not torch.allclose(guided, cd.teacher_target(teacher, z, 0, 2, None, marks, guidance=1.0))
    unconditional = torch.full_like(marks, float("nan"))  # guidance acts only where there are landmarks
    torch.testing.assert_close(cd.teacher_target(teacher, z, 0, 2, None, unconditional, guidance=cd.GUIDANCE),
                               cd.teacher_target(teacher, z, 0, 2, None, unconditional, guidance=1.0))
    teacher.guide = live_model(landmarks=True, seed=1)  # and, with a guide, where there are none (autoguidance)
    assert not torch.allclose(cd.teacher_target(teacher, z, 0, 2, None, unconditional, guidance=cd.GUIDANCE),
                              cd.teacher_target(teacher, z, 0, 2, None, unconditional, guidance=1.0))
    student, _ = cd.distill(teacher, data, 2, distill_config(epochs=1), tmp_path / "guided")
    assert getattr(student, "guide", None) is None, "the student learns the guided map and needs no guide"
    assert cd.guidance_of(teacher) == cd.GUIDANCE
    teacher = cd.DiffusionModel(**{**teacher.config, "student_steps": 4})  # a student: guidance built in
    student, _ = cd.distill(teacher, data, 2, distill_config(epochs=1), tmp_path)
    assert student.config["landmarks"] and cd.guidance_of(student) == cd.guidance_of(teacher) == 1.0
    assert cd.sample(student, 2, landmarks=marks[0], progress=False).isfinite().all()
