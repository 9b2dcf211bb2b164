"""Which train frames get an out-of-fold map: ``infer.oof_sample``, defined once.

A dataset of 222,000 train frames (VSPW) cannot keep a map of every one, so inference may
predict a sample of them. The sample is a pure function of the manifest's train frames and
the :class:`OOFSample` settings (folds do not enter: each frame is then predicted by its own
fold's run), and every stage that predicts or checks OOF maps calls :func:`sample_clips`:

* ``every_nth_video`` N keeps the videos whose index in the sorted video names is
  ``seed mod N`` modulo N (N = 1: every video);
* ``windows`` 0 keeps every frame of a kept video; W > 0 keeps W disjoint windows of ``length``
  consecutive frames (in frame order), placed by a generator seeded from ``seed`` and the video
  name, uniformly over the placements; a video of at most W x ``length`` frames keeps all.

Each window is a *clip*: a run of frames consecutive in the original video. Video consistency
(mVC_n) is computed per clip, so it never pairs two frames across a gap of the sample; a
video kept whole is one clip named as the video, so the default sample changes nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from pipeline.core.errors import PipelineError
from pipeline.core.params import DEFAULT_PARAMS, build_section, read_params
from pipeline.data.manifest import Frame

SECTION = "infer.oof_sample"
CLIP_MARK = "@"  # clip name of a window: <video>@<window index>


@dataclass(frozen=True)
class OOFSample:
    """``infer.oof_sample``: which train frames get an OOF map (default: all of them)."""

    windows: int = 0          # windows per kept video; 0 = every frame of it
    length: int = 16          # frames per window (consecutive)
    every_nth_video: int = 1  # keep every Nth video (sorted by name, offset by seed)
    seed: int = 0

    @property
    def full(self) -> bool:
        """True when every train frame is sampled."""
        return self.windows == 0 and self.every_nth_video == 1

    def describe(self) -> dict[str, Any] | None:
        """The settings as recorded beside sampled numbers (None: not sampled)."""
        return None if self.full else dataclasses.asdict(self)


def oof_sample_from_params(values: Mapping[str, Any] | None, *,
                           source: str = DEFAULT_PARAMS) -> OOFSample:
    """:class:`OOFSample` of ``infer.oof_sample`` (None or {}: every frame); typos and values
    out of range raise PipelineError naming the key."""
    if values is not None and not isinstance(values, Mapping):
        raise PipelineError(f"{source}: '{SECTION}' must be a mapping, got {values!r}")
    sample = build_section(OOFSample, values, section=SECTION, source=source)
    for key, low in (("windows", 0), ("length", 1), ("every_nth_video", 1), ("seed", 0)):
        if getattr(sample, key) < low:
            raise PipelineError(f"{source}: '{SECTION}.{key}' must be >= {low}, "
                                f"got {getattr(sample, key)}")
    return sample


def load_oof_sample(params_path: str | Path = DEFAULT_PARAMS) -> OOFSample:
    """``infer.oof_sample`` of a params file (every frame when the file or key is absent), for
    the stages that check OOF maps without running inference."""
    path = Path(params_path)
    infer = (read_params(path) if path.is_file() else {}).get("infer") or {}
    if not isinstance(infer, Mapping):
        raise PipelineError(f"{path}: section 'infer' must be a mapping")
    return oof_sample_from_params(infer.get("oof_sample"), source=str(path))


def _window_starts(count: int, sample: OOFSample, video: str) -> list[int]:
    """Start positions of the windows of a video of ``count`` frames: W sorted, disjoint
    [start, start + length) runs, uniform over placements (W distinct draws from
    range(slack + W), minus their rank)."""
    slack = count - sample.windows * sample.length
    key = int.from_bytes(hashlib.sha256(video.encode()).digest()[:8], "big")
    rng = np.random.default_rng([sample.seed, key])
    picks = np.sort(rng.choice(slack + sample.windows, size=sample.windows, replace=False))
    return [int(p - k + k * sample.length) for k, p in enumerate(picks)]


def sample_clips(frames: Iterable[Frame], sample: OOFSample) -> dict[str, list[Frame]]:
    """The sampled frames of ``frames`` (the manifest's train frames) as {clip name: its frames
    in (frame, id) order}, clips sorted by name. A video kept whole is one clip named as the
    video; a window is ``<video>@<k>``. With ``sample.full``: every video, whole."""
    by_video: dict[str, list[Frame]] = {}
    for frame in frames:
        by_video.setdefault(frame.video, []).append(frame)
    names = sorted(by_video)
    step = sample.every_nth_video
    clips: dict[str, list[Frame]] = {}
    for index, video in enumerate(names):
        if index % step != sample.seed % step:
            continue
        ordered = sorted(by_video[video], key=lambda f: (f.frame, f.id))
        if not sample.windows or len(ordered) <= sample.windows * sample.length:
            clips[video] = ordered
            continue
        for k, start in enumerate(_window_starts(len(ordered), sample, video)):
            clips[f"{video}{CLIP_MARK}{k}"] = ordered[start:start + sample.length]
    return dict(sorted(clips.items()))


def sampled_ids(frames: Iterable[Frame], sample: OOFSample) -> set[str]:
    """Ids of the sampled frames of ``frames`` (see :func:`sample_clips`)."""
    return {f.id for clip in sample_clips(frames, sample).values() for f in clip}


def as_clips(frames: Sequence[Frame], clips: Mapping[str, Sequence[Frame]]) -> list[Frame]:
    """``frames`` with ``video`` set to their clip's name (a frame in no clip is an error),
    sorted by (clip, frame, id): what code that treats each video as one run of consecutive
    frames (video consistency) must see."""
    clip_of = {f.id: name for name, members in clips.items() for f in members}
    missing = [f.id for f in frames if f.id not in clip_of]
    if missing:
        raise PipelineError(f"frame '{missing[0]}' is not in the OOF sample ({SECTION}); "
                            f"{len(missing)} such")
    moved = [f if clip_of[f.id] == f.video else dataclasses.replace(f, video=clip_of[f.id])
             for f in frames]
    return sorted(moved, key=lambda f: (f.video, f.frame, f.id))
