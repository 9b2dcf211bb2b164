"""Submission formats: how test predictions are named and encoded in a zip, and the zip's checks.

A format is picked by name (``submit.format``; ``auto`` = the dataset's own) from :data:`FORMATS`.
Every entry is one single-channel uint8 PNG the size of its source image:

==========  ===============================  ===================================  =================
format      entry name                       stored values                        fits datasets
==========  ===============================  ===================================  =================
folder      ``<frame id>.png``               train ids 0..C-1                     any
camvid      ``<frame id>.png`` (image stem)  train ids 0..10                      camvid
cityscapes  ``<city>_<seq>_<frame>.png``     labelIds (trainId 0..18 -> 7..33)    cityscapes
vspw        ``<video>/<frame>.png``          train ids + ``vspw_offset``          vspw, demo
==========  ===============================  ===================================  =================

* ``vspw``: ``<frame>`` is the original image stem, the name of its mask, as the official
  script opens ``<pred>/<video>/<mask name>``. That script maps the ground truth to 0..123
  (0 "others" and 255 void) and compares the predictions as read, so the default
  ``vspw_offset: 0`` writes train ids 0..123; ``1`` writes 1..124 like the stored masks, for
  tools that compare with raw masks. The demo has videos, so it may use this layout too.
* ``cityscapes``: the official ``evalPixelLevelSemanticLabeling.py`` walks the whole prediction
  folder for ``<city>_<seq>_<frame>*.png``, so flat files at the zip root are found; values are
  labelIds (the server does not read trainIds).
* No format wraps its entries in a top-level folder (a classic cause of rejected zips).

Zips are deterministic: sorted entries, date 1980-01-01, mode 0644, deflate level 6, and PNGs
written with a fixed compression level: the same predictions give the same bytes.

Reading a zip back (:func:`check_zip`, :class:`ZipPredictions`) trusts nothing in it: an entry
name found twice is refused (``zipfile`` would silently give the last copy); each entry's
inflated size is checked from its header against :func:`png_size_limit` of its frame before a
byte is inflated, and a PNG's header size before its pixels are decoded, so a zip bomb costs
no memory; :class:`ZipPredictions` also names entries that match no frame
(:meth:`ZipPredictions.unmatched`). The ``<name>.json`` beside a zip is read through
:func:`read_sidecar`, which checks that its sha256 is the zip's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from pipeline.core.atomic import atomic_path
from pipeline.data.cityscapes import CITYSCAPES_TRAIN_TO_LABEL, cityscapes_label_lut
from pipeline.data.manifest import IGNORE_INDEX, INVALID, ClassInfo, Frame
from pipeline.core.errors import PipelineError, unknown_name

ANY_DATASET = "*"
AUTO = "auto"
ZIP_DATE = (1980, 1, 1, 0, 0, 0)
ZIP_LEVEL = 6
PNG_LEVEL = 6
ENTRY_MODE = 0o100644  # regular file, rw-r--r--
VSPW_OFFSETS = (0, 1)
PNG_OVERHEAD = 1 << 20  # bytes: PNG signature, IHDR, PLTE, tRNS and any metadata chunks


@dataclass(frozen=True)
class SubmissionFormat:
    """Entry names, value encoding and the datasets a submission format fits."""

    name: str
    datasets: tuple[str, ...]   # dataset names (classes.json "dataset") it fits; "*" = any
    layout: str                 # entry names, for messages
    pattern: str                # regex every entry name must match
    offset: int = 0             # vspw only: added to train ids

    def fits(self, dataset: str) -> bool:
        return ANY_DATASET in self.datasets or dataset in self.datasets

    def entry_name(self, frame: Frame) -> str:
        """The zip entry of ``frame``'s prediction; a frame the layout cannot name is an error."""
        if self.name == "vspw":
            name = f"{frame.video}/{Path(frame.image).stem}.png"
        else:
            name = f"{frame.id}.png"
        if not re.fullmatch(self.pattern, name):
            raise PipelineError(f"frame '{frame.id}': entry name '{name}' does not fit the "
                                f"{self.name} layout {self.layout}")
        return name

    def stored_values(self, num_classes: int) -> np.ndarray:
        """[num_classes] uint8: the value stored for each train id."""
        if self.name == "cityscapes":
            if num_classes != len(CITYSCAPES_TRAIN_TO_LABEL):
                raise PipelineError(f"format cityscapes needs {len(CITYSCAPES_TRAIN_TO_LABEL)} "
                                    f"classes, the dataset has {num_classes}")
            return np.asarray(CITYSCAPES_TRAIN_TO_LABEL, dtype=np.uint8)
        if num_classes + self.offset > 255:
            raise PipelineError(f"format {self.name}: {num_classes} classes (+ offset {self.offset}) "
                                "do not fit uint8 values below 255")
        return (np.arange(num_classes) + self.offset).astype(np.uint8)

    def decode_lut(self, num_classes: int) -> np.ndarray:
        """256-entry int16 LUT stored value -> train id; void values -> 255, the rest INVALID."""
        if self.name == "cityscapes":
            lut = cityscapes_label_lut()  # unevaluated labelIds are void, as on the server
        else:
            lut = np.full(256, INVALID, dtype=np.int16)
            lut[IGNORE_INDEX] = IGNORE_INDEX
            if self.name == "vspw" and self.offset:
                lut[:self.offset] = IGNORE_INDEX  # raw 0 = "others", void in VSPW
        lut[self.stored_values(num_classes)] = np.arange(num_classes)
        return lut

    def encode(self, train_ids: np.ndarray, *, num_classes: int, name: str) -> np.ndarray:
        """HxW train ids (no void allowed) -> HxW uint8 stored values; ``name`` is for errors."""
        train_ids = np.asarray(train_ids)
        bad = (train_ids < 0) | (train_ids >= num_classes)
        if bad.any():
            void = int((train_ids == IGNORE_INDEX).sum())
            if void:
                raise PipelineError(f"{name}: {void} pixel(s) are void ({IGNORE_INDEX}); a submission "
                                    "needs a class for every pixel")
            raise PipelineError(f"{name}: value {int(train_ids[bad].max())} is not a class "
                                f"(0..{num_classes - 1})")
        return self.stored_values(num_classes)[train_ids]

    def decode(self, stored: np.ndarray, *, num_classes: int, name: str,
               strict: bool = False) -> np.ndarray:
        """HxW stored values -> HxW uint8 train ids (void values -> 255 unless ``strict``)."""
        mapped = self.decode_lut(num_classes)[np.asarray(stored)]
        bad = (mapped < 0) | ((mapped == IGNORE_INDEX) if strict else False)
        if np.any(bad):
            values = np.unique(np.asarray(stored)[bad])
            valid = self.stored_values(num_classes)
            raise PipelineError(f"{name}: value {int(values[0])} is outside the {self.name} format's "
                                f"range ({_ranges(valid)}); {values.size} such value(s)")
        return mapped.astype(np.uint8)


def _ranges(values: np.ndarray) -> str:
    """'1..10' for a contiguous run, else the list."""
    values = sorted(int(v) for v in values)
    if values == list(range(values[0], values[-1] + 1)):
        return f"{values[0]}..{values[-1]}"
    return ", ".join(map(str, values))


FORMATS: dict[str, SubmissionFormat] = {
    "folder": SubmissionFormat("folder", (ANY_DATASET,), "<id>.png", r"[^/]+\.png"),
    "camvid": SubmissionFormat("camvid", ("camvid",), "<image stem>.png", r"[^/]+\.png"),
    "cityscapes": SubmissionFormat("cityscapes", ("cityscapes",), "<city>_<seq>_<frame>.png",
                                   r"[^/_]+_\d+_\d+\.png"),
    "vspw": SubmissionFormat("vspw", ("vspw", "demo"), "<video>/<frame>.png", r"[^/]+/[^/]+\.png"),
}
DATASET_FORMAT = {"camvid": "camvid", "cityscapes": "cityscapes", "vspw": "vspw"}  # for "auto"


def get_format(name: str, *, dataset: str, vspw_offset: int = 0) -> SubmissionFormat:
    """The format called ``name`` (``auto``: the dataset's own, else ``folder``), checked to fit.

    ``dataset`` is classes.json's "dataset" field; a format made for another dataset is refused.
    """
    if name == AUTO:
        name = DATASET_FORMAT.get(dataset, "folder")
    if name not in FORMATS:
        raise unknown_name("submission format", name, [*FORMATS, AUTO])
    fmt = FORMATS[name]
    if not fmt.fits(dataset):
        fitting = [n for n, f in FORMATS.items() if f.fits(dataset)]
        raise PipelineError(f"submission format '{name}' does not fit dataset '{dataset or 'unnamed'}' "
                            f"(classes.json); formats for it: {', '.join(fitting)}")
    if name == "vspw":
        if vspw_offset not in VSPW_OFFSETS:
            raise PipelineError(f"vspw_offset must be 0 (train ids) or 1 (stored ids), got {vspw_offset!r}")
        fmt = dataclasses.replace(fmt, offset=int(vspw_offset))
    return fmt


def expected_entries(fmt: SubmissionFormat, frames: Sequence[Frame]) -> dict[str, Frame]:
    """{entry name: frame} sorted by name; two frames with one entry name are an error."""
    entries: dict[str, Frame] = {}
    for frame in frames:
        name = fmt.entry_name(frame)
        if name in entries:
            raise PipelineError(f"frames '{entries[name].id}' and '{frame.id}' would both be "
                                f"'{name}' in the {fmt.name} layout")
        entries[name] = frame
    return dict(sorted(entries.items()))


def frame_size(frame: Frame) -> tuple[int, int]:
    """(height, width) of the source image: from the manifest, else the image header, else the
    mask's (a labelled frame scored without its image)."""
    if frame.height > 0 and frame.width > 0:
        return frame.height, frame.width
    for path in (frame.image, frame.mask):
        if not path:
            continue
        try:
            with Image.open(path) as img:
                return img.height, img.width
        except (OSError, ValueError):
            continue
    raise PipelineError(f"{frame.image}: cannot read the size of frame '{frame.id}'")


def png_size_limit(height: int, width: int) -> int:
    """Most bytes an 8-bit single-channel PNG of HxW can legitimately take: the cap on a zip
    entry's inflated size (``ZipInfo.file_size``), checked before the entry is read.

    Filtered, the pixels are H * (W + 1) bytes (a filter byte per row). An encoder that does
    not compress at all stores them in deflate "stored" blocks (5 bytes per block of up to
    65535) inside IDAT chunks (12 bytes each): less than twice the data for any chunks of 12
    or more bytes, hence 2 H (W + 1). :data:`PNG_OVERHEAD` (1 MiB) covers the signature,
    IHDR, a palette, transparency and metadata (text, ICC profile). A 16-bit PNG of the right
    size (2 H W + H bytes) still fits, to be refused by its mode with a clear message.
    """
    return 2 * height * (width + 1) + PNG_OVERHEAD


def sha256_of(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------- PNG and zip bytes
def png_bytes(values: np.ndarray) -> bytes:
    """Encode HxW uint8 as a greyscale PNG (fixed settings, no metadata: same array, same bytes)."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(values, dtype=np.uint8)).save(buf, format="PNG",
                                                                      compress_level=PNG_LEVEL)
    return buf.getvalue()


def read_png(data: bytes, *, name: str, size: tuple[int, int] | None = None,
             size_of: str = "its frame") -> np.ndarray:
    """Decode one entry's bytes to HxW uint8; anything but a single-channel uint8 PNG is an error.

    ``size`` (H, W): the size it must have, checked from the PNG header before the pixels are
    decoded (a tiny PNG can declare a huge image); ``size_of`` names that size in the message.
    """
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format != "PNG":
                raise PipelineError(f"{name}: is {img.format}, expected a PNG")
            if size is not None and (img.height, img.width) != tuple(size):
                raise PipelineError(f"{name}: size {img.height}x{img.width} differs from "
                                    f"{size_of} ({size[0]}x{size[1]}, HxW)")
            if img.mode not in ("L", "P"):
                raise PipelineError(f"{name}: PNG mode is {img.mode}, expected single-channel uint8 (L)")
            img.load()
            return np.asarray(img)
    except PipelineError:
        raise
    except Exception as err:  # PIL raises many types for corrupt data
        raise PipelineError(f"{name}: unreadable PNG ({type(err).__name__})") from None


def write_zip_entries(dest: str | Path, entries: Iterable[tuple[str, bytes]]) -> None:
    """Write ``(name, bytes)`` entries, given in sorted order, as a deterministic zip at ``dest``
    in place (for a caller that manages its own temporary file; else :func:`write_zip`)."""
    previous = None
    with zipfile.ZipFile(dest, "w") as zf:
        for name, data in entries:
            if previous is not None and name <= previous:
                raise ValueError(f"zip entries must be unique and sorted: '{name}' after '{previous}'")
            info = zipfile.ZipInfo(name, date_time=ZIP_DATE)
            info.create_system = 3  # unix, so external_attr means the same everywhere
            info.external_attr = ENTRY_MODE << 16
            zf.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=ZIP_LEVEL)
            previous = name


def write_zip(path: str | Path, entries: Iterable[tuple[str, bytes]], *, check=None) -> None:
    """Write ``(name, bytes)`` entries, given in sorted order, as a deterministic zip, atomically.

    ``check(tmp_path)`` runs on the finished temporary zip before it replaces ``path``; if it
    raises, ``path`` is left as it was and the temporary zip is removed.
    """
    with atomic_path(path) as tmp:
        write_zip_entries(tmp, entries)
        if check is not None:
            check(tmp)


def _open_zip(path: Path, label: str | None = None) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except FileNotFoundError:
        raise PipelineError(f"{label or path}: submission zip not found") from None
    except (zipfile.BadZipFile, OSError) as err:
        raise PipelineError(f"{label or path}: not a readable zip ({err})") from None


def _unique_names(zf: zipfile.ZipFile, shown: str) -> None:
    """Refuse an entry name found twice: ``zipfile`` reads the last copy, the first is hidden."""
    seen: set[str] = set()
    for info in zf.infolist():
        if info.filename in seen:
            count = sum(i.filename == info.filename for i in zf.infolist())
            raise PipelineError(f"{shown}: entry '{info.filename}' appears {count} times; "
                                "which copy is meant is ambiguous")
        seen.add(info.filename)


def _read_entry(zf: zipfile.ZipFile, name: str, *, where: str, limit: int | None = None,
                size: tuple[int, int] | None = None) -> bytes:
    """An entry's bytes; over ``limit`` (from the header, before reading) is an error."""
    if limit is not None:
        inflated = zf.getinfo(name).file_size
        if inflated > limit:
            shape = f"{size[0]}x{size[1]} " if size else ""
            raise PipelineError(f"{where}: inflates to {inflated} bytes, more than a {shape}8-bit "
                                f"PNG can take ({limit}); not read")
    try:
        return zf.read(name)  # stops at the header's size: a lying header fails the CRC
    except Exception as err:  # bad CRC, encrypted entry, corrupt deflate stream
        raise PipelineError(f"{where}: unreadable zip entry ({type(err).__name__}: {err})") from None


def _wrapper(names: Sequence[str], expected: Mapping[str, Frame]) -> str | None:
    """The one top-level folder all ``names`` sit in when removing it gives expected names."""
    tops = {n.split("/", 1)[0] for n in names}
    if len(tops) == 1 and all("/" in n for n in names):
        if any(n.split("/", 1)[1] in expected for n in names):
            return tops.pop() + "/"
    return None


def check_zip(path: str | Path, *, fmt: SubmissionFormat | str, frames: Sequence[Frame], classes: ClassInfo,
              progress: bool = False, label: str | None = None) -> dict:
    """Verify a submission zip: one entry per frame in ``fmt``'s layout and nothing else, each a
    single-channel uint8 PNG of its source image's size (HxW) holding only the format's class
    values (no void). Raises a PipelineError naming the zip and entry; returns a small summary.
    ``fmt`` may be a name (checked against ``classes.dataset``; vspw then uses offset 0).
    ``label`` names the zip in messages (default: ``path``; the final name of a temporary file).
    """
    path = Path(path)
    shown = label or str(path)
    if isinstance(fmt, str):
        fmt = get_format(fmt, dataset=classes.dataset)
    expected = expected_entries(fmt, frames)
    folders = {n.rsplit("/", 1)[0] + "/" for n in expected if "/" in n}
    with _open_zip(path, shown) as zf:
        _unique_names(zf, shown)
        infos = zf.infolist()
        seen = {i.filename for i in infos}
        files = [i.filename for i in infos if not i.is_dir()]
        extra = [n for n in files if n not in expected]
        extra += [i.filename for i in infos if i.is_dir() and i.filename not in folders]
        if extra:
            wrap = _wrapper(files, expected)
            if wrap:
                raise PipelineError(f"{shown}: every entry is inside the folder '{wrap}'; the {fmt.name} "
                                    f"format expects {fmt.layout} at the zip root")
            raise PipelineError(f"{shown}: unexpected entry '{extra[0]}' ({len(extra)} entr(ies) that are "
                                f"not {fmt.layout} of a test frame)")
        missing = [n for n in expected if n not in seen]
        if missing:
            raise PipelineError(f"{shown}: {len(missing)} of {len(expected)} test frames have no entry; "
                                f"first missing: '{missing[0]}' (frame '{expected[missing[0]].id}')")
        for name, frame in tqdm(expected.items(), desc="check zip", unit="entry", disable=not progress):
            where = f"{shown}:{name}"
            size = frame_size(frame)
            data = _read_entry(zf, name, where=where, limit=png_size_limit(*size), size=size)
            values = read_png(data, name=where, size=size, size_of=f"the image of frame '{frame.id}'")
            fmt.decode(values, num_classes=classes.num_classes, name=where, strict=True)
    return {"entries": len(expected), "format": fmt.name}


# ----------------------------------------------------------------------------- reading a zip back
def sidecar_path(zip_path: str | Path) -> Path:
    """``submissions/<name>.json`` beside ``submissions/<name>.zip``."""
    return Path(zip_path).with_suffix(".json")


def read_sidecar(zip_path: str | Path) -> dict:
    """The ``<name>.json`` beside a zip ({} without one), checked to describe this very zip.

    submit.py writes the JSON last and deletes the old one before it replaces the zip, so a
    kill leaves a zip with no JSON, never a zip beside another zip's JSON; a JSON whose
    ``bytes`` / ``sha256`` differ from the zip's (a partial copy, a hand edit) is refused here,
    naming both files, rather than read as the zip's format or shown as its hash.
    """
    side = sidecar_path(zip_path)
    if not side.is_file():
        return {}
    try:
        info = json.loads(side.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PipelineError(f"{side}: corrupt submission manifest ({err})") from None
    if not isinstance(info, dict):
        raise PipelineError(f"{side}: corrupt submission manifest (not a JSON object)")
    zip_path = Path(zip_path)
    if info.get("sha256") and zip_path.is_file():
        size = zip_path.stat().st_size
        if info.get("bytes", size) != size or sha256_of(zip_path) != info["sha256"]:
            raise PipelineError(f"{side}: describes another zip than {zip_path} (sha256 "
                                f"{str(info['sha256'])[:12]}... differs); re-run pipeline/submit.py, "
                                f"or delete it and pass --format")
    return info


def zip_format_name(zip_path: str | Path, *, fmt: str | None = None,
                    vspw_offset: int | None = None) -> tuple[str, int]:
    """(format name, vspw offset) of a zip: the explicit arguments win, then the sidecar JSON
    (read, and checked against the zip by :func:`read_sidecar`, only when it is needed)."""
    side = sidecar_path(zip_path)
    need = fmt is None or (fmt == "vspw" and vspw_offset is None)
    info = read_sidecar(zip_path) if need else {}
    name = fmt or info.get("format")
    if not name:
        raise PipelineError(f"{zip_path}: no {side.name} beside it names its format; pass --format "
                            f"(one of {', '.join(sorted(FORMATS))})")
    offset = vspw_offset if vspw_offset is not None else info.get("vspw_offset", 0)
    return str(name), int(offset)


class ZipPredictions:
    """A submission zip as a prediction source: ``source(frame)`` gives HxW uint8 train ids
    (void values of the format -> 255 = no prediction). Use as a context manager.

    Opening refuses an entry name found twice. Each entry's inflated size is checked against
    :func:`png_size_limit` of its frame (:func:`frame_size`) before it is read, and its PNG
    header size before it is decoded. :meth:`unmatched` lists entries that are no frame's.
    """

    def __init__(self, path: str | Path, *, fmt: SubmissionFormat, num_classes: int):
        self.path, self.fmt, self.num_classes = Path(path), fmt, num_classes
        self._zip = _open_zip(self.path)
        try:
            _unique_names(self._zip, str(self.path))
        except BaseException:
            self._zip.close()
            raise
        self._names = set(self._zip.namelist())

    def __enter__(self) -> "ZipPredictions":
        return self

    def __exit__(self, *exc) -> None:
        self._zip.close()

    def describe(self, frame: Frame) -> str:
        return f"{self.path}:{self.fmt.entry_name(frame)}"

    def missing(self, frames: Sequence[Frame]) -> list[Frame]:
        return [f for f in frames if self.fmt.entry_name(f) not in self._names]

    def unmatched(self, frames: Sequence[Frame]) -> list[str]:
        """Sorted file entries that are the entry of none of ``frames`` (folder entries are
        skipped: they hold nothing to score)."""
        expected = {self.fmt.entry_name(f) for f in frames}
        return sorted(i.filename for i in self._zip.infolist()
                      if not i.is_dir() and i.filename not in expected)

    def __call__(self, frame: Frame) -> np.ndarray:
        entry, name = self.fmt.entry_name(frame), self.describe(frame)
        size = frame_size(frame)
        data = _read_entry(self._zip, entry, where=name, limit=png_size_limit(*size), size=size)
        stored = read_png(data, name=name, size=size, size_of=f"frame '{frame.id}'")
        return self.fmt.decode(stored, num_classes=self.num_classes, name=name)
