"""Read what training runs left on disk: logs, metrics JSONs and per-class IoU, per run folder."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.curves import TRAIN, VAL, read_group
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
    log: dict | None = None       # {"iter": steps, curve: float64 [steps]} of the train curves
    val: dict | None = None       # of the val curves (pipeline.core.curves)
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


def collect_runs(runs_dir: Path) -> list[Run]:
    """Every run folder under ``runs_dir`` holding a metrics.json or curves, sorted by name."""
    runs = []
    for entry in sorted(runs_dir.iterdir()) if runs_dir.is_dir() else []:
        parsed, paths = parse_run_name(entry.name), RunPaths(entry)
        if not (parsed and entry.is_dir() and (paths.metrics.is_file() or paths.curves.is_dir())):
            continue
        model, fold, seed = parsed
        runs.append(Run(entry, model, fold, seed,
                        log=read_group(paths.curves, TRAIN),
                        val=read_group(paths.curves, VAL),
                        metrics=read_json(paths.metrics),
                        swa=read_json(paths.swa_metrics),
                        infer=read_json(paths.infer_metrics),
                        class_iou=read_json(paths.class_iou)))
    if not runs:
        raise PipelineError(f"{runs_dir}: no training runs (expected <model>_f<K>_s<S>/metrics.json); "
                            f"run `python pipeline/train.py` first")
    return runs
