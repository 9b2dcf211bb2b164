"""Read one section of params.yaml into a typed dataclass, naming typos.

Each stage owns one section (``prepare:``, ``folds:`` ...) described by a dataclass; defaults
live in that dataclass only. Unknown keys are errors that list the valid keys, so a typo in
params.yaml never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Mapping, TypeVar

import yaml

from pipeline.core.errors import PipelineError

T = TypeVar("T")

DEFAULT_PARAMS = "params.yaml"


def read_params(path: str | Path = DEFAULT_PARAMS) -> dict:
    """Return the whole params file as a dict ({} for an empty file)."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: params file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        # A MarkedYAMLError carries where it failed (0-based) and what; keep both on one line.
        mark, problem = getattr(err, "problem_mark", None), getattr(err, "problem", None)
        what = problem or (str(err).splitlines()[0] if str(err) else "invalid YAML")
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        raise PipelineError(f"{path}: not valid YAML ({where}{what})") from None
    if not isinstance(data, dict):
        raise PipelineError(f"{path}: expected a mapping of sections at the top level")
    return data


def _check_type(key: str, value: Any, default: Any, source: str) -> Any:
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, str):
        ok = isinstance(value, str)
    elif isinstance(default, (list, tuple)):
        ok = isinstance(value, (list, tuple))
    elif isinstance(default, dict):
        ok = isinstance(value, dict)
    else:
        ok = True
    if not ok:
        raise PipelineError(
            f"{source}: '{key}' must be {type(default).__name__}, got {value!r}")
    return value


def _check_finite(key: str, value: Any, source: str) -> None:
    """Refuse NaN and infinities anywhere in ``value`` (nested mappings and lists too), naming
    the key path (``models.tiny.optimizer.lr``, ``models.tiny.loss[0].weight``): YAML's
    ``.nan``/``.inf`` parse as floats and would otherwise reach torch as a number."""
    if isinstance(value, float) and not math.isfinite(value):
        raise PipelineError(f"{source}: '{key}' must be a finite number, got {value}")
    if isinstance(value, Mapping):
        for name, item in value.items():
            _check_finite(f"{key}.{name}", item, source)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_finite(f"{key}[{i}]", item, source)


def build_section(schema: type[T], values: Mapping[str, Any] | None, *, section: str,
                  source: str = DEFAULT_PARAMS) -> T:
    """Instantiate ``schema`` from ``values``; unknown keys, wrong types and non-finite numbers
    (at any depth) raise PipelineError naming the key."""
    values = dict(values or {})
    fields = {f.name: f for f in dataclasses.fields(schema)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise PipelineError(
            f"{source}: unknown key '{section}.{unknown[0]}'; valid keys of '{section}': "
            f"{', '.join(sorted(fields))}")
    defaults = schema()  # every section dataclass has defaults for all fields
    kwargs = {}
    for name, value in values.items():
        _check_finite(f"{section}.{name}", value, source)
        kwargs[name] = _check_type(f"{section}.{name}", value, getattr(defaults, name), source)
    return schema(**kwargs)


def load_section(schema: type[T], section: str, params_path: str | Path = DEFAULT_PARAMS,
                 overrides: Mapping[str, Any] | None = None) -> T:
    """Load ``section`` of the params file into ``schema``, then apply non-None ``overrides``.

    A missing params file is allowed only when no section is required (defaults are used).
    """
    path = Path(params_path)
    params = read_params(path) if path.is_file() else {}
    values = params.get(section) or {}
    if not isinstance(values, dict):
        raise PipelineError(f"{path}: section '{section}' must be a mapping")
    values = dict(values)
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key] = value
    return build_section(schema, values, section=section, source=str(path))
