"""The training loop: a resumed run equals an uninterrupted one, a new learning rate applies on
resume, a loss that blows up stops the run with a checkpoint that is still good, and gradient
accumulation and torch.compile learn the weights of the plain loop, and the first share of the
steps trains at half size."""
import pytest
import torch

import cat_diffusion as cd
from helpers import StepClock, TinyFaces, assert_same_weights, loss_that_fails_at, tiny_model


def tiny_config(**changes):
    return cd.TrainConfig(**{**dict(epochs=2, batch_size=4, lr=2e-3, warmup_steps=3, ema_decay=0.9,
                                    seed=0, device="cpu", precision="fp32", checkpoint_every=3), **changes})


@pytest.fixture(scope="module", params=[6, 8], ids=["interrupted after an epoch-end checkpoint",
                                                      "interrupted after a mid-epoch checkpoint"])
def resumed_runs(request, tmp_path_factory):
    """Run A straight through; run B interrupted (KeyboardInterrupt) in step `interrupt`, then
    resumed from its last checkpoint into a freshly initialised model."""
    interrupt, data = request.param, TinyFaces()
    model_a = tiny_model()
    ema_a, history_a = cd.train(model_a, data, tiny_config(), tmp_path_factory.mktemp("a"))
    out_b = tmp_path_factory.mktemp("b")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cd, "diffusion_loss", loss_that_fails_at(interrupt, KeyboardInterrupt()))
        with pytest.raises(KeyboardInterrupt):
            cd.train(tiny_model(), data, tiny_config(), out_b)
    assert cd.read_checkpoint(out_b / "checkpoint.pt", want="training")["step"] < interrupt
    model_b = tiny_model(seed=1)
    ema_b, history_b = cd.train(model_b, data, tiny_config(), out_b, resume=out_b / "checkpoint.pt")
    return dict(model_a=model_a, ema_a=ema_a, history_a=history_a,
                model_b=model_b, ema_b=ema_b, history_b=history_b, out_b=out_b)


def test_resume_reproduces_the_uninterrupted_weights_exactly(resumed_runs):
    r = resumed_runs
    assert_same_weights(r["model_b"], r["model_a"])
    assert_same_weights(r["ema_b"], r["ema_a"])
    assert not r["ema_b"].training


def test_resume_reproduces_the_uninterrupted_loss_history_exactly(resumed_runs):
    r = resumed_runs
    assert len(r["history_a"]["loss"]) == 10
    assert r["history_b"]["loss"] == r["history_a"]["loss"]


def test_load_model_reads_the_ema_weights_of_a_training_checkpoint(resumed_runs):
    loaded = cd.load_model(None, resumed_runs["out_b"] / "checkpoint.pt")
    assert_same_weights(loaded, resumed_runs["ema_b"])


def test_resume_into_a_model_of_another_width_raises_checkpoint_error(tmp_path):
    cd.train(tiny_model(), TinyFaces(), tiny_config(epochs=1), tmp_path)
    wide = cd.DiffusionModel(16, base_channels=16, blocks=1)
    with pytest.raises(cd.CheckpointError, match="other settings: base_channels 8 -> 16"):
        cd.train(wide, TinyFaces(), tiny_config(), tmp_path, resume=tmp_path / "checkpoint.pt")


def test_huge_learning_rate_stops_training_with_training_error(tmp_path):
    with pytest.raises(cd.TrainingError, match="loss became") as err:
        cd.train(tiny_model(), TinyFaces(), tiny_config(lr=1e6, warmup_steps=1, epochs=4), tmp_path)
    assert str(tmp_path) in str(err.value)


def test_nonfinite_loss_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    """The loss turns NaN in step 7 (NaN gradients then poison the weights). The last checkpoint
    written before that is step 6; the run must stop with TrainingError and leave a checkpoint
    that loads, holds finite weights and is not from a step at or after the first NaN."""
    monkeypatch.setattr(cd, "diffusion_loss", loss_that_fails_at(7, float("nan")))
    with pytest.raises(cd.TrainingError, match="loss became nan"):
        cd.train(tiny_model(), TinyFaces(), tiny_config(epochs=4), tmp_path)
    ckpt = cd.read_checkpoint(tmp_path / "checkpoint.pt", want="training")
    assert ckpt["step"] == 6, f"checkpoint is from step {ckpt['step']}, after the loss became NaN in step 7"
    for part in ("model", "ema"):
        for k, v in ckpt[part].items():
            assert not v.is_floating_point() or torch.isfinite(v).all(), f"{part}.{k} is not finite"
    assert all(map(lambda x: x == x, ckpt["history"]["loss"])), "NaN losses in the kept history"



def test_resume_with_a_new_learning_rate_applies_it_from_the_resume_step(tmp_path):
    data = TinyFaces()
    cfg = cd.TrainConfig(epochs=2, batch_size=4, lr=2e-3, warmup_steps=2, ema_decay=0.9, device="cpu",
                         precision="fp32", checkpoint_every=100)
    cd.train(tiny_model(), data, cfg, tmp_path)
    seen = []
    real_step = torch.optim.AdamW.step

    def spy(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return real_step(self, *args, **kwargs)

    longer = cd.dataclasses.replace(cfg, epochs=3, lr=1e-4)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.optim.AdamW, "step", spy)
        cd.train(tiny_model(), data, longer, tmp_path, resume=tmp_path / "checkpoint.pt")
    total = 15
    assert seen == pytest.approx([1e-4 * cd.warmup_cosine(s, 2, total) for s in range(10, 15)])


def test_a_blown_up_run_keeps_a_checkpoint_whose_weights_have_a_finite_loss(tmp_path):
    """The loss the loop checks was computed before the last update; the checkpoint must not
    hold weights that only the update after it blew up."""
    cfg = cd.TrainConfig(epochs=4, batch_size=4, lr=1e30, warmup_steps=1, device="cpu", precision="fp32",
                         checkpoint_every=1)
    with pytest.raises(cd.TrainingError, match="resume it with a lower --lr|no checkpoint was written"):
        cd.train(tiny_model(), TinyFaces(), cfg, tmp_path)
    if not (tmp_path / "checkpoint.pt").exists():
        return  # blown up in the first step: nothing to keep, and nothing was kept
    ckpt = cd.read_checkpoint(tmp_path / "checkpoint.pt", want="training")
    model = tiny_model()
    model.load_state_dict(ckpt["model"])
    x0 = cd.to_model_range(TinyFaces().faces[:8])
    t, eps = cd.draw_noise(x0, torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.isfinite(cd.diffusion_loss(model, x0, t, eps, cd.ALPHA_BAR))


def test_a_blown_up_run_resumes_with_a_lower_learning_rate(tmp_path):
    data = TinyFaces()
    cfg = cd.TrainConfig(epochs=6, batch_size=4, lr=2e-3, warmup_steps=1, device="cpu", precision="fp32",
                         checkpoint_every=1)
    real, calls = cd.diffusion_loss, [0]

    def nan_in_step_7(*args, **kwargs):  # NaN gradients then poison the weights
        calls[0] += torch.is_grad_enabled()
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls[0] == 7 and torch.is_grad_enabled() else loss

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cd, "diffusion_loss", nan_in_step_7)
        with pytest.raises(cd.TrainingError, match="lower --lr"):
            cd.train(tiny_model(), data, cfg, tmp_path)
    assert cd.read_checkpoint(tmp_path / "checkpoint.pt", want="training")["step"] == 6
    _, history = cd.train(tiny_model(), data, cd.dataclasses.replace(cfg, lr=1e-4), tmp_path,
                          resume=tmp_path / "checkpoint.pt")
    assert len(history["loss"]) == 30 and all(map(torch.isfinite, torch.tensor(history["loss"])))


def test_a_timed_run_plans_its_steps_to_end_on_time_and_resumes_exactly(tmp_path, monkeypatch):
    clock = StepClock()
    monkeypatch.setattr(cd.time, "perf_counter", clock)
    monkeypatch.setattr(cd, "diffusion_loss", clock.loss(cd.diffusion_loss))
    cfg = cd.TrainConfig(minutes=1.5, batch_size=4, warmup_steps=60, ema_decay=0.9, device="cpu", precision="fp32",
                         checkpoint_every=1000)
    _, history = cd.train(tiny_model(), TinyFaces(), cfg, tmp_path / "a")
    assert len(history["loss"]) == 90, "90 steps of one second each fill 1.5 minutes"
    ckpt = cd.read_checkpoint(tmp_path / "a" / "checkpoint.pt", want="training")
    assert ckpt["total"] == ckpt["step"] == 90
    # interrupted after the plan: the resumed run keeps the planned total, whatever the speed now
    clock.now = 0.0
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cd, "diffusion_loss", loss_that_fails_at(58, KeyboardInterrupt()))
        with pytest.raises(KeyboardInterrupt):
            cd.train(tiny_model(), TinyFaces(), cd.dataclasses.replace(cfg, checkpoint_every=50), tmp_path / "b")
    assert cd.read_checkpoint(tmp_path / "b" / "checkpoint.pt", want="training")["total"] == 90
    _, resumed = cd.train(tiny_model(), TinyFaces(), cfg, tmp_path / "b", resume=tmp_path / "b" / "checkpoint.pt")
    assert resumed["loss"] == history["loss"]


def test_an_epoch_end_writes_a_checkpoint_only_once_the_last_is_old_enough(tmp_path, monkeypatch):
    clock, written = StepClock(), []
    monkeypatch.setattr(cd.time, "perf_counter", clock)
    monkeypatch.setattr(cd, "diffusion_loss", clock.loss(cd.diffusion_loss))
    monkeypatch.setattr(cd, "EPOCH_CHECKPOINT_GAP", 12)  # seconds; the clock ticks 1 s a step, epochs are 5 steps
    real_write = cd.atomic_write

    def spy(path, write):
        real_write(path, write)
        written.append(cd.read_checkpoint(path, want="training")["step"])
    monkeypatch.setattr(cd, "atomic_write", spy)
    cd.train(tiny_model(), TinyFaces(), tiny_config(epochs=8, checkpoint_every=1000), tmp_path)
    assert written == [15, 30, 40]


def test_a_timed_run_holds_the_peak_rate_until_it_is_planned_then_decays_to_ten_percent():
    assert cd.warmup_cosine(5, 3, None) == 1.0
    assert cd.warmup_cosine(99, 3, 100) == pytest.approx(0.1, abs=1e-3)
    assert cd.plan_steps(1.5, step=41, elapsed=41.0, seconds_per_step=1.0) == 90


@pytest.mark.parametrize("k", [3, 10])
def test_the_ema_decays_by_min_of_its_cap_and_one_plus_n_over_k_plus_n(k):
    model = torch.nn.Linear(1, 1, bias=False)
    ema = cd.make_ema(model, decay=0.6, k=k)
    expected = None
    for n, value in enumerate([4.0, -2.0, 7.0, 1.0, 3.0, -5.0]):
        model.weight.data.fill_(value)
        ema.update_parameters(model)
        d = min(0.6, (1 + n) / (k + n))  # AveragedModel copies the first update; n updates averaged before
        expected = value if n == 0 else d * expected + (1 - d) * value
        assert ema.module.weight.item() == pytest.approx(expected)


# ----------------------------------------------------------------------------------------------
# Gradient accumulation and torch.compile: the same weights as the plain loop
# ----------------------------------------------------------------------------------------------

def test_gradient_accumulation_gives_the_weights_of_one_big_batch(photos, tmp_path):
    data = cd.CatDataset(photos, 16, quiet=True)
    results = []
    for k in (1, 4):
        torch.manual_seed(0)
        model = cd.DiffusionModel(16, 8)
        # AdamW alone: Muon's bf16 iterations would magnify the float rounding of summing in another order
        cfg = cd.TrainConfig(epochs=2, batch_size=8, precision="fp32", device="cpu", grad_accum=k,
                             checkpoint_every=1000, muon=False)
        cd.train(model, data, cfg, tmp_path / f"k{k}")
        results.append(model.state_dict())
    assert_same_weights(*results, atol=2e-5)


def test_compiled_training_gives_the_weights_of_eager_training(photos, tmp_path):
    """torch.compile (about a minute of compiling on a CPU) must not change what is learned."""
    data = cd.CatDataset(photos, 16, quiet=True)
    results = []
    for compile in (False, True):
        torch.manual_seed(0)
        model = cd.DiffusionModel(16, 8)
        cfg = cd.TrainConfig(epochs=1, batch_size=8, precision="fp32", device="cpu", compile=compile,
                             checkpoint_every=1000, muon=False,  # as above: Muon would magnify the rounding
                             low_res_share=0.0)  # one image size: one compile
        cd.train(model, data, cfg, tmp_path / str(compile))
        results.append(model.state_dict())
    assert_same_weights(*results, atol=1e-6)


def test_batch_that_does_not_split_into_micro_batches_is_an_error(photos, tmp_path):
    data = cd.CatDataset(photos, 16, quiet=True)
    with pytest.raises(cd.TrainingError, match="does not split"):
        cd.train(cd.DiffusionModel(16, 8), data, cd.TrainConfig(batch_size=8, grad_accum=3, device="cpu"), tmp_path)


@pytest.mark.parametrize("seconds, steps", [(lambda step: 1.0 if step <= 30 else 0.25, 390),
                                            (lambda step: 0.25 if step <= 120 else 1.0, 210)],
                         ids=["the machine speeds up", "the machine slows down"])
def test_a_timed_run_re_plans_to_end_on_time_when_its_speed_changes(tmp_path, monkeypatch, capsys, seconds, steps):
    """Two minutes: 30 s at one speed, then the rest at another (390 and 210 steps fill them). A plan
    fixed from the first seconds would end at 52 s or at 390 s."""
    clock = StepClock(seconds)
    monkeypatch.setattr(cd.time, "perf_counter", clock)
    monkeypatch.setattr(cd, "diffusion_loss", clock.loss(cd.diffusion_loss))
    cfg = cd.TrainConfig(minutes=2, batch_size=4, warmup_steps=5, device="cpu", precision="fp32",
                         checkpoint_every=10_000)
    _, history = cd.train(tiny_model(), TinyFaces(), cfg, tmp_path)
    window = cd.TIMED_SHARE * 120
    assert abs(clock.now - 120) <= window, "the run ends within one timing window of its budget"
    assert abs(len(history["loss"]) - steps) <= window / 0.25
    assert "re-planned" in capsys.readouterr().err


def test_a_timed_run_plans_its_half_size_steps_from_its_first_plan_on(tmp_path, monkeypatch, capsys):
    """Two minutes at 1 s a full-size step and 1 / HALF_SIZE_SPEEDUP s a half-size one: 176 steps, the
    first 40% at half size, fill them (0.4 x 176 x 0.2 s + 0.6 x 176 x 1 s), and the first plan says so."""
    clock, sizes, real = StepClock(), [], cd.diffusion_loss

    def timed_loss(model, x0, *args):
        if torch.is_grad_enabled():
            sizes.append(x0.shape[-1])
            clock.now += 1.0 if x0.shape[-1] == 16 else 1 / cd.HALF_SIZE_SPEEDUP
        return real(model, x0, *args)
    monkeypatch.setattr(cd.time, "perf_counter", clock)
    monkeypatch.setattr(cd, "diffusion_loss", timed_loss)
    cfg = cd.TrainConfig(minutes=2, batch_size=4, warmup_steps=5, device="cpu", precision="fp32",
                         checkpoint_every=10_000, low_res_share=0.4)
    cd.train(tiny_model(), TinyFaces(), cfg, tmp_path)
    assert (len(sizes), sizes) == (176, [8] * 70 + [16] * 106)
    assert "re-planned" not in capsys.readouterr().err


def test_a_resumed_timed_run_counts_the_seconds_it_trained_before(tmp_path, monkeypatch):
    clock = StepClock(lambda step: 1.0 if step <= 30 else 0.25)
    monkeypatch.setattr(cd.time, "perf_counter", clock)
    cfg = cd.TrainConfig(minutes=2, batch_size=4, warmup_steps=5, device="cpu", precision="fp32", checkpoint_every=50)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cd, "diffusion_loss", clock.loss(loss_that_fails_at(120, KeyboardInterrupt())))
        with pytest.raises(KeyboardInterrupt):
            cd.train(tiny_model(), TinyFaces(), cfg, tmp_path)
    ckpt = cd.read_checkpoint(tmp_path / "checkpoint.pt", want="training")
    assert ckpt["step"] == 100 and ckpt["seconds"] == pytest.approx(30 + 70 * 0.25)
    clock.now = 1000.0  # another process: its clock starts anywhere
    monkeypatch.setattr(cd, "diffusion_loss", clock.loss(cd.diffusion_loss))
    start = clock.now
    _, history = cd.train(tiny_model(), TinyFaces(), cfg, tmp_path, resume=tmp_path / "checkpoint.pt")
    trained = ckpt["seconds"] + clock.now - start
    assert abs(trained - 120) <= cd.TIMED_SHARE * 120


def test_muon_steps_a_hidden_weight_as_torch_muon_steps_its_matrix_and_the_rest_as_adamw():
    """The oracles: torch.optim.Muon (2-D weights only) on the convolution's weights viewed as a
    matrix, and torch.optim.AdamW on a bias, over three steps of random gradients."""
    torch.manual_seed(0)
    conv, bias = torch.nn.Parameter(torch.randn(8, 4, 3, 3)), torch.nn.Parameter(torch.randn(8))
    matrix, bias_copy = torch.nn.Parameter(conv.detach().flatten(1).clone()), torch.nn.Parameter(bias.detach().clone())
    ours = cd.MuonAdamW([dict(params=[conv], muon=True), dict(params=[bias], muon=False)], lr=0.01, betas=(0.9, 0.99),
                        weight_decay=0.0)
    oracles = [torch.optim.Muon([matrix], lr=0.01, weight_decay=0.0, adjust_lr_fn="match_rms_adamw"),
               torch.optim.AdamW([bias_copy], lr=0.01, betas=(0.9, 0.99), weight_decay=0.0)]
    for _ in range(3):
        grad, bias_grad = torch.randn(8, 4, 3, 3), torch.randn(8)
        conv.grad, matrix.grad, bias.grad, bias_copy.grad = grad.clone(), grad.flatten(1), bias_grad.clone(), bias_grad
        ours.step()
        for opt in oracles:
            opt.step()
    torch.testing.assert_close(conv.detach().flatten(1), matrix.detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(bias.detach(), bias_copy.detach(), rtol=0, atol=0)
    assert conv.grad is None  # Muon's weights are left out of AdamW's step


def test_training_steps_the_hidden_weights_with_muon_and_the_stem_head_biases_and_norms_with_adamw(tmp_path):
    model = tiny_model()
    cfg = cd.TrainConfig(epochs=1, batch_size=8, device="cpu", checkpoint_every=10 ** 9)
    cd.train(model, TinyFaces(16), cfg, tmp_path)
    opt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["optimizer"]
    (muon, adamw), state = opt["param_groups"], opt["state"]
    hidden = [n for n, p in model.named_parameters() if p.ndim > 1 and not n.startswith(("stem.", "head."))]
    assert muon["muon"] and len(muon["params"]) == len(hidden) > 0
    assert all(set(state[i]) == {"momentum", "step"} for i in muon["params"])
    assert all("exp_avg" in state[i] for i in adamw["params"]) and len(adamw["params"]) > 2


@pytest.mark.parametrize("size, batch, shapes", [(16, 4, [(2, 8)] * 4 + [(4, 16)] * 6),
                                                (16, 5, [(2, 8)] * 3 + [(5, 16)] * 5), (24, 4, [(4, 24)] * 10)],
                         ids=["the first 4 of 10 steps at half size", "an odd batch: the smaller half",
                              "12 px would not halve three times: full size"])
def test_training_sees_half_batches_at_half_size_for_the_first_low_res_share_of_its_steps(tmp_path, size, batch, shapes):
    """Half-size steps take half the batch: `history["faces"]` counts what the steps took."""
    model, seen = tiny_model(size=size), []  # 2 epochs of 20 faces
    model.register_forward_pre_hook(lambda m, args: seen.append(args[0]) if torch.is_grad_enabled() else None)
    cfg = tiny_config(batch_size=batch, low_res_share=0.4, checkpoint_every=10 ** 9)
    _, history = cd.train(model, TinyFaces(size=size), cfg, tmp_path)
    assert [(len(x), x.shape[-1]) for x in seen] == shapes and history["faces"] == sum(n for n, _ in shapes)
