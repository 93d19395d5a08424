import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED_DATA = ROOT.parent / "shared" / "data"

import cat_diffusion as cd  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Tiny models are dominated by per-op overhead; on a busy 2-core machine two OpenMP threads
    make them ~20x slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Every test gets its own face cache folder, never the user's ~/.cache, and no window opens."""
    monkeypatch.setattr(cd, "CACHE_DIR", tmp_path / "face-cache")
    monkeypatch.setattr(cd, "HAS_DISPLAY", False)
    return tmp_path / "face-cache"


def write_cat(path, points):
    """A .cat file exactly as the dataset has them: count, integers, trailing space, no newline."""
    values = " ".join(str(int(round(v))) for v in np.asarray(points).reshape(-1))
    Path(path).write_text(f"{len(points)} {values} ")


@pytest.fixture
def cat_folder(tmp_path):
    """A tiny synthetic folder in the CAT format: 12 photos with their .cat files."""
    return cd.write_synthetic_dataset(tmp_path / "cats", count=12, seed=1)


def needs_shared(name):
    path = SHARED_DATA / name
    return pytest.mark.skipif(not path.is_dir(), reason=f"{path} is absent (real CAT data)")
