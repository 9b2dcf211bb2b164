"""A member's test map: the mean of its fold models' maps (the models its OOF maps measured),
with a separate weight for a run trained on every train frame (``--fold all``); the search
records each member's weights, apply and the holdout scores make the maps with them."""

from __future__ import annotations

from typing import Mapping

import numpy as np

from pipeline.core.names import ALL_FOLDS, fold_dir_name
from pipeline.inference.members import Member


def member_test_weights(member: Member, full_data_weight: float = 0.0) -> dict[str, float]:
    """How ``--apply`` makes a member's test map from its runs' test maps: {"f<K>": weight}.

    The k fold models (each trained without fold K; their OOF maps are what the search
    scored) share 1 - w equally. The run trained on every train frame (``--fold all``, folder
    ``fall``: test maps only, so no OOF score of its own) is not one more fold model: it gets
    the separate weight w = ``ensemble.full_data_weight``. The default w = 0 keeps the test map
    the fold models' mean, the model the OOF maps measured; a member without such a run gives
    its fold models all the weight. weights.json and members.json record the result."""
    folds = [f for f in member.folds if f != ALL_FOLDS]
    full = ALL_FOLDS in member.meta
    w = float(full_data_weight) if full else 0.0
    out = {fold_dir_name(f): (1.0 - w) / max(1, len(folds)) for f in folds}
    if full:
        out[fold_dir_name(ALL_FOLDS)] = w
    return out


def run_of(key: str) -> int | str:
    """"f3" -> 3, "fall" -> "all": the fold of a run folder name (:func:`fold_dir_name`)."""
    return ALL_FOLDS if key == fold_dir_name(ALL_FOLDS) else int(key[1:])


def member_test(member: Member, frame_id: str, mix: Mapping[int | str, float]) -> np.ndarray:
    """The member's full-size test map float32 [C, H, W]: the mean of its fold models' maps
    (the runs of ``mix`` with a weight > 0 but "all") times their share, plus the ``--fold all``
    run's map times its weight (see :func:`member_test_weights`)."""
    folds = [f for f, w in mix.items() if f != ALL_FOLDS and w > 0]
    w_all = float(mix.get(ALL_FOLDS, 0.0))
    probs = member.read_test(frame_id, full_size=True, folds=folds) if folds else None
    if w_all > 0:
        full = member.read_test(frame_id, full_size=True, folds=[ALL_FOLDS])
        probs = full if probs is None else (np.float32(1 - w_all) * probs
                                            + np.float32(w_all) * full)
    return probs
