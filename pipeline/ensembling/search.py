"""Hierarchical ensemble library: groups S/W/A, the one-pass grid scores, the Optuna study,
the table rows and the fusion of test maps that ``pipeline/ensemble.py`` runs.

See ``pipeline/ensemble.py`` for the method; the maths of fusion and the streaming passes
live in :mod:`pipeline.ensembling.fusion`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import hashlib
import itertools
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import joblib
import numpy as np

from pipeline.core import atomic
from pipeline.ensembling import fusion
from pipeline.core.params import read_params
from pipeline.data.manifest import Frame, read_classes, read_manifest
from pipeline.core.errors import PipelineError, unknown_name
from pipeline.evaluation.metrics import mean_iou
from pipeline.inference.probstore import OOF_DIR, Member, list_members, map_path, member_names
from pipeline.core.names import (ALL_FOLDS, BEST_SINGLE, ENSEMBLE_ROWS, MAP_META_FILE, METRICS_FILE, UNIFORM_MEAN, fold_dir_name, member_name)
from pipeline.core.runs import ModelParams, load_train_params
from pipeline.data.splits import read_folds

DEFAULT_GRID = {"start": 0.0, "stop": 2.0, "step": 0.1}
CACHE, WEIGHTS, METRICS, MEMBERS, HEATMAP = ("grid_scores.npz", "weights.json", METRICS_FILE,
                                             "members.json", "heatmap.png")
CONFUSION = "confusion.json"  # {row: [C][C] OOF confusion matrix} of the table's rows (reports)
TEST_PRED = "test_pred"
RECORDS = ".grid_records-"   # temp folder prefix (under the output folder) of the label records
STUDY_DB = "study.db"
LOCK = ".search.lock"        # held (fcntl.flock) by the search that writes the output folder
FALLBACKS = (BEST_SINGLE, "none")


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


# ----------------------------------------------------------------------------- inputs
def select_members(oof_root: Path, wanted: Sequence[str] | None, *,
                   source: str = "params.yaml") -> tuple[list[Member], list[str]]:
    """(the members ``wanted`` (all found: None), the names of the other members found under
    ``oof_root``, which are ignored). A wanted member without maps is an error naming it."""
    found = member_names(oof_root)
    if wanted is None:
        return list_members(oof_root), []
    missing = [name for name in wanted if name not in found]
    if missing:
        more = f" (also missing: {', '.join(missing[1:])})" if missing[1:] else ""
        raise PipelineError(f"{oof_root / missing[0]}: no maps of member '{missing[0]}', which "
                            f"{source} defines (train.models x train.seeds, train.students x "
                            f"train.student_seeds){more}; run its inference or drop it there")
    return list_members(oof_root, wanted), [name for name in found if name not in wanted]


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


def check_oof_coverage(frames: Sequence[Frame], train_ids: Mapping[str, int | None], *,
                       where: Path, allow_partial: bool) -> dict[str, Any]:
    """How the OOF ``frames`` cover the train frames ``train_ids`` ({id: fold}, the folds file's;
    fold None when only the manifest is known, ``where``): {"oof_frames", "oof_frames_missing",
    "partial", "missing_folds": {fold: frames missing}}. A fit on part of the train frames (a
    fold not trained or not inferred yet) is refused unless ``allow_partial``."""
    covered = {f.id for f in frames}
    extra = sorted(covered - set(train_ids))
    if extra:
        raise PipelineError(f"{where}: out-of-fold frame '{extra[0]}' is not one of its train "
                            f"frames ({len(extra)} such); the maps were made with another split")
    missing = sorted(set(train_ids) - covered)
    per_fold = collections.Counter(train_ids[i] for i in missing)
    totals = collections.Counter(train_ids.values())
    info = {"oof_frames": len(covered), "oof_frames_missing": len(missing),
            "partial": bool(missing),
            "missing_folds": {str(k): per_fold[k] for k in sorted(per_fold, key=str)
                              if k is not None}}
    if missing and not allow_partial:
        folds = "; ".join(f"fold {k}: {per_fold[k]} of its {totals[k]}"
                          for k in sorted(per_fold, key=str) if k is not None)
        raise PipelineError(f"{where}: the members' out-of-fold maps cover {len(covered)} of its "
                            f"{len(train_ids)} train frames, {len(missing)} missing "
                            f"({folds or f'first {missing[0]!r}'}); run the missing folds' "
                            f"training and inference, or set ensemble.allow_partial: true to "
                            f"fit on the covered frames only")
    return info


def check_members(members: Sequence[Member], num_classes: int, classes_path: Path, *,
                  full_size: bool, class_names: Sequence[str] | None = None) -> int:
    """Class counts (and, given ``class_names``, the names each run's meta.json records, in
    order) agree with classes.json; returns the common stride (1 with full_size)."""
    for member in members:
        if member.classes != num_classes:
            raise PipelineError(f"{member.root}: maps of {member.classes} classes, {classes_path} "
                                f"has {num_classes}")
        for fold in member.folds if class_names is not None else ():
            meta = member.run_dir(fold) / MAP_META_FILE
            names = member.meta[fold].get("class_names")
            if not isinstance(names, list):
                raise PipelineError(f"{meta}: no class_names to check against {classes_path} "
                                    f"(maps made before inference recorded them); re-run the "
                                    f"inference of member '{member.name}'")
            if [str(n) for n in names] != [str(n) for n in class_names]:
                k = next(i for i, (a, b) in enumerate(itertools.zip_longest(
                    map(str, names), map(str, class_names))) if a != b)
                raise PipelineError(f"{meta}: member '{member.name}' was predicted with class "
                                    f"{k} = '{names[k]}' but {classes_path} has '{class_names[k]}' "
                                    f"(classes reordered or renamed); re-run its inference")
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


@dataclasses.dataclass
class OpenStudy:
    """A study opened for one grid: ``study`` (Optuna's handle), ``done`` (its complete trials
    when opened), and where it lives: ``path`` is ``db`` itself (a kept study of the same
    inputs, resumed in place) or a work file beside it (:func:`work_path`) that replaces ``db``
    once complete (:meth:`commit`), so a search that fails or is killed never empties the
    study an earlier search left. ``created``: this process made the work file."""

    study: Any
    done: list
    db: Path
    path: Path
    created: bool = False

    def commit(self) -> bool:
        """Move the work file onto ``db`` (atomic); True when it replaced or created ``db``."""
        if self.path == self.db:
            return False
        os.replace(self.path, self.db)
        self.path = self.db
        return True

    def discard(self) -> None:
        """Remove the work file this process created (a search that failed)."""
        if self.path != self.db and self.created:
            self.path.unlink(missing_ok=True)


def work_path(db: Path, fingerprint: str) -> Path:
    """The work file of a new study of inputs ``fingerprint`` beside ``db``: a search killed
    while building it resumes it."""
    return db.parent / f".{db.name}.{fingerprint[:16]}.tmp"


def _study_error(db: Path, err: Exception) -> PipelineError:
    first = str(err).splitlines()[0] if str(err) else ""
    if "locked" in str(err).lower():  # another process holds it: never advise deleting it
        return PipelineError(f"{db}: the Optuna study is locked by another process (an Optuna "
                             f"tool or dashboard reading it?); try again when it is done "
                             f"({type(err).__name__}: {first})")
    return PipelineError(f"{db}: cannot open the Optuna study ({type(err).__name__}: {first}); "
                         f"delete the file to start over")


def open_study(*, alphas: Sequence[float], betas: Sequence[float], db: Path,
               fingerprint: str) -> OpenStudy:
    """The study for this grid and these inputs: the one kept in SQLite at ``db`` when it was
    made from them (resumed in place), else a new one (or one a killed search left) in its work
    file beside ``db``, which is only read. See :class:`OpenStudy`.

    Needs no score: :func:`search_ensemble` opens it while the grid pass runs."""
    import optuna
    from optuna.trial import TrialState

    space = {"alpha": [float(a) for a in alphas], "beta": [float(b) for b in betas]}
    attrs = (("fingerprint", fingerprint), ("grid", space))
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    def complete(stored) -> list:  # noqa: ANN001
        return stored.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))

    def adopt(stored) -> None:  # noqa: ANN001
        for key, value in attrs:
            if stored.user_attrs.get(key) != value:  # each write is a commit (an fsync)
                stored.set_user_attr(key, value)

    try:
        if db.exists():
            try:
                kept = optuna.load_study(study_name=STUDY_NAME,
                                         storage=f"sqlite:///{db.resolve()}")
            except KeyError:  # a database without our study: replaced once ours is complete
                kept = None
            except Exception as err:  # SQLAlchemy / Optuna errors of an unusable database file
                raise _study_error(db, err) from None
            if kept is not None and all(kept.user_attrs.get(k) in (None, v) for k, v in attrs):
                adopt(kept)
                return OpenStudy(kept, complete(kept), db=db, path=db)
        work = work_path(db, fingerprint)
        created = not work.exists()
        db.parent.mkdir(parents=True, exist_ok=True)
        storage = f"sqlite:///{work.resolve()}"
        try:
            stored = optuna.create_study(study_name=STUDY_NAME, storage=storage,
                                         direction="maximize", load_if_exists=True)
            if any(stored.user_attrs.get(k) not in (None, v) for k, v in attrs):
                optuna.delete_study(study_name=STUDY_NAME, storage=storage)
                stored = optuna.create_study(study_name=STUDY_NAME, storage=storage,
                                             direction="maximize")
        except Exception as err:
            raise _study_error(work, err) from None
        adopt(stored)
        return OpenStudy(stored, complete(stored), db=db, path=work, created=created)
    finally:
        optuna.logging.set_verbosity(verbosity)


def run_study(*, scores: Mapping[tuple[float, float], float], alphas: Sequence[float],
              betas: Sequence[float], db: Path, fingerprint: str,
              opened: OpenStudy | None = None, commit: bool = True) -> list:
    """Record the (alpha, beta) grid in an Optuna study: one complete trial per grid point, its
    value the exact score of ``scores``; the study is kept in SQLite at ``db`` and resumed:
    grid points already stored are not added again (see :func:`open_study`; ``opened``: what
    it returned for these arguments). ``commit``: move a new study onto ``db`` once complete
    (else the caller does, see :meth:`OpenStudy.commit`). Returns the study's complete trials.

    Every point is scored exactly by the grid pass, so the trials are made with
    ``optuna.trial.create_trial`` in grid order (what a ``GridSampler`` would visit, without
    its per-trial search-space checks) and stored with ``Study.add_trials``: public APIs only.
    """
    import optuna
    from optuna.distributions import FloatDistribution
    from optuna.trial import create_trial

    opened = opened or open_study(alphas=alphas, betas=betas, db=db, fingerprint=fingerprint)
    stored, done = opened.study, opened.done
    have = {(t.params.get("alpha"), t.params.get("beta")) for t in done}
    space = {"alpha": FloatDistribution(float(alphas[0]), float(alphas[-1])),
             "beta": FloatDistribution(float(betas[0]), float(betas[-1]))}
    new = [create_trial(params={"alpha": float(a), "beta": float(b)}, distributions=space,
                        value=float(scores[(a, b)]))
           for a in alphas for b in betas if (float(a), float(b)) not in have]
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        stored.add_trials(new)
    finally:
        optuna.logging.set_verbosity(verbosity)
    if commit:
        opened.commit()
    return [*done, *new]  # what is stored now (no re-read)


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
    for row in ENSEMBLE_ROWS:
        lines.append(f"{row:<14} {pct(metrics[f'{row}_mIoU']):>7} "
                     f"{pct(metrics[f'{row}_mVC8']):>7} {pct(metrics[f'{row}_mVC16']):>7}")
    if metrics.get("partial"):
        folds = ", ".join(f"fold {k}: {n}" for k, n in (metrics.get("missing_folds") or {}).items())
        lines.append(f"partial: fitted on {metrics['oof_frames']} of the "
                     f"{metrics['oof_frames'] + metrics['oof_frames_missing']} train frames "
                     f"({metrics['oof_frames_missing']} missing{': ' + folds if folds else ''}; "
                     f"ensemble.allow_partial)")
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
    grid_rows[UNIFORM_MEAN] = fusion.MeanRow(tuple(names))
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


@contextlib.contextmanager
def search_lock(out_dir: Path) -> Iterator[Path]:
    """Hold ``out_dir/.search.lock`` (``fcntl.flock``, released by the kernel if the holder
    dies) while a search writes ``out_dir``: its study, records and outputs. The file holds
    the holder's pid and start time, and is removed at release; a second search finds it held
    and stops with one line saying who holds it."""
    import fcntl

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / LOCK
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 256).decode("utf-8", "replace").strip() or "pid not written yet"
            os.close(fd)
            raise PipelineError(f"{path}: another search is writing {out_dir} ({holder}); "
                                f"wait for it to end") from None
        try:  # the holder before us may have removed the file as we opened it: open anew
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
                 .encode())
        yield path
    finally:
        path.unlink(missing_ok=True)  # while held: an opener that waits re-checks the inode
        os.close(fd)


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


def search_ensemble(*, oof_root: Path, data_dir: Path, out_dir: Path,
                    groups: Mapping[str, list[str]] | None = None,
                    families: Mapping[str, str] | None = None, primary_family: str = "primary",
                    n_strong: int = 3, n_aux: int = 0, alphas: Sequence[float] | None = None,
                    betas: Sequence[float] | None = None, full_size: bool = False,
                    workers: int = 1, chunk_frames: int = 32, progress: bool = True,
                    params_source: str = "params.yaml", members: Sequence[str] | None = None,
                    folds_path: Path | None = None, allow_partial: bool = False,
                    fallback: str = BEST_SINGLE, full_data_weight: float = 0.0) -> dict:
    """Fit the group weights on the OOF maps under ``oof_root`` and write the outputs to
    ``out_dir`` (see the module docstring). ``groups``: explicit {S, W, A} lists or None for
    automatic ones; ``families``: {model config: family} (needed by auto groups);
    ``alphas``/``betas``: grid weights (default 0..2 step 0.1); ``members``: the member names
    to use (:func:`params_members`; None: every member found; the others found are ignored,
    said in one line); ``folds_path``: folds.csv, the train frames the OOF maps must cover
    (None: the manifest's), unless ``allow_partial``; ``fallback``: BEST_SINGLE makes
    weights.json select the best single member when the best fused row scores below it OOF
    ("none": keep the fused row); ``full_data_weight``: see :func:`member_test_weights`.
    Holds ``out_dir/.search.lock`` while it writes (:func:`search_lock`).
    Returns {"weights": ..., "metrics": ..., "members": ...} as written."""
    alphas = parse_grid(alphas, key="alpha_grid", source=params_source)
    betas = parse_grid(betas, key="beta_grid", source=params_source)
    if fallback not in FALLBACKS:
        raise PipelineError(f"{params_source}: ensemble.fallback: "
                            f"{unknown_name('fallback', str(fallback), FALLBACKS)}")
    if not (_is_number(full_data_weight) and 0 <= full_data_weight <= 1):
        raise PipelineError(f"{params_source}: ensemble.full_data_weight must be a number in "
                            f"[0, 1], got {full_data_weight!r}")
    members_, ignored = select_members(oof_root, members, source=params_source)
    if ignored:
        print(f"{oof_root}: ignoring the maps of {', '.join(ignored)} (not a member "
              f"{params_source} defines)")
    names = [m.name for m in members_]
    classes_path, manifest = data_dir / "classes.json", data_dir / "manifest.csv"
    classes = read_classes(classes_path)
    stride = check_members(members_, classes.num_classes, classes_path, full_size=full_size,
                           class_names=classes.names)
    all_frames = read_manifest(manifest)
    frames = oof_frames(members_, all_frames, manifest)
    if folds_path is not None:
        train_ids, where = dict(read_folds(folds_path)), Path(folds_path)
    else:
        where = manifest
        train_ids = {f.id: None for f in all_frames if f.split == "train" and f.mask}
    coverage = check_oof_coverage(frames, train_ids, where=where, allow_partial=allow_partial)
    fam = {m.name: _family_or_none(m, families or {}, params_source, required=groups is None)
           for m in members_}
    n_primary = sum(f == primary_family for f in fam.values())
    if groups is None and n_strong > n_primary > 0:
        print(f"note: ensemble.n_strong {n_strong} is more than the {n_primary} members of "
              f"family '{primary_family}': clamped to {n_primary} (S takes them all, W is empty)")
    settings = {"groups": groups, "families": None if groups else fam, "alphas": alphas,
                "primary_family": primary_family, "n_strong": n_strong, "n_aux": n_aux,
                "betas": betas, "full_size": full_size, "frames": [f.id for f in frames]}
    fp = fingerprint(members_, frames, classes_path, settings)
    source = fusion.OofSource(members=tuple(members_), lut=classes.lut_array(),
                              num_classes=classes.num_classes, stride=stride,
                              full_size=full_size, ignore_index=classes.ignore_index)

    def grouping(cms: Mapping[str, np.ndarray] | None) -> dict[str, list[str]]:
        scores = {n: mean_iou(cms[n]) for n in names} if cms is not None else {}
        return resolve_groups(groups, names=names, scores=scores, families=fam,
                              primary_family=primary_family, n_strong=n_strong, n_aux=n_aux,
                              source=params_source)

    with search_lock(out_dir):
        found = _search(source, frames, grouping=grouping, grid=(alphas, betas), fp=fp,
                        out_dir=out_dir, manifest=manifest, auto_groups=groups is None,
                        classes=classes, full_size=full_size, stride=stride,
                        run={"workers": workers, "chunk_frames": chunk_frames,
                             "progress": progress})
        table, trials, handle = found["table"], found["trials"], found["handle"]
        alpha, beta, best = found["alpha"], found["beta"], found["best"]
        alpha_sw = found["alpha_sw"]
        chosen, single, member_cms = found["chosen"], found["single"], found["member_cms"]
        by_name = dict(zip(names, members_))
        member_miou = {n: mean_iou(member_cms[n]) for n in names}
        single_score = member_miou[single]
        use_single = fallback == BEST_SINGLE and best < single_score
        table[BEST_SINGLE] = table[f"member:{single}"]
        metrics: dict[str, Any] = {"frames": len(frames), **coverage, "members": len(names),
                                   "alpha": alpha, "beta": beta, "alpha_S_W": alpha_sw}
        for key in ENSEMBLE_ROWS:
            cm, vc = table[key]
            metrics[f"{key}_mIoU"] = _num(mean_iou(cm))
            metrics.update({f"{key}_mVC{n}": _num(vc.get(n)) for n in (8, 16)})
        metrics.update(fallback=BEST_SINGLE if use_single else None,
                       fallback_member=single if use_single else None,
                       submitted_mIoU=_num(single_score if use_single else best))
        group_of = {n: g for g, listed in chosen.items() for n in listed}
        mixes = {n: member_test_weights(by_name[n], full_data_weight) for n in names}
        member_table = {n: {"model": member_model(by_name[n]), "family": fam[n],
                            "group": group_of.get(n), "oof_mIoU": _num(member_miou[n]),
                            "test_weights": mixes[n]}
                        for n in sorted(names, key=lambda n: (-member_miou[n], n))}
        applied = {"S": [single], "W": [], "A": []} if use_single else chosen
        applied_of = {n: g for g, listed in applied.items() for n in listed}
        weights = {"groups": applied, "alpha": 0.0 if use_single else alpha,
                   "beta": 0.0 if use_single else beta,
                   "oof_mIoU": single_score if use_single else best,
                   "fallback": BEST_SINGLE if use_single else None,
                   "fused": {"groups": chosen, "alpha": alpha, "beta": beta, "oof_mIoU": best},
                   BEST_SINGLE: {"member": single, "oof_mIoU": _num(single_score)},
                   "grid": {"alpha": found["grid"][0], "beta": found["grid"][1]},
                   "classes": classes.num_classes, "frames": len(frames), **coverage,
                   "full_data_weight": float(full_data_weight), "fingerprint": fp,
                   "members": {n: {"group": applied_of[n], "oof_mIoU": _num(member_miou[n]),
                                   "meta_sha": _meta_digest(by_name[n]),
                                   "test_weights": mixes[n]} for n in sorted(applied_of)},
                   "study": {"storage": f"sqlite:///{(out_dir / STUDY_DB).as_posix()}",
                             "name": STUDY_NAME, "trials": len(trials)}}
        atomic.write_json(out_dir / MEMBERS, member_table)
        atomic.write_json(out_dir / CONFUSION,
                          {key: np.asarray(table[key][0]).tolist() for key in ENSEMBLE_ROWS})
        atomic.write_json(out_dir / METRICS, metrics)
        replaced = (out_dir / STUDY_DB).exists()
        if handle.commit() and replaced:  # the earlier study is kept until this one is complete
            print(f"{out_dir / STUDY_DB}: the study of other inputs is replaced by this one "
                  f"({len(trials)} trials)")
        atomic.write_json(out_dir / WEIGHTS, weights)  # last: a search killed before resumes
    return {"weights": weights, "metrics": metrics, "members": member_table, "ignored": ignored}


def _search(source: fusion.OofSource, frames: Sequence[Frame], *, grouping, fp: str,
            grid: tuple[list[float], list[float]], out_dir: Path, manifest: Path,
            auto_groups: bool, classes, full_size: bool, stride: int,
            run: Mapping[str, Any]) -> dict[str, Any]:
    """The passes, the study and the table's rows of :func:`search_ensemble`, with the search
    lock held; a new study stays in its work file (the returned ``handle``) until the caller
    commits it."""
    workers = run["workers"]
    db = out_dir / STUDY_DB
    for stale in out_dir.glob(f"{RECORDS}*"):  # label records of a search that was killed
        shutil.rmtree(stale, ignore_errors=True)
    for stale in out_dir.glob(f".{STUDY_DB}.*.tmp"):  # a new study of other inputs, unfinished
        if stale != work_path(db, fp):
            stale.unlink(missing_ok=True)
    record_dir = None
    # with workers, this process only waits during the grid pass: it opens the study then
    background = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    opening: dict[tuple, concurrent.futures.Future] = {}
    handles: list[OpenStudy] = []

    def open_meanwhile(grid: tuple[list[float], list[float]]) -> None:
        if workers > 1:
            opening[tuple(map(tuple, grid))] = background.submit(
                open_study, alphas=grid[0], betas=grid[1], db=db, fingerprint=fp)

    try:
        cached = load_cache(out_dir / CACHE, fp)
        if cached is not None:
            counts, table, rows, member_cms = cached
            print(f"{out_dir / CACHE}: inputs unchanged, reusing its scores")
            cached_rows = dict(rows)
        else:
            record_dir = Path(tempfile.mkdtemp(prefix=RECORDS, dir=out_dir))
            counts, table, rows, member_cms = _grid_pass(
                source, frames, grouping=grouping, grid=grid, run=run,
                record_dir=record_dir, manifest=manifest, auto_groups=auto_groups,
                member_cms=meta_confusions(source.members, classes.num_classes)
                if full_size or stride == 1 else None, starting=open_meanwhile)
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
            pending = opening.get((tuple(grid_a), tuple(grid_b)))
            handle = pending.result() if pending else open_study(
                alphas=grid_a, betas=grid_b, db=db, fingerprint=fp)
            handles.append(handle)
            trials = run_study(scores=scores, alphas=grid_a, betas=grid_b, db=db,
                               fingerprint=fp, opened=handle, commit=False)
            print(f"study: {len(trials)} grid points, {len(trials) - len(handle.done)} new",
                  flush=True)
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
        keep = (f"member:{single}", UNIFORM_MEAN, "S", "S_W", "S_W_A")
        table, rows = {k: table[k] for k in keep}, {k: rows[k] for k in keep}
        if cached is None or cached_rows != rows:
            save_cache(out_dir / CACHE, fp=fp, counts=counts, table=table, rows=rows,
                       member_cms=member_cms)
    except BaseException:
        background.shutdown()
        handles += [f.result() for f in opening.values() if f.done() and not f.exception()]
        for handle in handles:  # a new study this search began: the earlier one stays
            handle.discard()
        raise
    finally:
        background.shutdown()
        if record_dir is not None:
            shutil.rmtree(record_dir, ignore_errors=True)
    return {"table": table, "trials": trials, "handle": handles[-1], "alpha": alpha,
            "beta": beta, "best": best, "alpha_sw": alpha_sw, "chosen": chosen,
            "single": single, "member_cms": member_cms, "grid": (grid_a, grid_b)}


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
    """weights.json of a search, its keys checked: the groups, finite weights >= 0, and each
    member's ``test_weights`` (see :func:`member_test_weights`) when recorded."""
    if not path.is_file():
        raise PipelineError(f"{path}: weights not found (run `python pipeline/ensemble.py "
                            f"--search` first)")
    try:
        weights = json.loads(path.read_text())
        groups = {g: [str(n) for n in weights["groups"].get(g, [])] for g in fusion.GROUPS}
        alpha, beta = float(weights["alpha"]), float(weights["beta"])
        members = weights.get("members") or {}
        mixes = {str(n): {str(k): float(v) for k, v in (m.get("test_weights") or {}).items()}
                 for n, m in members.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise PipelineError(f"{path}: corrupt weights file ({type(err).__name__}: {err})") from None
    if not (np.isfinite(alpha) and np.isfinite(beta)):
        raise PipelineError(f"{path}: alpha and beta must be finite numbers >= 0, got "
                            f"alpha={alpha}, beta={beta}")
    listed = [n for g in fusion.GROUPS for n in groups[g]]
    if not groups["S"] or alpha < 0 or beta < 0 or len(set(listed)) != len(listed):
        raise PipelineError(f"{path}: needs a non-empty group S, each member in one group only "
                            f"and weights >= 0")
    for name, mix in mixes.items():
        values = list(mix.values())
        folds = [v for k, v in mix.items() if k != fold_dir_name(ALL_FOLDS)]
        if mix and (not all(np.isfinite(v) and v >= 0 for v in values)
                    or not all(re.fullmatch(r"f(0|[1-9]\d*|all)", k) for k in mix)
                    or abs(sum(values) - 1) > 1e-6 or max(folds, default=0) - min(folds, default=0)
                    > 1e-9):
            raise PipelineError(f"{path}: test_weights of member '{name}' must map run folders "
                                f"(f<K>, fall) to finite weights >= 0 that sum to 1, equal "
                                f"across the fold models; got {mix}")
    return {**weights, "groups": groups, "alpha": alpha, "beta": beta}


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


def _apply_chunk(frames: list[Frame], *, groups: Mapping[str, list[Member]],
                 mixes: Mapping[str, Mapping[int | str, float]], alpha: float,
                 beta: float, num_classes: int, out: Path) -> int:
    from PIL import Image

    for frame in frames:
        want = (num_classes, frame.height, frame.width) if frame.height and frame.width else None
        means = {}
        for group in fusion.GROUPS:
            mean = fusion.Mean()
            for member in groups[group]:
                probs = member_test(member, frame.id, mixes[member.name])
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
    """Fuse the test maps (each member's per :func:`member_test_weights` as weights.json records
    them: by default the mean of its fold models; full resolution) with
    ``out_dir/weights.json`` into ``out_dir/test_pred/<id>.png`` (uint8 train ids, one per
    test frame of the manifest), written as a whole folder. When the search fell back to the
    best single member, weights.json lists it alone in S: its test argmax is written.
    Returns a small summary."""
    weights = read_weights(out_dir / WEIGHTS)
    names = [n for g in fusion.GROUPS for n in weights["groups"][g]]
    found = member_names(oof_root)
    for group, listed in weights["groups"].items():
        for name in listed:
            if name not in found:
                raise PipelineError(f"{out_dir / WEIGHTS}: member '{name}' of group {group} is "
                                    f"not in {oof_root}")
    by_name = {m.name: m for m in list_members(oof_root, names)}
    classes_path, manifest = data_dir / "classes.json", data_dir / "manifest.csv"
    classes = read_classes(classes_path)
    if classes.num_classes > 255:
        raise PipelineError(f"{classes_path}: {classes.num_classes} classes do not fit uint8 PNGs")
    groups = {group: [by_name[n] for n in sorted(listed)]
              for group, listed in weights["groups"].items()}
    members = [m for g in fusion.GROUPS for m in groups[g]]
    check_members(members, classes.num_classes, classes_path, full_size=True,
                  class_names=classes.names)
    recorded = weights.get("members") if isinstance(weights.get("members"), dict) else {}
    changed = [m.name for m in members
               if (recorded.get(m.name) or {}).get("meta_sha", _meta_digest(m)) != _meta_digest(m)]
    if changed:
        print(f"warning: {', '.join(changed)} changed since the search (meta.json differs); "
              f"the weights were fitted on older maps", file=sys.stderr)
    mixes = {}
    for member in members:
        mix = (recorded.get(member.name) or {}).get("test_weights") or member_test_weights(member)
        mixes[member.name] = {run_of(k): float(v) for k, v in mix.items()}
        lacking = [f for f in mixes[member.name] if f not in member.meta]
        if lacking:
            raise PipelineError(f"{out_dir / WEIGHTS}: test_weights of member '{member.name}' "
                                f"name run {fold_dir_name(lacking[0])}, which {member.root} "
                                f"lacks")
    frames = sorted(read_manifest(manifest, split="test"), key=lambda f: (f.video, f.frame, f.id))
    if not frames:
        raise PipelineError(f"{manifest}: no test frames to predict")
    for member in members:
        runs = [f for f, w in mixes[member.name].items() if w > 0]
        for fold in runs:
            have = set(member.test_ids(fold))
            missing = [f.id for f in frames if f.id not in have]
            if missing:
                nowhere = not any(missing[0] in member.test_ids(r) for r in runs)
                where = member.root if nowhere else member.run_dir(fold)
                raise PipelineError(f"{where}: no test map of frame '{missing[0]}' "
                                    f"({len(missing)} of {len(frames)} test frames missing)")
    with atomic.atomic_dir(out_dir / TEST_PRED) as tmp:
        fn = functools.partial(_apply_chunk, groups=groups, mixes=mixes, alpha=weights["alpha"],
                               beta=weights["beta"], num_classes=classes.num_classes, out=tmp)
        for _ in fusion.run_chunks(fn, fusion.frame_chunks(frames, chunk_frames), workers=workers,
                                   progress=progress, desc="fuse test"):
            pass
    return {"frames": len(frames), "out": str(out_dir / TEST_PRED), "alpha": weights["alpha"],
            "beta": weights["beta"], "groups": weights["groups"],
            "fallback": weights.get("fallback")}


# ----------------------------------------------------------------------------- CLI
