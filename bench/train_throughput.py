"""Training throughput: model images/s beside data-loader images/s (does the loader keep up?).

    python bench/train_throughput.py [--arch Unet] [--encoder resnet18] [--size 256] [--batch 8]
                                     [--iters 20] [--warmup 3] [--device auto] [--num-workers 2]
                                     [--classes 19]
                                     [--data DIR] [--frames 24]

Side by side in one process:
  * train : optimizer steps (AdamW, cross-entropy) of the model on random crops already on the
            device, timed over --iters steps after --warmup; on a GPU once in fp32 and once with
            bf16 autocast + channels_last (the training loop's default there), with their ratio;
  * loader: the training loader alone (pipeline.data.dataset.build_loader with the MMSeg-style
            augmentation of the training loop), over the frames of --data (a prepared data
            folder) or of a small demo dataset generated at the crop size in a temporary folder.
Prints images/s of each and loader / train (> 1: the loader keeps up with the model).
Defaults: 256x256 crops, batch 8, 20 iterations on a GPU; 128x128, batch 2, 5 on a CPU.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from pipeline.data.dataset import SegmentationDataset, build_loader
from pipeline.data.manifest import read_classes, read_manifest
from pipeline.data.transforms import transform_from_params
from pipeline.models.build import build_model
from pipeline.models.predict import autocast
from pipeline.models.wrappers import to_channels_last
from pipeline.training.losses import build_loss
from pipeline.training.optim import build_optimizer

GPU_DEFAULTS = {"size": 256, "batch": 8, "iters": 20, "warmup": 3}
CPU_DEFAULTS = {"size": 128, "batch": 2, "iters": 5, "warmup": 1}
AUGMENT = {"scale": [0.5, 2.0], "hflip": 0.5, "photometric": True}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_rate(*, arch: str, encoder: str, num_classes: int, size: int, batch: int, iters: int,
               warmup: int, device: torch.device, amp: bool, channels_last: bool) -> float:
    """Training images/s of a freshly built model on random ``batch`` x 3 x size x size crops."""
    torch.manual_seed(0)
    model = build_model(arch=arch, encoder=encoder, num_classes=num_classes).to(device).train()
    if channels_last:
        model = to_channels_last(model)
    optimizer = build_optimizer(model, name="adamw", lr=1e-4, weight_decay=0.01)
    loss_fn = build_loss("ce")
    images = torch.randn(batch, 3, size, size, device=device)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    masks = torch.randint(0, num_classes, (batch, size, size), device=device)

    def step() -> None:
        with autocast(device, amp):
            logits = model(images)
        loss, _ = loss_fn(logits.float(), masks)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(warmup):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        step()
    _sync(device)
    return iters * batch / (time.perf_counter() - start)


def loader_rate(*, data: Path, size: int, batch: int, batches: int, num_workers: int) -> float:
    """Images/s of the training loader over the train frames of the prepared folder ``data``."""
    frames = read_manifest(data / "manifest.csv", split="train")
    dataset = SegmentationDataset(frames, classes=read_classes(data / "classes.json"),
                                  transform=transform_from_params({"crop": [size, size], **AUGMENT},
                                                                  train=True))
    loader = build_loader(dataset, batch_size=batch, num_workers=num_workers, seed=0)
    stream = iter(loader)
    next(stream)  # starts the workers
    start = time.perf_counter()
    for _ in range(batches):
        next(stream)
    rate = batches * batch / (time.perf_counter() - start)
    del stream  # stops the workers
    return rate


def demo_data(out: Path, *, size: int, frames: int) -> Path:
    """A demo dataset of ``frames`` train frames of size x 4/3 size in ``out``; returns ``out``."""
    from pipeline.data.adapters import parse_options
    from pipeline.data.preparation import prepare_dataset

    per_video = 8
    videos = max(1, -(-frames // per_video))
    options = parse_options("demo", {"videos": videos + 1, "test_videos": 1,
                                     "min_frames": per_video, "max_frames": per_video,
                                     "height": size, "width": (size * 4 // 3 + 31) // 32 * 32})
    prepare_dataset(dataset="demo", root=None, out=out, options=options, workers=1)
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="Unet")
    parser.add_argument("--encoder", default="resnet18")
    parser.add_argument("--classes", type=int, default=19)
    parser.add_argument("--size", type=int, help="square crop side, px (256 GPU, 128 CPU)")
    parser.add_argument("--batch", type=int, help="crops per step (8 GPU, 2 CPU)")
    parser.add_argument("--iters", type=int, help="timed steps (20 GPU, 5 CPU)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (3 GPU, 1 CPU)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--num-workers", type=int, default=2, help="loader worker processes")
    parser.add_argument("--data", type=Path,
                        help="prepared data folder (default: a temporary demo)")
    parser.add_argument("--frames", type=int, default=24, help="demo frames to generate")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    defaults = GPU_DEFAULTS if device.type == "cuda" else CPU_DEFAULTS
    size, batch, iters, warmup = (getattr(args, k) if getattr(args, k) is not None else defaults[k]
                                  for k in ("size", "batch", "iters", "warmup"))
    if min(size, batch, iters) < 1 or warmup < 0 or size % 32:
        parser.error("--size must be a positive multiple of 32; --batch and --iters >= 1")
    common = dict(arch=args.arch, encoder=args.encoder, num_classes=args.classes, size=size,
                  batch=batch, iters=iters, warmup=warmup, device=device)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"cpu ({torch.get_num_threads()} threads)"
    print(f"{args.arch}-{args.encoder}, {args.classes} classes, batch {batch}, "
          f"{size}x{size} crops, {iters} steps after {warmup} warm-up, on {name}")
    result = {"train_fp32": train_rate(**common, amp=False, channels_last=False)}
    print(f"  train fp32                    {result['train_fp32']:9.1f} images/s")
    if device.type == "cuda":
        result["train_bf16_cl"] = train_rate(**common, amp=True, channels_last=True)
        result["bf16_cl_over_fp32"] = result["train_bf16_cl"] / result["train_fp32"]
        print(f"  train bf16 + channels_last    {result['train_bf16_cl']:9.1f} images/s "
              f"({result['bf16_cl_over_fp32']:.2f}x fp32)")
    fastest = max(v for k, v in result.items() if k.startswith("train_"))

    with tempfile.TemporaryDirectory(prefix="train_throughput_") as tmp:
        data = args.data or demo_data(Path(tmp) / "data", size=size, frames=args.frames)
        result["loader"] = loader_rate(data=data, size=size, batch=batch,
                                       batches=max(iters, 10), num_workers=args.num_workers)
    result["loader_over_train"] = result["loader"] / fastest
    print(f"  loader ({args.num_workers} workers)           {result['loader']:9.1f} images/s")
    verdict = ("the loader keeps up" if result["loader_over_train"] > 1
               else "the loader is the bottleneck")
    print(f"  loader / train = {result['loader_over_train']:.2f}x ({verdict})")
    return result


if __name__ == "__main__":
    main()
