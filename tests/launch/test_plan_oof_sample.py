"""The cost plan with infer.oof_sample: OOF maps and OOF TTA passes of the sampled frames only
(counted from the manifest, or estimated from --frames and --videos); test maps unchanged."""

from __future__ import annotations

import pytest
import yaml

from pipeline.core.errors import PipelineError
from pipeline.launch.table import format_plan

from test_plan import MAP_BYTES, MEMBERS, PASSES, RUNS, TEST_BYTES, TEST_PASSES, plan_of, rows, ws  # noqa: F401


def with_sample(ws, sample: dict):  # noqa: F811
    params = yaml.safe_load(ws.params.read_text())
    params["infer"]["oof_sample"] = sample
    ws.params.write_text(yaml.safe_dump(params, sort_keys=False))
    return ws


def test_only_sampled_oof_frames_are_counted(ws):  # noqa: F811
    full = rows(plan_of(ws))
    # videos v0..v3 sorted, every 2nd from 0: v0 (3 frames of 48x64), v2 (2 of 40x40); one
    # window of one frame each
    plan = plan_of(with_sample(ws, {"windows": 1, "length": 1, "every_nth_video": 2}))
    assert plan["data"]["oof_frames"] == 2 and plan["data"]["train_frames"] == 8
    assert plan["data"]["oof_sample"] == {"windows": 1, "length": 1, "every_nth_video": 2,
                                          "seed": 0}
    for name, row in rows(plan).items():
        assert row["tta_passes_oof"] == MEMBERS[name] * (PASSES[48, 64] + PASSES[40, 40])
        assert row["oof_map_bytes"] == MEMBERS[name] * (MAP_BYTES[48, 64] + MAP_BYTES[40, 40])
        assert row["tta_passes_test"] == RUNS[name] * TEST_PASSES
        assert row["test_map_bytes"] == RUNS[name] * TEST_BYTES
        # training's validations and SWA's check still see every frame of the fold
        assert row["other_passes"] == full[name]["other_passes"]
    assert "OOF maps  2 of 8 train frames, sampled by infer.oof_sample" in format_plan(plan)


def test_the_sample_is_estimated_from_numbers(ws):  # noqa: F811
    with_sample(ws, {"windows": 2, "length": 16, "every_nth_video": 4})
    plan = plan_of(ws, frames=1000, videos=10, height=48, width=64, test_frames=0)
    # 10 videos of 100 frames, videos 0, 4, 8 kept, 2 x 16 frames of each
    assert plan["data"]["oof_frames"] == 3 * 32
    assert rows(plan)["b"]["tta_passes_oof"] == MEMBERS["b"] * 96 * PASSES[48, 64]
    with pytest.raises(PipelineError, match="give --videos"):
        plan_of(ws, frames=1000, height=48, width=64)
