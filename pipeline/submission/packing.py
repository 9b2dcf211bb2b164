"""Pack test predictions into a checked, deterministic submission zip, its previews and JSON.

Run as ``python pipeline/submit.py``. ``--pred`` holds one single-channel PNG ``<id>.png`` of
train ids per test frame of the manifest (void 255 is refused: a submission needs a class for
every pixel). Writes, from the ``submit:`` section of params.yaml:

* ``<out>/<name>.zip``   entries in the format's layout (:mod:`pipeline.submission.formats`), reopened and
  checked (one entry per test frame, nothing else, sizes, modes and values) before it replaces
  any earlier zip; the same predictions give the same bytes, whatever the files' dates. The
  ``rle_csv`` format's zip holds the one table ``submission.csv`` instead, checked the same way
  (rows of every test frame and no other, every pixel in one row of a class);
* ``<out>/previews/<name>/<id>.png``  image | prediction overlay for a few frames spread over the
  test videos;
* ``<out>/<name>.json``  format (with its ``vspw_offset`` or ``rle_order``), frame count, the zip's
  sha256, and the ensemble members, weights and OOF score copied from ``--weights`` when that
  file exists.

All three are written to hidden temporaries first (the zip checked, its sha256 taken from the
temporary); only then is the old JSON deleted and the zip, the previews and the JSON moved into
place, in that order. So a failure (a bad prediction, a full disk, a read-only folder: one
``error:`` line) changes nothing, and a kill at any moment leaves either the old pair, or a zip
without a JSON (read as "unknown", rebuilt by the next run), never a zip beside another zip's
JSON; :func:`pipeline.submission.sidecar.read_sidecar` refuses such a pair made by hand. Temporaries of a
killed run are removed by the next one (:func:`pipeline.core.atomic.remove_stale_tmp`). Outputs that
would overwrite an input (the predictions, manifest, classes, weights or params) are refused.

Score a zip against labelled test frames with ``python pipeline/evaluate.py <out>/<name>.zip``.
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from pipeline.core.atomic import (atomic_dir, atomic_path, json_text, output_errors, refuse_overwrite,
                                  remove_stale_tmp)
from pipeline.core.errors import PipelineError
from pipeline.data.manifest import (Frame, palette_table, read_classes, read_image, read_manifest,
                                    read_raw_mask)
from pipeline.submission.formats import TABLE_ENTRY, SubmissionFormat, expected_entries, get_format
from pipeline.submission.sidecar import sha256_of, sidecar_path
from pipeline.submission.tables import table_text
from pipeline.submission.zips import check_zip, frame_size, png_bytes, write_zip_entries

PREVIEW_ALPHA = 0.5   # weight of the class colour over the image
PREVIEW_GAP = 4       # px of white between image and overlay
PREVIEW_MIN_HEIGHT = 256  # smaller frames are enlarged (nearest, integer factor) to be seen
OOF_KEYS = ("oof_score", "oof_miou", "oof_mIoU", "score", "mIoU", "oof")
WEIGHT_KEYS = ("alpha", "beta", "groups", "weights")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


# ----------------------------------------------------------------------------- library
def ensemble_info(weights: str | Path | None) -> dict:
    """Members, weights and OOF score from the ensemble's weights.json (empty values without one)."""
    info = {"members": None, "weights": None, "oof_score": None, "ensemble": None}
    if not weights or not Path(weights).is_file():
        return info
    path = Path(weights)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise PipelineError(f"{path}: corrupt ensemble weights file ({err})") from None
    if not isinstance(data, dict):
        raise PipelineError(f"{path}: expected a JSON object")
    info["members"] = data.get("members")
    info["weights"] = {k: data[k] for k in WEIGHT_KEYS if k in data} or None
    info["oof_score"] = next((data[k] for k in OOF_KEYS if k in data), None)
    info["ensemble"] = {"file": str(path), "sha256": sha256_of(path), "content": data}
    return info


def preview_frames(frames: Sequence[Frame], count: int) -> list[Frame]:
    """``count`` frames spread over the videos: the middle frame of evenly spaced videos, or evenly
    spaced frames when there are fewer videos than ``count``."""
    if count <= 0 or not frames:
        return []
    ordered = sorted(frames, key=lambda f: (f.video, f.frame, f.id))
    videos = sorted({f.video for f in ordered})
    if len(videos) >= count:
        picked = []
        for index in np.linspace(0, len(videos) - 1, count).round().astype(int):
            group = [f for f in ordered if f.video == videos[index]]
            picked.append(group[len(group) // 2])
        return picked
    indices = np.unique(np.linspace(0, len(ordered) - 1, min(count, len(ordered))).round().astype(int))
    return [ordered[i] for i in indices]


def render_preview(image: np.ndarray, labels: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """image (HxWx3 uint8) | colour overlay of ``labels`` (HxW train ids), side by side.

    ``palette`` is [256, 3] uint8 (values without a class are black). Frames lower than
    :data:`PREVIEW_MIN_HEIGHT` are enlarged k times: the result is kH x (2kW + gap) x 3 uint8.
    """
    overlay = ((1 - PREVIEW_ALPHA) * image + PREVIEW_ALPHA * palette[labels]).round().astype(np.uint8)
    scale = max(1, PREVIEW_MIN_HEIGHT // image.shape[0])
    image, overlay = (np.repeat(np.repeat(a, scale, axis=0), scale, axis=1) for a in (image, overlay))
    gap = np.full((image.shape[0], PREVIEW_GAP, 3), 255, dtype=np.uint8)
    return np.concatenate([image, gap, overlay], axis=1)


def _read_prediction(path: Path, frame: Frame) -> np.ndarray:
    labels = read_raw_mask(path)
    height, width = frame_size(frame)
    if labels.shape != (height, width):
        raise PipelineError(f"{path}: prediction size {labels.shape[0]}x{labels.shape[1]} differs from "
                            f"the image of test frame '{frame.id}' ({height}x{width}, HxW)")
    return labels


def _entries(fmt: SubmissionFormat, entries: dict[str, Frame], pred_dir: Path, num_classes: int,
             progress: bool) -> Iterator[tuple[str, bytes]]:
    if fmt.table:
        text = table_text(fmt, list(entries.values()),
                          lambda f: _read_prediction(pred_dir / f"{f.id}.png", f), num_classes=num_classes,
                          describe=lambda f: str(pred_dir / f"{f.id}.png"), progress=progress)
        yield TABLE_ENTRY, text.encode()
        return
    for name, frame in tqdm(entries.items(), desc="submit", unit="frame", disable=not progress):
        path = pred_dir / f"{frame.id}.png"
        stored = fmt.encode(_read_prediction(path, frame), num_classes=num_classes, name=str(path))
        yield name, png_bytes(stored)


def make_submission(*, pred_dir: str | Path, data: str | Path, out_dir: str | Path, name: str,
                    fmt: str, vspw_offset: int = 0, rle_order: str = "column",
                    weights: str | Path | None = None,
                    previews: int = 4, progress: bool = True,
                    params: str | Path | None = None) -> dict:
    """Write and check ``<out_dir>/<name>.zip``, its previews and ``<name>.json``; return the JSON.

    ``data`` holds manifest.csv and classes.json; every test frame needs ``<pred_dir>/<id>.png``
    (HxW uint8 train ids, the size of its image). ``fmt`` is a format name or ``auto``;
    ``vspw_offset`` applies to ``vspw``, ``rle_order`` (column | row) to ``rle_csv``.
    ``params`` (the params file, if any) is only checked not to be overwritten. See the module
    docstring for the write order that keeps the zip and its JSON consistent after any kill.
    """
    pred_dir, data, out_dir = Path(pred_dir), Path(data), Path(out_dir)
    if not _NAME.fullmatch(name):
        raise PipelineError(f"submit.name '{name}' must be a plain file name (letters, digits, . _ -)")
    zip_path = out_dir / f"{name}.zip"
    json_path, preview_dir = sidecar_path(zip_path), out_dir / "previews" / name
    inputs = {"the predictions": pred_dir, "the manifest": data / "manifest.csv",
              "the classes file": data / "classes.json", "the ensemble weights": weights,
              "the params file": params}
    for out, folder in ((zip_path, False), (json_path, False), (preview_dir, True)):
        refuse_overwrite(out, inputs, key="--out/--name", folder=folder)
    classes = read_classes(data / "classes.json")
    frames = read_manifest(data / "manifest.csv", split="test")
    if not frames:
        raise PipelineError(f"{data / 'manifest.csv'}: no test frames to submit")
    submission = get_format(fmt, dataset=classes.dataset, vspw_offset=vspw_offset, rle_order=rle_order)
    # a table has rows, not entries, of frames: keyed by id for the same one-pass writer
    entries = {f.id: f for f in frames} if submission.table else expected_entries(submission, frames)
    if not pred_dir.is_dir():
        raise PipelineError(f"{pred_dir}: prediction folder not found "
                            "(run `python pipeline/ensemble.py --apply`)")
    present = {p.name for p in pred_dir.iterdir()}
    missing = [f for f in frames if f"{f.id}.png" not in present]
    if missing:
        raise PipelineError(f"{pred_dir}: {len(missing)} of {len(frames)} test frames have no prediction; "
                            f"first missing: {pred_dir / (missing[0].id + '.png')}")
    palette = palette_table(classes)
    shown = [(f, render_preview(read_image(f.image), _read_prediction(pred_dir / f"{f.id}.png", f), palette))
             for f in preview_frames(frames, previews)]
    ensemble = ensemble_info(weights)

    with output_errors(out_dir, "the submission"), contextlib.ExitStack() as stack:
        for folder in (out_dir, out_dir / "previews"):
            remove_stale_tmp(folder)  # what a killed run left
        # Entered json, previews, zip: left (moved into place) zip, previews, json.
        tmp_json = stack.enter_context(atomic_path(json_path))
        tmp_previews = stack.enter_context(atomic_dir(preview_dir))
        tmp_zip = stack.enter_context(atomic_path(zip_path))
        write_zip_entries(tmp_zip, _entries(submission, entries, pred_dir, classes.num_classes, progress))
        check_zip(tmp_zip, fmt=submission, frames=frames, classes=classes, progress=progress,
                  label=str(zip_path))
        for frame, canvas in shown:
            Image.fromarray(canvas).save(tmp_previews / f"{frame.id}.png", compress_level=6)
        summary = {"name": name, "zip": zip_path.name, "sha256": sha256_of(tmp_zip),
                   "bytes": tmp_zip.stat().st_size, "format": submission.name}
        if submission.name == "vspw":
            summary["vspw_offset"] = submission.offset
        if submission.table:
            summary.update(rle_order=submission.rle_order, table=TABLE_ENTRY)
        summary.update(dataset=classes.dataset, num_classes=classes.num_classes, frames=len(entries),
                       predictions=str(pred_dir), previews=[f"previews/{name}/{f.id}.png" for f, _ in shown])
        summary.update(ensemble)
        tmp_json.write_text(json_text(summary))
        # From here on no JSON may describe the old zip: a kill now leaves a zip without one.
        json_path.unlink(missing_ok=True)
    return summary
