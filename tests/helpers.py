"""Helpers shared by the tests: paths, tiny models and data, file checks, an oracle denoiser."""
import os
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import cat_diffusion as cd

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


def needs_shared(name):
    path = SHARED_DATA / name
    return pytest.mark.skipif(not path.is_dir(), reason=f"{path} is absent (real CAT data)")


def write_cat(path, points):
    """A .cat file exactly as the dataset has them: count, integers, trailing space, no newline."""
    values = " ".join(str(int(round(v))) for v in np.asarray(points).reshape(-1))
    Path(path).write_text(f"{len(points)} {values} ")


# ----------------------------------------------------------------------------------------------
# Tiny models and data
# ----------------------------------------------------------------------------------------------

def tiny_model(size=16, width=8, seed=0, landmarks=False):
    """A freshly initialised small DiffusionModel, the same for a seed."""
    torch.manual_seed(seed)
    return cd.DiffusionModel(size, base_channels=width, landmarks=landmarks)


def live_model(size=16, width=8, seed=0, landmarks=False):
    """A tiny model in eval mode whose zero-initialised output layer is randomised, so that its
    predictions are not trivially zero: for samplers, editing, distillation and the studio."""
    model = tiny_model(size, width, seed, landmarks)
    torch.nn.init.normal_(model.head[-1].weight, std=0.05)
    return model.eval()


def distinct_model(size=16, width=8, seed=0, landmarks=False):
    """A tiny model whose every tensor, zero-initialised layers included, is distinctive: for
    round trips that must restore each one."""
    model = tiny_model(size, width, seed, landmarks)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return model


class TinyFaces:
    """What train() needs of a CatDataset: uint8 faces, landmarks and a length."""

    def __init__(self, n=20, size=16):
        g = torch.Generator().manual_seed(0)
        self.faces = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
        self.landmarks = torch.rand(n, 9, 2, generator=g)

    def __len__(self):
        return len(self.faces)


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


class StepClock:
    """A stand-in for time.perf_counter that advances `seconds(step)` per training step (one second
    by default): the machine's speed as a test wants it."""

    def __init__(self, seconds=lambda step: 1.0):
        self.now, self.steps, self.seconds = 0.0, 0, seconds

    def __call__(self):
        return self.now

    def loss(self, real):
        def timed_loss(*args, **kwargs):
            if torch.is_grad_enabled():
                self.steps += 1
                self.now += self.seconds(self.steps)
            return real(*args, **kwargs)
        return timed_loss


def script_env(cache, **extra):
    """The environment of a test's `python cat_diffusion.py` subprocess: its own face cache, one
    torch thread, no window."""
    env = dict(os.environ, XDG_CACHE_HOME=str(cache), OMP_NUM_THREADS="1", MPLBACKEND="Agg", **extra)
    env.pop("DISPLAY", None)
    return env


def run_main(argv, cache, cwd=None):
    """cd.main(argv) for a module-scoped fixture, which the per-test fixtures do not cover: its
    own face cache, no window, 2 DPM-Solver++ steps for the pictures drawn at the end of training."""
    with pytest.MonkeyPatch.context() as mp:
        if cwd:
            mp.chdir(cwd)
        mp.setattr(cd, "CACHE_DIR", cache)
        mp.setattr(cd, "HAS_DISPLAY", False)
        mp.setitem(cd.SAMPLERS, "dpm++", 2)
        cd.main(argv)


def hostile_model(path, config):
    """A model file whose config is `config` and that holds no weights."""
    torch.save({"kind": "model", "class": "DiffusionModel", "config": config, "state_dict": {}}, path)
    return str(path)


def png_header(width, height):
    """A PNG that declares width x height pixels and holds almost nothing (a decompression bomb)."""
    def chunk(kind, data):
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")
    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([1, 0, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


# ----------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------

def assert_same_weights(a, b, atol=0.0):
    """Two models' (or state dicts') tensors are equal, or within `atol`."""
    sa, sb = (m.state_dict() if isinstance(m, nn.Module) else m for m in (a, b))
    assert sa.keys() == sb.keys()
    for k in sa:
        worst = (sa[k].cpu().float() - sb[k].cpu().float()).abs().max().item() if sa[k].numel() else 0.0
        assert worst <= atol, f"{k} differs by up to {worst:.2e}"


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


def snapshot(root):
    """Every file under `root` (the face cache aside) and its bytes."""
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and "face-cache" not in p.parts}


# ----------------------------------------------------------------------------------------------
# An oracle denoiser whose answers are known in closed form
# ----------------------------------------------------------------------------------------------

class GaussianOracle(nn.Module):
    """The exact (posterior-mean) v-prediction for data x0 ~ N(mu, s^2 I), independent pixels:
    E[x0 | x_t] = mu + sqrt(ab) s^2 / (ab s^2 + 1 - ab) (x_t - sqrt(ab) mu)."""

    def __init__(self, mu, s):
        super().__init__()
        self.config = {"image_size": mu.shape[-1]}
        self.dummy = nn.Parameter(torch.zeros(()))
        self.mu, self.s = mu.double(), s

    def forward(self, x, t, landmarks=None):
        ab = cd.ALPHA_BAR[t].double()[:, None, None, None]
        a, sigma, x = ab.sqrt(), (1 - ab).sqrt(), x.double()
        x0 = self.mu + a * self.s ** 2 / (ab * self.s ** 2 + 1 - ab) * (x - a * self.mu)
        eps = (x - a * x0) / sigma
        return (a * eps - sigma * x0).float()

    def ode_point(self, x_start, t_start, t_end):
        """Where the probability-flow ODE takes x_start (at t_start) at t_end: for Gaussian data it
        keeps each pixel's z-score."""
        (ab, ab_end), s = (cd.ALPHA_BAR[t].double() for t in (t_start, t_end)), self.s
        z = (x_start.double() - ab.sqrt() * self.mu) / (ab * s ** 2 + 1 - ab).sqrt()
        return ab_end.sqrt() * self.mu + (ab_end * s ** 2 + 1 - ab_end).sqrt() * z

    def ode_endpoint(self, x_start, t_start):
        """Where the probability-flow ODE takes x_start (at t_start) at t = 0, then denoised: for
        Gaussian data the ODE keeps each pixel's z-score. Returns E[x0 | x at t = 0]."""
        ab, ab0, s = cd.ALPHA_BAR[t_start].double(), cd.ALPHA_BAR[0].double(), self.s
        z = (x_start.double() - ab.sqrt() * self.mu) / (ab * s ** 2 + 1 - ab).sqrt()
        return self.mu + s * (ab0.sqrt() * s / (ab0 * s ** 2 + 1 - ab0).sqrt()) * z


def gaussian_oracle(size=8):
    mu = (torch.rand(3, size, size, generator=torch.Generator().manual_seed(0)) - 0.5)
    return GaussianOracle(mu, s=0.1)  # |mu| + 4.5 s < 1: the samplers' x0 clamp never acts
