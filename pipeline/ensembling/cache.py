"""The scores a search reuses while its inputs are unchanged: the fingerprint of what they
depend on, and ``grid_scores.npz`` (the grid counts, the table rows' results and every
member's confusion matrix)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from pipeline.core import atomic
from pipeline.data.manifest import Frame
from pipeline.ensembling.fusion import FusedRow, MeanRow
from pipeline.ensembling.gridscore import GridCounts
from pipeline.ensembling.inputs import meta_digest
from pipeline.inference.members import OOF_DIR, Member, map_path

CACHE = "grid_scores.npz"


def fingerprint(members: Sequence[Member], frames: Sequence[Frame], classes_path: Path,
                settings: Mapping[str, Any]) -> str:
    """sha256 of what the scores depend on: member metas, size and mtime of every OOF map and
    mask, classes.json and the search ``settings``."""
    digest = hashlib.sha256(json.dumps(
        {"settings": settings, "members": {m.name: meta_digest(m) for m in members},
         "classes": hashlib.sha256(classes_path.read_bytes()).hexdigest()},
        sort_keys=True, default=str).encode())
    for frame in frames:
        paths = [map_path(m.run_dir(m.oof_fold(frame.id)) / OOF_DIR, frame.id) for m in members]
        for path in [*paths, Path(frame.mask)]:
            st = os.stat(path)
            digest.update(f"{path.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return digest.hexdigest()


def save_cache(path: Path, *, fp: str, counts: GridCounts, table: Mapping[str, tuple],
               rows: Mapping[str, MeanRow | FusedRow],
               member_cms: Mapping[str, np.ndarray]) -> None:
    """The grid counts, the rows' results and every member's confusion matrix of the search
    over inputs ``fp`` (atomic npz)."""
    doc = {"rows": {key: {"row": dataclasses.asdict(rows[key]), "cm": np.asarray(cm).tolist(),
                          "vc": {str(n): v for n, v in vc.items()}}
                    for key, (cm, vc) in table.items()},
           "member_cms": {n: np.asarray(cm).tolist() for n, cm in member_cms.items()}}
    with atomic.atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, fingerprint=fp, alphas=counts.alphas, betas=counts.betas, tp=counts.tp,
                     pred=counts.pred, gt=counts.gt, table=json.dumps(doc))


def load_cache(path: Path, fp: str) -> tuple[GridCounts, dict, dict, dict] | None:
    """(counts, table, rows, member_cms) of :func:`save_cache` when made from the same inputs
    (and by this version), else None."""
    try:
        with np.load(path) as data:
            if str(data["fingerprint"]) != fp:
                return None
            counts = GridCounts(data["alphas"], data["betas"], data["tp"], data["pred"],
                                       data["gt"])
            doc = json.loads(str(data["table"]))
        entries, member_cms = doc["rows"], doc["member_cms"]
        rows = {key: MeanRow(tuple(e["row"]["members"])) if "members" in e["row"]
                else FusedRow(**e["row"]) for key, e in entries.items()}
        table = {key: (np.asarray(e["cm"], np.int64), {int(n): v for n, v in e["vc"].items()})
                 for key, e in entries.items()}
        member_cms = {n: np.asarray(cm, np.int64) for n, cm in member_cms.items()}
    except (OSError, KeyError, ValueError, TypeError, AttributeError):
        return None
    return counts, table, rows, member_cms
