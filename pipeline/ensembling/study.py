"""The Optuna study that records the weight grid: one complete trial per grid point, its value
the exact score of the grid pass, kept in one journal file beside the outputs (Optuna's
``JournalStorage`` with a file backend) and resumed; a study of other inputs is replaced only
once the new one is complete. Optuna's public API only (``optuna.trial.create_trial``,
``Study.add_trials``, ``Study.user_attrs``, ``JournalStorage``, ...).

Open it with Optuna's tools: ``optuna.load_study(study_name="ensemble",
storage=optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(path)))``
(:func:`journal_storage`; optuna 3.x: ``optuna.storages.JournalFileStorage(path)``).

Readers take no lock: an Optuna tool or dashboard reading the study never stops a search.
A writer holds Optuna's lock file (``<file>.lock``) for one append; a search that must write
waits for it (Optuna forcibly releases a lock left for 30 s by a killed writer), and one that
finds the study complete writes nothing."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from pipeline.core.errors import PipelineError

STUDY_NAME = "ensemble"
STUDY_FILE = "study.journal"


def journal_storage(path: Path) -> Any:
    """Optuna's ``JournalStorage`` on the journal file ``path`` (created when missing):
    ``optuna.storages.journal.JournalFileBackend``, optuna 3.x's ``JournalFileStorage``."""
    from optuna.storages import JournalStorage

    try:
        from optuna.storages.journal import JournalFileBackend
    except ImportError:  # optuna < 4.0
        from optuna.storages import JournalFileStorage as JournalFileBackend
    return JournalStorage(JournalFileBackend(str(path)))


def open_code(path: Path | str) -> str:
    """The Python that opens the study kept at ``path`` with Optuna's own tools."""
    return (f"optuna.load_study(study_name={STUDY_NAME!r}, storage=optuna.storages."
            f"JournalStorage(optuna.storages.journal.JournalFileBackend({str(path)!r})))")


@dataclasses.dataclass
class OpenStudy:
    """A study opened for one grid: ``study`` (Optuna's handle), ``done`` (its complete trials
    when opened), and where it lives: ``path`` is ``file`` itself (a kept study of the same
    inputs, resumed in place) or a work file beside it (:func:`work_path`) that replaces
    ``file`` once complete (:meth:`commit`), so a search that fails or is killed never empties
    the study an earlier search left. ``created``: this process made the work file."""

    study: Any
    done: list
    file: Path
    path: Path
    created: bool = False

    def commit(self) -> bool:
        """Move the work file onto ``file`` (atomic); True when it replaced or created
        ``file``."""
        if self.path == self.file:
            return False
        os.replace(self.path, self.file)
        self.path = self.file
        return True

    def discard(self) -> None:
        """Remove the work file this process created (a search that failed)."""
        if self.path != self.file and self.created:
            self.path.unlink(missing_ok=True)


def work_path(file: Path, fingerprint: str) -> Path:
    """The work file of a new study of inputs ``fingerprint`` beside ``file``: a search killed
    while building it resumes it."""
    return file.parent / f".{file.name}.{fingerprint[:16]}.tmp"


def leftovers(file: Path, fingerprint: str) -> list[Path]:
    """What killed searches left beside ``file`` that no search resumes (the caller holds the
    search lock: nothing else writes there): the work files of other inputs than
    ``fingerprint``'s, and the lock files Optuna's journal left on any work file."""
    keep = work_path(file, fingerprint)
    return [p for p in file.parent.glob(f".{file.name}.*.tmp*") if p != keep]


def _study_error(path: Path, err: Exception) -> PipelineError:
    first = str(err).splitlines()[0] if str(err) else ""
    return PipelineError(f"{path}: cannot open the Optuna study ({type(err).__name__}: {first}); "
                         f"delete the file to start over")


def _check_journal(path: Path) -> None:
    """ValueError unless ``path`` holds an Optuna journal: JSON objects, one a line, each ended
    by a newline. (Optuna's reader silently skips a last line that is not one: a file of
    anything else would read as an empty journal, and a study appended to it is lost.)"""
    data = path.read_bytes()
    for number, line in enumerate(data.splitlines(), 1):
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            raise ValueError(f"line {number} is not an Optuna journal record")
    if data and not data.endswith(b"\n"):
        raise ValueError("its last line is incomplete")


def _complete(stored: Any) -> list:
    """The study's complete trials (Optuna's own objects, not copied)."""
    from optuna.trial import TrialState

    return stored.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def _adopt(stored: Any, attrs: Sequence[tuple[str, Any]]) -> None:
    """Record ``attrs`` (the inputs' fingerprint and the grid) as the study's user attrs."""
    for key, value in attrs:
        if stored.user_attrs.get(key) != value:  # each write is an append (an fsync)
            stored.set_user_attr(key, value)


def _matches(stored: Any, attrs: Sequence[tuple[str, Any]]) -> bool:
    """The study was made from these ``attrs`` (or records none)."""
    return all(stored.user_attrs.get(k) in (None, v) for k, v in attrs)


def _load(path: Path) -> Any | None:
    """The study kept in the journal file ``path``, None when it holds none of our name; a
    PipelineError when the file is unreadable or not an Optuna journal."""
    import optuna

    try:
        _check_journal(path)
        storage = journal_storage(path)  # replays the journal: raises on unusable records
        if STUDY_NAME not in {s.study_name for s in storage.get_all_studies()}:
            return None  # a journal without our study: replaced once ours is complete
        return optuna.load_study(study_name=STUDY_NAME, storage=storage)
    except Exception as err:  # OSError, ours, or Optuna's (KeyError, TypeError, ...)
        raise _study_error(path, err) from None


def _create_work(work: Path, attrs: Sequence[tuple[str, Any]]) -> tuple[Any, bool]:
    """The study in the work file ``work``, and whether this process made it: the one a killed
    search left there, unless it was made from other ``attrs`` or cannot be read (then a new
    one)."""
    import optuna

    if work.exists():
        try:
            stored = _load(work)
        except PipelineError:
            print(f"{work}: the unfinished study a killed search left cannot be read; "
                  f"starting it over", flush=True)
            stored = None
        if stored is not None and _matches(stored, attrs):
            return stored, False
        work.unlink()
    try:
        return optuna.create_study(study_name=STUDY_NAME, storage=journal_storage(work),
                                   direction="maximize"), True
    except Exception as err:
        raise _study_error(work, err) from None


def open_study(*, alphas: Sequence[float], betas: Sequence[float], file: Path,
               fingerprint: str) -> OpenStudy:
    """The study for this grid and these inputs: the one kept in the journal ``file`` when it
    was made from them (resumed in place), else a new one (or one a killed search left) in its
    work file beside ``file``, which is only read. See :class:`OpenStudy`.

    Needs no score: a search opens it while the grid pass runs (:class:`StudyOpening`)."""
    import optuna

    space = {"alpha": [float(a) for a in alphas], "beta": [float(b) for b in betas]}
    attrs = (("fingerprint", fingerprint), ("grid", space))
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        kept = _load(file) if file.exists() else None
        if kept is not None and _matches(kept, attrs):
            _adopt(kept, attrs)
            return OpenStudy(kept, _complete(kept), file=file, path=file)
        work = work_path(file, fingerprint)
        file.parent.mkdir(parents=True, exist_ok=True)
        stored, created = _create_work(work, attrs)
        _adopt(stored, attrs)
        return OpenStudy(stored, _complete(stored), file=file, path=work, created=created)
    finally:
        optuna.logging.set_verbosity(verbosity)


def run_study(*, scores: Mapping[tuple[float, float], float], alphas: Sequence[float],
              betas: Sequence[float], file: Path, fingerprint: str,
              opened: OpenStudy | None = None, commit: bool = True) -> list:
    """Record the (alpha, beta) grid in an Optuna study: one complete trial per grid point, its
    value the exact score of ``scores``; the study is kept in the journal ``file`` and resumed:
    grid points already stored are not added again (see :func:`open_study`; ``opened``: what
    it returned for these arguments). ``commit``: move a new study onto ``file`` once complete
    (else the caller does, see :meth:`OpenStudy.commit`). Returns the study's complete trials.

    Every point is scored exactly by the grid pass, so the trials are made with
    ``optuna.trial.create_trial`` in grid order (what a ``GridSampler`` would visit, without
    its per-trial search-space checks) and stored with ``Study.add_trials``: public APIs only.
    """
    import optuna
    from optuna.distributions import FloatDistribution
    from optuna.trial import create_trial

    opened = opened or open_study(alphas=alphas, betas=betas, file=file,
                                  fingerprint=fingerprint)
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

    def __init__(self, *, file: Path, fingerprint: str, background: bool):
        self.file, self.fingerprint, self.background = file, fingerprint, background
        self.handles: list[OpenStudy] = []
        self._thread = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        self._opening: dict[tuple, concurrent.futures.Future] = {}

    def start(self, grid: tuple[Sequence[float], Sequence[float]]) -> None:
        """Begin opening the study of ``grid`` (alphas, betas), when in the background."""
        if self.background:
            self._opening[tuple(map(tuple, grid))] = self._thread.submit(
                open_study, alphas=grid[0], betas=grid[1], file=self.file,
                fingerprint=self.fingerprint)

    def get(self, alphas: Sequence[float], betas: Sequence[float]) -> OpenStudy:
        """The study of this grid: the one :meth:`start` opened, else opened now."""
        pending = self._opening.get((tuple(alphas), tuple(betas)))
        handle = pending.result() if pending else open_study(
            alphas=alphas, betas=betas, file=self.file, fingerprint=self.fingerprint)
        self.handles.append(handle)
        return handle

    def discard(self) -> None:
        """After a failure: every work file a study opened here created is removed (an
        earlier study at ``file`` stays)."""
        self._thread.shutdown()
        self.handles += [f.result() for f in self._opening.values()
                         if f.done() and not f.exception()]
        for handle in self.handles:
            handle.discard()

    def close(self) -> None:
        """Wait for the thread (a study still opening) and end it."""
        self._thread.shutdown()
