"""Crashes, full disks and damaged files: training survives SIGKILL at any moment, a failed write
never replaces a good file, and no corruption of the input files makes loading raise."""
import errno
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import cat_diffusion as cd
import cat_eval as ce
from helpers import ROOT, assert_same_weights, png_header, script_env

TINY = ["--epochs", "4", "--image-size", "16", "--width", "8", "--batch-size", "4",
        "--checkpoint-every", "1", "--precision", "fp32", "--seed", "3", "--guide-share", "0"]


# The real script, with fsync slowed down so that a kill can land inside a checkpoint write.
HARNESS = """import os, sys, time
sys.path.insert(0, sys.argv.pop(1))
import cat_diffusion
real_fsync = os.fsync
os.fsync = lambda fd: (time.sleep(0.05), real_fsync(fd))[1]
cat_diffusion.main(sys.argv[1:])
"""


def run_training(data, out, cache, *extra, wait=True):
    cmd = [sys.executable, "-c", HARNESS, str(ROOT), "train", "--data", str(data), "--out", str(out),
           "--name", str(out / "Model"), *TINY, *extra]
    proc = subprocess.Popen(cmd, env=script_env(cache), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if wait:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
    return proc


def kill_when(proc, ready, timeout=120):
    """SIGKILL `proc` as soon as `ready()` holds (polled every millisecond)."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"run ended before the kill point: {proc.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_sigkill_at_any_moment_never_loses_the_run(tmp_path):
    data = cd.write_synthetic_dataset(tmp_path / "data", count=24, seed=0)
    cache = tmp_path / "cache"
    reference = tmp_path / "reference"
    run_training(data, reference, cache)
    expected = torch.load(reference / "checkpoint.pt", weights_only=True)["history"]["loss"]
    total = len(expected)

    out = tmp_path / "killed"
    ckpt = out / "checkpoint.pt"
    rng = random.Random(0)
    kills, during_write = 0, 0
    while True:
        resume = ["--resume"] if ckpt.exists() else []
        proc = run_training(data, out, cache, *resume, wait=False)
        step_before = torch.load(ckpt, weights_only=True)["step"] if ckpt.exists() else 0
        if kills < 6 and step_before < total - 3:
            if kills % 2 == 0:  # while a checkpoint is being written
                def ready():
                    return any(out.glob(".checkpoint.pt.*.tmp"))
                during_write += 1
            else:  # at a random moment after the next checkpoint or two
                target = step_before + rng.randint(1, 2)

                def ready():
                    try:
                        return torch.load(ckpt, weights_only=True)["step"] >= target
                    except Exception:  # noqa: BLE001 - being replaced; poll again
                        return False
            kill_when(proc, ready)
            kills += 1
            for stale in out.glob(".checkpoint.pt.*.tmp"):  # the killed write's leftovers
                stale.unlink()
            if not ckpt.exists():  # killed while writing the very first checkpoint
                assert step_before == 0
                continue
            state = cd.read_checkpoint(ckpt, want="training")  # the newest checkpoint always loads
            assert state["step"] >= step_before
            assert len(state["history"]["loss"]) == state["step"]
            assert state["history"]["loss"] == pytest.approx(expected[:state["step"]], rel=1e-6, abs=1e-7)
            continue
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
        break
    assert kills >= 5 and during_write >= 3
    final = torch.load(ckpt, weights_only=True)
    assert final["history"]["loss"] == pytest.approx(expected, rel=1e-6, abs=1e-7)
    a, b = cd.load_model(None, out / "Model"), cd.load_model(None, reference / "Model")
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(x, y, atol=1e-6), name


def test_a_run_killed_in_its_guide_or_after_it_resumes_with_plain_resume_into_the_same_model(tmp_path):
    data = cd.write_synthetic_dataset(tmp_path / "data", count=24, seed=0)
    cache, split = tmp_path / "cache", ["--guide-share", "0.25"]  # 4 epochs: its guide 1 (5 steps), then 3
    run_training(data, tmp_path / "reference", cache, *split)
    out = tmp_path / "killed"
    for ckpt, step in ((out / "guide" / "checkpoint.pt", 2), (out / "checkpoint.pt", 4)):
        def ready():
            try:
                return torch.load(ckpt, weights_only=True)["step"] >= step
            except Exception:  # noqa: BLE001 - not there yet, or being replaced; poll again
                return False
        kill_when(run_training(data, out, cache, *split, *(["--resume"] if step == 4 else []), wait=False), ready)
    assert 4 <= torch.load(out / "checkpoint.pt", weights_only=True)["step"] < 15, "killed in the model's own steps"
    run_training(data, out, cache, *split, "--resume")  # the command line of the run, as a user retypes it
    for name in ("Model", "guide/Guide"):
        assert_same_weights(cd.load_model(None, out / name).state_dict(),
                            cd.load_model(None, tmp_path / "reference" / name).state_dict(), atol=1e-6)


def test_full_disk_keeps_the_previous_file_and_says_so(tmp_path, monkeypatch):
    path = tmp_path / "model.pth"
    model = cd.DiffusionModel(16, 8)
    cd.save_model(model, path)
    before = path.read_bytes()

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cd.os, "fsync", no_space)
    with pytest.raises(OSError, match="No space left on device.*model.pth is unchanged"):
        cd.save_model(cd.DiffusionModel(16, 16), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.pth"]  # no temporary file left behind


def test_atomic_write_makes_the_rename_durable_by_fsyncing_the_folder(tmp_path, monkeypatch):
    real_fsync, synced = os.fsync, []

    def spy(fd):
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        real_fsync(fd)

    monkeypatch.setattr(cd.os, "fsync", spy)
    cd.atomic_write(tmp_path / "f.bin", lambda f: f.write(b"data"))
    assert synced == [False, True], "the file, then its folder after the rename"
    assert (tmp_path / "f.bin").read_bytes() == b"data"


def test_full_disk_during_training_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    data = cd.write_synthetic_dataset(tmp_path / "data", count=12, seed=0)
    real_fsync, calls = os.fsync, []

    def fsync_until_full(fd):
        if stat.S_ISREG(os.fstat(fd).st_mode):  # files; their folders are fsynced after the rename
            calls.append(fd)
            if len(calls) > 3:  # the face cache and two checkpoints fit, then the disk is full
                raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(cd.os, "fsync", fsync_until_full)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        cd.main(["train", "--data", str(data), "--out", str(out), "--name", str(tmp_path / "M"), *TINY])
    assert "No space left on device" in str(e.value) and "checkpoint.pt is unchanged" in str(e.value)
    assert cd.read_checkpoint(out / "checkpoint.pt", want="training")["step"] == 2


def corrupt(path, rng):
    """One random kind of damage to a photo or its .cat file; returns a label."""
    kind = rng.choice(["truncate", "flip bytes", "random cat", "swap", "zero cat", "garbage photo"])
    cat = Path(f"{path}.cat")
    if kind == "truncate":
        data = path.read_bytes()
        path.write_bytes(data[: rng.randrange(len(data))])
    elif kind == "flip bytes":
        data = bytearray(path.read_bytes())
        for _ in range(rng.randint(1, 20)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        path.write_bytes(bytes(data))
    elif kind == "random cat":
        tokens = [rng.choice(["9", "-3", "1e9", "x", "", "nan", "2.5", str(rng.randint(-999, 999))])
                  for _ in range(rng.randint(0, 30))]
        cat.write_text(" ".join(tokens))
    elif kind == "swap":  # the photo's bytes in the .cat file and the other way round
        photo_bytes, cat_bytes = path.read_bytes(), cat.read_bytes()
        path.write_bytes(cat_bytes)
        cat.write_bytes(photo_bytes)
    elif kind == "zero cat":
        cat.write_bytes(bytes(rng.randrange(64)))
    else:
        path.write_bytes(bytes(rng.randrange(256) for _ in range(rng.randint(0, 400))))
    return kind


def test_fuzzed_files_never_raise_and_every_bad_file_is_reported(tmp_path, capsys):
    source = cd.write_synthetic_dataset(tmp_path / "source", count=20, seed=2)
    folder = tmp_path / "fuzz"
    folder.mkdir()
    rng = random.Random(1234)
    originals = sorted(source.glob("*.jpg"))
    damaged = {}
    for i in range(240):
        src = originals[i % len(originals)]
        dst = folder / f"{i:08d}_001.jpg"
        shutil.copy(src, dst)
        shutil.copy(f"{src}.cat", f"{dst}.cat")
        damaged[dst.name] = corrupt(dst, rng)
    for src in originals:  # untouched copies must still load
        shutil.copy(src, folder / src.name)
        shutil.copy(f"{src}.cat", folder / f"{src.name}.cat")
    ds = cd.CatDataset(folder, 16, min_face=1)
    loaded = {Path(n).name for n in ds.names}
    skipped = {Path(p).name: reason for reason, p in ds.skipped}
    assert {p.name for p in originals} <= loaded
    assert not loaded & set(skipped)
    assert loaded | set(skipped) == set(damaged) | {p.name for p in originals}
    assert len(skipped) >= 150  # most damage is caught; byte flips may still decode
    assert all(reason for reason in skipped.values())
    assert torch.isfinite(ds.landmarks).all()
    err = capsys.readouterr().err
    assert "Traceback" not in err
    reasons = {r for r, _ in ds.skipped}
    assert len([line for line in err.splitlines() if line.startswith("skipped ")]) == len(reasons)
    kinds = {damaged[name] for name in skipped}
    assert {"truncate", "random cat", "swap", "garbage photo"} <= kinds
    assert np.isfinite(ds.faces.float().numpy()).all()


def test_hostile_trees_load_and_report_each_bad_item(tmp_path, capsys, monkeypatch):
    """A name that is not UTF-8, a folder nested 1,100 deep, a decompression bomb's header and a
    link back up the tree: the good photos load, each bad one is reported, nothing raises."""
    good = cd.write_synthetic_dataset(tmp_path / "tree" / "good", count=4, seed=0)
    tree, first = tmp_path / "tree", sorted(good.glob("*.jpg"))[0]
    latin1 = os.fsencode(tree) + b"/caf\xe9_000.jpg"
    shutil.copy(first, latin1)
    shutil.copy(f"{first}.cat", latin1 + b".cat")
    deep = str(tree)
    for _ in range(1100):  # os.makedirs and Path.mkdir recurse too
        deep += "/d"
        os.mkdir(deep)
    shutil.copy(first, f"{deep}/00000042_000.jpg")
    shutil.copy(f"{first}.cat", f"{deep}/00000042_000.jpg.cat")
    (tree / "00000099_000.png").write_bytes(png_header(30000, 30000))
    shutil.copy(f"{first}.cat", tree / "00000099_000.png.cat")
    os.symlink(tree, tree / "good" / "loop")
    monkeypatch.setattr(cd, "decode_image", guarded(cd.decode_image))
    try:
        ds = cd.CatDataset(tree, 16)
    finally:  # shutil.rmtree, and so pytest's clean-up, recurses: take the deep folder apart here
        for name in os.listdir(deep):
            os.unlink(f"{deep}/{name}")
        for _ in range(1100):
            os.rmdir(deep)
            deep = os.path.dirname(deep)
    assert len(ds) == 5  # the 4 good photos and the one at the bottom of the deep folder
    reasons = {reason: Path(path).name for reason, path in ds.skipped}
    assert reasons["file name is not valid UTF-8"] == "caf\\xe9_000.jpg"
    assert reasons["image over 89 M pixels (a decompression bomb?)"] == "00000099_000.png"
    err = capsys.readouterr().err
    assert "Traceback" not in err and "caf\\xe9_000.jpg" in err


def test_a_data_folder_whose_own_name_is_not_utf8_trains_and_prints(tmp_path):
    """The folder's own name may be any bytes (only the names kept for photos must be UTF-8), and a
    strict UTF-8 terminal gets it escaped instead of a UnicodeEncodeError after the model is saved."""
    folder = Path(os.fsdecode(os.fsencode(tmp_path) + b"/caf\xe9"))  # the bytes as Python holds them
    shutil.copytree(cd.write_synthetic_dataset(tmp_path / "cats", count=8, seed=0), folder)
    env = script_env(tmp_path / "cache", PYTHONIOENCODING="utf-8:strict")
    proc = subprocess.run([sys.executable, str(ROOT / "cat_diffusion.py"), "train", "--data", str(folder), *TINY[:1], "1",
                           *TINY[2:], "--out", str(tmp_path / "out"), "--name", str(tmp_path / "M")],
                          env=env, capture_output=True, timeout=600)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-2000:]
    assert (tmp_path / "M.pth").is_file() and (tmp_path / "out" / "samples.png").is_file()
    assert b"caf\\xe9" in proc.stdout + proc.stderr


def guarded(decode):
    """decode_image that fails the test if asked to decode more than 10 M pixels."""
    def decode_small(data, *args, **kwargs):
        image = decode(data, *args, **kwargs)
        assert image.shape[-1] * image.shape[-2] < 10_000_000, "a bomb was decoded"
        return image
    return decode_small


def test_json_results_are_written_whole(tmp_path):
    path = tmp_path / "r.json"
    ce.write_json(path, {"a": 1})
    assert path.read_text() == '{\n  "a": 1\n}' and [p.name for p in tmp_path.iterdir()] == ["r.json"]
