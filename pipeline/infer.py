"""Predict a run's out-of-fold and test frames: ``python pipeline/infer.py RUN_DIR``.

Uses the run's SWA weights (``swa.pt``) when present, else its best checkpoint; multi-scale +
flip TTA from ``infer.tta`` (``--no-tta``: one plain view); maps stored under
``oof_preds/<model>_s<seed>/f<fold>/`` as compact probabilities (``infer.quant``,
``infer.stride``, ``infer.topk``); OOF mIoU with and without TTA in ``RUN_DIR/infer_metrics.json``. With
``infer.oof_sample`` only the sampled OOF frames are predicted and scored.
Re-running after an interruption keeps the maps already written.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from pipeline.core.device import resolve_device
from pipeline.core.errors import run_cli
from pipeline.core.params import load_section
from pipeline.data.oof_sample import oof_sample_from_params
from pipeline.inference.runner import InferParams, infer_run
from pipeline.inference.tta import tta_from_params


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}"


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a run folder, e.g. runs/unet_r18_f0_s0")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", default="data")
    parser.add_argument("--folds", default="folds/folds.csv")
    parser.add_argument("--out", default=None, help="maps root (default: infer.out)")
    parser.add_argument("--no-tta", action="store_true", help="one plain view (for comparison)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    params = load_section(InferParams, "infer", args.params)
    # infer.tta is checked even with --no-tta, so a typo there is not found only later by DVC
    tta = tta_from_params(params.tta or True, source=args.params, section="infer.tta")
    if args.no_tta:
        tta = tta_from_params(False)
    oof_sample = oof_sample_from_params(params.oof_sample, source=args.params)
    device = resolve_device(args.device or params.device,
                            key="--device" if args.device else "infer.device")
    metrics = infer_run(run_dir=Path(args.run_dir), out_root=Path(args.out or params.out),
                        data_dir=Path(args.data), folds_path=Path(args.folds), tta=tta,
                        quant=params.quant, stride=params.stride, topk=params.topk,
                        splits=params.splits,
                        compare_single=params.compare_single, device=device,
                        num_workers=params.num_workers, progress=not args.no_progress,
                        oof_sample=oof_sample, weights=params.weights)
    print(f"{args.run_dir}: {metrics['oof_frames']} OOF + {metrics['test_frames']} test maps "
          f"({metrics['views']} views) -> member {metrics['member']}")
    print(f"  OOF mIoU  single view {_pct(metrics['oof_miou_single'])}  |  "
          f"TTA {_pct(metrics['oof_miou_tta'])}"
          + ("  (on the infer.oof_sample frames only)" if metrics["oof_sampled"] else ""))
    return metrics


if __name__ == "__main__":
    run_cli(main)
