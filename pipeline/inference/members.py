"""The ``oof_preds/`` layout: one folder per ensemble member, its runs, and their coverage.

Layout of one ensemble member (``<model>_s<seed>``), one directory per training run:
``oof_preds/<member>/f<K>/{oof,test}/<id>.npz`` and ``f<K>/meta.json`` (written last, so a run
without it is incomplete and ignored); the run trained on all folds (``fall``) has only test maps.

Each ``<id>.npz`` is one map file of :mod:`pipeline.inference.mapfile`; a member reads its maps
through it, checked against what the run's meta.json says they hold (classes, quant, stride,
topk; a meta.json without "topk" is from before top-k maps: dense, 0).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from pipeline.core.atomic import write_json
from pipeline.core.errors import PipelineError
from pipeline.core.names import ALL_FOLDS, MAP_META_FILE, MAP_SPLITS, fold_dir_name
from pipeline.inference.mapfile import EXT, read_probs

OOF_DIR, TEST_DIR = MAP_SPLITS
RUN_META_KEYS = ("member", "fold", "classes", "quant", "stride")
_FOLD_DIR = re.compile(r"^f(0|[1-9]\d*|all)$")


def run_map_dir(root: str | os.PathLike, member: str, fold: int | str) -> Path:
    """``root/<member>/f<fold>``: holds ``oof/``, ``test/`` and ``meta.json`` of one run."""
    return Path(root) / member / fold_dir_name(fold)


def map_path(directory: str | os.PathLike, frame_id: str) -> Path:
    """``directory/<frame_id>.npz``; ids must be plain file names."""
    if not frame_id or "/" in frame_id or "\\" in frame_id or frame_id.startswith("."):
        raise PipelineError(f"frame id {frame_id!r} cannot name a map file")
    return Path(directory) / f"{frame_id}{EXT}"


def write_run_meta(run_dir: str | os.PathLike, meta: Mapping[str, Any]) -> Path:
    """Write ``run_dir/meta.json`` (last, after every map). ``meta`` needs member, fold,
    classes (count), quant and stride; seed, checkpoint, tta, topk (0 = dense when absent) and
    counts ({"oof": n, "test": m}, checked on read) are expected too."""
    missing = [key for key in RUN_META_KEYS if key not in meta]
    if missing:
        raise PipelineError(f"{run_dir}/{MAP_META_FILE}: missing keys {', '.join(missing)}")
    path = Path(run_dir) / MAP_META_FILE
    write_json(path, dict(meta))
    return path


def _list_maps(directory: Path) -> list[str]:
    if not directory.is_dir():
        return []
    return sorted(p.name[:-len(EXT)] for p in directory.iterdir()
                  if p.name.endswith(EXT) and not p.name.startswith(".") and p.is_file())


def _fold_key(fold: int | str) -> tuple[int, int]:
    return (1, 0) if fold == ALL_FOLDS else (0, int(fold))


class Member:
    """One ensemble member: the runs under ``oof_preds/<member>/f*/`` that hold a meta.json.

    ``folds``: fold numbers (then "all"), ``meta``: {fold: meta.json}, ``classes``/``quant``/
    ``stride``/``topk``: shared by every run (checked).
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.name = self.root.name
        self.meta: dict[int | str, dict] = {}
        for entry in sorted(self.root.iterdir()) if self.root.is_dir() else []:
            match = _FOLD_DIR.match(entry.name)
            if not (match and entry.is_dir() and (entry / MAP_META_FILE).is_file()):
                continue
            fold = match.group(1) if match.group(1) == ALL_FOLDS else int(match.group(1))
            self.meta[fold] = self._load_meta(entry / MAP_META_FILE, fold)
        if not self.meta:
            raise PipelineError(f"{self.root}: no f*/{MAP_META_FILE} (not a member, or no run done)")
        self.folds: list[int | str] = sorted(self.meta, key=_fold_key)
        first = self.meta[self.folds[0]]
        for key in ("classes", "quant", "stride", "topk"):
            values = [(fold, self.meta[fold].get(key, 0)) for fold in self.folds]
            if len({json.dumps(v) for _, v in values}) > 1:
                raise PipelineError(f"{self.root}: runs disagree on {key}: "
                                    + ", ".join(f"f{fold}={v}" for fold, v in values))
        self.classes: int = first["classes"]
        self.quant: str = first["quant"]
        self.stride: int = first["stride"]
        self.topk: int = first.get("topk", 0)   # absent: written before top-k maps, dense
        # every map of the member is stored as its runs' meta.json says (checked on read)
        self.expect = {"classes": self.classes, "quant": self.quant, "stride": self.stride,
                       "topk": self.topk}
        self._oof: dict[str, int | str] | None = None
        self._test: dict[str, list[int | str]] | None = None

    @staticmethod
    def _load_meta(path: Path, fold: int | str) -> dict:
        try:
            meta = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise PipelineError(f"{path}: unreadable run meta ({err})") from None
        missing = [k for k in RUN_META_KEYS if not isinstance(meta, dict) or k not in meta]
        if missing:
            raise PipelineError(f"{path}: missing keys {', '.join(missing)}")
        if str(meta["fold"]) != str(fold):
            raise PipelineError(f"{path}: fold {meta['fold']!r} does not match its folder f{fold}")
        return meta

    def run_dir(self, fold: int | str) -> Path:
        return self.root / fold_dir_name(fold)

    def _ids(self, fold: int | str, kind: str) -> list[str]:
        ids = _list_maps(self.run_dir(fold) / kind)
        counts = self.meta[fold].get("counts")
        if isinstance(counts, dict) and kind in counts and counts[kind] != len(ids):
            raise PipelineError(f"{self.run_dir(fold) / kind}: holds {len(ids)} maps but "
                                f"{MAP_META_FILE} counts {counts[kind]}")
        return ids

    def _oof_index(self) -> dict[str, int | str]:
        if self._oof is None:
            index: dict[str, int | str] = {}
            for fold in self.folds:
                for frame_id in self._ids(fold, OOF_DIR):
                    if frame_id in index:
                        raise PipelineError(
                            f"{self.root}: frame {frame_id} is out-of-fold in both "
                            f"f{index[frame_id]} and f{fold}")
                    index[frame_id] = fold
            self._oof = index
        return self._oof

    def _test_index(self) -> dict[str, list[int | str]]:
        if self._test is None:
            index: dict[str, list[int | str]] = {}
            for fold in self.folds:
                for frame_id in self._ids(fold, TEST_DIR):
                    index.setdefault(frame_id, []).append(fold)
            self._test = index
        return self._test

    def oof_ids(self) -> list[str]:
        """Sorted ids of the out-of-fold maps of all runs (an id in two folds is an error)."""
        return sorted(self._oof_index())

    def oof_fold(self, frame_id: str) -> int | str:
        index = self._oof_index()
        if frame_id not in index:
            raise PipelineError(f"{self.root}: no out-of-fold map for frame {frame_id}")
        return index[frame_id]

    def read_oof(self, frame_id: str, *, full_size: bool = False) -> np.ndarray:
        """float32 [C, h, w] (or [C, H, W]) out-of-fold probabilities of one train frame."""
        path = map_path(self.run_dir(self.oof_fold(frame_id)) / OOF_DIR, frame_id)
        return read_probs(path, full_size=full_size, expect=self.expect)

    def test_ids(self, fold: int | str | None = None) -> list[str]:
        """Sorted ids of the test frames predicted by at least one run (or by run ``fold``)."""
        if fold is not None:
            return self._ids(fold, TEST_DIR) if fold in self.meta else []
        return sorted(self._test_index())

    def read_test(self, frame_id: str, *, full_size: bool = False,
                  folds: Iterable[int | str] | None = None) -> np.ndarray:
        """Mean float32 map of a test frame over the runs that have it (or over ``folds``),
        read one at a time."""
        have = self._test_index().get(frame_id, [])
        if folds is not None:
            wanted = set(folds)
            have = [fold for fold in have if fold in wanted]
        if not have:
            where = "" if folds is None else f" in folds {sorted(wanted, key=_fold_key)}"
            raise PipelineError(f"{self.root}: no test map for frame {frame_id}{where}")
        total = None
        for fold in have:
            path = map_path(self.run_dir(fold) / TEST_DIR, frame_id)
            probs = read_probs(path, full_size=full_size, expect=self.expect)
            if total is None:
                total = probs
            elif probs.shape != total.shape:
                raise PipelineError(f"{path}: shape {probs.shape} differs from the other folds' "
                                    f"{total.shape}")
            else:
                total += probs
        total /= len(have)
        return total

    def __repr__(self) -> str:
        return f"Member({self.name!r}, folds={self.folds})"


def member_names(root: str | os.PathLike) -> list[str]:
    """Sorted names of the members under ``root`` (folders holding an ``f*/meta.json``), without
    reading them; files, dot entries and folders without any run are skipped."""
    root = Path(root)
    if not root.is_dir():
        raise PipelineError(f"{root}: prediction folder not found")
    return [entry.name for entry in sorted(root.iterdir())
            if not entry.name.startswith(".") and entry.is_dir()
            and any(_FOLD_DIR.match(d.name) and (d / MAP_META_FILE).is_file()
                    for d in entry.iterdir())]


def list_members(root: str | os.PathLike, names: Iterable[str] | None = None) -> list[Member]:
    """Members under ``root`` (sorted by name): all of them (see :func:`member_names`), or those
    in ``names`` (one without maps is an error naming it)."""
    root = Path(root)
    found = member_names(root)
    if names is not None:
        missing = sorted(set(names) - set(found))
        if missing:
            raise PipelineError(f"{root / missing[0]}: no maps of member '{missing[0]}' (no "
                                f"f*/{MAP_META_FILE}; {len(missing)} member(s) missing: "
                                f"{', '.join(missing)}); run its inference")
        found = sorted(set(names))
    if not found:
        raise PipelineError(f"{root}: no members (expected <member>/f<K>/{MAP_META_FILE})")
    return [Member(root / name) for name in found]


def check_coverage(member: Member, expected_ids: Iterable[str]) -> int:
    """Check that the member's out-of-fold maps cover ``expected_ids`` (the train frames, or
    those ``infer.oof_sample`` samples: :func:`pipeline.data.oof_sample.sampled_ids`) exactly once;
    returns their number, raises a PipelineError naming the first missing or extra id."""
    expected = set(expected_ids)
    have = set(member.oof_ids())  # raises on a frame predicted in two folds
    missing, extra = sorted(expected - have), sorted(have - expected)
    if missing or extra:
        parts = [f"{member.root}: out-of-fold maps for {len(have)} frames, "
                 f"expected {len(expected)}"]
        if missing:
            parts.append(f"{len(missing)} missing (first {missing[0]})")
        if extra:
            parts.append(f"{len(extra)} unexpected (first {extra[0]})")
        raise PipelineError("; ".join(parts))
    return len(expected)
