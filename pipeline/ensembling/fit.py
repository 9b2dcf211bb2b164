"""Fitting the weights, with the search lock held: the read passes (or the cache of a search of
the same inputs), the grid's scores, the Optuna study, the best point, and the table's rows.

Steps: leftovers of a killed search are removed; the grid pass scores every (alpha, beta) (a
group left empty fixes its weight at 0) while, with workers, the study of that grid opens on a
thread; the study records the grid, and meanwhile the workers rebuild the fused rows at the
best point from the grid pass's label records and draw the heatmap; a kept study of the same
inputs whose values differ decides the point (its rows are rebuilt); the table's fused rows
must agree exactly with the grid's scores; the passes' results are cached.
"""

from __future__ import annotations

import functools
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import joblib
import numpy as np

from pipeline.core.errors import PipelineError
from pipeline.core.names import UNIFORM_MEAN
from pipeline.data.manifest import ClassInfo, Frame
from pipeline.ensembling import outputs, passes, study
from pipeline.ensembling.cache import CACHE, load_cache, save_cache
from pipeline.ensembling.fusion import FusedRow, MeanRow
from pipeline.ensembling.gridscore import GridCounts
from pipeline.ensembling.groups import Grouping, best_member
from pipeline.ensembling.inputs import check_meta_confusions, meta_confusions
from pipeline.ensembling.passes import OofSource
from pipeline.ensembling.records import fused_rows_tasks, merge_rows
from pipeline.ensembling.study import STUDY_FILE, OpenStudy, StudyOpening, leftovers
from pipeline.evaluation.metrics import mean_iou

RECORDS = ".grid_records-"   # temp folder prefix (under the output folder) of the label records

# (grid counts, {row key: (confusion matrix, {n: mVC_n})}, {row key: row}, {member: its OOF
# confusion matrix}): what the read passes found, and what the cache keeps of them
Scored = tuple[GridCounts, dict, dict, dict]


@dataclass
class Fit:
    """What :func:`fit_weights` found: the table's ``rows`` and their results (``table``:
    {key: (confusion matrix, {n: mVC_n})}: the best member's, the uniform mean, S, S_W and
    S_W_A), the grid ``counts``, the members' OOF confusion matrices, the study's ``trials``
    and ``handle`` (a new study stays in its work file until committed), the best point
    (``alpha``, ``beta``, its score ``best``), ``alpha_sw`` (the best alpha with beta 0), the
    ``chosen`` groups, the best ``single`` member and the ``grid`` (alphas, betas) scored."""

    table: dict
    rows: dict
    counts: GridCounts
    member_cms: dict[str, np.ndarray]
    trials: list
    handle: OpenStudy
    alpha: float
    beta: float
    best: float
    alpha_sw: float
    chosen: dict[str, list[str]]
    single: str
    grid: tuple[list[float], list[float]]


def best_point(points: Sequence[tuple[float, float, float]]) -> tuple[float, float, float]:
    """(alpha, beta, score) of the best score; ties go to the smallest alpha + beta, then
    alpha (the simplest ensemble)."""
    return min(points, key=lambda p: (-p[2], p[0] + p[1], p[0], p[1]))


def member_rows(names: Sequence[str]) -> dict[str, MeanRow]:
    """The table rows of single members, keyed ``member:<name>``."""
    return {f"member:{n}": MeanRow((n,)) for n in names}


def grid_pass(source: OofSource, frames: Sequence[Frame], *,
              member_cms: Mapping[str, np.ndarray] | None, grouping: Grouping,
              grid: tuple[list[float], list[float]], record_dir: Path, run: Mapping[str, Any],
              manifest: Path, starting: Callable = lambda grid: None) -> Scored:
    """The read passes: (counts, table, rows, member_cms). ``member_cms``: the members'
    stored confusion matrices (meta.json), checked against the maps here, else None: automatic
    groups then rank the members in a pass of their own first, explicit ones score them in
    the grid pass. Of the members' rows (confusion matrix and video consistency) only the
    best member's is needed; the grid pass leaves its label records in ``record_dir``.
    ``starting(grid)`` is called as the grid pass starts, with the grid it scores."""
    names = [m.name for m in source.members]
    rows: dict = {}
    table: dict = {}
    if member_cms is not None:
        grid_rows = member_rows([best_member(member_cms)])
    elif grouping.auto:
        rows = member_rows(names)
        _, table = passes.score_pass(source, frames, rows=rows, desc="rank members", **run)
        member_cms, grid_rows = {n: table[f"member:{n}"][0] for n in names}, {}
    else:
        grid_rows = member_rows(names)
    grid_rows[UNIFORM_MEAN] = MeanRow(tuple(names))
    chosen = grouping(member_cms)
    grid = (grid[0] if chosen["W"] else [0.0], grid[1] if chosen["A"] else [0.0])
    starting(grid)
    counts, scored = passes.score_pass(source, frames, rows=grid_rows, groups=chosen,
                                       desc="grid pass", grid=grid, record_dir=record_dir,
                                       **run)
    if not counts.gt.sum():
        raise PipelineError(f"{manifest}: the masks of the {len(frames)} out-of-fold frames "
                            f"have no labelled pixel")
    table.update(scored)
    rows.update(grid_rows)
    if member_cms is None:
        member_cms = {n: table[f"member:{n}"][0] for n in names}
    else:
        check_meta_confusions(member_cms, gt_counts=counts.gt,
                              roots={m.name: m.root for m in source.members},
                              scored={n: table[f"member:{n}"][0] for n in names
                                      if f"member:{n}" in table})
    return counts, table, rows, member_cms


def grid_scores(counts: GridCounts) -> tuple[tuple[list[float], list[float]], np.ndarray,
                                             dict[tuple[float, float], float]]:
    """(the grid (alphas, betas) as floats, its mIoU float64 [A, B], {(alpha, beta): mIoU})."""
    grid_a, grid_b = [float(a) for a in counts.alphas], [float(b) for b in counts.betas]
    miou = counts.miou()
    scores = {(a, b): float(miou[i, j])
              for i, a in enumerate(grid_a) for j, b in enumerate(grid_b)}
    return (grid_a, grid_b), miou, scores


def score_rows(rows: Mapping[str, FusedRow], *, source: OofSource, frames: Sequence[Frame],
               groups: Mapping[str, Sequence[str]], run: Mapping[str, Any]) -> dict:
    """Fused rows scored in a read pass of their own (no label records: a cached search)."""
    return passes.score_pass(source, frames, rows=rows, groups=groups, desc="fused rows",
                             **run)[1]


def fused_rows_and_heatmap(point: tuple[float, float], *, alpha_sw: float, rows: dict,
                           table: dict, record_dir: Path | None, heatmap_path: Path,
                           miou: np.ndarray, grid: tuple[list[float], list[float]],
                           num_classes: int, ignore_index: int, workers: int,
                           fallback: Callable[[dict], dict],
                           meanwhile: Callable[[], Any] = lambda: None) -> Any:
    """Render the heatmap and add the fused rows S, S_W, S_W_A (best ``point``) to ``rows``
    and ``table``, on the workers while ``meanwhile()`` runs here; returns its result.

    The rows' video consistency needs their label maps: they are rebuilt from the grid
    pass's records (no map is read again), else ``fallback(rows)`` scores them in a pass."""
    fused = {"S": FusedRow(0.0, 0.0), "S_W": FusedRow(alpha_sw, 0.0),
             "S_W_A": FusedRow(*point)}
    todo = {key: row for key, row in fused.items() if rows.get(key) != row}
    tasks = [joblib.delayed(outputs.plot_heatmap)(heatmap_path, miou, *grid, point)]
    if todo and record_dir is not None:
        tasks += fused_rows_tasks(record_dir, rows=todo, num_classes=num_classes,
                                  ignore_index=ignore_index)
    # the workers are warm only after a grid pass in this process
    pending = joblib.Parallel(n_jobs=workers if record_dir is not None else 1,
                              return_as="generator")(tasks)
    try:
        value = meanwhile()
    finally:
        _, *tables = pending  # the tasks end either way: no generator is left running
    if tables:
        table.update(merge_rows(tables, rows=todo, num_classes=num_classes))
    elif todo:
        table.update(fallback(todo))
    rows.update(fused)
    return value


def record_study(opening: StudyOpening, *, scores: Mapping[tuple[float, float], float],
                 grid: tuple[list[float], list[float]]) -> list:
    """Record the grid's ``scores`` in its study (:func:`~pipeline.ensembling.study.run_study`,
    not committed yet); returns the study's complete trials."""
    handle = opening.get(*grid)
    trials = study.run_study(scores=scores, alphas=grid[0], betas=grid[1], file=opening.file,
                             fingerprint=opening.fingerprint, opened=handle, commit=False)
    print(f"study: {len(trials)} grid points, {len(trials) - len(handle.done)} new", flush=True)
    return trials


def check_fused_rows(table: Mapping[str, tuple], rows: Mapping[str, FusedRow],
                     scores: Mapping[tuple[float, float], float]) -> None:
    """The fused rows' mIoU equals the grid's score at their weights, exactly."""
    for key in ("S", "S_W", "S_W_A"):  # the grid pass and the plain fusion agree exactly
        if mean_iou(table[key][0]) != scores[(rows[key].alpha, rows[key].beta)]:
            raise RuntimeError(f"internal: the grid's mIoU of row {key} differs from its "
                               f"fusion")


def best_fit(scored: Scored, *, source: OofSource, frames: Sequence[Frame], grouping: Grouping,
             opening: StudyOpening, record_dir: Path | None, heatmap_path: Path,
             run: Mapping[str, Any]) -> Fit:
    """From the passes' results: the groups, the grid's scores, the study, the best point and
    the table's rows at it."""
    counts, table, rows, member_cms = scored
    chosen = grouping(member_cms)
    grid, miou, scores = grid_scores(counts)
    alpha_sw = best_point([(a, 0.0, scores[(a, 0.0)]) for a in grid[0]])[0]
    finish = functools.partial(
        fused_rows_and_heatmap, alpha_sw=alpha_sw, rows=rows, table=table,
        record_dir=record_dir, heatmap_path=heatmap_path, miou=miou, grid=grid,
        num_classes=source.num_classes, ignore_index=source.ignore_index,
        workers=run["workers"], fallback=functools.partial(
            score_rows, source=source, frames=frames, groups=chosen, run=run))
    # the study looks every grid point up, so its best point is known before it runs:
    # the work that needs it runs on the workers meanwhile
    alpha, beta, best = best_point([(a, b, s) for (a, b), s in scores.items()])
    trials = finish((alpha, beta), meanwhile=functools.partial(
        record_study, opening, scores=scores, grid=grid))
    found = best_point([(t.params["alpha"], t.params["beta"], t.value) for t in trials])
    if found != (alpha, beta, best):  # a resumed study that holds other values decides
        alpha, beta, best = found
        finish((alpha, beta))
    check_fused_rows(table, rows, scores)
    single = best_member(member_cms)
    keep = (f"member:{single}", UNIFORM_MEAN, "S", "S_W", "S_W_A")
    return Fit(table={k: table[k] for k in keep}, rows={k: rows[k] for k in keep},
               counts=counts, member_cms=member_cms, trials=trials,
               handle=opening.handles[-1], alpha=alpha, beta=beta, best=best,
               alpha_sw=alpha_sw, chosen=chosen, single=single, grid=grid)


def remove_leftovers(out_dir: Path, *, file: Path, fingerprint: str) -> None:
    """What a killed search left in ``out_dir`` that no search resumes: its label records, the
    unfinished new study of other inputs than ``fingerprint``'s and the journal's lock files
    on work files (:func:`~pipeline.ensembling.study.leftovers`)."""
    for stale in out_dir.glob(f"{RECORDS}*"):  # label records of a search that was killed
        shutil.rmtree(stale, ignore_errors=True)
    for stale in leftovers(file, fingerprint):
        stale.unlink(missing_ok=True)


def fit_weights(source: OofSource, frames: Sequence[Frame], *, grouping: Grouping, fp: str,
                grid: tuple[list[float], list[float]], out_dir: Path, manifest: Path,
                classes: ClassInfo, full_size: bool, stride: int,
                run: Mapping[str, Any]) -> Fit:
    """The passes, the study and the table's rows of a search (see the module docstring), with
    the search lock held; a new study stays in its work file (``Fit.handle``) until the caller
    commits it. A search that fails removes the work file it created and its label records."""
    file = out_dir / STUDY_FILE
    remove_leftovers(out_dir, file=file, fingerprint=fp)
    # with workers, this process only waits during the grid pass: it opens the study then
    opening = StudyOpening(file=file, fingerprint=fp, background=run["workers"] > 1)
    record_dir = None
    try:
        cached = load_cache(out_dir / CACHE, fp)
        if cached is not None:
            print(f"{out_dir / CACHE}: inputs unchanged, reusing its scores")
            scored, cached_rows = cached, dict(cached[2])
        else:
            record_dir = Path(tempfile.mkdtemp(prefix=RECORDS, dir=out_dir))
            scored = grid_pass(
                source, frames, grouping=grouping, grid=grid, run=run,
                record_dir=record_dir, manifest=manifest,
                member_cms=meta_confusions(source.members, classes.num_classes)
                if full_size or stride == 1 else None, starting=opening.start)
        fit = best_fit(scored, source=source, frames=frames, grouping=grouping, opening=opening,
                       record_dir=record_dir, heatmap_path=out_dir / outputs.HEATMAP, run=run)
        if cached is None or cached_rows != fit.rows:
            save_cache(out_dir / CACHE, fp=fp, counts=fit.counts, table=fit.table,
                       rows=fit.rows, member_cms=fit.member_cms)
    except BaseException:
        opening.discard()  # a new study this search began: the earlier one stays
        raise
    finally:
        opening.close()
        if record_dir is not None:
            shutil.rmtree(record_dir, ignore_errors=True)
    return fit
