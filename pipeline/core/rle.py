"""Run-length encoding of label maps, and the ``id,class,rle`` CSV table, as pure functions.

The usual Kaggle encoding: a binary mask is ``"start length start length ..."``, pixels numbered
from 1 in column-major order (top to bottom, then left to right) by default, or row-major
(``order: row``). A label map is one row per class present; a pixel no row covers belongs to no
class. Prepare decodes a training CSV with it (:mod:`pipeline.data.rle_csv`), submit writes one
and evaluate reads it back (:mod:`pipeline.submission.tables`), so the codec is defined here once.
Every problem with a string or a table is a :class:`PipelineError` naming ``name`` and its line.
"""

from __future__ import annotations

import csv
import io
import re
from typing import Iterable, NamedTuple, Sequence

import numpy as np

from pipeline.core.errors import PipelineError

RLE_ORDERS = ("column", "row")       # column: Kaggle's default (numpy order "F"); row: order "C"
RLE_COLUMNS = ("id", "class", "rle")  # the table's header
_RLE_TEXT = re.compile(r"[0-9\s]*", re.ASCII)
_CLASS_TEXT = re.compile(r"-?[0-9]+", re.ASCII)
_MAX_DIGITS = 18  # int64-safe; a longer number is beyond any image anyway


class RleRow(NamedTuple):
    """One row of a table: image id, class, the rle string, and its 1-based line in the file."""

    id: str
    cls: int
    rle: str
    line: int


def check_order(order: str, *, key: str) -> str:
    """``order`` if it is one of :data:`RLE_ORDERS`; else an error naming the params ``key``."""
    if order not in RLE_ORDERS:
        raise PipelineError(f"{key}: unknown rle order {order!r}; valid: {', '.join(RLE_ORDERS)}")
    return order


def _numpy_order(order: str) -> str:
    return "F" if check_order(order, key="rle order") == "column" else "C"


# ----------------------------------------------------------------------------- one mask
def rle_encode(mask: np.ndarray, *, order: str = "column") -> str:
    """HxW bool mask -> ``"start length ..."`` (1-based starts, runs in pixel order; "" if empty)."""
    flat = np.asarray(mask, dtype=bool).ravel(order=_numpy_order(order))
    padded = np.concatenate([[False], flat, [False]])
    edges = np.flatnonzero(padded[1:] != padded[:-1])  # run i covers edges[2i] .. edges[2i+1]-1
    starts, ends = edges[::2], edges[1::2]
    return " ".join(map(str, np.stack([starts + 1, ends - starts], axis=1).ravel().tolist()))


def rle_runs(text: str, *, size: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(starts, ends) of the runs of ``text`` as 0-based int64 [start, end) pixel ranges.

    Refused: anything but pairs of unsigned integers, a start below 1, a length below 1, a run
    past pixel ``size`` (H * W), and two runs covering one pixel. Runs may come in any order.
    """
    if not _RLE_TEXT.fullmatch(text):
        raise PipelineError(f"{name}: malformed rle {text[:40]!r} (expected 'start length' integers)")
    tokens = text.split()
    if len(tokens) % 2:
        raise PipelineError(f"{name}: malformed rle: {len(tokens)} numbers, not 'start length' pairs")
    values = np.array([int(t) if len(t) <= _MAX_DIGITS else 10 ** _MAX_DIGITS for t in tokens],
                      dtype=np.int64).reshape(-1, 2)
    starts, lengths = values[:, 0] - 1, values[:, 1]
    if (starts < 0).any() or (lengths < 1).any():
        bad = int(np.flatnonzero((starts < 0) | (lengths < 1))[0])
        raise PipelineError(f"{name}: malformed rle run '{values[bad, 0]} {values[bad, 1]}' (pixels "
                            "are numbered from 1 and a run has a length of 1 or more)")
    ends = starts + lengths
    if (ends > size).any():
        bad = int(np.argmax(ends))
        raise PipelineError(f"{name}: rle run '{values[bad, 0]} {values[bad, 1]}' ends at pixel "
                            f"{int(ends[bad])}, outside the image's {size} pixels")
    sort = np.argsort(starts, kind="stable")
    starts, ends = starts[sort], ends[sort]
    overlap = np.flatnonzero(starts[1:] < ends[:-1])
    if overlap.size:
        raise PipelineError(f"{name}: rle runs overlap at pixel {int(starts[overlap[0] + 1]) + 1}")
    return starts, ends


def _flat_mask(text: str, *, size: int, name: str) -> np.ndarray:
    starts, ends = rle_runs(text, size=size, name=name)
    delta = np.zeros(size + 1, dtype=np.int32)
    np.add.at(delta, starts, 1)
    np.add.at(delta, ends, -1)
    return np.cumsum(delta[:-1]) > 0


def _unflatten(flat: np.ndarray, shape: tuple[int, int], order: str) -> np.ndarray:
    return flat.reshape(shape, order=_numpy_order(order))


def rle_decode(text: str, *, shape: tuple[int, int], order: str = "column",
               name: str = "rle") -> np.ndarray:
    """``"start length ..."`` -> HxW bool mask of ``shape``; bad strings as :func:`rle_runs`."""
    height, width = shape
    return _unflatten(_flat_mask(text, size=height * width, name=name), (height, width), order)


# ----------------------------------------------------------------------------- label maps
def rle_rows(labels: np.ndarray, *, order: str = "column", skip: Iterable[int] = ()) -> list[tuple[int, str]]:
    """HxW integer labels -> [(class, rle)] for every value present, ascending, but ``skip``."""
    labels = np.asarray(labels)
    skipped = set(int(s) for s in skip)
    return [(int(c), rle_encode(labels == c, order=order)) for c in np.unique(labels)
            if int(c) not in skipped]


def rle_labels(rows: Sequence[RleRow], *, shape: tuple[int, int], num_classes: int, fill: int,
               order: str = "column", name: str = "table") -> np.ndarray:
    """An image's rows -> HxW uint8 labels; pixels no row covers hold ``fill``.

    A class outside 0..num_classes-1 and a pixel claimed by two rows are errors naming the lines.
    """
    height, width = shape
    size = height * width
    labels = np.full(size, fill, dtype=np.uint8)
    owner = np.full(size, -1, dtype=np.int64)  # index in ``rows`` of the row that claimed a pixel
    for k, row in enumerate(rows):
        where = f"{name} line {row.line}"
        if not 0 <= row.cls < num_classes:
            raise PipelineError(f"{where}: class {row.cls} is not a class (0..{num_classes - 1})")
        flat = _flat_mask(row.rle, size=size, name=where)
        taken = np.flatnonzero(flat & (owner >= 0))
        if taken.size:
            other = rows[int(owner[taken[0]])]
            raise PipelineError(f"{where}: class {row.cls} and class {other.cls} (line {other.line}) "
                                f"both cover pixel {int(taken[0]) + 1} of image '{row.id}'")
        owner[flat] = k
        labels[flat] = row.cls
    return _unflatten(labels, (height, width), order)


# ----------------------------------------------------------------------------- the table
def rle_table_text(rows: Iterable[tuple[str, int, str]]) -> str:
    """CSV text: the :data:`RLE_COLUMNS` header, then one ``id,class,rle`` line per row as given."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(RLE_COLUMNS)
    writer.writerows(rows)
    return buf.getvalue()


def read_rle_table(text: str, *, name: str) -> dict[str, list[RleRow]]:
    """{image id: its rows} of an ``id,class,rle`` table, in file order.

    Refused: another header, a line without three fields, a class that is no integer, and two
    rows of one image and class. An empty rle is a row without pixels (Kaggle writes those).
    """
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if header is None or [h.strip() for h in header] != list(RLE_COLUMNS):
        raise PipelineError(f"{name}: header is {','.join(header or [])!r}, expected "
                            f"{','.join(RLE_COLUMNS)!r}")
    table: dict[str, list[RleRow]] = {}
    first: dict[tuple[str, int], int] = {}
    for fields in reader:
        line = reader.line_num
        if not any(f.strip() for f in fields):
            continue
        if len(fields) != len(RLE_COLUMNS):
            raise PipelineError(f"{name} line {line}: {len(fields)} field(s), expected "
                                f"{len(RLE_COLUMNS)} ({','.join(RLE_COLUMNS)})")
        image, cls, rle = (f.strip() for f in fields)
        if not _CLASS_TEXT.fullmatch(cls):
            raise PipelineError(f"{name} line {line}: class {cls!r} is not an integer class id")
        row = RleRow(id=image, cls=int(cls), rle=rle, line=line)
        if (image, row.cls) in first:
            raise PipelineError(f"{name} line {line}: a second row of image '{image}' class {row.cls} "
                                f"(first: line {first[image, row.cls]})")
        first[image, row.cls] = line
        table.setdefault(image, []).append(row)
    return table
