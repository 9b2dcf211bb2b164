"""The hierarchical ensemble's search, step by step: check the settings, read and check the
inputs (:mod:`pipeline.ensembling.inputs`), choose each member's family, fingerprint the
inputs, fit the weights with the output folder's lock held (:mod:`pipeline.ensembling.fit`),
then write the outputs (:mod:`pipeline.ensembling.documents`), weights.json last: a search
killed before it resumes to the same outputs.

See :mod:`pipeline.ensembling` for the method.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

from pipeline.core import atomic
from pipeline.core.errors import PipelineError, unknown_name
from pipeline.core.names import BEST_SINGLE
from pipeline.data.oof_sample import OOFSample
from pipeline.ensembling.cache import fingerprint
from pipeline.ensembling.documents import Documents, documents
from pipeline.ensembling.fit import Fit, fit_weights
from pipeline.ensembling.groups import Grouping, member_families
from pipeline.ensembling.inputs import read_inputs
from pipeline.ensembling.lock import search_lock
from pipeline.ensembling.outputs import CONFUSION, MEMBERS, METRICS, WEIGHTS
from pipeline.ensembling.params import is_number, parse_grid
from pipeline.ensembling.passes import OofSource
from pipeline.ensembling.study import STUDY_FILE

FALLBACKS = (BEST_SINGLE, "none")


def check_settings(alphas: Sequence[float] | None, betas: Sequence[float] | None, *,
                   fallback: str, full_data_weight: float,
                   source: str) -> tuple[list[float], list[float]]:
    """The grid's (alphas, betas) (:func:`~pipeline.ensembling.params.parse_grid`), once
    ``fallback`` and ``full_data_weight`` are known to be valid."""
    alphas = parse_grid(alphas, key="alpha_grid", source=source)
    betas = parse_grid(betas, key="beta_grid", source=source)
    if fallback not in FALLBACKS:
        raise PipelineError(f"{source}: ensemble.fallback: "
                            f"{unknown_name('fallback', str(fallback), FALLBACKS)}")
    if not (is_number(full_data_weight) and 0 <= full_data_weight <= 1):
        raise PipelineError(f"{source}: ensemble.full_data_weight must be a number in "
                            f"[0, 1], got {full_data_weight!r}")
    return alphas, betas


def write_outputs(out_dir: Path, docs: Documents, fit: Fit) -> None:
    """The documents, and the study committed onto ``out_dir/study.journal``, weights.json
    last."""
    atomic.write_json(out_dir / MEMBERS, docs.members)
    atomic.write_json(out_dir / CONFUSION, docs.confusion)
    atomic.write_json(out_dir / METRICS, docs.metrics)
    replaced = (out_dir / STUDY_FILE).exists()
    if fit.handle.commit() and replaced:  # the earlier study is kept until this one is complete
        print(f"{out_dir / STUDY_FILE}: the study of other inputs is replaced by this one "
              f"({len(fit.trials)} trials)")
    atomic.write_json(out_dir / WEIGHTS, docs.weights)  # last: a search killed before resumes


def search_ensemble(*, oof_root: Path, data_dir: Path, out_dir: Path,
                    groups: Mapping[str, list[str]] | None = None,
                    families: Mapping[str, str] | None = None, primary_family: str = "primary",
                    n_strong: int = 3, n_aux: int = 0, alphas: Sequence[float] | None = None,
                    betas: Sequence[float] | None = None, full_size: bool = False,
                    workers: int = 1, chunk_frames: int = 32, progress: bool = True,
                    params_source: str = "params.yaml", members: Sequence[str] | None = None,
                    folds_path: Path | None = None, allow_partial: bool = False,
                    fallback: str = BEST_SINGLE, full_data_weight: float = 0.0,
                    oof_sample: OOFSample | None = None) -> dict:
    """Fit the group weights on the OOF maps under ``oof_root`` and write the outputs to
    ``out_dir`` (see the module docstring). ``groups``: explicit {S, W, A} lists or None for
    automatic ones; ``families``: {model config: family} (needed by auto groups);
    ``alphas``/``betas``: grid weights (default 0..2 step 0.1); ``members``: the member names
    to use (:func:`~pipeline.ensembling.params.params_members`; None: every member found; the
    others found are ignored, said in one line); ``folds_path``: folds.csv, the train frames
    the OOF maps must cover (None: the manifest's), unless ``allow_partial``; ``fallback``:
    BEST_SINGLE makes weights.json select the best single member when the best fused row
    scores below it OOF ("none": keep the fused row); ``full_data_weight``: see
    :func:`~pipeline.ensembling.testmaps.member_test_weights`; ``oof_sample``: the
    ``infer.oof_sample`` the maps were made with (None: every train frame), whose frames the
    fit uses and whose clips its video consistency is computed on.
    Holds ``out_dir/.search.lock`` while it writes
    (:func:`~pipeline.ensembling.lock.search_lock`).
    Returns {"weights": ..., "metrics": ..., "members": ...} as written."""
    alphas, betas = check_settings(alphas, betas, fallback=fallback,
                                   full_data_weight=full_data_weight, source=params_source)
    inputs = read_inputs(oof_root, data_dir, members=members, folds_path=folds_path,
                         full_size=full_size, allow_partial=allow_partial, source=params_source,
                         oof_sample=oof_sample)
    fam = member_families(inputs.members, families or {}, explicit=groups,
                          primary_family=primary_family, n_strong=n_strong, source=params_source)
    grouping = Grouping(groups, inputs.names, families=fam, primary_family=primary_family,
                        n_strong=n_strong, n_aux=n_aux, source=params_source)
    settings = {"groups": groups, "families": None if groups else fam, "alphas": alphas,
                "primary_family": primary_family, "n_strong": n_strong, "n_aux": n_aux,
                "betas": betas, "full_size": full_size, "frames": [f.id for f in inputs.frames]}
    if inputs.coverage["oof_sampled"]:  # the clips decide the video consistency
        settings["oof_sample"] = inputs.coverage["oof_sample"]
    fp = fingerprint(inputs.members, inputs.frames, inputs.classes_path, settings)
    classes = inputs.classes
    source = OofSource(members=tuple(inputs.members), lut=classes.lut_array(),
                       num_classes=classes.num_classes, stride=inputs.stride,
                       full_size=full_size, ignore_index=classes.ignore_index)
    with search_lock(out_dir):
        fit = fit_weights(source, inputs.frames, grouping=grouping, grid=(alphas, betas), fp=fp,
                          out_dir=out_dir, manifest=inputs.manifest, classes=classes,
                          full_size=full_size, stride=inputs.stride,
                          run={"workers": workers, "chunk_frames": chunk_frames,
                               "progress": progress})
        docs = documents(fit, inputs, families=fam, fallback=fallback,
                         full_data_weight=full_data_weight, fp=fp, out_dir=out_dir)
        write_outputs(out_dir, docs, fit)
    return {"weights": docs.weights, "metrics": docs.metrics, "members": docs.members,
            "ignored": inputs.ignored}
