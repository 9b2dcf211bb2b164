"""The arithmetic of a cost plan: counts and bytes of one run from its config, as pure functions.

Everything here is a hand-checkable formula on plain numbers (no files, no torch), so the plan's
table can be reproduced on paper: runs of the k-fold matrix, training images, validations, SWA
snapshots, checkpoint bytes and hours. What a frame costs at inference (TTA forward
passes, map bytes) is defined beside the code that spends it:
:func:`pipeline.inference.tta.forward_passes` and :func:`pipeline.inference.mapfile.stored_bytes`.
"""

from __future__ import annotations

import math
from typing import Sequence

from pipeline.core.errors import unknown_name

FLOAT_BYTES = 4                           # float32 weights and optimizer state
OPTIMIZER_STATES = {"adamw": 2, "sgd": 1}  # tensors kept per trainable weight (sgd: momentum)


def count_runs(*, models: Sequence[str], students: Sequence[dict], folds: Sequence,
               seeds: Sequence[int], student_seeds: Sequence[int]) -> dict[str, int]:
    """Training runs of the matrix: models x folds x seeds + students x folds x student_seeds,
    and the ensemble members (a config and a seed over its folds)."""
    teachers = len(models) * len(folds) * len(seeds)
    pupils = len(students) * len(folds) * len(student_seeds)
    return {"teachers": teachers, "students": pupils, "total": teachers + pupils,
            "members": len(models) * len(seeds) + len(students) * len(student_seeds)}


def images_seen(*, iters: int, swa_iters: int, batch_size: int) -> int:
    """Training images one run draws: (iters + swa iters) x the global batch."""
    return (iters + swa_iters) * batch_size


def validations(*, iters: int, swa_iters: int, val_interval: int) -> int:
    """Validations of one run: every ``val_interval`` iterations and at the end of both phases
    (the training loop's rule: ``it % val_interval == 0 or it in (iters, iters + swa_iters)``)."""
    total = iters + swa_iters
    count = total // val_interval + (iters % val_interval != 0)
    return count + (total != iters and total % val_interval != 0)


def snapshot_count(*, swa_iters: int, swa_interval: int) -> int:
    """SWA snapshots of one run: one per cycle of the SWA phase."""
    return swa_iters // swa_interval if swa_iters > 0 else 0


def optimizer_states(name: str, *, momentum: float = 0.9) -> int:
    """Tensors the optimizer keeps per trainable weight (AdamW: 2 moments; SGD: momentum)."""
    if name not in OPTIMIZER_STATES:
        raise unknown_name("optimizer", name, list(OPTIMIZER_STATES))
    return 0 if name == "sgd" and momentum == 0 else OPTIMIZER_STATES[name]


def checkpoint_bytes(*, weight_bytes: int, trainable: int, states: int, snapshots: int,
                     validated: bool) -> dict[str, int]:
    """Tensor bytes of one run's checkpoint files (a file adds a few KB of config).

    ``last.pt``: weights + ``states`` x 4 bytes per trainable weight; ``best.pt``: weights (a
    copy of last.pt when the run has no validation fold); ``swa.pt``: weights when there are
    snapshots; ``snapshots``: weights each. ``weight_bytes`` counts the whole state dict
    (BatchNorm statistics too); ``trainable``: trainable weights (a count, not bytes).
    """
    last = weight_bytes + states * trainable * FLOAT_BYTES
    best = weight_bytes if validated else last
    swa = weight_bytes if snapshots else 0
    return {"checkpoints": last + best + swa, "snapshots": snapshots * weight_bytes}


def swa_passes(*, train_frames: int, val_frames: int, batch_size: int, snapshots: int) -> int:
    """Images the SWA stage sends through the network: one BatchNorm pass over the run's
    training frames in whole batches, and the averaged weights on the validation fold."""
    if not snapshots:
        return 0
    return math.ceil(train_frames / batch_size) * batch_size + val_frames


def even_split(total: int, parts: int) -> list[int]:
    """``total`` split into ``parts`` integers differing by at most one (the first get more)."""
    base, extra = divmod(total, parts)
    return [base + (i < extra) for i in range(parts)]


def sampled_frames(*, frames: int, videos: int, windows: int, length: int,
                   every_nth_video: int, seed: int = 0) -> int:
    """Train frames ``infer.oof_sample`` keeps when ``frames`` are split evenly over ``videos``
    (:func:`even_split`, in name order): every ``every_nth_video``-th video from ``seed`` mod N,
    each whole or, with ``windows``, ``windows`` x ``length`` of it when it is longer (the rule
    of :func:`pipeline.data.oof_sample.sample_clips`)."""
    sizes = even_split(frames, max(1, videos))[seed % every_nth_video::every_nth_video]
    cap = windows * length
    return sum(n if not windows or n <= cap else cap for n in sizes)


def hours(count: int | None, per_second: float | None) -> float | None:
    """Hours one device takes for ``count`` images or passes at ``per_second``; None when
    either is unknown (0 for nothing to do)."""
    if count is None or (count and not per_second):
        return None
    return count / per_second / 3600.0 if count else 0.0


def human_bytes(n: int | None) -> str:
    """``n`` bytes in decimal units (1 KB = 1000 B): ``"25.9 TB"``; ``"unknown"`` for None."""
    if n is None:
        return "unknown"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def human_count(n: int | float | None) -> str:
    """``n`` with a k/M/G suffix from 10,000 on (``"1.3 G"``); ``"unknown"`` for None."""
    if n is None:
        return "unknown"
    for unit, scale, least in (("G", 1e9, 1e9), ("M", 1e6, 1e6), ("k", 1e3, 1e4)):
        if abs(n) >= least:
            return f"{n / scale:.1f} {unit}"
    return f"{n:,.0f}"
