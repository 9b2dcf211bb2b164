"""Score predicted label maps against the manifest's masks: mIoU, accuracies, mVC8 and mVC16.

Run as ``python pipeline/evaluate.py``. PRED_DIR holds one single-channel PNG ``<id>.png`` of
train ids per labelled frame of the split. A submission zip written by ``pipeline/submit.py`` is
decoded back to train ids per its format (:mod:`pipeline.submission.formats`: Cityscapes
labelIds -> trainIds, the VSPW offset undone, an ``rle_csv`` table's runs decoded); the format
(and vspw offset or rle order) comes from the ``<name>.json`` beside the zip (checked to be that
zip's), or ``--format`` (which wins when both exist). A bare ``.csv`` is scored as an
``id,class,rle`` table (:func:`evaluate_table`; ``--rle-order``, default column): pixels no row
covers are "no prediction", a frame without rows is missing. The zip must
hold each entry once, and no entry that is not a frame of the split: a stray entry means the zip
was made for other frames (another split or manifest), and scoring the overlap would report a
number about a set nobody chose.

mIoU is the standard one (:data:`pipeline.evaluation.metrics.MIOU_DEFINITION`, stated once in the table
and the JSON): the mean over every class with TP + FP + FN > 0, so a class predicted but absent
from the ground truth scores 0, as in MMSegmentation, the Cityscapes script and VSPW.
The value 255 means "no prediction": it is not an error, and as in the Cityscapes script such
a pixel on a labelled pixel is a miss (FN) of its true class and a false positive of none (the
confusion matrix carries a "no prediction" column). Video consistency compares the raw
predictions, 255 included, as VSPW's script does.

The summary is printed as a table and written atomically as JSON beside the folder
(``<PRED_DIR>.eval.json``, ``<name>.zip.eval.json``); an output path that is one of the
inputs (predictions, manifest, classes, the zip's JSON, params) is refused, and a full disk or
a read-only folder is one ``error:`` line. A source of predictions only needs a
``load_pred(frame) -> HxW uint8`` callable for :func:`evaluate_predictions`.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from tqdm import tqdm

from pipeline.core import atomic
from pipeline.core.errors import PipelineError
from pipeline.data.manifest import ClassInfo, Frame, read_classes, read_manifest, read_mask, read_raw_mask
from pipeline.evaluation import metrics, scorecard
from pipeline.evaluation.consistency import VC_WINDOWS, VideoConsistency
from pipeline.submission.formats import RLE_CSV, get_format
from pipeline.submission.sidecar import sha256_of, sidecar_path, zip_format_name
from pipeline.submission.tables import TablePredictions
from pipeline.submission.zips import frame_size, open_predictions

NO_PREDICTION = 255


@dataclass(frozen=True)
class FolderPredictions:
    """Predictions stored as ``<root>/<frame id>.png``; calling it loads one as HxW uint8."""

    root: Path

    def path(self, frame: Frame) -> Path:
        return self.root / f"{frame.id}.png"

    def describe(self, frame: Frame) -> str:
        return str(self.path(frame))

    def missing(self, frames: Sequence[Frame]) -> list[Frame]:
        present = set(os.listdir(self.root))
        return [f for f in frames if f"{f.id}.png" not in present]

    def __call__(self, frame: Frame) -> np.ndarray:
        return read_raw_mask(self.path(frame))


def _checked_prediction(pred: np.ndarray, gt: np.ndarray, *, num_classes: int, name: str,
                        frame: Frame) -> np.ndarray:
    """Validate one prediction against its mask's size and the class range; returns it as uint8."""
    pred = np.asarray(pred)
    if pred.shape != gt.shape:
        raise PipelineError(f"{name}: prediction size {'x'.join(map(str, pred.shape))} differs "
                            f"from the mask of frame '{frame.id}' ({gt.shape[0]}x{gt.shape[1]}, HxW)")
    if pred.size and (pred.min() < 0 or pred.max() >= num_classes):
        bad = np.unique(pred[(pred < 0) | ((pred >= num_classes) & (pred != NO_PREDICTION))])
        if bad.size:
            raise PipelineError(f"{name}: prediction value {int(bad[0])} is not a class "
                                f"(0..{num_classes - 1}) nor {NO_PREDICTION} = no prediction")
    return pred.astype(np.uint8, copy=False)


def evaluate_predictions(frames: Sequence[Frame], classes: ClassInfo,
                         load_pred: Callable[[Frame], np.ndarray], *,
                         describe: Callable[[Frame], str] | None = None,
                         progress: bool = True) -> dict:
    """Score ``load_pred(frame)`` (HxW train ids, 255 = no prediction) on the labelled ``frames``.

    Frames are visited video by video in frame order (video consistency needs it). Returns
    :func:`pipeline.evaluation.scorecard.summarize`'s dict (mIoU over the classes with TP + FP + FN > 0; a
    255 on a labelled pixel is a miss of its class only) plus ``frames`` and ``videos`` counts.
    ``describe(frame)`` names a prediction in error messages (its file, say).
    """
    labelled = sorted((f for f in frames if f.mask), key=lambda f: (f.video, f.frame, f.id))
    if not labelled:
        raise PipelineError("no labelled frames to evaluate")
    describe = describe or (lambda f: f"prediction of frame '{f.id}'")
    num_classes, lut = classes.num_classes, classes.lut_array()
    # "No prediction" pixels fill a column of their own: misses of their true class only.
    # With more than 255 classes, 255 is a class and there is no such value.
    cm = metrics.ConfusionMatrix(num_classes=num_classes, ignore_index=classes.ignore_index,
                                 no_prediction=NO_PREDICTION if num_classes <= NO_PREDICTION else None)
    vc = VideoConsistency(windows=VC_WINDOWS)
    videos = 0
    with tqdm(total=len(labelled), desc="evaluate", unit="frame", disable=not progress) as bar:
        for _, group in itertools.groupby(labelled, key=lambda f: f.video):
            videos += 1
            for frame in group:
                gt = read_mask(frame.mask, lut)
                pred = _checked_prediction(load_pred(frame), gt, num_classes=num_classes,
                                           name=describe(frame), frame=frame)
                cm.update(gt, pred)
                vc.add_frame(gt, pred)
                bar.update()
            vc.end_video()
    summary = scorecard.summarize(cm.matrix, class_names=classes.names, vc=vc.result())
    summary.update(frames=len(labelled), videos=videos)
    return summary


def default_out(pred: str | os.PathLike) -> Path:
    """``<pred>.eval.json`` beside the predictions (``preds/`` -> ``preds.eval.json``)."""
    pred = Path(pred)
    return pred.parent / f"{pred.name}.eval.json"


def labelled_frames(manifest: str | os.PathLike, split: str) -> list[Frame]:
    """The labelled frames of ``split``, by video and frame; none is an error naming the splits."""
    all_frames = read_manifest(manifest)
    frames = sorted((f for f in all_frames if f.split == split and f.mask),
                    key=lambda f: (f.video, f.frame, f.id))
    if not frames:
        splits = sorted({f.split for f in all_frames if f.mask})
        raise PipelineError(f"{manifest}: split '{split}' has no labelled frames "
                            f"(splits with labels: {', '.join(splits) or 'none'})")
    return frames


def input_paths(pred: Path, manifest: Path, classes_path: Path, *, side: Path | None = None,
            params: str | os.PathLike | None = None) -> dict:
    """What the stage reads, for :func:`pipeline.core.atomic.refuse_overwrite`."""
    return {"the predictions": pred, "the manifest": manifest, "the classes file": classes_path,
            "the submission JSON": side, "the params file": params}


def resolve_classes_path(manifest: Path, classes_path: str | os.PathLike | None) -> Path:
    return Path(classes_path) if classes_path else manifest.parent / "classes.json"


def evaluate_folder(pred_dir: str | os.PathLike, *, manifest: str | os.PathLike,
                    classes_path: str | os.PathLike | None = None, split: str = "test",
                    out: str | os.PathLike | None = None, progress: bool = True) -> dict:
    """Evaluate ``pred_dir`` on ``split`` of ``manifest`` and write the summary JSON to ``out``.

    ``classes_path`` defaults to ``classes.json`` beside the manifest, ``out`` to
    :func:`default_out`; an ``out`` that is one of the inputs is refused. Returns the summary
    that was written.
    """
    pred_dir, manifest = Path(pred_dir), Path(manifest)
    classes_path = resolve_classes_path(manifest, classes_path)
    out = Path(out) if out else default_out(pred_dir)
    atomic.refuse_overwrite(out, input_paths(pred_dir, manifest, classes_path))
    if not pred_dir.exists():
        raise PipelineError(f"{pred_dir}: prediction folder not found")
    if not pred_dir.is_dir():
        raise PipelineError(f"{pred_dir}: not a folder of <id>.png predictions")
    classes = read_classes(classes_path)
    frames = labelled_frames(manifest, split)
    source = FolderPredictions(pred_dir)
    return _score(source, frames, classes, pred=pred_dir, split=split, what="prediction",
                  out=out, progress=progress, manifest=str(manifest))


def _score(source, frames: Sequence[Frame], classes, *, pred: Path, split: str, what: str,
           out: Path, progress: bool, **facts) -> dict:
    """Check that ``source`` covers every frame, evaluate, and write the summary JSON."""
    missing = source.missing(frames)
    if missing:
        raise PipelineError(f"{pred}: {len(missing)} of {len(frames)} labelled '{split}' frames "
                            f"have no {what}; first missing: {source.describe(missing[0])}")
    summary = evaluate_predictions(frames, classes, source, describe=source.describe,
                                   progress=progress)
    summary.update(split=split, predictions=str(pred), **facts)
    with atomic.output_errors(out):
        atomic.write_json(out, summary)
    return summary


def _stray_error(path: Path, stray: list[str], *, split: str, manifest: Path, fmt) -> PipelineError:
    return PipelineError(f"{path}: {len(stray)} entr(ies) match no '{split}' frame of {manifest}; "
                         f"first: '{stray[0]}' (the {fmt.name} layout is {fmt.layout})")


def evaluate_zip(zip_path: str | os.PathLike, *, manifest: str | os.PathLike,
                 classes_path: str | os.PathLike | None = None, split: str = "test",
                 out: str | os.PathLike | None = None, fmt: str | None = None,
                 vspw_offset: int | None = None, rle_order: str | None = None,
                 progress: bool = True) -> dict:
    """Evaluate a submission zip like :func:`evaluate_folder`, decoding its entries to train ids.

    ``fmt`` / ``vspw_offset`` / ``rle_order`` default to the values in the JSON beside the zip
    (submit.py's), which must describe this zip (its sha256). An entry name found twice, an
    entry (or a table's row) of no frame of ``split`` (labelled or not) and an entry larger than
    its frame's PNG (or the split's table) can be are errors.
    The summary also holds the zip's ``sha256``, so a reader can tell which zip was scored.
    """
    zip_path, manifest = Path(zip_path), Path(manifest)
    classes_path = resolve_classes_path(manifest, classes_path)
    out = Path(out) if out else default_out(zip_path)
    atomic.refuse_overwrite(out, input_paths(zip_path, manifest, classes_path,
                                         side=sidecar_path(zip_path)))
    if not zip_path.is_file():
        raise PipelineError(f"{zip_path}: submission zip not found")
    classes = read_classes(classes_path)
    name, offset, order = zip_format_name(zip_path, fmt=fmt, vspw_offset=vspw_offset, rle_order=rle_order)
    submission = get_format(name, dataset=classes.dataset, vspw_offset=offset, rle_order=order)
    frames = labelled_frames(manifest, split)
    split_frames = [f for f in read_manifest(manifest) if f.split == split]
    with open_predictions(zip_path, fmt=submission, num_classes=classes.num_classes,
                          frames=split_frames) as source:
        stray = source.unmatched(split_frames)
        if stray:
            raise _stray_error(zip_path, stray, split=split, manifest=manifest, fmt=submission)
        return _score(source, frames, classes, pred=zip_path, split=split, what="entry", out=out,
                      progress=progress, format=submission.name, sha256=sha256_of(zip_path),
                      manifest=str(manifest))


def evaluate_table(csv_path: str | os.PathLike, *, manifest: str | os.PathLike,
                   classes_path: str | os.PathLike | None = None, split: str = "test",
                   out: str | os.PathLike | None = None, rle_order: str = "column",
                   progress: bool = True) -> dict:
    """Evaluate a bare ``id,class,rle`` CSV (the ``rle_csv`` format's table, unzipped) like
    :func:`evaluate_zip`: rows of an id of no ``split`` frame are an error; ``rle_order`` says
    how its pixels are numbered. The summary holds the file's ``sha256``."""
    csv_path, manifest = Path(csv_path), Path(manifest)
    classes_path = resolve_classes_path(manifest, classes_path)
    out = Path(out) if out else default_out(csv_path)
    atomic.refuse_overwrite(out, input_paths(csv_path, manifest, classes_path))
    if not csv_path.is_file():
        raise PipelineError(f"{csv_path}: RLE CSV not found")
    classes = read_classes(classes_path)
    submission = get_format(RLE_CSV, dataset=classes.dataset, rle_order=rle_order)
    frames = labelled_frames(manifest, split)
    split_frames = [f for f in read_manifest(manifest) if f.split == split]
    try:
        text = csv_path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise PipelineError(f"{csv_path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    source = TablePredictions(text, fmt=submission, num_classes=classes.num_classes, name=str(csv_path),
                              size_of=frame_size)
    stray = source.unmatched(split_frames)
    if stray:
        raise _stray_error(csv_path, stray, split=split, manifest=manifest, fmt=submission)
    return _score(source, frames, classes, pred=csv_path, split=split, what="row", out=out,
                  progress=progress, format=submission.name, rle_order=submission.rle_order,
                  sha256=sha256_of(csv_path), manifest=str(manifest))


def is_table(path: str | os.PathLike) -> bool:
    """A ``.csv`` path (existing or not): scored as a bare ``id,class,rle`` table."""
    return Path(path).suffix.lower() == ".csv"


def is_zip(path: str | os.PathLike) -> bool:
    """A ``.zip`` path (existing or not) or any other existing file but a ``.csv``: scored as a
    submission zip."""
    path = Path(path)
    return path.suffix.lower() == ".zip" or (path.is_file() and not is_table(path))
