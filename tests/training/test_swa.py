"""SWA: streaming checkpoint averaging, BatchNorm re-estimation, snapshot selection and the
`swa` stage end to end on a tiny real run (and on hand-made runs), with its errors."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.core.errors import PipelineError, run_cli
from pipeline.core.runs import RunPaths
from pipeline.data.dataset import SegmentationDataset, build_eval_loader
from pipeline.data.manifest import read_classes
from pipeline.data.transforms import transform_from_params
from pipeline.evaluation.metrics import mean_iou
from pipeline.models.build import build_model
from pipeline.models.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from pipeline.models.predict import validate
from pipeline.swa import main, parse_iters
from pipeline.training.averaging import (Snapshot, average_checkpoints, average_state_dicts, has_batchnorm,
                                         list_snapshots, select_snapshots, update_batchnorm)
from pipeline.training.run_data import load_run_data

TINY_SPEC = {"arch": "Unet", "encoder": "tu-test_resnet", "num_classes": 3,
             "decoder_channels": [16, 16, 8, 8, 8]}
GN_SPEC = {"arch": "Unet", "encoder": "tu-test_efficientnet_gn", "num_classes": 3,
           "decoder_channels": [16, 16, 8, 8, 8], "decoder_use_norm": "identity"}




def cli(argv, capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, [str(a) for a in argv])
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def _save(path: Path, model: nn.Module, *, iteration: int = 0, fold=0, seed: int = 0,
          run: dict | None = None, classes=None) -> Path:
    config = {"model": model.model_config, "run": run or {}, "fold": fold, "seed": seed}
    return save_checkpoint(path, model=model, config=config, classes=classes or {"names": []},
                           fold=fold, seed=seed, iteration=iteration, rng_state=False)


def _float_items(state: dict):
    return [(k, v) for k, v in state.items() if v.is_floating_point()]


# ----------------------------------------------------------------------------- averaging
def test_average_of_identical_checkpoints_is_the_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = build_model(**TINY_SPEC)
    paths = [_save(tmp_path / f"c{i}.pt", model, iteration=i) for i in range(3)]
    state, info = average_checkpoints(paths)
    ref = model.state_dict()
    assert state.keys() == ref.keys()
    for key, value in ref.items():
        assert state[key].dtype == value.dtype
        assert torch.equal(state[key], value), key  # float64 sum: exact, not just within eps
    assert info["files"] == ["c0.pt", "c1.pt", "c2.pt"] and info["iterations"] == [0, 1, 2]
    assert "model" not in info["reference"] and info["reference"]["config"]["model"]["encoder"] \
        == "tu-test_resnet"


def test_average_of_two_checkpoints_is_the_elementwise_mean(tmp_path):
    torch.manual_seed(0)
    a, b = build_model(**TINY_SPEC), build_model(**TINY_SPEC)
    with torch.no_grad():
        for name, t in a.state_dict().items():
            if t.is_floating_point():
                t.fill_(1.0)
            else:
                t.fill_(3)
        for t in b.state_dict().values():
            if t.is_floating_point():
                t.copy_(torch.randn_like(t))
            else:
                t.fill_(7)
    state, _ = average_checkpoints([_save(tmp_path / "a.pt", a), _save(tmp_path / "b.pt", b)])
    sb = b.state_dict()
    for key, value in state.items():
        if value.is_floating_point():
            assert torch.equal(value, ((1.0 + sb[key].double()) / 2).float()), key
        else:
            assert torch.equal(value, torch.full_like(value, 7)), key  # integers: the last


def test_average_state_dicts_by_hand_and_mismatches():
    s1 = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)}
    s2 = {"w": torch.tensor([3.0, 6.0]), "n": torch.tensor(7)}
    s3 = {"w": torch.tensor([2.0, 1.0]), "n": torch.tensor(1)}
    out = average_state_dicts(iter([s1, s2, s3]))  # any iterable, consumed once
    assert torch.equal(out["w"], torch.tensor([2.0, 3.0])) and out["n"].item() == 1
    with pytest.raises(PipelineError, match="tensor 'w'"):
        average_state_dicts([s1, {"w": torch.zeros(3), "n": torch.tensor(1)}])
    with pytest.raises(PipelineError, match="missing n"):
        average_state_dicts([s1, {"w": torch.zeros(2)}])


def test_average_checkpoints_rejects_other_architecture(tmp_path):
    a = _save(tmp_path / "a.pt", build_model(**TINY_SPEC))
    b = _save(tmp_path / "b.pt", build_model(**GN_SPEC))
    with pytest.raises(PipelineError, match=r"b\.pt: another architecture .*encoder"):
        average_checkpoints([a, b])
    c = _save(tmp_path / "c.pt", build_model(**TINY_SPEC), fold=1)
    with pytest.raises(PipelineError, match=r"c\.pt: from another run .*fold"):
        average_checkpoints([a, c])


# ----------------------------------------------------------------------------- BatchNorm
def test_bn_reestimation_matches_a_hand_computed_pass():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=0.3), nn.ReLU())
    bn = model[1]
    bn.running_mean.fill_(5.0)
    bn.running_var.fill_(9.0)
    model.eval()
    # batches of different sizes and offsets, so the three candidate definitions differ
    batches = [torch.randn(n, 3, 6, 7) + shift for n, shift in ((2, 0.0), (5, 1.0), (1, -2.0))]
    assert update_batchnorm(model, batches) is True

    conv = model[0]
    means, vars_, pooled = [], [], []
    for x in batches:
        y = F.conv2d(x.double(), conv.weight.double(), conv.bias.double())
        means.append(y.mean(dim=(0, 2, 3)))
        vars_.append(y.var(dim=(0, 2, 3), unbiased=True))
        pooled.append(y.transpose(0, 1).flatten(1))
    # update_bn (momentum None): the plain mean over batches of the batch mean and of the
    # unbiased batch variance, each batch weighing the same whatever its size
    expect_mean, expect_var = torch.stack(means).mean(0), torch.stack(vars_).mean(0)
    assert torch.allclose(bn.running_mean.double(), expect_mean, atol=1e-5)
    assert torch.allclose(bn.running_var.double(), expect_var, atol=1e-5)
    assert bn.num_batches_tracked.item() == len(batches)
    whole = torch.cat(pooled, dim=1)  # what it is not: statistics of all pixels pooled
    assert (bn.running_mean.double() - whole.mean(1)).abs().max() > 1e-2
    assert bn.momentum == 0.3 and not model.training  # settings put back


def test_norm_layers_without_running_stats_skip_reestimation():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.Conv2d(4, 4, 1),
                          nn.LayerNorm([4, 4, 4]))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert not has_batchnorm(model)
    assert update_batchnorm(model, iter([torch.randn(2, 3, 6, 6)])) is False
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert has_batchnorm(build_model(**TINY_SPEC)) and not has_batchnorm(build_model(**GN_SPEC))
    assert not has_batchnorm(nn.BatchNorm2d(4, track_running_stats=False))


def test_bn_reestimation_needs_a_batch():
    with pytest.raises(PipelineError, match="no batch"):
        update_batchnorm(nn.Sequential(nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2)), [])


# ----------------------------------------------------------------------------- selection
def test_snapshot_listing_and_selection(tmp_path):
    for it in (12, 8, 10, 100):
        (tmp_path / f"swa_{it:07d}.pt").write_bytes(b"x")
    (tmp_path / ".swa_0000014.pt.abc.tmp").write_bytes(b"x")  # a save cut short: ignored
    (tmp_path / "notes.txt").write_text("x")
    snaps = list_snapshots(tmp_path)
    assert [s.iteration for s in snaps] == [8, 10, 12, 100]
    assert list_snapshots(tmp_path / "missing") == []
    pick = lambda **kw: [s.iteration for s in select_snapshots(snaps, **kw)]  # noqa: E731
    assert pick() == [8, 10, 12, 100]
    assert pick(last=2) == [12, 100] and pick(last=10) == [8, 10, 12, 100]
    assert pick(iters=(10, 12)) == [10, 12]            # inclusive
    assert pick(iters=(None, 10)) == [8, 10] and pick(iters=(11, None)) == [12, 100]
    assert pick(iters=(8, 12), last=1) == [12]          # range first, then the last N
    with pytest.raises(PipelineError, match="available: 8, 10, 12, 100"):
        select_snapshots(snaps, iters=(13, 99))
    with pytest.raises(PipelineError, match="--last"):
        select_snapshots(snaps, last=0)
    with pytest.raises(PipelineError, match="low end"):
        select_snapshots(snaps, iters=(12, 10))
    assert parse_iters("10:20") == (10, 20) and parse_iters(":5") == (None, 5)
    with pytest.raises(PipelineError, match="LO:HI"):
        parse_iters("10-20")
    assert isinstance(snaps[0], Snapshot)


# ----------------------------------------------------------------------------- the stage
@pytest.fixture(scope="module")
def trained_run(demo_workspace) -> RunPaths:
    """The demo workspace's tiny run (fold 0, 2 SWA snapshots); copy before writing to it."""
    return demo_workspace.train()


def _copy_run(run: RunPaths, tmp_path: Path) -> RunPaths:
    return RunPaths(Path(shutil.copytree(run.root, tmp_path / run.root.name)))


def _args(ws, run: RunPaths, *extra) -> list:
    return [run.root, "--data", ws.data, "--folds", ws.folds, "--device", "cpu",
            "--no-progress", *extra]


def _val_miou(ws, model: nn.Module, fold: int) -> float:
    data = load_run_data(manifest=ws.manifest, classes_path=ws.classes, counts_path=ws.counts,
                         folds_path=ws.folds, fold=fold)
    ds = SegmentationDataset(data.val_frames, classes=data.classes,
                             transform=transform_from_params({}, train=False))
    cm = validate(model, build_eval_loader(ds), num_classes=data.classes.num_classes,
                  device=torch.device("cpu"), ignore_index=data.classes.ignore_index)
    return mean_iou(cm)


def test_cli_end_to_end_on_a_trained_run(demo_workspace, trained_run, tmp_path, capsys):
    ws, run = demo_workspace, _copy_run(trained_run, tmp_path)
    code, out, err = cli(_args(ws, run), capsys)
    assert code == 0, err
    metrics = json.loads((run.root / "swa_metrics.json").read_text())
    assert set(metrics) == {"last_miou", "swa_miou", "gain", "snapshots", "bn_updated",
                            "last_cm", "swa_cm"}
    assert metrics["snapshots"] == 2 and metrics["bn_updated"] is True
    assert metrics["gain"] == pytest.approx(metrics["swa_miou"] - metrics["last_miou"])
    # the stored matrices are the scores' own (the report pools them over folds)
    for kind in ("last", "swa"):
        cm = np.asarray(metrics[f"{kind}_cm"])
        assert cm.ndim == 2 and cm.shape[0] == cm.shape[1] and cm.sum() > 0
        assert mean_iou(cm) == pytest.approx(metrics[f"{kind}_miou"], abs=1e-12)
    # last.pt scores what training's own final validation scored
    trained = json.loads(run.metrics.read_text())
    assert metrics["last_miou"] == pytest.approx(trained["last_miou"], abs=1e-9)
    assert f"{100 * metrics['swa_miou']:.2f}" in out and "last.pt" in out

    model, ckpt = model_from_checkpoint(run.swa)  # rebuilt from its own config alone
    assert ckpt["extra"]["swa"] == {"snapshots": ["swa_0000010.pt", "swa_0000012.pt"],
                                    "iterations": [10, 12], "bn_updated": True}
    assert ckpt["iteration"] == 12 and ckpt["fold"] == 0 and ckpt["seed"] == 0
    assert ckpt["metric"]["miou"] == pytest.approx(metrics["swa_miou"])
    assert _val_miou(ws, model, 0) == pytest.approx(metrics["swa_miou"], abs=1e-9)

    # weights are the snapshots' mean; BN statistics come from the new pass (14 frames / 4)
    averaged, _ = average_checkpoints([run.snapshot(10), run.snapshot(12)])
    state = ckpt["model"]
    bn_stats = [k for k in state if k.endswith(("running_mean", "running_var"))]
    assert bn_stats
    for key, value in _float_items(state):
        if key in bn_stats:
            continue
        assert torch.equal(value, averaged[key]), key
    assert any(not torch.allclose(state[k], averaged[k]) for k in bn_stats)
    counts = {v.item() for k, v in state.items() if k.endswith("num_batches_tracked")}
    assert counts == {math.ceil(14 / 4)}

    # deterministic: a second run writes the same BN statistics
    again = _copy_run(trained_run, tmp_path / "again")
    assert cli(_args(ws, again), capsys)[0] == 0
    state2 = load_checkpoint(again.swa)["model"]
    assert all(torch.equal(state[k], state2[k]) for k in state)


def test_last_score_is_revalidated_when_the_checkpoint_holds_none(demo_workspace, trained_run,
                                                                   tmp_path, capsys):
    """SWA reuses the score training stored in last.pt; without one it validates last.pt
    itself and gets the same number (same frames, transform and scale)."""
    ws, run = demo_workspace, _copy_run(trained_run, tmp_path)
    ckpt = torch.load(run.last, map_location="cpu", weights_only=False)
    ckpt["metric"] = None
    torch.save(ckpt, run.last)
    code, out, err = cli(_args(ws, run), capsys)
    assert code == 0, err
    metrics = json.loads((run.root / "swa_metrics.json").read_text())
    trained = json.loads(run.metrics.read_text())
    assert metrics["last_miou"] == pytest.approx(trained["last_miou"], abs=1e-9)


def test_cli_selection_and_bn_batches(demo_workspace, trained_run, tmp_path, capsys):
    ws, run = demo_workspace, _copy_run(trained_run, tmp_path)
    assert cli(_args(ws, run, "--last", 1, "--bn-batches", 2), capsys)[0] == 0
    ckpt = load_checkpoint(run.swa)
    assert ckpt["extra"]["swa"]["snapshots"] == ["swa_0000012.pt"]
    assert {v.item() for k, v in ckpt["model"].items() if k.endswith("num_batches_tracked")} == {2}
    assert cli(_args(ws, run, "--iters", "9:10"), capsys)[0] == 0
    ckpt = load_checkpoint(run.swa)
    assert ckpt["extra"]["swa"]["iterations"] == [10] and ckpt["iteration"] == 10
    assert json.loads((run.root / "swa_metrics.json").read_text())["snapshots"] == 1


def _fake_gn_run(ws, root: Path, fold) -> RunPaths:
    """A hand-made run of a GroupNorm-only model: two snapshots and last.pt, no training."""
    run = RunPaths(root)
    classes = read_classes(ws.classes)
    spec = {**GN_SPEC, "num_classes": classes.num_classes}
    cfg = {"augment": {"crop": [32, 32]}, "batch_size": 4, "amp": False}
    for i, it in enumerate((10, 12)):
        torch.manual_seed(i)
        model = build_model(**spec)
        _save(run.snapshot(it), model, iteration=it, fold=fold, run=cfg, classes=classes.to_json())
    _save(run.last, model, iteration=12, fold=fold, run=cfg, classes=classes.to_json())
    return run


def test_cli_groupnorm_model_skips_bn_pass(demo_workspace, tmp_path, capsys):
    ws = demo_workspace
    run = _fake_gn_run(ws, tmp_path / "gn_f0_s0", fold=0)
    code, out, err = cli(_args(ws, run), capsys)
    assert code == 0, err
    metrics = json.loads((run.root / "swa_metrics.json").read_text())
    assert metrics["bn_updated"] is False and metrics["swa_miou"] is not None
    assert "not used" in out
    state = load_checkpoint(run.swa)["model"]
    a, b = (load_checkpoint(run.snapshot(it))["model"] for it in (10, 12))
    for key, value in _float_items(state):  # no BN pass: the plain mean, nothing else
        assert torch.equal(value, ((a[key].double() + b[key].double()) / 2).float()), key

    # fold "all": nothing to validate and no BN pass, so no data is read at all
    run_all = _fake_gn_run(ws, tmp_path / "gn_fall_s0", fold="all")
    code, out, err = cli([run_all.root, "--data", tmp_path / "nowhere", "--device", "cpu",
                          "--no-progress"], capsys)
    assert code == 0, err
    metrics = json.loads((run_all.root / "swa_metrics.json").read_text())
    assert metrics["last_miou"] is None and metrics["swa_miou"] is None and metrics["gain"] is None
    assert load_checkpoint(run_all.swa)["metric"] is None


def _assert_error(code: int, err: str, *needles: str) -> None:
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    for needle in needles:
        assert needle in err, err


def test_cli_errors(demo_workspace, trained_run, tmp_path, capsys):
    ws = demo_workspace
    _assert_error(*cli(_args(ws, RunPaths(tmp_path / "missing_run")), capsys)[::2], "missing_run")

    run = _copy_run(trained_run, tmp_path / "empty")
    shutil.rmtree(run.snapshots)
    _assert_error(*cli(_args(ws, run), capsys)[::2], str(run.snapshots), "swa.iters > 0")
    assert not run.swa.exists()

    run = _copy_run(trained_run, tmp_path / "select")
    _assert_error(*cli(_args(ws, run, "--iters", "100:200"), capsys)[::2], "available: 10, 12")
    _assert_error(*cli(_args(ws, run, "--bn-batches", "some"), capsys)[::2], "--bn-batches")
    assert not run.swa.exists()

    run = _copy_run(trained_run, tmp_path / "no_last")
    run.last.unlink()
    _assert_error(*cli(_args(ws, run), capsys)[::2], str(run.last))
    assert not run.swa.exists()

    run = _copy_run(trained_run, tmp_path / "mixed")
    other = build_model(**{**GN_SPEC, "num_classes": read_classes(ws.classes).num_classes})
    _save(run.snapshot(11), other, iteration=11)
    _assert_error(*cli(_args(ws, run), capsys)[::2], "swa_0000011.pt", "architecture")
    assert not run.swa.exists() and not (run.root / "swa_metrics.json").exists()

    run = _copy_run(trained_run, tmp_path / "corrupt")
    run.snapshot(12).write_bytes(b"this is not a checkpoint")
    _assert_error(*cli(_args(ws, run), capsys)[::2], str(run.snapshot(12)))
    assert not run.swa.exists() and not (run.root / "swa_metrics.json").exists()
