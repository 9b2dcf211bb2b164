"""Read what training runs left on disk: logs, metrics JSONs and per-class IoU, per run folder."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.core.errors import PipelineError
from pipeline.core.names import member_name, parse_run_name
from pipeline.core.runs import RunPaths


@dataclass
class Run:
    """The files of one ``runs/<model>_f<K>_s<S>/`` folder (None where absent)."""

    root: Path
    model: str
    fold: int | str
    seed: int
    log: dict | None = None       # {column: float64 [rows]} of log.csv
    val: dict | None = None       # of val.csv
    metrics: dict | None = None
    swa: dict | None = None
    infer: dict | None = None
    class_iou: dict | None = None

    @property
    def member(self) -> str:
        return member_name(self.model, self.seed)


def read_json(path: Path) -> dict | None:
    """A JSON object, or None when the file is absent; a corrupt file is an error naming it."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise PipelineError(f"{path}: unreadable JSON ({err})") from None
    if not isinstance(data, dict):
        raise PipelineError(f"{path}: expected a JSON object")
    return data


def read_columns(path: Path, required: tuple[str, ...] = ("iter",)) -> dict | None:
    """Columns of a numeric CSV as {name: float64 [rows]} (None when the file is absent)."""
    if not path.is_file():
        return None
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
        names = list(rows[0]) if rows else []
    if rows and any(col not in names for col in required):
        raise PipelineError(f"{path}: needs column(s) {', '.join(required)}, has {', '.join(names)}")
    try:
        return {n: np.asarray([float(r[n]) if r[n] not in ("", None) else np.nan for r in rows])
                for n in names}
    except ValueError as err:
        raise PipelineError(f"{path}: non-numeric value ({err})") from None


def collect_runs(runs_dir: Path) -> list[Run]:
    """Every run folder under ``runs_dir`` holding a metrics.json or log.csv, sorted by name."""
    runs = []
    for entry in sorted(runs_dir.iterdir()) if runs_dir.is_dir() else []:
        parsed, paths = parse_run_name(entry.name), RunPaths(entry)
        if not (parsed and entry.is_dir() and (paths.metrics.is_file() or paths.log.is_file())):
            continue
        model, fold, seed = parsed
        runs.append(Run(entry, model, fold, seed,
                        log=read_columns(paths.log, ("iter", "loss")),
                        val=read_columns(paths.val_log, ("iter", "miou")),
                        metrics=read_json(paths.metrics),
                        swa=read_json(paths.swa_metrics),
                        infer=read_json(paths.infer_metrics),
                        class_iou=read_json(paths.class_iou)))
    if not runs:
        raise PipelineError(f"{runs_dir}: no training runs (expected <model>_f<K>_s<S>/metrics.json); "
                            f"run `python pipeline/train.py` first")
    return runs
