"""Cityscapes: the official labelId -> trainId table and the adapter for its folder layout.

Layout: ``leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png`` with labels at
``gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png`` (or ``..._labelTrainIds.png``
made by cityscapesscripts' ``createTrainIdLabelImgs``). The 34 labelIds are mapped to the 19
evaluated trainIds on read; :data:`CITYSCAPES_TRAIN_TO_LABEL` goes back for a test submission,
which the official server expects in labelIds.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.core.errors import PipelineError
from pipeline.data.manifest import IGNORE_INDEX, INVALID, ClassInfo, Frame, identity_lut

CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)
CITYSCAPES_PALETTE = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
    (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
    (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
    (0, 80, 100), (0, 0, 230), (119, 11, 32),
)
# trainId -> labelId, in trainId order (cityscapesscripts/helpers/labels.py).
CITYSCAPES_TRAIN_TO_LABEL = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)
CITYSCAPES_LABEL_TO_TRAIN = {label: train for train, label in enumerate(CITYSCAPES_TRAIN_TO_LABEL)}
CITYSCAPES_NUM_LABEL_IDS = 34  # labelIds 0..33; those not in the table above are void

LABEL_KINDS = ("auto", "labelIds", "labelTrainIds")
_STEM = re.compile(r"^(?P<video>.+)_(?P<frame>\d+)$")  # <city>_<seq>_<frame>


def cityscapes_label_lut() -> np.ndarray:
    """256-entry int16 LUT from a gtFine labelId to a trainId (void labelIds -> 255).

    Raw 255 is void too: the license-plate label (id -1) wraps to 255 in uint8 exports.
    Values 34..254 are INVALID, so a trainId PNG passed by mistake is caught early.
    """
    lut = np.full(256, INVALID, dtype=np.int16)
    lut[:CITYSCAPES_NUM_LABEL_IDS] = IGNORE_INDEX
    for label, train in CITYSCAPES_LABEL_TO_TRAIN.items():
        lut[label] = train
    lut[255] = IGNORE_INDEX
    return lut


@dataclass
class CityscapesOptions:
    """``prepare.cityscapes`` in params.yaml."""

    train_splits: list = field(default_factory=lambda: ["train", "val"])
    label_kind: str = "auto"  # auto: labelTrainIds when every labelled frame has one


def _frames_of(root: Path, split: str, manifest_split: str) -> list[tuple[Frame, Path]]:
    """(frame with a labelIds mask path or None, labelTrainIds path) for one Cityscapes split."""
    out = []
    for image in sorted((root / "leftImg8bit" / split).glob("*/*_leftImg8bit.png")):
        city = image.parent.name
        fid = image.name[: -len("_leftImg8bit.png")]
        match = _STEM.match(fid)
        video, frame = (match["video"], int(match["frame"])) if match else (fid, 0)
        label_dir = root / "gtFine" / split / city
        label_ids = label_dir / f"{fid}_gtFine_labelIds.png"
        # Test labels are dummies on the public release: never use them.
        mask = None if manifest_split == "test" else str(label_ids)
        out.append((Frame(id=fid, image=str(image), mask=mask, video=video, frame=frame,
                          split=manifest_split), label_dir / f"{fid}_gtFine_labelTrainIds.png"))
    return out


def cityscapes_dataset(root: Path, *, train_splits: list, label_kind: str) -> tuple[list[Frame], ClassInfo]:
    """Frames of ``train_splits`` (-> manifest split ``train``) and ``test`` (unlabelled).

    ``label_kind`` picks labelIds (mapped through :func:`cityscapes_label_lut`) or
    labelTrainIds (identity); ``auto`` uses labelTrainIds only when every labelled frame has one.
    """
    if label_kind not in LABEL_KINDS:
        raise PipelineError(
            f"prepare.cityscapes.label_kind '{label_kind}' is not one of {', '.join(LABEL_KINDS)}")
    pairs = []
    for split in train_splits:
        if split == "test":
            raise PipelineError("prepare.cityscapes.train_splits must not contain 'test' (its labels are dummies)")
        if not (root / "leftImg8bit" / str(split)).is_dir():
            raise PipelineError(f"{root / 'leftImg8bit' / str(split)}: Cityscapes split folder not found "
                                f"(prepare.cityscapes.train_splits)")
        pairs += _frames_of(root, str(split), "train")
    pairs += _frames_of(root, "test", "test")
    labelled = [(f, t) for f, t in pairs if f.mask is not None]
    use_train_ids = label_kind == "labelTrainIds" or (
        label_kind == "auto" and bool(labelled) and all(t.is_file() for _, t in labelled))
    frames = []
    for frame, train_ids in pairs:
        if use_train_ids and frame.mask is not None:
            frame = dataclasses.replace(frame, mask=str(train_ids))
        frames.append(frame)
    lut = identity_lut(len(CITYSCAPES_CLASSES)) if use_train_ids else cityscapes_label_lut()
    classes = ClassInfo(names=list(CITYSCAPES_CLASSES), palette=[list(c) for c in CITYSCAPES_PALETTE],
                        mask_lut=lut.tolist(), dataset="cityscapes")
    return frames, classes
