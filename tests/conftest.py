"""Fixtures for every test: one torch thread, a private face cache and no window; tiny synthetic photo folders."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # cat_diffusion.py

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


@pytest.fixture
def cat_folder(tmp_path):
    """A tiny synthetic folder in the CAT format: 12 photos with their .cat files."""
    return cd.write_synthetic_dataset(tmp_path / "cats", count=12, seed=1)


@pytest.fixture(scope="session")
def photos(tmp_path_factory):
    """40 synthetic photos in the CAT format (36 land in the training split); read only."""
    return cd.write_synthetic_dataset(tmp_path_factory.mktemp("photos"), count=40, seed=0)
