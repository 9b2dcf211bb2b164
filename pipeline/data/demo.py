"""The built-in synthetic demo: short street-scene videos with a long-tailed class distribution.

Every later stage needs a dataset that runs on two CPU cores yet is not a solved toy. A video is
a street (sky, building, vegetation, road, sidewalk) seen by a slowly panning camera, with moving
objects drawn over it (car, person, pole, sign, and an animal in only a few videos). Classes draw
their colours from shared ranges and differ by shape, place and texture; per-video illumination,
slow flicker and pixel noise keep the pixels from being separable by colour. Void (255) marks a
thin band on the occluded side of object boundaries and "unlabelled clutter" blobs.

Each video has its own generator seeded with (seed, video index), so videos are built in parallel
and the files are byte-identical whatever the number of workers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import joblib
import numpy as np
from PIL import Image
from tqdm import tqdm

from pipeline.core.errors import PipelineError
from pipeline.data.manifest import IGNORE_INDEX, ClassInfo, Frame, identity_lut

CLASSES = ("sky", "building", "vegetation", "road", "sidewalk", "car", "person", "pole", "sign", "animal")
SKY, BUILDING, VEGETATION, ROAD, SIDEWALK, CAR, PERSON, POLE, SIGN, ANIMAL = range(len(CLASSES))
CLUTTER = IGNORE_INDEX  # an object labelled void: unlabelled clutter
PALETTE = [[70, 130, 180], [70, 70, 70], [107, 142, 35], [128, 64, 128], [244, 35, 232],
           [0, 0, 142], [220, 20, 60], [153, 153, 153], [220, 220, 0], [255, 127, 80]]
# Shared colour ranges (grey, warm, green, blue, anything): classes differ in how often they use
# each one, never in a colour of their own. Texture amplitudes are in 8-bit intensity units.
FAMILIES = np.array([[118, 118, 118], [150, 112, 80], [88, 125, 72], [95, 120, 165]], dtype=np.float32)
FAMILY_WEIGHTS = {SKY: (.4, .1, 0, .4, .1), BUILDING: (.4, .35, 0, .15, .1), VEGETATION: (.2, .2, .5, 0, .1),
                  ROAD: (.6, .25, 0, .1, .05), SIDEWALK: (.45, .35, .1, 0, .1), CAR: (.2, .2, .1, .2, .3),
                  PERSON: (.2, .3, .1, .2, .2), POLE: (.5, .2, 0, .1, .2), SIGN: (.2, .2, .1, .2, .3),
                  ANIMAL: (.3, .4, .2, 0, .1), CLUTTER: (.2, .2, .2, .2, .2)}
AMPLITUDE = {SKY: 22, BUILDING: 34, VEGETATION: 38, ROAD: 24, SIDEWALK: 28, CAR: 34, PERSON: 34,
             POLE: 30, SIGN: 40, ANIMAL: 40, CLUTTER: 45}
TILE = 64  # side of the per-video noise tiles that textures sample


def demo_classes() -> ClassInfo:
    """Class names, palette and identity LUT (255 = void) of the demo dataset."""
    return ClassInfo(names=list(CLASSES), palette=[list(c) for c in PALETTE], ignore_index=IGNORE_INDEX,
                     mask_lut=identity_lut(len(CLASSES)).tolist(), dataset="demo")


@dataclass
class _Obj:
    """A moving object; position (bottom centre, px) and size (px) follow smooth trajectories.

    ``variant`` is a per-class shape parameter: car cabin offset, pole width (px), sign shape
    (0 disc, 1 diamond, 2 triangle), gait or outline phase of people, animals and clutter.
    """

    cls: int
    x: float
    y: float
    vx: float
    vy: float
    size: float
    grow: float = 0.0
    ax: float = 0.0
    variant: float = 0.0
    colour: np.ndarray | None = None
    colour2: np.ndarray | None = None

    def at(self, t: int) -> tuple[float, float, float]:
        return (self.x + self.vx * t + 0.5 * self.ax * t * t, self.y + self.vy * t,
                self.size * (1.0 + self.grow * t))


def _colour(rng: np.random.Generator, cls: int) -> np.ndarray:
    family = rng.choice(5, p=FAMILY_WEIGHTS[cls])
    if family == 4:
        return rng.uniform(40, 215, 3).astype(np.float32)
    return (FAMILIES[family] + rng.uniform(-45, 45) + rng.uniform(-18, 18, 3)).astype(np.float32)


def _smooth_tile(rng: np.random.Generator, passes: int) -> np.ndarray:
    """TILE x TILE periodic noise, standardised; more box-blur passes give larger blobs."""
    tile = rng.standard_normal((TILE, TILE)).astype(np.float32)
    for _ in range(passes):
        tile = sum(np.roll(tile, (dy, dx), (0, 1)) for dy in (-1, 0, 1) for dx in (-1, 0, 1))
    return (tile - tile.mean()) / tile.std()


def _sample(tile: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    return tile[np.floor(y).astype(np.int64) % TILE, np.floor(x).astype(np.int64) % TILE]


def _speed(rng: np.random.Generator, low: float, high: float) -> float:
    return float(rng.choice([-1, 1]) * rng.uniform(low, high))


def _scene(rng: np.random.Generator, h: int, w: int, has_animal: bool) -> dict:
    """Everything random about one video, drawn once so that every frame follows from it.

    Lengths are in pixels, speeds in pixels per frame; ``depth`` is 0 at the horizon, 1 at the
    bottom of the image, and objects are larger the nearer they are.
    """
    s = dict(h=h, w=w, horizon=h * rng.uniform(0.36, 0.5), hz_drift=rng.uniform(-0.15, 0.15),
             tilt=rng.uniform(-0.08, 0.08), pan=rng.uniform(-1.2, 1.2), road_c=w * rng.uniform(0.35, 0.65),
             road_drift=rng.uniform(-0.4, 0.4))
    # tree line: amplitude, offset, two spatial frequencies and their phases
    s["veg"] = (rng.uniform(0.06, 0.18) * h, rng.uniform(-0.04, 0.05) * h, rng.uniform(0.03, 0.09),
                rng.uniform(0.1, 0.2), *rng.uniform(0, 6.3, 2))
    s["win"] = (rng.uniform(5, 11), rng.uniform(5, 10))  # building window grid
    s["sw"] = (rng.uniform(0.3, 1.3), rng.uniform(4, 9))  # sidewalk stripes: angle (rad), period
    s["lane_speed"], s["cloud"] = rng.uniform(0.05, 0.15), rng.uniform(0, 6.3)
    s["grain"], s["blobs"] = _smooth_tile(rng, 0), _smooth_tile(rng, 2)
    s["colours"] = {c: _colour(rng, c) for c in (SKY, BUILDING, VEGETATION, ROAD, SIDEWALK)}
    # gain, contrast, per-channel cast, offset; flicker amplitude, period (frames), phase; noise sigma
    s["light"] = (rng.uniform(0.7, 1.3), rng.uniform(0.7, 1.2), rng.uniform(0.88, 1.12, 3),
                  rng.uniform(-15, 15))
    s["flicker"] = (rng.uniform(0.01, 0.05), rng.uniform(8, 24), rng.uniform(0, 6.3))
    s["noise"] = rng.uniform(3, 9)
    edges = np.cumsum(rng.uniform(0.12, 0.35, 40) * w) - 2.5 * w  # building blocks along world x
    s["blocks"] = (edges, np.where(rng.random(41) < 0.2, 0.0, rng.uniform(0.1, 0.42, 41) * h))
    hz, span = s["horizon"], h - s["horizon"]

    objs = []
    for _ in range(rng.integers(1, 4)):
        depth = rng.uniform(0.1, 1.05)
        x = s["road_c"] + rng.uniform(-0.8, 0.8) * _road_halfwidth(depth, w)
        objs.append(_Obj(CAR, x, hz + depth * span, _speed(rng, 0.3, 1.8), rng.uniform(-0.15, 0.15),
                         size=w * (0.1 + 0.22 * depth), grow=rng.uniform(-0.01, 0.01), ax=rng.normal(0, 0.02),
                         variant=rng.uniform(-0.12, 0.12), colour=_colour(rng, CAR)))
    for _ in range(rng.integers(0, 4)):
        depth = rng.uniform(0.05, 1.0)
        objs.append(_Obj(PERSON, rng.uniform(0, w), hz + depth * span, _speed(rng, 0.1, 0.8),
                         rng.uniform(-0.1, 0.1), size=h * (0.15 + 0.3 * depth),
                         grow=rng.uniform(-0.008, 0.008), ax=rng.normal(0, 0.01), variant=rng.uniform(0, 6.3),
                         colour=_colour(rng, PERSON), colour2=_colour(rng, PERSON)))
    # Poles, signs and clutter stand still in the world: they move with the camera pan.
    still = dict(vx=-s["pan"], vy=s["hz_drift"])
    for _ in range(rng.integers(0, 4)):
        depth, x = rng.uniform(0.0, 0.6), rng.uniform(0, w) + s["pan"] * rng.uniform(0, 12)
        pole = _Obj(POLE, x, hz + depth * span, size=h * (0.3 + 0.5 * depth), variant=2 + round(2 * depth),
                    colour=_colour(rng, POLE), **still)  # variant: width in px
        objs.append(pole)
        if rng.random() < 0.5:
            size = 6 + 8 * depth
            objs.append(_Obj(SIGN, x, pole.y - pole.size + 0.3 * size, size=size, variant=rng.integers(3),
                             colour=_colour(rng, SIGN), **still))
    for _ in range(rng.integers(0, 2)):
        objs.append(_Obj(SIGN, rng.uniform(0, w), hz - rng.uniform(0.05, 0.2) * h, size=rng.uniform(7, 13),
                         variant=rng.integers(3), colour=_colour(rng, SIGN), **still))
    if has_animal:
        depth = rng.uniform(0.3, 0.9)
        objs.append(_Obj(ANIMAL, w * rng.uniform(0.2, 0.8), hz + depth * span, _speed(rng, 0.2, 0.8),
                         rng.uniform(-0.08, 0.08), size=w * (0.12 + 0.12 * depth),
                         grow=rng.uniform(-0.005, 0.005), variant=rng.uniform(0, 6.3),
                         colour=_colour(rng, ANIMAL)))
    if rng.random() < 0.5:
        objs.append(_Obj(CLUTTER, rng.uniform(0, w), hz + rng.uniform(0.0, 0.8) * span,
                         size=rng.uniform(4, 10), variant=rng.uniform(0, 6.3), colour=_colour(rng, CLUTTER),
                         **still))
    s["objects"] = objs
    return s


def _road_halfwidth(depth: np.ndarray | float, w: int) -> np.ndarray | float:
    return (0.1 + 0.62 * depth) * w


def _background(s: dict, t: int, yy: np.ndarray, xx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Label map (HxW uint8) and texture (HxW float, about -1..1) of the static classes at frame t."""
    h, w = s["h"], s["w"]
    xw = xx + s["pan"] * t  # world x: the scene slides as the camera pans
    hz = s["horizon"] + s["hz_drift"] * t + s["tilt"] * (xx - w / 2)
    edges, heights = s["blocks"]
    top = hz - heights[np.searchsorted(edges, xw)]
    amp, off, f1, f2, p1, p2 = s["veg"]
    veg_top = hz - np.maximum(0, amp * (np.sin(xw * f1 + p1) + 0.6 * np.sin(xw * f2 + p2)) + off)
    depth = np.clip((yy - hz) / (h - hz), 0, 1)
    road_dx = np.abs(xx - s["road_c"] - s["road_drift"] * t)
    label = np.where(yy < top, SKY, BUILDING)
    label = np.where((yy >= veg_top) & (yy < hz), VEGETATION, label)
    label = np.where(yy >= hz, np.where(road_dx < _road_halfwidth(depth, w), ROAD, SIDEWALK), label)

    sky = (np.clip((yy - hz) / (0.6 * h) + 1, 0, 1) * 1.6 - 0.8
           + 0.3 * np.sin(xw * 0.06 + yy * 0.15 + s["cloud"]))
    fu, fv = (xw / s["win"][0]) % 1, ((yy - hz) / s["win"][1]) % 1
    building = np.where((fu > 0.3) & (fu < 0.75) & (fv > 0.35) & (fv < 0.8), -1.0, 0.35)
    vegetation = np.where(_sample(s["blobs"], yy, xw) > 0.2, 1.0, -0.7)
    dashes = (np.sqrt(np.maximum(yy - hz, 0)) + s["lane_speed"] * t) % 1 < 0.5
    lane = (road_dx < 0.6 + 0.03 * (yy - hz)) & dashes
    road = np.where(lane, 1.8, 0.6 * _sample(s["grain"], yy, xw))
    angle, period = s["sw"]
    sidewalk = 0.8 * np.sign(np.sin(2 * np.pi * (xw * np.cos(angle) + yy * np.sin(angle)) / period))
    texture = np.choose(label, [sky, building, vegetation, road, sidewalk])
    return label.astype(np.uint8), texture


Part = tuple[np.ndarray, np.ndarray, np.ndarray]  # mask (HxW bool), texture (HxW float), colour (3,)


def _parts(s: dict, o: _Obj, t: int, yy: np.ndarray, xx: np.ndarray) -> list[Part]:
    """(mask, texture, colour) of each part of object ``o`` at frame t, back to front."""
    x, y, size = o.at(t)
    u, v = (xx - x) / size, (yy - y) / size  # object coordinates, in units of its size
    pu, pv = u * o.size, v * o.size  # texture coordinates: fixed to the object, scale with it
    zero, dark = np.zeros_like(u), np.full(3, 30, np.float32)

    def ellipse(cu, cv, ru, rv, power=2):
        return np.abs((u - cu) / ru) ** power + np.abs((v - cv) / rv) ** power <= 1

    if o.cls == CAR:
        return [(ellipse(0, -0.22, 0.5, 0.2, 4), 0.8 * np.cos(np.pi * (v + 0.22) / 0.4), o.colour),
                (ellipse(o.variant, -0.45, 0.28, 0.13, 4),  # cabin: dark glass with a pillar
                 np.where(np.abs(u - o.variant) < 0.02, 0.5, -1.2), o.colour),
                (ellipse(-0.3, -0.06, 0.09, 0.09) | ellipse(0.3, -0.06, 0.09, 0.09), zero, dark)]
    if o.cls == PERSON:
        swing = 0.03 * np.sin(0.5 * t + o.variant)
        legs = (np.abs(u - 0.05 - swing) < 0.04) | (np.abs(u + 0.05 + swing) < 0.04)
        stripes = 0.7 * np.sign(np.sin(2 * np.pi * pu / 4.0))
        return [(legs & (v > -0.42) & (v <= 0), zero, o.colour2),
                (ellipse(0, -0.6, 0.13, 0.22), stripes, o.colour),
                (ellipse(0, -0.88, 0.075, 0.085), zero, FAMILIES[1] + 30)]
    if o.cls == POLE:
        shading = np.cos(np.pi * (xx - x) / o.variant)  # a lit cylinder, o.variant px wide
        return [((np.abs(xx - x) < o.variant / 2) & (v > -1) & (v <= 0), shading, o.colour)]
    if o.cls == SIGN:
        shape = [ellipse(0, -0.5, 0.5, 0.5), np.abs(u) + np.abs(v + 0.5) <= 0.55,
                 (np.abs(u) <= 0.55 * (1 + v)) & (v >= -1) & (v <= 0)][int(o.variant)]
        return [(shape, np.sin(2 * np.pi * np.hypot(pu, pv + 0.5 * o.size) / 3.5), o.colour)]
    if o.cls == ANIMAL:
        face = 1 if o.vx >= 0 else -1
        legs = np.zeros_like(u, dtype=bool)
        for i, c in enumerate((-0.3, -0.18, 0.18, 0.3)):
            legs |= np.abs(u - c - 0.04 * np.sin(0.8 * t + i + o.variant)) < 0.035
        spots = np.where(_sample(s["blobs"], pv, pu) > 0.3, -1.0, 0.5)
        return [(legs & (v > -0.32) & (v <= 0), zero, o.colour),
                (ellipse(0, -0.42, 0.42, 0.18) | ellipse(face * 0.45, -0.6, 0.13, 0.11), spots, o.colour)]
    angle = np.arctan2(v, u)  # clutter: an irregular blob of noise
    radius = 1 + 0.3 * np.sin(3 * angle + o.variant) + 0.15 * np.sin(5 * angle + 2 * o.variant)
    return [(np.hypot(u, v) <= radius, 1.2 * _sample(s["grain"], pv, pu), o.colour)]


def _render(s: dict, t: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Frame t of a scene: image (HxWx3 uint8 RGB) and mask (HxW uint8 class ids, 255 = void)."""
    h, w = s["h"], s["w"]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    label, texture = _background(s, t, yy, xx)
    base = np.stack([s["colours"][c] for c in range(SIDEWALK + 1)])[label]
    amp = np.array([AMPLITUDE[c] for c in range(SIDEWALK + 1)], np.float32)[label]
    img = base + (amp * texture)[..., None]
    depth = np.zeros((h, w), np.int16)  # draw order: an occluded pixel next to its occluder is void
    for z, o in enumerate(sorted(s["objects"], key=lambda o: o.at(t)[1]), start=1):
        for mask, tex, colour in _parts(s, o, t, yy, xx):
            label[mask], depth[mask] = o.cls, z
            img[mask] = colour + AMPLITUDE[o.cls] * tex[mask][:, None]
    void = label == IGNORE_INDEX
    pad_label, pad_depth = np.pad(label, 1, mode="edge"), np.pad(depth, 1, mode="edge")
    for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):  # the 4 neighbours
        near = (slice(dy, dy + h), slice(dx, dx + w))
        void |= (pad_depth[near] > depth) & (pad_label[near] != label)
    label[void] = IGNORE_INDEX

    gain, contrast, cast, offset = s["light"]
    flick_amp, period, phase = s["flicker"]
    flicker = 1 + flick_amp * np.sin(2 * np.pi * t / period + phase)
    img = ((img - 128) * contrast + 128) * (gain * flicker) * cast + offset
    img += s["noise"] * rng.standard_normal(img.shape, dtype=np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), label


def _video(out_dir: Path, index: int, split: str, seed: int, has_animal: bool, min_frames: int,
           max_frames: int, height: int, width: int) -> list[Frame]:
    rng = np.random.default_rng([seed, index])
    name = f"vid{index:03d}"
    scene = _scene(rng, height, width, has_animal)
    frames = []
    for t in range(int(rng.integers(min_frames, max_frames + 1))):
        img, mask = _render(scene, t, rng)
        paths = [out_dir / kind / name / f"{t:04d}.png" for kind in ("images", "masks")]
        paths[0].parent.mkdir(parents=True, exist_ok=True)
        paths[1].parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img, "RGB").save(paths[0], format="PNG", compress_level=3)
        Image.fromarray(mask, "L").save(paths[1], format="PNG", compress_level=3)
        frames.append(Frame(id=f"{name}_{t:04d}", image=str(paths[0]), mask=str(paths[1]), video=name,
                            frame=t, split=split, height=height, width=width))
    return frames


def generate_demo(out_dir: Path, *, seed: int = 0, videos: int = 30, test_videos: int = 6,
                  min_frames: int = 10, max_frames: int = 24, height: int = 96, width: int = 128,
                  workers: int = 1) -> tuple[list[Frame], ClassInfo]:
    """Write the demo videos under ``out_dir`` and return (frames, classes).

    Images are ``out_dir/images/vidNNN/FFFF.png`` (RGB, ``height`` x ``width`` px) and masks
    ``out_dir/masks/vidNNN/FFFF.png`` (uint8 class ids, 255 = void). The first
    ``videos - test_videos`` videos form the train split, the rest the test split (masks included,
    so it can be scored). The animal class appears in about one train video in six and one test video.
    The files depend on ``seed`` and the sizes only, never on ``workers``.
    """
    checks = [(videos >= 1, "videos must be >= 1"),
              (0 <= test_videos < videos, "test_videos must be in [0, videos)"),
              (1 <= min_frames <= max_frames, "need 1 <= min_frames <= max_frames"),
              (height >= 32 and width >= 32, "height and width must be >= 32"),
              (workers >= 1, "workers must be >= 1")]
    for ok, message in checks:
        if not ok:
            raise PipelineError(f"demo dataset: {message} (videos={videos}, test_videos={test_videos}, "
                                f"min_frames={min_frames}, max_frames={max_frames}, size={height}x{width}, "
                                f"workers={workers})")
    n_train = videos - test_videos
    # Which videos hold the rare class is decided once, so that it stays rare over the train split.
    pick = np.random.default_rng([seed, 1 << 30])
    animal = set(pick.permutation(n_train)[:max(1, round(n_train / 6))].tolist())
    if test_videos:
        animal.add(n_train + int(pick.integers(test_videos)))
    jobs = (joblib.delayed(_video)(Path(out_dir), i, "train" if i < n_train else "test", seed, i in animal,
                                   min_frames, max_frames, height, width) for i in range(videos))
    results = joblib.Parallel(n_jobs=workers, return_as="generator")(jobs)
    frames = [f for video in tqdm(results, total=videos, desc="demo videos", unit="video") for f in video]
    return frames, demo_classes()
