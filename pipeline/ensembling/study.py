"""The Optuna study that records the weight grid: one complete trial per grid point, its value
the exact score of the grid pass, kept in SQLite beside the outputs and resumed; a study of
other inputs is replaced only once the new one is complete. Optuna's public API only
(``optuna.trial.create_trial``, ``Study.add_trials``, ``Study.user_attrs``, ...)."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from pipeline.core.errors import PipelineError

STUDY_NAME = "ensemble"
STUDY_DB = "study.db"


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


def _complete(stored: Any) -> list:
    """The study's complete trials (Optuna's own objects, not copied)."""
    from optuna.trial import TrialState

    return stored.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def _adopt(stored: Any, attrs: Sequence[tuple[str, Any]]) -> None:
    """Record ``attrs`` (the inputs' fingerprint and the grid) as the study's user attrs."""
    for key, value in attrs:
        if stored.user_attrs.get(key) != value:  # each write is a commit (an fsync)
            stored.set_user_attr(key, value)


def _load_kept(db: Path, attrs: Sequence[tuple[str, Any]]) -> Any | None:
    """The study kept at ``db`` when it was made from these ``attrs`` (or records none), else
    None."""
    import optuna

    try:
        kept = optuna.load_study(study_name=STUDY_NAME, storage=f"sqlite:///{db.resolve()}")
    except KeyError:  # a database without our study: replaced once ours is complete
        return None
    except Exception as err:  # SQLAlchemy / Optuna errors of an unusable database file
        raise _study_error(db, err) from None
    return kept if all(kept.user_attrs.get(k) in (None, v) for k, v in attrs) else None


def _create_work(work: Path, attrs: Sequence[tuple[str, Any]]) -> Any:
    """The study in the work file ``work``: the one a killed search left there, unless it was
    made from other ``attrs`` (then a new one)."""
    import optuna

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
    return stored


def open_study(*, alphas: Sequence[float], betas: Sequence[float], db: Path,
               fingerprint: str) -> OpenStudy:
    """The study for this grid and these inputs: the one kept in SQLite at ``db`` when it was
    made from them (resumed in place), else a new one (or one a killed search left) in its work
    file beside ``db``, which is only read. See :class:`OpenStudy`.

    Needs no score: a search opens it while the grid pass runs (:class:`StudyOpening`)."""
    import optuna

    space = {"alpha": [float(a) for a in alphas], "beta": [float(b) for b in betas]}
    attrs = (("fingerprint", fingerprint), ("grid", space))
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        kept = _load_kept(db, attrs) if db.exists() else None
        if kept is not None:
            _adopt(kept, attrs)
            return OpenStudy(kept, _complete(kept), db=db, path=db)
        work = work_path(db, fingerprint)
        created = not work.exists()
        db.parent.mkdir(parents=True, exist_ok=True)
        stored = _create_work(work, attrs)
        _adopt(stored, attrs)
        return OpenStudy(stored, _complete(stored), db=db, path=work, created=created)
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


class StudyOpening:
    """The studies a search opens, by grid. With ``background``, :meth:`start` opens a grid's
    study on a thread while the grid pass runs (with workers, this process only waits then);
    :meth:`get` returns it, or opens it now. Every study handed out is kept, so that a search
    that fails discards the work files it created (:meth:`discard`)."""

    def __init__(self, *, db: Path, fingerprint: str, background: bool):
        self.db, self.fingerprint, self.background = db, fingerprint, background
        self.handles: list[OpenStudy] = []
        self._thread = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        self._opening: dict[tuple, concurrent.futures.Future] = {}

    def start(self, grid: tuple[Sequence[float], Sequence[float]]) -> None:
        """Begin opening the study of ``grid`` (alphas, betas), when in the background."""
        if self.background:
            self._opening[tuple(map(tuple, grid))] = self._thread.submit(
                open_study, alphas=grid[0], betas=grid[1], db=self.db,
                fingerprint=self.fingerprint)

    def get(self, alphas: Sequence[float], betas: Sequence[float]) -> OpenStudy:
        """The study of this grid: the one :meth:`start` opened, else opened now."""
        pending = self._opening.get((tuple(alphas), tuple(betas)))
        handle = pending.result() if pending else open_study(
            alphas=alphas, betas=betas, db=self.db, fingerprint=self.fingerprint)
        self.handles.append(handle)
        return handle

    def discard(self) -> None:
        """After a failure: every work file a study opened here created is removed (an
        earlier study at ``db`` stays)."""
        self._thread.shutdown()
        self.handles += [f.result() for f in self._opening.values()
                         if f.done() and not f.exception()]
        for handle in self.handles:
            handle.discard()

    def close(self) -> None:
        """Wait for the thread (a study still opening) and end it."""
        self._thread.shutdown()
