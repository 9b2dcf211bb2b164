"""Augmentation pipelines for training and inference, built on albumentations 2.0.

Training follows MMSegmentation's recipe: random rescale (relative to the original size), pad to
the crop (image with 0, mask with the ignore index), random crop, horizontal flip, a
PhotoMetricDistortion-like colour jitter, then normalisation. Inference only normalises: TTA and
sliding-window code resize at full resolution later.

Every pipeline takes ``image`` (HxWx3 uint8 RGB) and optionally ``mask`` (HxW uint8 train ids,
255 = void) and returns ``image`` as HxWx3 float32 normalised and ``mask`` as uint8. Masks are
resized with nearest-neighbour interpolation only, so no value that was not in the input appears.
Randomness comes from the Compose's generators; :mod:`pipeline.data.dataset` reseeds them per
sample so that augmentation is a function of (seed, sample position).

Class-aware crops: called with ``crop_class=c`` (:data:`CROP_CLASS`, a train id), the training
crop (:class:`ClassCrop`) holds a pixel of class ``c``, found in the mask after the rescale and
the pad; without it the crop is albumentations' ``RandomCrop``, draw for draw.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import albumentations as A
import cv2
import numpy as np

from pipeline.core.errors import PipelineError
from pipeline.data.manifest import IGNORE_INDEX

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# MMSeg PhotoMetricDistortion defaults: brightness delta 32 (of 255), contrast and saturation
# factors in [0.5, 1.5], hue delta 18 OpenCV units (of 180) = 0.1 of the hue circle.
BRIGHTNESS_DELTA = 32 / 255
CONTRAST_RANGE = (0.5, 1.5)
SATURATION_RANGE = (0.5, 1.5)
HUE_DELTA = 18 / 180

PARAM_KEYS = ("crop", "scale", "hflip", "photometric", "mean", "std", "ignore_index", "val_scale")

CROP_CLASS = "crop_class"  # the transform's input naming the class a training crop must hold


def class_window(mask: np.ndarray, cls: int, *, crop_hw: tuple[int, int],
                 rng: np.random.Generator) -> tuple[int, int, int, int] | None:
    """A ``crop_hw`` window ``(x_min, y_min, x_max, y_max)`` of ``mask`` [H, W] that holds a
    pixel of class ``cls``; None when the mask has none.

    The pixel is drawn uniformly among the class's pixels; the window is centred on it with a
    jitter of up to half the crop each way (so the pixel may sit anywhere in the window), then
    clamped inside the mask, which keeps the pixel inside. A mask smaller than the crop gives
    the window at 0 on that side (the pipeline pads first, as for the uniform crop).
    """
    hits = np.flatnonzero(mask == cls)
    if hits.size == 0:
        return None
    height, width = mask.shape[:2]
    crop_h, crop_w = crop_hw
    y, x = divmod(int(hits[rng.integers(hits.size)]), width)
    y0 = min(max(y - int(rng.integers(crop_h)), 0), max(height - crop_h, 0))
    x0 = min(max(x - int(rng.integers(crop_w)), 0), max(width - crop_w, 0))
    return x0, y0, x0 + crop_w, y0 + crop_h


class ClassCrop(A.RandomCrop):
    """``RandomCrop`` that, given ``crop_class=c`` with the data, crops a window holding a pixel
    of class ``c`` (:func:`class_window`, from the transform's numpy generator).

    Without ``crop_class``, or when rescaling left no pixel of ``c`` (a sliver shrunk away), it
    is ``RandomCrop`` itself: the same draws and the same window.
    """

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        cls, mask = data.get(CROP_CLASS), data.get("mask")
        if cls is not None and cls >= 0 and mask is not None:
            window = class_window(mask, int(cls), crop_hw=(self.height, self.width),
                                  rng=self.random_generator)
            if window is not None:
                return {"crop_coords": window, "pad_params": None}
        return super().get_params_dependent_on_data(params, data)


def photometric_distortion(p: float = 0.5) -> list[A.BasicTransform]:
    """MMSeg-like PhotoMetricDistortion: four independent jitters, each applied with ``p``.

    Brightness is additive (+-32 of 255) and contrast multiplicative (x0.5..1.5), as in MMSeg;
    saturation and hue are jittered in HSV. MMSeg randomly puts contrast before or after the HSV
    steps; here the order is fixed (brightness, contrast, saturation, hue). Works on uint8 images.
    """
    keep = (1.0, 1.0)
    return [
        A.RandomBrightnessContrast(brightness_limit=(-BRIGHTNESS_DELTA, BRIGHTNESS_DELTA),
                                   contrast_limit=(0.0, 0.0), brightness_by_max=True, p=p),
        A.RandomBrightnessContrast(brightness_limit=(0.0, 0.0),
                                   contrast_limit=(CONTRAST_RANGE[0] - 1, CONTRAST_RANGE[1] - 1), p=p),
        A.ColorJitter(brightness=keep, contrast=keep, saturation=SATURATION_RANGE, hue=(0.0, 0.0), p=p),
        A.ColorJitter(brightness=keep, contrast=keep, saturation=keep, hue=(-HUE_DELTA, HUE_DELTA), p=p),
    ]


def train_transform(*, crop_hw: tuple[int, int], scale_range: tuple[float, float] = (0.5, 2.0),
                    hflip_p: float = 0.5, photometric: bool = True,
                    mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                    ignore_index: int = IGNORE_INDEX) -> A.Compose:
    """Training augmentation producing ``crop_hw`` (height, width) crops.

    Steps: rescale by a factor drawn uniformly from ``scale_range`` (image bilinear, mask nearest),
    pad (centred) to at least the crop with image 0 and mask
    ``ignore_index``, random crop (:class:`ClassCrop`: one holding class ``crop_class`` when the
    call passes it), horizontal flip with probability ``hflip_p``, photometric
    distortion (optional), normalise with ``mean``/``std`` given as fractions of 255.
    Output: image [crop_h, crop_w, 3] float32, mask [crop_h, crop_w] uint8.
    """
    crop_h, crop_w = (int(v) for v in crop_hw)
    lo, hi = (float(v) for v in scale_range)
    steps: list[A.BasicTransform] = [
        # RandomScale samples 1 + U(limit); limits relative to 1 give factors in [lo, hi].
        A.RandomScale(scale_limit=(lo - 1.0, hi - 1.0), interpolation=cv2.INTER_LINEAR,
                      mask_interpolation=cv2.INTER_NEAREST, p=1.0),
        A.PadIfNeeded(min_height=crop_h, min_width=crop_w, border_mode=cv2.BORDER_CONSTANT,
                      fill=0, fill_mask=ignore_index),
        ClassCrop(height=crop_h, width=crop_w),
        A.HorizontalFlip(p=hflip_p),
    ]
    if photometric:
        steps += photometric_distortion()
    steps.append(A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0))
    return A.Compose(steps, mask_interpolation=cv2.INTER_NEAREST)


def eval_transform(*, mean: Sequence[float] = IMAGENET_MEAN,
                   std: Sequence[float] = IMAGENET_STD) -> A.Compose:
    """Inference transform: normalise only, full resolution (HxWx3 float32 out, mask untouched)."""
    return A.Compose([A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0)])


# ----------------------------------------------------------------------------- params adapter
def _pair(cfg: Mapping[str, Any], key: str, source: str, *, kind: type) -> tuple:
    value = cfg[key]
    ok = isinstance(value, (list, tuple)) and len(value) == 2 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    if ok and kind is int:
        ok = all(isinstance(v, int) and v > 0 for v in value)
    if ok and kind is float:
        ok = all(v > 0 for v in value) and value[0] <= value[1]
    if not ok:
        want = "two positive integers [height, width]" if kind is int else "[low, high] with 0 < low <= high"
        raise PipelineError(f"{source}: '{key}' must be {want}, got {value!r}")
    return tuple(kind(v) for v in value)


def _triple(cfg: Mapping[str, Any], key: str, source: str) -> tuple[float, float, float]:
    value = cfg[key]
    if not (isinstance(value, (list, tuple)) and len(value) == 3
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
        raise PipelineError(f"{source}: '{key}' must be three numbers (RGB, fractions of 255), got {value!r}")
    return tuple(float(v) for v in value)


def val_scale(cfg: Mapping[str, Any] | None, *, source: str = "augment") -> float:
    """``cfg["val_scale"]`` (default 1): validation during training and SWA's comparison predict
    frames resized by this factor (logits resized back to the mask), for models trained on
    rescaled crops; inference has its own TTA scales."""
    value = (cfg or {}).get("val_scale", 1.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.05 <= value <= 4:
        raise PipelineError(f"{source}: 'val_scale' must be a number in [0.05, 4], got {value!r}")
    return float(value)


def transform_from_params(cfg: Mapping[str, Any], *, train: bool, source: str = "augment") -> A.Compose:
    """Build the train or eval transform from a params dict.

    ``cfg`` keys (all optional except ``crop`` for training): ``crop`` [h, w], ``scale``
    [low, high], ``hflip`` probability, ``photometric`` bool, ``mean``/``std`` RGB fractions,
    ``ignore_index``, ``val_scale`` (the scale validation predicts at: :func:`val_scale`).
    The eval transform uses only ``mean``/``std``; the same dict serves both.
    Unknown keys and bad values raise PipelineError naming ``source`` and the key.
    """
    cfg = dict(cfg or {})
    unknown = sorted(set(cfg) - set(PARAM_KEYS))
    if unknown:
        raise PipelineError(f"{source}: unknown key '{unknown[0]}'; "
                            f"valid keys: {', '.join(sorted(PARAM_KEYS))}")
    norm = {k: _triple(cfg, k, source) for k in ("mean", "std") if k in cfg}
    val_scale(cfg, source=source)
    if not train:
        return eval_transform(**norm)
    if "crop" not in cfg:
        raise PipelineError(f"{source}: 'crop' [height, width] is required for training")
    kwargs: dict[str, Any] = dict(norm, crop_hw=_pair(cfg, "crop", source, kind=int))
    if "scale" in cfg:
        kwargs["scale_range"] = _pair(cfg, "scale", source, kind=float)
    if "hflip" in cfg:
        p = cfg["hflip"]
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
            raise PipelineError(f"{source}: 'hflip' must be a probability in [0, 1], got {p!r}")
        kwargs["hflip_p"] = float(p)
    if "photometric" in cfg:
        if not isinstance(cfg["photometric"], bool):
            raise PipelineError(f"{source}: 'photometric' must be true or false, got {cfg['photometric']!r}")
        kwargs["photometric"] = cfg["photometric"]
    if "ignore_index" in cfg:
        value = cfg["ignore_index"]
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 255:
            raise PipelineError(f"{source}: 'ignore_index' must be an integer in 0..255, got {value!r}")
        kwargs["ignore_index"] = value
    return train_transform(**kwargs)
