"""The manifest: one row per frame, the single source of truth for every later stage.

``data/manifest.csv`` columns: id, image, mask, video, frame, split, height, width, digest
(:func:`frame_digest` of the frame's files, written by prepare; an older manifest without the
column still reads, with empty digests).
Paths are stored relative to the manifest's folder when they lie under it (the built-in demo)
and absolute otherwise (a dataset root elsewhere), so the file survives a move of the repo.
``data/classes.json`` holds the class names, palette, ignore index and the lookup table that
turns a raw mask value into a train id (255 = void), so datasets whose stored ids differ from
train ids (Cityscapes labelIds, VSPW's 0 = "others") are mapped on read, never rewritten.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from PIL import Image

from pipeline.core import atomic
from pipeline.core.errors import PipelineError

IGNORE_INDEX = 255
INVALID = -1  # LUT entry for a raw mask value that is neither a class nor void
MANIFEST_COLUMNS = ("id", "image", "mask", "video", "frame", "split", "height", "width", "digest")
OPTIONAL_COLUMNS = ("digest",)  # absent from manifests written before it existed
DIGEST_CHARS = 16  # hex characters of a frame digest (64 bits: no accidental collision)


@dataclass(frozen=True)
class Frame:
    """One image of the dataset. ``mask`` is None for unlabelled test frames."""

    id: str
    image: str
    mask: str | None
    video: str
    frame: int
    split: str
    height: int = 0
    width: int = 0
    digest: str = ""  # frame_digest(image, mask); "" when the manifest predates the column


def frame_digest(image: str | os.PathLike, mask: str | os.PathLike | None) -> str:
    """Short sha1 (hex) of a frame's image bytes and mask bytes (none for an unlabelled frame):
    what a training run records to notice that a frame's contents changed."""
    digest = hashlib.sha1(Path(image).read_bytes())
    digest.update(b"\0mask\0" + (Path(mask).read_bytes() if mask else b""))
    return digest.hexdigest()[:DIGEST_CHARS]


@dataclass
class ClassInfo:
    """Class names, colours and the raw-value -> train-id lookup table of a dataset."""

    names: list[str]
    palette: list[list[int]]
    ignore_index: int = IGNORE_INDEX
    mask_lut: list[int] = field(default_factory=list)  # 256 entries; INVALID = out of range
    dataset: str = ""
    train_pixel_counts: list[int] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def lut_array(self) -> np.ndarray:
        """int16 LUT of 256 entries (identity with void when none was given)."""
        if self.mask_lut:
            return np.asarray(self.mask_lut, dtype=np.int16)
        return identity_lut(self.num_classes)

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        data["num_classes"] = self.num_classes
        return data

    @classmethod
    def from_json(cls, data: dict) -> "ClassInfo":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def identity_lut(num_classes: int, void_values: Iterable[int] = (IGNORE_INDEX,)) -> np.ndarray:
    """LUT where 0..num_classes-1 map to themselves, ``void_values`` to 255, the rest INVALID."""
    lut = np.full(256, INVALID, dtype=np.int16)
    lut[:num_classes] = np.arange(num_classes)
    for value in void_values:
        lut[value] = IGNORE_INDEX
    return lut


def default_palette(num_classes: int, seed: int = 3) -> list[list[int]]:
    """Distinct-looking deterministic colours for datasets that ship none."""
    rng = np.random.default_rng(seed)
    return rng.integers(40, 256, size=(num_classes, 3)).tolist()


# ----------------------------------------------------------------------------- reading files
def read_image(path: str | os.PathLike) -> np.ndarray:
    """Decode an RGB image to HxWx3 uint8; anything else (grey, RGBA, corrupt) is an error."""
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            if mode != "RGB":
                raise PipelineError(f"{path}: image mode is {mode}, expected RGB")
            return np.asarray(img)
    except PipelineError:
        raise
    except FileNotFoundError:
        raise PipelineError(f"{path}: image file not found") from None
    except Exception as err:  # PIL raises many types for truncated or corrupt files
        raise PipelineError(f"{path}: unreadable or corrupt image ({type(err).__name__})") from None


def read_raw_mask(path: str | os.PathLike) -> np.ndarray:
    """Decode a single-channel label PNG to HxW uint8 raw values (no mapping).

    The format is checked by content, not by name: a JPEG saved as ``.png`` would shift label
    values at every edge, so only PNG (lossless) is accepted.
    """
    try:
        with Image.open(path) as img:
            if img.format != "PNG":
                raise PipelineError(f"{path}: mask holds {img.format or 'unknown'} data, not a lossless "
                                    f"PNG (lossy formats change label values)")
            img.load()
            if img.mode not in ("L", "P"):
                raise PipelineError(f"{path}: mask mode is {img.mode}, expected single-channel (L or P)")
            return np.asarray(img)
    except PipelineError:
        raise
    except FileNotFoundError:
        raise PipelineError(f"{path}: mask file not found") from None
    except Exception as err:
        raise PipelineError(f"{path}: unreadable or corrupt mask ({type(err).__name__})") from None


def map_mask(raw: np.ndarray, lut: np.ndarray, *, path: str | os.PathLike = "mask") -> np.ndarray:
    """Map raw values through ``lut``; a value with an INVALID entry is an error naming it."""
    mapped = lut[raw]
    if mapped.min(initial=0) < 0:
        bad = np.unique(raw[mapped < 0])
        raise PipelineError(
            f"{path}: label value {int(bad[0])} is outside the classes and not void "
            f"({len(bad)} such value(s): {bad[:8].tolist()})")
    return mapped.astype(np.uint8)


def read_mask(path: str | os.PathLike, lut: np.ndarray) -> np.ndarray:
    """Decode a label PNG and map it to train ids (HxW uint8, 255 = void)."""
    return map_mask(read_raw_mask(path), lut, path=path)


# ----------------------------------------------------------------------------- manifest IO
def _rel(path: str | None, base: Path) -> str:
    if not path:
        return ""
    p = Path(path).absolute()
    try:
        return p.relative_to(base.absolute()).as_posix()
    except ValueError:
        return str(p)


def manifest_text(frames: Sequence[Frame], base_dir: str | os.PathLike) -> str:
    """CSV text of ``frames`` with paths made relative to ``base_dir`` where possible."""
    base = Path(base_dir)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(MANIFEST_COLUMNS)
    for f in frames:
        writer.writerow([f.id, _rel(f.image, base), _rel(f.mask, base), f.video, f.frame,
                         f.split, f.height, f.width, f.digest])
    return buf.getvalue()


def write_manifest(path: str | os.PathLike, frames: Sequence[Frame]) -> None:
    path = Path(path)
    atomic.write_text(path, manifest_text(frames, path.parent))


def read_manifest(path: str | os.PathLike, split: str | None = None) -> list[Frame]:
    """Read a manifest, resolving relative paths against its folder; optionally one split."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: manifest not found (run `python pipeline/prepare.py` first)")
    base = path.parent
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        missing = set(MANIFEST_COLUMNS) - set(OPTIONAL_COLUMNS) - set(reader.fieldnames or [])
        if missing:
            raise PipelineError(f"{path}: missing column(s) {sorted(missing)}")
        frames = []
        for row in reader:
            def resolve(p: str) -> str | None:
                if not p:
                    return None
                return str(Path(p) if os.path.isabs(p) else base / p)
            frames.append(Frame(id=row["id"], image=resolve(row["image"]), mask=resolve(row["mask"]),
                                video=row["video"], frame=int(row["frame"]), split=row["split"],
                                height=int(row["height"]), width=int(row["width"]),
                                digest=row.get("digest") or ""))
    if split is not None:
        frames = [f for f in frames if f.split == split]
    return frames


def write_classes(path: str | os.PathLike, classes: ClassInfo) -> None:
    atomic.write_json(path, classes.to_json())


def read_classes(path: str | os.PathLike) -> ClassInfo:
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: classes file not found (run `python pipeline/prepare.py` first)")
    try:
        return ClassInfo.from_json(json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError) as err:
        raise PipelineError(f"{path}: corrupt classes file ({err})") from None


# ----------------------------------------------------------------------------- class counts
def write_class_counts(path: str | os.PathLike, ids: Sequence[str], counts: np.ndarray) -> None:
    """Per-frame pixel counts of every class (``counts``: [frames, classes] int64), as npz.

    Later stages derive what they need without re-reading masks: the class prior of any set of
    training folds (logit adjustment) and which classes each video contains (fold stratification).
    """
    counts = np.asarray(counts, dtype=np.int64)
    if counts.ndim != 2 or counts.shape[0] != len(ids):
        raise ValueError(f"counts shape {counts.shape} does not match {len(ids)} ids")
    with atomic.atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, ids=np.asarray(list(ids), dtype=str), counts=counts)


def read_class_counts(path: str | os.PathLike) -> tuple[list[str], np.ndarray]:
    """Return (ids, counts[frames, classes]) written by :func:`write_class_counts`."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: class counts not found (run `python pipeline/prepare.py` first)")
    with np.load(path) as data:
        return [str(i) for i in data["ids"]], data["counts"].astype(np.int64)


def palette_table(classes) -> np.ndarray:
    """[256, 3] uint8 colours of the train ids (void and unused values black)."""
    colours = classes.palette if len(classes.palette) >= classes.num_classes else default_palette(
        classes.num_classes)
    table = np.zeros((256, 3), dtype=np.uint8)
    table[:classes.num_classes] = np.asarray(colours[:classes.num_classes], dtype=np.uint8)
    return table
