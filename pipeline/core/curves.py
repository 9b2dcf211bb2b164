"""A run's training curves in DVCLive's layout: where they are, how to read them, how to cut
them back to a resumed iteration.

Training logs through DVCLive (:mod:`pipeline.training.logs`), DVC's own experiment logger, in
``runs/<run>/dvclive/`` (:attr:`pipeline.core.runs.RunPaths.curves`)::

    dvclive/
      metrics.json                    the latest value of every curve, and its ``step``
      plots/metrics/train/loss.tsv    ``step<TAB>loss`` per logged step; also lr, each loss
                                      part, images_per_s (and skipped_steps under fp16)
      plots/metrics/val/miou.tsv      per validation; also pixel_acc (and ema_miou with EMA)

A curve's step is the training iteration (optimizer steps). ``dvc plots show`` / ``diff`` and
DVC's editor integrations read the folder as ``dvc.yaml`` declares it; the report and the
lanes' progress board read it here. This module needs no DVCLive: the files are plain
TSV and JSON.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipeline.core import atomic
from pipeline.core.errors import PipelineError

TRAIN, VAL = "train", "val"      # the curve groups: train/<name> per logged step, val/<name>
STEP = "step"                    # DVCLive's step column: the training iteration
SUMMARY_FILE = "metrics.json"    # DVCLive's summary: the latest value of each curve
_TSV = ".tsv"


def metrics_dir(live_dir: Path) -> Path:
    """The folder of the curves' TSV files (DVCLive's ``plots/metrics``)."""
    return Path(live_dir) / "plots" / "metrics"


def curve_path(live_dir: Path, group: str, name: str) -> Path:
    """The TSV of the curve ``<group>/<name>`` (e.g. ``train``, ``loss``)."""
    return metrics_dir(live_dir) / group / f"{name}{_TSV}"


def _rows(path: Path) -> tuple[list[str], list[list[str]]]:
    """A TSV's header and its complete rows (a row cut short by a kill is left out)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    if not lines:
        return [], []
    header = lines[0].split("\t")
    return header, [r for r in (line.split("\t") for line in lines[1:]) if len(r) == len(header)]


def read_curve(path: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """(steps int64, values float64) of one curve's TSV; None when the file is absent."""
    if not path.is_file():
        return None
    header, rows = _rows(path)
    if header[:1] != [STEP] or len(header) < 2:
        raise PipelineError(f"{path}: not a DVCLive curve (header {header}, expected "
                            f"'{STEP}' and a value column)")
    try:
        steps = np.asarray([int(r[0]) for r in rows], dtype=np.int64)
        values = np.asarray([float(r[-1]) for r in rows], dtype=np.float64)
    except ValueError as err:
        raise PipelineError(f"{path}: non-numeric value ({err})") from None
    return steps, values


def read_group(live_dir: Path, group: str) -> dict[str, np.ndarray] | None:
    """Every curve of ``group`` on one step axis: ``{"iter": steps, name: values}`` (NaN where
    a curve has no value at a step); None when the group has no curve."""
    folder = metrics_dir(live_dir) / group
    paths = sorted(folder.glob(f"*{_TSV}")) if folder.is_dir() else []
    curves = {p.stem: read_curve(p) for p in paths}
    if not curves:
        return None
    steps = np.unique(np.concatenate([s for s, _ in curves.values()]))
    table = {"iter": steps}
    for name, (s, v) in curves.items():
        column = np.full(len(steps), np.nan)
        column[np.searchsorted(steps, s)] = v
        table[name] = column
    return table


def tail_text(path: Path, size: int = 4096) -> str:
    """The last ``size`` bytes of a file that may be being written, as text ('' when it is
    missing): polling a long log or curve stays cheap."""
    try:
        with path.open("rb") as fh:
            fh.seek(0, 2)
            fh.seek(max(0, fh.tell() - size))
            return fh.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def last_value(path: Path) -> tuple[int, float] | None:
    """The last complete (step, value) of a curve that is being written (None before its first
    row), from the file's tail."""
    lines = tail_text(path).split("\n")
    for line in reversed(lines[1:-1] if len(lines) > 2 else []):  # drop partial first/last
        parts = line.strip().split("\t")
        if len(parts) >= 2 and parts[0].isdigit():
            try:
                return int(parts[0]), float(parts[-1])
            except ValueError:
                continue
    return None


def cut_curves(live_dir: Path, *, upto: int) -> None:
    """Keep the rows with step <= ``upto`` in every curve and rewrite the summary from what is
    kept: a run resumed from iteration ``upto`` logs the later steps again."""
    live_dir = Path(live_dir)
    folder = metrics_dir(live_dir)
    if not folder.is_dir():
        return
    summary: dict = {}
    last_step = None
    for path in sorted(folder.rglob(f"*{_TSV}")):
        header, rows = _rows(path)
        kept = [r for r in rows if r[0].isdigit() and int(r[0]) <= upto]
        atomic.write_text(path, "".join("\t".join(r) + "\n" for r in [header, *kept]))
        if kept:
            group = path.parent.relative_to(folder).parts
            node = summary
            for part in group:
                node = node.setdefault(part, {})
            node[path.stem] = float(kept[-1][-1])
            last_step = max(last_step or 0, int(kept[-1][0]))
    if last_step is not None:
        summary[STEP] = last_step
    atomic.write_text(live_dir / SUMMARY_FILE, json.dumps(summary, indent=4) + "\n")
