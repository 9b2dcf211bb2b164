"""Average a run's SWA snapshots: ``python pipeline/swa.py RUN_DIR [--last N] [--iters LO:HI]``.

Averages ``RUN_DIR/train/snapshots/swa_<iter>.pt`` (all, the last N, or those whose iteration
lies in LO..HI inclusive), re-estimates BatchNorm statistics with one pass over the run's
training frames (its own train transform, seed and batch size, read from the snapshot), and
validates the averaged weights on the run's validation fold beside ``train/last.pt`` (whose score
training stored in it; validated again only when it holds none). Writes
``RUN_DIR/swa.pt`` and ``RUN_DIR/swa_metrics.json``. Everything about the run comes from the
checkpoints themselves, so the stage has no params.yaml section.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from pipeline.core.device import resolve_device
from pipeline.core.errors import PipelineError, run_cli
from pipeline.training.averaging import average_run


def parse_iters(text: str) -> tuple[int | None, int | None]:
    """``"LO:HI"`` -> (LO, HI), inclusive; an empty end is open (``"100:"``, ``":200"``)."""
    lo, sep, hi = text.partition(":")
    try:
        if not sep:
            raise ValueError
        bounds = tuple(int(v) if v.strip() else None for v in (lo, hi))
    except ValueError:
        raise PipelineError(f"--iters must be LO:HI (iterations, inclusive; an end may be "
                            f"empty), got {text!r}") from None
    return bounds


def parse_bn_batches(text: str) -> int | None:
    """``"all"`` -> None (one pass over the training frames), else a positive batch count."""
    if text == "all":
        return None
    if not text.isdigit() or int(text) < 1:
        raise PipelineError(f"--bn-batches must be 'all' or a positive number, got {text!r}")
    return int(text)


def _pct(value: float | None) -> str:
    return "n/a (no validation fold)" if value is None else f"{100 * value:.2f}"


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a run folder, e.g. runs/unet_r18_f0_s0")
    parser.add_argument("--last", type=int, default=None, help="average only the last N snapshots")
    parser.add_argument("--iters", default=None, help="average the snapshots of iterations LO:HI")
    parser.add_argument("--data", default="data", help="folder with manifest.csv, classes.json, class_counts.npz")
    parser.add_argument("--folds", default="folds/folds.csv")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--bn-batches", default="all",
                        help="batches of the BatchNorm pass: 'all' (one pass) or a number")
    parser.add_argument("--num-workers", type=int, default=0, help="data loading processes")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    if args.num_workers < 0:
        raise PipelineError(f"--num-workers must be >= 0, got {args.num_workers}")
    device = resolve_device(args.device, key="--device")
    run_dir = Path(args.run_dir)
    metrics = average_run(run_dir=run_dir, data_dir=Path(args.data), folds_path=Path(args.folds),
                          device=device, last=args.last,
                          iters=parse_iters(args.iters) if args.iters is not None else None,
                          bn_batches=parse_bn_batches(args.bn_batches),
                          num_workers=args.num_workers, progress=not args.no_progress)
    gain = metrics["gain"]
    print(f"{run_dir}: {metrics['snapshots']} snapshot(s) averaged, BatchNorm "
          f"{'re-estimated' if metrics['bn_updated'] else 'not used (nothing to re-estimate)'}")
    print(f"  val mIoU  last.pt {_pct(metrics['last_miou'])}  |  swa.pt {_pct(metrics['swa_miou'])}"
          + (f"  |  gain {100 * gain:+.2f}" if gain is not None else ""))
    return metrics


if __name__ == "__main__":
    run_cli(main)
