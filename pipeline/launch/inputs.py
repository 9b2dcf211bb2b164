"""The adapter of the cost plan: params file + prepared data -> :func:`pipeline.launch.plan.make_plan`.

Reads the sections the plan depends on with the stages' own schemas (``train:``, ``models:``,
``infer:``, the optional ``plan:``; ``folds.n_folds`` only when ``folds/folds.csv`` is absent),
the dataset through :func:`pipeline.launch.plan.read_data_shape`, the model sizes through
:func:`pipeline.launch.measure.model_size`, and the throughputs from ``plan:`` or, with
``probe``, from :func:`pipeline.launch.measure.probe_throughput` on ``train.device``.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.core.device import resolve_device
from pipeline.core.errors import PipelineError
from pipeline.core.params import load_section, read_params
from pipeline.core.runs import load_model_params, load_train_params
from pipeline.data.oof_sample import oof_sample_from_params
from pipeline.inference.mapfile import QUANTS
from pipeline.inference.runner import InferParams
from pipeline.inference.tta import tta_from_params
from pipeline.launch.measure import model_size, probe_throughput
from pipeline.launch.plan import DataShape, PlanParams, free_disk, make_plan, read_data_shape


def _n_folds(params: dict, source: str) -> int | None:
    value = (params.get("folds") or {}).get("n_folds")
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise PipelineError(f"{source}: 'folds.n_folds' must be a positive integer, got {value!r}")
    return value


def plan_from_params(*, params_path: str | Path, data_dir: str | Path, folds_path: str | Path,
                     frames: int | None = None, test_frames: int = 0, height: int | None = None,
                     width: int | None = None, classes: int | None = None,
                     videos: int | None = None, with_models: bool = True,
                     probe: bool = False) -> dict:
    """The cost plan of ``params_path`` for the data in ``data_dir`` (or the overrides: see
    :func:`pipeline.launch.plan.read_data_shape`). ``with_models``: count the weights (builds
    each config on the meta device; the disk check does without). ``probe``: time each config
    on ``train.device`` instead of reading ``plan:``."""
    source = str(params_path)
    train = load_train_params(params_path)
    names = list(dict.fromkeys([*train.models, *(s["name"] for s in train.students)]))
    configs = {name: load_model_params(name, params_path) for name in names}
    infer = load_section(InferParams, "infer", params_path)
    tta = tta_from_params(infer.tta or True, source=source, section="infer.tta")
    if infer.quant not in QUANTS or infer.stride < 1:
        raise PipelineError(f"{source}: infer.quant must be one of {', '.join(QUANTS)} and "
                            f"infer.stride >= 1, got {infer.quant!r} and {infer.stride}")
    if isinstance(infer.topk, bool) or not isinstance(infer.topk, int) or infer.topk < 0:
        raise PipelineError(f"{source}: infer.topk must be an integer >= 0 (0 = dense maps), "
                            f"got {infer.topk!r}")
    speed = load_section(PlanParams, "plan", params_path)
    data = read_data_shape(data_dir=Path(data_dir), folds_path=Path(folds_path),
                           n_folds=_n_folds(read_params(params_path), source), frames=frames,
                           test_frames=test_frames, height=height, width=width, classes=classes,
                           videos=videos,
                           oof_sample=oof_sample_from_params(infer.oof_sample, source=source))
    num_classes = data.classes if data is not None and data.classes else None
    if num_classes and infer.topk >= num_classes:
        raise PipelineError(f"{source}: infer.topk must be below the {num_classes} classes "
                            f"(0 = dense maps), got {infer.topk}")
    sizes = ({name: model_size(cfg, num_classes=num_classes or 1) for name, cfg in configs.items()}
             if with_models else None)
    given = (speed.train_images_per_s or None, speed.infer_views_per_s or None)
    speeds = {name: given for name in names}
    device = None
    if probe:
        device = resolve_device(train.device, key="train.device")
        for name, cfg in configs.items():
            crop = cfg.model.augment.get("crop") or [64, 64]
            speeds[name] = probe_throughput(cfg, num_classes=num_classes or 2, train_hw=crop,
                                            infer_hw=_infer_size(tta.crop_hw, data, crop),
                                            infer_batch=tta.batch_size, device=device)
    plan = make_plan(models=train.models, students=train.students, folds=train.folds,
                     seeds=train.seeds, student_seeds=train.student_seeds, configs=configs,
                     tta=tta, quant=infer.quant, stride=infer.stride, splits=infer.splits,
                     compare_single=infer.compare_single, data=data, sizes=sizes, speeds=speeds,
                     topk=infer.topk)
    where, free = free_disk(infer.out)
    plan["params"] = source
    plan["weights_counted_for_classes"] = num_classes or (1 if with_models else None)
    plan["throughput"] = ({"source": "probe", "device": str(device)} if probe else
                          {"source": "params plan:" if any(given) else None})
    plan["disk"] = {"out": infer.out, "checked_at": str(where), "free_bytes": free}
    return plan


def _infer_size(crop_hw, data: DataShape | None, train_crop) -> tuple[int, int]:
    """What one inference forward sees: the TTA window, else the commonest frame, else the
    training crop."""
    if crop_hw:
        return tuple(crop_hw)
    sizes = {**(data.test if data else {}), **(data.train if data else {})}
    return max(sizes, key=sizes.get) if sizes else tuple(train_crop)
