"""The ``ensemble:`` settings of params.yaml that need more than a type check: the weight grids,
the explicit groups, and what the rest of the params define for the ensemble (the members, the
model families)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.errors import PipelineError, unknown_name
from pipeline.core.names import member_name
from pipeline.core.params import read_params
from pipeline.core.runs import ModelParams, load_train_params
from pipeline.ensembling.fusion import GROUPS

DEFAULT_GRID = {"start": 0.0, "stop": 2.0, "step": 0.1}


def is_number(value: Any) -> bool:
    """An int or a float, not a bool (YAML's true is no weight)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def parse_grid(value: Any, *, key: str, source: str = "params.yaml") -> list[float]:
    """Weights of one grid axis from a list or {start, stop, step}; sorted, >= 0, holding 0."""
    value = DEFAULT_GRID if value is None else value
    where = f"{source}: ensemble.{key}"
    if isinstance(value, dict):
        if set(value) != {"start", "stop", "step"}:
            raise PipelineError(f"{where} needs exactly start, stop and step, got {sorted(value)}")
        start, stop, step = (value[k] for k in ("start", "stop", "step"))
        if not all(is_number(v) for v in (start, stop, step)) or step <= 0 or stop < start:
            raise PipelineError(f"{where}: need numbers with step > 0 and stop >= start, "
                                f"got {value}")
        count = int(np.floor((stop - start) / step + 1e-9)) + 1
        value = [round(start + i * step, 10) for i in range(count)]
    if not isinstance(value, (list, tuple)) or not value or not all(map(is_number, value)):
        raise PipelineError(f"{where} must be a non-empty list of numbers or {{start, stop, step}}")
    grid = sorted({float(v) for v in value})
    if grid[0] < 0 or not np.all(np.isfinite(grid)):
        raise PipelineError(f"{where}: weights must be finite and >= 0, got {grid[0]}")
    if grid[0] != 0:
        raise PipelineError(f"{where} must include 0 (the P_S and P_S + alpha P_W rows use it)")
    return grid


def parse_groups(value: Any, *, source: str = "params.yaml") -> dict[str, list[str]] | None:
    """None for automatic groups, else {"S": [...], "W": [...], "A": [...]} as given."""
    if value is None or value == "auto":
        return None
    where = f"{source}: ensemble.groups"
    if not isinstance(value, dict):
        raise PipelineError(f"{where} must be 'auto' or {{S: [members], W: [...], A: [...]}}")
    unknown = sorted(set(value) - set(GROUPS))
    if unknown:
        raise PipelineError(f"{where}: {unknown_name('group', str(unknown[0]), GROUPS)}")
    groups = {}
    for group in GROUPS:
        names = value.get(group) or []
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise PipelineError(f"{where}.{group} must be a list of member names")
        groups[group] = list(names)
    return groups


def model_families(params_path: str | Path) -> dict[str, str]:
    """{model config: family} from ``models:`` of the params file ({} without the file)."""
    if not Path(params_path).is_file():
        return {}
    models = read_params(params_path).get("models") or {}
    return {name: str((cfg or {}).get("family", ModelParams.family))
            for name, cfg in models.items()}


def params_members(params_path: str | Path) -> list[str] | None:
    """The members the params define, sorted: ``<model>_s<seed>`` of train.models x train.seeds
    and of train.students x train.student_seeds (checked by :func:`pipeline.core.runs.
    load_train_params`), the runs the DVC matrices train and infer. None when the file has no
    ``train:`` section (maps made elsewhere: every member found is used)."""
    path = Path(params_path)
    if not path.is_file() or "train" not in read_params(path):
        return None
    train = load_train_params(path)
    names = {member_name(m, s) for m in train.models for s in train.seeds}
    names |= {member_name(st["name"], s) for st in train.students for s in train.student_seeds}
    if not names:
        raise PipelineError(f"{path}: train.models and train.students define no member to "
                            f"ensemble")
    return sorted(names)
