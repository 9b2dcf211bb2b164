"""Plain (single-view) prediction: pad to the encoder stride, forward, crop back.

Validation during training and every TTA view go through :func:`forward_padded`, so a model
sees frames of any size (CamVid's 360 rows are not a multiple of 32) the same way everywhere.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.core.runs import amp_mode
from pipeline.evaluation.metrics import ConfusionMatrix


def pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Zero-pad ``x`` [N, C, H, W] at the bottom/right so H and W divide by ``multiple``."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph))
    return x, (h, w)


@torch.no_grad()
def forward_padded(model: nn.Module, images: torch.Tensor, *, multiple: int = 32) -> torch.Tensor:
    """Logits [N, C, H, W] of ``images`` [N, 3, H, W] (normalized), any H and W."""
    padded, (h, w) = pad_to_multiple(images, multiple)
    return model(padded)[..., :h, :w]


def resolve_amp(amp: bool | str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of an ``amp`` setting (:data:`pipeline.core.runs.AMP_MODES`, or a
    boolean: true = auto, false = off) on ``device``; None: no autocast.

    ``auto`` is bf16 on a CUDA device that supports it, else fp16 there, and None elsewhere;
    ``bf16`` and ``fp16`` are those on any device; ``off`` is None."""
    mode = amp_mode(amp)
    if mode == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[mode]


def autocast(device: torch.device, amp: bool | str):
    """Autocast to :func:`resolve_amp`'s dtype; a no-op context where that is None."""
    dtype = resolve_amp(amp, device)
    return torch.autocast(device_type=device.type, dtype=dtype or torch.bfloat16,
                          enabled=dtype is not None)


@torch.no_grad()
def predict_logits(model: nn.Module, images: torch.Tensor, *, scale: float = 1.0,
                   amp: bool | str = False) -> torch.Tensor:
    """Logits [N, C, H, W] of one plain view of ``images`` [N, 3, H, W]: resized by ``scale``
    (bilinear) when it is not 1, predicted, and the logits resized back to (H, W)."""
    size = images.shape[-2:]
    if scale != 1.0:
        images = F.interpolate(images, scale_factor=scale, mode="bilinear", align_corners=False)
    with autocast(images.device, amp):
        logits = forward_padded(model, images)
    if logits.shape[-2:] != size:
        logits = F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)
    return logits


def validate(model: nn.Module, batches: Iterable[dict], *, num_classes: int,
             device: torch.device, amp: bool | str = False, ignore_index: int = 255,
             scale: float = 1.0) -> np.ndarray:
    """Confusion matrix [C, C] of argmax predictions over ``batches`` (dicts with image, mask);
    ``scale`` != 1 predicts the images resized by it and resizes the logits back."""
    was_training = model.training
    model.eval()
    cm = ConfusionMatrix(num_classes=num_classes, ignore_index=ignore_index)
    try:
        for batch in batches:
            images = batch["image"].to(device, non_blocking=True)
            logits = predict_logits(model, images, scale=scale, amp=amp)
            pred = logits.argmax(1).to(torch.uint8).cpu().numpy()
            gt = batch["mask"].numpy().astype(np.uint8)
            for g, p in zip(gt, pred):
                cm.update(g, p)
    finally:
        model.train(was_training)
    return cm.matrix
