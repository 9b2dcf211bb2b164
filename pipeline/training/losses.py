"""Training losses: cross-entropy, OHEM, self-distillation, combined by name from a registry.

The maths lives in pure functions (tensors in, tensors out); thin ``nn.Module`` wrappers hold
the options; :func:`build_loss` combines named, weighted parts from params. Shapes everywhere:
``logits`` [B, C, H, W] float, ``target`` [B, H, W] long where ``ignore_index`` (255) marks
unlabelled pixels, which never change a loss value. A batch without a labelled pixel gives a 0
that still has a grad (so DDP/AMP steps stay uniform) instead of nan. Dice, Lovasz and focal
come from ``segmentation_models_pytorch.losses`` (multiclass mode).
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable, Mapping, Sequence

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.core.errors import PipelineError, unknown_name

IGNORE_INDEX = 255
OHEM_REF_HW = (640, 640)  # crop size the seed recipe's min_kept (pixels per image) refers to


# ----------------------------------------------------------------------------- pure functions
def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` [B, H, W] over ``mask`` [B, H, W] bool; 0 (with grad) for an empty mask."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def pixel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, *,
                        ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Per-pixel cross-entropy [B, H, W] (0 at ignored pixels)."""
    return F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="none")


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, *,
                  ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Cross-entropy averaged over labelled pixels; scalar, 0 when none is labelled."""
    return masked_mean(pixel_cross_entropy(logits, target, ignore_index=ignore_index),
                       target != ignore_index)


def scaled_min_kept(min_kept: int, *, crop_hw: Sequence[int],
                    ref_hw: Sequence[int] = OHEM_REF_HW) -> int:
    """Rescale an OHEM ``min_kept`` (pixels per image) stated for ``ref_hw`` crops to ``crop_hw``.

    ``scaled_min_kept(200000, crop_hw=(320, 320)) == 50000``: the kept fraction stays the same.
    """
    (h, w), (rh, rw) = crop_hw, ref_hw
    if min(h, w, rh, rw) <= 0 or min_kept < 0:
        raise PipelineError(f"OHEM: min_kept ({min_kept}) must be >= 0 and crop sizes "
                            f"({list(crop_hw)}, {list(ref_hw)}) positive")
    return int(round(min_kept * h * w / (rh * rw)))


@torch.no_grad()
def ohem_mask(logits: torch.Tensor, target: torch.Tensor, *, thresh: float, min_kept: int,
              ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Hard pixels by MMSegmentation's ``OHEMPixelSampler`` rule; bool [B, H, W], no grad.

    p = softmax probability of each labelled pixel's true class; with ``batch_kept = min_kept * B``
    and ``s`` the sorted p of labelled pixels, ``threshold = max(s[min(batch_kept, n - 1)],
    thresh)`` and a labelled pixel is kept when ``p < threshold``. With distinct probabilities
    that keeps the ``batch_kept`` easiest-to-miss pixels at least (only ``n - 1`` when
    ``batch_kept >= n``, as in MMSeg) plus every pixel below ``thresh``.
    """
    valid = target != ignore_index
    n_valid = int(valid.sum())
    if n_valid == 0:
        return valid
    prob = logits.detach().float().softmax(dim=1)
    true_prob = prob.gather(1, target.masked_fill(~valid, 0).unsqueeze(1)).squeeze(1)
    k = min(min_kept * target.shape[0], n_valid - 1)
    min_threshold = torch.kthvalue(true_prob[valid], k + 1).values  # == sorted[k]
    threshold = torch.clamp(min_threshold, min=float(thresh))
    return valid & (true_prob < threshold)


def ohem_cross_entropy(logits: torch.Tensor, target: torch.Tensor, *, thresh: float = 0.7,
                       min_kept: int = 100000, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Cross-entropy averaged over the pixels :func:`ohem_mask` keeps; scalar.

    Unlike MMSeg (which divides by all pixels) this averages over kept pixels, as HRNet's
    ``OhemCrossEntropy`` does, so the scale does not depend on how many pixels are easy.
    """
    keep = ohem_mask(logits, target, thresh=thresh, min_kept=min_kept, ignore_index=ignore_index)
    return masked_mean(pixel_cross_entropy(logits, target, ignore_index=ignore_index), keep)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *,
                      temperature: float = 1.0, target: torch.Tensor | None = None,
                      ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher/T) || softmax(student/T))`` summed over classes; scalar.

    Both logits [B, C, H, W]; the teacher is detached. Averaged over all pixels, or over the
    labelled pixels of ``target`` [B, H, W] when one is given. The ``T^2`` keeps gradient
    magnitudes comparable across temperatures (Hinton et al. 2015).
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"distillation: student {tuple(student_logits.shape)} and teacher "
                         f"{tuple(teacher_logits.shape)} logits differ in shape")
    t = float(temperature)
    log_s = F.log_softmax(student_logits.float() / t, dim=1)
    log_t = F.log_softmax(teacher_logits.detach().float() / t, dim=1)
    kl = F.kl_div(log_s, log_t, reduction="none", log_target=True).sum(dim=1)  # [B, H, W]
    mask = torch.ones_like(kl, dtype=torch.bool) if target is None else target != ignore_index
    return t * t * masked_mean(kl, mask)


# ----------------------------------------------------------------------------- modules
class CrossEntropy(nn.Module):
    """:func:`cross_entropy` as a module; forward(logits, target) -> scalar."""

    def __init__(self, *, ignore_index: int = IGNORE_INDEX):
        super().__init__()
        self.ignore_index = ignore_index

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return cross_entropy(logits, target, ignore_index=self.ignore_index)


class OhemCrossEntropy(nn.Module):
    """:func:`ohem_cross_entropy` as a module; ``min_kept`` is pixels per image."""

    def __init__(self, *, thresh: float = 0.7, min_kept: int = 100000,
                 ignore_index: int = IGNORE_INDEX):
        super().__init__()
        if not 0.0 <= thresh <= 1.0 or min_kept < 0:
            raise PipelineError(f"OHEM: thresh ({thresh}) must be in [0, 1] and min_kept "
                                f"({min_kept}) >= 0")
        self.thresh, self.min_kept, self.ignore_index = float(thresh), int(min_kept), ignore_index

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return ohem_cross_entropy(logits, target, thresh=self.thresh, min_kept=self.min_kept,
                                  ignore_index=self.ignore_index)


class Distillation(nn.Module):
    """:func:`distillation_loss` as a module; forward(student, teacher, target=None)."""

    needs_teacher = True

    def __init__(self, *, temperature: float = 1.0, labelled_only: bool = True,
                 ignore_index: int = IGNORE_INDEX):
        super().__init__()
        if temperature <= 0:
            raise PipelineError(f"distill: temperature must be > 0, got {temperature}")
        self.temperature, self.labelled_only = float(temperature), bool(labelled_only)
        self.ignore_index = ignore_index

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                target: torch.Tensor | None = None) -> torch.Tensor:
        return distillation_loss(student_logits, teacher_logits, temperature=self.temperature,
                                 target=target if self.labelled_only else None,
                                 ignore_index=self.ignore_index)


class SmpLoss(nn.Module):
    """An smp multiclass loss made safe for batches (or, per image, images) with no label."""

    def __init__(self, loss: nn.Module, *, ignore_index: int = IGNORE_INDEX,
                 per_image: bool = False):
        super().__init__()
        self.loss, self.ignore_index, self.per_image = loss, ignore_index, per_image

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        valid = (target != self.ignore_index).flatten(1).any(dim=1)  # [B]
        if not self.per_image:
            return self.loss(logits, target) if valid.any() else logits.sum() * 0.0
        # smp's own per_image mode returns an empty tensor for an unlabelled image
        parts = [self.loss(logits[i:i + 1], target[i:i + 1]) for i in valid.nonzero()[:, 0]]
        return torch.stack(parts).mean() if parts else logits.sum() * 0.0


# ----------------------------------------------------------------------------- registry
def _smp(cls: type) -> Callable[..., nn.Module]:
    """Builder for smp loss ``cls`` whose options are ``cls``'s own (less mode/ignore/logits)."""
    own = inspect.signature(cls).parameters
    hidden = {"mode", "ignore_index", "from_logits", "per_image", "reduction"}
    kw = inspect.Parameter.KEYWORD_ONLY
    params = [inspect.Parameter("ignore_index", kw, default=IGNORE_INDEX)]
    params += [p.replace(kind=kw) for name, p in own.items() if name not in hidden]
    if "per_image" in own:  # done by SmpLoss: smp's per_image breaks on unlabelled images
        params.append(inspect.Parameter("per_image", kw, default=False))

    def build(*, ignore_index: int = IGNORE_INDEX, per_image: bool = False, **options):
        loss = cls(mode="multiclass", ignore_index=ignore_index, **options)
        return SmpLoss(loss, ignore_index=ignore_index, per_image=per_image)

    build.__signature__ = inspect.Signature(params)
    return build


def _ohem(*, thresh: float = 0.7, min_kept: int = 100000, crop_hw: Sequence[int] | None = None,
          ref_hw: Sequence[int] = OHEM_REF_HW, ignore_index: int = IGNORE_INDEX) -> nn.Module:
    if crop_hw is not None:  # min_kept is stated for ref_hw crops
        min_kept = scaled_min_kept(min_kept, crop_hw=crop_hw, ref_hw=ref_hw)
    return OhemCrossEntropy(thresh=thresh, min_kept=min_kept, ignore_index=ignore_index)


LOSSES: dict[str, Callable[..., nn.Module]] = {
    "ce": CrossEntropy,
    "ohem": _ohem,
    "dice": _smp(smp.losses.DiceLoss),
    "lovasz": _smp(smp.losses.LovaszLoss),
    "focal": _smp(smp.losses.FocalLoss),
    "distill": Distillation,
}


def list_losses() -> list[str]:
    """Names :func:`build_loss` accepts."""
    return sorted(LOSSES)


def loss_options(name: str) -> list[str]:
    """Options a spec of loss ``name`` may set (besides ``name`` and ``weight``)."""
    if name not in LOSSES:
        raise unknown_name("loss", name, LOSSES)
    return sorted(p for p in inspect.signature(LOSSES[name]).parameters if p != "ignore_index")


class CombinedLoss(nn.Module):
    """Weighted sum of named parts; forward -> (total, {part: detached value}) for the log."""

    def __init__(self, parts: Mapping[str, nn.Module], weights: Mapping[str, float]):
        super().__init__()
        self.parts = nn.ModuleDict(parts)
        self.weights = dict(weights)

    @property
    def needs_teacher(self) -> bool:
        """True when a part (``distill``) needs ``teacher_logits`` in forward."""
        return any(getattr(p, "needs_teacher", False) for p in self.parts.values())

    def forward(self, logits: torch.Tensor, target: torch.Tensor, *,
                teacher_logits: torch.Tensor | None = None,
                student_logits: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``student_logits`` (default ``logits``) are what the teacher parts compare with
        ``teacher_logits``: the training loop passes the student's logits without its
        logit-adjustment prior there, as the teacher's are (see pipeline.training.distill)."""
        total, values = logits.new_zeros((), dtype=torch.float32), {}
        for name, part in self.parts.items():
            if getattr(part, "needs_teacher", False):
                if teacher_logits is None:
                    raise ValueError(f"loss part '{name}' needs teacher_logits")
                value = part(logits if student_logits is None else student_logits,
                             teacher_logits, target)
            else:
                value = part(logits, target)
            total = total + self.weights[name] * value
            values[name] = value.detach()
        return total, values


def build_loss(specs: str | Mapping[str, Any] | Sequence[str | Mapping[str, Any]], *,
               ignore_index: int = IGNORE_INDEX, crop_hw: Sequence[int] | None = None,
               where: str = "loss") -> CombinedLoss:
    """Build a :class:`CombinedLoss` from specs like ``[{"name": "ohem", "weight": 1.0,
    "thresh": 0.7, "min_kept": 200000}, {"name": "dice", "weight": 0.5}]``.

    A spec is a name or a dict with ``name``, optional ``weight`` (1.0) and the loss's options
    (:func:`loss_options`). ``crop_hw`` (training crop, H, W) is passed to every part that takes
    it (OHEM: its ``min_kept`` is then read as pixels of a 640x640 crop and rescaled); a spec's
    own ``crop_hw`` wins. A repeated name is logged as ``name_2``... ``where`` prefixes errors
    (e.g. ``"params.yaml: train.loss"``): unknown names/options raise PipelineError listing
    the valid ones.
    """
    if isinstance(specs, (str, Mapping)):
        specs = [specs]
    if not specs:
        raise PipelineError(f"{where}: no loss given; valid: {', '.join(list_losses())}")
    parts, weights = {}, {}
    for i, spec in enumerate(specs):
        at = f"{where}[{i}]"
        spec = {"name": spec} if isinstance(spec, str) else dict(spec)
        name = spec.pop("name", None)
        if not isinstance(name, str):
            raise PipelineError(f"{at}: each loss needs a 'name'; valid: {', '.join(list_losses())}")
        if name not in LOSSES:
            raise PipelineError(f"{at}: {unknown_name('loss', name, LOSSES)}")
        weight = spec.pop("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise PipelineError(f"{at}: loss '{name}' weight must be a number, got {weight!r}")
        valid = loss_options(name)
        unknown = sorted(set(spec) - set(valid))
        if unknown:
            raise PipelineError(f"{at}: unknown option '{unknown[0]}' of loss '{name}'; valid: "
                                f"{', '.join(['name', 'weight', *valid])}")
        if crop_hw is not None and "crop_hw" in valid:
            spec.setdefault("crop_hw", tuple(crop_hw))
        try:
            module = LOSSES[name](ignore_index=ignore_index, **spec)
        except PipelineError as err:
            raise PipelineError(f"{at}: {err}") from None
        except (TypeError, ValueError, AssertionError) as err:
            raise PipelineError(f"{at}: bad options for loss '{name}' ({err})") from None
        key, n = name, 2
        while key in parts:
            key, n = f"{name}_{n}", n + 1
        parts[key], weights[key] = module, float(weight)
    return CombinedLoss(parts, weights)
