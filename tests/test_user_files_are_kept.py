"""Nothing a user owns is lost or silently replaced: the refusal to overwrite, the synthetic set's
stamp, the resume rule, and a table of hostile command lines that must each end in one line naming
the culprit, with every file that existed before byte-identical."""
import shutil
from pathlib import Path

import pytest
import torch

import cat_diffusion as cd
from helpers import hostile_model, run_main, snapshot, write_cat

TINY = ["--image-size", "16", "--width", "8", "--batch-size", "8", "--precision", "fp32"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, photos):
    """A finished 2-epoch run: run/checkpoint.pt, run/M.pth and its pictures."""
    folder = tmp_path_factory.mktemp("finished")
    run_main(["train", "--data", str(photos), "--epochs", "2", "--out", str(folder / "run"),
              "--name", str(folder / "run" / "M"), *TINY], folder / "face-cache")
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
    assert ckpt["train_config"]["seed"] == 5 and ckpt["step"] == 36 // 8
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
    steps_per_epoch = 36 // 8  # 36 of the 40 photos are training faces
    assert ckpt["step"] == 3 * steps_per_epoch and len(ckpt["history"]["loss"]) == 12
    assert ckpt["model_config"]["base_channels"] == 8 and ckpt["train_config"]["batch_size"] == 8
    assert "epochs 2 -> 3: the cosine decay is re-planned over 12 steps" in capsys.readouterr().err
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "DiffusionModel.pth").exists()
    assert cd.load_model(None, run / "M").config["image_size"] == 16


def test_resume_keeps_a_run_setting_no_option_sets_as_the_run_had_it(run):
    """A run started under an earlier default (a fifth of the steps at half size) resumes with it, not refused."""
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    ckpt["train_config"]["low_res_share"] = 0.2
    torch.save(ckpt, run / "checkpoint.pt")
    cd.main(["train", "--resume", str(run / "checkpoint.pt"), "--epochs", "3"])
    resumed = cd.read_checkpoint(run / "checkpoint.pt", want="training")
    assert (resumed["step"], resumed["train_config"]["low_res_share"]) == (12, 0.2)


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


def crafted_checkpoint(run, folder, settings=(), **state):
    """A copy of the run's checkpoint in `folder` with some saved settings or state replaced."""
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    ckpt["settings"].update(settings)
    ckpt.update(state)
    folder.mkdir(exist_ok=True)
    torch.save(ckpt, folder / "checkpoint.pt")
    return str(folder / "checkpoint.pt")


def timed_checkpoint(run, folder):
    """A copy of the run's checkpoint as if it had been a run of --minutes 1."""
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    return crafted_checkpoint(run, folder, {"minutes": 1.0}, train_config={**ckpt["train_config"], "minutes": 1.0})


def replaced(path):
    """`path` replaced by another run's file (other bytes), as `--overwrite` from another run does."""
    path.write_bytes(path.read_bytes() + b"another run")
    return path


def far_cat(path):
    write_cat(path, [[0, 0], [10, 0], [5, 8], [5, 5], [5, 0], [5, 5], [5, 5], [5, 0], [5, 5]])
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
     lambda t, r, p: ["train", "--resume", str(r / "checkpoint.pt"), "--epochs", "1"], "1 epochs are only 4"),
    ("resume of a model file", lambda t, r, p: ["train", "--resume", str(r / "M.pth")], "M.pth: holds only model weights"),
    ("resume over a model file another run wrote since",
     lambda t, r, p: (replaced(r / "M.pth"), ["train", "--resume", str(r / "checkpoint.pt"), "--epochs", "3"])[1],
     "M.pth already exists"),
    ("resume over a picture changed since",
     lambda t, r, p: (replaced(r / "samples.png"), ["train", "--resume", str(r / "checkpoint.pt"), "--epochs", "3"])[1],
     "samples.png already exists"),
    ("crafted checkpoint naming another model file",
     lambda t, r, p: ["train", "--resume", crafted_checkpoint(r, t / "c", {"name": cat_file(t / "victim.pth", "v")}),
                      "--epochs", "3"], "victim.pth already exists"),
    ("crafted checkpoint with 1e15 epochs",
     lambda t, r, p: ["train", "--resume", crafted_checkpoint(r, t / "c", {"epochs": 10 ** 15})],
     "checkpoint.pt: saved setting argument --epochs"),
    ("crafted checkpoint with a list for a size",
     lambda t, r, p: ["train", "--resume", crafted_checkpoint(r, t / "c", {"width": [8]})],
     "checkpoint.pt: saved setting argument --width"),
    ("crafted checkpoint with the default data folder",
     lambda t, r, p: ["train", "--resume", crafted_checkpoint(r, t / "c", {"data": "data"})],
     "checkpoint.pt: saved setting argument --data: no such folder"),
    ("crafted checkpoint at step -5",
     lambda t, r, p: ["train", "--resume", crafted_checkpoint(r, t / "c", step=-5), "--epochs", "3"],
     "damaged training state"),
    ("--minutes on a run of epochs (it did nothing)",
     lambda t, r, p: ["train", "--resume", str(r / "checkpoint.pt"), "--minutes", "5"],
     "a run of epochs is extended with a larger --epochs, not with --minutes"),
    ("--epochs on a run of minutes (it did nothing)",
     lambda t, r, p: ["train", "--resume", timed_checkpoint(r, t / "c"), "--epochs", "100"],
     "a run of minutes is extended with a larger --minutes, not with --epochs"),
    ("--minutes beyond a week", lambda t, r, p: ["train", "--minutes", "1e9"], "argument --minutes"),
    ("--width beyond the model's limit", lambda t, r, p: ["train", "--width", "100000"], "argument --width"),
    ("--image-size beyond the model's limit", lambda t, r, p: ["train", "--image-size", "100000"], "argument --image-size"),
    ("--blocks beyond the model's limit", lambda t, r, p: ["train", "--blocks", "1000"], "argument --blocks"),
    ("eval --landmark-net with a model without landmarks (refused before the evaluation)",
     lambda t, r, p: ["eval", "--model", str(plain := cd.save_model(cd.DiffusionModel(16, 8, landmarks=False), t / "P")),
                      "--data", str(p), "--landmark-net", str(plain)],
     "trained without landmarks"),
    ("distilling a 1-step student",
     lambda t, r, p: ["distill", "--model", str(cd.save_model(cd.DiffusionModel(16, 8, student_steps=1), t / "S1")),
                      "--data", str(p), "--steps", "1", "--out", str(t / "o"), "--name", str(t / "S0")],
     "samples in 1 step already: it distils no further"),
    ("a train checkpoint given to distill --resume",
     lambda t, r, p: ["distill", "--resume", str(r / "checkpoint.pt")], "a checkpoint of a train run"),
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
     lambda t, r, p: ["sample", "--model", hostile_model(t / "huge.pth", {"base_channels": 512})],
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


def test_resume_refuses_a_model_file_that_another_run_replaced(finished_run, photos, tmp_path, capsys):
    """Run A finishes; run B writes A's model file with --overwrite; resuming A must not put A's
    weights over B's without --overwrite (it did, as the checkpoint's own file)."""
    run = Path(shutil.copytree(finished_run, tmp_path / "A"))
    train(photos, tmp_path / "B", "--epochs", "1", "--name", str(run / "M"), "--overwrite")
    b_model = (run / "M.pth").read_bytes()
    with pytest.raises(SystemExit) as e:
        cd.main(["train", "--resume", str(run / "checkpoint.pt"), "--epochs", "3"])
    assert "M.pth already exists" in str(e.value)
    assert (run / "M.pth").read_bytes() == b_model
    cd.main(["train", "--resume", str(run / "checkpoint.pt"), "--epochs", "3", "--overwrite"])
    assert (run / "M.pth").read_bytes() != b_model


def test_an_unwritable_model_file_is_found_before_training(photos, tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = cd.os.access
    monkeypatch.setattr(cd.os, "access", lambda path, mode: Path(path) != locked and real_access(path, mode))
    monkeypatch.setattr(cd, "train", lambda *a, **k: pytest.fail("trained before finding the model file unwritable"))
    with pytest.raises(SystemExit) as e:
        cd.main(["train", "--data", str(photos), "--out", str(tmp_path / "o"), "--name", str(locked / "M"), *TINY])
    assert "M.pth cannot be written" in str(e.value) and "read-only" in str(e.value)


def test_an_os_error_names_its_file(monkeypatch, tmp_path):
    def no_permission(args):
        raise PermissionError(13, "Permission denied", str(tmp_path / "locked.png"))

    monkeypatch.setitem(cd.COMMANDS, "sample", no_permission)
    with pytest.raises(SystemExit, match=f"error: {tmp_path / 'locked.png'}: Permission denied"):
        cd.main(["sample"])
