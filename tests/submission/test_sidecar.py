"""The JSON beside a submission zip: its format read from it, and refused when it is another zip's."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.core.errors import PipelineError
from pipeline.submission.sidecar import read_sidecar, sha256_of, zip_format_name
from pipeline.submission.zips import write_zip

from test_zips import png_of


def test_zip_format_name_from_sidecar_or_flag(tmp_path):
    zip_path = tmp_path / "sub.zip"
    with pytest.raises(PipelineError, match="no sub.json beside it.*--format"):
        zip_format_name(zip_path)
    assert zip_format_name(zip_path, fmt="folder") == ("folder", 0, "column")
    (tmp_path / "sub.json").write_text(json.dumps({"format": "vspw", "vspw_offset": 1}))
    assert zip_format_name(zip_path) == ("vspw", 1, "column")
    assert zip_format_name(zip_path, fmt="vspw", vspw_offset=0) == ("vspw", 0, "column")
    (tmp_path / "sub.json").write_text(json.dumps({"format": "rle_csv", "rle_order": "row"}))
    assert zip_format_name(zip_path) == ("rle_csv", 0, "row")
    assert zip_format_name(zip_path, fmt="rle_csv") == ("rle_csv", 0, "row")  # the order from the JSON
    assert zip_format_name(zip_path, fmt="rle_csv", rle_order="column") == ("rle_csv", 0, "column")


def test_read_sidecar_checks_the_zip(tmp_path):
    zip_path = tmp_path / "sub.zip"
    write_zip(zip_path, [("a.png", png_of(np.zeros((2, 2))))])
    side = tmp_path / "sub.json"
    assert read_sidecar(zip_path) == {}
    good = {"format": "folder", "sha256": sha256_of(zip_path), "bytes": zip_path.stat().st_size}
    side.write_text(json.dumps(good))
    assert read_sidecar(zip_path) == good and zip_format_name(zip_path) == ("folder", 0, "column")
    side.write_text(json.dumps({**good, "sha256": "0" * 64}))
    with pytest.raises(PipelineError, match=r"sub.json: describes another zip than .*sub.zip"):
        zip_format_name(zip_path)
    assert zip_format_name(zip_path, fmt="folder") == ("folder", 0, "column")  # explicit: not needed, not read
    side.write_text("[1, 2]")
    with pytest.raises(PipelineError, match="sub.json: corrupt submission manifest"):
        read_sidecar(zip_path)
