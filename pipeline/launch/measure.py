"""What a model config costs on a device: its weights, counted without building them, and (on
request) its throughput, timed by a short probe.

:func:`model_size` builds the config's model on PyTorch's ``meta`` device: every tensor has a
shape and a dtype but no storage, so even a large encoder is counted in a fraction of a second,
without memory and without downloading weights (a model that cannot be built there, such as a
logit-adjusted head that reads its prior's values, is built on the CPU instead: about a
second). :func:`probe_throughput` times a few training steps (AdamW, cross-entropy on random
pixels: the cost of the network, not of the run's loss or data loading) and a few inference
forwards of one config on the given device. Its numbers are rough by design (a few steps, a
small batch on a CPU, whatever else the machine runs meanwhile): they give the order of
magnitude of the device-hours.
"""

from __future__ import annotations

import statistics
import time
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.core.runs import RunConfig
from pipeline.models.build import build_model
from pipeline.models.predict import autocast, forward_padded

PROBE_STEPS = 3            # timed steps after one warm-up step (their median counts)
CPU_PROBE_BATCH = 2        # images per probe step on a CPU (the config's batch on a GPU)


def untrained_model(cfg: RunConfig, *, num_classes: int, device: torch.device | str = "cpu"
                    ) -> nn.Module:
    """``cfg``'s model with random weights on ``device`` (a logit-adjusted head gets a uniform
    prior: the same tensors as the real one). Its weights file is not read: counting and timing
    need the architecture only."""
    la = cfg.logit_adjust
    spec = ({"tau": la.tau, "scale": la.scale, "prior": [1.0] * num_classes,
             "keep_prior_at_eval": la.keep_prior_at_eval, "head": la.head}
            if la.enabled else None)
    with torch.device(device):
        return build_model(arch=cfg.model.arch, encoder=cfg.model.encoder, num_classes=num_classes,
                           weights=None, logit_adjust=spec, **cfg.model.arch_kwargs)


def model_size(cfg: RunConfig, *, num_classes: int) -> tuple[int, int]:
    """(bytes of the state dict, trainable weights) of ``cfg``'s model for ``num_classes``."""
    try:
        model = untrained_model(cfg, num_classes=num_classes, device="meta")
    except Exception:  # noqa: BLE001 - an op needs data (a logit-adjusted head's prior): the
        # CPU build below counts the same tensors, and raises the real error if there is one
        model = untrained_model(cfg, num_classes=num_classes, device="cpu")
    state = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return int(state), int(trainable)


def _timed(step, *, device: torch.device, steps: int) -> float:
    """Median seconds of one call of ``step`` over ``steps`` calls after an untimed warm-up
    call (the median: one step slowed by another process does not set the number)."""
    times = []
    for k in range(steps + 1):
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if k:
            times.append(time.perf_counter() - start)
    return max(statistics.median(times), 1e-9)


def probe_throughput(cfg: RunConfig, *, num_classes: int, train_hw: Sequence[int],
                     infer_hw: Sequence[int], infer_batch: int, device: torch.device,
                     steps: int = PROBE_STEPS) -> tuple[float, float]:
    """(training images per second, inference forwards per second) of ``cfg``'s model on
    ``device``: training crops of ``train_hw`` (H, W) in batches of the config's batch size
    (at most :data:`CPU_PROBE_BATCH` on a CPU), inference views or windows of ``infer_hw`` in
    batches of ``infer_batch`` (same cap), each the median of ``steps`` timed steps."""
    cap = CPU_PROBE_BATCH if device.type == "cpu" else None
    amp = cfg.model.amp  # a name or a boolean: pipeline.models.predict.resolve_amp
    model = untrained_model(cfg, num_classes=num_classes, device="cpu").to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = min(cfg.model.batch_size, cap or cfg.model.batch_size)
    images = torch.randn(batch, 3, *train_hw, device=device)
    target = torch.randint(0, num_classes, (batch, *train_hw), device=device)

    def train_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, amp):
            logits = model(images)
        F.cross_entropy(logits.float(), target).backward()
        optimizer.step()

    model.train()
    train_s = _timed(train_step, device=device, steps=steps)
    views = torch.randn(min(infer_batch, cap or infer_batch), 3, *infer_hw, device=device)

    @torch.no_grad()
    def infer_step() -> None:
        with autocast(device, amp):
            forward_padded(model, views)

    model.eval()
    infer_s = _timed(infer_step, device=device, steps=steps)
    return batch / train_s, len(views) / infer_s
