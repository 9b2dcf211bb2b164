"""TTA throughput and memory: batched views (pipeline.inference.tta) against a per-view loop.

    python bench/tta.py [--size 128 160] [--images 8] [--encoder resnet18] [--threads 1]

All contenders run on the same model (seeded random init) and the same random images, with
the same views (--scales x flip) and the same maths, and must agree:
  * loop      : one forward per view, each view's softmax de-augmented into a running sum;
  * keep_all  : the same loop, but every de-augmented view is kept and averaged at the end;
  * batched   : pipeline.inference.tta.predict_probs, one image at a time (its views share a forward);
  * batched_n : pipeline.inference.tta.predict_probs_batch, --batch-size views per forward (several images).
Prints images/s (best of --repeat interleaved rounds after one warm-up, in this process), the
speed-up over the loop, and the peak memory of one run, measured in a fresh process per
contender, above what was resident before it: on CUDA torch.cuda.max_memory_allocated, on the
CPU the peak RSS (VmHWM, reset through /proc/self/clear_refs) minus the RSS before the run,
with glibc told to mmap blocks over 64 KiB (MALLOC_MMAP_THRESHOLD_) so that freed tensors
leave the RSS at once instead of being reused unseen from the heap.
On a shared or oversubscribed CPU prefer --threads 1: idle-spinning threads swamp the timing.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import time
from concurrent.futures import ProcessPoolExecutor

import torch

from pipeline.inference.tta import (DEFAULT_SCALES, TTAConfig, hflip, predict_probs, predict_probs_batch,
                                    rescale, restore)
from pipeline.models.build import build_model
from pipeline.models.predict import autocast, forward_padded

TARGET_SPEEDUP = 1.5
CONTENDERS = ("loop", "keep_all", "batched", "batched_n")


@torch.no_grad()
def loop_tta(model, image: torch.Tensor, *, tta: TTAConfig, num_classes: int,
             keep_all: bool = False) -> torch.Tensor:
    """Probabilities [C, H, W] of ``image`` [1, 3, H, W] with one forward per view."""
    h, w = image.shape[-2:]
    acc = torch.zeros(1, num_classes, h, w, device=image.device)
    kept = []
    for scale in tta.scales:
        scaled = rescale(image, scale)
        for flip in ((False, True) if tta.flip else (False,)):
            with autocast(image.device, tta.amp):
                logits = forward_padded(model, hflip(scaled) if flip else scaled,
                                        multiple=tta.pad_multiple)
            probs = logits.float().softmax(1)
            probs = restore(hflip(probs) if flip else probs, (h, w))
            if keep_all:
                kept.append(probs)
            else:
                acc += probs
    return (torch.cat(kept).mean(0) if keep_all else acc[0] / tta.num_views)


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}")


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def setup(args: dict) -> tuple:
    """The seeded model, images [N, 3, H, W], TTA config and device of a run."""
    if args["threads"]:
        torch.set_num_threads(args["threads"])
    device = torch.device(args["device"])
    torch.manual_seed(0)
    model = build_model(arch=args["arch"], encoder=args["encoder"], num_classes=args["classes"],
                        decoder_channels=args["decoder_channels"]).eval().to(device)
    h, w = args["size"]
    images = torch.randn(args["images"], 3, h, w, generator=torch.Generator().manual_seed(1))
    tta = TTAConfig(scales=tuple(args["scales"]), flip=True, batch_size=args["batch_size"],
                    amp=args["amp"])
    return model, images.to(device), tta, device


def contender(name: str, model, images: torch.Tensor, tta: TTAConfig, num_classes: int):
    """A no-argument function computing the probabilities [N, C, H, W] of ``images``."""
    if name == "batched":  # the views of one image, at most batch_size per forward
        return lambda: torch.stack([predict_probs(model, x, tta=tta, num_classes=num_classes)
                                    for x in images])
    if name == "batched_n":
        return lambda: predict_probs_batch(model, images, tta=tta, num_classes=num_classes)
    return lambda: torch.stack([loop_tta(model, x[None], tta=tta, num_classes=num_classes,
                                         keep_all=name == "keep_all") for x in images])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_contenders(names, args: dict) -> dict:
    """Best seconds per contender over ``repeat`` interleaved rounds (so a burst of load from
    other processes hits every contender alike), after one warm-up each, and their outputs."""
    model, images, tta, device = setup(args)
    fns = {name: contender(name, model, images, tta, args["classes"]) for name in names}
    outputs = {name: fn().float().cpu() for name, fn in fns.items()}  # warm-up
    best = dict.fromkeys(names, float("inf"))
    for _ in range(args["repeat"]):
        for name, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            best[name] = min(best[name], time.perf_counter() - start)
    return {"seconds": best, "outputs": outputs}


def measure_memory(name: str, args: dict) -> tuple[float, str]:
    """Peak MB of one run of ``name`` above what was resident before it (fresh process)."""
    model, images, tta, device = setup(args)
    fn = contender(name, model, images, tta, args["classes"])
    fn()  # warm-up: one-off allocations (kernel caches, thread pools) are not the contender's
    _sync(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        _sync(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20, "cuda max_memory_allocated"
    base = _rss_kb("VmRSS")
    if _reset_peak_rss():
        fn()
        return (_rss_kb("VmHWM") - base) / 1024, "peak RSS (VmHWM) - RSS before"
    fn()  # ru_maxrss cannot be reset: the high-water mark of the whole process
    return ((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024,
            "ru_maxrss - RSS before")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, nargs=2, default=[128, 160], metavar=("H", "W"))
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--classes", type=int, default=12)
    parser.add_argument("--arch", default="Unet")
    parser.add_argument("--encoder", default="resnet18", help="e.g. resnet18, tu-test_resnet")
    parser.add_argument("--decoder-channels", type=int, nargs=5, default=[64, 32, 16, 16, 8])
    parser.add_argument("--scales", type=float, nargs="+", default=list(DEFAULT_SCALES))
    parser.add_argument("--batch-size", type=int, default=8, help="views per forward")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                        help="bf16 autocast (CUDA only)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--only", nargs="+", choices=CONTENDERS, default=list(CONTENDERS))
    args = parser.parse_args(argv)

    names, opts = args.only, vars(args)
    memory = {}
    spawn = multiprocessing.get_context("spawn")  # a fresh process each: peaks do not mix
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")  # read by the children's glibc
    for name in names:
        with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
            memory[name] = pool.submit(measure_memory, name, opts).result()
    timing = time_contenders(names, opts)
    reference = timing["outputs"][names[0]]
    tol = 1e-3 if args.amp and args.device != "cpu" else 1e-4
    for name, out in timing["outputs"].items():
        err = (out - reference).abs().max().item()
        assert err < tol, f"{name} disagrees with {names[0]} by {err:.2e}"
    results = {name: {"seconds": timing["seconds"][name],
                      "images_per_s": args.images / timing["seconds"][name],
                      "peak_mb": memory[name][0]} for name in names}

    n_views = 2 * len(args.scales)
    h, w = args.size
    map_mb = args.classes * h * w * 4 / 2**20
    print(f"{args.arch}/{args.encoder} decoder {args.decoder_channels}, {args.classes} classes, "
          f"{args.images} images of {h}x{w}, {len(args.scales)} scales x flip = {n_views} views, "
          f"batch {args.batch_size}, {args.device} ({torch.get_num_threads()} threads of "
          f"{os.cpu_count()} CPUs), torch {torch.__version__}, best of {args.repeat}")
    print(f"  memory: {memory[names[0]][1]}; one probability map = "
          f"{map_mb:.2f} MB, all {n_views} views = {n_views * map_mb:.2f} MB")
    loop = results.get("loop")
    for name, res in results.items():
        ratio = f"{res['images_per_s'] / loop['images_per_s']:5.2f}x loop" if loop else ""
        print(f"  {name:<10} {res['images_per_s']:8.2f} img/s {1e3 / res['images_per_s']:9.1f}"
              f" ms/img  peak {res['peak_mb']:8.1f} MB  {ratio}")
    if loop:
        for name in ("batched", "batched_n"):
            if name in results:
                met = results[name]["images_per_s"] / loop["images_per_s"] >= TARGET_SPEEDUP
                print(f"  target {name} >= {TARGET_SPEEDUP}x loop: {'met' if met else 'NOT met'}")
    return results


if __name__ == "__main__":
    main()
