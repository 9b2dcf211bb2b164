"""Train one run: ``python pipeline/train.py --model NAME --fold K --seed S``.

Trains the model config ``models.NAME`` of params.yaml on every fold but K and validates on
fold K (``--fold all``: every train frame, no validation) into ``runs/NAME_fK_sS/``. Re-running
the same command after an interruption resumes from ``train/last.pt`` (or starts over, saying
why, when the config, the frames, the folds, the classes or the teacher changed). Multi-GPU (or
multi-process CPU): ``torchrun --nproc_per_node N pipeline/train.py ...`` (DDP, rank 0 writes);
``models.NAME.batch_size`` is the global batch, split evenly across the N processes.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from pipeline.core.device import init_distributed, resolve_device
from pipeline.core.errors import run_cli
from pipeline.core.names import run_name
from pipeline.core.runs import RunPaths, load_model_params, load_train_params, parse_fold
from pipeline.training.loop import train_run
from pipeline.training.run_data import load_run_data, teacher_weights


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a config name under 'models:' in params.yaml")
    parser.add_argument("--fold", required=True, help="validation fold number, or 'all'")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", default="data", help="folder with manifest.csv, classes.json, class_counts.npz")
    parser.add_argument("--folds", default="folds/folds.csv")
    parser.add_argument("--runs", default=None, help="runs folder (default: train.runs_dir)")
    parser.add_argument("--device", default=None, help="override train.device (auto, cpu, cuda)")
    parser.add_argument("--num-workers", type=int, default=None)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    train = load_train_params(args.params)
    cfg = load_model_params(args.model, args.params)
    fold = parse_fold(args.fold)
    runs_dir = Path(args.runs or train.runs_dir)
    paths = RunPaths(runs_dir / run_name(args.model, fold, args.seed))
    data_dir = Path(args.data)
    data = load_run_data(manifest=data_dir / "manifest.csv", classes_path=data_dir / "classes.json",
                         counts_path=data_dir / "class_counts.npz", folds_path=Path(args.folds),
                         fold=fold)
    teacher = None
    if cfg.distill.teacher:
        seed = cfg.distill.teacher_seed if cfg.distill.teacher_seed >= 0 else args.seed
        teacher = teacher_weights(cfg.distill.teacher, runs_dir=runs_dir, fold=fold, seed=seed)
    device = resolve_device(args.device or train.device)
    dist = init_distributed(device)
    if dist.enabled and device.type == "cuda":
        device = resolve_device("cuda", local_rank=dist.local_rank)
    metrics = train_run(cfg=cfg, paths=paths, fold=fold, seed=args.seed, data=data, device=device,
                        num_workers=train.num_workers if args.num_workers is None else args.num_workers,
                        teacher=teacher, dist=dist, deterministic=train.deterministic,
                        weights_dir=train.weights_dir or None, progress=not args.no_progress)
    if dist.is_main:
        best = metrics["best_miou"]
        print(f"{paths.root}: done, {metrics['iterations']} iterations"
              + (f", best val mIoU {100 * best:.2f} @ {metrics['best_iter']}" if best is not None else ""))
    return metrics


if __name__ == "__main__":
    run_cli(main)
