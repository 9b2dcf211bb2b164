"""The bad-input catalogue: every mistake a user meets, driven through the stage CLIs.

Each case builds a small workspace, breaks one thing, runs one stage and checks what the user
sees: exit code 2, exactly one ``error:`` line naming the file or key at fault, no traceback,
and no partial output (every file of the workspace is byte-for-byte what it was before the
run: the stage's outputs absent, earlier outputs unchanged). Cheap stages and one
case of each torch stage run as real subprocesses (``cwd`` = the workspace); the rest call
``run_cli(main, argv)`` in process to keep the file fast.

The workspace builders are those of the stages' own tests (test_prepare, test_ensemble,
test_submit) and conftest's ``demo_workspace`` (its trained tiny run, copied before use).
Training kill -9 and resume is tested in test_train.py; interrupts of inference and of the
atomic writers in test_interrupts.py.

The last section, ERROR_LINES, is the catalogue as a user reads it: case -> error line
(``<ws>``: the case's workspace, ``<demo>``: the demo workspace, ``...``: elided); each run
must match it, so the table cannot drift from what the stages print.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import yaml

from pipeline.core.errors import run_cli
from pipeline.core.runs import RunPaths
from pipeline.inference.mapfile import write_probs
from pipeline.inference.members import run_map_dir

from conftest import REPO  # the repository root, defined once
from conftest import DemoWorkspace
from test_ensemble import SHAPE, SMALL
from test_ensemble import argv as ensemble_argv
from test_ensemble import build as build_maps
from test_ensemble import explicit
from test_prepare import H, W, make_dataset, resize_frame, save_image, save_jpeg, save_mask
from test_prepare import write_params as folder_params
from test_submit import make_project
from test_swa import GN_SPEC

TIMEOUT = 120  # seconds, for a subprocess that should take a few


@dataclasses.dataclass
class Ctx:
    """Where a case builds its broken inputs: ``root`` (empty, the stage's cwd) and the
    session's demo workspace (read-only)."""

    root: Path
    demo: DemoWorkspace

    def params(self, **sections) -> Path:
        """``root/params.yaml``: the demo params with ``models``/``train`` merged and other
        sections set (see DemoWorkspace.write_params)."""
        return self.demo.write_params(self.root / "params.yaml", **sections)

    def run(self) -> RunPaths:
        """A copy of the demo's trained tiny run (fold 0: last, best, 2 SWA snapshots)."""
        src = self.demo.train()
        return RunPaths(Path(shutil.copytree(src.root, self.root / "runs" / src.root.name)))

    def data_args(self) -> list[str]:
        return ["--data", str(self.demo.data), "--folds", str(self.demo.folds)]


@dataclasses.dataclass(frozen=True)
class Case:
    stage: str                          # pipeline/<stage>.py
    setup: Callable[[Ctx], list]        # break the inputs, return the stage's argv
    names: tuple[str, ...]              # what the error line must name: the file or key
    subprocess: bool = False
    unprivileged: bool = False          # run without root's permission override (read-only cases)


# Root writes into a chmod 555 folder regardless; setpriv drops that capability for the stage.
SETPRIV = shutil.which("setpriv")
AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
DROP_OVERRIDE = [SETPRIV, "--bounding-set=-dac_override,-dac_read_search,-fowner"]


# ----------------------------------------------------------------------------- prepare
def _prepare(breaker: Callable[[Path, Path], object]) -> Callable[[Ctx], list]:
    """A folder dataset (2 videos x 3 frames, 3 classes, 2 test images), an earlier output in
    ``prepared/`` that must survive, then ``breaker(dataset_root, params)``."""
    def setup(ctx: Ctx) -> list:
        root, out = ctx.root / "ds", ctx.root / "prepared"
        make_dataset(root)
        params = folder_params(ctx.root / "params.yaml", root, out)
        out.mkdir()
        (out / "manifest.csv").write_text("earlier output\n")
        breaker(root, params)
        return ["--params", params]
    return setup


def _edit_section(params: Path, section: str, **changes) -> None:
    data = yaml.safe_load(params.read_text())
    data.setdefault(section, {}).update(changes)
    params.write_text(yaml.safe_dump(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _empty_dataset(root: Path, params: Path) -> None:
    for folder in ("images", "test_images"):
        for path in (root / folder).iterdir():
            path.unlink()


def _out_of_user_files(root: Path, params: Path) -> None:
    """prepare.out names a folder of the user's own files (no manifest.csv)."""
    mine = root.parent / "mine"
    (mine / "sub").mkdir(parents=True)
    (mine / "notes.txt").write_text("my notes\n")
    (mine / "sub" / "weights.pt").write_bytes(b"weights")
    _edit_section(params, "prepare", out=str(mine))


def _vspw_without_val_list(ctx: Ctx) -> list:
    """A VSPW tree (2 videos listed in train.txt and val.txt), then val.txt renamed."""
    root, out = ctx.root / "vspw", ctx.root / "prepared"
    for video in ("v1", "v2"):
        save_image(root / "data" / video / "origin" / "00000001.jpg", np.zeros((H, W, 3)))
        save_mask(root / "data" / video / "mask" / "00000001.png", np.ones((H, W)))
    (root / "train.txt").write_text("v1\n")
    (root / "val.txt.bak").write_text("v2\n")
    out.mkdir()
    (out / "manifest.csv").write_text("earlier output\n")
    params = ctx.root / "params.yaml"
    params.write_text(yaml.safe_dump({"prepare": {"dataset": "vspw", "root": str(root),
                                                  "out": str(out), "workers": 1}}))
    return ["--params", params]


def _prepare_rle(csv_text: str) -> Callable[[Ctx], list]:
    """An rle_csv dataset (one HxW image, 3 classes) whose train.csv is ``csv_text``, and an
    earlier output in ``prepared/`` that must survive."""
    def setup(ctx: Ctx) -> list:
        root, out = ctx.root / "ds", ctx.root / "prepared"
        save_image(root / "images" / "vid0_000.png", np.zeros((H, W, 3)))
        (root / "train.csv").write_text(csv_text)
        out.mkdir()
        (out / "manifest.csv").write_text("earlier output\n")
        params = ctx.root / "params.yaml"
        params.write_text(yaml.safe_dump({"prepare": {"dataset": "rle_csv", "root": str(root), "out": str(out),
                                                      "workers": 1, "rle_csv": {"num_classes": 3}}}))
        return ["--params", params]
    return setup


PREPARE = {
    "prepare-missing-mask": Case("prepare", _prepare(
        lambda r, p: (r / "masks" / "vid0_001.png").unlink()),
        ("images/vid0_001.png",), subprocess=True),
    "prepare-size-mismatch": Case("prepare", _prepare(
        lambda r, p: save_mask(r / "masks" / "vid1_002.png", np.zeros((H + 1, W)))),
        ("masks/vid1_002.png", "images/vid1_002.png"), subprocess=True),
    "prepare-label-out-of-range": Case("prepare", _prepare(
        lambda r, p: save_mask(r / "masks" / "vid0_002.png", np.full((H, W), 7))),
        ("masks/vid0_002.png",), subprocess=True),
    "prepare-corrupt-png": Case("prepare", _prepare(
        lambda r, p: _truncate(r / "images" / "vid1_000.png")),
        ("images/vid1_000.png",), subprocess=True),
    "prepare-corrupt-mask-png": Case("prepare", _prepare(
        lambda r, p: (r / "masks" / "vid1_001.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")),
        ("masks/vid1_001.png",), subprocess=True),
    "prepare-grayscale-image": Case("prepare", _prepare(
        lambda r, p: save_image(r / "images" / "vid0_000.png", np.zeros((H, W, 3)), "L")),
        ("images/vid0_000.png",), subprocess=True),
    "prepare-rgba-image": Case("prepare", _prepare(
        lambda r, p: save_image(r / "test_images" / "tv_001.png", np.zeros((H, W, 3)), "RGBA")),
        ("test_images/tv_001.png",), subprocess=True),
    "prepare-empty-dataset": Case("prepare", _prepare(_empty_dataset), ("/ds: ",),
                                  subprocess=True),
    "prepare-params-typo": Case("prepare", _prepare(
        lambda r, p: _edit_section(p, "prepare", workrs=2)),
        ("params.yaml", "'prepare.workrs'"), subprocess=True),
    "prepare-invalid-yaml": Case("prepare", _prepare(
        lambda r, p: p.write_text("prepare:\n  dataset: folder\n  out: data: x\n")),
        ("params.yaml", "line 3, column 12"), subprocess=True),
    "prepare-out-holds-user-files": Case("prepare", _prepare(_out_of_user_files), ("/mine: ",),
                                         subprocess=True),
    "prepare-out-is-cwd": Case("prepare", _prepare(
        lambda r, p: _edit_section(p, "prepare", out=".")), ("current directory",),
        subprocess=True),
    "prepare-jpeg-data-in-png-mask": Case("prepare", _prepare(
        lambda r, p: save_jpeg(r / "masks" / "vid0_001.png")), ("masks/vid0_001.png", "JPEG"),
        subprocess=True),
    "prepare-dangling-image-symlink": Case("prepare", _prepare(
        lambda r, p: (r / "images" / "vid1_003.png").symlink_to(r.parent / "gone.png")),
        ("images/vid1_003.png",), subprocess=True),
    "prepare-two-sizes-in-one-video": Case("prepare", _prepare(
        lambda r, p: resize_frame(r, "vid1_002")), ("images/vid1_002.png", "images/vid1_000.png"),
        subprocess=True),
    "prepare-vspw-list-file-missing": Case("prepare", _vspw_without_val_list, ("vspw/val.txt",),
                                           subprocess=True),
    "prepare-rle-csv-image-missing": Case("prepare", _prepare_rle(
        "id,class,rle\nvid0_000,1,1 4\nvid0_009,2,1 1\n"), ("ds/train.csv line 3", "'vid0_009'"),
        subprocess=True),
    "prepare-rle-csv-two-classes-on-a-pixel": Case("prepare", _prepare_rle(
        "id,class,rle\nvid0_000,1,1 4\nvid0_000,2,4 2\n"), ("ds/train.csv line 3", "pixel 4")),
    "prepare-rle-csv-run-outside-the-image": Case("prepare", _prepare_rle(
        "id,class,rle\nvid0_000,1,40 10\n"), ("ds/train.csv line 2", "'40 10'")),
}

# ----------------------------------------------------------------------------- folds
def _folds(**section) -> Callable[[Ctx], list]:
    """folds.py on the demo's manifest (4 train videos) with ``folds:`` set to ``section``."""
    def setup(ctx: Ctx) -> list:
        params = ctx.params(folds=section)
        return ["--manifest", ctx.demo.manifest, "--counts", ctx.demo.counts,
                "--out", ctx.root / "folds" / "folds.csv", "--params", params]
    return setup


FOLDS = {
    "folds-more-folds-than-videos": Case("folds", _folds(n_folds=5, seed=0), ("folds.n_folds",),
                                         subprocess=True),
    "folds-params-typo": Case("folds", _folds(n_fold=3), ("params.yaml", "'folds.n_fold'"),
                              subprocess=True),
}

# ----------------------------------------------------------------------------- train
def _train(fold=0, model="tiny", *, models=None, train=None) -> Callable[[Ctx], list]:
    def setup(ctx: Ctx) -> list:
        params = ctx.params(models=models or {}, train=train or {})
        return ctx.demo.train_args(model, fold, params=params, runs=ctx.root / "runs")
    return setup


def _stale_folds(ctx: Ctx) -> list:
    """A folds.csv of another manifest: fold 1 names frames this dataset does not have."""
    lines = ctx.demo.folds.read_text().splitlines()
    folds = ctx.root / "folds.csv"
    folds.write_text("\n".join(lines[:1] + [ln.replace(",", "_old,", 1) if ln.endswith(",1")
                                            else ln for ln in lines[1:]]) + "\n")
    argv = _train(fold=1)(ctx)
    argv[argv.index("--folds") + 1] = str(folds)
    return argv


def _teacher_of_another_fold(ctx: Ctx) -> list:
    """A student of fold 1 given the demo's fold-0 run (a run dir) as its teacher."""
    teacher = ctx.run()
    return _train(fold=1, model="student", models={"student": {
        "distill": {"teacher": str(teacher.root)}}})(ctx)


def _void_training_frames(ctx: Ctx) -> list:
    """A copy of the demo data whose training frames of fold 0 are void everywhere (masks and
    class_counts.npz, as prepare would write them)."""
    from pipeline.data.manifest import read_class_counts, read_manifest, write_class_counts
    from pipeline.data.splits import train_val_ids

    data = Path(shutil.copytree(ctx.demo.data, ctx.root / "data"))
    train_ids = set(train_val_ids(ctx.demo.folds, 0)[0])
    for frame in read_manifest(data / "manifest.csv", split="train"):
        if frame.id in train_ids:
            save_mask(Path(frame.mask), np.full((frame.height, frame.width), 255))
    ids, counts = read_class_counts(data / "class_counts.npz")
    counts[[k for k, i in enumerate(ids) if i in train_ids]] = 0
    write_class_counts(data / "class_counts.npz", ids, counts)
    argv = _train(fold=0)(ctx)
    argv[argv.index("--data") + 1] = str(data)
    return argv


TRAIN = {
    "train-fold-without-frames": Case("train", _train(fold=2), ("folds.csv", "fold 2"),
                                      subprocess=True),
    "train-folds-csv-of-another-manifest": Case("train", _stale_folds,
                                                ("folds.csv", "manifest.csv")),
    "train-unknown-arch": Case("train", _train(models={"tiny": {"arch": "Unett"}}),
                               ("models.tiny", "'Unett'")),
    "train-unknown-encoder": Case("train", _train(models={"tiny": {"encoder": "resnet19"}}),
                                  ("models.tiny", "'resnet19'")),
    "train-unknown-timm-encoder": Case("train", _train(models={"tiny": {
        "encoder": "tu-test_resnett"}}), ("models.tiny", "'tu-test_resnett'")),
    "train-unknown-loss": Case("train", _train(models={"tiny": {"loss": [{"name": "focall"}]}}),
                               ("models.tiny.loss[0]", "'focall'")),
    "train-unknown-model-config": Case("train", _train(model="tiny2"), ("params.yaml", "'tiny2'")),
    "train-crop-not-divisible": Case("train", _train(models={"tiny": {
        "arch": "FPN", "arch_kwargs": {}, "augment": {"crop": [24, 32]}}}),
        ("models.tiny.augment.crop", "[24, 32]")),
    "train-params-typo": Case("train", _train(train={"num_worker": 0}),
                              ("params.yaml", "'train.num_worker'")),
    "models-params-typo": Case("train", _train(models={"tiny": {"batch": 4}}),
                               ("params.yaml", "'models.tiny.batch'")),
    "train-teacher-of-another-fold": Case("train", _teacher_of_another_fold, (
        "models.student.distill.teacher", "runs/tiny_f0_s0", "fold 0", "fold 1")),
    "train-training-frames-all-void": Case("train", _void_training_frames,
                                           ("data/class_counts.npz", "--fold 0")),
    "train-batch-larger-than-training-frames": Case("train", _train(models={"tiny": {
        "batch_size": 5000}}), ("models.tiny.batch_size", "5000")),
    "train-batch-exceeds-memory": Case("train", _train(models={"tiny": {"augment": {
        "crop": [32768, 32768], "hflip": 0.5}}}), ("models.tiny.batch_size", "32768x32768")),
    "models-params-nan-lr": Case("train", _train(models={"tiny": {"optimizer": {
        "name": "adamw", "lr": float("nan")}}}), ("params.yaml", "'models.tiny.optimizer.lr'"),
        subprocess=True),
}

# ----------------------------------------------------------------------------- swa
def _swa(breaker: Callable[[RunPaths, Ctx], object]) -> Callable[[Ctx], list]:
    """The demo run with the output of an earlier swa.py (must survive), then broken."""
    def setup(ctx: Ctx) -> list:
        run = ctx.run()
        shutil.copyfile(run.best, run.swa)
        (run.root / "swa_metrics.json").write_text('{"swa_miou": 0.5}\n')
        breaker(run, ctx)
        return [run.root, *ctx.data_args(), "--device", "cpu", "--no-progress"]
    return setup


def _other_arch_snapshot(run: RunPaths, ctx: Ctx) -> None:
    """A snapshot of a GroupNorm EfficientNet among the run's ResNet snapshots."""
    from pipeline.data.manifest import read_classes
    from pipeline.models.build import build_model
    from pipeline.models.checkpoint import save_checkpoint

    classes = read_classes(ctx.demo.classes)
    model = build_model(**{**GN_SPEC, "num_classes": classes.num_classes})
    save_checkpoint(run.snapshot(11), model=model, classes=classes, fold=0, seed=0,
                    config={"model": model.model_config, "run": {}, "fold": 0, "seed": 0},
                    iteration=11, rng_state=False)


SWA = {
    "swa-missing-checkpoint": Case("swa", _swa(lambda run, ctx: run.last.unlink()),
                                   ("train/last.pt",), subprocess=True),
    "swa-corrupt-checkpoint": Case("swa", _swa(
        lambda run, ctx: run.snapshot(12).write_bytes(b"this is not a checkpoint")),
        ("snapshots/swa_0000012.pt",)),
    "swa-snapshots-of-two-architectures": Case("swa", _swa(_other_arch_snapshot),
                                               ("snapshots/swa_0000011.pt",)),
}

# ----------------------------------------------------------------------------- infer
def _infer(breaker: Callable[[RunPaths, Ctx], object] | None = None, **infer
           ) -> Callable[[Ctx], list]:
    """The demo run (no swa.pt: best.pt is used), broken, with ``infer:`` params."""
    def setup(ctx: Ctx) -> list:
        run = ctx.run()
        if breaker:
            breaker(run, ctx)
        params = ctx.params(infer={"device": "cpu", **infer})
        return [run.root, "--params", params, *ctx.data_args(), "--out", ctx.root / "oof_preds",
                "--no-tta", "--no-progress"]
    return setup


def _no_weights(run: RunPaths, ctx: Ctx) -> None:
    shutil.rmtree(run.train_dir)


INFER = {
    "infer-missing-checkpoint": Case("infer", _infer(_no_weights), ("runs/tiny_f0_s0",)),
    "infer-corrupt-checkpoint": Case("infer", _infer(lambda run, ctx: _truncate(run.best)),
                                     ("train/best.pt",), subprocess=True),
    "infer-params-typo": Case("infer", _infer(quantize="uint8"),
                              ("params.yaml", "'infer.quantize'")),
    "infer-tta-params-typo": Case("infer", _infer(tta={"scale": [1.0]}),
                                  ("params.yaml", "'infer.tta.scale'")),
}

# ----------------------------------------------------------------------------- ensemble
def _ensemble(breaker: Callable[[dict], object] | None = None, mode: str = "--search",
              search_first: bool = False, **params) -> Callable[[Ctx], list]:
    """test_ensemble's synthetic members (2 folds, 5 members, 2 train videos of 3 frames + a
    test video) with ``ensemble:`` params; optionally searched once before the break."""
    def setup(ctx: Ctx) -> list:
        ws = build_maps(ctx.root, videos=2, frames=3,
                        ensemble_params=explicit(alpha_grid=SMALL, beta_grid=SMALL, **params))
        if search_first:  # and applied: the earlier test_pred/ must survive
            from pipeline import ensemble
            ensemble.main(ensemble_argv(ws))
            ensemble.main(ensemble_argv(ws, "--apply"))
        if breaker:
            breaker(ws)
        return ensemble_argv(ws, mode)
    return setup


def _wrong_shape(ws: dict) -> None:
    write_probs(run_map_dir(ws["oof"], "weak_s1", 1) / "oof" / "v1_02.npz",
                np.full((3, SHAPE[0], SHAPE[1] + 2), 1 / 3, np.float32), quant="float16")


def _set_meta(ws: dict, member: str, **changes) -> None:
    for fold in (0, 1):
        path = run_map_dir(ws["oof"], member, fold) / "meta.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _empty_oof(ws: dict) -> None:
    shutil.rmtree(ws["oof"])
    ws["oof"].mkdir()


def _no_test_maps(ws: dict) -> None:
    for fold in (0, 1):
        shutil.rmtree(run_map_dir(ws["oof"], "aux_s0", fold) / "test")
    _set_meta(ws, "aux_s0", counts={"oof": 3, "test": 0})


ENSEMBLE = {
    "ensemble-map-shape-mismatch": Case("ensemble", _ensemble(_wrong_shape),
                                        ("oof_preds/weak_s1", "'v1_02'"), subprocess=True),
    "ensemble-class-count-mismatch": Case("ensemble", _ensemble(
        lambda ws: _set_meta(ws, "aux_s0", classes=4)), ("oof_preds/aux_s0", "classes.json"),
        subprocess=True),
    "ensemble-empty-oof-preds": Case("ensemble", _ensemble(_empty_oof), ("oof_preds: ",),
                                     subprocess=True),
    "ensemble-member-missing-in-test": Case("ensemble", _ensemble(
        _no_test_maps, mode="--apply", search_first=True), ("oof_preds/aux_s0", "'v2_00'"),
        subprocess=True),
    "ensemble-params-typo": Case("ensemble", _ensemble(n_strng=2),
                                 ("params.yaml", "'ensemble.n_strng'"), subprocess=True),
}

# issue 12/13 rows of the ensemble: partial OOF coverage, a failed search keeps the study,
# non-finite weights and maps, members from the params, one search at a time, class names
def _fold_not_trained(ws: dict) -> None:
    """Fold 1 never trained: no member has its runs (its OOF maps cover fold 0 only)."""
    for member in ws["oof"].iterdir():
        if member.is_dir():
            shutil.rmtree(member / "f1")


def _truncate_map(ws: dict) -> None:
    _truncate(run_map_dir(ws["oof"], "weak_s0", 0) / "oof" / "v0_01.npz")


def _edit_weights(**changes) -> Callable[[dict], None]:
    def breaker(ws: dict) -> None:
        path = ws["out"] / "weights.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return breaker


def _nan_test_map(ws: dict) -> None:
    """A float16 test map with a NaN (written by hand: write_probs refuses NaN)."""
    path = run_map_dir(ws["oof"], "strong_s1", 0) / "test" / "v2_01.npz"
    with np.load(path) as npz:
        arrays = {name: npz[name] for name in npz.files}
    arrays["probs"] = arrays["probs"].copy()
    arrays["probs"][0, 3, 2] = np.nan
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)


def _uint8_test_map(ws: dict) -> None:
    """A test map stored as uint8 in a member whose meta.json says float16."""
    write_probs(run_map_dir(ws["oof"], "strong_s1", 0) / "test" / "v2_01.npz",
                np.full((3, *SHAPE), 1 / 3, np.float32), quant="uint8")


def _train_section(**train) -> Callable[[dict], None]:
    def breaker(ws: dict) -> None:
        params = yaml.safe_load(ws["params"].read_text())
        params["train"] = train
        ws["params"].write_text(yaml.safe_dump(params))
    return breaker


_HELD_LOCKS: list = []  # search locks this session holds for good (the cases' other search)


def _search_running(ws: dict) -> None:
    """Another search holds the lock of the output folder, as a running one does (its pid:
    this test process)."""
    import contextlib

    from pipeline.ensembling.lock import search_lock

    held = contextlib.ExitStack()
    held.enter_context(search_lock(ws["out"]))
    _HELD_LOCKS.append(held)


def _corrupt_study(ws: dict) -> None:
    """The study's journal file overwritten with what is not an Optuna journal."""
    (ws["out"] / "study.journal").write_bytes(b"not a journal" * 100)


ENSEMBLE.update({
    "ensemble-partial-oof-coverage": Case("ensemble", _ensemble(_fold_not_trained),
                                          ("folds/folds.csv", "fold 1")),
    "ensemble-truncated-map-keeps-the-study": Case("ensemble", _ensemble(
        _truncate_map, search_first=True, workers=2), ("oof_preds/weak_s0/f0/oof/v0_01.npz",),
        subprocess=True),
    "ensemble-apply-non-finite-weight": Case("ensemble", _ensemble(
        _edit_weights(alpha=float("nan")), mode="--apply", search_first=True),
        ("ensemble/weights.json", "alpha=nan")),
    "ensemble-apply-nan-test-map": Case("ensemble", _ensemble(
        _nan_test_map, mode="--apply", search_first=True),
        ("oof_preds/strong_s1/f0/test/v2_01.npz",)),
    "ensemble-apply-test-map-of-another-dtype": Case("ensemble", _ensemble(
        _uint8_test_map, mode="--apply", search_first=True),
        ("oof_preds/strong_s1/f0/test/v2_01.npz", "uint8")),
    "ensemble-member-of-params-without-maps": Case("ensemble", _ensemble(_train_section(
        models=["strong", "weak"], seeds=[0, 1, 2], students=[], student_seeds=[0])),
        ("oof_preds/strong_s2", "'strong_s2'")),
    "ensemble-search-while-another-runs": Case("ensemble", _ensemble(_search_running),
                                               ("ensemble/.search.lock", "pid "),
                                               subprocess=True),
    "ensemble-class-names-reordered": Case("ensemble", _ensemble(
        lambda ws: _set_meta(ws, "aux_s0", class_names=["a", "c", "b"])),
        ("oof_preds/aux_s0/f0/meta.json", "'aux_s0'")),
    "ensemble-unknown-fallback": Case("ensemble", _ensemble(fallback="bset"),
                                      ("params.yaml", "ensemble.fallback", "'bset'")),
    "ensemble-corrupt-study": Case("ensemble", _ensemble(_corrupt_study, search_first=True),
                                   ("ensemble/study.journal", "delete the file")),
})

# ----------------------------------------------------------------------------- submit
def _submit(dataset: str, num_classes: int, *args, section: dict | None = None
            ) -> Callable[[Ctx], list]:
    """test_submit's project (3 test videos of 3 frames with predictions) of ``dataset``."""
    def setup(ctx: Ctx) -> list:
        make_project(ctx.root, dataset=dataset, num_classes=num_classes)
        params = ctx.root / "params.yaml"
        params.write_text(yaml.safe_dump({"submit": section or {}}))
        return ["--pred", ctx.root / "pred", "--data", ctx.root / "data",
                "--out", ctx.root / "submissions", "--weights", ctx.root / "weights.json",
                "--params", params, "--no-progress", *args]
    return setup


def _submitted(ctx: Ctx) -> tuple[Path, list]:
    """test_submit's project with a submission made: ``submissions/submission.zip``, its JSON
    and previews (earlier outputs that must survive). Returns the zip and submit's argv."""
    from pipeline.submit import main as submit_main

    argv = [str(a) for a in _submit("demo", 4)(ctx)]
    submit_main(argv)
    return ctx.root / "submissions" / "submission.zip", argv


def _read_only(folder: Path) -> None:
    """chmod a folder read-only (the case runs without root's override, see DROP_OVERRIDE);
    skip where nothing can stop root's writes (no setpriv)."""
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o555)
    if os.access(folder, os.W_OK) and not (AS_ROOT and SETPRIV):
        pytest.skip("running as root without setpriv: chmod cannot make a folder read-only")


def _submit_read_only(ctx: Ctx) -> list:
    _, argv = _submitted(ctx)
    _read_only(ctx.root / "submissions")
    return argv


def _submit_over_weights(ctx: Ctx) -> list:
    """--out/--name put <name>.json on the --weights file the stage copies from."""
    argv = _submit("demo", 4)(ctx)
    (ctx.root / "weights.json").write_text(json.dumps({"alpha": 1.0, "beta": 0.5}))
    return [*argv, "--out", ctx.root, "--name", "weights"]


SUBMIT = {
    "submit-cityscapes-format-on-demo": Case("submit", _submit(
        "demo", 4, "--format", "cityscapes"), ("'cityscapes'", "classes.json"), subprocess=True),
    "submit-cityscapes-format-on-camvid": Case("submit", _submit(
        "camvid", 11, section={"format": "cityscapes"}), ("'cityscapes'", "classes.json"),
        subprocess=True),
    "submit-params-typo": Case("submit", _submit("demo", 4, section={"fromat": "folder"}),
                               ("params.yaml", "'submit.fromat'"), subprocess=True),
    "submit-out-overwrites-weights": Case("submit", _submit_over_weights,
                                          ("--out/--name", "/weights.json"), subprocess=True),
    "submit-read-only-out": Case("submit", _submit_read_only, ("/submissions: ",),
                                 unprivileged=True),
}

# ----------------------------------------------------------------------------- evaluate
def _eval_args(ctx: Ctx, pred: Path, *args) -> list:
    return [pred, "--manifest", ctx.root / "data" / "manifest.csv",
            "--params", ctx.root / "params.yaml", *args]


def _eval_zip(edit: Callable[[list], list]) -> Callable[[Ctx], list]:
    """test_submit's project and a folder-format zip of its predictions (no JSON beside it:
    --format folder), its (name, bytes) entries passed through ``edit`` and written as given."""
    def setup(ctx: Ctx) -> list:
        import zipfile

        make_project(ctx.root)
        (ctx.root / "params.yaml").write_text("{}\n")
        entries = [(p.name, p.read_bytes()) for p in sorted((ctx.root / "pred").iterdir())]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # zipfile warns of a duplicate name
            with zipfile.ZipFile(ctx.root / "sub.zip", "w", zipfile.ZIP_DEFLATED) as zf:
                for name, data in edit(entries):
                    zf.writestr(name, data)
        return _eval_args(ctx, ctx.root / "sub.zip", "--format", "folder")
    return setup


def _eval_out_is_zip(ctx: Ctx) -> list:
    zip_path, _ = _submitted(ctx)
    return _eval_args(ctx, zip_path, "--out", zip_path)


def _eval_read_only(ctx: Ctx) -> list:
    zip_path, _ = _submitted(ctx)
    _read_only(ctx.root / "ro")
    return _eval_args(ctx, zip_path, "--out", ctx.root / "ro" / "score.json")


def _eval_table(ctx: Ctx) -> list:
    """test_submit's project and an id,class,rle CSV of every test frame whose first run passes
    the end of its frame."""
    preds = make_project(ctx.root)
    (ctx.root / "params.yaml").write_text("{}\n")
    rows = [f"{fid},1,{'90 10' if fid == 'vid000_0000' else '1 1'}" for fid in sorted(preds)]
    (ctx.root / "sub.csv").write_text("\n".join(["id,class,rle", *rows]) + "\n")
    return _eval_args(ctx, ctx.root / "sub.csv", "--rle-order", "row")


EVALUATE = {
    "evaluate-out-overwrites-zip": Case("evaluate", _eval_out_is_zip,
                                        ("--out", "submissions/submission.zip"), subprocess=True),
    "evaluate-zip-duplicate-entry": Case("evaluate", _eval_zip(
        lambda e: e + [("vid001_0001.png", e[0][1])]), ("sub.zip", "'vid001_0001.png'")),
    "evaluate-zip-entry-of-no-frame": Case("evaluate", _eval_zip(
        lambda e: e + [("vid009_0000.png", e[0][1])]), ("sub.zip", "'vid009_0000.png'")),
    "evaluate-zip-bomb": Case("evaluate", _eval_zip(
        lambda e: [(n, b"\0" * (32 << 20) if n == "vid000_0001.png" else d) for n, d in e]),
        ("sub.zip:vid000_0001.png",)),
    "evaluate-read-only-out": Case("evaluate", _eval_read_only, ("ro/score.json",),
                                   unprivileged=True),
    "evaluate-rle-csv-run-outside-the-frame": Case("evaluate", _eval_table, ("sub.csv line 2",)),
}

CASES: dict[str, Case] = {**PREPARE, **FOLDS, **TRAIN, **SWA, **INFER, **ENSEMBLE, **SUBMIT, **EVALUATE}


# ----------------------------------------------------------------------------- the check
def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root``, by relative path (an empty folder is no output)."""
    return {path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(root.rglob("*"))
            if path.is_file() and "__pycache__" not in path.parts}


def run_stage(case: Case, argv: list[str], cwd: Path, capsys, monkeypatch) -> tuple[int, str]:
    """Run the stage as the user does; returns (exit code, stderr)."""
    if case.subprocess or case.unprivileged:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        prefix = DROP_OVERRIDE if case.unprivileged and AS_ROOT and SETPRIV else []
        done = subprocess.run([*prefix, sys.executable, str(REPO / "pipeline" / f"{case.stage}.py"),
                               *map(str, argv)], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=TIMEOUT)
        return done.returncode, done.stderr
    monkeypatch.chdir(cwd)
    capsys.readouterr()
    main = importlib.import_module(f"pipeline.{case.stage}").main
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, argv)
    return exit_info.value.code, capsys.readouterr().err


def matches(pattern: str, line: str) -> bool:
    """``line`` is ``pattern`` where each ``...`` stands for any text."""
    return re.fullmatch(".*".join(map(re.escape, pattern.split("..."))), line) is not None


def test_catalogue_lists_every_case_once():
    assert list(ERROR_LINES) == list(CASES)
    assert not matches("error: a, ..., c", "error: a, b") and matches("x[1] ...", "x[1] y")


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_error_line_and_no_output(name, demo_workspace, tmp_path, capsys,
                                                   monkeypatch):
    case = CASES[name]
    root = tmp_path / "ws"
    root.mkdir()
    argv = [str(a) for a in case.setup(Ctx(root=root, demo=demo_workspace))]
    before = snapshot(root)
    code, err = run_stage(case, argv, root, capsys, monkeypatch)

    assert code == 2, err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    missing = [needle for needle in case.names if needle not in errors[0]]
    assert not missing, f"{errors[0]!r} lacks {missing}"
    shown = errors[0].replace(str(root), "<ws>").replace(str(demo_workspace.root), "<demo>")
    assert matches(ERROR_LINES[name], shown), f"update ERROR_LINES[{name!r}]: {shown!r}"
    after = snapshot(root)
    assert after == before, {k: (before.get(k, "absent"), after.get(k, "absent"))
                             for k in set(before) | set(after) if before.get(k) != after.get(k)}


# ----------------------------------------------------------------------------- the catalogue
ERROR_LINES = {
    "prepare-missing-mask":
        "error: <ws>/ds/images/vid0_001.png: missing mask for train image "
        "(expected <ws>/ds/masks/vid0_001.png)",
    "prepare-size-mismatch":
        "error: <ws>/ds/masks/vid1_002.png: mask is 8x7 but image <ws>/ds/images/vid1_002.png "
        "is 8x6 (width x height)",
    "prepare-label-out-of-range":
        "error: <ws>/ds/masks/vid0_002.png: label value 7 is outside the classes and not void "
        "(1 such value(s): [7])",
    "prepare-corrupt-png":
        "error: <ws>/ds/images/vid1_000.png: unreadable or corrupt image (OSError)",
    "prepare-corrupt-mask-png":
        "error: <ws>/ds/masks/vid1_001.png: unreadable or corrupt mask (OSError)",
    "prepare-grayscale-image":
        "error: <ws>/ds/images/vid0_000.png: image mode is L, expected RGB",
    "prepare-rgba-image":
        "error: <ws>/ds/test_images/tv_001.png: image mode is RGBA, expected RGB",
    "prepare-empty-dataset":
        "error: <ws>/ds: no frames found for dataset 'folder' "
        "(expected images/*.png|jpg + masks/*.png)",
    "prepare-params-typo":
        "error: <ws>/params.yaml: unknown key 'prepare.workrs'; valid keys of 'prepare': "
        "camvid, ..., workers",
    "prepare-invalid-yaml":
        "error: <ws>/params.yaml: not valid YAML (line 3, column 12: mapping values are not "
        "allowed here)",
    "prepare-out-holds-user-files":
        "error: <ws>/mine: output folder holds files but no manifest.csv, so it is not an earlier "
        "prepare output; prepare replaces it whole: empty it or pick another folder "
        "(--out, prepare.out)",
    "prepare-out-is-cwd":
        "error: <ws>: output folder is the current directory or contains it; prepare replaces "
        "its output folder whole: pick a subfolder (--out, prepare.out)",
    "prepare-jpeg-data-in-png-mask":
        "error: <ws>/ds/masks/vid0_001.png: mask holds JPEG data, not a lossless PNG "
        "(lossy formats change label values)",
    "prepare-dangling-image-symlink":
        "error: <ws>/ds/images/vid1_003.png: dangling symlink (its target <ws>/gone.png does not "
        "exist); restore the file or remove the link",
    "prepare-two-sizes-in-one-video":
        "error: <ws>/ds/images/vid1_002.png: frame is 8x8 but <ws>/ds/images/vid1_000.png of the "
        "same video 'vid1' is 8x6 (width x height); a video's frames must share one size",
    "prepare-vspw-list-file-missing":
        "error: <ws>/vspw/val.txt: list file of split 'val' not found "
        "(prepare.vspw.train_splits names it)",
    "prepare-rle-csv-image-missing":
        "error: <ws>/ds/train.csv line 3: image 'vid0_009' not found in <ws>/ds/images",
    "prepare-rle-csv-two-classes-on-a-pixel":
        "error: <ws>/ds/train.csv line 3: class 2 and class 1 (line 2) both cover pixel 4 of "
        "image 'vid0_000'",
    "prepare-rle-csv-run-outside-the-image":
        "error: <ws>/ds/train.csv line 2: rle run '40 10' ends at pixel 49, outside the image's "
        "48 pixels",
    "folds-more-folds-than-videos":
        "error: folds.n_folds=5 needs at least 5 videos but the train split has 4: a fold "
        "would be empty; lower folds.n_folds",
    "folds-params-typo":
        "error: <ws>/params.yaml: unknown key 'folds.n_fold'; valid keys of 'folds': n_folds, seed",
    "train-fold-without-frames":
        "error: <demo>/folds/folds.csv: fold 2 is not one of 0..1 or 'all'",
    "train-folds-csv-of-another-manifest":
        "error: <ws>/folds.csv: 14 id(s) not in <demo>/data/manifest.csv "
        "(first: vid000_0000_old); re-run `python pipeline/folds.py`",
    "train-unknown-arch":
        "error: models.tiny: unknown arch 'Unett'; valid: deeplabv3, ..., unet, unetplusplus, ...",
    "train-unknown-encoder":
        "error: models.tiny: unknown encoder 'resnet19'; valid: densenet121, ..., resnet18, ..., "
        "tu-<timm.list_models() name>, ..., xception",
    "train-unknown-timm-encoder":
        "error: models.tiny: unknown timm encoder 'tu-test_resnett' (see timm.list_models()); "
        "close matches: tu-test_resnet, ...",
    "train-unknown-loss":
        "error: models.tiny.loss[0]: unknown loss 'focall'; valid: ce, dice, ..., focal, ...",
    "train-unknown-model-config":
        "error: <ws>/params.yaml: unknown model config 'tiny2'; valid: tiny "
        "(configs live under 'models:')",
    "train-crop-not-divisible":
        "error: models.tiny.augment.crop: [24, 32] must divide by 32 for this architecture "
        "(its encoder's output stride); e.g. [32, 32]",
    "train-params-typo":
        "error: <ws>/params.yaml: unknown key 'train.num_worker'; valid keys of 'train': "
        "deterministic, ..., num_workers, ...",
    "models-params-typo":
        "error: <ws>/params.yaml: unknown key 'models.tiny.batch'; valid keys of 'models.tiny': "
        "accum_steps, amp, ..., batch_size, ...",
    "train-teacher-of-another-fold":
        "error: models.student.distill.teacher: teacher <ws>/runs/tiny_f0_s0/train/best.pt was "
        "trained with fold 0 held out, but the student holds out fold 1: the teacher has seen "
        "the student's validation frames; use a teacher run of fold 1",
    "train-training-frames-all-void":
        "error: <ws>/data/class_counts.npz: the 14 training frame(s) of --fold 0 have no "
        "labelled pixel (all void): nothing to learn from; check their masks and the lookup "
        "table of <ws>/data/classes.json",
    "train-batch-larger-than-training-frames":
        "error: models.tiny.batch_size (5000) is larger than the 14 training frames; lower it "
        "to at most 14",
    "train-batch-exceeds-memory":
        "error: models.tiny.batch_size: 4 image(s) of 32768x32768 per step need about ... GiB "
        "to train (a rough estimate, ... GiB per image), more than the ... GiB free on cpu; "
        "lower models.tiny.batch_size or models.tiny.augment.crop",
    "models-params-nan-lr":
        "error: <ws>/params.yaml: 'models.tiny.optimizer.lr' must be a finite number, got nan",
    "swa-missing-checkpoint":
        "error: <ws>/runs/tiny_f0_s0/train/last.pt: checkpoint not found "
        "(needed to compare with SWA)",
    "swa-corrupt-checkpoint":
        "error: <ws>/runs/tiny_f0_s0/train/snapshots/swa_0000012.pt: not a readable checkpoint "
        "(not a torch.save archive: truncated or corrupt)",
    "swa-snapshots-of-two-architectures":
        "error: <ws>/runs/tiny_f0_s0/train/snapshots/swa_0000011.pt: another architecture than "
        "<ws>/runs/tiny_f0_s0/train/snapshots/swa_0000010.pt (...; encoder 'tu-test_resnet' vs "
        "'tu-test_efficientnet_gn'); snapshots of different architectures cannot be averaged",
    "infer-missing-checkpoint":
        "error: <ws>/runs/tiny_f0_s0: no finished training run (no swa.pt, train/ema.pt, "
        "train/best.pt or train/last.pt); run `python pipeline/train.py` first",
    "infer-corrupt-checkpoint":
        "error: <ws>/runs/tiny_f0_s0/train/best.pt: not a readable checkpoint "
        "(not a torch.save archive: truncated or corrupt)",
    "infer-params-typo":
        "error: <ws>/params.yaml: unknown key 'infer.quantize'; valid keys of 'infer': "
        "compare_single, ..., quant, ...",
    "infer-tta-params-typo":
        "error: <ws>/params.yaml: unknown key 'infer.tta.scale'; valid keys of 'infer.tta': "
        "amp, ..., scales",
    "ensemble-map-shape-mismatch":
        "error: <ws>/oof_preds/weak_s1: out-of-fold map of frame 'v1_02' is [3, 8, 8] ...[3, 8, 6]",
    "ensemble-class-count-mismatch":
        "error: <ws>/oof_preds/aux_s0: maps of 4 classes, <ws>/data/classes.json has 3",
    "ensemble-empty-oof-preds":
        "error: <ws>/oof_preds: no members (expected <member>/f<K>/meta.json)",
    "ensemble-member-missing-in-test":
        "error: <ws>/oof_preds/aux_s0: no test map of frame 'v2_00' (3 of 3 test frames missing)",
    "ensemble-params-typo":
        "error: <ws>/params.yaml: unknown key 'ensemble.n_strng'; valid keys of 'ensemble': "
        "allow_partial, alpha_grid, ..., n_strong, ...",
    "ensemble-partial-oof-coverage":
        "error: <ws>/folds/folds.csv: the members' out-of-fold maps cover 3 of its 6 train "
        "frames, 3 missing (fold 1: 3 of its 3); run the missing folds' training and inference, "
        "or set ensemble.allow_partial: true to fit on the covered frames only",
    "ensemble-truncated-map-keeps-the-study":
        "error: <ws>/oof_preds/weak_s0/f0/oof/v0_01.npz: corrupt or truncated probability map "
        "(BadZipFile: ...)",
    "ensemble-apply-non-finite-weight":
        "error: <ws>/ensemble/weights.json: alpha and beta must be finite numbers >= 0, got "
        "alpha=nan, beta=0.4",
    "ensemble-apply-nan-test-map":
        "error: <ws>/oof_preds/strong_s1/f0/test/v2_01.npz: probs hold nan, inf or values "
        "outside [0, 1]",
    "ensemble-apply-test-map-of-another-dtype":
        "error: <ws>/oof_preds/strong_s1/f0/test/v2_01.npz: stored with quant uint8 (its "
        "run's meta.json: float16)",
    "ensemble-member-of-params-without-maps":
        "error: <ws>/oof_preds/strong_s2: no maps of member 'strong_s2', which <ws>/params.yaml "
        "defines (train.models x train.seeds, train.students x train.student_seeds) (also "
        "missing: weak_s2); run its inference or drop it there",
    "ensemble-search-while-another-runs":
        "error: <ws>/ensemble/.search.lock: another search is writing <ws>/ensemble (pid ..., "
        "started ...); wait for it to end",
    "ensemble-class-names-reordered":
        "error: <ws>/oof_preds/aux_s0/f0/meta.json: member 'aux_s0' was predicted with class 1 "
        "= 'c' but <ws>/data/classes.json has 'b' (classes reordered or renamed); re-run its "
        "inference",
    "ensemble-unknown-fallback":
        "error: <ws>/params.yaml: ensemble.fallback: unknown fallback 'bset'; valid: "
        "best_single, none",
    "ensemble-corrupt-study":
        "error: <ws>/ensemble/study.journal: cannot open the Optuna study (ValueError: line 1 "
        "is not an Optuna journal record); delete the file to start over",
    "submit-cityscapes-format-on-demo":
        "error: submission format 'cityscapes' does not fit dataset 'demo' (classes.json); "
        "formats for it: folder, vspw, rle_csv",
    "submit-cityscapes-format-on-camvid":
        "error: submission format 'cityscapes' does not fit dataset 'camvid' (classes.json); "
        "formats for it: folder, camvid, rle_csv",
    "submit-params-typo":
        "error: <ws>/params.yaml: unknown key 'submit.fromat'; valid keys of 'submit': "
        "format, ...",
    "submit-out-overwrites-weights":
        "error: --out/--name: <ws>/weights.json would overwrite the ensemble weights "
        "<ws>/weights.json, an input of this stage; choose another output path",
    "submit-read-only-out":
        "error: <ws>/submissions: cannot write the submission (Permission denied)",
    "evaluate-out-overwrites-zip":
        "error: --out: <ws>/submissions/submission.zip would overwrite the predictions "
        "<ws>/submissions/submission.zip, an input of this stage; choose another output path",
    "evaluate-zip-duplicate-entry":
        "error: <ws>/sub.zip: entry 'vid001_0001.png' appears 2 times; which copy is meant is "
        "ambiguous",
    "evaluate-zip-entry-of-no-frame":
        "error: <ws>/sub.zip: 1 entr(ies) match no 'test' frame of <ws>/data/manifest.csv; "
        "first: 'vid009_0000.png' (the folder layout is <id>.png)",
    "evaluate-zip-bomb":
        "error: <ws>/sub.zip:vid000_0001.png: inflates to 33554432 bytes, more than a 8x12 "
        "8-bit PNG can take (1048784); not read",
    "evaluate-read-only-out":
        "error: <ws>/ro/score.json: cannot write (Permission denied)",
    "evaluate-rle-csv-run-outside-the-frame":
        "error: <ws>/sub.csv line 2: rle run '90 10' ends at pixel 99, outside the image's 96 pixels",
}
