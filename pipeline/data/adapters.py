"""Dataset adapters: turn a dataset's own folder layout into manifest frames and class info.

Each adapter is chosen by name (``prepare.dataset``) and has an options dataclass, the nested
``prepare.<name>`` section of params.yaml. An adapter only lists files and describes classes;
decoding and checking every image and mask is :mod:`pipeline.data.preparation`'s job. Raw mask values
are never rewritten: ``ClassInfo.mask_lut`` maps them to train ids when a mask is read.
Cityscapes and VSPW live in their own modules because of their mapping tables. ``rle_csv`` is
the one adapter that writes files: its masks come as an RLE CSV and are decoded to PNGs inside
prepare's output folder (:mod:`pipeline.data.rle_csv`).
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from pipeline.core.errors import PipelineError, unknown_name
from pipeline.core.names import MANIFEST_SPLITS
from pipeline.core.params import build_section
from pipeline.data.cityscapes import CityscapesOptions, cityscapes_dataset
from pipeline.core.rle import check_order
from pipeline.data.manifest import IGNORE_INDEX, INVALID, ClassInfo, Frame, default_palette, identity_lut
from pipeline.data.rle_csv import write_rle_masks
from pipeline.data.vspw import VSPWOptions, vspw_dataset

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")

CAMVID_CLASSES = ("Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car",
                  "Pedestrian", "Bicyclist")
CAMVID_PALETTE = ((128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222),
                  (128, 128, 0), (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192))
CAMVID_VOID = 11  # "Unlabelled" in the SegNet copy
_CAMVID_STEM = re.compile(r"^(?P<video>[^_]+)_\D*(?P<frame>\d+)$")  # 0001TP_006690, 0006R0_f00930
STEM_PATTERN = r"^(?P<video>.+?)[_-](?P<frame>\d+)$"  # stem -> video and frame number


def camvid_lut() -> np.ndarray:
    """256-entry int16 LUT: 0..10 -> themselves, 11 (Unlabelled) and 255 -> void, rest INVALID."""
    return identity_lut(len(CAMVID_CLASSES), void_values=(CAMVID_VOID, IGNORE_INDEX))


# ----------------------------------------------------------------------------- options
@dataclass
class DemoOptions:
    """``prepare.demo``: the synthetic video dataset (see :mod:`pipeline.data.demo`)."""

    seed: int = 0
    videos: int = 30
    test_videos: int = 6
    min_frames: int = 10
    max_frames: int = 24
    height: int = 96
    width: int = 128


@dataclass
class FolderOptions:
    """``prepare.folder``: ``root/<images>/`` + ``root/<masks>/`` paired by file stem."""

    images: str = "images"
    masks: str = "masks"
    test_images: str = ""       # optional unlabelled (or labelled) test split
    test_masks: str = ""
    pattern: str = STEM_PATTERN
    class_names: list = field(default_factory=list)
    num_classes: int = 0        # used when class_names is empty
    void_values: list = field(default_factory=lambda: [IGNORE_INDEX])


@dataclass
class RleCsvOptions:
    """``prepare.rle_csv``: ``root/<images>/`` + ``root/<csv>`` of ``id,class,rle`` rows."""

    images: str = "images"
    csv: str = "train.csv"
    test_images: str = ""       # optional test split folder
    test_csv: str = ""          # optional labels of the test images, to score a submission
    order: str = "column"       # pixel numbering: column (Kaggle's) | row
    background: int = IGNORE_INDEX  # pixels without a row: 255 = void, or a class id (Kaggle: 0)
    pattern: str = STEM_PATTERN
    class_names: list = field(default_factory=list)
    num_classes: int = 0        # used when class_names is empty


@dataclass
class CamvidOptions:
    """``prepare.camvid``: SegNet layout ``<split>/`` + ``<split>annot/``."""

    train_splits: list = field(default_factory=lambda: ["train", "val"])
    test_splits: list = field(default_factory=lambda: ["test"])  # optional folders; masks optional


# ----------------------------------------------------------------------------- adapters
def demo_dataset(out_dir: Path, *, workers: int, **options: Any) -> tuple[list[Frame], ClassInfo]:
    """Generate the synthetic demo under ``out_dir`` (imported lazily: it is optional)."""
    from pipeline.data.demo import generate_demo

    frames, classes = generate_demo(Path(out_dir), workers=workers, **options)
    return list(frames), dataclasses.replace(classes, dataset="demo")


def _parse_stem(stem: str, pattern: re.Pattern) -> tuple[str, int]:
    """(video, frame number) from a file stem; a stem the pattern misses is a video of its own."""
    match = pattern.match(stem)
    if not match or not match["video"]:
        return stem, 0
    frame = match["frame"] or "0"
    if not frame.isdigit():
        raise PipelineError(f"{stem}: frame group of pattern {pattern.pattern!r} matched {frame!r}, not digits")
    return match["video"], int(frame)


def _images_in(folder: Path) -> list[Path]:
    """Image files of ``folder``; a dangling symlink is kept so that :func:`check_listing` names it."""
    return sorted(p for p in folder.iterdir()
                  if (p.is_file() or p.is_symlink()) and p.suffix.lower() in IMAGE_SUFFIXES)


def _stem_regex(pattern: str, *, key: str) -> re.Pattern:
    """``pattern`` compiled; it must have named groups ``video`` and ``frame``."""
    try:
        regex = re.compile(pattern)
    except re.error as err:
        raise PipelineError(f"{key} {pattern!r} is not a valid regex ({err})") from None
    if not {"video", "frame"} <= set(regex.groupindex):
        raise PipelineError(f"{key} {pattern!r} needs named groups (?P<video>...) and (?P<frame>...)")
    return regex


def _class_names(class_names: list, num_classes: int, *, section: str) -> list[str]:
    """The names given, or ``class_<i>`` for ``num_classes``; a disagreement or neither is an error."""
    if class_names and num_classes and len(class_names) != num_classes:
        raise PipelineError(f"{section}: class_names has {len(class_names)} names but num_classes is "
                            f"{num_classes}")
    names = [str(n) for n in class_names] or [f"class_{i}" for i in range(num_classes)]
    if not names:
        raise PipelineError(f"{section}: set class_names (a list) or num_classes")
    return names


def folder_dataset(root: Path, *, images: str, masks: str, test_images: str, test_masks: str, pattern: str,
                   class_names: list, num_classes: int, void_values: list) -> tuple[list[Frame], ClassInfo]:
    """Images of ``root/images`` (train, masks required) and ``root/test_images`` (masks optional)."""
    regex = _stem_regex(pattern, key="prepare.folder.pattern")
    names = _class_names(class_names, num_classes, section="prepare.folder")
    bad_void = [v for v in void_values if not (isinstance(v, int) and len(names) <= v <= 255)]
    if bad_void:
        raise PipelineError(f"prepare.folder.void_values: {bad_void[0]!r} must be an int in {len(names)}..255")
    frames = []
    for split, key, image_dir, mask_dir in (("train", "images", images, masks),
                                            ("test", "test_images", test_images, test_masks)):
        if not image_dir:
            continue
        folder = root / image_dir
        if not folder.is_dir():
            raise PipelineError(f"{folder}: image folder not found (prepare.folder.{key})")
        for image in _images_in(folder):
            mask = root / mask_dir / f"{image.stem}.png" if mask_dir else None
            if split == "test" and mask is not None and not os.path.lexists(mask):
                mask = None
            video, frame = _parse_stem(image.stem, regex)
            frames.append(Frame(id=image.stem, image=str(image), mask=str(mask) if mask else None,
                                video=video, frame=frame, split=split))
    classes = ClassInfo(names=names, palette=default_palette(len(names)),
                        mask_lut=identity_lut(len(names), void_values).tolist(), dataset="folder")
    return frames, classes


def rle_csv_dataset(root: Path, *, work_dir: Path, images: str, csv: str, test_images: str,
                    test_csv: str, order: str, background: int, pattern: str, class_names: list,
                    num_classes: int) -> tuple[list[Frame], ClassInfo]:
    """Images of ``root/images`` with masks decoded from ``root/csv`` into ``work_dir/train/``,
    and of ``root/test_images`` (masks from ``root/test_csv`` when given, into ``work_dir/test/``)."""
    regex = _stem_regex(pattern, key="prepare.rle_csv.pattern")
    names = _class_names(class_names, num_classes, section="prepare.rle_csv")
    check_order(order, key="prepare.rle_csv.order")
    if not (background == IGNORE_INDEX or 0 <= background < len(names)):
        raise PipelineError(f"prepare.rle_csv.background: {background} must be {IGNORE_INDEX} (void) "
                            f"or a class (0..{len(names) - 1})")
    if test_csv and not test_images:
        raise PipelineError("prepare.rle_csv.test_csv is set but test_images is empty")
    frames = []
    for split, key, image_dir, table in (("train", "images", images, csv),
                                         ("test", "test_images", test_images, test_csv)):
        if not image_dir:
            continue
        folder = root / image_dir
        if not folder.is_dir():
            raise PipelineError(f"{folder}: image folder not found (prepare.rle_csv.{key})")
        listed = _images_in(folder)  # a stem found twice is left to check_listing to name
        files = {p.stem: p for p in listed}
        masks = {}
        if table:
            masks = write_rle_masks(root / table, images=files, out_dir=work_dir / split,
                                    order=order, num_classes=len(names), background=background,
                                    key=f"prepare.rle_csv.{'csv' if split == 'train' else 'test_csv'}")
        for image in listed:
            video, frame = _parse_stem(image.stem, regex)
            mask = masks.get(image.stem)
            frames.append(Frame(id=image.stem, image=str(image), mask=str(mask) if mask else None,
                                video=video, frame=frame, split=split))
    classes = ClassInfo(names=names, palette=default_palette(len(names)),
                        mask_lut=identity_lut(len(names)).tolist(), dataset="rle_csv")
    return frames, classes


def camvid_dataset(root: Path, *, train_splits: list,
                   test_splits: list = ("test",)) -> tuple[list[Frame], ClassInfo]:
    """CamVid in the SegNet layout; ``train_splits`` go to ``train``, the ``test_splits`` folders
    that exist to ``test`` (their masks, where present, let the submission be scored)."""
    overlap = set(map(str, train_splits)) & set(map(str, test_splits))
    if overlap:
        raise PipelineError(f"prepare.camvid: split(s) {sorted(overlap)} are in both train_splits "
                            f"and test_splits")
    frames = []
    for split, target in [*((str(s), "train") for s in train_splits),
                          *((str(s), "test") for s in test_splits)]:
        folder = root / split
        if not folder.is_dir():
            if target == "train":
                raise PipelineError(f"{folder}: CamVid split folder not found (prepare.camvid.train_splits)")
            continue
        for image in _images_in(folder):
            mask = root / f"{split}annot" / f"{image.stem}.png"
            has_mask = target == "train" or os.path.lexists(mask)
            video, frame = _parse_stem(image.stem, _CAMVID_STEM)
            if video == image.stem and "_" in image.stem:
                video = image.stem.split("_", 1)[0]
            frames.append(Frame(id=image.stem, image=str(image), mask=str(mask) if has_mask else None,
                                video=video, frame=frame, split=target))
    classes = ClassInfo(names=list(CAMVID_CLASSES), palette=[list(c) for c in CAMVID_PALETTE],
                        mask_lut=camvid_lut().tolist(), dataset="camvid")
    return frames, classes


# ----------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class Adapter:
    """A dataset adapter: its options dataclass, its builder and the layout it expects."""

    options: type
    build: Callable[..., tuple[list[Frame], ClassInfo]]
    layout: str
    needs_root: bool = True
    writes_files: bool = False  # gets ``work_dir``: a folder inside prepare's output for its files


ADAPTERS: dict[str, Adapter] = {
    "demo": Adapter(DemoOptions, demo_dataset, "generated", needs_root=False),
    "folder": Adapter(FolderOptions, folder_dataset, "images/*.png|jpg + masks/*.png"),
    "rle_csv": Adapter(RleCsvOptions, rle_csv_dataset, "images/*.png|jpg + train.csv (id,class,rle)",
                       writes_files=True),
    "camvid": Adapter(CamvidOptions, camvid_dataset, "train/ trainannot/ val/ valannot/ [test/ testannot/]"),
    "cityscapes": Adapter(CityscapesOptions, cityscapes_dataset,
                          "leftImg8bit/<split>/<city>/*_leftImg8bit.png + gtFine/<split>/<city>/*_labelIds.png"),
    "vspw": Adapter(VSPWOptions, vspw_dataset, "data/<video>/origin/*.jpg + data/<video>/mask/*.png"),
}


def get_adapter(name: str) -> Adapter:
    """The adapter called ``name``; an unknown name raises a PipelineError listing the valid ones."""
    if name not in ADAPTERS:
        raise unknown_name("dataset", name, list(ADAPTERS))
    return ADAPTERS[name]


def parse_options(name: str, values: Mapping[str, Any] | None, *, source: str = "params.yaml") -> Any:
    """Validate the ``prepare.<name>`` section into the adapter's options dataclass (typos raise)."""
    return build_section(get_adapter(name).options, values, section=f"prepare.{name}", source=source)


def check_listing(frames: list[Frame], *, where: str, hint: str = "") -> None:
    """Ids must be unique and free of '/', no listed file is a dangling symlink, and there must
    be training frames."""
    if not frames:
        raise PipelineError(f"{where}: no frames found{hint}")
    seen: dict[str, str] = {}
    for f in frames:
        if "/" in f.id or not f.id:
            raise PipelineError(f"{f.image}: frame id {f.id!r} must be non-empty and contain no '/'")
        if f.split not in MANIFEST_SPLITS:
            raise PipelineError(f"{f.image}: split {f.split!r} is not one of {', '.join(MANIFEST_SPLITS)}")
        if f.id in seen:
            raise PipelineError(f"{f.image}: duplicate frame id {f.id!r} (also {seen[f.id]})")
        seen[f.id] = f.image
        for path in (f.image, f.mask):
            if path and os.path.islink(path) and not os.path.exists(path):
                raise PipelineError(f"{path}: dangling symlink (its target {os.readlink(path)} does not "
                                    f"exist); restore the file or remove the link")
    if not any(f.split == "train" for f in frames):
        raise PipelineError(f"{where}: no train frames found, only {len(frames)} test frame(s){hint}")


def build_dataset(name: str, *, root: str | Path | None, work_dir: Path, options: Any,
                  workers: int = 1) -> tuple[list[Frame], ClassInfo]:
    """List the frames of dataset ``name`` and describe its classes, sorted by split, video, frame.

    ``root`` is the dataset folder (unused by ``demo``, which writes its images under
    ``work_dir/demo``; ``rle_csv`` writes its decoded masks under ``work_dir/rle_csv``); ``options`` is the adapter's options dataclass (see :func:`parse_options`).
    Frames carry absolute paths (or paths under ``work_dir``) and height/width 0 until checked.
    """
    adapter = get_adapter(name)
    if not isinstance(options, adapter.options):
        raise TypeError(f"options for '{name}' must be {adapter.options.__name__}, got {type(options).__name__}")
    kwargs = dataclasses.asdict(options)
    if adapter.needs_root:
        if not root or not str(root).strip():
            raise PipelineError(f"prepare.root is empty: pass --root or set it for dataset '{name}'")
        root = Path(root).expanduser().resolve()
        if not root.is_dir():
            raise PipelineError(f"{root}: dataset root not found")
        if adapter.writes_files:
            kwargs["work_dir"] = Path(work_dir) / name
        frames, classes = adapter.build(root, **kwargs)
        where, hint = str(root), f" for dataset '{name}' (expected {adapter.layout})"
    else:
        frames, classes = adapter.build(Path(work_dir) / name, workers=workers, **kwargs)
        where, hint = f"dataset '{name}'", ""
    check_listing(frames, where=where, hint=hint)
    lut = classes.lut_array()
    allowed = (lut == INVALID) | (lut == IGNORE_INDEX) | ((lut >= 0) & (lut < classes.num_classes))
    if lut.shape != (256,) or not allowed.all():
        raise ValueError(f"adapter '{name}' produced a mask LUT with entries outside the classes")
    order = {s: i for i, s in enumerate(MANIFEST_SPLITS)}
    frames = sorted(frames, key=lambda f: (order[f.split], f.video, f.frame, f.id))
    return frames, dataclasses.replace(classes, mask_lut=lut.astype(int).tolist())
