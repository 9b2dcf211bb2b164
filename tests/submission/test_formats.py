"""Submission formats: the registry and dataset fit, entry names, and value encodings."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.core.errors import PipelineError
from pipeline.data.cityscapes import CITYSCAPES_CLASSES, CITYSCAPES_TRAIN_TO_LABEL, cityscapes_label_lut
from pipeline.data.manifest import Frame
from pipeline.submission.formats import FORMATS, expected_entries, get_format


def test_cityscapes_label_ids_identity():
    fmt = get_format("cityscapes", dataset="cityscapes")
    train_ids = np.arange(19, dtype=np.uint8)[None]
    label_ids = fmt.encode(train_ids, num_classes=19, name="x")
    assert label_ids[0].tolist() == list(CITYSCAPES_TRAIN_TO_LABEL)
    assert cityscapes_label_lut()[label_ids].tolist() == train_ids.tolist()  # the dataset's own LUT agrees
    np.testing.assert_array_equal(fmt.decode(label_ids, num_classes=19, name="x", strict=True), train_ids)
    # an unevaluated labelId (0 = unlabeled) is void when scoring, refused in a submission
    assert fmt.decode(np.array([0, 7]), num_classes=19, name="x").tolist() == [255, 0]
    with pytest.raises(PipelineError, match="value 0 is outside the cityscapes"):
        fmt.decode(np.array([0, 7]), num_classes=19, name="x", strict=True)
    with pytest.raises(PipelineError, match="needs 19 classes"):
        fmt.stored_values(len(CITYSCAPES_CLASSES) - 1)


def test_vspw_offset_values():
    frame = Frame(id="vid_000123", image="/d/vid/origin/000123.jpg", mask=None, video="vid", frame=123,
                  split="test")
    raw = get_format("vspw", dataset="vspw", vspw_offset=0)
    shifted = get_format("vspw", dataset="vspw", vspw_offset=1)
    assert raw.entry_name(frame) == shifted.entry_name(frame) == "vid/000123.png"
    ids = np.array([[0, 5, 123]], dtype=np.uint8)
    assert raw.encode(ids, num_classes=124, name="x").tolist() == [[0, 5, 123]]
    assert shifted.encode(ids, num_classes=124, name="x").tolist() == [[1, 6, 124]]
    assert shifted.decode(np.array([0, 1, 124]), num_classes=124, name="x").tolist() == [255, 0, 123]
    with pytest.raises(PipelineError, match="value 0 .*1..124"):
        shifted.decode(np.array([0, 1]), num_classes=124, name="x", strict=True)
    with pytest.raises(PipelineError, match="value 124 .*0..123"):
        raw.decode(np.array([124]), num_classes=124, name="x")


def test_encode_refuses_void_and_out_of_range():
    fmt = get_format("folder", dataset="demo")
    with pytest.raises(PipelineError, match=r"p.png: 2 pixel\(s\) are void"):
        fmt.encode(np.array([[0, 255, 255]], dtype=np.uint8), num_classes=3, name="p.png")
    with pytest.raises(PipelineError, match="p.png: value 7 is not a class"):
        fmt.encode(np.array([[0, 7]], dtype=np.uint8), num_classes=3, name="p.png")


def test_format_registry_and_dataset_fit():
    with pytest.raises(PipelineError, match="unknown submission format 'vspv'; valid: auto, camvid"):
        get_format("vspv", dataset="vspw")
    with pytest.raises(PipelineError, match="format 'cityscapes' does not fit dataset 'camvid'"):
        get_format("cityscapes", dataset="camvid")
    with pytest.raises(PipelineError, match="'camvid' does not fit dataset 'demo'.*folder, vspw"):
        get_format("camvid", dataset="demo")
    assert get_format("folder", dataset="cityscapes").name == "folder"  # folder fits anything
    assert get_format("vspw", dataset="demo").name == "vspw"
    expected = {"camvid": "camvid", "cityscapes": "cityscapes", "vspw": "vspw", "demo": "folder",
                "": "folder"}
    for dataset, name in expected.items():
        assert get_format("auto", dataset=dataset).name == name
    with pytest.raises(PipelineError, match="vspw_offset must be 0 .* or 1"):
        get_format("vspw", dataset="vspw", vspw_offset=2)
    assert set(FORMATS) == {"folder", "camvid", "cityscapes", "vspw", "rle_csv"}


def test_entry_names_must_fit_the_layout():
    fmt = get_format("cityscapes", dataset="cityscapes")
    bad = Frame(id="not-a-cityscapes-id", image="/x.png", mask=None, video="v", frame=0, split="test")
    with pytest.raises(PipelineError, match="'not-a-cityscapes-id'.*<city>_<seq>_<frame>.png"):
        fmt.entry_name(bad)
    vspw = get_format("vspw", dataset="vspw")
    twins = [Frame(id=f"a{i}", image=f"/d{i}/origin/0001.jpg", mask=None, video="v", frame=i, split="test")
             for i in range(2)]
    with pytest.raises(PipelineError, match="'a0' and 'a1' would both be 'v/0001.png'"):
        expected_entries(vspw, twins)
