"""Hierarchical ensemble library: groups S/W/A, the one-pass grid scores, the Optuna study,
the table rows and the fusion of test maps that ``pipeline/ensemble.py`` runs.

See ``pipeline/ensemble.py`` for the method; the maths of fusion and the streaming passes
live in :mod:`pipeline.fusion`.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import json
import os
import re
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import joblib
import numpy as np

from pipeline import atomic, fusion
from pipeline.config import read_params
from pipeline.data.manifest import Frame, read_classes, read_manifest
from pipeline.errors import PipelineError, unknown_name
from pipeline.metrics import mean_iou
from pipeline.probstore import OOF_DIR, Member, list_members, map_path
from pipeline.runs import ModelParams

DEFAULT_GRID = {"start": 0.0, "stop": 2.0, "step": 0.1}
ROWS = ("best_single", "uniform_mean", "S", "S_W", "S_W_A")
CACHE, WEIGHTS, METRICS, MEMBERS, HEATMAP = ("grid_scores.npz", "weights.json", "metrics.json",
                                             "members.json", "heatmap.png")
CONFUSION = "confusion.json"  # {row: [C][C] OOF confusion matrix} of the table's rows (reports)
TEST_PRED = "test_pred"
RECORDS = ".grid_records-"   # temp folder prefix (under the output folder) of the label records


# ----------------------------------------------------------------------------- params
def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def parse_grid(value: Any, *, key: str, source: str = "params.yaml") -> list[float]:
    """Weights of one grid axis from a list or {start, stop, step}; sorted, >= 0, holding 0."""
    value = DEFAULT_GRID if value is None else value
    where = f"{source}: ensemble.{key}"
    if isinstance(value, dict):
        if set(value) != {"start", "stop", "step"}:
            raise PipelineError(f"{where} needs exactly start, stop and step, got {sorted(value)}")
        start, stop, step = (value[k] for k in ("start", "stop", "step"))
        if not all(_is_number(v) for v in (start, stop, step)) or step <= 0 or stop < start:
            raise PipelineError(f"{where}: need numbers with step > 0 and stop >= start, "
                                f"got {value}")
        count = int(np.floor((stop - start) / step + 1e-9)) + 1
        value = [round(start + i * step, 10) for i in range(count)]
    if not isinstance(value, (list, tuple)) or not value or not all(map(_is_number, value)):
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
    unknown = sorted(set(value) - set(fusion.GROUPS))
    if unknown:
        raise PipelineError(f"{where}: {unknown_name('group', str(unknown[0]), fusion.GROUPS)}")
    groups = {}
    for group in fusion.GROUPS:
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


# ----------------------------------------------------------------------------- inputs
def member_model(member: Member) -> str:
    """Model config name of a member: meta "model", else its name minus ``_s<seed>``."""
    meta = member.meta[member.folds[0]]
    return str(meta.get("model") or re.sub(r"_s\d+$", "", str(meta.get("member", member.name))))


def member_family(member: Member, families: Mapping[str, str], source: str) -> str:
    """Family from ``models.<model>.family`` of the params (the run's meta as a fallback)."""
    model = member_model(member)
    if model in families:
        return families[model]
    recorded = member.meta[member.folds[0]].get("family")
    if recorded:
        return str(recorded)
    raise PipelineError(f"{source}: member '{member.name}' needs models.{model}.family (model "
                        f"config '{model}' not found) for ensemble.groups: auto")


def oof_frames(members: Sequence[Member], frames: Sequence[Frame], manifest: Path) -> list[Frame]:
    """The labelled frames every member has an OOF map of, sorted by (video, frame, id)."""
    have = {m.name: set(m.oof_ids()) for m in members}
    union = set().union(*have.values())
    for member in members:
        missing = sorted(union - have[member.name])
        if missing:
            raise PipelineError(f"{member.root}: no out-of-fold map of frame '{missing[0]}' "
                                f"({len(missing)} of the {len(union)} frames other members "
                                f"cover); every member must cover the same frames")
    by_id = {f.id: f for f in frames}
    for frame_id in sorted(union):
        if frame_id not in by_id or not by_id[frame_id].mask:
            state = "is not in" if frame_id not in by_id else "has no mask in"
            raise PipelineError(f"{manifest}: out-of-fold frame '{frame_id}' {state} the manifest")
    return sorted((by_id[i] for i in union), key=lambda f: (f.video, f.frame, f.id))


def check_members(members: Sequence[Member], num_classes: int, classes_path: Path, *,
                  full_size: bool) -> int:
    """Class counts agree with classes.json; returns the common stride (1 with full_size)."""
    for member in members:
        if member.classes != num_classes:
            raise PipelineError(f"{member.root}: maps of {member.classes} classes, {classes_path} "
                                f"has {num_classes}")
    strides = {m.stride for m in members}
    if len(strides) > 1 and not full_size:
        listed = ", ".join(f"{m.name}={m.stride}" for m in members)
        raise PipelineError(f"members were stored at different strides ({listed}); set "
                            f"ensemble.full_size: true to score them at full resolution")
    return 1 if full_size else strides.pop()


def meta_confusions(members: Sequence[Member], num_classes: int) -> dict[str, np.ndarray] | None:
    """Each member's OOF confusion matrix summed over its runs' meta.json ("oof_cm_tta", which
    inference stores with the maps), or None when a run with OOF maps lacks a valid one."""
    out = {}
    for member in members:
        total = np.zeros((num_classes, num_classes), np.int64)
        for fold in {member.oof_fold(i) for i in member.oof_ids()}:
            try:
                cm = np.asarray(member.meta[fold].get("oof_cm_tta"), dtype=np.int64)
            except (TypeError, ValueError):
                return None
            if cm.shape != total.shape:
                return None
            total += cm
        out[member.name] = total
    return out


def _meta_digest(member: Member) -> str:
    text = json.dumps({str(f): member.meta[f] for f in member.folds}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def fingerprint(members: Sequence[Member], frames: Sequence[Frame], classes_path: Path,
                settings: Mapping[str, Any]) -> str:
    """sha256 of what the scores depend on: member metas, size and mtime of every OOF map and
    mask, classes.json and the search ``settings``."""
    digest = hashlib.sha256(json.dumps(
        {"settings": settings, "members": {m.name: _meta_digest(m) for m in members},
         "classes": hashlib.sha256(classes_path.read_bytes()).hexdigest()},
        sort_keys=True, default=str).encode())
    for frame in frames:
        paths = [map_path(m.run_dir(m.oof_fold(frame.id)) / OOF_DIR, frame.id) for m in members]
        for path in [*paths, Path(frame.mask)]:
            st = os.stat(path)
            digest.update(f"{path.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return digest.hexdigest()


def resolve_groups(explicit: Mapping[str, list[str]] | None, *, names: Sequence[str],
                   scores: Mapping[str, float], families: Mapping[str, str], primary_family: str,
                   n_strong: int, n_aux: int, source: str = "params.yaml") -> dict[str, list[str]]:
    """Groups S, W, A (each sorted by name). Explicit lists are checked against the members;
    ``auto`` ranks the primary family by OOF mIoU (top ``n_strong`` = S, rest = W) and puts the
    other families in A (the top ``n_aux`` only, when > 0)."""
    if explicit is not None:
        seen: dict[str, str] = {}
        for group, listed in explicit.items():
            for name in listed:
                if name not in names:
                    raise PipelineError(f"{source}: ensemble.groups.{group}: "
                                        f"{unknown_name('member', name, names)}")
                if name in seen:
                    raise PipelineError(f"{source}: ensemble.groups: member '{name}' is in both "
                                        f"{seen[name]} and {group}")
                seen[name] = group
        groups = {g: list(explicit.get(g, [])) for g in fusion.GROUPS}
        if not groups["S"]:
            raise PipelineError(f"{source}: ensemble.groups.S is empty; list at least one member")
    else:
        if n_strong < 1:
            raise PipelineError(f"{source}: ensemble.n_strong must be >= 1, got {n_strong}")
        ranked = sorted(names, key=lambda n: (-scores[n], n))
        primary = [n for n in ranked if families[n] == primary_family]
        aux = [n for n in ranked if families[n] != primary_family]
        groups = {"S": primary[:n_strong], "W": primary[n_strong:],
                  "A": aux[:n_aux] if n_aux > 0 else aux}
        if not groups["S"]:
            raise PipelineError(f"{source}: no member of family '{primary_family}' for group S "
                                f"(families found: {', '.join(sorted(set(families.values())))}); "
                                f"set ensemble.primary_family or ensemble.groups")
    return {g: sorted(groups[g]) for g in fusion.GROUPS}


# ----------------------------------------------------------------------------- Optuna study
STUDY_NAME = "ensemble"


def _grid_sampler(search_space: dict[str, list[float]]):
    import optuna

    class FastGridSampler(optuna.samplers.GridSampler):
        # GridSampler compares every finished trial's search space value by value after each
        # trial (O(trials^2 x grid): ~10 s for 21 x 21); plain list equality is the same test
        # for our NaN-free grids and keeps a study of 441 lookups well under a second.
        def _same_search_space(self, search_space) -> bool:  # noqa: ANN001
            return search_space == self._search_space or super()._same_search_space(search_space)

    return FastGridSampler(search_space, seed=0)


def _bulk_insert(storage, study_id: int, trials: Sequence) -> bool:
    """Insert finished ``trials`` into an RDB study in one transaction, row for row what
    ``Study.add_trials`` stores (numbers, states, times, params, values, attributes).

    ``add_trials`` goes through the ORM one trial at a time (~7 ms each, 3 s for a 21 x 21
    grid); this writes the same rows in ~0.1 s. It uses Optuna's table models, so it runs only
    on the schema version it was written for and returns False (nothing written) otherwise."""
    import json

    from optuna.distributions import distribution_to_json
    from optuna.storages import RDBStorage
    from optuna.storages._rdb import models

    rdb = getattr(storage, "_backend", storage)
    if not isinstance(rdb, RDBStorage) or models.SCHEMA_VERSION != 12 or any(
            t.values is None or len(t.values) != 1 or t.intermediate_values for t in trials):
        return False
    session = rdb.scoped_session()
    try:
        study = models.StudyModel.find_or_raise_by_id(study_id, session, for_update=True)
        number = session.query(models.TrialModel).filter(
            models.TrialModel.study_id == study_id).count()
        rows = []
        for k, t in enumerate(trials):
            value, kind = models.TrialValueModel.value_to_stored_repr(t.values[0])
            row = models.TrialModel(study_id=study.study_id, number=number + k, state=t.state,
                                    datetime_start=t.datetime_start,
                                    datetime_complete=t.datetime_complete)
            row.values = [models.TrialValueModel(objective=0, value=value, value_type=kind)]
            row.params = [models.TrialParamModel(
                param_name=name, param_value=t.distributions[name].to_internal_repr(v),
                distribution_json=distribution_to_json(t.distributions[name]))
                for name, v in t.params.items()]
            row.user_attributes = [models.TrialUserAttributeModel(key=key, value_json=json.dumps(v))
                                   for key, v in t.user_attrs.items()]
            row.system_attributes = [models.TrialSystemAttributeModel(key=key,
                                                                      value_json=json.dumps(v))
                                     for key, v in t.system_attrs.items()]
            rows.append(row)
        session.add_all(rows)
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
    return True


def add_trials(study, trials: Sequence) -> None:
    """``study.add_trials(trials)``, in one transaction where the storage allows it."""
    if not trials:
        return
    if not _bulk_insert(study._storage, study._study_id, trials):
        study.add_trials(trials)


def open_study(*, alphas: Sequence[float], betas: Sequence[float], db: Path,
               fingerprint: str) -> tuple[Any, list]:
    """(the study kept in SQLite at ``db`` for this grid, its complete trials): created, or
    loaded to resume; a study made from other inputs (fingerprint, grid) is replaced.

    Needs no score: :func:`search_ensemble` opens it while the grid pass runs."""
    import optuna
    from optuna.trial import TrialState

    space = {"alpha": [float(a) for a in alphas], "beta": [float(b) for b in betas]}
    storage = f"sqlite:///{db.resolve()}"
    db.parent.mkdir(parents=True, exist_ok=True)
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        try:
            stored = optuna.create_study(study_name=STUDY_NAME, storage=storage,
                                         direction="maximize", load_if_exists=True)
        except Exception as err:  # SQLAlchemy / Optuna errors of an unusable database file
            raise PipelineError(f"{db}: cannot open the Optuna study ({type(err).__name__}: "
                                f"{str(err).splitlines()[0] if str(err) else ''}); delete the file "
                                f"to start over") from None
        if stored.user_attrs.get("fingerprint") not in (None, fingerprint) \
                or stored.user_attrs.get("grid") not in (None, space):
            print(f"{db}: study '{STUDY_NAME}' was made from other inputs; starting it over")
            optuna.delete_study(study_name=STUDY_NAME, storage=storage)
            stored = optuna.create_study(study_name=STUDY_NAME, storage=storage,
                                         direction="maximize")
        for key, value in (("fingerprint", fingerprint), ("grid", space)):
            if stored.user_attrs.get(key) != value:  # each write is a commit (an fsync)
                stored.set_user_attr(key, value)
        return stored, stored.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    finally:
        optuna.logging.set_verbosity(verbosity)


def run_study(*, scores: Mapping[tuple[float, float], float], alphas: Sequence[float],
              betas: Sequence[float], db: Path, fingerprint: str,
              opened: tuple[Any, list] | None = None) -> list:
    """Grid-search (alpha, beta) with Optuna's GridSampler, the objective a lookup in
    ``scores``; the study is kept in SQLite at ``db`` and resumed: grid points already done are
    not repeated (see :func:`open_study`; ``opened``: what it returned for these arguments).
    Returns the study's complete trials.

    Trials run in memory and are then added to SQLite in one go: with SQLite as the live
    storage each trial costs ~60 ms of database round trips (30 s for 441 lookups).
    """
    import optuna
    from optuna.trial import TrialState

    stored, done = opened or open_study(alphas=alphas, betas=betas, db=db,
                                        fingerprint=fingerprint)
    space = {"alpha": [float(a) for a in alphas], "beta": [float(b) for b in betas]}
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.create_study(direction="maximize", sampler=_grid_sampler(space))
        study.add_trials(done)
        todo = len(space["alpha"]) * len(space["beta"]) - len(
            {(t.params.get("alpha"), t.params.get("beta")) for t in done})
        if todo > 0:
            lo_a, hi_a, lo_b, hi_b = alphas[0], alphas[-1], betas[0], betas[-1]

            def objective(trial) -> float:  # noqa: ANN001
                return scores[(trial.suggest_float("alpha", lo_a, hi_a),
                               trial.suggest_float("beta", lo_b, hi_b))]

            study.optimize(objective, n_trials=todo)
            add_trials(stored, study.trials[len(done):])
    finally:
        optuna.logging.set_verbosity(verbosity)
    # what is stored now: the trials read at the start and those just added (no re-read)
    return [*done, *(t for t in study.trials[len(done):] if t.state == TrialState.COMPLETE)]


def best_point(points: Sequence[tuple[float, float, float]]) -> tuple[float, float, float]:
    """(alpha, beta, score) of the best score; ties go to the smallest alpha + beta, then
    alpha (the simplest ensemble)."""
    return min(points, key=lambda p: (-p[2], p[0] + p[1], p[0], p[1]))


# ----------------------------------------------------------------------------- outputs
def plot_heatmap(path: Path, miou: np.ndarray, alphas: Sequence[float], betas: Sequence[float],
                 best: tuple[float, float]) -> None:
    """OOF mIoU (%) over the grid (rows alpha, columns beta), best point marked; atomic PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5.5))
    im = ax.imshow(100 * miou, origin="lower", aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(betas)), [f"{b:g}" for b in betas], rotation=90, fontsize=7)
    ax.set_yticks(range(len(alphas)), [f"{a:g}" for a in alphas], fontsize=7)
    ax.set_xlabel("beta (weight of P_A)")
    ax.set_ylabel("alpha (weight of P_W)")
    i, j = list(alphas).index(best[0]), list(betas).index(best[1])
    ax.plot(j, i, marker="*", color="red", markersize=14, markeredgecolor="white")
    ax.set_title(f"OOF mIoU of P_S + alpha P_W + beta P_A; best {100 * miou[i, j]:.2f} "
                 f"at alpha={best[0]:g}, beta={best[1]:g}", fontsize=9)
    fig.colorbar(im, ax=ax, label="mIoU %")
    fig.tight_layout()
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def _num(value: float) -> float | None:
    return None if value is None or not np.isfinite(value) else float(value)


def save_cache(path: Path, *, fp: str, counts: fusion.GridCounts, table: Mapping[str, tuple],
               rows: Mapping[str, fusion.MeanRow | fusion.FusedRow],
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


def load_cache(path: Path, fp: str) -> tuple[fusion.GridCounts, dict, dict, dict] | None:
    """(counts, table, rows, member_cms) of :func:`save_cache` when made from the same inputs
    (and by this version), else None."""
    try:
        with np.load(path) as data:
            if str(data["fingerprint"]) != fp:
                return None
            counts = fusion.GridCounts(data["alphas"], data["betas"], data["tp"], data["pred"],
                                       data["gt"])
            doc = json.loads(str(data["table"]))
        entries, member_cms = doc["rows"], doc["member_cms"]
        rows = {key: fusion.MeanRow(tuple(e["row"]["members"])) if "members" in e["row"]
                else fusion.FusedRow(**e["row"]) for key, e in entries.items()}
        table = {key: (np.asarray(e["cm"], np.int64), {int(n): v for n, v in e["vc"].items()})
                 for key, e in entries.items()}
        member_cms = {n: np.asarray(cm, np.int64) for n, cm in member_cms.items()}
    except (OSError, KeyError, ValueError, TypeError, AttributeError):
        return None
    return counts, table, rows, member_cms


def pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def format_table(metrics: Mapping[str, Any]) -> str:
    """The ensemble table (percent) of a metrics.json dict."""
    lines = [f"{'OOF':<14} {'mIoU %':>7} {'mVC8 %':>7} {'mVC16 %':>7}"]
    for row in ROWS:
        lines.append(f"{row:<14} {pct(metrics[f'{row}_mIoU']):>7} "
                     f"{pct(metrics[f'{row}_mVC8']):>7} {pct(metrics[f'{row}_mVC16']):>7}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- search
def check_meta_confusions(member_cms: Mapping[str, np.ndarray], *, gt_counts: np.ndarray,
                          scored: Mapping[str, np.ndarray], roots: Mapping[str, Path]) -> None:
    """The members' stored OOF confusion matrices (meta.json "oof_cm_tta") against the maps:
    every one must count the ground truth the pass counted (``gt_counts`` int [C], its row
    sums), and those the pass ``scored`` ({name: cm}) must equal them."""
    for name, cm in member_cms.items():
        if not np.array_equal(cm.sum(axis=1), gt_counts) or (
                name in scored and not np.array_equal(cm, scored[name])):
            raise PipelineError(f"{roots[name]}: the confusion matrix in its meta.json "
                                f"(oof_cm_tta) disagrees with its OOF maps; re-run its inference")


def best_member(member_cms: Mapping[str, np.ndarray]) -> str:
    """The member of the highest OOF mIoU (ties: the first name)."""
    return min(member_cms, key=lambda n: (-mean_iou(member_cms[n]), n))


def _member_rows(names: Sequence[str]) -> dict[str, fusion.MeanRow]:
    return {f"member:{n}": fusion.MeanRow((n,)) for n in names}


def _grid_pass(source: fusion.OofSource, frames: Sequence[Frame], *,
               member_cms: Mapping[str, np.ndarray] | None, auto_groups: bool, grouping,
               grid: tuple[list[float], list[float]], record_dir: Path, run: Mapping[str, Any],
               manifest: Path, starting=lambda grid: None) -> tuple[fusion.GridCounts, dict,
                                                                   dict, dict]:
    """The read passes: (counts, table, rows, member_cms). ``member_cms``: the members'
    stored confusion matrices (meta.json), checked against the maps here, else None: auto
    groups then rank the members in a pass of their own first, explicit ones score them in
    the grid pass. Of the members' rows (confusion matrix and video consistency) only the
    best member's is needed; the grid pass leaves its label records in ``record_dir``.
    ``starting(grid)`` is called as the grid pass starts, with the grid it scores."""
    names = [m.name for m in source.members]
    rows: dict = {}
    table: dict = {}
    if member_cms is not None:
        grid_rows = _member_rows([best_member(member_cms)])
    elif auto_groups:
        rows = _member_rows(names)
        _, table = fusion.score_pass(source, frames, rows=rows, desc="rank members", **run)
        member_cms, grid_rows = {n: table[f"member:{n}"][0] for n in names}, {}
    else:
        grid_rows = _member_rows(names)
    grid_rows["uniform_mean"] = fusion.MeanRow(tuple(names))
    chosen = grouping(member_cms)
    grid = (grid[0] if chosen["W"] else [0.0], grid[1] if chosen["A"] else [0.0])
    starting(grid)
    counts, scored = fusion.score_pass(source, frames, rows=grid_rows, groups=chosen,
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


def _fused_rows_and_heatmap(point: tuple[float, float], *, alpha_sw: float, rows: dict,
                            table: dict, record_dir: Path | None, heatmap: Path,
                            miou: np.ndarray, grid: tuple[list[float], list[float]],
                            num_classes: int, ignore_index: int, workers: int, fallback,
                            meanwhile=lambda: None):  # noqa: ANN001, ANN202
    """Render the heatmap and add the fused rows S, S_W, S_W_A (best ``point``) to ``rows``
    and ``table``, on the workers while ``meanwhile()`` runs here; returns its result.

    The rows' video consistency needs their label maps: they are rebuilt from the grid
    pass's records (no map is read again), else ``fallback(rows)`` scores them in a pass."""
    fused = {"S": fusion.FusedRow(0.0, 0.0), "S_W": fusion.FusedRow(alpha_sw, 0.0),
             "S_W_A": fusion.FusedRow(*point)}
    todo = {key: row for key, row in fused.items() if rows.get(key) != row}
    tasks = [joblib.delayed(plot_heatmap)(heatmap, miou, *grid, point)]
    if todo and record_dir is not None:
        tasks += fusion.fused_rows_tasks(record_dir, rows=todo, num_classes=num_classes,
                                         ignore_index=ignore_index)
    # the workers are warm only after a grid pass in this process
    pending = joblib.Parallel(n_jobs=workers if record_dir is not None else 1,
                              return_as="generator")(tasks)
    try:
        value = meanwhile()
    finally:
        _, *tables = pending  # the tasks end either way: no generator is left running
    if tables:
        table.update(fusion.merge_rows(tables, rows=todo, num_classes=num_classes))
    elif todo:
        table.update(fallback(todo))
    rows.update(fused)
    return value


def _test_kill_point(name: str) -> None:
    """Test hook: SIGKILL this process at point ``name`` when SEGPIPE_TEST_KILL_AT says so
    (the kill -9 resume test of the search)."""
    if os.environ.get("SEGPIPE_TEST_KILL_AT") == name:
        os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))


def search_ensemble(*, oof_root: Path, data_dir: Path, out_dir: Path,
                    groups: Mapping[str, list[str]] | None = None,
                    families: Mapping[str, str] | None = None, primary_family: str = "primary",
                    n_strong: int = 3, n_aux: int = 0, alphas: Sequence[float] | None = None,
                    betas: Sequence[float] | None = None, full_size: bool = False,
                    workers: int = 1, chunk_frames: int = 32, progress: bool = True,
                    params_source: str = "params.yaml") -> dict:
    """Fit the group weights on the OOF maps under ``oof_root`` and write the outputs to
    ``out_dir`` (see the module docstring). ``groups``: explicit {S, W, A} lists or None for
    automatic ones; ``families``: {model config: family} (needed by auto groups);
    ``alphas``/``betas``: grid weights (default 0..2 step 0.1).
    Returns {"weights": ..., "metrics": ..., "members": ...} as written."""
    alphas = parse_grid(alphas, key="alpha_grid", source=params_source)
    betas = parse_grid(betas, key="beta_grid", source=params_source)
    members = list_members(oof_root)
    names = [m.name for m in members]
    by_name = dict(zip(names, members))
    classes_path, manifest = data_dir / "classes.json", data_dir / "manifest.csv"
    classes = read_classes(classes_path)
    stride = check_members(members, classes.num_classes, classes_path, full_size=full_size)
    frames = oof_frames(members, read_manifest(manifest), manifest)
    fam = {m.name: _family_or_none(m, families or {}, params_source, required=groups is None)
           for m in members}
    settings = {"groups": groups, "families": None if groups else fam, "alphas": alphas,
                "primary_family": primary_family, "n_strong": n_strong, "n_aux": n_aux,
                "betas": betas, "full_size": full_size, "frames": [f.id for f in frames]}
    fp = fingerprint(members, frames, classes_path, settings)
    source = fusion.OofSource(members=tuple(members), lut=classes.lut_array(),
                              num_classes=classes.num_classes, stride=stride,
                              full_size=full_size, ignore_index=classes.ignore_index)
    run = {"workers": workers, "chunk_frames": chunk_frames, "progress": progress}

    def grouping(cms: Mapping[str, np.ndarray] | None) -> dict[str, list[str]]:
        scores = {n: mean_iou(cms[n]) for n in names} if cms is not None else {}
        return resolve_groups(groups, names=names, scores=scores, families=fam,
                              primary_family=primary_family, n_strong=n_strong, n_aux=n_aux,
                              source=params_source)

    for stale in out_dir.glob(f"{RECORDS}*"):  # label records of a search that was killed
        shutil.rmtree(stale, ignore_errors=True)
    record_dir = None
    # with workers, this process only waits during the grid pass: it opens the study then
    background = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    opening: dict[tuple, concurrent.futures.Future] = {}

    def open_meanwhile(grid: tuple[list[float], list[float]]) -> None:
        if workers > 1:
            opening[tuple(map(tuple, grid))] = background.submit(
                open_study, alphas=grid[0], betas=grid[1], db=out_dir / "study.db",
                fingerprint=fp)

    try:
        cached = load_cache(out_dir / CACHE, fp)
        if cached is not None:
            counts, table, rows, member_cms = cached
            print(f"{out_dir / CACHE}: inputs unchanged, reusing its scores")
            cached_rows = dict(rows)
        else:
            out_dir.mkdir(parents=True, exist_ok=True)
            record_dir = Path(tempfile.mkdtemp(prefix=RECORDS, dir=out_dir))
            counts, table, rows, member_cms = _grid_pass(
                source, frames, grouping=grouping, grid=(alphas, betas), run=run,
                record_dir=record_dir, manifest=manifest, auto_groups=groups is None,
                member_cms=meta_confusions(members, classes.num_classes)
                if full_size or stride == 1 else None, starting=open_meanwhile)
            _test_kill_point("pass")
        chosen = grouping(member_cms)
        grid_a, grid_b = [float(a) for a in counts.alphas], [float(b) for b in counts.betas]
        miou = counts.miou()
        scores = {(a, b): float(miou[i, j])
                  for i, a in enumerate(grid_a) for j, b in enumerate(grid_b)}
        alpha_sw = best_point([(a, 0.0, scores[(a, 0.0)]) for a in grid_a])[0]
        finish = functools.partial(
            _fused_rows_and_heatmap, alpha_sw=alpha_sw, rows=rows, table=table,
            record_dir=record_dir, heatmap=out_dir / HEATMAP, miou=miou, grid=(grid_a, grid_b),
            num_classes=classes.num_classes, ignore_index=classes.ignore_index,
            workers=workers, fallback=lambda todo: fusion.score_pass(
                source, frames, rows=todo, groups=chosen, desc="fused rows", **run)[1])

        def study() -> list:
            opened = opening.get((tuple(grid_a), tuple(grid_b)))
            trials = run_study(scores=scores, alphas=grid_a, betas=grid_b,
                               db=out_dir / "study.db", fingerprint=fp,
                               opened=opened.result() if opened else None)
            _test_kill_point("study")
            return trials

        # the study looks every grid point up, so its best point is known before it runs:
        # the work that needs it runs on the workers meanwhile
        alpha, beta, best = best_point([(a, b, s) for (a, b), s in scores.items()])
        trials = finish((alpha, beta), meanwhile=study)
        found = best_point([(t.params["alpha"], t.params["beta"], t.value) for t in trials])
        if found != (alpha, beta, best):  # a resumed study that holds other values decides
            alpha, beta, best = found
            finish((alpha, beta))
        for key in ("S", "S_W", "S_W_A"):  # the grid pass and the plain fusion agree exactly
            if mean_iou(table[key][0]) != scores[(rows[key].alpha, rows[key].beta)]:
                raise RuntimeError(f"internal: the grid's mIoU of row {key} differs from its "
                                   f"fusion")
        single = best_member(member_cms)
        keep = (f"member:{single}", "uniform_mean", "S", "S_W", "S_W_A")
        table, rows = {k: table[k] for k in keep}, {k: rows[k] for k in keep}
        if cached is None or cached_rows != rows:
            save_cache(out_dir / CACHE, fp=fp, counts=counts, table=table, rows=rows,
                       member_cms=member_cms)
    finally:
        background.shutdown()
        if record_dir is not None:
            shutil.rmtree(record_dir, ignore_errors=True)

    member_miou = {n: mean_iou(member_cms[n]) for n in names}
    table["best_single"] = table[f"member:{single}"]
    metrics: dict[str, Any] = {"frames": len(frames), "members": len(names), "alpha": alpha,
                               "beta": beta, "alpha_S_W": alpha_sw}
    for key in ROWS:
        cm, vc = table[key]
        metrics[f"{key}_mIoU"] = _num(mean_iou(cm))
        metrics.update({f"{key}_mVC{n}": _num(vc.get(n)) for n in (8, 16)})
    group_of = {n: g for g, listed in chosen.items() for n in listed}
    member_table = {n: {"model": member_model(by_name[n]), "family": fam[n],
                        "group": group_of.get(n), "oof_mIoU": _num(member_miou[n])}
                    for n in sorted(names, key=lambda n: (-member_miou[n], n))}
    weights = {"groups": chosen, "alpha": alpha, "beta": beta, "oof_mIoU": best,
               "grid": {"alpha": grid_a, "beta": grid_b}, "classes": classes.num_classes,
               "frames": len(frames), "fingerprint": fp,
               "members": {n: {"group": group_of[n], "oof_mIoU": _num(member_miou[n]),
                               "meta_sha": _meta_digest(by_name[n])} for n in sorted(group_of)},
               "study": {"storage": f"sqlite:///{(out_dir / 'study.db').as_posix()}",
                         "name": STUDY_NAME, "trials": len(trials)}}
    atomic.write_json(out_dir / MEMBERS, member_table)
    atomic.write_json(out_dir / CONFUSION, {key: np.asarray(table[key][0]).tolist() for key in ROWS})
    atomic.write_json(out_dir / METRICS, metrics)
    atomic.write_json(out_dir / WEIGHTS, weights)
    return {"weights": weights, "metrics": metrics, "members": member_table}


def _family_or_none(member: Member, families: Mapping[str, str], source: str, *,
                    required: bool) -> str | None:
    try:
        return member_family(member, families, source)
    except PipelineError:
        if required:
            raise
        return None


# ----------------------------------------------------------------------------- apply
def read_weights(path: Path) -> dict:
    """weights.json of a search, its keys checked."""
    if not path.is_file():
        raise PipelineError(f"{path}: weights not found (run `python pipeline/ensemble.py "
                            f"--search` first)")
    try:
        weights = json.loads(path.read_text())
        groups = {g: [str(n) for n in weights["groups"].get(g, [])] for g in fusion.GROUPS}
        alpha, beta = float(weights["alpha"]), float(weights["beta"])
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise PipelineError(f"{path}: corrupt weights file ({type(err).__name__}: {err})") from None
    listed = [n for g in fusion.GROUPS for n in groups[g]]
    if not groups["S"] or alpha < 0 or beta < 0 or len(set(listed)) != len(listed):
        raise PipelineError(f"{path}: needs a non-empty group S, each member in one group only "
                            f"and weights >= 0")
    return {**weights, "groups": groups, "alpha": alpha, "beta": beta}


def _apply_chunk(frames: list[Frame], *, groups: Mapping[str, list[Member]], alpha: float,
                 beta: float, num_classes: int, out: Path) -> int:
    from PIL import Image

    for frame in frames:
        want = (num_classes, frame.height, frame.width) if frame.height and frame.width else None
        means = {}
        for group in fusion.GROUPS:
            mean = fusion.Mean()
            for member in groups[group]:
                probs = member.read_test(frame.id, full_size=True)
                want = want or probs.shape
                if probs.shape != want:
                    raise PipelineError(f"{member.root}: test map of frame '{frame.id}' is "
                                        f"{list(probs.shape)} [C, H, W], expected {list(want)}")
                mean.add(probs)
            means[group] = mean.value()
        labels = fusion.fuse_labels(means["S"], means["W"], means["A"], alpha=alpha, beta=beta)
        Image.fromarray(labels.astype(np.uint8), mode="L").save(out / f"{frame.id}.png")
    return len(frames)


def apply_ensemble(*, oof_root: Path, data_dir: Path, out_dir: Path, workers: int = 1,
                   chunk_frames: int = 32, progress: bool = True) -> dict:
    """Fuse the test maps (each member: mean of its fold models, full resolution) with
    ``out_dir/weights.json`` into ``out_dir/test_pred/<id>.png`` (uint8 train ids, one per
    test frame of the manifest), written as a whole folder. Returns a small summary."""
    weights = read_weights(out_dir / WEIGHTS)
    by_name = {m.name: m for m in list_members(oof_root)}
    classes_path, manifest = data_dir / "classes.json", data_dir / "manifest.csv"
    classes = read_classes(classes_path)
    if classes.num_classes > 255:
        raise PipelineError(f"{classes_path}: {classes.num_classes} classes do not fit uint8 PNGs")
    groups: dict[str, list[Member]] = {}
    for group, listed in weights["groups"].items():
        for name in listed:
            if name not in by_name:
                raise PipelineError(f"{out_dir / WEIGHTS}: member '{name}' of group {group} is "
                                    f"not in {oof_root}")
        groups[group] = [by_name[n] for n in sorted(listed)]
    members = [m for g in fusion.GROUPS for m in groups[g]]
    check_members(members, classes.num_classes, classes_path, full_size=True)
    recorded = weights.get("members") if isinstance(weights.get("members"), dict) else {}
    changed = [m.name for m in members
               if (recorded.get(m.name) or {}).get("meta_sha", _meta_digest(m)) != _meta_digest(m)]
    if changed:
        print(f"warning: {', '.join(changed)} changed since the search (meta.json differs); "
              f"the weights were fitted on older maps", file=sys.stderr)
    frames = sorted(read_manifest(manifest, split="test"), key=lambda f: (f.video, f.frame, f.id))
    if not frames:
        raise PipelineError(f"{manifest}: no test frames to predict")
    for member in members:
        have = set(member.test_ids())
        missing = [f.id for f in frames if f.id not in have]
        if missing:
            raise PipelineError(f"{member.root}: no test map of frame '{missing[0]}' "
                                f"({len(missing)} of {len(frames)} test frames missing)")
    with atomic.atomic_dir(out_dir / TEST_PRED) as tmp:
        fn = functools.partial(_apply_chunk, groups=groups, alpha=weights["alpha"],
                               beta=weights["beta"], num_classes=classes.num_classes, out=tmp)
        for _ in fusion.run_chunks(fn, fusion.frame_chunks(frames, chunk_frames), workers=workers,
                                   progress=progress, desc="fuse test"):
            pass
    return {"frames": len(frames), "out": str(out_dir / TEST_PRED), "alpha": weights["alpha"],
            "beta": weights["beta"], "groups": weights["groups"]}


# ----------------------------------------------------------------------------- CLI
