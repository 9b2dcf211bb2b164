"""VSPW (Video Scene Parsing in the Wild): its raw-value table and the adapter for its layout.

Layout: ``root/data/<video>/origin/<frame>.jpg`` and ``root/data/<video>/mask/<frame>.png``;
``root/{train,val,test}.txt`` list one video per line. Mask value 0 ("others") and 255 are
void, 1..124 are the 124 classes (train ids 0..123); ``label_num_dic_final.json`` maps class
names to those raw values.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.core.errors import PipelineError
from pipeline.data.manifest import IGNORE_INDEX, INVALID, ClassInfo, Frame, default_palette

VSPW_NUM_CLASSES = 124
VSPW_VOID_VALUES = (0, 255)
VSPW_CLASS_FILE = "label_num_dic_final.json"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def vspw_lut() -> np.ndarray:
    """256-entry int16 LUT: raw 1..124 -> 0..123, raw 0 and 255 -> void, 125..254 INVALID."""
    lut = np.full(256, INVALID, dtype=np.int16)
    lut[1:VSPW_NUM_CLASSES + 1] = np.arange(VSPW_NUM_CLASSES)
    for value in VSPW_VOID_VALUES:
        lut[value] = IGNORE_INDEX
    return lut


def vspw_class_names(root: Path) -> list[str]:
    """Names in train-id order from ``label_num_dic_final.json`` ({name: raw id}), else class_N."""
    names = [f"class_{i + 1}" for i in range(VSPW_NUM_CLASSES)]
    path = root / VSPW_CLASS_FILE
    if not path.is_file():
        return names
    try:
        table = json.loads(path.read_text())
        items = [(str(name), int(raw)) for name, raw in table.items()]
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError) as err:
        raise PipelineError(f"{path}: expected a JSON object {{class name: raw id}} ({err})") from None
    for name, raw in items:
        if 1 <= raw <= VSPW_NUM_CLASSES:  # 0 ("others") and 255 are void
            names[raw - 1] = name
    return names


@dataclass
class VSPWOptions:
    """``prepare.vspw`` in params.yaml."""

    train_splits: list = field(default_factory=lambda: ["train", "val"])  # <root>/<name>.txt
    test_split: str = "test"


def _read_list(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _video_frames(root: Path, video: str, split: str) -> list[Frame]:
    vdir = root / "data" / video
    if not (vdir / "origin").is_dir():
        raise PipelineError(f"{vdir / 'origin'}: video '{video}' listed for split '{split}' has no origin folder")
    images = sorted(p for p in (vdir / "origin").iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    frames = []
    for index, image in enumerate(images):
        mask = vdir / "mask" / f"{image.stem}.png"
        # Train masks are required (validation reports a missing one); test masks are optional.
        keep = split == "train" or os.path.lexists(mask)  # a dangling link is named later
        frames.append(Frame(id=f"{video}_{image.stem}", image=str(image), mask=str(mask) if keep else None,
                            video=video, frame=int(image.stem) if image.stem.isdigit() else index,
                            split=split))
    return frames


def vspw_dataset(root: Path, *, train_splits: list, test_split: str) -> tuple[list[Frame], ClassInfo]:
    """Frames of the videos listed in ``<root>/<train_splits>.txt`` (-> ``train``) and the test list.

    Without any list file every video under ``root/data`` goes to ``train``; once one exists,
    each of ``train_splits`` must have its list (a missing one would drop its videos unseen);
    the test list is optional.
    """
    lists = {name: root / f"{name}.txt" for name in [*map(str, train_splits), test_split] if name}
    if any(p.is_file() for p in lists.values()):
        absent = [name for name in map(str, train_splits) if not lists[name].is_file()]
        if absent:
            raise PipelineError(f"{lists[absent[0]]}: list file of split '{absent[0]}' not found "
                                f"(prepare.vspw.train_splits names it)")
        videos = []
        for name, path in lists.items():
            split = "test" if name == test_split else "train"
            videos += [(v, split, path.name) for v in (_read_list(path) if path.is_file() else [])]
    else:
        data = root / "data"
        videos = [(p.name, "train", "data") for p in sorted(data.iterdir()) if p.is_dir()] if data.is_dir() else []
    seen: dict[str, str] = {}
    frames = []
    for video, split, source in videos:
        if video in seen:
            raise PipelineError(f"{root / source}: video '{video}' is listed twice (also in {seen[video]})")
        seen[video] = source
        frames += _video_frames(root, video, split)
    names = vspw_class_names(root)
    classes = ClassInfo(names=names, palette=default_palette(len(names)), mask_lut=vspw_lut().tolist(),
                        dataset="vspw")
    return frames, classes
