"""Inference of one run: TTA softmax maps of its out-of-fold frames and of the test split.

A run (model config x fold x seed) predicts, with its SWA weights when averaged (else its best
checkpoint), the frames of its validation fold (out-of-fold: every train frame is predicted
exactly once, by the fold model that never trained on it; or, with ``infer.oof_sample``,
every frame of :mod:`pipeline.data.oof_sample`'s sample) and every test frame. Maps go to
``oof_preds/<model>_s<seed>/f<fold>/{oof,test}/<id>.npz`` through :mod:`pipeline.inference.mapfile`;
``meta.json`` is written last. An interrupted run resumes: maps already written with the same
weights and settings are kept, not recomputed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from pipeline.core import atomic
from pipeline.core.errors import PipelineError
from pipeline.core.names import ALL_FOLDS, MAP_META_FILE, MAP_SPLITS, member_name
from pipeline.core.runs import RunPaths
from pipeline.data.dataset import SegmentationDataset, build_eval_loader
from pipeline.data.manifest import ClassInfo, Frame, read_classes, read_manifest
from pipeline.data.oof_sample import OOFSample, sampled_ids
from pipeline.data.splits import train_val_ids
from pipeline.data.transforms import transform_from_params, val_scale
from pipeline.evaluation.metrics import ConfusionMatrix, mean_iou
from pipeline.inference.mapfile import EXT, read_labels, read_probs, stored_bytes, write_probs
from pipeline.inference.members import map_path, run_map_dir, write_run_meta
from pipeline.inference.tta import TTAConfig, predict_probs_and_plain
from pipeline.models.checkpoint import model_from_checkpoint
from pipeline.models.predict import predict_logits

FINGERPRINT = ".fingerprint.json"


@dataclass
class InferParams:
    """The ``infer:`` section of params.yaml (read by infer.py and by the launcher's cost plan)."""

    tta: dict = field(default_factory=dict)   # keys of pipeline.inference.tta.TTAConfig; {} = defaults
    quant: str = "uint8"                       # uint8 | float16
    stride: int = 1                            # keep every stride-th row/column of the maps
    weights: str = "auto"   # auto (swa, ema, best, last: the first present) | swa | ema | best | last
    topk: int = 0   # 0 = dense maps; K: the K most probable classes per pixel (pipeline.inference.mapfile)
    splits: list = field(default_factory=lambda: list(MAP_SPLITS))
    compare_single: bool = True                # also score OOF with one plain view
    device: str = "auto"
    num_workers: int = 0
    out: str = "oof_preds"
    oof_sample: dict = field(default_factory=dict)  # keys of data.oof_sample.OOFSample; {} = all


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def estimate_map_bytes(frames: Sequence[Frame], *, num_classes: int, quant: str, stride: int,
                       topk: int = 0) -> int:
    """Upper bound of the bytes the maps of ``frames`` take (uncompressed codes)."""
    return sum(stored_bytes(classes=num_classes, height=f.height, width=f.width, stride=stride,
                            quant=quant, topk=topk) for f in frames)


def check_disk(directory: Path, need: int, *, margin: float = 1.1) -> None:
    """Stop before writing when the disk holding ``directory`` lacks ``need`` bytes."""
    probe = directory
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if need * margin > free:
        raise PipelineError(f"{directory}: the maps need about {need / 2**30:.2f} GiB but the disk "
                            f"has {free / 2**30:.2f} GiB free; free space, raise infer.stride or "
                            f"use infer.quant: uint8")


def _prepare_dir(out_dir: Path, fingerprint: dict) -> bool:
    """Make ``out_dir`` hold only maps made with ``fingerprint``; True when it was resumed."""
    marker = out_dir / FINGERPRINT
    fingerprint = json.loads(json.dumps(fingerprint))  # tuples -> lists, as read back
    if marker.is_file():
        try:
            same = json.loads(marker.read_text()) == fingerprint
        except json.JSONDecodeError:
            same = False
        if same:
            atomic.remove_stale_tmp(out_dir, recursive=True)  # map writes cut short by a kill
            return True
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    atomic.write_json(marker, fingerprint)
    return False


def infer_run(*, run_dir: Path, out_root: Path, data_dir: Path, folds_path: Path, tta: TTAConfig,
              quant: str = "uint8", stride: int = 1, topk: int = 0,
              splits: Sequence[str] = MAP_SPLITS,
              compare_single: bool = True, device: torch.device, num_workers: int = 0,
              progress: bool = True, oof_sample: OOFSample | None = None,
              weights: str = "auto") -> dict:
    """Write the run's OOF and test maps and return its metrics (OOF mIoU with/without TTA).

    ``compare_single`` also scores the OOF frames with one plain forward (no TTA), so the gain
    of TTA is measured on the same weights. ``oof_sample``: only the OOF frames it samples
    (:func:`pipeline.data.oof_sample.sample_clips`; None: all) get maps and are scored, said in
    the metrics and meta.json; maps of frames it no longer samples are removed. ``topk``: 0 =
    dense maps, K = the K most probable classes per pixel (:mod:`pipeline.inference.mapfile`).
    ``weights``: which of the run's weights predict (:meth:`pipeline.core.runs.RunPaths.final_weights`).
    """
    sample = oof_sample or OOFSample()
    paths = RunPaths(Path(run_dir))
    if not paths.root.is_dir():
        raise PipelineError(f"{paths.root}: run directory not found")
    weights = paths.final_weights(weights)
    model, ckpt = model_from_checkpoint(weights)
    model.to(device).eval()
    run_cfg = (ckpt.get("config") or {}).get("run") or {}
    name, fold, seed = run_cfg.get("name"), ckpt.get("fold"), int(ckpt.get("seed") or 0)
    if not name:
        raise PipelineError(f"{weights}: checkpoint config has no run name")
    unknown = sorted(set(splits) - set(MAP_SPLITS))
    if unknown:
        raise PipelineError(f"infer.splits: unknown split '{unknown[0]}'; valid: {', '.join(MAP_SPLITS)}")
    classes = read_classes(Path(data_dir) / "classes.json")
    trained = ClassInfo.from_json(ckpt.get("classes") or {})
    if list(trained.names) != list(classes.names):
        raise PipelineError(f"{Path(data_dir) / 'classes.json'}: classes differ from those "
                            f"{weights} was trained with ({trained.num_classes} classes)")
    if isinstance(topk, bool) or not isinstance(topk, int) or not 0 <= topk < classes.num_classes:
        raise PipelineError(f"infer.topk: must be an integer in [0, {classes.num_classes - 1}] "
                            f"for {classes.num_classes} classes (0 = dense maps), got {topk!r}")

    frames = {"oof": [], "test": []}
    manifest = Path(data_dir) / "manifest.csv"
    if "oof" in splits and fold != ALL_FOLDS:
        by_id = {f.id: f for f in read_manifest(manifest, split="train")}
        _, val_ids = train_val_ids(folds_path, fold)
        frames["oof"] = [by_id[i] for i in val_ids if i in by_id]
        if len(frames["oof"]) != len(val_ids):
            raise PipelineError(f"{folds_path}: fold {fold} lists ids missing from {manifest}")
        if not sample.full:  # drawn from the whole train split, as every checker draws it
            keep = sampled_ids(by_id.values(), sample)
            frames["oof"] = [f for f in frames["oof"] if f.id in keep]
    if "test" in splits:
        frames["test"] = read_manifest(manifest, split="test")

    member = member_name(name, seed)
    out_dir = run_map_dir(out_root, member, fold)
    fingerprint = {"weights": str(weights), "sha256": file_sha256(weights), "tta": asdict(tta),
                   "quant": quant, "stride": stride, "classes": classes.num_classes,
                   **({"topk": topk} if topk else {})}  # dense: resumes maps of before top-k
    check_disk(out_dir, estimate_map_bytes(frames["oof"] + frames["test"],
                                           num_classes=classes.num_classes, quant=quant,
                                           stride=stride, topk=topk))
    resumed = _prepare_dir(out_dir, fingerprint)
    wanted = {map_path(out_dir / "oof", f.id) for f in frames["oof"]}
    sampled_oof = "oof" in splits and fold != ALL_FOLDS and not sample.full
    for stale in sorted((out_dir / "oof").glob(f"*{EXT}")) if sampled_oof else ():
        if stale not in wanted:  # a frame the sample (or the fold) no longer holds
            stale.unlink()
    (out_dir / MAP_META_FILE).unlink(missing_ok=True)  # rewritten last, once every map exists

    augment = run_cfg.get("augment") or {}
    transform = transform_from_params(augment, train=False, source=f"{weights}: run.augment")
    # one precision for every view, the plain one too: infer.tta.amp, else the run's own
    amp = run_cfg.get("amp", True) if tta.amp is None else tta.amp
    tta = dataclasses.replace(tta, amp=amp)
    cm_tta = ConfusionMatrix(num_classes=classes.num_classes, ignore_index=classes.ignore_index)
    cm_single = ConfusionMatrix(num_classes=classes.num_classes, ignore_index=classes.ignore_index)
    # "one view" is the run's own validation scale (what swa.py scores), not always scale 1
    plain_scale = val_scale(augment)
    single_view = tta.scales == (plain_scale,) and not tta.flip
    kept = 0
    for split in MAP_SPLITS:
        if not frames[split]:
            continue
        labelled = split == "oof"
        dataset = SegmentationDataset(frames[split], classes=classes, transform=transform,
                                      with_mask=labelled)
        loader = build_eval_loader(dataset, num_workers=num_workers)
        split_dir = out_dir / split
        split_dir.mkdir(exist_ok=True)
        bar = tqdm(loader, total=len(dataset), desc=f"{paths.root.name} {split}", unit="frame",
                   disable=not progress or None, mininterval=1.0)
        for batch in bar:
            frame_id = batch["id"][0]
            target = map_path(split_dir, frame_id)
            image = batch["image"].to(device)
            labels = plain = None
            if target.is_file():
                kept += 1
                if labelled:
                    labels = (read_labels(target) if stride == 1 else
                              read_probs(target, full_size=True).argmax(0).astype(np.uint8))
            else:
                probs, plain = predict_probs_and_plain(model, image, tta=tta,
                                                       num_classes=classes.num_classes)
                plain = plain if plain_scale == 1.0 else None  # the by-product is at scale 1
                probs_np = probs[0].float().cpu().numpy()
                write_probs(target, probs_np, quant=quant, stride=stride, topk=topk,
                            meta={"member": member, "id": frame_id, "fold": fold,
                                  "split": split, "weights": str(weights)})
                labels = probs_np.argmax(0).astype(np.uint8)
            if labelled:
                gt = batch["mask"][0].numpy().astype(np.uint8)
                cm_tta.update(gt, labels)
                if compare_single and not single_view:
                    if plain is None:  # a kept map, or a TTA without that view
                        plain = predict_logits(model, image, scale=plain_scale, amp=amp)
                    cm_single.update(gt, plain.argmax(1)[0].to(torch.uint8).cpu().numpy())
        bar.close()

    counts = {split: len(list((out_dir / split).glob(f"*{EXT}"))) if (out_dir / split).is_dir() else 0
              for split in MAP_SPLITS}
    oof = bool(frames["oof"])
    scored_single = oof and compare_single and not single_view
    miou_tta = mean_iou(cm_tta.matrix) if oof else None
    # one plain view: scored beside TTA (compare_single), or the TTA itself when it is one view
    single = cm_single if scored_single else cm_tta if single_view else None
    miou_single = mean_iou(single.matrix) if oof and single is not None else None
    # the confusion matrices travel with the maps, so members can be scored over all their folds
    write_run_meta(out_dir, {"member": member, "model": name, "fold": fold, "seed": seed,
                             "family": run_cfg.get("family", "primary"),
                             "classes": classes.num_classes, "class_names": list(classes.names),
                             "quant": quant, "stride": stride, "topk": topk,
                             "checkpoint": str(weights),
                             "tta": asdict(tta), "counts": counts,
                             "oof_cm_tta": cm_tta.matrix.tolist() if oof else None,
                             "oof_cm_single": single.matrix.tolist()
                             if oof and single is not None else None,
                             **({"oof_sample": sample.describe()} if sampled_oof else {})})
    metrics = {"member": member, "fold": fold, "weights": weights.name,
               "oof_frames": len(frames["oof"]), "test_frames": len(frames["test"]),
               "reused_maps": kept if resumed else 0, "views": tta.num_views,
               "oof_miou_single": miou_single, "oof_miou_tta": miou_tta,
               # the OOF mIoU above is over the sampled frames only: not comparable to a full one
               "oof_sampled": sampled_oof, "oof_sample": sample.describe() if sampled_oof else None}
    atomic.write_json(paths.infer_metrics, metrics)
    return metrics


def member_summary(member) -> dict:
    """OOF mIoU of a :class:`pipeline.inference.members.Member`, pooled over its folds and per fold,
    with one plain view and with TTA, from the confusion matrices each fold's meta.json holds."""
    folds, pooled = {}, {}
    for fold in member.folds:
        meta = member.meta[fold]
        for kind in ("single", "tta"):
            cm = meta.get(f"oof_cm_{kind}")
            if cm is None:
                continue
            cm = np.asarray(cm, dtype=np.int64)
            folds.setdefault(str(fold), {})[f"oof_miou_{kind}"] = mean_iou(cm)
            pooled[kind] = pooled.get(kind, 0) + cm
    return {"oof_miou_single": mean_iou(pooled["single"]) if "single" in pooled else None,
            "oof_miou_tta": mean_iou(pooled["tta"]) if "tta" in pooled else None,
            "folds": folds}
