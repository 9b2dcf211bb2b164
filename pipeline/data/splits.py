"""Cross-validation folds: grouped by video, balanced in frames, stratified on classes.

Consecutive frames of a video look alike, so a video never straddles two folds. Within that
constraint the folds should hold similar frame counts, and every class found in at least
``n_folds`` videos should appear in every fold (classes in fewer videos are spread over as many
folds as they have videos). The split is computed once by ``pipeline/folds.py`` and written
to ``folds/folds.csv`` (id, video, fold); every later stage only reads it (:func:`read_folds`,
:func:`train_val_ids`), so no run re-splits.

The assignment is a deterministic function of the sorted video names, their frame counts and
class presence, and the seed: a seeded permutation breaks ties, a greedy pass (largest video
first, into the fold it adds most missing classes to, then the lightest) builds a start, and a
bounded local search over whole videos (best move, then swaps) lowers the lexicographic cost
(uncovered (class, fold) pairs, then the sum of squared fold sizes in frames); a few seeded
restarts escape local optima. All sums are exact (0/1 float32 matmuls stay integral), so
thread counts and input order do not matter.
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline.core import atomic
from pipeline.core.errors import PipelineError
from pipeline.core.names import ALL_FOLDS
from pipeline.data.manifest import read_class_counts, read_manifest

FOLDS_COLUMNS = ("id", "video", "fold")
_SWAP_CANDIDATES = 4096  # best-by-balance swaps whose class cost is checked per step
_REPAIR_PAIRS = 1 << 20  # most swaps a coverage-repair step examines


@dataclass(frozen=True)
class FoldSummary:
    """One fold: its videos and frames, the classes it contains, and ``missing``: classes
    found in at least n_folds videos overall that this fold lacks (0 when stratified)."""

    fold: int
    videos: int
    frames: int
    classes: int
    missing: int


class _Search:
    """Fold assignment of V videos with the counters that make a move cost O(C)."""

    def __init__(self, sizes: np.ndarray, present: np.ndarray, n_folds: int):
        self.s = sizes.astype(np.int64)              # [V] frames per video
        self.pb = present                            # [V, C] bool
        self.pf = present.astype(np.float32)         # exact 0/1 sums for matmuls
        self.k = n_folds
        self.need = np.minimum(present.sum(0), n_folds)   # [C] folds each class should reach
        self.a = np.full(len(sizes), -1, dtype=np.int64)  # [V] fold of each video
        self.load = np.zeros(n_folds, dtype=np.int64)     # [K] frames per fold
        self.members = np.zeros(n_folds, dtype=np.int64)  # [K] videos per fold
        self.cnt = np.zeros((present.shape[1], n_folds), dtype=np.int64)  # [C, K] videos

    def cost(self) -> tuple[int, int]:
        covered = (self.cnt > 0).sum(1)
        return int((self.need - covered).sum()), int((self.load ** 2).sum())

    def put(self, v: int, f: int) -> None:
        old = self.a[v]
        if old >= 0:
            self.load[old] -= self.s[v]
            self.members[old] -= 1
            self.cnt[self.pb[v], old] -= 1
        self.a[v] = f
        self.load[f] += self.s[v]
        self.members[f] += 1
        self.cnt[self.pb[v], f] += 1

    def greedy(self, order: np.ndarray) -> None:
        folds = np.arange(self.k)
        for v in order:
            gain = (self.cnt[self.pb[v]] == 0).sum(0)  # [K] classes v would add
            self.put(int(v), int(np.lexsort((folds, self.load, -gain))[0]))

    def best_move(self) -> tuple[int, int] | None:
        """The move (video, fold) with the lowest (dviol, dimb) that improves, else None."""
        zero = (self.cnt == 0).astype(np.float32)                  # [C, K]
        one = (self.cnt == 1).astype(np.float32)
        gain = np.rint(self.pf @ zero).astype(np.int64)            # [V, K]
        lose = np.rint((self.pf * one.T[self.a]).sum(1)).astype(np.int64)  # [V]
        dviol = lose[:, None] - gain
        s = self.s[:, None]
        dimb = 2 * s * (self.load[None, :] - self.load[self.a][:, None] + s)
        ok = (dviol < 0) | ((dviol == 0) & (dimb < 0))
        ok[np.arange(len(self.a)), self.a] = False
        ok[self.members[self.a] <= 1] = False  # never empty a fold
        if not ok.any():
            return None
        idx = np.flatnonzero(ok)
        best = idx[np.lexsort((idx, dimb.ravel()[idx], dviol.ravel()[idx]))[0]]
        return divmod(int(best), self.k)

    def swap_deltas(self, vi: np.ndarray, wi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(dviol, dimb) of exchanging the folds of videos vi[j] and wi[j] (different folds)."""
        fv, fw = self.a[vi], self.a[wi]
        pv, pw = self.pb[vi], self.pb[wi]
        one, zero = (self.cnt == 1).T, (self.cnt == 0).T          # [K, C]
        lose = (pv & ~pw & one[fv]).sum(1) + (pw & ~pv & one[fw]).sum(1)
        gain = (pw & zero[fv]).sum(1) + (pv & zero[fw]).sum(1)
        d = self.s[vi] - self.s[wi]
        return lose - gain, 2 * d * (self.load[fw] - self.load[fv] + d)

    def _pick_swap(self, vi, wi, need_viol_drop: bool) -> tuple[int, int] | None:
        best = None
        for start in range(0, len(vi), _SWAP_CANDIDATES):
            v, w = vi[start:start + _SWAP_CANDIDATES], wi[start:start + _SWAP_CANDIDATES]
            dviol, dimb = self.swap_deltas(v, w)
            ok = dviol < 0 if need_viol_drop else (dviol < 0) | ((dviol == 0) & (dimb < 0))
            if ok.any():
                j = np.flatnonzero(ok)[np.lexsort((np.flatnonzero(ok), dimb[ok], dviol[ok]))[0]]
                key = (int(dviol[j]), int(dimb[j]))
                if best is None or key < best[0]:
                    best = (key, int(v[j]), int(w[j]))
        return None if best is None else best[1:]

    def balance_swap(self) -> tuple[int, int] | None:
        """A swap that lowers imbalance without losing coverage, from the heaviest fold down."""
        for f in np.lexsort((np.arange(self.k), -self.load)):
            vs = np.flatnonzero(self.a == f)
            ws = np.flatnonzero(self.load[self.a] < self.load[f])
            if not len(ws):
                continue
            d = self.s[vs][:, None] - self.s[ws][None, :]
            dimb = 2 * d * (self.load[self.a[ws]][None, :] - self.load[f] + d)
            idx = np.flatnonzero(dimb < 0)
            if len(idx) > _SWAP_CANDIDATES:  # check the best few by balance only
                idx = idx[np.argpartition(dimb.ravel()[idx], _SWAP_CANDIDATES)[:_SWAP_CANDIDATES]]
            idx.sort()
            pick = self._pick_swap(vs[idx // len(ws)], ws[idx % len(ws)], need_viol_drop=False)
            if pick is not None:
                return pick
        return None

    def repair_swap(self) -> tuple[int, int] | None:
        """A swap that covers more (class, fold) pairs: a redundant holder of an under-covered
        class goes to a fold that lacks one, in exchange for one of that fold's videos."""
        short = (self.cnt > 0).sum(1) < self.need                   # [C]
        vs = np.flatnonzero((self.pb & short & (self.cnt.T[self.a] >= 2)).any(1))
        ws = np.flatnonzero((self.cnt[short] == 0).any(0)[self.a])
        vs = vs[:max(1, _REPAIR_PAIRS // max(1, len(ws)))]  # bounded work per step
        vi, wi = np.repeat(vs, len(ws)), np.tile(ws, len(vs))
        keep = self.a[vi] != self.a[wi]
        return self._pick_swap(vi[keep], wi[keep], need_viol_drop=True)

    def run(self, max_steps: int) -> None:
        for _ in range(max_steps):
            move = self.best_move()
            if move is not None:
                self.put(*move)
                continue
            swap = self.balance_swap()
            if swap is None and self.cost()[0]:
                swap = self.repair_swap()
            if swap is None:
                return
            v, w = swap
            fv, fw = int(self.a[v]), int(self.a[w])
            self.put(v, fw)
            self.put(w, fv)


def _per_video(videos: Sequence[str], presence: np.ndarray):
    """(sorted names [V], video index of each frame [N], frames per video [V], presence [V, C])."""
    names, inverse = np.unique(np.asarray(videos, dtype=str), return_inverse=True)
    sizes = np.bincount(inverse, minlength=len(names))
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    by_video = (np.asarray(presence) != 0)[np.argsort(inverse, kind="stable")]
    return names, inverse, sizes, np.logical_or.reduceat(by_video, starts, axis=0)


def assign_folds(videos: Sequence[str], presence: np.ndarray, *, n_folds: int, seed: int,
                 max_steps: int = 20000, restarts: int = 32, patience: int = 8) -> np.ndarray:
    """Fold of every frame, grouped by video, balanced in frames, stratified on classes.

    ``videos``: video name of each of N frames; ``presence``: [N, C] array, nonzero where a frame
    contains the class (pixel counts work as they are). Returns int64 [N] folds in
    0..n_folds-1, the same for any order of the frames. ``max_steps`` bounds each local search.
    Up to ``restarts`` starts are tried until one covers every (class, fold) pair with fold
    sizes level to one frame, or ``patience`` starts in a row bring no gain (full coverage can
    be infeasible: two videos that must share a fold may hold a class found in n_folds videos).
    """
    if n_folds < 2:
        raise PipelineError(f"folds.n_folds must be at least 2, got {n_folds}")
    presence = np.asarray(presence)
    if presence.ndim != 2 or presence.shape[0] != len(videos):
        raise ValueError(f"presence shape {presence.shape} does not match {len(videos)} frames")
    if not len(videos):
        raise PipelineError("no frames to split into folds (the train split is empty)")
    names, inverse, sizes, per_video = _per_video(videos, presence)
    if len(names) < n_folds:
        raise PipelineError(
            f"folds.n_folds={n_folds} needs at least {n_folds} videos but the train split has "
            f"{len(names)}: a fold would be empty; lower folds.n_folds")
    rng = np.random.default_rng(seed)
    best, stale = None, 0
    for start in range(restarts):
        # Each start works in its own seeded order of the sorted names: the seed breaks ties.
        perm = rng.permutation(len(names))
        search = _Search(sizes[perm], per_video[perm], n_folds)
        # Largest first balances best; later starts take the seeded order for diversity.
        first = np.argsort(-sizes[perm], kind="stable")
        search.greedy(first if start == 0 else np.arange(len(perm)))
        search.run(max_steps)
        cost = search.cost()
        stale = 0 if best is None or cost < best[0] else stale + 1
        if stale == 0:
            video_fold = np.empty(len(names), dtype=np.int64)
            video_fold[perm] = search.a
            best = (cost, video_fold)
        if stale >= patience or (cost[0] == 0 and np.ptp(search.load) <= 1):
            break
    return best[1][inverse]


def summarize_folds(*, folds: np.ndarray, videos: Sequence[str], presence: np.ndarray,
                    n_folds: int) -> list[FoldSummary]:
    """Per-fold counts for ``folds`` [N] of frames with ``videos`` [N] and ``presence`` [N, C]."""
    folds = np.asarray(folds)
    _, inverse, _, per_video = _per_video(videos, presence)
    common = per_video.sum(0) >= n_folds  # [C] classes every fold should contain
    present = np.asarray(presence) != 0
    rows = []
    for f in range(n_folds):
        sel = folds == f
        in_fold = present[sel].any(0)
        rows.append(FoldSummary(fold=f, videos=len(np.unique(inverse[sel])), frames=int(sel.sum()),
                                classes=int(in_fold.sum()), missing=int((common & ~in_fold).sum())))
    return rows


def format_summary(rows: Sequence[FoldSummary]) -> str:
    """A small text table of :func:`summarize_folds` for the terminal."""
    lines = [f"{'fold':>4}  {'videos':>6}  {'frames':>7}  {'classes':>7}  {'missing':>7}"]
    lines += [f"{r.fold:>4}  {r.videos:>6}  {r.frames:>7}  {r.classes:>7}  {r.missing:>7}"
              for r in rows]
    lines.append("missing: classes found in >= n_folds videos that the fold lacks (want 0)")
    return "\n".join(lines)


def make_folds(*, manifest: str | os.PathLike, counts: str | os.PathLike, out: str | os.PathLike,
               n_folds: int, seed: int) -> list[FoldSummary]:
    """Split the manifest's train frames into folds using their class counts; write ``out``.

    Returns the per-fold summary. Nothing is written when any check fails.
    """
    frames = read_manifest(manifest, split="train")
    if not frames:
        raise PipelineError(f"{manifest}: the 'train' split is empty; nothing to split into folds")
    frames = sorted(frames, key=lambda fr: fr.id)
    ids = [fr.id for fr in frames]
    dup = next((a for a, b in zip(ids, ids[1:]) if a == b), None)
    if dup is not None:
        raise PipelineError(f"{manifest}: id '{dup}' appears more than once")
    count_ids, count_array = read_class_counts(counts)
    row = {i: k for k, i in enumerate(count_ids)}
    missing = [i for i in ids if i not in row]
    if missing:
        raise PipelineError(
            f"{counts}: no class counts for {len(missing)} train frame(s) of {manifest} "
            f"(first: '{missing[0]}'); re-run `python pipeline/prepare.py`")
    presence = count_array[[row[i] for i in ids]] > 0
    videos = [fr.video for fr in frames]
    folds = assign_folds(videos, presence, n_folds=n_folds, seed=seed)
    write_folds(out, ids=ids, videos=videos, folds=folds)
    return summarize_folds(folds=folds, videos=videos, presence=presence, n_folds=n_folds)


# ----------------------------------------------------------------------------- folds file IO
def write_folds(path: str | os.PathLike, *, ids: Sequence[str], videos: Sequence[str],
                folds: Sequence[int]) -> None:
    """Write (id, video, fold) rows sorted by id, atomically."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(FOLDS_COLUMNS)
    for i, v, f in sorted(zip(ids, videos, (int(f) for f in folds))):
        writer.writerow([i, v, f])
    atomic.write_text(path, buf.getvalue())


def read_folds(path: str | os.PathLike) -> dict[str, int]:
    """Return id -> fold from a folds file, checking that it is complete and consistent."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: folds file not found (run `python pipeline/folds.py` first)")
    with path.open(newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None or tuple(header) != FOLDS_COLUMNS:
            raise PipelineError(f"{path}: expected columns {','.join(FOLDS_COLUMNS)}, got {header}")
        result: dict[str, int] = {}
        video_fold: dict[str, int] = {}
        for line, row in enumerate(reader, start=2):
            if len(row) != len(FOLDS_COLUMNS) or not row[2].isdigit():
                raise PipelineError(
                    f"{path}: line {line}: corrupt row {row} (want id, video, fold >= 0)")
            id_, video, fold = row[0], row[1], int(row[2])
            if id_ in result:
                raise PipelineError(f"{path}: line {line}: id '{id_}' appears twice")
            if video_fold.setdefault(video, fold) != fold:
                raise PipelineError(f"{path}: line {line}: video '{video}' is in folds "
                                    f"{video_fold[video]} and {fold}")
            result[id_] = fold
    if not result:
        raise PipelineError(f"{path}: no rows")
    found = sorted(set(result.values()))
    if found != list(range(len(found))):
        raise PipelineError(f"{path}: folds {found} are not numbered 0..{len(found) - 1}")
    return result


def fold_ids(path: str | os.PathLike, fold: int) -> list[str]:
    """Sorted ids of one fold (the validation ids when training on the others)."""
    return train_val_ids(path, fold)[1]


def train_val_ids(path: str | os.PathLike, fold: int | str) -> tuple[list[str], list[str]]:
    """(train ids, validation ids), sorted. ``fold="all"`` trains on every id, validates on none."""
    folds = read_folds(path)
    if fold == ALL_FOLDS:
        return sorted(folds), []
    n_folds = max(folds.values()) + 1
    if isinstance(fold, str) and fold.isdigit():
        fold = int(fold)
    if isinstance(fold, bool) or not isinstance(fold, (int, np.integer)) or not 0 <= fold < n_folds:
        raise PipelineError(f"{path}: fold {fold!r} is not one of 0..{n_folds - 1} or '{ALL_FOLDS}'")
    train = sorted(i for i, f in folds.items() if f != fold)
    val = sorted(i for i, f in folds.items() if f == fold)
    return train, val
