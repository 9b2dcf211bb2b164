"""What wraps a model: DDP, torch.compile, channels-last memory; seen through or applied."""

from __future__ import annotations

import torch
from torch import nn


def to_channels_last(model: nn.Module) -> nn.Module:
    """Convert conv weights to channels_last in place (faster convs with AMP on GPUs)."""
    return model.to(memory_format=torch.channels_last)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare model under DistributedDataParallel/DataParallel and torch.compile wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return model
