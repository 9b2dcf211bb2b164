"""RLE codec: a hand-computed 3x4 example in both pixel orders, round trips, and every refusal."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.core.errors import PipelineError
from pipeline.core.rle import (RLE_ORDERS, RleRow, read_rle_table, rle_decode, rle_encode, rle_labels,
                               rle_rows, rle_table_text)

# 3x4 labels; pixels numbered 1..12 down the columns (column) or along the rows (row):
#   0 1 1 0      column order: 0 2 2 | 1 1 2 | 1 0 0 | 0 0 1
#   2 1 0 0      row order:    0 1 1 0 | 2 1 0 0 | 2 2 0 1
#   2 2 0 1
LABELS = np.array([[0, 1, 1, 0], [2, 1, 0, 0], [2, 2, 0, 1]], dtype=np.uint8)
BY_HAND = {
    "column": [(0, "1 1 8 4"), (1, "4 2 7 1 12 1"), (2, "2 2 6 1")],
    "row": [(0, "1 1 4 1 7 2 11 1"), (1, "2 2 6 1 12 1"), (2, "5 1 9 2")],
}


@pytest.mark.parametrize("order", RLE_ORDERS)
def test_hand_computed_example(order):
    assert rle_rows(LABELS, order=order) == BY_HAND[order]
    rows = [RleRow("img", c, rle, line) for line, (c, rle) in enumerate(BY_HAND[order], start=2)]
    np.testing.assert_array_equal(rle_labels(rows, shape=(3, 4), num_classes=3, fill=255, order=order),
                                  LABELS)
    assert rle_rows(LABELS, order=order, skip=(0, 2)) == BY_HAND[order][1:2]


def test_default_order_is_column_and_empty_mask_is_empty_string():
    assert rle_encode(LABELS == 2) == "2 2 6 1"
    assert rle_encode(np.zeros((3, 4), bool)) == ""
    assert not rle_decode("", shape=(3, 4)).any()
    assert rle_encode(np.ones((2, 2), bool), order="row") == "1 4"


@pytest.mark.parametrize("order", RLE_ORDERS)
def test_round_trip_on_random_masks(order):
    rng = np.random.default_rng(0)
    for _ in range(50):
        shape = tuple(int(v) for v in rng.integers(1, 20, 2))
        mask = rng.random(shape) < rng.random()
        text = rle_encode(mask, order=order)
        np.testing.assert_array_equal(rle_decode(text, shape=shape, order=order), mask)
        labels = rng.integers(0, 5, shape).astype(np.uint8)
        rows = [RleRow("x", c, r, 2 + k) for k, (c, r) in enumerate(rle_rows(labels, order=order))]
        np.testing.assert_array_equal(rle_labels(rows, shape=shape, num_classes=5, fill=255, order=order),
                                      labels)


def test_runs_in_any_order_decode_alike():
    assert (rle_decode("7 1 2 1 4 2", shape=(3, 4)) == rle_decode("2 1 4 2 7 1", shape=(3, 4))).all()


@pytest.mark.parametrize("text,needle", [
    ("2 1 4", "3 numbers, not 'start length' pairs"),
    ("2 x", "malformed rle '2 x'"),
    ("-2 1", "malformed rle '-2 1'"),
    ("0 3", "malformed rle run '0 3'"),
    ("2 0", "malformed rle run '2 0'"),
    ("11 3", "rle run '11 3' ends at pixel 13, outside the image's 12 pixels"),
    ("1 99999999999999999999999", "outside the image's 12 pixels"),
    ("2 3 4 1", "rle runs overlap at pixel 4"),
])
def test_bad_strings_are_named(text, needle):
    with pytest.raises(PipelineError, match="^t.csv line 5: ") as err:
        rle_decode(text, shape=(3, 4), name="t.csv line 5")
    assert needle in str(err.value)


def test_two_classes_on_one_pixel_and_class_range():
    rows = [RleRow("a", 0, "1 3", 2), RleRow("a", 1, "3 2", 4)]
    with pytest.raises(PipelineError, match=r"t.csv line 4: class 1 and class 0 \(line 2\) both cover "
                                            r"pixel 3 of image 'a'"):
        rle_labels(rows, shape=(3, 4), num_classes=2, fill=255, name="t.csv")
    with pytest.raises(PipelineError, match=r"t.csv line 7: class 3 is not a class \(0..2\)"):
        rle_labels([RleRow("a", 3, "1 1", 7)], shape=(3, 4), num_classes=3, fill=255, name="t.csv")


def test_table_text_and_reading():
    text = rle_table_text([("a", 0, "1 1 8 4"), ("a", 2, ""), ("b", 1, "1 12")])
    assert text == "id,class,rle\na,0,1 1 8 4\na,2,\nb,1,1 12\n"
    table = read_rle_table(text, name="t.csv")
    assert list(table) == ["a", "b"] and table["a"][1] == RleRow("a", 2, "", 3)
    for bad, needle in [("img,cls,rle\n", "header is 'img,cls,rle', expected 'id,class,rle'"),
                        ("id,class,rle\na,1\n", "t.csv line 2: 2 field(s), expected 3"),
                        ("id,class,rle\na,one,1 2\n", "t.csv line 2: class 'one' is not an integer"),
                        ("id,class,rle\na,1,1 2\n\na,1,5 1\n", "t.csv line 4: a second row of image 'a' "
                                                              "class 1 (first: line 2)")]:
        with pytest.raises(PipelineError) as err:
            read_rle_table(bad, name="t.csv")
        assert needle in str(err.value)
