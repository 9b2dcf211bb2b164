"""What a fit becomes in the files of a search: the contents of weights.json (the groups and
weights ``--apply`` fuses with, or the best single member after a fallback), metrics.json (the
ensemble table on OOF), members.json and confusion.json."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from pipeline.core.names import BEST_SINGLE, ENSEMBLE_ROWS
from pipeline.ensembling.fit import Fit
from pipeline.ensembling.groups import member_model
from pipeline.ensembling.inputs import SearchInputs, meta_digest
from pipeline.ensembling.study import STUDY_FILE, STUDY_NAME, open_code
from pipeline.ensembling.testmaps import member_test_weights
from pipeline.evaluation.metrics import mean_iou


def _num(value: float) -> float | None:
    """A score for JSON: None where it is missing or not finite."""
    return None if value is None or not np.isfinite(value) else float(value)


@dataclass
class Documents:
    """The JSON documents of a search, each the content of its file."""

    members: dict      # members.json
    confusion: dict    # confusion.json
    metrics: dict      # metrics.json
    weights: dict      # weights.json


def documents(fit: Fit, inputs: SearchInputs, *, families: Mapping[str, str | None],
              fallback: str, full_data_weight: float, fp: str, out_dir: Path) -> Documents:
    """The outputs of a search that found ``fit`` on ``inputs``. With ``fallback``
    BEST_SINGLE, weights.json selects the best single member alone when the best fused row
    scores below it OOF."""
    member_miou = {n: mean_iou(fit.member_cms[n]) for n in inputs.names}
    use_single = fallback == BEST_SINGLE and fit.best < member_miou[fit.single]
    table = {**fit.table, BEST_SINGLE: fit.table[f"member:{fit.single}"]}
    mixes = {m.name: member_test_weights(m, full_data_weight) for m in inputs.members}
    return Documents(
        members=members_doc(fit, inputs, families=families, member_miou=member_miou,
                            mixes=mixes),
        confusion={key: np.asarray(table[key][0]).tolist() for key in ENSEMBLE_ROWS},
        metrics=metrics_doc(fit, inputs, table=table, use_single=use_single,
                            single_score=member_miou[fit.single]),
        weights=weights_doc(fit, inputs, use_single=use_single, member_miou=member_miou,
                            mixes=mixes, full_data_weight=full_data_weight, fp=fp,
                            out_dir=out_dir))


def metrics_doc(fit: Fit, inputs: SearchInputs, *, table: Mapping[str, tuple], use_single: bool,
                single_score: float) -> dict[str, Any]:
    """metrics.json: the ``table`` of :data:`~pipeline.core.names.ENSEMBLE_ROWS` (flat
    ``<row>_mIoU`` / ``_mVC8`` / ``_mVC16`` keys), the fitted weights, the coverage of the train
    frames and the fallback."""
    metrics: dict[str, Any] = {"frames": len(inputs.frames), **inputs.coverage,
                               "members": len(inputs.names), "alpha": fit.alpha,
                               "beta": fit.beta, "alpha_S_W": fit.alpha_sw}
    for key in ENSEMBLE_ROWS:
        cm, vc = table[key]
        metrics[f"{key}_mIoU"] = _num(mean_iou(cm))
        metrics.update({f"{key}_mVC{n}": _num(vc.get(n)) for n in (8, 16)})
    metrics.update(fallback=BEST_SINGLE if use_single else None,
                   fallback_member=fit.single if use_single else None,
                   submitted_mIoU=_num(single_score if use_single else fit.best))
    return metrics


def members_doc(fit: Fit, inputs: SearchInputs, *, families: Mapping[str, str | None],
                member_miou: Mapping[str, float],
                mixes: Mapping[str, Mapping[str, float]]) -> dict[str, dict]:
    """members.json: each member's model, family, group (None: left out), OOF mIoU and test
    weights, best first."""
    by_name = {m.name: m for m in inputs.members}
    group_of = {n: g for g, listed in fit.chosen.items() for n in listed}
    return {n: {"model": member_model(by_name[n]), "family": families[n],
                "group": group_of.get(n), "oof_mIoU": _num(member_miou[n]),
                "test_weights": mixes[n]}
            for n in sorted(inputs.names, key=lambda n: (-member_miou[n], n))}


def weights_doc(fit: Fit, inputs: SearchInputs, *, use_single: bool,
                member_miou: Mapping[str, float], mixes: Mapping[str, Mapping[str, float]],
                full_data_weight: float, fp: str, out_dir: Path) -> dict[str, Any]:
    """weights.json: the groups and weights ``--apply`` uses (the best single member alone
    after a fallback), the fused row's and the best member's, and what they were fitted on."""
    by_name = {m.name: m for m in inputs.members}
    single_score = member_miou[fit.single]
    applied = {"S": [fit.single], "W": [], "A": []} if use_single else fit.chosen
    applied_of = {n: g for g, listed in applied.items() for n in listed}
    return {"groups": applied, "alpha": 0.0 if use_single else fit.alpha,
            "beta": 0.0 if use_single else fit.beta,
            "oof_mIoU": single_score if use_single else fit.best,
            "fallback": BEST_SINGLE if use_single else None,
            "fused": {"groups": fit.chosen, "alpha": fit.alpha, "beta": fit.beta,
                      "oof_mIoU": fit.best},
            BEST_SINGLE: {"member": fit.single, "oof_mIoU": _num(single_score)},
            "grid": {"alpha": fit.grid[0], "beta": fit.grid[1]},
            "classes": inputs.classes.num_classes, "frames": len(inputs.frames),
            **inputs.coverage, "full_data_weight": float(full_data_weight), "fingerprint": fp,
            "members": {n: {"group": applied_of[n], "oof_mIoU": _num(member_miou[n]),
                            "meta_sha": meta_digest(by_name[n]),
                            "test_weights": mixes[n]} for n in sorted(applied_of)},
            "study": study_doc(out_dir / STUDY_FILE, trials=len(fit.trials))}


def study_doc(path: Path, *, trials: int) -> dict[str, Any]:
    """weights.json's ``study``: the journal file of the Optuna study (Optuna's
    ``JournalStorage`` with a file backend), its name, its trials and the Python that opens
    it."""
    return {"journal": path.as_posix(), "study_name": STUDY_NAME, "trials": trials,
            "open": open_code(path.as_posix())}
