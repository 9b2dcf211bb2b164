"""Shared fixtures and the markers that skip slow, GPU and real-data tests by default."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CAMVID = Path(os.environ.get("CAMVID_ROOT", REPO.parent / "shared" / "datasets" / "camvid"))


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    skip_slow = pytest.mark.skip(reason="slow: pass --runslow")
    skip_camvid = pytest.mark.skip(reason=f"CamVid copy not found at {CAMVID}")
    try:
        import torch
        has_cuda = torch.cuda.is_available()
    except Exception:
        has_cuda = False
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(skip_slow)
        if "camvid" in item.keywords and not (CAMVID / "train").is_dir():
            item.add_marker(skip_camvid)
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)


@pytest.fixture
def camvid_root() -> Path:
    return CAMVID


@pytest.fixture
def repo_root() -> Path:
    return REPO
