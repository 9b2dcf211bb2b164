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


# ----------------------------------------------------------------------------- demo workspace
# A tiny demo project shared by the tests of training and of the stages after it (SWA,
# inference, ensembling): built once per session; treat it as read-only and send new runs to
# a tmp_path (``runs=``) unless they are the cached ones of DemoWorkspace.train.
import copy  # noqa: E402  (appended section: its imports live with it)
from dataclasses import dataclass  # noqa: E402

import yaml  # noqa: E402

DEMO_OPTIONS = {"seed": 0, "videos": 6, "test_videos": 2, "min_frames": 6, "max_frames": 8,
                "height": 32, "width": 48}
TINY_MODEL = {  # timm's test_resnet (0.4M parameters): a Unet that trains in ~15 ms/iter on a CPU
    "arch": "Unet", "encoder": "tu-test_resnet",
    "arch_kwargs": {"decoder_channels": [16, 16, 8, 8, 8]},
    "batch_size": 4, "iters": 8, "val_interval": 4, "ckpt_interval": 2, "log_interval": 1,
    "augment": {"crop": [32, 32], "scale": [0.75, 1.25], "hflip": 0.5, "photometric": False},
    "loss": [{"name": "ce"}],
    "optimizer": {"name": "adamw", "lr": 0.003, "weight_decay": 0.01, "head_lr_mult": 10.0},
    "schedule": {"warmup_iters": 0},
    "swa": {"iters": 4, "interval": 2, "max_lr_ratio": 0.1, "min_lr_ratio": 0.01},
}
TINY_TRAIN = {"models": ["tiny"], "students": [], "folds": [0, 1], "seeds": [0], "device": "cpu",
              "num_workers": 0, "deterministic": True, "runs_dir": "runs"}


@dataclass(frozen=True)
class DemoWorkspace:
    """Paths of the demo workspace: ``data/``, ``folds/folds.csv``, ``params.yaml``, ``runs/``.

    ``params.yaml`` holds ``prepare`` (the demo options), ``folds`` (2 folds), ``train`` and
    ``models.tiny`` (:data:`TINY_MODEL`). Stage scripts run with ``cwd=root`` use the defaults.
    """

    root: Path
    model: str = "tiny"
    n_folds: int = 2

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def manifest(self) -> Path:
        return self.data / "manifest.csv"

    @property
    def classes(self) -> Path:
        return self.data / "classes.json"

    @property
    def counts(self) -> Path:
        return self.data / "class_counts.npz"

    @property
    def folds(self) -> Path:
        return self.root / "folds" / "folds.csv"

    @property
    def params(self) -> Path:
        return self.root / "params.yaml"

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    def read_params(self) -> dict:
        return yaml.safe_load(self.params.read_text())

    def write_params(self, path: str | Path, *, models: dict | None = None,
                     train: dict | None = None, **sections: dict) -> Path:
        """A copy of params.yaml at ``path`` with ``models.<name>`` entries merged over the tiny
        config (``{name: {key: value}}``; a new name starts from :data:`TINY_MODEL`, a value of
        None drops the key), ``train`` keys replaced, and whole other sections set."""
        params = self.read_params()
        for name, overrides in (models or {}).items():
            entry = copy.deepcopy(params["models"].get(name, TINY_MODEL))
            for key, value in overrides.items():
                if value is None:
                    entry.pop(key, None)
                else:
                    entry[key] = value
            params["models"][name] = entry
        params["train"].update(train or {})
        params.update(sections)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(params, sort_keys=False))
        return path

    def train_args(self, model: str = "tiny", fold: int | str = 0, seed: int = 0, *,
                   params: str | Path | None = None, runs: str | Path | None = None) -> list[str]:
        """Arguments of ``pipeline/train.py`` for a run of this workspace (absolute paths)."""
        return ["--model", model, "--fold", str(fold), "--seed", str(seed),
                "--params", str(params or self.params), "--data", str(self.data),
                "--folds", str(self.folds), "--runs", str(runs or self.runs), "--no-progress"]

    def train(self, model: str = "tiny", fold: int | str = 0, seed: int = 0, *,
              params: str | Path | None = None, runs: str | Path | None = None):
        """Train a run once per session (kept in ``runs``, default ``root/runs``) and return its
        :class:`pipeline.core.runs.RunPaths`; a finished run (metrics.json present) is reused."""
        from pipeline.core.names import run_name
        from pipeline.core.runs import RunPaths, parse_fold
        from pipeline.train import main as train_main

        paths = RunPaths(Path(runs or self.runs) / run_name(model, parse_fold(fold), seed))
        if not paths.metrics.is_file():
            import torch

            deterministic = torch.are_deterministic_algorithms_enabled()
            try:
                train_main(self.train_args(model, fold, seed, params=params, runs=runs))
            finally:  # train_run switches deterministic algorithms on for the whole process
                torch.use_deterministic_algorithms(deterministic)
        return paths


@pytest.fixture(scope="session")
def demo_workspace(tmp_path_factory) -> DemoWorkspace:
    """A tiny demo dataset (4 train videos of 6-8 frames of 32x48, 2 test videos), 2 folds and a
    params.yaml with the tiny model config, built once per test session."""
    from pipeline.data.adapters import parse_options
    from pipeline.data.preparation import prepare_dataset
    from pipeline.data.splits import make_folds

    ws = DemoWorkspace(root=tmp_path_factory.mktemp("demo_workspace"))
    prepare_dataset(dataset="demo", root=None, out=ws.data, workers=1,
                    options=parse_options("demo", DEMO_OPTIONS))
    make_folds(manifest=ws.manifest, counts=ws.counts, out=ws.folds, n_folds=ws.n_folds, seed=0)
    params = {"prepare": {"dataset": "demo", "out": "data", "workers": 1, "demo": DEMO_OPTIONS},
              "folds": {"n_folds": ws.n_folds, "seed": 0},
              "train": TINY_TRAIN, "models": {ws.model: TINY_MODEL}}
    ws.params.write_text(yaml.safe_dump(params, sort_keys=False))
    return ws


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """One torch thread per test: tiny models gain nothing from more, OpenMP threads fighting
    over 2 busy cores are many times slower, and runs compare bit for bit with subprocesses
    (which get OMP_NUM_THREADS=1). train_run switches deterministic algorithms on: restore it."""
    import torch

    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)
