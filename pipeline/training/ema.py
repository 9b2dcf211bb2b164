"""An exponential moving average (EMA) of a run's weights, ``models.<name>.ema.decay`` > 0.

After each applied optimizer step ``ema = decay * ema + (1 - decay) * weights`` for every
parameter and buffer (``use_buffers=True``: BatchNorm's running statistics are averaged too, so
the average needs no re-estimation pass, unlike SWA's). As in
``torch.optim.swa_utils.AveragedModel``, the first update copies the weights. The average is
validated beside the last weights on the same frames, saved as a self-describing checkpoint
(``train/ema.pt``, rebuilt by :func:`pipeline.models.checkpoint.model_from_checkpoint`) and its
state travels in ``train/last.pt``, so a resumed run continues the same average.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


def ema_of(model: nn.Module, decay: float) -> AveragedModel:
    """The EMA of ``model``'s parameters and buffers with ``decay`` in [0, 1): a copy of it on
    its device, updated by ``update_parameters(model)``; ``.module`` is the averaged network."""
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def build_ema(model: nn.Module, decay: float) -> AveragedModel | None:
    """A run's EMA (:func:`ema_of`), or None when ``decay`` is 0: ``ema.decay``'s "off"."""
    return ema_of(model, decay) if decay > 0 else None


def ema_state(ema: AveragedModel) -> dict[str, torch.Tensor]:
    """The average's state (weights, buffers, update count) on the CPU, for ``last.pt``."""
    return {k: v.detach().cpu() for k, v in ema.state_dict().items()}


def load_ema_state(ema: AveragedModel, state: Mapping[str, torch.Tensor]) -> None:
    """Put back a state from :func:`ema_state`."""
    ema.load_state_dict(dict(state))
