"""Hierarchical fusion of ensemble groups: the one definition of the fused map, and what each
row of the ensemble table predicts.

The ensemble averages three groups of members: strong S, weak W and auxiliary A (VSPW 2021,
5th place). With group maps P_S, P_W, P_A (means of their members' softmax maps, float32
[C, H, W]) the fused map is ``P = P_S + alpha * P_W + beta * P_A`` and the prediction its
argmax over C (the lowest class index wins an exact tie, as ``np.argmax``). :func:`fuse` is
the one definition of that arithmetic; search and apply both go through it or reproduce it
bit for bit (the grid scorer of :mod:`pipeline.ensembling.gridscore`, the label records of
:mod:`pipeline.ensembling.records`).

A row of the table predicts the argmax of a mean of members (:class:`MeanRow`) or the fused
map at fixed weights (:class:`FusedRow`); a pass scores it per chunk of frames (:data:`Table`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from pipeline.evaluation.consistency import VideoConsistency

GROUPS = ("S", "W", "A")


class Mean:
    """Running mean of float32 maps: ``add`` them one at a time, ``value()`` is their sum in
    that order divided by the count (what :func:`group_mean` returns), None when empty."""

    def __init__(self):
        self.total: np.ndarray | None = None
        self.count = 0

    def add(self, probs: np.ndarray) -> None:
        if self.total is None:
            self.total = np.array(probs, dtype=np.float32, copy=True)
        else:
            self.total += probs
        self.count += 1

    def value(self) -> np.ndarray | None:
        return None if self.total is None else self.total / np.float32(self.count)


def group_mean(maps: Sequence[np.ndarray]) -> np.ndarray | None:
    """Mean float32 [C, H, W] of member maps, summed in the given order; None for no member."""
    mean = Mean()
    for probs in maps:
        mean.add(probs)
    return mean.value()


def fuse(ps: np.ndarray, pw: np.ndarray | None, pa: np.ndarray | None, *, alpha: float,
         beta: float) -> np.ndarray:
    """``(ps + alpha * pw) + beta * pa`` in float32 (an absent group adds 0): [C, ...]."""
    fused = np.asarray(ps, dtype=np.float32).copy()
    if pw is not None:
        fused += np.float32(alpha) * pw
    if pa is not None:
        fused += np.float32(beta) * pa
    return fused


def fuse_labels(ps: np.ndarray, pw: np.ndarray | None, pa: np.ndarray | None, *, alpha: float,
                beta: float) -> np.ndarray:
    """Argmax over C of :func:`fuse`: uint8 [H, W] (uint16 beyond 255 classes)."""
    fused = fuse(ps, pw, pa, alpha=alpha, beta=beta)
    return fused.argmax(axis=0).astype(np.uint8 if fused.shape[0] <= 255 else np.uint16)


@dataclass(frozen=True)
class MeanRow:
    """A table row predicting the argmax of the mean of ``members`` (one member: itself)."""

    members: tuple[str, ...]


@dataclass(frozen=True)
class FusedRow:
    """A table row predicting :func:`fuse_labels` of the groups at (alpha, beta)."""

    alpha: float
    beta: float


# what a pass returns per chunk: {row key: (confusion matrix int64 [C, C], its frames' video
# consistency)}, summed over the chunks by the caller
Table = dict[str, tuple[np.ndarray, VideoConsistency]]
