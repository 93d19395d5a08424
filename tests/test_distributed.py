"""Scaling out with torchrun: two CPU processes (Gloo on loopback) give the weights of one process,
a run resumes across the two, and a failure on one rank ends the run."""
import os
import subprocess
import sys

import pytest

import cat_diffusion as cd
from helpers import ROOT, assert_same_weights, run_main

TINY = ["--image-size", "16", "--width", "8", "--epochs", "3", "--batch-size", "8", "--precision", "fp32",
        "--checkpoint-every", "1000", "--device", "cpu"]


# DDP sums the gradients in another order than one process; Muon's bf16 Newton-Schulz iterations magnify
# that float rounding to a few 1e-5 over these 30 steps (AdamW alone kept it under 2e-5).
MUON_ROUNDING = 1e-4


def weights(path):
    return cd.load_model(None, path).state_dict()


@pytest.fixture(scope="module")
def single_run(photos, tmp_path_factory):
    """The reference: one process, batch 8, three epochs."""
    out = tmp_path_factory.mktemp("single")
    run_main(["train", "--data", str(photos), *TINY, "--out", str(out), "--name", str(out / "M")], out / "cache")
    return out


def torchrun(tmp_path, *args, script=str(ROOT / "cat_diffusion.py"), timeout=300):
    env = {k: v for k, v in os.environ.items() if k != "DISPLAY"}
    env.update(XDG_CACHE_HOME=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    if sys.platform == "linux":
        env["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only, whatever the machine's network
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           script, *args], env=env, capture_output=True, text=True, timeout=timeout)


def test_two_torchrun_processes_give_the_weights_of_one_process(photos, single_run, tmp_path):
    out = tmp_path / "ddp"
    run = torchrun(tmp_path, "train", "--data", str(photos), *TINY, "--out", str(out), "--name", str(out / "M"))
    assert run.returncode == 0, run.stderr[-3000:]
    assert "2 processes, 4 faces each per step" in run.stdout
    assert_same_weights(weights(out / "M.pth"), weights(single_run / "M.pth"), atol=MUON_ROUNDING)
    ddp_losses = cd.read_checkpoint(out / "checkpoint.pt", "training")["history"]["loss"]
    single_losses = cd.read_checkpoint(single_run / "checkpoint.pt", "training")["history"]["loss"]
    assert ddp_losses == pytest.approx(single_losses, rel=1e-4)
    assert (out / "samples.png").is_file() and (out / "loss_curve.png").is_file()


def test_a_timed_run_under_torchrun_plans_one_length_for_every_process(photos, tmp_path):
    out = tmp_path / "timed"
    args = [a for a in TINY if a not in ("--epochs", "3")]
    run = torchrun(tmp_path, "train", "--data", str(photos), *args, "--minutes", "0.1", "--out", str(out),
                   "--name", str(out / "M"))
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stderr.count("steps planned") == 2, "rank 0 alone reports each plan: the guide's, then the model's"
    for ckpt in (cd.read_checkpoint(out / name, "training") for name in ("guide/checkpoint.pt", "checkpoint.pt")):
        assert ckpt["step"] == ckpt["total"] == len(ckpt["history"]["loss"]) > 0
    assert cd.load_model(None, out / "M").guide is not None


FAILING_LAUNCHER = """
import os, sys
sys.path.insert(0, {root!r})
import cat_diffusion as cd

real, calls = cd.diffusion_loss, [0]

def failing(*args, **kwargs):
    calls[0] += 1
    if os.environ["RANK"] == "1" and calls[0] == 6:  # step 6: after the checkpoint of step 4
        raise RuntimeError("injected failure")
    return real(*args, **kwargs)

cd.diffusion_loss = failing
cd.main(sys.argv[1:])
"""


def test_a_failure_on_one_rank_stops_every_rank_and_the_run_resumes_in_one_process(photos, single_run, tmp_path):
    launcher = tmp_path / "launcher.py"
    launcher.write_text(FAILING_LAUNCHER.format(root=str(ROOT)))
    out = tmp_path / "ddp"
    run = torchrun(tmp_path, "train", "--data", str(photos), *TINY, "--checkpoint-every", "4", "--out", str(out),
                   "--name", str(out / "M"), script=str(launcher), timeout=240)  # a hang would time out
    assert run.returncode != 0
    assert "error: rank 1 of 2: RuntimeError: injected failure" in run.stderr
    assert not (out / "M.pth").exists()
    ckpt = cd.read_checkpoint(out / "checkpoint.pt", "training")
    assert ckpt["step"] == 4
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cd, "CACHE_DIR", tmp_path / "cache")
        cd.main(["train", "--data", str(photos), *TINY, "--checkpoint-every", "4", "--out", str(out),
                 "--name", str(out / "M"), "--resume", str(out / "checkpoint.pt")])
    assert_same_weights(weights(out / "M.pth"), weights(single_run / "M.pth"), atol=MUON_ROUNDING)
