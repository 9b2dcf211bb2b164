"""Test-time augmentation: multi-scale x flip views, sliding windows, averaged probabilities.

Each view is a paired augment/de-augment: ``hflip`` is its own inverse, ``rescale`` (bilinear,
``align_corners=False``, as the training-time cv2 INTER_LINEAR rescale) is undone by ``restore``.
:func:`predict_probs_batch` runs, for every scale, the original and flipped images together in
one forward, takes the softmax of each view, flips back, resizes to the input size and adds into
one float32 running sum: probabilities are averaged, not logits (MMSegmentation's ``aug_test``
does the same), and no list of views is kept, so memory is the accumulator plus one batch.

A scaled image larger than ``crop_hw`` goes through :func:`sliding_window` (MMSegmentation's
slide mode: overlapping crops, logits summed and divided by the per-pixel window count), with
windows of several views batched together. Every forward goes through
:func:`pipeline.models.predict.forward_padded`, so TTA with one scale and no flip equals plain inference.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.core.errors import PipelineError
from pipeline.core.params import build_section
from pipeline.core.runs import amp_mode
from pipeline.models.predict import autocast, forward_padded

DEFAULT_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)


@dataclass
class TTAConfig:
    """Views and batching of :func:`predict_probs` (the ``tta`` keys of a params section).

    ``scales`` multiply both sides (sizes rounded to ints); ``flip`` adds the mirrored view of
    each scale; ``crop_hw`` [h, w] switches a scaled image larger than it to sliding windows
    (None: always the whole image) that overlap by the fraction ``overlap`` of the crop;
    ``batch_size`` is the most views or windows per forward; ``amp``: None (the default) = as
    the run trained (``models.<name>.amp``), else a mode of :data:`pipeline.core.runs.AMP_MODES`
    or a boolean (true = auto, false = off; see :func:`pipeline.models.predict.resolve_amp`);
    images and windows are zero-padded to a multiple of ``pad_multiple`` (the encoder stride).
    """

    scales: tuple[float, ...] = DEFAULT_SCALES
    flip: bool = True
    crop_hw: tuple[int, int] | None = None
    overlap: float = 1 / 3
    batch_size: int = 8
    amp: bool | str | None = None
    pad_multiple: int = 32

    def __post_init__(self) -> None:
        scales = (self.scales,) if isinstance(self.scales, (int, float)) else self.scales
        try:
            scales = tuple(float(s) for s in scales)
        except (TypeError, ValueError):
            raise PipelineError(f"'tta.scales' must be a list of numbers, "
                                f"got {self.scales!r}") from None
        if not scales or not all(math.isfinite(s) and s > 0 for s in scales):
            raise PipelineError(f"'tta.scales' must be a non-empty list of positive numbers, "
                                f"got {self.scales!r}")
        self.scales = scales
        if self.crop_hw is not None:
            crop = [self.crop_hw] * 2 if isinstance(self.crop_hw, int) else list(self.crop_hw)
            if len(crop) != 2 or not all(_positive_int(c) for c in crop):
                raise PipelineError(f"'tta.crop_hw' must be null or [height, width] of positive "
                                    f"integers, got {self.crop_hw!r}")
            self.crop_hw = (int(crop[0]), int(crop[1]))
        if not isinstance(self.overlap, (int, float)) or not 0 <= self.overlap < 1:
            raise PipelineError(f"'tta.overlap' must be in [0, 1), got {self.overlap!r}")
        for key in ("batch_size", "pad_multiple"):
            if not _positive_int(getattr(self, key)):
                raise PipelineError(f"'tta.{key}' must be a positive integer, "
                                    f"got {getattr(self, key)!r}")
        if not isinstance(self.flip, bool):
            raise PipelineError(f"'tta.flip' must be true or false, got {self.flip!r}")
        if self.amp is not None:
            amp_mode(self.amp, where="tta.amp")

    @property
    def num_views(self) -> int:
        """Views averaged per image: scales x (2 with flip, else 1)."""
        return len(self.scales) * (2 if self.flip else 1)


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def tta_from_params(cfg: Mapping[str, Any] | bool | None, *, source: str = "params.yaml",
                    section: str = "tta") -> TTAConfig:
    """``TTAConfig`` from a params value: True/None -> defaults, False -> one scale (1.0) and
    no flip, a mapping -> defaults overridden by its keys (an unknown key raises PipelineError
    listing the valid keys)."""
    if cfg is None or cfg is True:
        return TTAConfig()
    if cfg is False:
        return TTAConfig(scales=(1.0,), flip=False)
    if not isinstance(cfg, Mapping):
        raise PipelineError(f"{source}: '{section}' must be true, false or a mapping of "
                            f"{', '.join(f.name for f in dataclasses.fields(TTAConfig))}; "
                            f"got {cfg!r}")
    return build_section(TTAConfig, cfg, section=section, source=source)


# ----------------------------------------------------------------------------- views
def hflip(x: torch.Tensor) -> torch.Tensor:
    """Mirror ``x`` [..., H, W] left-right; its own inverse."""
    return x.flip(-1)


def scaled_size(size_hw: tuple[int, int], scale: float) -> tuple[int, int]:
    """(H, W) times ``scale``, rounded half up, at least 1 pixel."""
    return tuple(max(1, int(s * scale + 0.5)) for s in size_hw)


def _resize(x: torch.Tensor, size_hw: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size_hw):
        return x  # exact identity, not an interpolation that happens to be close
    return F.interpolate(x, size=tuple(size_hw), mode="bilinear", align_corners=False)


def rescale(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Bilinear resize of ``x`` [N, C, H, W] to ``scaled_size((H, W), scale)``."""
    return _resize(x, scaled_size(tuple(x.shape[-2:]), scale))


def restore(y: torch.Tensor, size_hw: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of a logit or probability map ``y`` [N, C, h, w] back to ``size_hw``.

    A convex combination per pixel, so probability maps stay probability maps.
    """
    return _resize(y, size_hw)


# ----------------------------------------------------------------------------- sliding window
def window_starts(length: int, crop: int, stride: int) -> list[int]:
    """Start offsets of windows of ``crop`` pixels every ``stride`` covering ``length`` pixels;
    the last one is shifted back to end at the border (MMSegmentation's slide mode)."""
    if length <= crop:
        return [0]
    n = -(-(length - crop) // stride) + 1
    return [min(i * stride, length - crop) for i in range(n)]


def window_count(size_hw: tuple[int, int], *, crop_hw: tuple[int, int] | None,
                 overlap: float) -> int:
    """Forwards :func:`_view_logits` makes for one view of ``size_hw`` (H, W): 1 when it fits
    in ``crop_hw`` (or there is none), else the windows of :func:`sliding_window`."""
    h, w = size_hw
    if crop_hw is None or (h <= crop_hw[0] and w <= crop_hw[1]):
        return 1
    stride = [max(1, round(c * (1 - overlap))) for c in crop_hw]
    return (len(window_starts(h, min(crop_hw[0], h), stride[0]))
            * len(window_starts(w, min(crop_hw[1], w), stride[1])))


def forward_passes(size_hw: tuple[int, int], *, tta: TTAConfig) -> int:
    """Images (views or windows) the network sees to predict one frame of ``size_hw`` with
    :func:`predict_probs_and_plain`: sum over scales of (2 with flip, else 1) x windows."""
    kinds = 2 if tta.flip else 1
    return sum(kinds * window_count(scaled_size(tuple(size_hw), s), crop_hw=tta.crop_hw,
                                    overlap=tta.overlap) for s in tta.scales)


def _model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _amp(tta: TTAConfig) -> bool | str:
    """The autocast setting of ``tta``: its own, or ``auto`` where it defers to a run that
    the caller has not resolved (see :class:`TTAConfig`)."""
    return "auto" if tta.amp is None else tta.amp


def _forward(model: nn.Module, x: torch.Tensor, *, num_classes: int, amp: bool,
             pad_multiple: int) -> torch.Tensor:
    with autocast(x.device, amp):
        logits = forward_padded(model, x, multiple=pad_multiple)
    if logits.shape[1] != num_classes:
        raise PipelineError(f"the model outputs {logits.shape[1]} classes, expected {num_classes} "
                            f"(checkpoint and classes.json disagree)")
    return logits.float()


@torch.no_grad()
def sliding_window(model: nn.Module, images: torch.Tensor, *, crop_hw: tuple[int, int],
                   num_classes: int, stride_hw: tuple[int, int] | None = None,
                   overlap: float = 1 / 3, batch_size: int = 8, amp: bool = False,
                   pad_multiple: int = 32) -> torch.Tensor:
    """Float32 logits [N, C, H, W] of ``images`` [N, 3, H, W] from overlapping crops.

    Windows are ``crop_hw`` (clipped to the image, so an image that fits in one crop is exactly
    whole-image inference) placed every ``stride_hw`` pixels (default: ``crop * (1 - overlap)``,
    rounded); windows of all N images are batched, up to ``batch_size`` per forward, each
    zero-padded to ``pad_multiple`` by ``forward_padded``. Overlapping logits are averaged.
    """
    n, _, h, w = images.shape
    crop_h, crop_w = min(crop_hw[0], h), min(crop_hw[1], w)
    if stride_hw is None:
        stride_hw = tuple(max(1, round(c * (1 - overlap))) for c in crop_hw)
    ys = window_starts(h, crop_h, stride_hw[0])
    xs = window_starts(w, crop_w, stride_hw[1])
    out = torch.zeros(n, num_classes, h, w, dtype=torch.float32, device=images.device)
    count = torch.zeros(1, 1, h, w, dtype=torch.float32, device=images.device)
    for y in ys:
        for x in xs:
            count[..., y:y + crop_h, x:x + crop_w] += 1
    windows = [(i, y, x) for i in range(n) for y in ys for x in xs]
    for start in range(0, len(windows), batch_size):
        chunk = windows[start:start + batch_size]
        crops = torch.stack([images[i, :, y:y + crop_h, x:x + crop_w] for i, y, x in chunk])
        logits = _forward(model, crops, num_classes=num_classes, amp=amp, pad_multiple=pad_multiple)
        for k, (i, y, x) in enumerate(chunk):
            out[i, :, y:y + crop_h, x:x + crop_w] += logits[k]
    return out / count  # exact where one window covers a pixel (x / 1.0 == x)


# ----------------------------------------------------------------------------- TTA
def _view_logits(model: nn.Module, views: torch.Tensor, *, tta: TTAConfig,
                 num_classes: int) -> torch.Tensor:
    h, w = views.shape[-2:]
    if tta.crop_hw is not None and (h > tta.crop_hw[0] or w > tta.crop_hw[1]):
        return sliding_window(model, views, crop_hw=tta.crop_hw, overlap=tta.overlap,
                              num_classes=num_classes, batch_size=tta.batch_size, amp=_amp(tta),
                              pad_multiple=tta.pad_multiple)
    return _forward(model, views, num_classes=num_classes, amp=_amp(tta),
                    pad_multiple=tta.pad_multiple)


@torch.no_grad()
def predict_probs_batch(model: nn.Module, images: torch.Tensor, *, tta: TTAConfig,
                        num_classes: int) -> torch.Tensor:
    """TTA probabilities, float32 [N, C, H, W] on the model's device, of ``images`` [N, 3, H, W]
    (normalized float, one size); see :func:`predict_probs_and_plain`."""
    return predict_probs_and_plain(model, images, tta=tta, num_classes=num_classes)[0]


def predict_probs_and_plain(model: nn.Module, images: torch.Tensor, *, tta: TTAConfig,
                            num_classes: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """TTA probabilities, float32 [N, C, H, W] on the model's device, of ``images`` [N, 3, H, W]
    (normalized float, one size), and the probabilities of the plain view alone (scale 1, not
    mirrored) [N, C, H, W] when the TTA has that view, else None: a by-product of the same
    forwards, so scoring one view beside TTA costs nothing more.

    Per scale, the views (image, flipped image) of up to ``batch_size // 2`` images run in one
    forward (or through :func:`sliding_window` when larger than ``crop_hw``); each view's softmax
    is flipped back, summed per image, resized to (H, W) and added to a float32 accumulator,
    divided by ``tta.num_views`` at the end. The model runs in eval mode (its train/eval state is
    restored afterwards), so a logit-adjusted head leaves its prior out as it should.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be [N, 3, H, W], got shape {tuple(images.shape)}")
    device = _model_device(model)
    images = images.to(device=device, dtype=torch.float32)
    n, _, h, w = images.shape
    n_kinds = 2 if tta.flip else 1  # view kinds: 0 = as is, 1 = mirrored
    per_group = max(1, tta.batch_size // n_kinds)  # images whose views fill one forward
    acc = torch.zeros(n, num_classes, h, w, dtype=torch.float32, device=device)
    plain = None
    was_training = model.training
    model.eval()
    try:
        for scale in tta.scales:
            for i0 in range(0, n, per_group):
                group = rescale(images[i0:i0 + per_group], scale)
                g = len(group)
                views = torch.cat([group, hflip(group)]) if tta.flip else group  # kind-major
                group_sum = torch.zeros(g, num_classes, *group.shape[-2:], dtype=torch.float32,
                                        device=device)
                for j0 in range(0, len(views), tta.batch_size):
                    j1 = min(j0 + tta.batch_size, len(views))
                    logits = _view_logits(model, views[j0:j1], tta=tta, num_classes=num_classes)
                    probs = logits.softmax(dim=1)
                    for kind in range(n_kinds):  # views [kind*g, (kind+1)*g) in this chunk
                        a, b = max(j0, kind * g), min(j1, (kind + 1) * g)
                        if a < b:
                            p = probs[a - j0:b - j0]
                            group_sum[a - kind * g:b - kind * g] += hflip(p) if kind else p
                            if scale == 1.0 and kind == 0:
                                if plain is None:
                                    plain = torch.empty_like(acc)
                                plain[i0 + a:i0 + b] = p
                    del logits, probs
                # resizing is linear: one resize of the per-image sum equals the sum of resizes
                acc[i0:i0 + g] += restore(group_sum, (h, w))
                del group_sum
    finally:
        model.train(was_training)
    return acc / tta.num_views, plain


def predict_probs(model: nn.Module, image: torch.Tensor, *, tta: TTAConfig,
                  num_classes: int) -> torch.Tensor:
    """TTA probabilities, float32 [C, H, W] on the model's device, of one normalized ``image``
    [3, H, W] or [1, 3, H, W]; see :func:`predict_probs_batch`."""
    if image.ndim == 3:
        image = image.unsqueeze(0)
    if image.ndim != 4 or image.shape[0] != 1:
        raise ValueError(f"image must be [3, H, W] or [1, 3, H, W], got shape {tuple(image.shape)}")
    return predict_probs_batch(model, image, tta=tta, num_classes=num_classes)[0]
