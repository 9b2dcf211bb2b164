"""Submission zips: PNG entries written deterministically, and read back or checked trusting nothing.

Zips are deterministic: sorted entries, date 1980-01-01, mode 0644, deflate level 6, and PNGs
written with a fixed compression level: the same predictions give the same bytes.

Reading a zip back (:func:`check_zip`, :class:`ZipPredictions`) trusts nothing in it: an entry
name found twice is refused (``zipfile`` would silently give the last copy); each entry's
inflated size is checked from its header against :func:`png_size_limit` of its frame before a
byte is inflated, and a PNG's header size before its pixels are decoded, so a zip bomb costs
no memory; :class:`ZipPredictions` also names entries that match no frame
(:meth:`ZipPredictions.unmatched`).

Entry names and stored values come from the format (:mod:`pipeline.submission.formats`). An
``rle_csv`` zip holds one CSV entry instead (:func:`read_table`, checked and decoded by
:mod:`pipeline.submission.tables`); :func:`open_predictions` opens either kind for scoring.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from pipeline.core.atomic import atomic_path
from pipeline.core.errors import PipelineError
from pipeline.data.manifest import ClassInfo, Frame
from pipeline.submission.formats import TABLE_ENTRY, SubmissionFormat, expected_entries, get_format
from pipeline.submission.tables import TablePredictions, check_table, table_size_limit

ZIP_DATE = (1980, 1, 1, 0, 0, 0)
ZIP_LEVEL = 6
PNG_LEVEL = 6
ENTRY_MODE = 0o100644  # regular file, rw-r--r--
PNG_OVERHEAD = 1 << 20  # bytes: PNG signature, IHDR, PLTE, tRNS and any metadata chunks


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


def open_zip(path: Path, label: str | None = None, *, what: str = "submission zip") -> zipfile.ZipFile:
    """``zipfile.ZipFile(path)``; a missing or unreadable file is one line naming ``label``
    (default: the path) and ``what`` it should have been."""
    try:
        return zipfile.ZipFile(path)
    except FileNotFoundError:
        raise PipelineError(f"{label or path}: {what} not found") from None
    except (zipfile.BadZipFile, OSError) as err:
        raise PipelineError(f"{label or path}: not a readable zip ({what}: {err})") from None


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
    if fmt.table:
        source = read_table(path, fmt=fmt, frames=frames, num_classes=classes.num_classes, label=shown)
        return check_table(source, frames=frames, progress=progress)
    expected = expected_entries(fmt, frames)
    folders = {n.rsplit("/", 1)[0] + "/" for n in expected if "/" in n}
    with open_zip(path, shown) as zf:
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


def read_table(path: str | Path, *, fmt: SubmissionFormat, frames: Sequence[Frame], num_classes: int,
               label: str | None = None) -> TablePredictions:
    """The table of an ``rle_csv`` zip: its only entry :data:`TABLE_ENTRY`, no larger than a table
    of ``frames`` can be (:func:`table_size_limit`, from the header before it is inflated)."""
    path = Path(path)
    shown = label or str(path)
    with open_zip(path, shown) as zf:
        _unique_names(zf, shown)
        files = [i.filename for i in zf.infolist() if not i.is_dir()]
        extra = [n for n in zf.namelist() if n != TABLE_ENTRY]
        if extra:
            wrap = _wrapper(files, {TABLE_ENTRY: None})
            where = f"inside the folder '{wrap}'" if wrap else f"beside it ('{extra[0]}')"
            raise PipelineError(f"{shown}: the {fmt.name} format expects the single entry "
                                f"'{TABLE_ENTRY}' at the zip root; found entries {where}")
        if TABLE_ENTRY not in files:
            raise PipelineError(f"{shown}: no entry '{TABLE_ENTRY}' (the {fmt.name} format's table)")
        where = f"{shown}:{TABLE_ENTRY}"
        limit = table_size_limit(frames, size_of=frame_size, num_classes=num_classes)
        inflated = zf.getinfo(TABLE_ENTRY).file_size
        if inflated > limit:
            raise PipelineError(f"{where}: inflates to {inflated} bytes, more than a table of "
                                f"{len(frames)} frame(s) can take ({limit}); not read")
        data = _read_entry(zf, TABLE_ENTRY, where=where)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise PipelineError(f"{where}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    return TablePredictions(text, fmt=fmt, num_classes=num_classes, name=where, size_of=frame_size)


def open_predictions(path: str | Path, *, fmt: SubmissionFormat, num_classes: int,
                     frames: Sequence[Frame]) -> "ZipPredictions | TablePredictions":
    """A submission zip as a prediction source of either kind (``frames``: the split's, which
    bound a table's size). Use as a context manager."""
    if fmt.table:
        return read_table(path, fmt=fmt, frames=frames, num_classes=num_classes)
    return ZipPredictions(path, fmt=fmt, num_classes=num_classes)


class ZipPredictions:
    """A submission zip as a prediction source: ``source(frame)`` gives HxW uint8 train ids
    (void values of the format -> 255 = no prediction). Use as a context manager.

    Opening refuses an entry name found twice. Each entry's inflated size is checked against
    :func:`png_size_limit` of its frame (:func:`frame_size`) before it is read, and its PNG
    header size before it is decoded. :meth:`unmatched` lists entries that are no frame's.
    """

    def __init__(self, path: str | Path, *, fmt: SubmissionFormat, num_classes: int):
        self.path, self.fmt, self.num_classes = Path(path), fmt, num_classes
        self._zip = open_zip(self.path)
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
