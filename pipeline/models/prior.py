"""Logit adjustment (Menon et al., 2021): the class prior as a fixed bias of the model's head.

The model trains ``f(x) + tau * log(prior)`` so that the learned ``f`` is balanced: the bias is
added in train mode only (unless ``keep_prior_at_eval``). ``head: cosine`` (default) also
replaces the head's final conv (3x3 in smp's SegmentationHead) with a 1x1 cosine classifier
``s * cos(w_y, feature)``; ``head: linear`` keeps smp's conv and only adds the bias, which trains
much faster when the decoder's last features are few (the cosine of a handful of non-negative
ReLU features separates classes poorly, and the 1x1 classifier loses the 3x3 conv's spatial
context). :func:`without_prior` and :func:`add_prior` let distillation compare a student and its
teacher on bare logits.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.core.errors import PipelineError, unknown_name
from pipeline.models.wrappers import unwrap_model


def log_prior(pixel_counts: Any, *, eps: float = 1e-12) -> torch.Tensor:
    """log of the normalised class frequencies, float32 [C].

    ``pixel_counts``: [C], or [frames, C] (summed over frames, as ``read_class_counts`` gives).
    Classes with no pixel get ``log(eps)``, finite.
    """
    counts = np.asarray(pixel_counts.cpu() if torch.is_tensor(pixel_counts) else pixel_counts,
                        dtype=np.float64)
    if counts.ndim == 2:
        counts = counts.sum(axis=0)
    if counts.ndim != 1 or counts.size == 0 or (counts < 0).any() or counts.sum() <= 0:
        raise PipelineError(f"class pixel counts must be non-negative [C] or [frames, C] with a "
                            f"positive total; got shape {counts.shape}, total {counts.sum()}")
    prior = np.maximum(counts / counts.sum(), eps)
    return torch.from_numpy(np.log(prior)).float()


def logit_adjustment_bias(pixel_counts: Any, *, tau: float = 0.03,
                          eps: float = 1e-12) -> torch.Tensor:
    """``tau * log(pi)``, float32 [C]: the logit-adjustment offset (Menon et al. 2021)."""
    return tau * log_prior(pixel_counts, eps=eps)


LOGIT_ADJUST_DEFAULTS = {"tau": 0.03, "scale": 16.0, "prior": None, "keep_prior_at_eval": False,
                         "head": "cosine"}


LOGIT_ADJUST_HEADS = ("cosine", "linear")


PRIOR_FLOOR = 1e-12  # a class absent from the prior gets log(1e-12), not -inf (as losses.py)


def normalize_logit_adjust(spec: Mapping[str, Any] | None, num_classes: int) -> dict | None:
    if not spec:
        return None
    unknown = sorted(set(spec) - set(LOGIT_ADJUST_DEFAULTS))
    if unknown:
        raise PipelineError(f"unknown key 'logit_adjust.{unknown[0]}'; valid keys: "
                            f"{', '.join(sorted(LOGIT_ADJUST_DEFAULTS))}")
    out = {**LOGIT_ADJUST_DEFAULTS, **spec}
    prior = out["prior"]
    if prior is None:
        raise PipelineError("'logit_adjust.prior' is required: pixel counts or frequencies "
                            "per class")
    try:
        prior_t = torch.as_tensor(prior, dtype=torch.float64)
        if prior_t.ndim == 2:  # [frames, C] as read_class_counts gives
            prior_t = prior_t.sum(dim=0)
        prior = [float(p) for p in prior_t.flatten().tolist()]
        out["tau"], out["scale"] = float(out["tau"]), float(out["scale"])
    except (TypeError, ValueError, RuntimeError):
        raise PipelineError(f"'logit_adjust' needs numbers (tau, scale) and a list of numbers "
                            f"(prior); got {dict(spec)!r}"[:300]) from None
    if len(prior) != num_classes:
        raise PipelineError(f"'logit_adjust.prior' has {len(prior)} entries for "
                            f"{num_classes} classes")
    if not all(math.isfinite(p) and p >= 0 for p in prior) or sum(prior) <= 0:
        raise PipelineError("'logit_adjust.prior' must be finite, non-negative and not all zero")
    total = sum(prior)
    out["prior"] = [p / total for p in prior]
    if out["scale"] <= 0:
        raise PipelineError(f"'logit_adjust.scale' must be > 0, got {out['scale']}")
    out["keep_prior_at_eval"] = bool(out["keep_prior_at_eval"])
    if out["head"] not in LOGIT_ADJUST_HEADS:
        raise unknown_name("logit_adjust.head", str(out["head"]), list(LOGIT_ADJUST_HEADS))
    return out


class _PriorBias:
    """The fixed logit-adjustment bias ``tau * log(prior)``: a non-persistent buffer (rebuilt
    from the config, never learned) that :meth:`_add_prior` adds in train mode, and in eval
    mode only when ``keep_prior_at_eval``; never inside :func:`without_prior`. Mixed into an
    ``nn.Module``."""

    def _init_prior(self, prior: Sequence[float], *, tau: float, keep_prior_at_eval: bool) -> None:
        self.tau, self.keep_prior_at_eval = float(tau), bool(keep_prior_at_eval)
        self.prior_off = False  # set by without_prior()
        bias = logit_adjustment_bias(prior, tau=self.tau, eps=PRIOR_FLOOR)
        self.register_buffer("prior_bias", bias, persistent=False)

    def _add_prior(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.prior_off and (self.training or self.keep_prior_at_eval):
            logits = logits + self.prior_bias.view(1, -1, 1, 1).to(logits.dtype)
        return logits

    def _prior_repr(self) -> str:
        return f"tau={self.tau}, keep_prior_at_eval={self.keep_prior_at_eval}"


class CosineClassifier(_PriorBias, nn.Module):
    """1x1 cosine classifier: ``logits = s * <w_y, f> / (|w_y| |f|)`` plus the fixed prior bias.

    Input ``[N, C_in, H, W]`` features, output ``[N, num_classes, H, W]`` logits.
    """

    def __init__(self, in_channels: int, num_classes: int, *, scale: float, tau: float,
                 prior: Sequence[float], keep_prior_at_eval: bool = False):
        super().__init__()
        self.in_channels, self.out_channels, self.kernel_size = in_channels, num_classes, (1, 1)
        self.scale = float(scale)
        # A conv-shaped [C, C_in, 1, 1] weight, so the state dict reads like a 1x1 conv's.
        self.weight = nn.Parameter(torch.empty(num_classes, in_channels, 1, 1))
        nn.init.normal_(self.weight, std=0.01)
        self._init_prior(prior, tau=tau, keep_prior_at_eval=keep_prior_at_eval)

    def cosine(self, x: torch.Tensor) -> torch.Tensor:
        """Scaled cosine logits without the prior bias, in ``[-scale, scale]``."""
        feats = F.normalize(x, dim=1, eps=1e-6)  # eps survives fp16 autocast
        w = F.normalize(self.weight.flatten(1), dim=1, eps=1e-6).view_as(self.weight)
        return self.scale * F.conv2d(feats, w.to(feats.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._add_prior(self.cosine(x))

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, scale={self.scale}, {self._prior_repr()}"


class PriorAdjustedConv(_PriorBias, nn.Conv2d):
    """smp's classifier conv (any kernel) plus the fixed prior bias; its state dict is the
    plain conv's, so weights move between this model and a plain smp one."""

    def __init__(self, conv: nn.Conv2d, *, tau: float, prior: Sequence[float],
                 keep_prior_at_eval: bool = False):
        super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                         padding=conv.padding, bias=conv.bias is not None)
        self.load_state_dict(conv.state_dict())
        self._init_prior(prior, tau=tau, keep_prior_at_eval=keep_prior_at_eval)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._add_prior(super().forward(x))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._prior_repr()}"


def _prior_heads(model: nn.Module) -> list[_PriorBias]:
    return [m for m in unwrap_model(model).modules() if isinstance(m, _PriorBias)]


@contextlib.contextmanager
def without_prior(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block ``model`` returns its bare logits ``f(x)``: a logit-adjusted head adds
    no prior bias, whatever its mode. A model without such a head is unaffected."""
    heads = _prior_heads(model)
    before = [head.prior_off for head in heads]
    for head in heads:
        head.prior_off = True
    try:
        yield model
    finally:
        for head, off in zip(heads, before):
            head.prior_off = off


def add_prior(model: nn.Module, logits: torch.Tensor) -> torch.Tensor:
    """``logits`` [N, C, H, W] plus the prior bias ``model``'s head adds in its present mode (train
    mode, or eval with ``keep_prior_at_eval``): for bare logits from :func:`without_prior`, what
    ``model(x)`` gives. Bit for bit when the head is the network's last step (Unet and the other
    archs whose head does not upsample); after an upsampling head (FPN) up to rounding, as the
    bias then comes after the interpolation rather than before it."""
    for head in _prior_heads(model):
        logits = head._add_prior(logits)
    return logits


def install_la_head(model: nn.Module, num_classes: int, spec: dict) -> None:
    head = getattr(model, "segmentation_head", None)
    convs = [(name, m) for name, m in (head.named_modules() if head is not None else [])
             if isinstance(m, nn.Conv2d) and m.out_channels == num_classes]
    if not convs:
        raise PipelineError(f"logit_adjust: no {num_classes}-class Conv2d in the segmentation head "
                            f"of {type(model).__name__}")
    name, conv = convs[-1]  # the classifier is the head's last conv
    parent = head.get_submodule(name.rpartition(".")[0]) if "." in name else head
    if spec["head"] == "linear":
        new = PriorAdjustedConv(conv, tau=spec["tau"], prior=spec["prior"],
                                keep_prior_at_eval=spec["keep_prior_at_eval"])
    else:
        new = CosineClassifier(conv.in_channels, num_classes, scale=spec["scale"], tau=spec["tau"],
                               prior=spec["prior"], keep_prior_at_eval=spec["keep_prior_at_eval"])
    setattr(parent, name.rpartition(".")[2], new)
