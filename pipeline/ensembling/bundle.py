"""The fitted ensemble as prediction needs it, read from the workspace or from one bundle file.

An :class:`Ensemble` holds what predicting new images takes: the groups S/W/A and alpha/beta of
weights.json (the best single member alone after a fallback), each member's runs with their share
of its test map (weights.json's ``test_weights``, mixed as ``--apply`` mixes the test maps:
:func:`pipeline.ensembling.testmaps.member_test`), each run's final checkpoint
(:meth:`pipeline.core.runs.RunPaths.final_weights`; self-describing, so
:func:`pipeline.models.checkpoint.model_from_checkpoint` rebuilds its network), classes.json, the
TTA (``infer.tta``) and the submission settings (``submit``: format, vspw offset, rle order, name).

:func:`workspace_ensemble` reads them from the workspace's files; :func:`write_bundle` packs them
into one file, and :func:`read_bundle` reads that file back anywhere, with nothing else.

The bundle is a zip (rather than one ``torch.save`` dict) because its parts stay what they are:
``bundle.json`` (:data:`BUNDLE_INDEX`: the format tag and version, the weights, classes, TTA and
submission settings, and per run its entry, share, size and sha256) is plain JSON that any tool
reads, and ``checkpoints/<run>.pt`` are the runs' checkpoint files byte for byte (stored, not
deflated: tensors barely compress), so ``unzip`` + ``sha256sum`` checks them against ``runs/``
and ``torch.load(weights_only=True)`` opens each one. A reader takes one checkpoint at a time
into memory, never the whole file; each is checked against its sha256 before it is loaded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import math
import types
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from tqdm.auto import tqdm

import pipeline
from pipeline.core import atomic
from pipeline.core.errors import PipelineError
from pipeline.core.names import ALL_FOLDS, fold_dir_name, member_name, parse_run_name
from pipeline.core.params import load_section, read_params
from pipeline.core.rle import RLE_ORDERS
from pipeline.core.runs import RunPaths
from pipeline.data.manifest import ClassInfo, read_classes
from pipeline.ensembling.apply import read_weights
from pipeline.ensembling.fusion import GROUPS
from pipeline.ensembling.testmaps import member_test_weights, run_of
from pipeline.inference.runner import InferParams
from pipeline.inference.tta import TTAConfig, tta_from_params
from pipeline.submission.formats import AUTO, get_format
from pipeline.submission.zips import ZIP_DATE, open_zip

BUNDLE_FORMAT = "segpipe-ensemble-bundle"
BUNDLE_VERSION = 1
BUNDLE_INDEX = "bundle.json"
BUNDLE_WHAT = "ensemble bundle"
CHECKPOINT_DIR = "checkpoints"
SUBMIT_NAME = "submission"   # the zip's name when params.yaml sets no submit.name
_BLOCK = 1 << 20


@dataclass(frozen=True)
class EnsembleRun:
    """One run (a fold model) of a member: its share of the member's test map and its bytes."""

    member: str
    key: str        # its folder in the member's maps and key of test_weights: f<K> or fall
    weight: float   # its share of the member's test map
    name: str       # the run folder, <model>_f<K>_s<seed>
    path: str       # where its checkpoint is: a file (workspace) or the bundle's entry
    sha256: str = ""  # recorded in a bundle; "" for a workspace file (taken as it is read)
    size: int = 0


@dataclass
class Ensemble:
    """What predicting takes (see the module doc). ``origin``: weights.json or the bundle file;
    ``bundle``: True when the runs' checkpoints are entries of ``origin``."""

    groups: dict[str, list[str]]
    alpha: float
    beta: float
    classes: ClassInfo
    tta: TTAConfig
    submit: dict[str, Any]
    runs: list[EnsembleRun]
    origin: Path
    fallback: str | None = None
    bundle: bool = False
    weights: dict = field(default_factory=dict)   # weights.json as read (for the record)

    @property
    def members(self) -> list[str]:
        return [n for g in GROUPS for n in self.groups[g]]

    def mix(self, member: str) -> dict[int | str, float]:
        """{fold: share} of the member's runs, as :func:`~pipeline.ensembling.testmaps.member_test`
        takes it."""
        return {run_of(r.key): r.weight for r in self.runs if r.member == member}

    def where(self, run: EnsembleRun) -> str:
        return f"{self.origin}:{run.path}" if self.bundle else run.path

    def checkpoint(self, run: EnsembleRun) -> dict:
        """The run's checkpoint dict (``torch.load(weights_only=True)`` of its bytes, checked
        against the bundle's sha256 and the ensemble's class names); one line on any fault."""
        where = self.where(run)
        try:
            with contextlib.ExitStack() as stack:
                if self.bundle:
                    fh = stack.enter_context(open_zip(self.origin, what=BUNDLE_WHAT)).open(run.path)
                else:
                    fh = stack.enter_context(open(run.path, "rb"))
                data = fh.read()
        except (OSError, KeyError, zipfile.BadZipFile, EOFError, ValueError) as err:
            raise PipelineError(f"{where}: unreadable checkpoint ({type(err).__name__}: "
                                f"{err})") from None
        if run.sha256 and hashlib.sha256(data).hexdigest() != run.sha256:
            raise PipelineError(f"{where}: sha256 differs from the one {BUNDLE_INDEX} records; "
                                f"the bundle is corrupt")
        try:
            ckpt = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as err:  # bad archives raise RuntimeError, UnpicklingError, EOFError ...
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            raise PipelineError(f"{where}: not a readable checkpoint ({first})") from None
        trained = ClassInfo.from_json((ckpt.get("classes") if isinstance(ckpt, dict) else None)
                                      or {})
        if list(trained.names) != list(self.classes.names):
            raise PipelineError(f"{where}: trained with {trained.num_classes} classes "
                                f"{list(trained.names)[:4]}..., not the ensemble's "
                                f"{self.classes.num_classes} of classes.json")
        return ckpt


# ----------------------------------------------------------------------------- the workspace
def submit_settings(params: Mapping[str, Any], *, dataset: str, source: str) -> dict[str, Any]:
    """The ``submit`` section's format (resolved from ``auto``), vspw offset, rle order and
    name, checked to fit ``dataset`` (classes.json's) by :func:`get_format`."""
    section = params.get("submit") or {}
    rle = (section.get("rle") or {}) if isinstance(section, Mapping) else None
    if not isinstance(rle, Mapping):
        raise PipelineError(f"{source}: 'submit' and 'submit.rle' must be mappings")
    try:
        fmt = get_format(section.get("format", AUTO), dataset=dataset,
                         vspw_offset=section.get("vspw_offset", 0),
                         rle_order=rle.get("order", RLE_ORDERS[0]))
    except PipelineError as err:
        raise PipelineError(f"{source}: submit: {err}") from None
    return {"format": fmt.name, "vspw_offset": fmt.offset,
            "rle_order": fmt.rle_order or RLE_ORDERS[0],
            "name": str(section.get("name") or SUBMIT_NAME)}


def _run_folders(runs: Path) -> dict[tuple[str, str], Path]:
    """{(member, f<K>): run folder} of every run folder under ``runs``."""
    if not runs.is_dir():
        raise PipelineError(f"{runs}: runs folder not found")
    found = {}
    for entry in sorted(runs.iterdir()):
        parsed = parse_run_name(entry.name) if entry.is_dir() else None
        if parsed:
            model, fold, seed = parsed
            found[(member_name(model, seed), fold_dir_name(fold))] = entry
    return found


def _member_mix(weights: dict, member: str, folders: Mapping[tuple[str, str], Path]
                ) -> dict[str, float]:
    """weights.json's ``test_weights`` of ``member``, or (an older weights.json without them)
    the default of :func:`member_test_weights` over the member's run folders."""
    recorded = ((weights.get("members") or {}).get(member) or {}).get("test_weights")
    if recorded:
        return {str(k): float(v) for k, v in recorded.items()}
    folds = [run_of(key) for m, key in folders if m == member]
    layout = types.SimpleNamespace(folds=[f for f in folds if f != ALL_FOLDS],
                                   meta={f: {} for f in folds})
    return member_test_weights(layout, float(weights.get("full_data_weight") or 0.0))


def workspace_ensemble(*, weights: Path, runs: Path, data: Path, params: Path) -> Ensemble:
    """The ensemble of this workspace: ``weights`` (ensemble/weights.json, checked by
    :func:`read_weights`), the final checkpoint of each run it uses under ``runs``,
    ``data``/classes.json and ``params``' ``infer.tta`` and ``submit`` sections. Runs whose
    share is 0 are left out (they add nothing to the test map)."""
    fitted = read_weights(Path(weights))
    classes = read_classes(Path(data) / "classes.json")
    if not Path(params).is_file():
        raise PipelineError(f"{params}: params file not found (it gives infer.tta and submit)")
    infer = load_section(InferParams, "infer", params)
    tta = tta_from_params(infer.tta or True, source=str(params), section="infer.tta")
    submit = submit_settings(read_params(params), dataset=classes.dataset, source=str(params))
    folders = _run_folders(Path(runs))
    ensemble_runs = []
    for member in [n for g in GROUPS for n in fitted["groups"][g]]:
        mix = _member_mix(fitted, member, folders)
        for key, share in sorted(mix.items(), key=lambda kv: fold_order(run_of(kv[0]))):
            if share <= 0:
                continue
            folder = folders.get((member, key))
            if folder is None:
                raise PipelineError(f"{runs}: no run folder of member '{member}' for {key} "
                                    f"(<model>_f<fold>_s<seed>; {weights} gives it weight "
                                    f"{share:g})")
            path = RunPaths(folder).final_weights()
            ensemble_runs.append(EnsembleRun(member=member, key=key, weight=share,
                                             name=folder.name, path=str(path),
                                             size=path.stat().st_size))
    return Ensemble(groups=fitted["groups"], alpha=fitted["alpha"], beta=fitted["beta"],
                    classes=classes, tta=tta, submit=submit, runs=ensemble_runs,
                    origin=Path(weights), fallback=fitted.get("fallback"),
                    weights=json.loads(Path(weights).read_text()))


def fold_order(fold: int | str) -> tuple[int, int]:
    """Sort key of a member's runs: fold models by number, then the ``--fold all`` run (the
    order in which :class:`pipeline.inference.members.Member` reads them)."""
    return (1, 0) if fold == ALL_FOLDS else (0, int(fold))


def pack_bundle(*, out: Path, weights: Path, runs: Path, data: Path, params: Path,
                progress: bool = True) -> dict[str, Any]:
    """Pack the workspace's ensemble (:func:`workspace_ensemble`) into the bundle ``out``
    (:func:`write_bundle`); returns its ``bundle.json``."""
    ensemble = workspace_ensemble(weights=weights, runs=runs, data=data, params=params)
    inputs = {"the ensemble weights": weights, "the classes file": Path(data) / "classes.json",
              "the params file": params}
    return write_bundle(ensemble, out, inputs=inputs, progress=progress)


# ----------------------------------------------------------------------------- the bundle file
def bundle_index(ensemble: Ensemble, runs: list[EnsembleRun]) -> dict[str, Any]:
    """The ``bundle.json`` of ``ensemble`` with its packed ``runs`` (entries and sha256)."""
    return {"format": BUNDLE_FORMAT, "version": BUNDLE_VERSION,
            "pipeline_version": str(pipeline.__version__),
            "groups": ensemble.groups, "alpha": ensemble.alpha, "beta": ensemble.beta,
            "fallback": ensemble.fallback, "classes": ensemble.classes.to_json(),
            "tta": dataclasses.asdict(ensemble.tta), "submit": ensemble.submit,
            "members": {m: {"group": g, "runs": [
                {"key": r.key, "weight": r.weight, "run": r.name, "entry": r.path,
                 "sha256": r.sha256, "bytes": r.size} for r in runs if r.member == m]}
                for g in GROUPS for m in ensemble.groups[g]},
            "weights": ensemble.weights}


def write_bundle(ensemble: Ensemble, out: Path, *,
                 inputs: Mapping[str, Path | None] | None = None,
                 progress: bool = True) -> dict[str, Any]:
    """Pack ``ensemble`` (read from the workspace) into the bundle zip ``out``, atomically;
    every checkpoint is loaded and checked (classes) first. ``inputs``: files ``out`` must not
    overwrite, {what: path}. Returns ``bundle.json``'s content."""
    out = Path(out)
    atomic.refuse_overwrite(out, {**(inputs or {}), **{f"the checkpoint of run {r.name}": Path(r.path)
                                               for r in ensemble.runs}}, key="OUT_FILE")
    packed = []
    with atomic.output_errors(out.parent, "the bundle"), atomic.atomic_path(out) as tmp, \
            zipfile.ZipFile(tmp, "w", allowZip64=True) as zf:
        for run in tqdm(ensemble.runs, desc="bundle", unit="run", disable=not progress):
            ensemble.checkpoint(run)  # loads: a broken run stops here, not on another machine
            entry = f"{CHECKPOINT_DIR}/{run.name}.pt"
            if any(p.path == entry for p in packed):
                raise PipelineError(f"{run.path}: run {run.name} is listed twice")
            digest, size = hashlib.sha256(), 0
            info = _entry(entry, compress=False)
            with open(run.path, "rb") as src, zf.open(info, "w", force_zip64=True) as dst:
                for block in iter(lambda: src.read(_BLOCK), b""):
                    digest.update(block)
                    size += len(block)
                    dst.write(block)
            packed.append(dataclasses.replace(run, path=entry, sha256=digest.hexdigest(),
                                              size=size))
        index = bundle_index(ensemble, packed)
        zf.writestr(_entry(BUNDLE_INDEX, compress=True), atomic.json_text(index))
    return index


def _entry(name: str, *, compress: bool) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=ZIP_DATE)  # fixed date: same inputs, same bytes
    info.compress_type = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    info.create_system = 3  # unix, so external_attr means the same everywhere
    info.external_attr = 0o100644 << 16
    return info


def read_bundle(path: Path) -> Ensemble:
    """The :class:`Ensemble` packed in the bundle ``path`` by :func:`write_bundle`; a missing
    file, another kind of file, a newer version or a damaged index is one PipelineError. The
    checkpoints are read (and their sha256 checked) by :meth:`Ensemble.checkpoint`."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: bundle not found")
    with open_zip(path, what=BUNDLE_WHAT) as zf:
        try:
            index = json.loads(zf.read(BUNDLE_INDEX))
        except KeyError:
            raise PipelineError(f"{path}: not an ensemble bundle (no {BUNDLE_INDEX})") from None
        except (zipfile.BadZipFile, ValueError, OSError, EOFError) as err:
            raise PipelineError(f"{path}: corrupt bundle ({BUNDLE_INDEX}: {err})") from None
        sizes = {i.filename: i.file_size for i in zf.infolist()}
    if not isinstance(index, dict) or index.get("format") != BUNDLE_FORMAT:
        raise PipelineError(f"{path}: not an ensemble bundle (format tag is not {BUNDLE_FORMAT})")
    if not isinstance(index.get("version"), int) or index["version"] > BUNDLE_VERSION:
        raise PipelineError(f"{path}: bundle version {index.get('version')!r} is newer than "
                            f"this code reads ({BUNDLE_VERSION})")
    try:
        groups = {g: [str(n) for n in index["groups"].get(g, [])] for g in GROUPS}
        alpha, beta = float(index["alpha"]), float(index["beta"])
        classes = ClassInfo.from_json(index["classes"])
        tta = TTAConfig(**index["tta"])
        submit = {k: index["submit"][k] for k in ("format", "vspw_offset", "rle_order", "name")}
        runs = [EnsembleRun(member=str(m), key=str(r["key"]), weight=float(r["weight"]),
                            name=str(r["run"]), path=str(r["entry"]), sha256=str(r["sha256"]),
                            size=int(r["bytes"]))
                for m, info in index["members"].items() for r in info["runs"]]
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise PipelineError(f"{path}: corrupt bundle ({BUNDLE_INDEX}: {type(err).__name__}: "
                            f"{err})") from None
    problem = None
    if not (math.isfinite(alpha) and math.isfinite(beta) and alpha >= 0 and beta >= 0):
        problem = f"alpha={alpha}, beta={beta} are not finite weights >= 0"
    elif not groups["S"]:
        problem = "group S is empty"
    for run in runs:
        if problem is None and sizes.get(run.path) != run.size:
            problem = (f"entry {run.path} of run {run.name} is missing or not "
                       f"{run.size} bytes")
    members = {n for g in GROUPS for n in groups[g]}
    if problem is None and members != {r.member for r in runs if r.weight > 0}:
        problem = "the groups' members and the packed runs differ"
    if problem:
        raise PipelineError(f"{path}: corrupt bundle ({problem})")
    return Ensemble(groups=groups, alpha=alpha, beta=beta, classes=classes, tta=tta,
                    submit=submit, runs=runs, origin=path, fallback=index.get("fallback"),
                    bundle=True, weights=index.get("weights") or {})
