"""Mixed precision of a training run: fp16's gradient scaler and the optimizer step through it.

``models.<name>.amp`` resolves to an autocast dtype (:func:`pipeline.models.predict.resolve_amp`).
Under fp16 small gradients underflow, so the loss is multiplied by a running scale before the
backward pass and the gradients divided by it before the step (``torch.amp.GradScaler``). A
step whose gradients hold an inf or NaN is skipped by the scaler, which halves its scale; the
run counts such steps (``skipped_steps``) instead of stopping as it does for a NaN loss. bf16
has float32's range and needs no scaler. The scaler's state travels in ``train/last.pt``, so a
resumed fp16 run continues with the same scale.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.models.predict import resolve_amp


def build_scaler(amp: bool | str, device: torch.device) -> torch.amp.GradScaler | None:
    """A gradient scaler for ``device`` when ``amp`` resolves to fp16 there; else None."""
    if resolve_amp(amp, device) != torch.float16:
        return None
    return torch.amp.GradScaler(device.type)


def backward(loss: torch.Tensor, scaler: torch.amp.GradScaler | None) -> None:
    """Accumulate the gradients of ``loss`` (scaled first when there is a scaler)."""
    (scaler.scale(loss) if scaler is not None else loss).backward()


def optimizer_step(optimizer: torch.optim.Optimizer, *, model: nn.Module,
                   scaler: torch.amp.GradScaler | None, grad_clip: float = 0.0) -> bool:
    """Clip the accumulated gradients to the global norm ``grad_clip`` (0: no clipping; on the
    unscaled gradients) and step; False when the scaler skipped the step for inf/NaN gradients.

    The scaler lowers its scale exactly when it finds such gradients (``backoff_factor`` < 1),
    which is how a skip is told through its public API."""
    if scaler is None:
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        return True
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    before = scaler.get_scale()
    scaler.step(optimizer)
    scaler.update()
    return scaler.get_scale() >= before
