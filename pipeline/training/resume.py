"""Whether a run continues from its ``train/last.pt``, and the run folder a (re)start leaves.

``last.pt`` continues the run when it was saved with the same config (run, fold, seed, model
spec; floats up to rounding; a run-config section newer than the checkpoint counts as its
defaults, see ``ADDED_SECTIONS``) and the same data digests (:mod:`pipeline.training.provenance`);
the run then restores model, optimizer, scheduler, fp16's gradient scaler, the EMA of the
weights, RNG states and validation scores from it (``amp: true`` and ``amp: auto`` are one
setting).
Otherwise the run starts over, says why in one line, and keeps nothing of the earlier run.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
from typing import Any

from pipeline.core import atomic
from pipeline.core.curves import cut_curves
from pipeline.core.errors import PipelineError
from pipeline.core.runs import ADDED_KEYS, ADDED_SECTIONS, SUBSECTIONS, ModelParams, RunPaths, amp_mode
from pipeline.models.checkpoint import load_checkpoint, restore_training_state
from pipeline.training.ema import load_ema_state
from pipeline.training.provenance import data_change
from pipeline.training.run_setup import Run


def _same(a: Any, b: Any) -> bool:
    """Equal configs, floats up to rounding (a stored prior is re-normalized on save)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and \
            math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def _amp_named(run: dict) -> dict:
    """``run`` with its ``amp`` as an AMP_MODES name: ``true`` and ``auto`` are one setting."""
    try:
        return {**run, "amp": amp_mode(run["amp"])} if "amp" in run else run
    except PipelineError:
        return run


def _compatible(ckpt: dict, config: dict) -> bool:
    saved, config = dict(ckpt.get("config") or {}), dict(config)
    run, now = saved.get("run"), config.get("run")
    if isinstance(run, dict) and isinstance(now, dict):  # saved before a section or key existed:
        added = {**{k: dataclasses.asdict(SUBSECTIONS[k]()) for k in ADDED_SECTIONS},
                 **{k: getattr(ModelParams(), k) for k in ADDED_KEYS}}
        saved["run"] = _amp_named({**{k: v for k, v in added.items() if k in now and k not in run},
                                   **run})  # it ran with the defaults
        config["run"] = _amp_named(now)
    return all(_same(saved.get(k), config[k]) for k in ("run", "fold", "seed", "model"))


def resume(run: Run) -> tuple[int, bool]:
    """Restore ``run`` from ``paths.last`` when that continues it; ``(start iteration, resumed)``.

    Rank 0 says whether it resumes or why it starts over. Every rank reads ``last.pt`` before
    any goes on, since a start over lets rank 0 delete it."""
    paths, dist = run.paths, run.dist
    start, resumed = 0, False
    if paths.last.is_file():
        ckpt = load_checkpoint(paths.last)
        changed = (data_change((ckpt.get("config") or {}).get("data"), run.config["data"])
                   if _compatible(ckpt, run.config) else "saved with another config")
        if changed is None:
            start = restore_training_state(ckpt, model=run.model, optimizer=run.optimizer,
                                           scheduler=run.scheduler, scaler=run.scaler)
            extra = ckpt.get("extra") or {}
            run.state.update(extra.get("state", {}))
            if run.ema is not None:  # the config, which holds ema.decay, is the same
                load_ema_state(run.ema, extra["ema"])
            resumed = True
            if dist.is_main:
                print(f"resuming {paths.root.name} from iteration {start}/{run.cfg.total_iters}",
                      flush=True)
        elif dist.is_main:
            print(f"{paths.last}: {changed}; starting {paths.root.name} over", flush=True)
        dist.barrier()  # every rank has read last.pt before rank 0 may delete it
    return start, resumed


def prepare_run_dir(paths: RunPaths, *, start: int, fresh: bool) -> None:
    """Ready the run folder to go on from iteration ``start`` (rank 0's job). A ``fresh``
    start keeps nothing of an earlier run (another config, or one killed before its first
    checkpoint); either way the temporary files of saves cut short by a kill go, and so do the
    curves' rows after ``start``, which the run logs again."""
    if fresh:
        shutil.rmtree(paths.train_dir, ignore_errors=True)
        shutil.rmtree(paths.curves, ignore_errors=True)
        for stale in (paths.metrics, paths.swa):
            stale.unlink(missing_ok=True)
    paths.train_dir.mkdir(parents=True, exist_ok=True)
    atomic.remove_stale_tmp(paths.train_dir, recursive=True)  # saves cut short by a kill
    cut_curves(paths.curves, upto=start)
