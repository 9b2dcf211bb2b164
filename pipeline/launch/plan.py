"""The cost plan of a params file: what ``make run`` will train, predict and store, before it runs.

``python pipeline/parallel.py --plan`` prints it (:mod:`pipeline.launch.table`), and the normal
run refuses to start when its maps exceed the free disk (:func:`check_map_disk`). It is computed
from the params (the training matrix, the model configs, ``infer:``) and the prepared data:
``data/manifest.csv`` (frame sizes per split), ``data/classes.json`` and ``folds/folds.csv``
(without it the train frames are split evenly over ``folds.n_folds``). For a dataset not
prepared yet, :func:`read_data_shape` takes the numbers instead (``--frames N --test-frames M
--height H --width W --classes C``); without either, only the params-only numbers are known.

Per model config, over its runs (folds x seeds; a student's: folds x student_seeds):

* training images: (iters + swa.iters) x batch_size per run;
* TTA passes: every run predicts its fold's OOF frames (those ``infer.oof_sample`` samples:
  exact from the manifest, :func:`pipeline.launch.costs.sampled_frames` from numbers) and every
  test frame, each with
  :func:`pipeline.inference.tta.forward_passes` (scales x (2 with flip) x sliding windows);
* other passes: validations x fold frames, the SWA stage's BatchNorm pass over the training
  frames and its check on the fold, compare_single's plain view when TTA lacks it, and a
  student's teacher forward per training image;
* checkpoints and snapshots: :func:`pipeline.launch.costs.checkpoint_bytes` of the state dict
  of the model built without weights (:func:`pipeline.launch.measure.model_size`);
* maps: :func:`pipeline.inference.mapfile.stored_bytes` per map (classes x ceil(H/stride) x
  ceil(W/stride) x 1 byte for uint8, 2 for float16; with ``infer.topk`` K, K codes and K class
  ids per pixel instead of C codes): an upper bound, before compression;
* device-hours: training images / ``train_images_per_s`` + passes / ``infer_views_per_s``,
  from the optional ``plan:`` section of params.yaml or measured by ``--probe``.
"""

from __future__ import annotations

import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from pipeline.core.errors import PipelineError
from pipeline.core.names import ALL_FOLDS, MANIFEST_SPLITS
from pipeline.core.runs import RunConfig
from pipeline.data.manifest import read_classes, read_manifest
from pipeline.data.oof_sample import OOFSample, sampled_ids
from pipeline.data.splits import read_folds
from pipeline.data.transforms import val_scale
from pipeline.inference.mapfile import stored_bytes
from pipeline.inference.tta import TTAConfig, forward_passes
from pipeline.launch import costs

Size = tuple[int, int]
TRAIN, TEST = MANIFEST_SPLITS
UNKNOWN_SPEED = "unknown (give --probe or plan.train_images_per_s and plan.infer_views_per_s)"


@dataclass
class PlanParams:
    """The optional ``plan:`` section of params.yaml: one device's throughput (0 = unknown)."""

    train_images_per_s: float = 0.0   # training images per second of one lane's device
    infer_views_per_s: float = 0.0    # inference forwards (views or windows) per second


@dataclass(frozen=True)
class DataShape:
    """What the plan needs of a dataset: frames by (height, width) per split and per fold."""

    train: Mapping[Size, int]
    test: Mapping[Size, int]
    folds: Mapping[int, Mapping[Size, int]]   # fold -> its out-of-fold frames by size
    classes: int | None
    videos: int | None
    source: str                               # where the frame counts come from
    fold_source: str
    oof: Mapping[int, Mapping[Size, int]] | None = None  # sampled OOF frames (None: all)
    oof_sample: Mapping | None = None         # infer.oof_sample settings (None: all frames)


def _even_folds(train: Mapping[Size, int], n_folds: int) -> dict[int, dict[Size, int]]:
    folds: dict[int, dict[Size, int]] = {k: {} for k in range(n_folds)}
    for size, n in sorted(train.items()):
        for k, part in enumerate(costs.even_split(n, n_folds)):
            if part:
                folds[k][size] = part
    return folds


def read_data_shape(*, data_dir: Path, folds_path: Path, n_folds: int | None,
                    frames: int | None = None, test_frames: int = 0, height: int | None = None,
                    width: int | None = None, classes: int | None = None,
                    videos: int | None = None,
                    oof_sample: OOFSample | None = None) -> DataShape | None:
    """The dataset from ``frames`` (train frames) and the other overrides when given, else from
    ``data_dir``'s manifest (``classes`` and ``videos`` still override); None when neither.
    ``oof_sample``: the OOF frames inference predicts (None: all). With ``frames``, ``videos``
    is the number of train videos those frames spread over (the sample's estimate draws from
    them); from the manifest it counts every video, test ones too."""
    sample = oof_sample or OOFSample()
    described = {"oof_sample": sample.describe()}
    if frames is not None:
        if height is None or width is None or min(frames, test_frames, height, width) < 0:
            raise PipelineError("--frames needs --height and --width (frame size in pixels), "
                                "all numbers >= 0")
        if not n_folds:
            raise PipelineError("folds.n_folds: needed to split --frames into folds")
        size = (height, width)
        train = {size: frames} if frames else {}
        oof = None
        if not sample.full:
            if not videos:
                raise PipelineError("infer.oof_sample: give --videos to estimate the sampled "
                                    "OOF frames of --frames")
            kept = costs.sampled_frames(frames=frames, videos=videos, windows=sample.windows,
                                        length=sample.length, seed=sample.seed,
                                        every_nth_video=sample.every_nth_video)
            oof = _even_folds({size: kept} if kept else {}, n_folds)
        return DataShape(train=train, test={size: test_frames} if test_frames else {},
                         folds=_even_folds(train, n_folds), classes=classes, videos=videos,
                         source="numbers given (--frames ...)",
                         fold_source=f"folds.n_folds = {n_folds}, frames split evenly",
                         oof=oof, **described)
    manifest = data_dir / "manifest.csv"
    if not manifest.is_file():
        return None
    rows = read_manifest(manifest)
    train = Counter((f.height, f.width) for f in rows if f.split == TRAIN)
    test = Counter((f.height, f.width) for f in rows if f.split == TEST)
    if classes is None and (data_dir / "classes.json").is_file():
        classes = read_classes(data_dir / "classes.json").num_classes
    keep = None if sample.full else sampled_ids((f for f in rows if f.split == TRAIN), sample)
    folds, oof, fold_source = None, None, ""
    if folds_path.is_file():
        assignment = read_folds(folds_path)
        if set(assignment) == {f.id for f in rows if f.split == TRAIN}:
            folds = {k: Counter() for k in range(max(assignment.values()) + 1)}
            oof = None if keep is None else {k: Counter() for k in folds}
            for f in rows:
                if f.split == TRAIN:
                    folds[assignment[f.id]][(f.height, f.width)] += 1
                    if keep is not None and f.id in keep:
                        oof[assignment[f.id]][(f.height, f.width)] += 1
            fold_source = f"{folds_path}, {len(folds)} folds"
        else:
            fold_source = f"{folds_path} lists other ids than the manifest (stale); "
    if folds is None:
        if not n_folds:
            raise PipelineError("folds.n_folds: needed to split the train frames into folds "
                                f"({folds_path} is absent)")
        folds = _even_folds(train, n_folds)
        if keep is not None:
            oof = _even_folds(Counter((f.height, f.width) for f in rows if f.id in keep), n_folds)
        fold_source += f"folds.n_folds = {n_folds}, frames split evenly"
    return DataShape(train=dict(train), test=dict(test), folds=folds, classes=classes,
                     videos=len({f.video for f in rows}) if videos is None else videos,
                     source=str(manifest), fold_source=fold_source, oof=oof, **described)


def _total(values: Sequence[int | float | None]) -> int | float | None:
    return None if any(v is None for v in values) else sum(values)


def _config_row(*, name: str, kind: str, cfg: RunConfig, folds: Sequence, seeds: Sequence[int],
                data: DataShape | None, tta: TTAConfig, quant: str, stride: int,
                splits: Sequence[str], compare_single: bool, size: tuple[int, int] | None,
                speed: tuple[float | None, float | None], topk: int = 0) -> dict:
    """The plan of one model config over its folds x seeds runs (see the module docstring)."""
    m, swa, n_seeds = cfg.model, cfg.swa, len(seeds)
    snaps = costs.snapshot_count(swa_iters=swa.iters, swa_interval=swa.interval)
    per_run = costs.images_seen(iters=m.iters, swa_iters=swa.iters, batch_size=m.batch_size)
    row = {"config": name, "kind": kind, "runs": len(folds) * n_seeds, "seeds": list(seeds),
           "images_seen": per_run * len(folds) * n_seeds, "snapshots_per_run": snaps,
           "weights": None, "weight_bytes": None, "checkpoint_bytes": None,
           "snapshot_bytes": None, "tta_passes_oof": None, "tta_passes_test": None,
           "other_passes": None, "oof_map_bytes": None, "test_map_bytes": None}
    if size is not None:
        states = costs.optimizer_states(cfg.optimizer.name, momentum=cfg.optimizer.momentum)
        files = [costs.checkpoint_bytes(weight_bytes=size[0], trainable=size[1], states=states,
                                        snapshots=snaps, validated=fold != ALL_FOLDS)
                 for fold in folds]
        row.update(weights=size[1], weight_bytes=size[0],
                   checkpoint_bytes=sum(f["checkpoints"] for f in files) * n_seeds,
                   snapshot_bytes=sum(f["snapshots"] for f in files) * n_seeds)
    if data is not None:
        plain = val_scale(m.augment, source=f"models.{name}.augment")
        single_view = tta.scales == (plain,) and not tta.flip
        extra_view = compare_single and not single_view and not (plain == 1.0 and 1.0 in tta.scales)
        n_train = sum(data.train.values())
        tta_oof = tta_test = other = maps_oof = maps_test = 0
        for fold in folds:
            oof = {} if fold == ALL_FOLDS else data.folds[fold]
            # inference predicts (and compare_single re-scores) only the sampled OOF frames
            predicted = oof if data.oof is None or fold == ALL_FOLDS else data.oof[fold]
            n_oof = sum(oof.values())
            if "oof" in splits:
                tta_oof += sum(n * forward_passes(s, tta=tta) for s, n in predicted.items())
                maps_oof += sum(n * _map_bytes(s, data, quant, stride, topk)
                                for s, n in predicted.items())
            if "test" in splits:
                tta_test += sum(n * forward_passes(s, tta=tta) for s, n in data.test.items())
                maps_test += sum(n * _map_bytes(s, data, quant, stride, topk)
                                 for s, n in data.test.items())
            checks = costs.validations(iters=m.iters, swa_iters=swa.iters,
                                       val_interval=m.val_interval)
            rescored = sum(predicted.values()) if extra_view and "oof" in splits else 0
            other += (checks * n_oof + rescored
                      + costs.swa_passes(train_frames=n_train - n_oof, val_frames=n_oof,
                                         batch_size=m.batch_size, snapshots=snaps)
                      + (per_run if kind == "student" else 0))   # the teacher's forwards
        known = data.classes is not None
        row.update(tta_passes_oof=tta_oof * n_seeds, tta_passes_test=tta_test * n_seeds,
                   other_passes=other * n_seeds,
                   oof_map_bytes=maps_oof * n_seeds if known else None,
                   test_map_bytes=maps_test * n_seeds if known else None)
    passes = _total([row["tta_passes_oof"], row["tta_passes_test"], row["other_passes"]])
    row["train_images_per_s"], row["infer_views_per_s"] = speed
    row["train_hours"] = costs.hours(row["images_seen"], speed[0])
    row["infer_hours"] = costs.hours(passes, speed[1])
    row["device_hours"] = _total([row["train_hours"], row["infer_hours"]])
    return row


def _map_bytes(size: Size, data: DataShape, quant: str, stride: int, topk: int = 0) -> int:
    if data.classes is None:
        return 0
    return stored_bytes(classes=data.classes, height=size[0], width=size[1], stride=stride,
                        quant=quant, topk=topk)


TOTALS = ("runs", "images_seen", "tta_passes_oof", "tta_passes_test", "other_passes",
          "checkpoint_bytes", "snapshot_bytes", "oof_map_bytes", "test_map_bytes",
          "train_hours", "infer_hours", "device_hours")


def make_plan(*, models: Sequence[str], students: Sequence[dict], folds: Sequence,
              seeds: Sequence[int], student_seeds: Sequence[int],
              configs: Mapping[str, RunConfig], tta: TTAConfig, quant: str, stride: int,
              splits: Sequence[str], compare_single: bool, data: DataShape | None,
              sizes: Mapping[str, tuple[int, int]] | None = None,
              speeds: Mapping[str, tuple[float | None, float | None]] | None = None,
              topk: int = 0) -> dict:
    """The plan as a JSON-able dict: ``rows`` (one per model config, its runs together),
    ``total``, ``runs`` (:func:`pipeline.launch.costs.count_runs`) and what it assumed.

    ``sizes``: {config: (state-dict bytes, trainable weights)} (None: checkpoints unknown);
    ``speeds``: {config: (train images/s, inference forwards/s)} (None entries: unknown);
    ``topk``: infer.topk (0 = dense maps)."""
    if data is not None:
        missing = [f for f in folds if f != ALL_FOLDS and f not in data.folds]
        if missing:
            raise PipelineError(f"train.folds lists fold {missing[0]} but the data has folds "
                                f"0..{len(data.folds) - 1} ({data.fold_source})")
    entries = ([(name, "model", seeds) for name in models]
               + [(s["name"], "student", student_seeds) for s in students])
    rows = [_config_row(name=name, kind=kind, cfg=configs[name], folds=folds, seeds=run_seeds,
                        data=data, tta=tta, quant=quant, stride=stride, splits=splits,
                        compare_single=compare_single, topk=topk,
                        size=(sizes or {}).get(name), speed=(speeds or {}).get(name, (None, None)))
            for name, kind, run_seeds in entries]
    total = {key: _total([r[key] for r in rows]) for key in TOTALS}
    total["map_bytes"] = _total([total["oof_map_bytes"], total["test_map_bytes"]])
    common = max(data.train or data.test, key=(data.train or data.test).get) if data and (
        data.train or data.test) else None
    return {
        "runs": {**costs.count_runs(models=models, students=students, folds=folds, seeds=seeds,
                                    student_seeds=student_seeds),
                 "factors": {"models": len(models), "folds": len(folds), "seeds": len(seeds),
                             "students": len(students), "student_seeds": len(student_seeds)}},
        "rows": rows, "total": total,
        "data": None if data is None else {
            "source": data.source, "folds": data.fold_source, "classes": data.classes,
            "videos": data.videos, "train_frames": sum(data.train.values()),
            "test_frames": sum(data.test.values()), "oof_sample": data.oof_sample,
            "oof_frames": sum(sum((data.folds if data.oof is None else data.oof)[k].values())
                              for k in data.folds),
            "sizes": sorted({f"{h}x{w}" for h, w in [*data.train, *data.test]})},
        "per_frame": None if common is None else {
            "size": list(common), "tta_passes": forward_passes(common, tta=tta),
            "map_bytes": _map_bytes(common, data, quant, stride, topk) if data.classes else None},
        "infer": {"scales": list(tta.scales), "flip": tta.flip,
                  "crop_hw": list(tta.crop_hw) if tta.crop_hw else None, "overlap": tta.overlap,
                  "quant": quant, "stride": stride, "topk": topk, "splits": list(splits)},
    }


def free_disk(folder: str | Path) -> tuple[Path, int]:
    """(the nearest existing folder at or above ``folder``, its disk's free bytes)."""
    probe = Path(folder).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return probe, int(shutil.disk_usage(probe).free)


def check_map_disk(*, map_bytes: int, folder: str | Path, key: str = "infer.out") -> int:
    """Refuse (PipelineError) when ``map_bytes`` exceed the free disk of ``folder``; return the
    free bytes otherwise."""
    where, free = free_disk(folder)
    if map_bytes > free:
        raise PipelineError(
            f"{key} {folder}: the planned maps need up to {costs.human_bytes(map_bytes)} "
            f"({map_bytes:,} bytes, upper bound before compression) but {where} has "
            f"{costs.human_bytes(free)} ({free:,} bytes) free; raise infer.stride, use fewer "
            f"members, scales or splits, free space, or pass --no-disk-check")
    return free
