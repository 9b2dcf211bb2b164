"""Self-describing checkpoints: weights plus everything needed to rebuild and resume them.

A checkpoint is a ``torch.save``-d dict holding the model state (without DDP / torch.compile
prefixes), the resolved run config whose ``model`` entry rebuilds the network
(``build_model(**config["model"])``), the class table, fold, seed, iteration, metric,
optimizer / scheduler / AMP-scaler state and the RNG states. Everything in it is plain data
or tensors, so it loads with ``torch.load(weights_only=True)`` and without our code paths.

The same payload always gives the same bytes (no save time; the archive's inner folder name is
fixed rather than taken from the temporary file's random name), so a stage that re-averages
the same snapshots leaves its output, and DVC's hash of it, unchanged.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import segmentation_models_pytorch as smp
import timm
import torch
from torch import nn

import pipeline
from pipeline.core.atomic import atomic_path
from pipeline.core.errors import PipelineError
from pipeline.models.build import build_model, clean_state_dict, model_config, read_torch_file
from pipeline.models.wrappers import unwrap_model

FORMAT = "pipeline-checkpoint"
FORMAT_VERSION = 1


def _plain(value: Any, where: str) -> Any:
    """Turn numpy scalars/arrays, paths and dataclasses into types ``weights_only`` loads."""
    if isinstance(value, np.generic):  # before the builtins: np.float64 is a float subclass
        return value.item()
    if isinstance(value, (str, int, float, bool, type(None), torch.Tensor)):
        return value
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "to_json"):
        return _plain(value.to_json(), where)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain(dataclasses.asdict(value), where)
    if isinstance(value, Mapping):
        return {k: _plain(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v, f"{where}[{i}]") for i, v in enumerate(value))
    raise TypeError(f"checkpoint field '{where}': cannot store a {type(value).__name__}")


def _model_spec(model: nn.Module, config: Mapping[str, Any]) -> dict:
    spec = config.get("model") or getattr(model, "model_config", None)
    if not isinstance(spec, Mapping):
        raise PipelineError("checkpoint: config has no 'model' spec and the model was not built by "
                            "pipeline.models.build.build_model")
    return model_config(**spec)


def rng_states() -> dict:
    """Python, numpy (global), torch CPU and (when present) CUDA generator states."""
    np_state = np.random.get_state(legacy=False)
    np_state["state"]["key"] = np_state["state"]["key"].tolist()
    states = {"python": random.getstate(), "numpy": np_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def save_checkpoint(path: str | Path, *, model: nn.Module, config: Mapping[str, Any],
                    classes: Mapping[str, Any] | Any, fold: int | None, seed: int,
                    iteration: int, metric: Mapping[str, float] | None = None,
                    optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None,
                    scaler: Any = None, rng_state: bool = True,
                    extra: Mapping[str, Any] | None = None) -> Path:
    """Write a checkpoint atomically to ``path`` and return the path.

    ``config`` is the resolved run config; its ``model`` entry (or, failing that, the spec that
    ``build_model`` left on the model) is validated and stored normalized. ``classes`` is the
    class table (``ClassInfo`` or its JSON dict). ``iteration`` counts the optimizer steps done,
    i.e. the 0-based iteration a resumed run starts at.
    """
    config = dict(_plain(dict(config), "config"))
    config["model"] = _model_spec(unwrap_model(model), config)
    state = clean_state_dict(unwrap_model(model).state_dict())
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": {k: v.detach().cpu() for k, v in state.items()},
        "config": config,
        "classes": _plain(classes, "classes"),
        "fold": fold,
        "seed": seed,
        "iteration": int(iteration),
        "metric": _plain(dict(metric), "metric") if metric is not None else None,
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": rng_states() if rng_state else None,
        "extra": _plain(dict(extra), "extra") if extra is not None else None,
        "versions": {"pipeline": str(pipeline.__version__), "torch": str(torch.__version__),
                     "smp": str(smp.__version__), "timm": str(timm.__version__)},
    }
    path = Path(path)
    # An open file object, not the path: torch names the archive's inner folder after a path
    # (here the random temporary name) but uses a fixed one for file objects.
    with atomic_path(path) as tmp, tmp.open("wb") as fh:
        torch.save(payload, fh)
    return path


def weights_digest(state: Mapping[str, torch.Tensor]) -> str:
    """sha1 (hex) of a state dict's names, dtypes, shapes and values: equal for equal weights,
    whatever else the file holds (optimizer, RNG, metric)."""
    digest = hashlib.sha1()
    for key in sorted(state):
        value = state[key]
        if not isinstance(value, torch.Tensor):
            digest.update(f"{key}={value!r};".encode())
            continue
        value = value.detach().cpu().contiguous()
        digest.update(f"{key}:{value.dtype}:{list(value.shape)};".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes()
                      if value.numel() else b"")
    return digest.hexdigest()


def _check_format(ckpt: Any, source: str) -> dict:
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise PipelineError(f"{source}: not a pipeline checkpoint (a bare state dict can be "
                            f"used as model weights: PATH instead)")
    if ckpt.get("format_version", 0) > FORMAT_VERSION:
        raise PipelineError(f"{source}: checkpoint format {ckpt['format_version']} is newer than "
                            f"this code reads ({FORMAT_VERSION})")
    return ckpt


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict:
    """Read a checkpoint written by :func:`save_checkpoint` (PipelineError if missing/bad)."""
    return _check_format(read_torch_file(path, what="checkpoint", map_location=map_location),
                         str(path))


def model_from_checkpoint(source: str | Path | Mapping[str, Any], *,
                          map_location: Any = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the model from the checkpoint's own config and load its weights.

    ``source`` is a path or an already loaded checkpoint dict. Returns ``(model, ckpt)`` with
    the model in eval mode on CPU (or ``map_location``); no weights file or download is used.
    """
    if isinstance(source, Mapping):
        ckpt, label = _check_format(dict(source), "checkpoint dict"), "checkpoint dict"
    else:
        ckpt, label = load_checkpoint(source, map_location=map_location), str(source)
    spec = dict((ckpt.get("config") or {}).get("model") or {})
    if not spec:
        raise PipelineError(f"{label}: config has no 'model' spec to rebuild the network from")
    spec["weights"] = None  # the weights come from the checkpoint itself
    model = build_model(**spec)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise PipelineError(f"{label}: weights do not fit the model built from its config "
                            f"({first})") from None
    return model.eval(), ckpt


def restore_rng(ckpt: Mapping[str, Any]) -> bool:
    """Put back the RNG states saved in ``ckpt``; False when it holds none."""
    states = ckpt.get("rng")
    if not states:
        return False
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"].cpu())
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in states["cuda"]])
    return True


def restore_training_state(ckpt: Mapping[str, Any], *, model: nn.Module | None = None,
                           optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None,
                           scaler: Any = None, rng: bool = True) -> int:
    """Resume: load whichever of model/optimizer/scheduler/scaler/RNG state the checkpoint has.

    Build the optimizer and scheduler the same way as the original run first. Returns the
    iteration to continue from.
    """
    if model is not None:
        unwrap_model(model).load_state_dict(ckpt["model"])
    for obj, key in ((optimizer, "optimizer"), (scheduler, "scheduler"), (scaler, "scaler")):
        if obj is not None and ckpt.get(key) is not None:
            obj.load_state_dict(ckpt[key])
    if rng:
        restore_rng(ckpt)
    return int(ckpt["iteration"])
