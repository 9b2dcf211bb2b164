"""The training loop (pipeline.training.loop.train_run) in process, on the tiny demo workspace:
learning, self-describing checkpoints, SWA snapshots, resume, restarts, non-finite losses."""

from __future__ import annotations

import copy
import csv
import dataclasses
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.training import loop as engine
from pipeline.models.checkpoint import load_checkpoint, model_from_checkpoint
from pipeline.data.dataset import SegmentationDataset
from pipeline.data.demo import CLASSES
from pipeline.data.transforms import eval_transform
from pipeline.training.loop import NonFiniteLoss, load_run_data, train_run
from pipeline.models.prior import CosineClassifier
from pipeline.models.predict import forward_padded
from pipeline.core.runs import RunPaths, parse_model_params
from pipeline.core.names import run_name

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


def _rows(path) -> list[dict]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def _iters(path) -> list[int]:
    return [int(r["iter"]) for r in _rows(path)]


def _assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _loss_hook(monkeypatch, hook):
    """Make train_run's loss call ``hook(call_index, loss, parts)`` after the real loss."""
    real_build = engine.build_loss

    def build(*args, **kwargs):
        real, calls = real_build(*args, **kwargs), itertools.count()

        def loss_fn(*a, **k):
            return hook(next(calls), *real(*a, **k))
        return loss_fn

    monkeypatch.setattr(engine, "build_loss", build)


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

    log = _rows(paths.log)
    assert [int(r["iter"]) for r in log] == list(range(1, 29))
    losses = [float(r["loss"]) for r in log]
    assert all(r["loss"] == r["ce"] for r in log)
    early, late = sum(losses[:4]) / 4, sum(losses[20:24]) / 4
    assert late < 0.6 * early, losses

    assert json.loads(paths.metrics.read_text()) == metrics
    assert metrics["iterations"] == 28 and metrics["val_frames"] == len(full.val_frames)
    val = _rows(paths.val_log)
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


# ----------------------------------------------------------------------------- resume
def test_resume_after_interrupt_equals_uninterrupted_run(demo_workspace, tmp_path, monkeypatch,
                                                         capsys):
    ws = demo_workspace
    cfg = _cfg(ws)  # 8 + 4 SWA iterations, checkpoint every 2, validation every 4
    a, metrics_a = _train(ws, cfg, tmp_path / "a")

    def interrupt(call, loss, parts):
        if call == 7:  # iteration 8 of 12: last.pt holds iteration 6, the log goes to 7
            raise KeyboardInterrupt
        return loss, parts

    with monkeypatch.context() as patch:
        _loss_hook(patch, interrupt)
        with pytest.raises(KeyboardInterrupt):
            _train(ws, cfg, tmp_path / "b")
    b = RunPaths(tmp_path / "b" / a.root.name)
    assert load_checkpoint(b.last)["iteration"] == 6
    assert _iters(b.log) == list(range(1, 8))
    assert not b.metrics.exists()
    capsys.readouterr()

    _, metrics_b = _train(ws, cfg, tmp_path / "b")
    assert f"resuming {a.root.name} from iteration 6/12" in capsys.readouterr().out
    for name in ("last.pt", "best.pt", "snapshots/swa_0000010.pt", "snapshots/swa_0000012.pt"):
        _assert_same_tensors(load_checkpoint(b.train_dir / name)["model"],
                             load_checkpoint(a.train_dir / name)["model"])
    opt_a, opt_b = (load_checkpoint(p.last)["optimizer"]["state"] for p in (a, b))
    for k in opt_a:
        _assert_same_tensors(opt_a[k], opt_b[k])
    # the log continues without repeats and holds the uninterrupted run's losses
    log_a, log_b = _rows(a.log), _rows(b.log)
    assert _iters(b.log) == list(range(1, 13))
    assert [{k: v for k, v in r.items() if k != "images_per_s"} for r in log_b] == \
           [{k: v for k, v in r.items() if k != "images_per_s"} for r in log_a]
    assert b.val_log.read_text() == a.val_log.read_text()
    same = ("best_miou", "best_iter", "last_miou", "last_pixel_acc", "swa_snapshots")
    assert {k: metrics_b[k] for k in same} == {k: metrics_a[k] for k in same}
    assert b.class_iou.read_text() == a.class_iou.read_text()


def test_finished_run_is_a_no_op_and_a_new_config_starts_over(demo_workspace, tmp_path, capsys):
    ws = demo_workspace
    cfg = _cfg(ws)
    paths, metrics = _train(ws, cfg, tmp_path)
    files = {p: p.read_bytes() for p in (paths.last, paths.best, paths.log, paths.val_log,
                                         paths.snapshot(12))}
    paths.metrics.unlink()
    capsys.readouterr()
    _, again = _train(ws, cfg, tmp_path)
    assert "from iteration 12/12" in capsys.readouterr().out
    assert again == metrics and json.loads(paths.metrics.read_text()) == metrics
    assert metrics["images_per_s"] > 0
    assert all(p.read_bytes() == data for p, data in files.items())

    # another config in the same run dir: nothing of the old run survives
    paths.swa.write_bytes(b"stale average of the old run")
    new = _cfg(ws, iters=6, swa={"iters": 0},
               loss=[{"name": "ce"}, {"name": "dice", "weight": 0.5}])
    _, metrics = _train(ws, new, tmp_path)
    out = capsys.readouterr().out
    assert f"{paths.last}: saved with another config; starting {paths.root.name} over" in out
    assert load_checkpoint(paths.last)["config"]["run"] == new.to_dict()
    assert _iters(paths.log) == list(range(1, 7))
    assert list(_rows(paths.log)[0]) == ["iter", "lr", "loss", "ce", "dice", "images_per_s"]
    assert _iters(paths.val_log) == [4, 6]
    assert not paths.swa.exists() and not paths.snapshots.exists()
    assert metrics["swa_snapshots"] == 0 and metrics["iterations"] == 6


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
    assert _iters(paths.log) == [1, 2, 3, 4, 5]
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


def test_resume_check_tolerates_float_rounding_of_the_stored_prior():
    """A checkpoint re-normalizes the logit-adjustment prior on save; the few-ulp difference
    must not make a finished run look like another config (it used to restart fold 0)."""
    from pipeline.training.loop import _compatible

    prior = [0.1975600210600675, 0.8024399789399325]
    config = {"run": {"lr": 0.001}, "fold": 0, "seed": 0,
              "model": {"arch": "unet", "logit_adjust": {"prior": prior, "tau": 0.03}}}
    saved = {"config": {**config, "model": {"arch": "unet", "logit_adjust": {
        "prior": [p * (1 + 2e-16) for p in prior], "tau": 0.03}}}}
    assert _compatible(saved, config)
    changed = {"config": {**config, "run": {"lr": 0.002}}}
    assert not _compatible(changed, config)
    other_prior = {"config": {**config, "model": {"arch": "unet", "logit_adjust": {
        "prior": [0.2, 0.8], "tau": 0.03}}}}
    assert not _compatible(other_prior, config)


# ----------------------------------------------------------------------------- distillation
GN_LA = {"arch": "Unet", "encoder": "tu-test_efficientnet_gn", "num_classes": 3,
         "decoder_channels": [16, 16, 8, 8, 8], "decoder_use_norm": "identity"}


@pytest.mark.parametrize("head", ["linear", "cosine"])
def test_identical_teacher_and_student_distill_to_exactly_zero_with_logit_adjustment(head):
    """The student trains in train mode (prior bias on), the teacher predicts in eval mode (off):
    distillation compares both without it. GroupNorm only, so that train and eval mode differ
    in nothing else."""
    from pipeline.data.manifest import ClassInfo
    from pipeline.models.build import build_model

    student = build_model(**GN_LA, logit_adjust={"tau": 1.0, "prior": [8.0, 1.0, 1.0],
                                                 "head": head}).train()
    teacher = copy.deepcopy(student).eval()
    cfg = parse_model_params("kd", {"distill": {"teacher": "t", "temperature": 2.0}})
    loss_fn = engine.build_run_loss(cfg, classes=ClassInfo(names=["a", "b", "c"], palette=[]),
                                    distill=True)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    target = torch.randint(0, 3, (2, 32, 32), generator=torch.Generator().manual_seed(1))
    logits, bare, teacher_logits = engine.student_teacher_logits(student, teacher, images)
    _, parts = loss_fn(logits, target, teacher_logits=teacher_logits, student_logits=bare)
    assert parts["distill"].item() == 0.0
    with torch.no_grad():
        assert torch.equal(logits, student(images))  # the other losses still see the prior
    # comparing the student's plain train-mode output (as before) is not zero
    _, naive = loss_fn(logits, target, teacher_logits=teacher_logits)
    assert naive["distill"].item() > 0.01


@pytest.mark.parametrize("labelled_only", [True, False])
def test_distill_labelled_only_leaves_void_pixels_out(labelled_only):
    from pipeline.data.manifest import ClassInfo

    distill = {"teacher": "t"} if labelled_only else {"teacher": "t", "labelled_only": False}
    cfg = parse_model_params("kd", {"distill": distill})
    assert cfg.distill.labelled_only is labelled_only  # true by default
    loss_fn = engine.build_run_loss(cfg, classes=ClassInfo(names=["a", "b", "c"], palette=[]),
                                    distill=True)
    gen = torch.Generator().manual_seed(0)
    target = torch.randint(0, 3, (2, 8, 8), generator=gen)
    target[:, :3] = 255  # void (and padding) pixels
    student, teacher = torch.randn(2, 3, 8, 8, generator=gen), torch.randn(2, 3, 8, 8, generator=gen)
    moved = torch.where((target == 255).unsqueeze(1), teacher + 5 * torch.randn(2, 3, 8, 8), teacher)
    a = loss_fn(student, target, teacher_logits=teacher)[1]["distill"]
    b = loss_fn(student, target, teacher_logits=moved)[1]["distill"]
    assert torch.equal(a, b) is labelled_only


# ----------------------------------------------------------------------------- teacher folds
def test_a_teacher_that_has_seen_the_student_validation_frames_is_refused(demo_workspace):
    from pipeline.core.errors import PipelineError

    ws = demo_workspace
    digests = engine.data_digests(_data(ws, 0))
    ok = {"fold": 0, "config": {"data": digests}}
    engine.check_teacher(ok, "t.pt", student="kd", fold=0, digests=digests)
    engine.check_teacher({"fold": 1}, "t.pt", student="kd", fold="all", digests=digests)
    for ckpt, says in (({"fold": 1}, "fold 1 held out"), ({"fold": "all"}, "fold all held out"),
                       ({"fold": None}, "an unrecorded fold held out")):
        with pytest.raises(PipelineError) as err:
            engine.check_teacher(ckpt, "t.pt", student="kd", fold=0, digests=digests)
        assert str(err.value).startswith("models.kd.distill.teacher: teacher t.pt was trained "
                                         f"with {says}, but the student holds out fold 0")
    other = {"fold": 0, "config": {"data": engine.data_digests(_data(ws, 1))}}
    with pytest.raises(PipelineError, match="fold 0 of another fold assignment"):
        engine.check_teacher(other, "t.pt", student="kd", fold=0, digests=digests)


# ----------------------------------------------------------------------------- what a run learned from
def _swap_a_video(ws, tmp_path):
    """folds.csv with the first video of fold 1 moved to fold 0."""
    lines = ws.folds.read_text().splitlines()
    moved = next(ln.split(",")[1] for ln in lines[1:] if ln.endswith(",1"))
    path = tmp_path / "folds.csv"
    path.write_text("\n".join(lines[:1] + [ln[:-1] + "0" if ln.split(",")[1] == moved else ln
                                           for ln in lines[1:]]) + "\n")
    return path


def test_a_run_starts_over_when_its_folds_or_frames_change(demo_workspace, tmp_path, capsys):
    """Without logit adjustment (whose prior, part of the config, also changes with the data)."""
    import shutil

    from pipeline.data.manifest import read_manifest, write_manifest

    ws = demo_workspace
    cfg = _cfg(ws, iters=4, val_interval=4, ckpt_interval=2, swa={"iters": 0})
    assert not cfg.logit_adjust.enabled
    runs = tmp_path / "runs"
    paths, _ = _train(ws, cfg, runs)
    capsys.readouterr()

    # a copy of the data whose manifest predates the digest column: the files are hashed
    # instead, to the same digests, so the finished run is resumed (a no-op)
    data_dir = Path(shutil.copytree(ws.data, tmp_path / "data"))
    manifest = data_dir / "manifest.csv"
    frames = read_manifest(manifest)
    write_manifest(manifest, [dataclasses.replace(f, digest="") for f in frames])
    text = manifest.read_text().splitlines()
    manifest.write_text("\n".join(ln.rsplit(",", 1)[0] for ln in text) + "\n")
    assert "digest" not in manifest.read_text().splitlines()[0]
    copied = load_run_data(manifest=manifest, classes_path=data_dir / "classes.json",
                           counts_path=data_dir / "class_counts.npz", folds_path=ws.folds, fold=0)
    assert all(f.digest == "" for f in copied.train_frames)
    assert engine.data_digests(copied) == engine.data_digests(_data(ws))
    _train(ws, cfg, runs, data=copied)
    assert "resuming tiny_f0_s0 from iteration 4/4" in capsys.readouterr().out

    # another fold assignment
    other = load_run_data(manifest=ws.manifest, classes_path=ws.classes, counts_path=ws.counts,
                          folds_path=_swap_a_video(ws, tmp_path), fold=0)
    _train(ws, cfg, runs, data=other)
    out = capsys.readouterr().out
    assert f"{paths.last}: training frames changed (fold assignment), validation frames " \
           f"changed (fold assignment); starting tiny_f0_s0 over\n" in out
    assert "resuming" not in out and _iters(paths.log) == [1, 2, 3, 4]
    _train(ws, cfg, runs, data=other)
    assert "resuming tiny_f0_s0 from iteration 4/4" in capsys.readouterr().out

    # one training mask redrawn (same ids, same folds): the old manifest's hashes see it
    _train(ws, cfg, runs, data=copied)
    assert "training frames changed (fold assignment)" in capsys.readouterr().out
    mask = Path(copied.train_frames[0].mask)
    from PIL import Image
    with Image.open(mask) as img:
        raw = np.asarray(img).copy()
    raw[0, 0] = 0 if raw[0, 0] != 0 else 1
    Image.fromarray(raw).save(mask)
    _train(ws, cfg, runs, data=copied)
    assert f"{paths.last}: training frames changed (image or mask contents); starting " \
           f"tiny_f0_s0 over\n" in capsys.readouterr().out
    # with the manifest's digest column (prepare's): a changed digest is a changed frame
    data = _data(ws)
    changed = dataclasses.replace(data, val_frames=[dataclasses.replace(
        data.val_frames[0], digest="0" * 16), *data.val_frames[1:]])
    _train(ws, cfg, runs, data=data)
    capsys.readouterr()
    _train(ws, cfg, runs, data=changed)
    assert "validation frames changed (image or mask contents); starting" in capsys.readouterr().out


def test_a_student_starts_over_when_its_teacher_changes(demo_workspace, tmp_path, capsys):
    from pipeline.models.checkpoint import save_checkpoint

    ws = demo_workspace
    short = {"iters": 4, "val_interval": 4, "ckpt_interval": 2, "swa": {"iters": 0}}
    teacher_paths, _ = _train(ws, _cfg(ws, **short), tmp_path / "runs")
    student = _cfg(ws, "kd", **short, distill={"teacher": "tiny", "weight": 0.5})
    paths = RunPaths(tmp_path / "runs" / "kd_f0_s0")

    def run():
        train_run(cfg=student, paths=paths, fold=0, seed=0, data=_data(ws), device=CPU,
                  teacher=teacher_paths.best, progress=False)
        return capsys.readouterr().out

    run()
    assert "resuming kd_f0_s0 from iteration 4/4" in run()
    model, ckpt = model_from_checkpoint(teacher_paths.best)  # the teacher is trained again
    with torch.no_grad():
        next(model.parameters()).add_(0.01)
    save_checkpoint(teacher_paths.best, model=model, config=ckpt["config"],
                    classes=ckpt["classes"], fold=0, seed=0, iteration=4)
    assert f"{paths.last}: teacher weights changed; starting kd_f0_s0 over\n" in run()
    assert "resuming kd_f0_s0 from iteration 4/4" in run()


def test_swa_snapshots_and_average_go_on_a_fresh_start(demo_workspace, tmp_path, capsys):
    ws = demo_workspace
    cfg = _cfg(ws)
    paths, _ = _train(ws, cfg, tmp_path)
    assert list(paths.snapshots.iterdir())
    paths.swa.write_bytes(b"average of the old snapshots")
    data = _data(ws)
    changed = dataclasses.replace(data, train_frames=[dataclasses.replace(
        data.train_frames[0], digest="0" * 16), *data.train_frames[1:]])
    _train(ws, _cfg(ws, swa={"iters": 0}), tmp_path, data=changed)
    assert "starting tiny_f0_s0 over" in capsys.readouterr().out
    assert not paths.swa.exists() and not paths.snapshots.exists()


# ----------------------------------------------------------------------------- bad runs
def test_training_frames_without_a_labelled_pixel_are_refused(demo_workspace, tmp_path):
    from pipeline.data.manifest import read_class_counts, write_class_counts
    from pipeline.core.errors import PipelineError

    ws = demo_workspace
    ids, counts = read_class_counts(ws.counts)
    train = {f.id for f in _data(ws, 0).train_frames}
    counts[[k for k, i in enumerate(ids) if i in train]] = 0
    void = tmp_path / "class_counts.npz"
    write_class_counts(void, ids, counts)
    with pytest.raises(PipelineError, match=rf"{void}: the {len(train)} training frame\(s\) of "
                                            r"--fold 0 have no labelled pixel \(all void\)"):
        load_run_data(manifest=ws.manifest, classes_path=ws.classes, counts_path=void,
                      folds_path=ws.folds, fold=0)
    assert load_run_data(manifest=ws.manifest, classes_path=ws.classes, counts_path=void,
                         folds_path=ws.folds, fold=1).prior_counts.sum() > 0


def test_batch_size_is_the_global_batch_split_across_ranks(demo_workspace):
    from pipeline.core.errors import PipelineError

    cfg = _cfg(demo_workspace, batch_size=6)
    assert engine.check_batch(cfg, train_frames=6) == 6
    assert engine.check_batch(cfg, train_frames=20, world_size=3) == 2
    with pytest.raises(PipelineError, match=r"models.tiny.batch_size \(6\) is the global batch "
                                            r"of a step and must divide by the 4 DDP processes"):
        engine.check_batch(cfg, train_frames=20, world_size=4)
    with pytest.raises(PipelineError, match=r"models.tiny.batch_size \(6\) is larger than the 5 "
                                            r"training frames"):
        engine.check_batch(cfg, train_frames=5)


def test_a_batch_that_cannot_fit_in_memory_is_refused_before_any_output(demo_workspace, tmp_path,
                                                                        monkeypatch):
    from pipeline.core.errors import PipelineError
    from pipeline.models.build import build_model

    ws = demo_workspace
    model = build_model(arch="Unet", encoder="tu-test_resnet", num_classes=10,
                        decoder_channels=[16, 16, 8, 8, 8])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    small, large = (engine.activation_bytes(model, hw) for hw in ((64, 64), (256, 512)))
    assert 0 < small and large == pytest.approx(32 * small)  # measured at 64x64, scaled
    assert torch.equal(rng, torch.get_rng_state())  # the probe draws nothing, changes nothing
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())

    monkeypatch.setattr(engine, "available_memory", lambda device: 2 ** 20)  # 1 MiB
    with pytest.raises(PipelineError) as err:
        _train(ws, _cfg(ws), tmp_path / "runs")
    assert str(err.value).startswith("models.tiny.batch_size: 4 image(s) of 32x32 per step need "
                                     "about ")
    assert "more than the 1.0 MiB free on cpu; lower models.tiny.batch_size or " \
           "models.tiny.augment.crop" in str(err.value)
    assert not (tmp_path / "runs").exists()
