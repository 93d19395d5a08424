"""Saving and loading models, the command line (train / sample), the README's REPL snippet, and
the training loop's resume and failure behaviour."""
import pickle
from pathlib import Path

import pytest
import torch
from PIL import Image

import cat_diffusion as cd

FIGURES = ("loss_curve.png", "reconstructions.png", "samples.png", "denoising.png")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """40 synthetic photos in the CAT format (read only; shared by the module's tests)."""
    return cd.write_synthetic_dataset(tmp_path_factory.mktemp("photos"), count=40, seed=0)


def tiny_model(size=16, width=8, seed=0):
    torch.manual_seed(seed)
    model = cd.DiffusionModel(image_size=size, base_channels=width, blocks=1)
    with torch.no_grad():  # make every tensor distinctive, zero-initialised layers included
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return model


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k].cpu(), sb[k].cpu()), k


def assert_png(path, size=None):
    path = Path(path)
    assert path.is_file() and path.stat().st_size > 0, path
    with Image.open(path) as image:
        assert image.format == "PNG", path
        if size is not None:
            assert image.size == size, path
        image.load()  # decodes the whole file: a truncated PNG fails here


def grid_side(count, size, padding=1):
    """torchvision's make_grid: `count` tiles of `size` with `padding` around each."""
    return count * (size + padding) + padding


# ----------------------------------------------------------------------------------------------
# save_model / load_model
# ----------------------------------------------------------------------------------------------

def test_save_model_writes_name_pth_and_load_model_round_trips_exactly(tmp_path):
    model = tiny_model()
    path = cd.save_model(model, tmp_path / "M")
    assert path == tmp_path / "M.pth" and path.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["M.pth"], "no temporary files left behind"
    fresh = tiny_model(seed=1).train()
    loaded = cd.load_model(fresh, tmp_path / "M")
    assert loaded is fresh
    assert not loaded.training, "load_model returns the model in eval mode"
    assert_same_weights(loaded, model)
    assert_same_weights(cd.load_model(tiny_model(seed=2), str(path)), model)  # NAME.pth works too


def test_load_model_into_a_model_of_another_width_names_the_mismatch(tmp_path):
    cd.save_model(tiny_model(width=8), tmp_path / "M")
    with pytest.raises(cd.CheckpointError, match="base_channels") as err:
        cd.load_model(cd.DiffusionModel(16, base_channels=16), tmp_path / "M")
    assert str(tmp_path / "M.pth") in str(err.value)


def test_load_model_none_builds_the_saved_architecture(tmp_path):
    model = tiny_model(size=24, width=8)
    cd.save_model(model, tmp_path / "M")
    loaded = cd.load_model(None, tmp_path / "M")
    assert isinstance(loaded, cd.DiffusionModel)
    assert loaded.config == model.config
    assert not loaded.training
    assert_same_weights(loaded, model)


def write_missing(path):
    pass


def write_empty(path):
    path.write_bytes(b"")


def write_truncated(path):
    cd.save_model(tiny_model(), path.with_name("whole"))
    data = path.with_name("whole.pth").read_bytes()
    path.write_bytes(data[:len(data) // 2])


def write_text(path):
    path.write_text("this is not a model\n")


def write_foreign_dict(path):
    torch.save({"weights": torch.zeros(3)}, path)


@pytest.mark.parametrize("write", [write_missing, write_empty, write_truncated, write_text, write_foreign_dict],
                         ids=["missing", "empty", "truncated", "text", "foreign dict"])
def test_load_model_of_an_unusable_file_raises_checkpoint_error_naming_it(tmp_path, write):
    path = tmp_path / "bad.pth"
    write(path)
    with pytest.raises(cd.CheckpointError) as err:
        cd.load_model(cd.DiffusionModel(16, base_channels=8), path)
    assert str(path) in str(err.value)


class MakesMarker:
    """Unpickling this runs code: it creates the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


@pytest.mark.parametrize("fmt", ["torch.save", "pickle"])
def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path, fmt):
    marker, path = tmp_path / "pwned", tmp_path / "evil.pth"
    payload = {"kind": "model", "config": {}, "state_dict": MakesMarker(marker)}
    if fmt == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    with pytest.raises(cd.CheckpointError, match="refused") as err:
        cd.load_model(None, path)
    assert str(path) in str(err.value)
    assert not marker.exists(), "loading the file ran its code"
    # The payload is live: an unsafe load does run it (so the test above can fail).
    torch.load(path, weights_only=False) if fmt == "torch.save" else pickle.loads(path.read_bytes())
    assert marker.exists()


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """`python cat_diffusion.py --epochs 1 --synthetic-count 40 --batch-size 16` in an empty
    folder: default data path, default model (64 px, width 32), default name. The default
    DPM-Solver++ step count is cut to 2 so that the 64 samples drawn at the end stay cheap."""
    folder = tmp_path_factory.mktemp("default-run")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        mp.setattr(cd, "CACHE_DIR", folder.parent / f"{folder.name}-face-cache")
        mp.setattr(cd, "HAS_DISPLAY", False)
        mp.setitem(cd.SAMPLERS, "dpm++", 2)
        cd.main(["--epochs", "1", "--synthetic-count", "40", "--batch-size", "16"])
    return folder


def test_default_data_path_draws_a_synthetic_set_and_trains(default_run):
    synthetic = default_run / "data" / "synthetic"
    photos = sorted(p.name for p in synthetic.glob("*.jpg"))
    assert len(photos) == 40
    assert sorted(p.name for p in synthetic.glob("*.jpg.cat")) == [f"{p}.cat" for p in photos]
    assert not (default_run / "data" / ".synthetic.partial").exists()
    assert (default_run / "DiffusionModel.pth").is_file()
    for name in FIGURES:
        assert_png(default_run / "outputs" / name)
    ckpt = cd.read_checkpoint(default_run / "outputs" / "checkpoint.pt", want="training")
    steps = 36 // 16  # 36 of the 40 photo ids fall in the training split
    assert ckpt["step"] == steps and len(ckpt["history"]["loss"]) == steps


def test_repl_snippet_loads_the_model_a_default_cli_run_saved(default_run, monkeypatch):
    monkeypatch.chdir(default_run)
    snippet = [line.strip()[4:] for line in cd.__doc__.splitlines() if line.strip().startswith(">>> ")]
    assert snippet == ["from cat_diffusion import DiffusionModel, load_model",
                       'loaded_model = load_model(DiffusionModel(), "DiffusionModel")']
    namespace = {}
    exec("\n".join(snippet), namespace)  # exactly what the docstring tells users to type
    loaded_model = namespace["loaded_model"]
    assert isinstance(loaded_model, cd.DiffusionModel) and not loaded_model.training
    assert loaded_model.config == cd.DiffusionModel().config
    saved = torch.load("DiffusionModel.pth", weights_only=True)["state_dict"]
    for k, v in loaded_model.state_dict().items():
        assert torch.equal(v, saved[k]), k
    images = cd.generate(loaded_model, 2, steps=2, seed=0)
    assert images.shape == (2, 3, 64, 64) and torch.isfinite(images).all()


def test_train_command_writes_model_and_pictures(photos, tmp_path):
    out, name = tmp_path / "out", tmp_path / "M"
    cd.main(["train", "--data", str(photos), "--epochs", "1", "--image-size", "16", "--batch-size", "8",
             "--width", "8", "--out", str(out), "--name", str(name), "--precision", "fp32"])
    model = cd.load_model(None, name)
    assert model.config["image_size"] == 16 and model.config["base_channels"] == 8
    assert_png(out / "loss_curve.png")
    assert_png(out / "reconstructions.png")
    assert_png(out / "samples.png", size=(grid_side(8, 16),) * 2)  # 64 samples, 8 a row
    assert_png(out / "denoising.png", size=(grid_side(8, 16), grid_side(6, 16)))  # 6 samples x 8 states
    ckpt = cd.read_checkpoint(out / "checkpoint.pt", want="training")
    assert ckpt["step"] == 36 // 8  # one epoch of the 36 training faces
    assert not (tmp_path / "DiffusionModel.pth").exists()


def test_sample_command_writes_a_grid_and_single_images(tmp_path):
    path = cd.save_model(tiny_model(), tmp_path / "M")
    out = tmp_path / "samples"
    cd.main(["sample", "--model", str(path), "-n", "4", "--sampler", "ddim", "--steps", "3",
             "--out", str(out), "--precision", "fp32"])
    assert_png(out / "samples.png", size=(grid_side(4, 16), grid_side(1, 16)))
    for i in range(4):
        assert_png(out / f"sample_{i:04d}.png", size=(16, 16))
    assert sorted(p.name for p in out.iterdir()) == sorted(["samples.png"] + [f"sample_{i:04d}.png" for i in range(4)])


def test_sample_command_is_reproducible_for_a_seed(tmp_path):
    path = cd.save_model(tiny_model(), tmp_path / "M")
    for out in ("a", "b"):
        cd.main(["sample", "--model", str(path), "-n", "2", "--steps", "2", "--seed", "3",
                 "--out", str(tmp_path / out), "--precision", "fp32"])
    assert (tmp_path / "a" / "samples.png").read_bytes() == (tmp_path / "b" / "samples.png").read_bytes()


@pytest.mark.parametrize("argv,option", [
    (["--epochs", "0"], "--epochs"),
    (["--epochs", "-3"], "--epochs"),
    (["train", "--batch-size", "0"], "--batch-size"),
    (["--image-size", "20"], "--image-size"),
    (["--lr", "nan"], "--lr"),
    (["--ema-decay", "1.5"], "--ema-decay"),
    (["train", "--data", "no-such-folder"], "--data"),
    (["train", "--resume", "no-such-checkpoint.pt"], "--resume"),
    (["sample", "--model", "no-such-model.pth"], "--model"),
    (["sample", "-n", "0"], "-n"),
    (["sample", "--sampler", "euler"], "--sampler"),
])
def test_bad_arguments_exit_with_code_2_before_any_work(argv, option, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    before = sorted(tmp_path.iterdir())
    with pytest.raises(SystemExit) as exit_info:
        cd.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}" in err, err
    assert sorted(tmp_path.iterdir()) == before, "nothing may be written before the arguments are checked"


def test_sample_command_with_an_unusable_model_file_exits_with_its_name(tmp_path):
    path = tmp_path / "broken.pth"
    path.write_text("not a model")
    with pytest.raises(SystemExit) as exit_info:
        cd.main(["sample", "--model", str(path), "--out", str(tmp_path / "out")])
    assert isinstance(exit_info.value.code, str) and exit_info.value.code.startswith("error:")
    assert str(path) in exit_info.value.code
    assert not (tmp_path / "out").exists()


def test_train_command_reports_a_diverging_run_as_an_error_exit(photos, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        cd.main(["train", "--data", str(photos), "--epochs", "3", "--image-size", "16", "--batch-size", "8",
                 "--width", "8", "--lr", "1e6", "--warmup-steps", "1", "--precision", "fp32",
                 "--out", str(tmp_path / "out"), "--name", str(tmp_path / "M")])
    assert str(exit_info.value.code).startswith("error: loss became")
    assert not (tmp_path / "M.pth").exists(), "no model is saved from a diverged run"


# ----------------------------------------------------------------------------------------------
# Training loop: exact resume, non-finite loss
# ----------------------------------------------------------------------------------------------

class TinyFaces:
    """What train() needs of a CatDataset: uint8 faces, landmarks and a length."""

    def __init__(self, n=20, size=16):
        g = torch.Generator().manual_seed(0)
        self.faces = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
        self.landmarks = torch.rand(n, 9, 2, generator=g) * size

    def __len__(self):
        return len(self.faces)


# 20 faces in batches of 4: 5 steps an epoch; checkpoints at steps 3, 5, 6, 9, 10, ...
def tiny_config(**changes):
    return cd.TrainConfig(**{**dict(epochs=2, batch_size=4, lr=2e-3, warmup_steps=3, ema_decay=0.9,
                                    seed=0, device="cpu", precision="fp32", checkpoint_every=3), **changes})


def fresh_model(seed=0):
    torch.manual_seed(seed)
    return cd.DiffusionModel(16, base_channels=8, blocks=1)


def loss_that_fails_at(call, exception):
    """diffusion_loss that raises (KeyboardInterrupt) or turns NaN (a float) from the call-th
    training step on (calls with gradients; the checks before checkpoints run without)."""
    real, calls = cd.diffusion_loss, [0]

    def wrapped(*args, **kwargs):
        calls[0] += torch.is_grad_enabled()
        loss = real(*args, **kwargs)
        if calls[0] >= call and torch.is_grad_enabled():
            if isinstance(exception, float):
                return loss * exception
            raise exception
        return loss

    return wrapped


@pytest.fixture(scope="module", params=[6, 8], ids=["interrupted after an epoch-end checkpoint",
                                                      "interrupted after a mid-epoch checkpoint"])
def resumed_runs(request, tmp_path_factory):
    """Run A straight through; run B interrupted (KeyboardInterrupt) in step `interrupt`, then
    resumed from its last checkpoint into a freshly initialised model."""
    interrupt, data = request.param, TinyFaces()
    model_a = fresh_model()
    ema_a, history_a = cd.train(model_a, data, tiny_config(), tmp_path_factory.mktemp("a"))
    out_b = tmp_path_factory.mktemp("b")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cd, "diffusion_loss", loss_that_fails_at(interrupt, KeyboardInterrupt()))
        with pytest.raises(KeyboardInterrupt):
            cd.train(fresh_model(), data, tiny_config(), out_b)
    assert cd.read_checkpoint(out_b / "checkpoint.pt", want="training")["step"] < interrupt
    model_b = fresh_model(seed=1)
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
    cd.train(fresh_model(), TinyFaces(), tiny_config(epochs=1), tmp_path)
    wide = cd.DiffusionModel(16, base_channels=16, blocks=1)
    with pytest.raises(cd.CheckpointError, match="other settings: base_channels 8 -> 16"):
        cd.train(wide, TinyFaces(), tiny_config(), tmp_path, resume=tmp_path / "checkpoint.pt")


def test_huge_learning_rate_stops_training_with_training_error(tmp_path):
    with pytest.raises(cd.TrainingError, match="loss became") as err:
        cd.train(fresh_model(), TinyFaces(), tiny_config(lr=1e6, warmup_steps=1, epochs=4), tmp_path)
    assert str(tmp_path) in str(err.value)


def test_nonfinite_loss_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    """The loss turns NaN in step 7 (NaN gradients then poison the weights). The last checkpoint
    written before that is step 6; the run must stop with TrainingError and leave a checkpoint
    that loads, holds finite weights and is not from a step at or after the first NaN."""
    monkeypatch.setattr(cd, "diffusion_loss", loss_that_fails_at(7, float("nan")))
    with pytest.raises(cd.TrainingError, match="loss became nan"):
        cd.train(fresh_model(), TinyFaces(), tiny_config(epochs=4), tmp_path)
    ckpt = cd.read_checkpoint(tmp_path / "checkpoint.pt", want="training")
    assert ckpt["step"] == 6, f"checkpoint is from step {ckpt['step']}, after the loss became NaN in step 7"
    for part in ("model", "ema"):
        for k, v in ckpt[part].items():
            assert not v.is_floating_point() or torch.isfinite(v).all(), f"{part}.{k} is not finite"
    assert all(map(lambda x: x == x, ckpt["history"]["loss"])), "NaN losses in the kept history"
