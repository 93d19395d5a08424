"""The core script and its two satellites: `python cat_diffusion.py serve|eval` run the satellites
through the real command line (one copy of each class, so `except CheckpointError` still matches:
the `__main__` trap), they are imported only when their command runs, and with both satellites
deleted the core alone still trains, samples and loads in a REPL."""
import json
import shutil
import subprocess
import sys
import urllib.request

import cat_diffusion as cd
from helpers import ROOT, script_env


def script(cwd, *argv, cache, **kwargs):
    """`python cat_diffusion.py ARGV` in `cwd` as a user runs it: a fresh interpreter, no window."""
    return subprocess.Popen([sys.executable, "cat_diffusion.py", *argv], cwd=cwd, env=script_env(cache), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def test_eval_runs_as_a_command_and_its_refusals_are_one_line(photos, tmp_path):
    cd.save_model(cd.DiffusionModel(16, 8, landmarks=False), tmp_path / "M")
    ok = script(ROOT, "eval", "--model", str(tmp_path / "M.pth"), "--data", str(photos), "-n", "4", "--steps", "2",
                "--json", str(tmp_path / "r.json"), cache=tmp_path / "cache")
    out, err = ok.communicate(timeout=300)
    assert ok.returncode == 0, err
    assert "SWD / floor" in out and json.loads((tmp_path / "r.json").read_text())["n"] == 4
    # A CheckpointError raised in cat_eval is caught by cat_diffusion.main: the same class.
    bad = script(ROOT, "eval", "--model", str(tmp_path / "M.pth"), "--data", str(photos), "-n", "4",
                 "--landmark-net", str(tmp_path / "M.pth"), cache=tmp_path / "cache")
    out, err = bad.communicate(timeout=300)
    assert bad.returncode == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error: ") and "trained without landmarks" in err


def test_serve_runs_as_a_command_and_answers(tmp_path):
    cd.save_model(cd.DiffusionModel(16, 8), tmp_path / "M")
    server = script(ROOT, "serve", "--model", str(tmp_path / "M.pth"), "--port", "0", cache=tmp_path / "cache")
    try:
        line = server.stdout.readline()  # "cat studio for M.pth at http://127.0.0.1:PORT/ ..."
        url = line.split(" at ")[1].split()[0]
        info = json.load(urllib.request.urlopen(url + "api/info", timeout=60))
        assert info["names"] == list(cd.LANDMARKS) and info["regions"] == list(cd.REGIONS)
        page = urllib.request.urlopen(url, timeout=60).read()
        assert page == (ROOT / "cat_studio.html").read_bytes()
    finally:
        server.terminate()
        server.communicate(timeout=60)


def test_the_core_imports_no_satellite_until_its_command_runs():
    probe = "import sys, cat_diffusion as cd; cd.build_parser('train'); print(sorted(m for m in sys.modules if m.startswith('cat_')))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "['cat_diffusion']", out.stderr


def test_without_the_satellites_the_core_trains_samples_and_loads(photos, tmp_path):
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(ROOT / "cat_diffusion.py", alone)
    cache = tmp_path / "cache"
    train = script(alone, "--data", str(photos), "--epochs", "1", "--image-size", "16", "--width", "8",
                   "--batch-size", "8", "--precision", "fp32", cache=cache)
    _, err = train.communicate(timeout=600)
    assert train.returncode == 0, err
    assert (alone / "DiffusionModel.pth").is_file() and (alone / "outputs" / "samples.png").is_file()
    sample = script(alone, "sample", "-n", "2", "--steps", "2", cache=cache)
    _, err = sample.communicate(timeout=300)
    assert sample.returncode == 0 and (alone / "outputs" / "sample" / "samples.png").is_file(), err
    repl = ("from cat_diffusion import DiffusionModel, load_model\n"
            "loaded_model = load_model(DiffusionModel(16, 8), 'DiffusionModel')\n"
            "print(type(loaded_model).__name__)")
    out = subprocess.run([sys.executable, "-c", repl], cwd=alone, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "DiffusionModel", out.stderr
    missing = script(alone, "serve", cache=cache)
    _, err = missing.communicate(timeout=120)
    assert missing.returncode == 2 and "serve needs cat_studio.py beside cat_diffusion.py" in err
    assert len(err.strip().splitlines()) == 1, err
