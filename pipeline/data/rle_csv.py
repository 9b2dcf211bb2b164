"""Training masks given as an ``id,class,rle`` CSV (the usual Kaggle layout), decoded to PNGs.

The rest of the pipeline reads masks as PNG files named by the manifest, so prepare decodes the
CSV once (:func:`write_rle_masks`) into ``<prepare.out>/rle_csv/<split>/<id>.png`` holding train
ids (255 = void), inside prepare's atomic output folder. A row's ``id`` is an image's stem or its
file name; ``class`` a train id; ``rle`` the runs (:mod:`pipeline.core.rle`). Pixels no row
covers get ``background``: 255 (void: neither trained on nor scored), or a class id when the
dataset means "no row = background" (most Kaggle sets: ``background: 0``). Refused, in one line
naming the CSV and its line: a row of no image, a class out of range, a run outside its image,
two classes on one pixel, a malformed rle string.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np
from PIL import Image

from pipeline.core.errors import PipelineError
from pipeline.core.rle import read_rle_table, rle_labels

PNG_LEVEL = 6  # fixed, so the same CSV gives the same mask bytes (and frame digests)


def image_size(path: Path) -> tuple[int, int]:
    """(height, width) from an image's header; an unreadable file is a one-line error."""
    try:
        with Image.open(path) as img:
            return img.height, img.width
    except FileNotFoundError:
        raise PipelineError(f"{path}: image file not found") from None
    except Exception as err:  # PIL raises many types for corrupt files
        raise PipelineError(f"{path}: unreadable or corrupt image ({type(err).__name__})") from None


def write_rle_masks(csv_path: Path, *, images: Mapping[str, Path], out_dir: Path, order: str,
                    num_classes: int, background: int, key: str) -> dict[str, Path]:
    """Decode ``csv_path`` into one mask PNG per image: ``{image stem: out_dir/<stem>.png}``.

    ``images`` maps each image stem to its file; every image gets a mask (an image without rows
    is all ``background``). ``key`` names the params key of the CSV in messages.
    """
    if not csv_path.is_file():
        raise PipelineError(f"{csv_path}: RLE CSV not found ({key})")
    try:
        text = csv_path.read_text(encoding="utf-8-sig")  # a BOM from a spreadsheet is no header
    except (UnicodeDecodeError, OSError) as err:
        raise PipelineError(f"{csv_path}: unreadable RLE CSV ({type(err).__name__})") from None
    table = read_rle_table(text, name=str(csv_path))
    by_name = {**{p.name: stem for stem, p in images.items()}, **{stem: stem for stem in images}}
    rows: dict[str, list] = {stem: [] for stem in images}
    for image_id, image_rows in table.items():
        stem = by_name.get(image_id)
        if stem is None:
            folder = next(iter(images.values())).parent if images else "the image folder"
            raise PipelineError(f"{csv_path} line {image_rows[0].line}: image '{image_id}' not found "
                                f"in {folder}")
        rows[stem].extend(image_rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    masks = {}
    for stem, path in images.items():
        labels = rle_labels(rows[stem], shape=image_size(path), num_classes=num_classes,
                            fill=background, order=order, name=str(csv_path))
        masks[stem] = out_dir / f"{stem}.png"
        Image.fromarray(np.ascontiguousarray(labels)).save(masks[stem], compress_level=PNG_LEVEL)
    return masks
