"""Segmentation metrics from a confusion matrix: the streaming matrix itself, IoU and accuracy.

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

Video consistency (mVC) is :mod:`pipeline.evaluation.consistency`; the JSON summary and text
table of a score, :mod:`pipeline.evaluation.scorecard`.
"""

from __future__ import annotations

import numpy as np

IGNORE_INDEX = 255
MIOU_DEFINITION = "mean over classes with TP+FP+FN > 0"
_CHUNK = 1 << 20  # pixels per bincount call: keeps the uint16 index buffer in cache


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
    union (no labelled pixel). :func:`pipeline.ensembling.gridscore.miou_from_counts` repeats these very
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
