"""Pictures during training: previews at planned steps from fixed noises, a timeline GIF that a
resumed run continues exactly, and previews that cost at most their share of the training."""
import pytest
import torch
from PIL import Image

import cat_diffusion as cd
from helpers import StepClock, TinyFaces, assert_png, grid_side, loss_that_fails_at, tiny_model

FACES = 64  # one step an epoch at batch 64, where a preview may come every 42 steps (see preview_interval)


def config(**changes):
    return cd.TrainConfig(**{**dict(epochs=130, batch_size=FACES, warmup_steps=3, seed=0, device="cpu",
                                    precision="fp32", checkpoint_every=1000, preview_every=1e-6, low_res_share=0.0),
                            **changes})


def run(out, cfg=None, resume=None):
    data = TinyFaces(FACES)
    return cd.train(tiny_model(), data, cfg or config(), out, resume=resume, preview=cd.previewer(out, 0, 16))


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    return out, run(out)[1]


def test_previews_come_at_the_planned_steps_and_the_last_is_the_finished_models(straight):
    out, history = straight
    every = cd.preview_interval(0, FACES)
    assert history["preview_every"] == every == 42
    assert [caption.split("\n")[0] for caption, _ in history["frames"]] == ["step 42", "step 84", "step 130"]
    side = grid_side(4, 16)
    assert all(frame.shape == (3, side, side) and frame.dtype == torch.uint8 for _, frame in history["frames"])
    with Image.open(out / "progress.png") as picture:
        assert picture.width == side and picture.height > side
    assert_png(out / "loss_curve.png")


def test_the_frames_change_as_the_model_learns(straight):
    frames = [frame.float() for _, frame in straight[1]["frames"]]
    assert (frames[0] - frames[-1]).abs().mean() > 5


def test_the_preview_noises_are_fixed_by_the_seed(tmp_path):
    model = tiny_model().eval()
    torch.nn.init.normal_(model.head[-1].weight, std=0.05)
    history = {"loss": [1.0, 0.5], "val": []}
    same = [cd.previewer(tmp_path, seed, 16)(model, history, "step 2")[0] for seed in (0, 0, 1)]
    assert torch.equal(same[0], same[1]) and not torch.equal(same[0], same[2])


def test_a_killed_and_resumed_run_has_the_uninterrupted_runs_frames_and_gif(straight, tmp_path):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cd, "diffusion_loss", loss_that_fails_at(100, KeyboardInterrupt()))
        with pytest.raises(KeyboardInterrupt):
            run(tmp_path)
    assert cd.read_checkpoint(tmp_path / "checkpoint.pt", want="training")["step"] == 84  # its last preview's
    _, history = run(tmp_path, resume=tmp_path / "checkpoint.pt")
    expected = straight[1]["frames"]
    assert [c for c, _ in history["frames"]] == [c for c, _ in expected]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(history["frames"], expected))
    cd.write_timeline(history, tmp_path / "resumed.gif")
    cd.write_timeline(straight[1], tmp_path / "straight.gif")
    assert (tmp_path / "resumed.gif").read_bytes() == (tmp_path / "straight.gif").read_bytes()
    with Image.open(tmp_path / "resumed.gif") as gif:
        assert gif.n_frames == len(expected)


def test_previews_take_at_most_their_share_of_the_training_forward_passes(tmp_path, monkeypatch):
    """Counted in images through the model: a training image costs a forward and a backward pass,
    about three forward passes; a preview's images run forward once per sampling step. The first 40%
    of the steps at half size and half the batch: a step costs 0.68 of a full-size one on average."""
    counts, previewing = {"training": 0, "previews": 0}, [False]
    real_forward, real_previewer = cd.DiffusionModel.forward, cd.previewer

    def counted_forward(self, x, t, landmarks=None):
        if previewing[0]:
            counts["previews"] += len(x)
        elif torch.is_grad_enabled():
            counts["training"] += 3 * len(x)
        return real_forward(self, x, t, landmarks)

    def counted_previewer(*args):
        preview = real_previewer(*args)

        def counted(*preview_args):
            previewing[0] = True
            try:
                return preview(*preview_args)
            finally:
                previewing[0] = False
        return counted

    monkeypatch.setattr(cd.DiffusionModel, "forward", counted_forward)
    monkeypatch.setattr(cd, "previewer", counted_previewer)
    _, history = run(tmp_path, config(epochs=170, low_res_share=0.4))
    assert history["preview_every"] == cd.preview_interval(0, 0.68 * FACES) == 62
    assert len(history["frames"]) == 2  # 62 and the last (124 would come fewer than 62 steps before it)
    assert counts["previews"] == 2 * cd.PREVIEW_FACES * cd.PREVIEW_STEPS
    assert counts["previews"] <= cd.PREVIEW_SHARE * counts["training"]


def test_preview_every_zero_writes_no_previews(tmp_path):
    _, history = run(tmp_path, config(epochs=50, preview_every=0))
    assert history["frames"] == [] and not (tmp_path / "progress.png").exists()


def test_a_run_previews_a_tenth_of_its_length_apart_by_default():
    assert cd.preview_interval(20_000 // cd.PREVIEWS, 16) == 2_000
    assert cd.preview_interval(100 // cd.PREVIEWS, 16) == cd.preview_interval(0, 16) > 10, "but never too often"


def test_a_timed_run_that_speeds_up_previews_a_tenth_of_its_latest_plan_apart(tmp_path, monkeypatch):
    """Two minutes: 30 steps of 1 s, then 0.25 s a step (a machine freed, or a run past its half-size
    steps): the first plan holds 120 steps, the run 390; previews follow the plan, not the first guess."""
    clock = StepClock(lambda step: 1.0 if step <= 30 else 0.25)
    monkeypatch.setattr(cd.time, "perf_counter", clock)
    monkeypatch.setattr(cd, "diffusion_loss", clock.loss(cd.diffusion_loss))
    monkeypatch.setattr(cd, "PREVIEW_SHARE", 1.0)  # previews as often as a tenth of this short run
    cfg = cd.TrainConfig(minutes=2, batch_size=4, warmup_steps=5, device="cpu", precision="fp32", checkpoint_every=10 ** 9)
    _, history = cd.train(tiny_model(), TinyFaces(), cfg, tmp_path, preview=cd.previewer(tmp_path, 0, 16))
    steps = len(history["loss"])
    assert steps > 300 and abs(history["preview_every"] - steps / cd.PREVIEWS) <= 3
    assert cd.PREVIEWS <= len(history["frames"]) <= cd.PREVIEWS + 5, "not the 27 of the first plan's interval"
