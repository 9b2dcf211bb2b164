"""Segmentation metrics: a streaming confusion matrix, IoU / accuracy, and VSPW video consistency.

Pure numpy; knows nothing of models or files. Conventions:

* Confusion matrix ``cm[g, p]``: int64 [C, C], rows = ground truth, columns = prediction.
  Ground-truth pixels equal to ``ignore_index`` are skipped; a prediction outside 0..C-1 on a
  labelled pixel is a ``ValueError``, unless it is the ``no_prediction`` value: then the matrix
  is [C, C + 1] and its last column counts, per true class, the labelled pixels left without a
  prediction. Such a pixel is a miss (FN) of its true class and a false positive of no class,
  as in the Cityscapes script. Every score below takes either shape.
* IoU of class c = TP / (TP + FP + FN), nan when that denominator is 0. mIoU
  (:data:`MIOU_DEFINITION`) averages over every class whose union TP + FP + FN is non-zero, as
  MMSegmentation's IoU metric, the Cityscapes script and the VSPW Evaluator do: a class that
  is predicted but absent from the ground truth scores 0 and counts; only a class neither in
  the ground truth nor predicted is left out. Mean class accuracy (recall) averages over the
  classes with ground-truth pixels, where it is defined.
* Video consistency mVC_n follows the VSPW script: for a video of C > n frames and each window
  start i in range(C - n) (the last possible window is skipped, as there), G = pixels whose
  ground truth is constant over frames i..i+n-1, P = pixels whose prediction is, and the window
  scores |G & P| / |G| (nan when |G| = 0). Ground truth is compared as given (void is a value
  like any other). mVC_n is the nan-mean over the windows of all videos pooled.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np

IGNORE_INDEX = 255
VC_WINDOWS = (8, 16)
MIOU_DEFINITION = "mean over classes with TP+FP+FN > 0"
_CHUNK = 1 << 20  # pixels per bincount call: keeps the uint16 index buffer in cache


# ----------------------------------------------------------------------------- confusion matrix
def _cm_uint8(gt: np.ndarray, pred: np.ndarray, num_classes: int, ignore_index: int,
              no_prediction: int | None) -> np.ndarray:
    # One bincount of (gt << 8 | pred) over a 256x256 table; no boolean-mask gathers. Void and
    # out-of-range values land in rows/columns of their own and are checked or dropped after;
    # the no-prediction column is one of them, so misses cost nothing extra.
    gt, pred = gt.ravel(), pred.ravel()
    hist = np.zeros(65536, dtype=np.int64)
    buf = np.empty(min(_CHUNK, gt.size), dtype=np.uint16)
    for start in range(0, gt.size, _CHUNK):
        g, p = gt[start:start + _CHUNK], pred[start:start + _CHUNK]
        idx = buf[:g.size]
        np.left_shift(g, 8, out=idx, dtype=np.uint16)
        np.bitwise_or(idx, p, out=idx)
        hist += np.bincount(idx, minlength=65536)
    hist = hist.reshape(256, 256)
    hist[ignore_index] = 0
    c = num_classes  # <= 256 on this path
    bad_gt = np.nonzero(hist[c:].sum(axis=1))[0]
    if bad_gt.size:
        raise ValueError(f"ground-truth value {int(bad_gt[0]) + c} is neither a class "
                         f"(0..{c - 1}) nor ignore ({ignore_index})")
    outside = hist[:c, c:].sum(axis=0)
    if no_prediction is not None:
        outside[no_prediction - c] = 0
    bad_pred = np.nonzero(outside)[0]
    if bad_pred.size:
        raise ValueError(f"prediction value {int(bad_pred[0]) + c} on a labelled pixel is "
                         f"outside 0..{c - 1}")
    if no_prediction is None:
        return hist[:c, :c].copy()
    return np.concatenate([hist[:c, :c], hist[:c, no_prediction:no_prediction + 1]], axis=1)


def _cm_generic(gt: np.ndarray, pred: np.ndarray, num_classes: int, ignore_index: int,
                no_prediction: int | None) -> np.ndarray:
    g, p = gt.ravel().astype(np.intp), pred.ravel().astype(np.intp)
    labelled = g != ignore_index
    if ((g < 0) | (g >= num_classes))[labelled].any():
        bad = g[labelled & ((g < 0) | (g >= num_classes))][0]
        raise ValueError(f"ground-truth value {int(bad)} is neither a class "
                         f"(0..{num_classes - 1}) nor ignore ({ignore_index})")
    cols = num_classes
    if no_prediction is not None:
        p = np.where(p == no_prediction, num_classes, p)  # the extra "no prediction" column
        cols += 1
    out = labelled & ((p < 0) | (p >= cols))
    if out.any():
        raise ValueError(f"prediction value {int(pred.ravel()[out][0])} on a labelled pixel is "
                         f"outside 0..{num_classes - 1}")
    idx = np.where(labelled, g * cols + p, num_classes * cols)
    counts = np.bincount(idx, minlength=num_classes * cols + 1)
    return counts[:-1].reshape(num_classes, cols).astype(np.int64)


def confusion_matrix(gt: np.ndarray, pred: np.ndarray, *, num_classes: int,
                     ignore_index: int = IGNORE_INDEX, no_prediction: int | None = None) -> np.ndarray:
    """Confusion matrix of one or many label maps.

    ``gt`` and ``pred``: integer arrays of the same shape (any, e.g. HxW or NxHxW) holding train
    ids. Returns int64 [num_classes, num_classes], rows = ground truth, columns = prediction;
    with ``no_prediction`` (a value >= num_classes, e.g. 255) int64 [C, C + 1], whose last
    column counts the labelled pixels predicted as that value (misses of their true class).
    uint8 inputs take a fast path (300-500 Mpix/s on one core); other integer dtypes work too.
    """
    gt, pred = np.asarray(gt), np.asarray(pred)
    if gt.shape != pred.shape:
        raise ValueError(f"ground truth shape {gt.shape} differs from prediction shape {pred.shape}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if no_prediction is not None and 0 <= no_prediction < num_classes:
        raise ValueError(f"no_prediction value {no_prediction} is a class (0..{num_classes - 1})")
    if (gt.dtype == np.uint8 and pred.dtype == np.uint8 and num_classes <= 256
            and 0 <= ignore_index <= 255 and (no_prediction is None or no_prediction <= 255)):
        return _cm_uint8(gt, pred, num_classes, ignore_index, no_prediction)
    return _cm_generic(gt, pred, num_classes, ignore_index, no_prediction)


class ConfusionMatrix:
    """Accumulates :func:`confusion_matrix` over frames; ``merge`` adds another accumulator.

    ``matrix`` is int64 [C, C], or [C, C + 1] with a ``no_prediction`` value (its last column:
    labelled pixels left without a prediction)."""

    def __init__(self, *, num_classes: int, ignore_index: int = IGNORE_INDEX,
                 no_prediction: int | None = None):
        if no_prediction is not None and 0 <= no_prediction < num_classes:
            raise ValueError(f"no_prediction value {no_prediction} is a class (0..{num_classes - 1})")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.no_prediction = no_prediction
        cols = num_classes + (no_prediction is not None)
        self.matrix = np.zeros((num_classes, cols), dtype=np.int64)

    def update(self, gt: np.ndarray, pred: np.ndarray) -> None:
        self.matrix += confusion_matrix(gt, pred, num_classes=self.num_classes,
                                        ignore_index=self.ignore_index,
                                        no_prediction=self.no_prediction)

    def merge(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        if (other.matrix.shape != self.matrix.shape or other.ignore_index != self.ignore_index
                or other.no_prediction != self.no_prediction):
            raise ValueError("cannot merge confusion matrices of different classes, ignore index "
                             "or no-prediction value")
        self.matrix += other.matrix
        return self


# ----------------------------------------------------------------------------- scores from cm
def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def class_counts(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tp, predicted, gt) int [C] each of a [C, C] or [C, C + 1] matrix: ``predicted`` counts
    the pixels predicted as each class, ``gt`` the labelled pixels of each (misses included)."""
    cm = np.asarray(cm)
    c = cm.shape[0]
    if cm.ndim != 2 or cm.shape[1] not in (c, c + 1):
        raise ValueError(f"confusion matrix must be [C, C] or [C, C + 1], got {list(cm.shape)}")
    classes = cm[:, :c]
    return np.diag(classes), classes.sum(axis=0), cm.sum(axis=1)


def _union(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    tp, predicted, gt = class_counts(cm)
    return tp, predicted + gt - tp


def iou_per_class(cm: np.ndarray) -> np.ndarray:
    """[C] float64: TP / (TP + FP + FN) per class, nan when the class is neither in gt nor pred."""
    tp, union = _union(cm)
    return _ratio(tp, union)


def mean_iou(cm: np.ndarray) -> float:
    """Mean IoU over the classes with TP + FP + FN > 0 (:data:`MIOU_DEFINITION`): a class that
    is predicted but absent from the ground truth counts with IoU 0. nan when no class has a
    union (no labelled pixel). :func:`pipeline.ensembling.fusion.miou_from_counts` repeats these very
    operations on per-class counts: keep the two in step."""
    tp, union = _union(cm)
    valid = union > 0
    return float(_ratio(tp, union)[valid].mean()) if valid.any() else float("nan")


def class_accuracy(cm: np.ndarray) -> np.ndarray:
    """[C] float64 recall TP / (TP + FN) per class (misses count as FN), nan for classes absent
    from the gt."""
    tp, _, gt = class_counts(cm)
    return _ratio(tp, gt)


def pixel_accuracy(cm: np.ndarray) -> float:
    """Fraction of labelled pixels predicted correctly (nan when none is labelled)."""
    tp, _, gt = class_counts(cm)
    return float(_ratio(tp.sum(), gt.sum()))


# ----------------------------------------------------------------------------- video consistency
def _nanmean(values: Iterable[float]) -> float:
    arr = np.asarray(list(values), dtype=np.float64)
    arr = arr[~np.isnan(arr)]
    return float(arr.mean()) if arr.size else float("nan")


def vc_window_scores(gt_frames: Sequence[np.ndarray], pred_frames: Sequence[np.ndarray],
                     n: int) -> list[float]:
    """Per-window consistency scores of one video (frames HxW, in order), as the VSPW script.

    Returns C - n floats for C > n frames (nan where |G| = 0), [] otherwise. Holds the whole
    video in memory: see :class:`VideoConsistency` for the streaming form.
    """
    if len(gt_frames) != len(pred_frames):
        raise ValueError(f"{len(gt_frames)} ground-truth frames but {len(pred_frames)} predictions")
    if n < 1:
        raise ValueError(f"window length must be >= 1, got {n}")
    if len(gt_frames) <= n:
        return []
    gt, pred = np.stack(gt_frames), np.stack(pred_frames)
    if gt.shape != pred.shape:
        raise ValueError(f"ground truth shape {gt.shape} differs from prediction shape {pred.shape}")
    scores = []
    for i in range(len(gt) - n):
        g = np.all(gt[i + 1:i + n] == gt[i], axis=0)
        p = np.all(pred[i + 1:i + n] == pred[i], axis=0)
        total = np.count_nonzero(g)
        scores.append(np.count_nonzero(g & p) / total if total else float("nan"))
    return scores


def mvc(videos: Iterable[tuple[Sequence[np.ndarray], Sequence[np.ndarray]]], *, n: int) -> float:
    """mVC_n over ``(gt_frames, pred_frames)`` videos: nan-mean of all their windows pooled."""
    return _nanmean(s for gt, pred in videos for s in vc_window_scores(gt, pred, n))


class VideoConsistency:
    """Streaming mVC for several window lengths at once, O(1) frames of memory.

    Feed each video's frames in order with :meth:`add_frame`, then call :meth:`end_video`.
    Per pixel it keeps how many consecutive frames, ending at the current one, the gt (and the
    prediction) has stayed unchanged: a window of n frames ending here is constant iff that
    run is >= n - 1. A window's score is held back until the next frame arrives, since the
    last window of a video does not count.
    """

    def __init__(self, *, windows: Sequence[int] = VC_WINDOWS):
        if not windows or min(windows) < 1:
            raise ValueError(f"window lengths must be >= 1, got {list(windows)}")
        self.windows = tuple(int(n) for n in windows)
        self._cap = max(self.windows) - 1
        self._dtype = np.uint8 if self._cap <= 255 else np.uint16
        self.scores: dict[int, list[float]] = {n: [] for n in self.windows}
        self._reset()

    def _reset(self) -> None:
        self._frames = 0
        self._prev: tuple[np.ndarray, np.ndarray] | None = None
        self._runs: tuple[np.ndarray, np.ndarray] | None = None
        self._pending: dict[int, float] = {}

    @staticmethod
    def _advance(run: np.ndarray, prev: np.ndarray, cur: np.ndarray, cap: int) -> None:
        if cap:  # with only n = 1 every window is constant: runs stay 0
            np.minimum(run, cap - 1, out=run)
            run += 1
            np.multiply(run, cur == prev, out=run)
        np.copyto(prev, cur)

    def add_frame(self, gt: np.ndarray, pred: np.ndarray) -> None:
        """Consume the next frame of the current video: ``gt`` and ``pred`` HxW label maps."""
        gt, pred = np.asarray(gt), np.asarray(pred)
        if gt.shape != pred.shape:
            raise ValueError(f"ground truth shape {gt.shape} differs from prediction shape {pred.shape}")
        if self._prev is None:
            self._prev = (gt.copy(), pred.copy())
            self._runs = (np.zeros(gt.shape, self._dtype), np.zeros(gt.shape, self._dtype))
        else:
            if gt.shape != self._prev[0].shape:
                raise ValueError(f"frame shape {gt.shape} differs from the video's {self._prev[0].shape}")
            for n, score in self._pending.items():
                self.scores[n].append(score)
            self._pending = {}
            for run, prev, cur in zip(self._runs, self._prev, (gt, pred)):
                self._advance(run, prev, cur, self._cap)
        self._frames += 1
        run_gt, run_pred = self._runs
        for n in self.windows:
            if self._frames >= n:
                g = run_gt >= n - 1
                total = np.count_nonzero(g)
                both = np.count_nonzero(g & (run_pred >= n - 1))
                self._pending[n] = both / total if total else float("nan")

    def end_video(self) -> None:
        """Close the current video (its last window is dropped); the next frame starts a new one."""
        self._reset()

    def merge(self, other: "VideoConsistency") -> "VideoConsistency":
        """Pool the finished windows of ``other`` into this accumulator."""
        if other.windows != self.windows:
            raise ValueError(f"cannot merge window lengths {other.windows} into {self.windows}")
        for n in self.windows:
            self.scores[n].extend(other.scores[n])
        return self

    def mvc(self, n: int) -> float:
        """mVC_n over the finished videos (nan when no window had |G| > 0)."""
        return _nanmean(self.scores[n])

    def result(self) -> dict[int, float]:
        return {n: self.mvc(n) for n in self.windows}


# ----------------------------------------------------------------------------- reporting
def _num(value: float) -> float | None:
    return None if value is None or np.isnan(value) else float(value)


def summarize(cm: np.ndarray, *, class_names: Sequence[str],
              vc: Mapping[int, float] | None = None) -> dict:
    """JSON-ready summary (fractions in 0..1, nan -> None) of a confusion matrix ([C, C], or
    [C, C + 1] with a no-prediction column) and mVC values.

    Keys: mIoU, miou_definition (:data:`MIOU_DEFINITION`, the one place the definition is
    written), pixel_accuracy, mean_class_accuracy (over the classes with ground-truth pixels:
    recall is undefined elsewhere), mVC8, mVC16 (None when ``vc`` lacks them, plus mVC<n> for
    any other n in ``vc``), labelled_pixels, unpredicted_pixels (labelled pixels without a
    prediction, 0 for a [C, C] matrix), and per_class {name: {iou, accuracy, gt_pixels,
    pred_pixels}}.
    """
    cm = np.asarray(cm)
    if len(class_names) != cm.shape[0] or len(set(class_names)) != len(class_names):
        raise ValueError(f"need {cm.shape[0]} distinct class names, got {len(class_names)}")
    _, predicted, gt = class_counts(cm)
    iou, acc = iou_per_class(cm), class_accuracy(cm)
    present = gt > 0
    summary: dict = {
        "mIoU": _num(mean_iou(cm)),
        "miou_definition": MIOU_DEFINITION,
        "pixel_accuracy": _num(pixel_accuracy(cm)),
        "mean_class_accuracy": _num(acc[present].mean() if present.any() else float("nan")),
    }
    vc = dict(vc or {})
    for n in sorted(set(VC_WINDOWS) | set(vc)):
        summary[f"mVC{n}"] = _num(vc.get(n))
    summary["labelled_pixels"] = int(gt.sum())
    summary["unpredicted_pixels"] = int(gt.sum() - predicted.sum())
    summary["per_class"] = {
        name: {"iou": _num(iou[c]), "accuracy": _num(acc[c]),
               "gt_pixels": int(gt[c]), "pred_pixels": int(predicted[c])}
        for c, name in enumerate(class_names)}
    return summary


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def format_table(summary: dict) -> str:
    """Per-class IoU / accuracy table plus the totals, in percent ("-" for undefined)."""
    width = max([5] + [len(name) for name in summary["per_class"]])
    lines = [f"{'class':<{width}}  {'IoU %':>7}  {'Acc %':>7}  {'gt pixels':>12}"]
    for name, row in summary["per_class"].items():
        lines.append(f"{name:<{width}}  {_pct(row['iou']):>7}  {_pct(row['accuracy']):>7}  "
                     f"{row['gt_pixels']:>12d}")
    lines.append("-" * len(lines[0]))
    totals = [("mIoU", "mIoU"), ("pixel acc", "pixel_accuracy"), ("mean acc", "mean_class_accuracy")]
    totals += [(key, key) for key in summary if key.startswith("mVC")]
    lines.append("  ".join(f"{label} {_pct(summary[key])}" for label, key in totals))
    notes = [f"mIoU = {summary['miou_definition']}"] if summary.get("miou_definition") else []
    if summary.get("unpredicted_pixels"):
        notes.append(f"{summary['unpredicted_pixels']} labelled pixel(s) without a prediction "
                     "count as misses of their class")
    if notes:
        lines.append("; ".join(notes))
    return "\n".join(lines)
