"""Build a segmentation model by architecture and encoder name, and rebuild it from its config.

``build_model(arch=..., encoder=..., num_classes=...)`` delegates to ``smp.create_model``:
every smp architecture with every smp encoder, and any timm model as ``tu-<timm name>``.
A model is described by a plain dict (:func:`model_config`), stored in checkpoints, so
``build_model(**config)`` rebuilds it anywhere.

Weights: ``None`` builds a random init and downloads nothing; ``PATH`` loads a local file
(whole model, one of our checkpoints, or an encoder-only state dict); ``"imagenet"`` or
``"hub:<tag>"`` asks smp/timm to download the encoder weights, which needs a network, unless
``weights_dir`` holds them (:mod:`pipeline.models.pretrained`).

``logit_adjust`` (a spec checked and normalized into the config) has the head of the built
model replaced or wrapped as :mod:`pipeline.models.prior` describes.
"""

from __future__ import annotations

import difflib
import inspect
import logging
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any, Mapping

import segmentation_models_pytorch as smp
import timm
import torch
from torch import nn

from pipeline.core.errors import PipelineError, unknown_name
from pipeline.models.pretrained import hub_tag, local_hub_file
from pipeline.models.prior import install_la_head, normalize_logit_adjust
from pipeline.models.wrappers import unwrap_model

log = logging.getLogger(__name__)

_WEIGHT_PREFIXES = ("", "encoder.", "encoder.model.")  # whole model, encoder, raw timm model
_CLASSIFIER = re.compile(r"^encoder\.(model\.)?(fc|classifier|head|last_linear)\.")
_OWN_KEYS = {"encoder_name": "encoder", "encoder_weights": "weights", "classes": "num_classes"}


def list_archs() -> list[str]:
    """Architecture names accepted by :func:`build_model` (smp's registry, lower case)."""
    return sorted(smp.MODEL_ARCHITECTURES_MAPPING)


def list_encoders(*, include_timm: bool = False) -> list[str]:
    """smp's encoder names; with ``include_timm`` also every ``tu-<timm model>``."""
    names = sorted(smp.encoders.get_encoder_names())
    if include_timm:
        names += [f"tu-{name}" for name in timm.list_models()]
    return names


def _check_encoder(encoder: str) -> None:
    if encoder.startswith("tu-"):
        name = encoder[3:]
        if not timm.is_model(name):  # accepts "model.pretrained_tag" too
            base = timm.models.split_model_name_tag(name)[0]
            close = difflib.get_close_matches(base, timm.list_models(), n=5)
            hint = f"; close matches: {', '.join('tu-' + c for c in close)}" if close else ""
            raise PipelineError(f"unknown timm encoder '{encoder}' (see timm.list_models()){hint}")
    elif encoder not in smp.encoders.get_encoder_names():
        raise unknown_name("encoder", encoder, list_encoders() + ["tu-<timm.list_models() name>"])


def _check_arch_kwargs(arch: str, encoder: str, arch_kwargs: Mapping[str, Any]) -> None:
    for key, ours in _OWN_KEYS.items():
        if key in arch_kwargs:
            raise PipelineError(f"model key '{key}' is set through '{ours}'")
    if encoder.startswith("tu-"):
        return  # smp hands keys it does not know to timm.create_model, which checks them
    params = inspect.signature(smp.MODEL_ARCHITECTURES_MAPPING[arch].__init__).parameters
    valid = [n for n, p in params.items() if n != "self" and p.kind is p.POSITIONAL_OR_KEYWORD
             and n not in _OWN_KEYS and n != "in_channels"]
    for key in arch_kwargs:
        if key not in valid:  # smp would silently drop it for a non-timm encoder
            raise PipelineError(f"unknown model key '{key}' for arch '{arch}' with a non-timm "
                                f"encoder; valid: {', '.join(sorted(valid))}")


def model_config(*, arch: str, encoder: str, num_classes: int, weights: str | None = None,
                 in_channels: int = 3, logit_adjust: Mapping[str, Any] | None = None,
                 **arch_kwargs) -> dict:
    """Validate a model spec and return it as a plain dict that ``build_model(**d)`` accepts.

    Names are checked (typos list the valid ones); ``logit_adjust.prior`` is stored as
    normalized frequencies so the dict (and every checkpoint holding it) is self-contained.
    """
    if not isinstance(arch, str) or arch.lower() not in smp.MODEL_ARCHITECTURES_MAPPING:
        raise unknown_name("arch", str(arch), list_archs())
    if not isinstance(encoder, str):
        raise PipelineError(f"'encoder' must be a string, got {encoder!r}")
    _check_encoder(encoder)
    _check_arch_kwargs(arch.lower(), encoder, arch_kwargs)
    if not isinstance(num_classes, int) or num_classes < 1:
        raise PipelineError(f"'num_classes' must be a positive integer, got {num_classes!r}")
    if not isinstance(in_channels, int) or in_channels < 1:
        raise PipelineError(f"'in_channels' must be a positive integer, got {in_channels!r}")
    if weights is not None and not isinstance(weights, (str, Path)):
        raise PipelineError(f"'weights' must be null, a file path or 'hub:<tag>', got {weights!r}")
    return {"arch": arch.lower(), "encoder": encoder, "num_classes": num_classes,
            "weights": str(weights) if weights else None, "in_channels": int(in_channels),
            "logit_adjust": normalize_logit_adjust(logit_adjust, num_classes), **arch_kwargs}


def _hub_weights(tag: str, encoder: str) -> Any:
    if encoder.startswith("tu-"):
        return True  # timm picks the variant from the name's tag ("tu-model.tag")
    settings = smp.encoders.encoders[encoder]["pretrained_settings"]
    if tag not in settings:
        raise PipelineError(f"encoder '{encoder}' has no hub weights 'hub:{tag}'; valid: "
                            f"{', '.join(f'hub:{t}' for t in sorted(settings))}")
    return tag


def build_model(*, arch: str, encoder: str, num_classes: int, weights: str | None = None,
                in_channels: int = 3, logit_adjust: Mapping[str, Any] | None = None,
                weights_dir: str | Path | None = None, **arch_kwargs) -> nn.Module:
    """Build ``smp.create_model(arch, encoder)`` with ``num_classes`` output channels.

    The model maps ``[N, in_channels, H, W]`` (H, W divisible by the encoder's stride, 32 for
    most) to logits ``[N, num_classes, H, W]``. ``arch_kwargs`` go to smp unchanged
    (``decoder_channels``, ``encoder_depth`` ...). The validated spec is kept on the model as
    ``model.model_config`` so checkpoints can describe it. ``weights_dir``: a folder of hub
    weights saved by ``pipeline/weights.py``, used instead of a download (not part of the spec).
    """
    cfg = model_config(arch=arch, encoder=encoder, num_classes=num_classes, weights=weights,
                       in_channels=in_channels, logit_adjust=logit_adjust, **arch_kwargs)
    tag = hub_tag(cfg["weights"])
    local = local_hub_file(encoder, tag, weights_dir) if tag else None
    hub = tag is not None and local is None  # a download, asked for by the config
    encoder_weights = _hub_weights(tag, encoder) if hub else None
    if cfg["weights"] is not None and tag is None and not Path(cfg["weights"]).is_file():
        raise PipelineError(f"{cfg['weights']}: weights file not found (random init: "
                            f"weights: null; download: weights: hub:imagenet)")
    try:
        model = smp.create_model(cfg["arch"], encoder_name=encoder, encoder_weights=encoder_weights,
                                 in_channels=cfg["in_channels"], classes=num_classes, **arch_kwargs)
    except Exception as err:
        msg = f"{type(err).__name__}: {' '.join(str(err).split())}"[:200]
        if hub:  # a download failure surfaces as any of several hub/network error types
            raise PipelineError(f"cannot build arch '{cfg['arch']}' with '{cfg['weights']}' "
                                f"weights for encoder '{encoder}' ({msg}); downloading needs a "
                                f"network, offline save the weights once and pass weights: PATH"
                                ) from None
        if isinstance(err, (TypeError, ValueError, KeyError, AssertionError, RuntimeError)):
            raise PipelineError(f"cannot build arch '{cfg['arch']}' with encoder '{encoder}' "
                                f"({msg})") from None
        raise
    if cfg["logit_adjust"]:
        install_la_head(model, num_classes, cfg["logit_adjust"])
    if local is not None or (cfg["weights"] is not None and tag is None):
        load_weights(model, local or cfg["weights"])
    model.model_config = cfg
    return model


def clean_state_dict(state: Mapping[str, Any]) -> dict:
    """Strip DDP ``module.`` prefixes and torch.compile ``_orig_mod.`` parts from keys."""
    out = {}
    for key, value in state.items():
        while key.startswith("module."):
            key = key[len("module."):]
        out[key.replace("_orig_mod.", "")] = value
    return out


def read_torch_file(path: str | Path, *, what: str, map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with a PipelineError naming a missing/bad file."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: {what} not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # bad files raise RuntimeError, UnpicklingError, EOFError ...
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()] or [type(err).__name__]
        first = next((ln for ln in lines if "Unsupported global" in ln), None)
        if first is None and not zipfile.is_zipfile(path):
            # torch's own words here ("pop from empty list", "weights_only ... will likely
            # succeed") mislead; an old non-zip torch.save file that loads never gets here
            first = "not a torch.save archive: truncated or corrupt"
        raise PipelineError(f"{path}: not a readable {what} ({(first or lines[0])[:200]})") from None


def load_weights(model: nn.Module, path: str | Path) -> dict:
    """Load the tensors of a local file that fit ``model``; return what was loaded/skipped.

    The file may hold a whole-model state dict, one of our checkpoints (key ``model``) or an
    encoder-only state dict (keys with or without ``encoder.``, or a raw timm model for a
    ``tu-`` encoder); the key prefix that matches most tensors wins. A file that leaves any
    encoder tensor unloaded (missing, or of another shape) raises a PipelineError naming the
    missing and unexpected keys: its weights are not this encoder's. Decoder and head tensors
    of another shape (another class count) are skipped with a warning.
    """
    obj = read_torch_file(path, what="weights file")
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    tensors = ({k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
               if isinstance(obj, Mapping) else {})
    if not tensors:
        raise PipelineError(f"{path}: holds no state dict (expected model or encoder weights)")
    tensors = clean_state_dict(tensors)
    target = unwrap_model(model).state_dict()
    best = None
    for prefix in _WEIGHT_PREFIXES:
        mapped = {prefix + k: v for k, v in tensors.items()}
        fits = {k: v for k, v in mapped.items() if k in target and target[k].shape == v.shape}
        if best is None or len(fits) > len(best[1]):
            best = (mapped, fits)
    mapped, fits = best
    if not fits:
        raise PipelineError(f"{path}: no tensor matches the model (first keys in file: "
                            f"{', '.join(list(tensors)[:3])})")
    mismatched = sorted(k for k in mapped if k in target and k not in fits)
    unexpected = sorted(k for k in mapped if k not in target)
    missing = sorted(k for k in target if k not in fits and not k.endswith("num_batches_tracked"))
    unfit = [k for k in target if k.startswith("encoder.") and k not in fits
             and not k.endswith("num_batches_tracked")]
    # encoder keys the model lacks mean another encoder (resnet34 into resnet18), except an
    # ImageNet classifier a raw timm/torchvision file carries beside the features
    alien = [k for k in unexpected if k.startswith("encoder.") and not _CLASSIFIER.match(k)]
    if unfit or alien:
        raise PipelineError(f"{path}: does not fit the model's encoder: {len(unfit)} encoder "
                            f"tensors missing or of another shape (e.g. "
                            f"{', '.join(unfit[:3]) or '-'}), {len(alien)} unexpected keys (e.g. "
                            f"{', '.join(alien[:3]) or '-'})")
    unwrap_model(model).load_state_dict(fits, strict=False)
    encoder_only = all(k.startswith("encoder.") for k in fits)
    report = {"loaded": len(fits), "model_tensors": len(target), "encoder_only": encoder_only,
              "mismatched": mismatched, "unexpected": unexpected, "missing": missing}
    summary = (f"{path}: loaded {len(fits)}/{len(target)} tensors"
               f"{' (encoder only)' if encoder_only else ''}")
    # Missing decoder/head tensors are expected for an encoder-only file; anything else is not.
    suspicious = mismatched + unexpected + [k for k in missing
                                            if not encoder_only or k.startswith("encoder.")]
    if suspicious:
        warnings.warn(f"{summary}; {len(mismatched)} shape mismatches, {len(unexpected)} "
                      f"unexpected, {len(missing)} missing (e.g. {', '.join(suspicious[:3])})",
                      stacklevel=2)
    else:
        log.info(summary)
    return report
