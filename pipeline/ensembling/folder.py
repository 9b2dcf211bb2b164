"""Predicting a folder of new images with a fitted ensemble (``python pipeline/predict.py``).

Each image (``*.png``, ``*.jpg``, ``*.jpeg`` directly in the folder, sorted by name) goes through
every run of every member as ``infer.py`` sends a test frame through one run: the run's eval
transform in :class:`pipeline.data.dataset.SegmentationDataset`, then
:func:`pipeline.inference.tta.predict_probs_and_plain` with the ensemble's TTA. A member's map
mixes its runs' maps with the shares weights.json records, through the very function ``--apply``
uses (:func:`pipeline.ensembling.testmaps.member_test`); the groups' means are fused by
:func:`pipeline.ensembling.fusion.fuse_labels`. The maps stay float32: ``--apply`` fuses maps
stored as uint8 (or float16), so the two agree on all but a few near-tie pixels.

Outputs: ``OUT_DIR/<image stem>.png`` (uint8 train ids, the values of ``ensemble/test_pred/``),
written as one folder that replaces an earlier prediction whole; or, as a zip, the params'
submission format packed and checked by :func:`pipeline.submission.packing.make_submission`
(the images become the test frames of a temporary manifest: id = stem, video = the folder's
name). Every image is decoded before a model is loaded, and the outputs appear only once every
image is predicted, so bad input (no image, an unreadable one, a broken bundle) or an
interruption leaves nothing behind. ``compare``: the share of pixels on which the prediction
agrees with an earlier submission zip's labels (:class:`Agreement`).
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np
import torch
from tqdm.auto import tqdm

from pipeline.core import atomic
from pipeline.core.errors import PipelineError
from pipeline.data.dataset import SegmentationDataset
from pipeline.data.manifest import Frame, read_classes, read_image, write_classes, write_manifest
from pipeline.data.transforms import transform_from_params
from pipeline.ensembling.bundle import Ensemble, fold_order, read_bundle, workspace_ensemble
from pipeline.ensembling.fusion import GROUPS, Mean, fuse_labels
from pipeline.ensembling.testmaps import member_test, run_of
from pipeline.inference.tta import predict_probs_and_plain
from pipeline.models.checkpoint import model_from_checkpoint
from pipeline.submission.formats import get_format
from pipeline.submission.packing import make_submission
from pipeline.submission.sidecar import sidecar_path, zip_format_name
from pipeline.submission.zips import open_predictions, png_bytes

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
PRED_SUFFIX = ".png"


def folder_frames(input_dir: Path) -> list[Frame]:
    """The images of ``input_dir`` as test frames (id = file stem, video = the folder's name),
    each decoded once (:func:`read_image`: RGB only) for its size; none, or two with one stem,
    is an error."""
    input_dir = Path(input_dir)
    if not input_dir.is_dir():
        raise PipelineError(f"{input_dir}: input folder not found")
    paths = sorted(p for p in input_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES
                   and not p.name.startswith(".") and p.is_file())
    if not paths:
        raise PipelineError(f"{input_dir}: no images ({', '.join('*' + s for s in IMAGE_SUFFIXES)})")
    frames: dict[str, Frame] = {}
    for index, path in enumerate(paths):
        if path.stem in frames:
            raise PipelineError(f"{path}: same stem as {frames[path.stem].image}; the predictions "
                                f"are named by stem")
        height, width = read_image(path).shape[:2]
        frames[path.stem] = Frame(id=path.stem, image=str(path), mask=None, video=input_dir.name,
                                  frame=index, split="test", height=height, width=width)
    return list(frames.values())


class _FrameMaps:
    """One frame's TTA maps of a member's runs ({fold: float32 [C, H, W]}) in the place of a
    :class:`pipeline.inference.members.Member` for :func:`member_test`: ``read_test`` averages
    the given runs' maps as ``Member.read_test`` averages the stored ones (fold order, summed in
    float32, then divided), so a member's map is mixed by the code ``--apply`` runs."""

    def __init__(self, maps: Mapping[int | str, np.ndarray]):
        self.maps = maps

    def read_test(self, frame_id: str, *, full_size: bool = True, folds) -> np.ndarray:
        wanted = set(folds)
        have = [f for f in sorted(self.maps, key=fold_order) if f in wanted]
        total = self.maps[have[0]].copy()
        for fold in have[1:]:
            total += self.maps[fold]
        total /= len(have)
        return total


@dataclass
class Agreement:
    """Pixels on which two label maps agree, summed over frames."""

    pixels: int = 0
    equal: int = 0
    frames: int = 0

    def add(self, labels: np.ndarray, other: np.ndarray) -> None:
        if labels.shape != other.shape:
            raise ValueError(f"label maps of shapes {labels.shape} and {other.shape}")
        self.pixels += labels.size
        self.equal += int(np.count_nonzero(labels == other))
        self.frames += 1

    @property
    def fraction(self) -> float | None:
        return self.equal / self.pixels if self.pixels else None


def _models(ensemble: Ensemble, frames: list[Frame], device: torch.device) -> list[tuple]:
    """[(run, model on ``device``, dataset of ``frames`` with the run's eval transform)]; runs
    whose transforms are equal share one dataset."""
    loaded, datasets = [], {}
    for run in ensemble.runs:
        try:
            model, ckpt = model_from_checkpoint(ensemble.checkpoint(run))
        except PipelineError as err:
            raise PipelineError(f"{ensemble.where(run)}: {err}") from None
        augment = ((ckpt.get("config") or {}).get("run") or {}).get("augment") or {}
        key = json.dumps(augment, sort_keys=True)
        if key not in datasets:
            transform = transform_from_params(augment, train=False,
                                              source=f"{ensemble.where(run)}: run.augment")
            datasets[key] = SegmentationDataset(frames, classes=ensemble.classes,
                                                transform=transform, with_mask=False)
        loaded.append((run, model.to(device).eval(), datasets[key]))
    return loaded


def predict_labels(ensemble: Ensemble, frames: list[Frame], *, device: torch.device,
                   progress: bool = True) -> Iterator[tuple[Frame, np.ndarray]]:
    """(frame, uint8 [H, W] train ids) of each frame, in order: every run's TTA softmax map
    (float32 [C, H, W]), each member's mix of its runs (:func:`member_test`), the groups' means
    fused at the ensemble's alpha and beta (:func:`fuse_labels`)."""
    num_classes = ensemble.classes.num_classes
    if num_classes > 255:
        raise PipelineError(f"{ensemble.origin}: {num_classes} classes do not fit uint8 PNGs")
    models = _models(ensemble, frames, device)
    mixes = {m: ensemble.mix(m) for m in ensemble.members}
    for index, frame in enumerate(tqdm(frames, desc="predict", unit="image",
                                       disable=not progress or None)):
        images, maps = {}, {}
        for run, model, dataset in models:
            if id(dataset) not in images:
                images[id(dataset)] = dataset[index]["image"][None].to(device)
            probs, _ = predict_probs_and_plain(model, images[id(dataset)], tta=ensemble.tta,
                                               num_classes=num_classes)
            maps.setdefault(run.member, {})[run_of(run.key)] = probs[0].float().cpu().numpy()
        means = {}
        for group in GROUPS:
            mean = Mean()
            for member in sorted(ensemble.groups[group]):
                mean.add(member_test(_FrameMaps(maps[member]), frame.id, mixes[member]))
            means[group] = mean.value()
        yield frame, fuse_labels(means["S"], means["W"], means["A"], alpha=ensemble.alpha,
                                 beta=ensemble.beta)


def _compared(zip_path: Path, ensemble: Ensemble, frames: list[Frame]):
    """The submission zip ``zip_path`` as a label source of ``frames`` (its format from the JSON
    beside it, else the ensemble's); an image without its entry is an error."""
    submit = ensemble.submit
    if sidecar_path(zip_path).is_file():
        name, offset, order = zip_format_name(zip_path)
    else:
        name, offset, order = submit["format"], submit["vspw_offset"], submit["rle_order"]
    fmt = get_format(name, dataset=ensemble.classes.dataset, vspw_offset=offset, rle_order=order)
    if not Path(zip_path).is_file():
        raise PipelineError(f"{zip_path}: submission zip to compare with not found")
    source = open_predictions(zip_path, fmt=fmt, num_classes=ensemble.classes.num_classes,
                              frames=frames)
    missing = source.missing(frames)
    if missing:
        source.__exit__(None, None, None)  # closes the zip
        raise PipelineError(f"{zip_path}: no prediction of {len(missing)} of the {len(frames)} "
                            f"images; first: {missing[0].image} (the {fmt.name} layout is "
                            f"{fmt.layout})")
    return source


def _check_out_folder(out: Path) -> None:
    """``out`` is replaced whole: refuse one that holds anything but label PNGs."""
    if out.exists() and not out.is_dir():
        raise PipelineError(f"--out: {out} is a file, not a folder")
    other = sorted(p.name for p in out.iterdir()
                   if not (p.is_file() and p.suffix == PRED_SUFFIX)) if out.is_dir() else []
    if other:
        raise PipelineError(f"--out: {out} holds other files than label PNGs (first: "
                            f"'{other[0]}'); it is replaced whole, so choose a new or empty folder")


def predict_folder(*, ensemble: Ensemble, input_dir: Path, out: Path, device: torch.device,
                   as_zip: bool = False, compare: Path | None = None,
                   weights_file: Path | None = None,
                   inputs: Mapping[str, Path | None] | None = None, progress: bool = True) -> dict:
    """Predict every image of ``input_dir`` (see the module doc) into ``out``: label PNGs, or
    with ``as_zip`` ``out/<submit name>.zip`` (+ its JSON, which records ``weights_file``, and
    previews). ``compare``: a submission zip whose labels are compared pixel by pixel.
    ``inputs``: {what: path} that the outputs must not overwrite. Returns a summary."""
    out = Path(out)
    inputs = {**(inputs or {}), "the input images": input_dir, "the compared zip": compare}
    if as_zip:
        target = out / f"{ensemble.submit['name']}.zip"
        atomic.refuse_overwrite(target, inputs, key="--out")
    else:
        atomic.refuse_overwrite(out, inputs, key="--out", folder=True)
        _check_out_folder(out)
    frames = folder_frames(input_dir)
    agreement = Agreement()
    summary = {"images": len(frames), "members": ensemble.members, "runs": len(ensemble.runs),
               "views": ensemble.tta.num_views, "alpha": ensemble.alpha, "beta": ensemble.beta}
    with contextlib.ExitStack() as stack:
        source = (stack.enter_context(_compared(Path(compare), ensemble, frames))
                  if compare else None)
        work = stack.enter_context(tempfile.TemporaryDirectory(prefix="predict."))
        pred_dir = Path(work) / "pred"
        with atomic.output_errors(out, "the predictions"), \
                atomic.atomic_dir(pred_dir if as_zip else out) as tmp:
            for frame, labels in predict_labels(ensemble, frames, device=device,
                                                progress=progress):
                if source is not None:
                    agreement.add(labels, source(frame))
                (tmp / f"{frame.id}{PRED_SUFFIX}").write_bytes(png_bytes(labels))
        if as_zip:
            data = Path(work) / "data"
            write_manifest(data / "manifest.csv", frames)
            write_classes(data / "classes.json", ensemble.classes)
            submit = ensemble.submit
            packed = make_submission(pred_dir=pred_dir, data=data, out_dir=out,
                                     name=submit["name"], fmt=submit["format"],
                                     vspw_offset=submit["vspw_offset"],
                                     rle_order=submit["rle_order"], weights=weights_file,
                                     progress=progress)
            summary.update(zip=str(out / packed["zip"]), format=packed["format"],
                           sha256=packed["sha256"])
    summary.update(out=str(out), compared=str(compare) if compare else None,
                   agreement=agreement.fraction, compared_pixels=agreement.pixels)
    return summary


def predict_images(*, input_dir: Path, out: Path, device: torch.device, bundle: Path | None,
                   weights: Path | None, runs: Path | None, data: Path | None,
                   params: Path | None,
                   as_zip: bool = False, compare: Path | None = None,
                   progress: bool = True) -> dict:
    """:func:`predict_folder` with the ensemble of ``bundle`` (nothing else is read; ``data``,
    when given, must hold the same classes), or else of the workspace (``weights``, ``runs``,
    ``data``/classes.json, ``params``)."""
    if bundle is not None:
        ensemble = read_bundle(Path(bundle))
        if data is not None:
            classes = read_classes(Path(data) / "classes.json")
            if list(classes.names) != list(ensemble.classes.names):
                raise PipelineError(f"{Path(data) / 'classes.json'}: its {classes.num_classes} "
                                    f"classes differ from the {ensemble.classes.num_classes} of "
                                    f"the bundle {bundle} ({', '.join(ensemble.classes.names[:4])}"
                                    f"...)")
        inputs = {"the bundle": Path(bundle)}
    else:
        ensemble = workspace_ensemble(weights=weights, runs=runs, data=data, params=params)
        inputs = {"the ensemble weights": weights, "the runs": runs, "the data": data,
                  "the params file": params}
    return predict_folder(ensemble=ensemble, input_dir=Path(input_dir), out=Path(out),
                          device=device, as_zip=as_zip, compare=compare, inputs=inputs,
                          weights_file=None if ensemble.bundle else Path(weights),
                          progress=progress)
