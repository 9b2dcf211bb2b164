"""Pretrained encoder weights, online and offline.

``models.<name>.weights`` says where a model's initial weights come from:

* ``""`` (or null): random init; nothing is downloaded, ever;
* ``imagenet`` or ``hub:<tag>`` (``hub`` alone = ``hub:imagenet``): the encoder's weights from
  the smp / timm hubs, downloaded only because the config asks for them. With
  ``train.weights_dir`` set, the file ``<weights_dir>/<encoder>.<tag>.pth``
  (:func:`weights_file_name`) is used instead and nothing is downloaded: the offline pattern of
  code competitions, where a folder of weights is attached to the notebook. A missing file
  there is an error that says how to make it, not a silent download attempt;
* ``PATH``: a local file (a whole model, one of our checkpoints or an encoder-only state dict;
  :func:`pipeline.models.build.load_weights`).

``python pipeline/weights.py ENCODER --out FILE`` (:func:`save_encoder_weights`) saves an
encoder's hub weights to such a file on a machine that has internet. The hubs' own caches work
offline too: after one download, ``HF_HUB_OFFLINE=1`` makes timm read its Hugging Face cache
without the network.
"""

from __future__ import annotations

from pathlib import Path

import segmentation_models_pytorch as smp
import torch

from pipeline.core import atomic
from pipeline.core.errors import PipelineError

HUB_PREFIX = "hub"
IMAGENET = "imagenet"
WEIGHTS_EXT = ".pth"


def hub_tag(weights: str | None) -> str | None:
    """The hub tag a ``weights`` value asks for (``imagenet``, ``hub``, ``hub:<tag>``), or None
    for random init and local files."""
    if not weights:
        return None
    weights = str(weights)
    if weights == IMAGENET:
        return IMAGENET
    if weights == HUB_PREFIX or weights.startswith(HUB_PREFIX + ":"):
        return weights.partition(":")[2] or IMAGENET
    return None


def weights_file_name(encoder: str, tag: str = IMAGENET) -> str:
    """``<encoder>.<tag>.pth``: the file a ``weights_dir`` holds for one encoder's hub weights."""
    return f"{encoder}.{tag}{WEIGHTS_EXT}"


def local_hub_file(encoder: str, tag: str, weights_dir: str | Path | None) -> Path | None:
    """The file standing in for the hub's ``tag`` weights of ``encoder`` in ``weights_dir``
    (None without a folder); a folder without the file is an error saying how to make it."""
    if not weights_dir:
        return None
    folder = Path(weights_dir)
    if not folder.is_dir():
        raise PipelineError(f"{folder}: weights_dir not found (a folder of "
                            f"<encoder>.<tag>{WEIGHTS_EXT} files, or '' to download from the hub)")
    path = folder / weights_file_name(encoder, tag)
    if not path.is_file():
        raise PipelineError(f"{path}: no '{tag}' weights for encoder '{encoder}' in weights_dir; "
                            f"on a machine with internet run `python pipeline/weights.py {encoder} "
                            f"--tag {tag} --out {path.name}` and copy the file there")
    return path


def save_encoder_weights(encoder: str, *, out: str | Path, tag: str = IMAGENET) -> dict:
    """Download ``encoder``'s hub weights (smp or timm, ``tu-<name>``) and save its state dict
    to ``out`` (written atomically); returns what was saved (encoder, tag, tensors, path)."""
    try:
        module = smp.encoders.get_encoder(encoder, in_channels=3, depth=5, weights=tag)
    except Exception as err:  # unknown names, unknown tags and network errors alike
        msg = " ".join(str(err).split())[:200]
        raise PipelineError(f"cannot get '{tag}' weights of encoder '{encoder}' "
                            f"({type(err).__name__}: {msg}); this needs the network") from None
    state = {f"encoder.{k}": v for k, v in module.state_dict().items()}
    out = Path(out)
    with atomic.atomic_path(out) as tmp:
        torch.save({"encoder": encoder, "tag": tag, "state_dict": state}, tmp)
    return {"encoder": encoder, "tag": tag, "tensors": len(state), "path": str(out)}
