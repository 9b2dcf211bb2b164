"""The ``<name>.json`` beside a submission zip: where it lives, and reading it only when it is that zip's.

The JSON records the zip's format, vspw offset or rle order, size and sha256 (written by
:mod:`pipeline.submission.packing`); :func:`read_sidecar` checks the last two against the zip
before anything in it is believed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pipeline.core.errors import PipelineError
from pipeline.core.rle import RLE_ORDERS
from pipeline.submission.formats import FORMATS, RLE_CSV


def sha256_of(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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


def zip_format_name(zip_path: str | Path, *, fmt: str | None = None, vspw_offset: int | None = None,
                    rle_order: str | None = None) -> tuple[str, int, str]:
    """(format name, vspw offset, rle order) of a zip: the explicit arguments win, then the
    sidecar JSON (read, and checked against the zip by :func:`read_sidecar`, only when it is
    needed), then offset 0 and column order."""
    side = sidecar_path(zip_path)
    need = (fmt is None or (fmt == "vspw" and vspw_offset is None)
            or (fmt == RLE_CSV and rle_order is None))
    info = read_sidecar(zip_path) if need else {}
    name = fmt or info.get("format")
    if not name:
        raise PipelineError(f"{zip_path}: no {side.name} beside it names its format; pass --format "
                            f"(one of {', '.join(sorted(FORMATS))})")
    offset = vspw_offset if vspw_offset is not None else info.get("vspw_offset", 0)
    order = rle_order if rle_order is not None else info.get("rle_order", RLE_ORDERS[0])
    return str(name), int(offset), str(order)
