"""Prepare a dataset: list it with its adapter, check every frame, write the manifest.

Run as ``python pipeline/prepare.py``. Writes ``<out>/manifest.csv``, ``<out>/classes.json`` and
``<out>/class_counts.npz`` (plus the demo's images) as one atomic folder: on any error the
previous output, or nothing, remains. The folder is replaced whole, so it must be absent, empty
or an earlier output (it holds ``manifest.csv``); the current directory, its parents and the
dataset root are refused."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from joblib import Parallel, delayed
from tqdm import tqdm

from pipeline.core.atomic import atomic_dir
from pipeline.core.errors import PipelineError
from pipeline.data.adapters import build_dataset, get_adapter
from pipeline.data.manifest import (IGNORE_INDEX, ClassInfo, Frame, frame_digest, map_mask, read_image,
                                    read_raw_mask, write_class_counts, write_classes, write_manifest)


# ----------------------------------------------------------------------------- library
def check_frame(frame: Frame, *, lut: np.ndarray, num_classes: int) -> tuple[Frame, np.ndarray | None]:
    """Decode and check one frame; return it with height/width set and its class pixel counts.

    The image must be RGB; a train frame must have a mask of the same size whose raw values all
    map through ``lut`` (256 entries) to a class or void. Counts: [num_classes] int64 pixels per
    train id (void excluded), or None for a frame without a mask. The returned frame carries
    ``digest`` (:func:`frame_digest` of its image and mask bytes), which training runs record.
    """
    image = read_image(frame.image)
    height, width = image.shape[:2]
    frame = dataclasses.replace(frame, height=int(height), width=int(width))
    if frame.mask is None or not Path(frame.mask).is_file():
        if frame.split == "train":
            expected = f" (expected {frame.mask})" if frame.mask else ""
            raise PipelineError(f"{frame.image}: missing mask for train image{expected}")
        return dataclasses.replace(frame, mask=None, digest=frame_digest(frame.image, None)), None
    mask = map_mask(read_raw_mask(frame.mask), lut, path=frame.mask)
    frame = dataclasses.replace(frame, digest=frame_digest(frame.image, frame.mask))
    if mask.shape != (height, width):
        raise PipelineError(f"{frame.mask}: mask is {mask.shape[1]}x{mask.shape[0]} but image "
                            f"{frame.image} is {width}x{height} (width x height)")
    counts = np.bincount(mask.ravel(), minlength=256)[:num_classes].astype(np.int64)
    return frame, counts


def check_frames(frames: Sequence[Frame], *, classes: ClassInfo, workers: int = 1
                 ) -> tuple[list[Frame], list[np.ndarray | None]]:
    """:func:`check_frame` over ``frames`` in ``workers`` processes, keeping their order."""
    lut, n = classes.lut_array(), classes.num_classes
    bar = dict(total=len(frames), desc="checking frames", unit="frame", disable=None)
    if workers <= 1:
        results = [check_frame(f, lut=lut, num_classes=n) for f in tqdm(frames, **bar)]
    else:
        jobs = Parallel(n_jobs=workers, return_as="generator", batch_size="auto")(
            delayed(check_frame)(f, lut=lut, num_classes=n) for f in frames)
        results = list(tqdm(jobs, **bar))
    return [r[0] for r in results], [r[1] for r in results]


@dataclass
class PrepareResult:
    """What :func:`prepare_dataset` wrote: the checked frames and the class info."""

    out: Path
    frames: list[Frame]
    classes: ClassInfo


def check_output_folder(out: str | Path, *, root: str | Path | None = None) -> Path:
    """Refuse an output folder that prepare must not replace; return it resolved.

    The folder is replaced whole, so it must be absent, empty or an earlier prepare output
    (it holds ``manifest.csv``), and it may not be the current directory, one of its parents,
    nor the dataset ``root`` or a folder containing it.
    """
    o = Path(out).expanduser().resolve()
    cwd = Path.cwd().resolve()
    if o == cwd or o in cwd.parents:
        raise PipelineError(f"{o}: output folder is the current directory or contains it; prepare "
                            f"replaces its output folder whole: pick a subfolder (--out, prepare.out)")
    if root:
        r = Path(root).expanduser().resolve()
        if r == o or o in r.parents:
            raise PipelineError(f"{r}: dataset root lies inside the output folder {o}, which prepare replaces")
    if o.exists() and not o.is_dir():
        raise PipelineError(f"{o}: output path is a file, not a folder (--out, prepare.out)")
    if o.is_dir() and not (o / "manifest.csv").is_file() and any(o.iterdir()):
        raise PipelineError(f"{o}: output folder holds files but no manifest.csv, so it is not an "
                            f"earlier prepare output; prepare replaces it whole: empty it or pick "
                            f"another folder (--out, prepare.out)")
    return o


def check_video_sizes(frames: Sequence[Frame]) -> None:
    """Refuse a video (of one split) whose checked frames differ in size, naming two of them:
    later stages stack a video's frames and compare consecutive ones."""
    first: dict[tuple[str, str], Frame] = {}
    for f in frames:
        ref = first.setdefault((f.split, f.video), f)
        if (f.height, f.width) != (ref.height, ref.width):
            raise PipelineError(
                f"{f.image}: frame is {f.width}x{f.height} but {ref.image} of the same video "
                f"'{f.video}' is {ref.width}x{ref.height} (width x height); a video's frames "
                f"must share one size")


def prepare_dataset(*, dataset: str, root: str | Path | None, out: str | Path, options: Any,
                    workers: int = 1) -> PrepareResult:
    """Build, check and write ``<out>/{manifest.csv,classes.json,class_counts.npz}`` atomically.

    ``options`` is the adapter's options dataclass (:func:`pipeline.data.adapters.parse_options`).
    ``classes.json`` gets ``train_pixel_counts`` (pixels per class over the train split);
    ``class_counts.npz`` holds per-frame counts of every frame with a mask, in manifest order.
    """
    out = Path(out)
    adapter = get_adapter(dataset)
    check_output_folder(out, root=root if adapter.needs_root else None)
    with atomic_dir(out) as tmp:
        work = Path(tmp).absolute()
        frames, classes = build_dataset(dataset, root=root, work_dir=work, options=options, workers=workers)
        frames, counts = check_frames(frames, classes=classes, workers=workers)
        check_video_sizes(frames)
        labelled = [(f.id, c) for f, c in zip(frames, counts) if c is not None]
        matrix = (np.stack([c for _, c in labelled]) if labelled
                  else np.zeros((0, classes.num_classes), dtype=np.int64))
        train = [c for f, c in zip(frames, counts) if f.split == "train"]
        classes = dataclasses.replace(classes, train_pixel_counts=np.sum(train, axis=0).astype(int).tolist(),
                                      ignore_index=IGNORE_INDEX)
        write_manifest(work / "manifest.csv", frames)
        write_classes(work / "classes.json", classes)
        write_class_counts(work / "class_counts.npz", [i for i, _ in labelled], matrix)
    return PrepareResult(out=out, frames=frames, classes=classes)


def summary_text(result: PrepareResult, *, shares: int = 4) -> str:
    """A few lines for a person: frames and videos per split, classes, largest/rarest class shares."""
    lines = [f"prepared '{result.classes.dataset}' -> {result.out / 'manifest.csv'}"]
    for split in ("train", "test"):
        part = [f for f in result.frames if f.split == split]
        labelled = sum(f.mask is not None for f in part)
        lines.append(f"  {split}: {len(part)} frames, {len({f.video for f in part})} videos, {labelled} with masks")
    counts = np.asarray(result.classes.train_pixel_counts, dtype=np.float64)
    total = counts.sum()
    text = f"  {result.classes.num_classes} classes"
    if total > 0:
        order = np.argsort(-counts)
        fmt = lambda i: f"{result.classes.names[i]} {100 * counts[i] / total:.1f}%"  # noqa: E731
        text += "; train pixels: " + ", ".join(fmt(i) for i in order[:shares])
        rare = [i for i in order[::-1] if i not in order[:shares]][:shares]
        if rare:
            text += "; rarest: " + ", ".join(fmt(i) for i in rare)
    lines.append(text)
    return "\n".join(lines)
