"""The technique ledger: what each technique of the recipe buys, measured on the same weights and
frames, out of fold and (where the test split is labelled) on the test split.

Pure arithmetic on mIoU values (fractions in 0..1); :mod:`pipeline.reporting.summary` gathers them from
the chain's files. Each comparison is a pair (baseline, with the technique) scored on the same
frames, so its gain is a paired difference:

* ``SWA vs last``: a member's ``swa.pt`` against its ``last.pt`` on its validation folds
  (confusion matrices pooled over folds), one view at the validation scale;
* ``EMA vs last``: a member's EMA of the weights (``models.<name>.ema``) against its last
  weights, both validated by training at its last validation on the same frames (the runs'
  ``metrics.json``: ``ema_miou`` beside ``last_miou``, frame-weighted over the folds that hold
  both; :func:`ema_scores`); validation folds only;
* ``TTA vs one view``: the same SWA weights, TTA against one plain view, pooled OOF frames;
* ``student vs teacher``: a distilled member against the member it learned from (same folds,
  same seed, both SWA + TTA);
* ``ensemble``: best single, uniform mean, P_S, P_S + a P_W, P_S + a P_W + b P_A, each step's
  gain over the row before it, and the last row's gain over the best single member;
* ``logit adjustment`` / ``OHEM`` / ``rare-class sampling``: only where two model configs differ
  in nothing but that switch (their members of the same seeds are compared); otherwise the row
  says "not measured". ``rare frames`` / ``rare crops``: one class-aware draw added with the
  other held as it is, so rare frames on top of rare crops is measured too.

Verdicts: ``helps`` when the gain exceeds the noise band, ``hurts`` when it is below minus the
band, ``within noise`` otherwise. The band is the largest spread (max - min) between the seeds
of one model config, on the same split; with no model trained on two seeds there is no band and
the verdict says so instead of guessing.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from pipeline.core.names import BEST_SINGLE, ENSEMBLE_ROWS, MAP_SPLITS, UNIFORM_MEAN
from pipeline.core.runs import RARE, SamplingParams

ROW_LABELS = {BEST_SINGLE: "best single", UNIFORM_MEAN: "uniform mean", "S": "P_S",
              "S_W": "P_S + a P_W", "S_W_A": "P_S + a P_W + b P_A"}
ENSEMBLE_STEPS = tuple((key, ROW_LABELS[key]) for key in ENSEMBLE_ROWS)  # in the search's row order
NO_BAND = "no noise band (one seed per model)"


@dataclass
class MemberScores:
    """mIoU (fraction) of one member ``<model>_s<seed>`` per split and kind: ``last`` and
    ``swa`` (validation scale, one view), ``single`` (SWA, one view), ``tta`` (SWA + TTA), and
    ``ema`` with its own baseline ``ema_last`` (:func:`ema_scores`: the same folds)."""

    model: str
    seed: int
    oof: dict[str, float | None] = field(default_factory=dict)
    test: dict[str, float | None] = field(default_factory=dict)

    def score(self, split: str, kind: str) -> float | None:
        return (self.oof if split == "oof" else self.test).get(kind)


def noise_band(members: Mapping[str, MemberScores], *, split: str = "oof",
               kind: str = "tta") -> float | None:
    """Largest max - min of ``kind`` scores between seeds of one model; None without two seeds."""
    by_model: dict[str, list[float]] = {}
    for m in members.values():
        value = m.score(split, kind)
        if value is not None:
            by_model.setdefault(m.model, []).append(value)
    spreads = [max(v) - min(v) for v in by_model.values() if len(v) >= 2]
    return max(spreads) if spreads else None


def verdict(gain: float | None, band: float | None) -> str:
    """``helps`` / ``hurts`` / ``within noise`` for a gain against a noise band (both fractions)."""
    if gain is None:
        return "not measured"
    if band is None:
        return NO_BAND
    if gain > band:
        return "helps"
    if gain < -band:
        return "hurts"
    return "within noise"


def ema_scores(metrics: Sequence[Mapping[str, Any] | None]) -> tuple[float | None, float | None]:
    """(last, EMA) mIoU of a member from its folds' training ``metrics.json`` dicts: the means of
    ``last_miou`` and ``ema_miou`` weighted by ``val_frames`` (equal weights when a count is
    missing), over the folds that hold both, so the pair is scored on the same frames; (None,
    None) when no fold does."""
    both = [m for m in metrics if m and m.get("last_miou") is not None
            and m.get("ema_miou") is not None]
    if not both:
        return None, None
    weights = [m.get("val_frames") or 0 for m in both]
    if not all(weights):
        weights = [1] * len(both)
    total = sum(weights)
    return (sum(w * m["last_miou"] for w, m in zip(weights, both)) / total,
            sum(w * m["ema_miou"] for w, m in zip(weights, both)) / total)


def _row(technique: str, subject: str, split: str, base: float | None, new: float | None,
         band: float | None, note: str = "") -> dict:
    gain = new - base if base is not None and new is not None else None
    return {"technique": technique, "subject": subject, "split": split, "baseline": base,
            "with": new, "gain": gain, "band": band, "verdict": verdict(gain, band), "note": note}


def _mean_row(technique: str, rows: Sequence[dict], split: str, band: float | None) -> dict | None:
    gains = [r["gain"] for r in rows if r["gain"] is not None]
    if len(gains) < 2:
        return None
    row = _row(technique, f"mean of {len(gains)} members", split, None, None, band)
    row["gain"] = sum(gains) / len(gains)
    row["verdict"] = verdict(row["gain"], band)
    return row


def _not_measured(technique: str, split: str, why: str) -> dict:
    return {"technique": technique, "subject": "-", "split": split, "baseline": None,
            "with": None, "gain": None, "band": None, "verdict": "not measured", "note": why}


def _per_member(technique: str, members: Mapping[str, MemberScores], split: str, base: str,
                new: str, band: float | None, why_absent: str) -> list[dict]:
    rows = [_row(technique, name, split, m.score(split, base), m.score(split, new), band)
            for name, m in sorted(members.items())
            if m.score(split, base) is not None and m.score(split, new) is not None]
    if not rows:
        return [_not_measured(technique, split, why_absent)]
    mean = _mean_row(technique, rows, split, band)
    return rows + ([mean] if mean else [])


def _strip(config: Mapping[str, Any], keys: Sequence[str]) -> dict:
    return {k: v for k, v in config.items() if k not in keys}


def _uses_ohem(config: Mapping[str, Any]) -> bool:
    return any(isinstance(s, Mapping) and s.get("name") == "ohem" for s in config.get("loss") or [])


def _ohem_free(config: Mapping[str, Any]) -> list:
    """The loss list with OHEM read as plain cross-entropy (its only difference)."""
    return [{"name": "ce", **{k: v for k, v in s.items() if k not in ("name", "thresh", "min_kept")}}
            if isinstance(s, Mapping) and s.get("name") == "ohem" else s
            for s in config.get("loss") or []]


def _la_on(config: Mapping[str, Any]) -> bool:
    return bool((config.get("logit_adjust") or {}).get("enabled", False))


def _rare_sampling(config: Mapping[str, Any]) -> bool:
    sampling = config.get("sampling") or {}
    return RARE in (sampling.get("frames"), sampling.get("crops"))


def _sampling_without(config: Mapping[str, Any], keys: Sequence[str]) -> dict:
    """The config with the sampling ``keys`` removed; a sampling key at its default counts as
    absent, so that ``{crops: rare}`` and ``{crops: rare, crop_share: 0.5}`` are the same."""
    defaults = dataclasses.asdict(SamplingParams())
    rest = {k: v for k, v in (config.get("sampling") or {}).items()
            if k not in keys and v != defaults.get(k)}
    return {**_strip(config, ("sampling",)), **({"sampling": rest} if rest else {})}


SWITCHES = {  # technique -> (is it on in this config?, the config with the switch neutralised)
    "logit adjustment": (_la_on, lambda c: _strip(c, ("logit_adjust",))),
    "OHEM": (_uses_ohem, lambda c: {**c, "loss": _ohem_free(c)}),
    "rare-class sampling": (_rare_sampling, lambda c: _strip(c, ("sampling",))),
    # one of the two draws added, the other held as it is (e.g. rare frames on top of rare crops)
    "rare frames": (lambda c: (c.get("sampling") or {}).get("frames") == RARE,
                    lambda c: _sampling_without(c, ("frames", "temperature"))),
    "rare crops": (lambda c: (c.get("sampling") or {}).get("crops") == RARE,
                   lambda c: _sampling_without(c, ("crops", "crop_share"))),
}


def switch_pairs(models: Mapping[str, Mapping[str, Any]], technique: str) -> list[tuple[str, str]]:
    """(config with the technique, config without it) pairs of ``models`` (params' ``models:``)
    that are equal once the technique's switch is removed from both."""
    is_on, neutral = SWITCHES[technique]
    pairs = []
    for on_name, on_cfg in sorted(models.items()):
        if not is_on(on_cfg):
            continue
        for off_name, off_cfg in sorted(models.items()):
            if off_name != on_name and not is_on(off_cfg) and neutral(on_cfg) == neutral(off_cfg):
                pairs.append((on_name, off_name))
    return pairs


def _pair_rows(technique: str, pairs: Sequence[tuple[str, str]],
               members: Mapping[str, MemberScores], split: str, band: float | None,
               kind: str = "tta") -> list[dict]:
    rows = []
    for with_model, without_model in pairs:
        for name, m in sorted(members.items()):
            if m.model != with_model:
                continue
            twin = next((o for o in members.values()
                         if o.model == without_model and o.seed == m.seed), None)
            if twin is not None:
                rows.append(_row(technique, f"{with_model} vs {without_model} (seed {m.seed})",
                                 split, twin.score(split, kind), m.score(split, kind), band))
    return rows


def build_ledger(*, members: Mapping[str, MemberScores],
                 models: Mapping[str, Mapping[str, Any]] | None = None,
                 teachers: Mapping[str, str] | None = None,
                 ensemble: Mapping[str, Mapping[str, float | None]] | None = None) -> dict:
    """The ledger's rows per split, and the noise bands.

    ``members``: {member: scores}; ``models``: params' ``models:`` section (for the switch
    pairs; None: not measured); ``teachers``: {student member: teacher member};
    ``ensemble``: {split: {row key of :data:`ENSEMBLE_STEPS`: mIoU}}.
    Returns {"bands": {split: band}, "rows": [row, ...]} with rows as dicts of technique,
    subject, split, baseline, with, gain (fractions), band, verdict and note.
    """
    rows: list[dict] = []
    bands = {split: noise_band(members, split=split) for split in MAP_SPLITS}
    has_test = any(m.test for m in members.values()) or bool((ensemble or {}).get("test"))
    splits = MAP_SPLITS if has_test else ("oof",)
    for split in splits:
        band = bands[split]
        rows += _per_member("SWA vs last", members, split, "last", "swa", band,
                            "only swa.pt's maps are stored for this split" if split == "test"
                            else "no swa_metrics.json with both scores")
        rows += _per_member("EMA vs last", members, split, "ema_last", "ema", band,
                            "the EMA is scored on the validation folds only" if split == "test"
                            else "no run metrics with ema_miou (models.<name>.ema.decay > 0)")
        rows += _per_member("TTA vs one view", members, split, "single", "tta", band,
                            "test maps are stored with TTA only" if split == "test"
                            else "no one-view score (set infer.compare_single: true)")
        student_rows = []
        for student, teacher in sorted((teachers or {}).items()):
            s, t = members.get(student), members.get(teacher)
            if s is not None and t is not None:
                student_rows.append(_row("student vs teacher", f"{student} vs {teacher}", split,
                                         t.score(split, "tta"), s.score(split, "tta"), band))
        rows += student_rows or [_not_measured("student vs teacher", split,
                                               "no distilled member with its teacher's scores")]
        scores = (ensemble or {}).get(split) or {}
        steps = [(key, label) for key, label in ENSEMBLE_STEPS if scores.get(key) is not None]
        if len(steps) >= 2:
            for (prev, prev_label), (key, label) in zip(steps, steps[1:]):
                rows.append(_row("ensemble", f"{label} over {prev_label}", split,
                                 scores[prev], scores[key], band))
            (first, first_label), (last, last_label) = steps[0], steps[-1]
            if first == BEST_SINGLE and last != steps[1][0]:
                rows.append(_row("ensemble", f"{last_label} over {first_label}", split,
                                 scores[first], scores[last], band))
        else:
            rows.append(_not_measured("ensemble", split, "no ensemble scores for this split"))
        for technique in SWITCHES:
            pairs = switch_pairs(models or {}, technique)
            pair_rows = _pair_rows(technique, pairs, members, split, band)
            rows += pair_rows or [_not_measured(
                technique, split, "no two model configs differ only in this switch"
                if models is not None else "model configs not given")]
    return {"bands": bands, "rows": rows}


def _pct(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{100 * value:+.2f}" if signed else f"{100 * value:.2f}"


def format_ledger(ledger: Mapping[str, Any]) -> list[str]:
    """Markdown lines: one table per split, gains in mIoU points, the band stated per split."""
    out = []
    for split in MAP_SPLITS:
        rows = [r for r in ledger["rows"] if r["split"] == split]
        if not rows:
            continue
        band = ledger["bands"].get(split)
        title = "out of fold" if split == "oof" else "test split"
        out += ["", f"### {title} (noise band +/- {_pct(band)} points: the largest spread "
                f"between seeds of one model)" if band is not None else
                f"### {title} ({NO_BAND})", "",
                "| technique | compared | baseline | with | gain | verdict |",
                "|---|---|---:|---:|---:|---|"]
        out += [f"| {r['technique']} | {r['subject']} | {_pct(r['baseline'])} | {_pct(r['with'])} | "
                f"{_pct(r['gain'], signed=True)} | {r['verdict']}"
                f"{' (' + r['note'] + ')' if r['note'] else ''} |" for r in rows]
    return out
