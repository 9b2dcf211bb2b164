"""Whether a run's batch fits: split across the DDP ranks, and in the memory the device has free.

Both checks run before a run writes anything, so a batch that cannot work is refused with the
key to change (``models.<name>.batch_size``) instead of failing mid-run.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from pipeline.core.errors import PipelineError
from pipeline.core.runs import RunConfig
from pipeline.data.manifest import Frame
from pipeline.models.predict import resolve_amp


def available_memory(device: torch.device) -> int | None:
    """Bytes free for a run on ``device``: CUDA's free memory, else the host's available RAM
    (psutil when installed, /proc/meminfo, sysconf); None when nothing tells."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        import psutil  # optional: not a dependency of the package
        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def activation_bytes(model: nn.Module, hw: Sequence[int], *, probe_side: int = 64) -> float | None:
    """Bytes autograd keeps for the backward pass per training image of size ``hw``: measured
    on a CPU copy of ``model`` (2 images, train mode) at ``hw`` or, for a larger ``hw``, at
    ``probe_side`` squared, scaled by the pixel count. The model, its BatchNorm statistics and
    the RNG streams are left as they were. None when the copy cannot run at that size."""
    h, w = (int(v) for v in hw)
    ph, pw = (h, w) if h * w <= 4 * probe_side ** 2 else (probe_side, probe_side)
    probe = copy.deepcopy(model).cpu().train()
    params = {p.untyped_storage().data_ptr() for p in probe.parameters()}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    try:
        with torch.random.fork_rng(devices=[]), \
                torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = probe(torch.zeros(2, 3, ph, pw))
    except Exception:  # an encoder with a fixed input size, ...: no estimate
        return None
    per_image = (sum(kept.values()) + 3 * out.float().nbytes) / 2  # + the losses' softmax etc.
    return per_image * (h * w) / (ph * pw)


def _train_hw(augment: dict, frames: Sequence[Frame]) -> tuple[int, int] | None:
    crop = augment.get("crop")
    if crop:
        return int(crop[0]), int(crop[1])
    sizes = [(f.height, f.width) for f in frames if f.height and f.width]
    if not sizes:
        return None
    scale = augment.get("scale") or 1.0
    scale = max(max(scale) if isinstance(scale, (list, tuple)) else float(scale), 1.0)
    return int(max(h for h, _ in sizes) * scale), int(max(w for _, w in sizes) * scale)


def check_memory(model: nn.Module, *, cfg: RunConfig, frames: Sequence[Frame],
                 device: torch.device, world_size: int = 1) -> None:
    """Refuse, naming ``models.<name>.batch_size``, a run whose rough memory need exceeds what
    the device has free: weights, gradients and optimizer state plus, per image of the rank's
    batch, the activations :func:`activation_bytes` measures (halved under bf16 or fp16
    autocast). It leaves out the allocator's temporaries, so it errs low: a run it lets through may
    still run out, one it refuses cannot fit."""
    m = cfg.model
    hw = _train_hw(m.augment, frames)
    free = available_memory(device)
    if hw is None or not free:
        return
    if device.type == "cpu":  # processes of one CPU host share its memory
        free //= max(1, int(os.environ.get("LOCAL_WORLD_SIZE", world_size)))
    per_image = activation_bytes(model, hw)
    if per_image is None:
        return
    if resolve_amp(m.amp, device) is not None:
        per_image /= 2
    per_image += 3 * hw[0] * hw[1] * 4 + hw[0] * hw[1] * 8  # the batch itself: image, mask
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    slots = 2 if cfg.optimizer.name == "adamw" else 1  # AdamW's two moments, SGD's momentum
    batch = m.batch_size // world_size
    need = weights * (2 + slots) + batch * per_image
    if need > free:
        raise PipelineError(
            f"models.{cfg.name}.batch_size: {batch} image(s) of {hw[0]}x{hw[1]} per step need "
            f"about {_size(need)} to train (a rough estimate, {_size(per_image)} per image), "
            f"more than the {_size(free)} free on {device}; lower "
            f"models.{cfg.name}.batch_size or models.{cfg.name}.augment.crop")


def _size(nbytes: float) -> str:
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def check_batch(cfg: RunConfig, *, train_frames: int, world_size: int = 1) -> int:
    """The batch one rank draws per step: ``models.<name>.batch_size`` is the global batch,
    split evenly across the ``world_size`` DDP ranks, and at most the training frames."""
    key, batch = f"models.{cfg.name}.batch_size", cfg.model.batch_size
    if batch > train_frames:
        raise PipelineError(f"{key} ({batch}) is larger than the {train_frames} training frames; "
                            f"lower it to at most {train_frames}")
    if batch % world_size:
        raise PipelineError(f"{key} ({batch}) is the global batch of a step and must divide by "
                            f"the {world_size} DDP processes")
    return batch // world_size
