"""The score card: a JSON-ready summary and its percent table."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.evaluation.metrics import MIOU_DEFINITION
from pipeline.evaluation.scorecard import format_table, summarize


def test_summary_is_json_and_table_in_percent():
    cm = np.array([[3, 1, 0], [0, 2, 1], [0, 0, 0]])
    summary = summarize(cm, class_names=["sky", "road", "cat"], vc={8: 0.5})
    parsed = json.loads(json.dumps(summary, allow_nan=False))
    # "cat" was predicted once but never in the gt: IoU 0 (its union is 1), counted in the mean;
    # its accuracy is undefined and left out of the mean accuracy (3/4 + 2/3) / 2
    assert parsed["mIoU"] == pytest.approx((3 / 4 + 2 / 4 + 0) / 3)
    assert parsed["miou_definition"] == MIOU_DEFINITION
    assert parsed["mean_class_accuracy"] == pytest.approx((3 / 4 + 2 / 3) / 2)
    assert parsed["mVC8"] == 0.5 and parsed["mVC16"] is None
    assert parsed["per_class"]["cat"] == {"iou": 0.0, "accuracy": None, "gt_pixels": 0,
                                          "pred_pixels": 1}
    assert parsed["unpredicted_pixels"] == 0
    table = format_table(summary)
    assert "mIoU 41.67" in table and "75.00" in table and "mean acc 70.83" in table
    assert "mVC8 50.00" in table and table.count(MIOU_DEFINITION) == 1
    with pytest.raises(ValueError):
        summarize(cm, class_names=["a", "a", "b"])
