"""Parameter groups, optimizers by name, and iteration-based learning-rate schedules.

The encoder (pretrained) trains at ``lr``, the decoder and head at ``lr * head_lr_mult``.
Norm weights, biases and position embeddings / tokens get no weight decay. Schedules are
pure functions of the 0-based iteration returning a factor of each group's own lr, wrapped
in a resumable ``LambdaLR``: ``warmup_poly`` for the main run, then ``cyclic`` for the SWA
phase, whose cycles end at a low lr where SWA takes its snapshots.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch
from torch import nn

from pipeline.core.errors import PipelineError, unknown_name
from pipeline.models.wrappers import unwrap_model

# Parameter names (substrings) that never get weight decay, as in timm's no_weight_decay().
NO_DECAY_TOKENS = ("pos_embed", "absolute_pos_embed", "relative_position_bias_table",
                   "cls_token", "dist_token", "reg_token", "mask_token", "pos_embedding",
                   "position_embeddings", "rel_pos")


def _no_decay_names(model: nn.Module) -> set[str]:
    """Full names that modules declare via timm's ``no_weight_decay()`` convention."""
    names = set()
    for prefix, module in model.named_modules():
        fn = getattr(module, "no_weight_decay", None)
        if callable(fn):
            names |= {f"{prefix}.{n}" if prefix else n for n in fn()}
    return names


def _named_trainable(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    return ((n, p) for n, p in model.named_parameters() if p.requires_grad)


def param_groups(model: nn.Module, *, lr: float, weight_decay: float,
                 head_lr_mult: float = 10.0) -> list[dict]:
    """Split trainable parameters into up to four optimizer groups.

    ``encoder.*`` parameters get ``lr``, all others ``lr * head_lr_mult``; 1-D parameters
    (norm weights, biases), ``*.bias`` and position embeddings / tokens get weight decay 0.
    Each group carries ``name`` and ``lr_mult`` (its lr relative to ``lr``). Empty groups
    are left out; every trainable parameter is in exactly one group.
    """
    model = unwrap_model(model)
    declared = _no_decay_names(model)
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, param in _named_trainable(model):
        part = "encoder" if name.startswith("encoder.") else "head"
        no_decay = (param.ndim <= 1 or name.endswith(".bias") or name in declared
                    or any(token in name for token in NO_DECAY_TOKENS))
        groups.setdefault((part, no_decay), []).append(param)
    out = []
    for (part, no_decay), params in sorted(groups.items()):
        mult = 1.0 if part == "encoder" else float(head_lr_mult)
        out.append({"params": params, "name": f"{part}{'_no_decay' if no_decay else ''}",
                    "lr": lr * mult, "lr_mult": mult,
                    "weight_decay": 0.0 if no_decay else weight_decay})
    return out


def _adamw(groups, *, lr, momentum, betas):
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas))


def _sgd(groups, *, lr, momentum, betas):
    return torch.optim.SGD(groups, lr=lr, momentum=momentum)


OPTIMIZERS = {"adamw": _adamw, "sgd": _sgd}


def build_optimizer(model: nn.Module, *, name: str = "adamw", lr: float, weight_decay: float,
                    head_lr_mult: float = 10.0, momentum: float = 0.9,
                    betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.Optimizer:
    """Optimizer ``name`` (``adamw`` | ``sgd`` with momentum) over :func:`param_groups`."""
    if name not in OPTIMIZERS:
        raise unknown_name("optimizer", name, OPTIMIZERS)
    if lr <= 0:
        raise PipelineError(f"'lr' must be > 0, got {lr}")
    groups = param_groups(model, lr=lr, weight_decay=weight_decay, head_lr_mult=head_lr_mult)
    return OPTIMIZERS[name](groups, lr=lr, momentum=momentum, betas=betas)


def warmup_poly(it: int, *, max_iters: int, warmup_iters: int, warmup_ratio: float = 1e-6,
                power: float = 1.0, min_lr_ratio: float = 0.0) -> float:
    """LR factor at 0-based iteration ``it``: linear warmup, then polynomial decay.

    ``warmup_ratio`` at ``it = 0`` rising linearly to 1 at ``it = warmup_iters``, then
    ``min + (1 - min) * (1 - t) ** power`` with ``t`` going 0 -> 1 from ``warmup_iters`` to
    ``max_iters`` (the factor is ``min_lr_ratio`` from ``max_iters`` on).
    """
    if it < warmup_iters:
        return warmup_ratio + (1.0 - warmup_ratio) * it / warmup_iters
    t = min(1.0, (it - warmup_iters) / max(1, max_iters - warmup_iters))
    return min_lr_ratio + (1.0 - min_lr_ratio) * (1.0 - t) ** power


def cyclic(it: int, *, cycle_len: int, max_ratio: float, min_ratio: float) -> float:
    """LR factor at iteration ``it`` of the SWA phase: linear from high to low, every cycle.

    The SWA paper's schedule (Izmailov et al., 2018): with ``t = (it % cycle_len + 1) /
    cycle_len``, the factor is ``(1 - t) * max_ratio + t * min_ratio``, so the last
    iteration of each cycle (where the snapshot is taken) runs at exactly ``min_ratio``;
    ``cycle_len = 1`` is a constant ``min_ratio``.
    """
    t = (it % cycle_len + 1) / cycle_len
    return (1.0 - t) * max_ratio + t * min_ratio


class Schedule:
    """``warmup_poly`` for ``it < max_iters``, then ``cyclic`` (a picklable LambdaLR lambda).

    Its attributes are plain numbers, so ``LambdaLR.state_dict()`` saves and restores them.
    """

    def __init__(self, *, max_iters, warmup_iters, warmup_ratio, power, min_lr_ratio,
                 swa_cycle, swa_max_ratio, swa_min_ratio):
        self.max_iters, self.warmup_iters, self.warmup_ratio = max_iters, warmup_iters, warmup_ratio
        self.power, self.min_lr_ratio = power, min_lr_ratio
        self.swa_cycle, self.swa_max_ratio = swa_cycle, swa_max_ratio
        self.swa_min_ratio = swa_min_ratio

    def __call__(self, it: int) -> float:
        if it < self.max_iters:
            return warmup_poly(it, max_iters=self.max_iters, warmup_iters=self.warmup_iters,
                               warmup_ratio=self.warmup_ratio, power=self.power,
                               min_lr_ratio=self.min_lr_ratio)
        return cyclic(it - self.max_iters, cycle_len=self.swa_cycle,
                      max_ratio=self.swa_max_ratio, min_ratio=self.swa_min_ratio)


def swa_snapshot_iters(*, max_iters: int, swa_iters: int, swa_cycle: int) -> list[int]:
    """0-based iterations that end an SWA cycle; snapshot the weights after each of them."""
    return [max_iters + k * swa_cycle - 1 for k in range(1, swa_iters // swa_cycle + 1)]


def build_scheduler(optimizer: torch.optim.Optimizer, *, max_iters: int, warmup_iters: int = 0,
                    warmup_ratio: float = 1e-6, power: float = 1.0, min_lr_ratio: float = 0.0,
                    swa_iters: int = 0, swa_cycle: int = 1, swa_max_ratio: float = 0.1,
                    swa_min_ratio: float = 0.001) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR over ``max_iters`` main iterations followed by ``swa_iters`` SWA iterations.

    Call ``scheduler.step()`` once after every optimizer step: iteration ``it`` (0-based)
    then runs at ``group lr * Schedule(it)``. ``swa_iters`` must be a whole number of
    ``swa_cycle``-long cycles so that the last snapshot also sits at the low lr.
    """
    if max_iters < 1 or not 0 <= warmup_iters < max_iters:
        raise PipelineError(f"need 0 <= warmup_iters < max_iters, got warmup_iters={warmup_iters}, "
                            f"max_iters={max_iters}")
    if not 0 <= min_lr_ratio <= 1 or not 0 < warmup_ratio <= 1:
        raise PipelineError(f"'min_lr_ratio' must be in [0, 1] and 'warmup_ratio' in (0, 1], got "
                            f"{min_lr_ratio}, {warmup_ratio}")
    if swa_iters < 0 or swa_cycle < 1 or swa_iters % swa_cycle:
        raise PipelineError(f"'swa_iters' ({swa_iters}) must be a non-negative multiple of "
                            f"'swa_cycle' ({swa_cycle})")
    if swa_iters and not 0 <= swa_min_ratio <= swa_max_ratio:
        raise PipelineError(f"need 0 <= swa_min_ratio <= swa_max_ratio, got {swa_min_ratio}, "
                            f"{swa_max_ratio}")
    if not math.isfinite(power) or power <= 0:
        raise PipelineError(f"'power' must be > 0, got {power}")
    schedule = Schedule(max_iters=max_iters, warmup_iters=warmup_iters, warmup_ratio=warmup_ratio,
                        power=power, min_lr_ratio=min_lr_ratio, swa_cycle=swa_cycle,
                        swa_max_ratio=swa_max_ratio, swa_min_ratio=swa_min_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
