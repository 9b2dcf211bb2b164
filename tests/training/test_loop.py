"""The training loop (pipeline.training.loop.train_run) in process, on the tiny demo workspace:
learning, self-describing checkpoints, SWA snapshots, non-finite losses, logit adjustment.

Its helpers (a config, the run's data, a run, its logs) serve the other tests of training runs."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json

import pytest
import torch

from pipeline.core.curves import TRAIN, VAL, read_group
from pipeline.core.names import run_name
from pipeline.core.runs import RunPaths, parse_model_params
from pipeline.data.dataset import SegmentationDataset
from pipeline.data.demo import CLASSES
from pipeline.data.transforms import eval_transform
from pipeline.models.checkpoint import load_checkpoint, model_from_checkpoint
from pipeline.models.predict import forward_padded
from pipeline.models.prior import CosineClassifier
from pipeline.training import distill
from pipeline.training.loop import NonFiniteLoss, train_run
from pipeline.training.run_data import load_run_data

CPU = torch.device("cpu")


def _cfg(ws, name: str = "tiny", **overrides):
    """The workspace's tiny config with top-level keys replaced."""
    values = copy.deepcopy(ws.read_params()["models"][ws.model])
    values.update(overrides)
    return parse_model_params(name, values)


def _data(ws, fold=0):
    return load_run_data(manifest=ws.manifest, classes_path=ws.classes, counts_path=ws.counts,
                         folds_path=ws.folds, fold=fold)


def _train(ws, cfg, runs, *, fold=0, seed=0, data=None):
    paths = RunPaths(runs / run_name(cfg.name, fold, seed))
    metrics = train_run(cfg=cfg, paths=paths, fold=fold, seed=seed, data=data or _data(ws, fold),
                        device=CPU, num_workers=0, progress=False)
    return paths, metrics


def _rows(paths, group: str = TRAIN) -> list[dict]:
    """The rows of a run's DVCLive curves of ``group``: {"iter": step, curve: value}."""
    table = read_group(paths.curves, group) or {"iter": []}
    return [{k: int(v[i]) if k == "iter" else float(v[i]) for k, v in table.items()}
            for i in range(len(table["iter"]))]


def _iters(paths, group: str = TRAIN) -> list[int]:
    return [r["iter"] for r in _rows(paths, group)]


def _assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _loss_hook(monkeypatch, hook):
    """Make train_run's loss call ``hook(call_index, loss, parts)`` after the real loss."""
    real_build = distill.build_loss

    def build(*args, **kwargs):
        real, calls = real_build(*args, **kwargs), itertools.count()

        def loss_fn(*a, **k):
            return hook(next(calls), *real(*a, **k))
        return loss_fn

    monkeypatch.setattr(distill, "build_loss", build)



# ----------------------------------------------------------------------------- a whole run
def test_short_run_learns_and_writes_self_describing_checkpoints(demo_workspace, tmp_path):
    ws = demo_workspace
    swa = {"iters": 4, "interval": 2, "max_lr_ratio": 0.1, "min_lr_ratio": 0.01}
    cfg = _cfg(ws, iters=24, val_interval=12, ckpt_interval=0, swa=swa,
               augment={"crop": [32, 32], "hflip": 0.0, "photometric": False},
               optimizer={"name": "adamw", "lr": 0.01, "head_lr_mult": 1.0})
    full = _data(ws)
    data = dataclasses.replace(full, train_frames=full.train_frames[:4])  # one batch: overfit it
    paths, metrics = _train(ws, cfg, tmp_path / "runs", data=data)

    log = _rows(paths)
    assert [int(r["iter"]) for r in log] == list(range(1, 29))
    losses = [float(r["loss"]) for r in log]
    assert all(r["loss"] == r["ce"] for r in log)
    early, late = sum(losses[:4]) / 4, sum(losses[20:24]) / 4
    assert late < 0.6 * early, losses

    assert json.loads(paths.metrics.read_text()) == metrics
    assert metrics["iterations"] == 28 and metrics["val_frames"] == len(full.val_frames)
    val = _rows(paths, VAL)
    assert [int(r["iter"]) for r in val] == [12, 24, 28]  # every val_interval, end of main, end
    assert metrics["best_miou"] == pytest.approx(max(float(r["miou"]) for r in val), abs=1e-5)
    assert metrics["last_miou"] == pytest.approx(float(val[-1]["miou"]), abs=1e-5)
    class_iou = json.loads(paths.class_iou.read_text())
    assert class_iou["iter"] == 28 and list(class_iou["per_class_iou"]) == list(CLASSES)

    model, ckpt = model_from_checkpoint(paths.best)  # from the file alone
    assert ckpt["config"]["run"] == cfg.to_dict()
    assert ckpt["classes"]["names"] == list(CLASSES)
    assert (ckpt["fold"], ckpt["seed"], ckpt["iteration"]) == (0, 0, metrics["best_iter"])
    assert ckpt["metric"]["miou"] == pytest.approx(metrics["best_miou"])
    frame = SegmentationDataset(full.val_frames[:1], classes=full.classes,
                                transform=eval_transform())[0]
    logits = forward_padded(model, frame["image"][None])
    assert logits.shape == (1, len(CLASSES), *frame["mask"].shape)
    assert torch.isfinite(logits).all()

    # SWA: a snapshot at the end of each 2-iteration cycle, taken at the cycle's lowest lr
    names = [f"swa_{i:07d}.pt" for i in (26, 28)]
    assert metrics["swa_snapshots"] == 2
    assert sorted(p.name for p in paths.snapshots.iterdir()) == names
    lr = {int(r["iter"]): float(r["lr"]) for r in log}
    for i in (25, 26, 27, 28):
        ratio = 0.01 if i % 2 == 0 else (0.1 + 0.01) / 2
        assert lr[i] == pytest.approx(0.01 * ratio), i
    assert load_checkpoint(paths.snapshot(26))["iteration"] == 26
    last_snapshot = load_checkpoint(paths.snapshot(28))
    assert last_snapshot["optimizer"] is None  # weights only
    _assert_same_tensors(last_snapshot["model"], load_checkpoint(paths.last)["model"])
    assert load_checkpoint(paths.last)["iteration"] == 28



# ----------------------------------------------------------------------------- failures
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(demo_workspace, tmp_path,
                                                                  monkeypatch):
    ws = demo_workspace
    cfg = _cfg(ws)  # checkpoints at 2, 4, 6 ...

    def nan_from_5(call, loss, parts):
        return (loss * float("nan") if call >= 5 else loss), parts

    _loss_hook(monkeypatch, nan_from_5)
    paths = RunPaths(tmp_path / run_name("tiny", 0, 0))
    with pytest.raises(NonFiniteLoss) as err:
        _train(ws, cfg, tmp_path)
    message = str(err.value)
    assert "\n" not in message and "loss is nan at iteration 5" in message
    assert f"Last good checkpoint: {paths.last} (iteration 4)" in message
    assert "models.tiny" in message  # says where to lower the lr
    ckpt = load_checkpoint(paths.last)
    assert ckpt["iteration"] == 4
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values() if t.is_floating_point())
    assert _iters(paths) == [1, 2, 3, 4, 5]
    assert not paths.metrics.exists()


# ----------------------------------------------------------------------------- logit adjustment
def test_logit_adjusted_checkpoint_excludes_the_prior_at_eval(demo_workspace, tmp_path):
    ws = demo_workspace
    tau = 1.0
    cfg = _cfg(ws, iters=2, val_interval=2, swa={"iters": 0},
               logit_adjust={"enabled": True, "tau": tau, "scale": 16.0})
    data = _data(ws)
    paths, _ = _train(ws, cfg, tmp_path, data=data)
    model, ckpt = model_from_checkpoint(paths.best)
    heads = [m for m in model.modules() if isinstance(m, CosineClassifier)]
    assert len(heads) == 1
    head = heads[0]
    counts = torch.as_tensor(data.prior_counts, dtype=torch.float64)
    prior = counts / counts.sum()  # the training folds' pixels, not the validation fold's
    assert ckpt["config"]["model"]["logit_adjust"]["prior"] == pytest.approx(prior.tolist())
    expected = (tau * torch.log(prior.clamp_min(1e-12))).float()

    x = torch.randn(2, head.in_channels, 3, 5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        train_out, eval_out = head.train()(x), head.eval()(x)
        full_eval = model.eval()(torch.zeros(1, 3, 32, 32))
    assert torch.allclose(train_out - eval_out, expected.view(1, -1, 1, 1).expand_as(train_out),
                          atol=1e-5)
    assert torch.allclose(eval_out, head.cosine(x))
    assert full_eval.abs().max() <= head.scale + 1e-4  # eval logits are bare cosines, no prior

