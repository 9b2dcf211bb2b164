"""The ``rle_csv`` submission: one ``id,class,rle`` table of every test frame, written, checked and
read back as predictions.

Rows are sorted by frame id, then class; a frame has one row per class present in its prediction
(void is never predicted, so never a row), ``rle`` numbering pixels as the format's ``rle_order``
says (:mod:`pipeline.core.rle`). Reading a table trusts nothing: a header other than
``id,class,rle``, a class out of range, a run outside its frame, two rows on one pixel, an id of no
frame and a frame without rows are one-line errors naming the table and line. Its bytes are
capped by :func:`table_size_limit` before they are read. The zip around it: :mod:`pipeline.submission.zips`.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import numpy as np
from tqdm import tqdm

from pipeline.core.errors import PipelineError
from pipeline.core.rle import read_rle_table, rle_labels, rle_rows, rle_table_text
from pipeline.data.manifest import IGNORE_INDEX, Frame
from pipeline.submission.formats import SubmissionFormat

SizeOf = Callable[[Frame], tuple[int, int]]  # a frame's (height, width)
ROW_OVERHEAD = 16  # bytes: the class, two commas, a newline, quotes around an odd id


def table_size_limit(frames: Iterable[Frame], *, size_of: SizeOf, num_classes: int) -> int:
    """Most bytes a table of ``frames`` can legitimately take: the cap on a zip entry's inflated
    size, checked before it is read. A frame of P pixels has at most P runs, each at most
    ``2 (digits of P + 1)`` characters, in at most ``min(P, num_classes)`` rows of its id."""
    total = 64  # the header
    for frame in frames:
        height, width = size_of(frame)
        pixels = height * width
        rows = min(pixels, num_classes)
        total += 2 * pixels * (len(str(pixels)) + 1) + rows * (2 * len(frame.id.encode()) + ROW_OVERHEAD)
    return total


def table_text(fmt: SubmissionFormat, frames: Sequence[Frame], load: Callable[[Frame], np.ndarray], *,
               num_classes: int, describe: Callable[[Frame], str], progress: bool = False) -> str:
    """The CSV text of ``load(frame)`` (HxW train ids, no void) for every frame, sorted by id."""
    rows = []
    for frame in tqdm(sorted(frames, key=lambda f: f.id), desc="submit", unit="frame",
                      disable=not progress):
        stored = fmt.encode(load(frame), num_classes=num_classes, name=describe(frame))
        rows.extend((frame.id, cls, rle) for cls, rle in
                    rle_rows(stored, order=fmt.rle_order, skip=(IGNORE_INDEX,)))
    return rle_table_text(rows)


class TablePredictions:
    """An ``id,class,rle`` table as a prediction source: ``source(frame)`` gives HxW uint8 train
    ids, 255 (no prediction) where no row covers a pixel. Parsed (header, fields, classes as
    integers, no duplicate image and class) when made; runs are decoded per frame."""

    def __init__(self, text: str, *, fmt: SubmissionFormat, num_classes: int, name: str, size_of: SizeOf):
        self.fmt, self.num_classes, self.name, self.size_of = fmt, num_classes, name, size_of
        self.rows = read_rle_table(text, name=name)

    def __enter__(self) -> "TablePredictions":
        return self

    def __exit__(self, *exc) -> None:
        pass

    def describe(self, frame: Frame) -> str:
        return f"{self.name} rows of '{frame.id}'"

    def missing(self, frames: Sequence[Frame]) -> list[Frame]:
        return [f for f in frames if f.id not in self.rows]

    def unmatched(self, frames: Sequence[Frame]) -> list[str]:
        """Sorted ids of the table that are none of ``frames``'."""
        return sorted(set(self.rows) - {f.id for f in frames})

    def __call__(self, frame: Frame) -> np.ndarray:
        return rle_labels(self.rows.get(frame.id, []), shape=self.size_of(frame),
                          num_classes=self.num_classes, fill=IGNORE_INDEX, order=self.fmt.rle_order,
                          name=self.name)


def check_table(source: TablePredictions, *, frames: Sequence[Frame], progress: bool = False) -> dict:
    """Verify a submission table: rows of exactly ``frames``, each pixel of each frame covered by
    one row of a class. Raises a PipelineError naming the table and line or frame."""
    stray = source.unmatched(frames)
    if stray:
        raise PipelineError(f"{source.name}: rows of image '{stray[0]}', which is no test frame "
                            f"({len(stray)} such id(s))")
    missing = source.missing(frames)
    if missing:
        raise PipelineError(f"{source.name}: {len(missing)} of {len(frames)} test frames have no row; "
                            f"first missing: '{missing[0].id}'")
    for frame in tqdm(frames, desc="check table", unit="frame", disable=not progress):
        uncovered = int((source(frame) == IGNORE_INDEX).sum())
        if uncovered:
            raise PipelineError(f"{source.name}: {uncovered} pixel(s) of frame '{frame.id}' are in no "
                                "row; a submission needs a class for every pixel")
    return {"entries": 1, "rows": sum(len(r) for r in source.rows.values()), "format": source.fmt.name}
