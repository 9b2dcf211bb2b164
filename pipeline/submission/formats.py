"""Submission formats: how each test prediction is named in a zip and how its values are encoded.

A format is picked by name (``submit.format``; ``auto`` = the dataset's own) from :data:`FORMATS`.
Every entry is one single-channel uint8 PNG the size of its source image, except in ``rle_csv``:

==========  ===============================  ===================================  =================
format      entry name                       stored values                        fits datasets
==========  ===============================  ===================================  =================
folder      ``<frame id>.png``               train ids 0..C-1                     any
camvid      ``<frame id>.png`` (image stem)  train ids 0..10                      camvid
cityscapes  ``<city>_<seq>_<frame>.png``     labelIds (trainId 0..18 -> 7..33)    cityscapes
vspw        ``<video>/<frame>.png``          train ids + ``vspw_offset``          vspw, demo
rle_csv     ``submission.csv`` (one entry)   ``id,class,rle`` rows of train ids   any
==========  ===============================  ===================================  =================

* ``vspw``: ``<frame>`` is the original image stem, the name of its mask, as the official
  script opens ``<pred>/<video>/<mask name>``. That script maps the ground truth to 0..123
  (0 "others" and 255 void) and compares the predictions as read, so the default
  ``vspw_offset: 0`` writes train ids 0..123; ``1`` writes 1..124 like the stored masks, for
  tools that compare with raw masks. The demo has videos, so it may use this layout too.
* ``cityscapes``: the official ``evalPixelLevelSemanticLabeling.py`` walks the whole prediction
  folder for ``<city>_<seq>_<frame>*.png``, so flat files at the zip root are found; values are
  labelIds (the server does not read trainIds).
* ``rle_csv``: the usual Kaggle table (:mod:`pipeline.submission.tables`): one row per frame and
  class present in its prediction, ``rle`` the runs of that class (:mod:`pipeline.core.rle`),
  pixels numbered column-major, or row-major with ``submit.rle.order: row``. It is the single
  entry of the zip, so the zip, its JSON and evaluate.py work as for the other formats (Kaggle
  takes a zipped CSV; unzip it for a site that wants the bare file).
* No format wraps its entries in a top-level folder (a classic cause of rejected zips).

Writing and checking the zip itself: :mod:`pipeline.submission.zips`; the ``<name>.json`` beside
it: :mod:`pipeline.submission.sidecar`.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline.core.errors import PipelineError, unknown_name
from pipeline.core.rle import RLE_ORDERS, check_order
from pipeline.data.cityscapes import CITYSCAPES_TRAIN_TO_LABEL, cityscapes_label_lut
from pipeline.data.manifest import IGNORE_INDEX, INVALID, Frame

ANY_DATASET = "*"
AUTO = "auto"
VSPW_OFFSETS = (0, 1)
RLE_CSV = "rle_csv"
TABLE_ENTRY = "submission.csv"  # the one entry of an rle_csv zip


@dataclass(frozen=True)
class SubmissionFormat:
    """Entry names, value encoding and the datasets a submission format fits."""

    name: str
    datasets: tuple[str, ...]   # dataset names (classes.json "dataset") it fits; "*" = any
    layout: str                 # entry names, for messages
    pattern: str                # regex every entry name must match
    offset: int = 0             # vspw only: added to train ids
    rle_order: str = ""         # rle_csv only: pixel numbering, column | row; "" = PNG entries

    @property
    def table(self) -> bool:
        """True for a format whose zip holds one CSV table (:data:`TABLE_ENTRY`), not PNGs."""
        return bool(self.rle_order)

    def fits(self, dataset: str) -> bool:
        return ANY_DATASET in self.datasets or dataset in self.datasets

    def entry_name(self, frame: Frame) -> str:
        """The zip entry of ``frame``'s prediction; a frame the layout cannot name is an error."""
        if self.table:
            raise ValueError(f"format {self.name}: frames are rows of {TABLE_ENTRY}, not entries")
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
    RLE_CSV: SubmissionFormat(RLE_CSV, (ANY_DATASET,), f"{TABLE_ENTRY} of id,class,rle rows",
                              re.escape(TABLE_ENTRY), rle_order=RLE_ORDERS[0]),
}
DATASET_FORMAT = {"camvid": "camvid", "cityscapes": "cityscapes", "vspw": "vspw",
                  RLE_CSV: RLE_CSV}  # for "auto"; the rle_csv adapter names its dataset rle_csv


def get_format(name: str, *, dataset: str, vspw_offset: int = 0,
               rle_order: str = RLE_ORDERS[0]) -> SubmissionFormat:
    """The format called ``name`` (``auto``: the dataset's own, else ``folder``), checked to fit.

    ``dataset`` is classes.json's "dataset" field; a format made for another dataset is refused.
    ``vspw_offset`` applies to ``vspw`` only, ``rle_order`` (column | row) to ``rle_csv`` only.
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
    if name == RLE_CSV:
        fmt = dataclasses.replace(fmt, rle_order=check_order(rle_order, key="submit.rle.order"))
    return fmt


def expected_entries(fmt: SubmissionFormat, frames: Sequence[Frame]) -> dict[str, Frame]:
    """{entry name: frame} sorted by name; two frames with one entry name are an error.
    A table format has no entry per frame: see :mod:`pipeline.submission.tables`."""
    entries: dict[str, Frame] = {}
    for frame in frames:
        name = fmt.entry_name(frame)
        if name in entries:
            raise PipelineError(f"frames '{entries[name].id}' and '{frame.id}' would both be "
                                f"'{name}' in the {fmt.name} layout")
        entries[name] = frame
    return dict(sorted(entries.items()))
