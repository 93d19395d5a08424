"""Nothing a user owns is lost or silently replaced: the refusal to overwrite, the synthetic set's
stamp, the resume rule, recovery after a blow-up, and a table of hostile command lines that must
each end in one line naming the culprit, with every file that existed before byte-identical."""
import re
import shutil
import zlib
from pathlib import Path

import pytest
import torch

import cat_diffusion as cd
from conftest import write_cat

TINY = ["--image-size", "16", "--width", "8", "--batch-size", "8", "--precision", "fp32"]


def snapshot(root):
    """Every file under `root` (the face cache aside) and its bytes."""
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and "face-cache" not in p.parts}


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return cd.write_synthetic_dataset(tmp_path_factory.mktemp("photos"), count=24, seed=0)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, photos):
    """A finished 2-epoch run: run/checkpoint.pt, run/M.pth and its pictures."""
    folder = tmp_path_factory.mktemp("finished")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cd, "CACHE_DIR", folder / "face-cache")
        mp.setattr(cd, "HAS_DISPLAY", False)
        mp.setitem(cd.SAMPLERS, "dpm++", 2)
        cd.main(["train", "--data", str(photos), "--epochs", "2", "--out", str(folder / "run"),
                 "--name", str(folder / "run" / "M"), *TINY])
    return folder / "run"


@pytest.fixture
def run(finished_run, tmp_path):
    """A private copy of the finished run in this test's folder."""
    return Path(shutil.copytree(finished_run, tmp_path / "run"))


@pytest.fixture(autouse=True)
def cheap_sampling(monkeypatch):
    monkeypatch.setitem(cd.SAMPLERS, "dpm++", 2)


def train(photos, out, *extra):
    cd.main(["train", "--data", str(photos), "--out", str(out), "--name", str(out / "M"), *TINY, *extra])


# ----------------------------------------------------------------------------------------------
# The synthetic set: only for the default data/, only its own folder is ever replaced
# ----------------------------------------------------------------------------------------------

def test_explicit_data_without_landmark_files_is_an_error_and_deletes_nothing(tmp_path, photos, monkeypatch):
    user = tmp_path / "U"
    (user / "synthetic").mkdir(parents=True)
    (user / "synthetic" / "important.txt").write_text("mine")
    shutil.copy(sorted(photos.glob("*.jpg"))[0], user / "cat.jpg")  # a photo without its .cat
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        cd.main(["train", "--data", str(user), "--synthetic-count", "4", "--epochs", "1", *TINY])
    assert f"--data {user}" in str(e.value) and "1 photos without one" in str(e.value)
    assert "crawford/cat-dataset" in str(e.value)
    assert (user / "synthetic" / "important.txt").read_text() == "mine"
    assert sorted(p.name for p in user.rglob("*")) == ["cat.jpg", "important.txt", "synthetic"]


def test_a_synthetic_folder_the_script_did_not_draw_is_left_alone(tmp_path, monkeypatch):
    (tmp_path / "data" / "synthetic").mkdir(parents=True)
    (tmp_path / "data" / "synthetic" / "important.txt").write_text("mine")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="was not drawn by this script"):
        cd.main(["--synthetic-count", "4", "--epochs", "1", *TINY])
    assert (tmp_path / "data" / "synthetic" / "important.txt").read_text() == "mine"


def test_the_script_redraws_only_its_own_stamped_synthetic_set(tmp_path):
    data = tmp_path / "data"
    first = cd.resolve_data(data, 6, seed=0, default=True)
    assert first == data / "synthetic" and len(list(first.glob("*.jpg"))) == 6
    assert (first / cd.SYNTHETIC_STAMP).is_file()
    stamp_time = (first / cd.SYNTHETIC_STAMP).stat().st_mtime_ns
    assert cd.resolve_data(data, 6, seed=0, default=True) == first  # the same set: kept as it is
    assert (first / cd.SYNTHETIC_STAMP).stat().st_mtime_ns == stamp_time
    cd.resolve_data(data, 8, seed=0, default=True)  # another count: its own set, so it may redraw
    assert len(list(first.glob("*.jpg"))) == 8
    assert not (data / ".synthetic.partial").exists()


# ----------------------------------------------------------------------------------------------
# A new run never replaces an earlier one's files; --overwrite and --resume are the ways to
# ----------------------------------------------------------------------------------------------

def test_overwrite_starts_the_run_over(run, photos):
    old = run.joinpath("checkpoint.pt").read_bytes()
    train(photos, run, "--epochs", "1", "--seed", "5", "--overwrite")
    ckpt = cd.read_checkpoint(run / "checkpoint.pt", want="training")
    assert ckpt["train_config"]["seed"] == 5 and ckpt["step"] == 2
    assert run.joinpath("checkpoint.pt").read_bytes() != old


def test_sample_and_editing_commands_write_to_their_own_folders_by_default(run, tmp_path, monkeypatch):
    monkeypatch.chdir(run.parent)
    shutil.copytree(run, tmp_path / "outputs", dirs_exist_ok=True)
    before = snapshot(tmp_path / "outputs")
    cd.main(["sample", "--model", str(run / "M.pth"), "-n", "2"])
    assert (tmp_path / "outputs" / "sample" / "samples.png").is_file()
    assert {k: v for k, v in snapshot(tmp_path / "outputs").items() if k.parts[0] != "sample"} == before


# ----------------------------------------------------------------------------------------------
# Resume: the run's own settings; more epochs extend it; a new learning rate applies
# ----------------------------------------------------------------------------------------------

def test_resume_takes_the_checkpoints_settings_and_more_epochs_extend_the_run(run, photos, tmp_path, capsys,
                                                                             monkeypatch):
    monkeypatch.chdir(tmp_path)  # not where the run was started: every path comes from the checkpoint
    cd.main(["train", "--resume", str(run / "checkpoint.pt"), "--epochs", "3"])
    ckpt = cd.read_checkpoint(run / "checkpoint.pt", want="training")
    steps_per_epoch = 2
    assert ckpt["step"] == 3 * steps_per_epoch and len(ckpt["history"]["loss"]) == 6
    assert ckpt["model_config"]["base_channels"] == 8 and ckpt["train_config"]["batch_size"] == 8
    assert "epochs 2 -> 3: the cosine decay is re-planned over 6 steps" in capsys.readouterr().err
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "DiffusionModel.pth").exists()
    assert cd.load_model(None, run / "M").config["image_size"] == 16


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


class TinyFaces:
    def __init__(self, n=20, size=16):
        g = torch.Generator().manual_seed(0)
        self.faces = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
        self.landmarks = torch.rand(n, 9, 2, generator=g) * size

    def __len__(self):
        return len(self.faces)


def tiny_model():
    torch.manual_seed(0)
    return cd.DiffusionModel(16, base_channels=8)


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


# ----------------------------------------------------------------------------------------------
# Hostile model files
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("config,problem", [
    ({"base_channels": 4096}, "describe a model of"),  # building it would take 23 GB
    ({"image_size": 7}, "image_size=7 is not valid"),
    ({"image_size": 12}, "do not describe a model"),
    ({"image_size": "64"}, "image_size='64' is not valid"),
    ({"base_channels": -8}, "base_channels=-8 is not valid"),
    ({"blocks": [1, 2]}, "blocks=[1, 2] is not valid"),
    ({"channel_mults": [1, 2]}, "do not describe a model"),
    ({"channel_mults": 4}, "channel_mults=4 is not valid"),
    ({"dropout": float("nan")}, "dropout=nan is not valid"),
    ({"landmarks": 1}, "landmarks=1 is not valid"),
    ({"evil": 1}, "unknown model settings"),
    (["not", "a", "dict"], "unknown model settings"),
])
def test_a_hostile_model_config_is_refused_with_checkpoint_error(tmp_path, config, problem):
    path = hostile_model(tmp_path / "hostile.pth", config)
    with pytest.raises(cd.CheckpointError, match=re.escape(problem)) as e:
        cd.load_model(None, path)
    assert str(path) in str(e.value)


def test_a_valid_model_file_still_loads_after_the_checks(tmp_path):
    model = cd.DiffusionModel(24, base_channels=6, channel_mults=(1, 2, 3, 4), blocks=2, landmarks=True)
    cd.save_model(model, tmp_path / "M")
    assert cd.load_model(None, tmp_path / "M").config == model.config


# ----------------------------------------------------------------------------------------------
# Hostile command lines: one line naming the culprit, non-zero exit, every file as it was
# ----------------------------------------------------------------------------------------------

def cat_file(path, text):
    path.write_text(text)
    return str(path)


def train_only_photos(photos, folder):
    """A folder with two photos whose ids both fall on the training side of the split."""
    folder.mkdir()
    for src in sorted(photos.glob("*.jpg")):
        if not cd.in_validation(src.name, 5) and len(list(folder.glob("*.jpg"))) < 2:
            shutil.copy(src, folder / src.name)
            shutil.copy(f"{src}.cat", folder / f"{src.name}.cat")
    return str(folder)


def photo_with_cat(folder, photos, text):
    """A copy of one photo in folder/U/, with `text` as its .cat file unless it is empty."""
    (folder / "U").mkdir()
    photo = Path(shutil.copy(next(photos.glob("*.jpg")), folder / "U" / "x.jpg"))
    if text:
        Path(f"{photo}.cat").write_text(text)
    return str(photo)


def far_cat(path):
    write_cat(path, [[0, 0], [10, 0], [5, 8], [5, 5], [5, 0], [5, 5], [5, 5], [5, 0], [5, 5]])
    return str(path)


def hostile_model(path, config):
    torch.save({"kind": "model", "class": "DiffusionModel", "config": config, "state_dict": {}}, path)
    return str(path)


# Each case: (id, argv builder (tmp, run, photos) -> argv, text the one-line message must hold).
CASES = [
    ("data folder without .cat files",
     lambda t, r, p: ["train", "--data", str(Path(photo_with_cat(t, p, "")).parent), "--epochs", "1"],
     "1 photos without one"),
    ("checkpoint of another run in --out",
     lambda t, r, p: ["train", "--data", str(p), "--out", str(r), "--name", str(t / "new")], "checkpoint.pt already exists"),
    ("model file of another run",
     lambda t, r, p: ["train", "--data", str(p), "--out", str(t / "new"), "--name", str(r / "M")], "M.pth already exists"),
    ("sample over a training run's pictures",
     lambda t, r, p: ["sample", "--model", str(r / "M.pth"), "--out", str(r), "-n", "2"], "samples.png already exists"),
    ("resume with another batch size",
     lambda t, r, p: ["train", "--resume", str(r / "checkpoint.pt"), "--batch-size", "4"], "batch_size 8 -> 4"),
    ("resume with another seed",
     lambda t, r, p: ["train", "--resume", str(r / "checkpoint.pt"), "--seed", "1"], "seed 0 -> 1"),
    ("resume with other data",
     lambda t, r, p: ["train", "--resume", str(r / "checkpoint.pt"), "--data", train_only_photos(p, t / "few")],
     "data '"),
    ("resume with fewer epochs",
     lambda t, r, p: ["train", "--resume", str(r / "checkpoint.pt"), "--epochs", "1"], "1 epochs are only 2"),
    ("resume of a model file", lambda t, r, p: ["train", "--resume", str(r / "M.pth")], "M.pth: holds only model weights"),
    ("unknown device", lambda t, r, p: ["train", "--device", "bogus"], "argument --device"),
    ("huge seed", lambda t, r, p: ["train", "--seed", str(2 ** 70)], "argument --seed"),
    ("empty name", lambda t, r, p: ["train", "--name", ""], "argument --name"),
    ("--out is a file",
     lambda t, r, p: ["train", "--data", str(p), "--out", cat_file(t / "f", "x"), "--name", str(t / "N")],
     "f is a file"),
    ("infinite .cat count for sample --landmarks",
     lambda t, r, p: ["sample", "--model", str(cd.save_model(cd.DiffusionModel(16, 8, landmarks=True), t / "LM")),
                      "--landmarks", cat_file(t / "inf.cat", "inf 1 2"), "--out", str(t / "s")], "inf.cat"),
    ("1e400 .cat count for reconstruct",
     lambda t, r, p: ["reconstruct", photo_with_cat(t, p, "1e400 1 2"), "--model", str(r / "M.pth"), "--out", str(t / "s")],
     "x.jpg"),
    ("nan .cat count for reconstruct",
     lambda t, r, p: ["reconstruct", photo_with_cat(t, p, "nan 1 2"), "--model", str(r / "M.pth"), "--out", str(t / "s")],
     "x.jpg"),
    ("landmarks far outside the face",
     lambda t, r, p: ["sample", "--model", str(cd.save_model(cd.DiffusionModel(16, 8, landmarks=True), t / "LM")),
                      "--landmarks", far_cat(t / "far.cat"), "--out", str(t / "s")], "far.cat: landmarks far outside"),
    ("eval --json a folder",
     lambda t, r, p: (t.joinpath("j").mkdir(),
                      ["eval", "--model", str(r / "M.pth"), "--data", str(p), "--json", str(t / "j")])[1],
     "j is a folder"),
    ("eval without validation faces",
     lambda t, r, p: ["eval", "--model", str(r / "M.pth"), "--data", train_only_photos(p, t / "few")],
     "0 validation"),
    ("model file describing a huge model",
     lambda t, r, p: ["sample", "--model", hostile_model(t / "huge.pth", {"base_channels": 4096})],
     "huge.pth: its settings describe a model of"),
    ("model file with a string size",
     lambda t, r, p: ["sample", "--model", hostile_model(t / "s.pth", {"image_size": "64"})], "s.pth: model setting"),
    ("fit-landmarks over an existing file",
     lambda t, r, p: ["fit-landmarks", "--data", str(p), "--name", str(r / "M")], "M.pth already exists"),
    ("bench --json over an existing file",
     lambda t, r, p: ["bench", "--json", cat_file(t / "b.json", "{}")], "b.json already exists"),
    ("interpolate over existing pictures",
     lambda t, r, p: (cat_file(t / "interpolation.gif", "gif"),
                      ["interpolate", str(next(p.glob("*.jpg"))), str(next(p.glob("*.jpg"))), "--model",
                       str(r / "M.pth"), "--out", str(t)])[1], "interpolation.gif already exists"),
]


@pytest.mark.parametrize("build,message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_hostile_command_line_fails_in_one_line_and_changes_no_file(build, message, run, photos, tmp_path,
                                                                  monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = build(tmp_path, run, photos)
    before = snapshot(tmp_path)
    with pytest.raises(SystemExit) as e:
        cd.main(argv)
    code, err = e.value.code, capsys.readouterr().err
    if code == 2:  # argparse: the one line goes to stderr
        line = err.strip().splitlines()[-1]
        assert len(err.strip().splitlines()) == 1, err
    else:
        assert isinstance(code, str), code
        line = code
    assert "\n" not in line and (line.startswith("error:") or ": error: " in line), line
    assert message in line, line
    assert "Traceback" not in err
    assert snapshot(tmp_path) == before, "a refused command changed or added files"


@pytest.mark.skipif(cd.torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_device_without_a_gpu_is_an_argument_error(capsys):
    with pytest.raises(SystemExit) as e:
        cd.main(["train", "--device", "cuda"])
    assert e.value.code == 2 and "this machine has 0 CUDA GPUs" in capsys.readouterr().err


def test_an_os_error_names_its_file(monkeypatch, tmp_path):
    def no_permission(args):
        raise PermissionError(13, "Permission denied", str(tmp_path / "locked.png"))

    monkeypatch.setitem(cd.COMMANDS, "bench", no_permission)
    with pytest.raises(SystemExit, match=f"error: {tmp_path / 'locked.png'}: Permission denied"):
        cd.main(["bench"])


def test_odd_widths_build_a_working_model():
    for size, width in ((32, 3), (16, 5), (64, 7)):
        model = cd.DiffusionModel(size, base_channels=width)
        assert model(torch.randn(2, 3, size, size), torch.tensor([1, 500])).shape == (2, 3, size, size)


def test_decompression_bomb_header_is_refused_before_decoding(tmp_path, monkeypatch):
    bomb = tmp_path / "00000001_000.png"
    bomb.write_bytes(png_header(30000, 30000))
    monkeypatch.setattr(cd, "decode_image", lambda *a, **k: pytest.fail("decoded a bomb"))
    with pytest.raises(cd.BadItem, match="over 89 M pixels"):
        cd.read_photo(bomb)


def png_header(width, height):
    """A PNG that declares width x height pixels and holds almost nothing."""
    def chunk(kind, data):
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")
    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([1, 0, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
