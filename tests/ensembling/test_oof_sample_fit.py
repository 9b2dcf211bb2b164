"""The ensemble search on sampled OOF maps (infer.oof_sample): it fits on exactly the sample,
says so in weights.json and metrics.json, scores video consistency per window, and refuses a
missing sampled map or a map of an unsampled frame."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from pipeline import ensemble
from pipeline.core.errors import PipelineError
from pipeline.core.names import ENSEMBLE_ROWS
from pipeline.data.manifest import read_manifest
from pipeline.data.oof_sample import OOFSample, sample_clips
from pipeline.evaluation.consistency import mvc
from pipeline.inference.mapfile import write_probs
from pipeline.inference.members import list_members, run_map_dir

from test_ensemble import MEMBERS, SMALL, argv, build, explicit, pattern

SAMPLE = {"windows": 2, "length": 9, "every_nth_video": 1, "seed": 0}


def sampled_build(root):
    """build() with 4 train videos of 30 frames, OOF maps only of the sampled frames (2 windows
    of 9 per video); every map's classes are rolled by one in odd windows, so each window is
    constant in time but two windows of a video disagree."""
    ws = build(root, videos=4, frames=30, ensemble_params=explicit(alpha_grid=SMALL,
                                                                    beta_grid=SMALL))
    params = yaml.safe_load(ws["params"].read_text())
    params["infer"] = {"oof_sample": SAMPLE}
    ws["params"].write_text(yaml.safe_dump(params))
    train = read_manifest(ws["data"] / "manifest.csv", split="train")
    clips = sample_clips(train, OOFSample(**SAMPLE))
    roll = {f.id: k % 2 for k, clip in enumerate(clips.values()) for f in clip}
    for member, group in MEMBERS.items():
        for fold in (0, 1):
            run = run_map_dir(ws["oof"], member, fold)
            for path in sorted((run / "oof").glob("*.npz")):
                fid = path.name[:-4]
                if fid not in roll:
                    path.unlink()
                    continue
                _, maps = pattern(int(fid[1:].split("_")[0]))
                write_probs(path, np.roll(maps[group], roll[fid], axis=0), quant="float16")
            meta = json.loads((run / "meta.json").read_text())
            meta["counts"]["oof"] = len(list((run / "oof").glob("*.npz")))
            (run / "meta.json").write_text(json.dumps(meta))
    return ws, clips, roll


def test_the_fit_is_on_the_sample_and_says_so(tmp_path):
    ws, clips, roll = sampled_build(tmp_path)
    result = ensemble.main(argv(ws))
    n = 4 * 2 * 9
    for doc in (json.loads((ws["out"] / "weights.json").read_text()),
                json.loads((ws["out"] / "metrics.json").read_text())):
        assert doc["frames"] == doc["oof_frames"] == n and doc["oof_frames_missing"] == 0
        assert doc["oof_sampled"] is True and doc["oof_sample"] == SAMPLE
    metrics = result["metrics"]
    # each window is constant in time: consistency 1 on every row; a window of 9 frames has
    # one 8-frame window and no 16-frame one
    assert all(metrics[f"{row}_mVC8"] == 1.0 for row in ENSEMBLE_ROWS)
    assert all(metrics[f"{row}_mVC16"] is None for row in ENSEMBLE_ROWS)
    # read as whole videos, the same labels would pair frames across the windows' gap
    member = {m.name: m for m in list_members(ws["oof"])}["strong_s0"]
    videos = {}
    for clip in clips.values():
        for f in clip:
            gt, _ = pattern(int(f.video[1:]))
            videos.setdefault(f.video, ([], []))
            videos[f.video][0].append(gt)
            videos[f.video][1].append(member.read_oof(f.id).argmax(0))
    assert mvc(videos.values(), n=8) < 1.0


def test_a_missing_sampled_map_and_an_unsampled_map_are_refused(tmp_path):
    ws, clips, roll = sampled_build(tmp_path)
    gone = sorted(roll)[0]
    for member in MEMBERS:
        for fold in (0, 1):
            (run_map_dir(ws["oof"], member, fold) / "oof" / f"{gone}.npz").unlink(missing_ok=True)
            meta_path = run_map_dir(ws["oof"], member, fold) / "meta.json"
            meta = json.loads(meta_path.read_text())
            meta["counts"]["oof"] = len(list(meta_path.parent.glob("oof/*.npz")))
            meta_path.write_text(json.dumps(meta))
    with pytest.raises(PipelineError, match="cover 71 of its 72 sampled train frames"):
        ensemble.main(argv(ws))

    ws, clips, roll = sampled_build(tmp_path / "extra")
    extra = next(f.id for f in read_manifest(ws["data"] / "manifest.csv", split="train")
                 if f.id not in roll)
    fold = int(extra[1:].split("_")[0]) % 2
    for member in MEMBERS:
        run = run_map_dir(ws["oof"], member, fold)
        write_probs(run / "oof" / f"{extra}.npz", np.full((3, 8, 6), 1 / 3, np.float32),
                    quant="float16")
        meta = json.loads((run / "meta.json").read_text())
        meta["counts"]["oof"] += 1
        (run / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(PipelineError, match=f"'{extra}' is not one of its sampled train frames"):
        ensemble.main(argv(ws))


def test_an_unsampled_fit_says_it_is_not_sampled(tmp_path):
    ws = build(tmp_path, videos=2, frames=4, ensemble_params=explicit(alpha_grid=[0.0, 1.0],
                                                                      beta_grid=[0.0, 0.4]))
    metrics = ensemble.main(argv(ws))["metrics"]
    assert metrics["oof_sampled"] is False and metrics["oof_sample"] is None
    assert metrics["frames"] == metrics["oof_frames"] == 8
