"""infer.oof_sample: which train frames get an OOF map, as clips of consecutive frames."""

from __future__ import annotations

import pytest
import yaml

from pipeline.core.errors import PipelineError
from pipeline.data.manifest import Frame
from pipeline.data.oof_sample import (OOFSample, as_clips, load_oof_sample, oof_sample_from_params,
                                    sample_clips, sampled_ids)
from pipeline.evaluation.consistency import VideoConsistency
from pipeline.launch.costs import sampled_frames

import numpy as np


def frames(lengths: dict[str, int], step: int = 1) -> list[Frame]:
    """Train frames of videos {name: frame count}, numbered 0, step, 2 step ..., shuffled order."""
    rows = [Frame(id=f"{v}_{i:04d}", image="x.jpg", mask="x.png", video=v, frame=i * step,
                  split="train") for v, n in lengths.items() for i in range(n)]
    return rows[::-1]


VIDEOS = {f"v{k:02d}": n for k, n in enumerate([40, 5, 64, 17, 33, 100, 16, 48, 9, 70])}


def test_default_samples_every_frame_as_whole_videos():
    rows = frames(VIDEOS)
    sample = oof_sample_from_params({})
    assert sample.full and sample.describe() is None
    clips = sample_clips(rows, sample)
    assert list(clips) == sorted(VIDEOS)
    assert sampled_ids(rows, sample) == {f.id for f in rows}
    # the clips are the videos: the frames keep their video name
    assert as_clips(rows, clips) == sorted(rows, key=lambda f: (f.video, f.frame, f.id))


@pytest.mark.parametrize("windows,length,step", [(1, 16, 1), (2, 8, 3), (3, 5, 1), (4, 16, 1)])
def test_windows_are_disjoint_runs_of_consecutive_frames_in_every_video(windows, length, step):
    rows = frames(VIDEOS, step=step)
    sample = OOFSample(windows=windows, length=length)
    clips = sample_clips(rows, sample)
    order = {v: sorted((f for f in rows if f.video == v), key=lambda f: f.frame) for v in VIDEOS}
    seen = set()
    for video, n in VIDEOS.items():
        mine = {name: clip for name, clip in clips.items() if name.split("@")[0] == video}
        if n <= windows * length:  # short: kept whole, one clip named as the video
            assert list(mine) == [video] and mine[video] == order[video]
            continue
        assert len(mine) == windows
        for clip in mine.values():
            assert len(clip) == length and {f.video for f in clip} == {video}
            start = order[video].index(clip[0])
            assert clip == order[video][start:start + length]  # consecutive in the video
        ids = [f.id for clip in mine.values() for f in clip]
        assert len(ids) == len(set(ids)) == windows * length   # disjoint
        seen |= set(ids)
    assert seen <= {f.id for f in rows}


def test_the_sample_is_deterministic_and_depends_on_the_seed_only_through_placement():
    rows = frames(VIDEOS)
    sample = OOFSample(windows=2, length=6, seed=3)
    first = sample_clips(rows, sample)
    assert sample_clips(list(reversed(rows)), sample) == first  # input order does not matter
    assert sample_clips(rows, OOFSample(windows=2, length=6, seed=3)) == first
    other = sample_clips(rows, OOFSample(windows=2, length=6, seed=4))
    assert set(other) == set(first) and other != first
    # a video's windows depend on its own frames only, not on the other videos
    alone = sample_clips([f for f in rows if f.video == "v05"], sample)
    assert alone == {k: v for k, v in first.items() if k.startswith("v05@")}


@pytest.mark.parametrize("nth,seed", [(1, 0), (2, 0), (2, 1), (3, 5), (20, 7)])
def test_every_nth_video_keeps_the_videos_at_seed_mod_n(nth, seed):
    rows = frames(VIDEOS)
    names = sorted(VIDEOS)
    clips = sample_clips(rows, OOFSample(every_nth_video=nth, seed=seed))
    assert list(clips) == names[seed % nth::nth]
    assert all(len(clips[v]) == VIDEOS[v] for v in clips)  # windows 0: whole videos


def test_consistency_on_clips_never_pairs_frames_across_a_gap():
    """Predictions constant within each window but different between windows: mVC is 1 per
    clip, below 1 when the video's sampled frames were read as one run."""
    rows = frames({"a": 60, "b": 50})
    clips = sample_clips(rows, OOFSample(windows=2, length=10, seed=1))
    label = {f.id: k % 2 for k, clip in enumerate(clips.values()) for f in clip}
    sampled = as_clips([f for f in rows if f.id in label], clips)
    assert len({f.video for f in sampled}) == 4

    def score(key) -> float:
        vc, prev = VideoConsistency(windows=(8,)), None
        for f in sorted(sampled, key=lambda f: (key(f), f.frame)):
            if prev is not None and key(f) != prev:
                vc.end_video()
            vc.add_frame(np.zeros((2, 2), np.uint8), np.full((2, 2), label[f.id], np.uint8))
            prev = key(f)
        return vc.mvc(8)

    assert score(lambda f: f.video) == 1.0
    assert score(lambda f: f.id.split("_")[0]) < 1.0  # the original video: pairs across gaps


def test_as_clips_refuses_a_frame_outside_the_sample():
    rows = frames({"a": 40})
    clips = sample_clips(rows, OOFSample(windows=1, length=4))
    with pytest.raises(PipelineError, match="not in the OOF sample"):
        as_clips(rows, clips)


def test_params_name_typos_and_bad_values(tmp_path):
    with pytest.raises(PipelineError, match="unknown key 'infer.oof_sample.window'"):
        oof_sample_from_params({"window": 2})
    with pytest.raises(PipelineError, match="'infer.oof_sample.length' must be >= 1"):
        oof_sample_from_params({"windows": 2, "length": 0})
    with pytest.raises(PipelineError, match="must be a mapping"):
        oof_sample_from_params([1, 2])
    path = tmp_path / "params.yaml"
    assert load_oof_sample(path).full  # no params file: every frame
    path.write_text(yaml.safe_dump({"infer": {"oof_sample": {"windows": 3, "every_nth_video": 2}}}))
    assert load_oof_sample(path) == OOFSample(windows=3, every_nth_video=2)


def test_the_cost_estimate_matches_the_sampler_on_even_videos():
    rows = frames({f"v{k}": 30 for k in range(7)})
    for sample in (OOFSample(), OOFSample(windows=1, length=8, every_nth_video=3, seed=1),
                   OOFSample(windows=2, length=20, every_nth_video=2)):
        assert sampled_frames(frames=len(rows), videos=7, windows=sample.windows,
                              length=sample.length, every_nth_video=sample.every_nth_video,
                              seed=sample.seed) == len(sampled_ids(rows, sample))
