"""Reports a person looks at: the end-of-run summary of the whole chain and its figures.

:func:`build_report` reads what the stages wrote (``runs/``, ``oof_preds/``, ``ensemble/``,
``submissions/``, ``data/``) and writes, as one folder replaced at once:

* ``training_curves.png``  loss and validation mIoU vs iteration, a row per model, a line per run;
* ``class_iou.png``        per-class IoU: best single member (OOF, TTA), ensemble (OOF), test;
* ``confusion_matrix.png`` row-normalised, of the fused OOF prediction (else the best member);
* ``ensemble_heatmap.png`` the ensemble search's grid (copied); ``overlays/<id>.png`` a few
  test frames (the submission's previews, else image | ground truth | prediction);
* ``summary.json`` / ``summary.md`` per member the OOF mIoU of the last and SWA weights (mean of
  the folds' validation scores weighted by their frames: only those scores are stored) and of
  SWA + TTA (pooled confusion matrices), the ensemble table, the test score and the zip.

A missing input skips its part with a one-line note, so partial chains report what exists;
a chain without any training run is an error. Corrupt inputs are errors naming the file.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from pipeline.core import atomic
from pipeline.core.errors import PipelineError
from pipeline.core.names import ALL_FOLDS, ENSEMBLE_ROWS, METRICS_FILE, member_name
from pipeline.data.manifest import (palette_table, read_classes, read_image, read_manifest, read_mask,
                                    read_raw_mask)
from pipeline.ensembling.holdout import TEST_SCORES
from pipeline.evaluation.metrics import iou_per_class, mean_iou
from pipeline.inference.members import list_members
from pipeline.inference.runner import member_summary
from pipeline.reporting.figures import compose_overlay, plot_class_iou, plot_confusion, plot_training_curves
from pipeline.reporting.ledger import MemberScores, build_ledger, ema_scores, format_ledger
from pipeline.reporting.runs import Run, collect_runs, read_json
from pipeline.submission.sidecar import read_sidecar

CURVES, CLASS_IOU, CONFUSION, HEATMAP, OVERLAYS = (
    "training_curves.png", "class_iou.png", "confusion_matrix.png", "ensemble_heatmap.png", "overlays")
SUMMARY_JSON, SUMMARY_MD = "summary.json", "summary.md"
MAX_OVERLAYS = 4


def fold_mean(pairs: list[tuple[float | None, int | None]]) -> tuple[float | None, int]:
    """Mean of the folds' scores weighted by their frame counts (equal weights when a count is
    unknown), over the folds that have a score; returns (mean or None, folds used)."""
    kept = [(s, w) for s, w in pairs if s is not None and np.isfinite(s)]
    if not kept:
        return None, 0
    weights = [w for _, w in kept] if all(w for _, w in kept) else [1] * len(kept)
    return float(np.average([s for s, _ in kept], weights=weights)), len(kept)


def member_rows(runs: list[Run], members: dict) -> list[dict]:
    """One summary row per member (``<model>_s<seed>``): OOF mIoU of last.pt and swa.pt on the
    validation folds, pooled SWA one-view and SWA+TTA from ``members`` ({name: Member})."""
    names = sorted({r.member for r in runs} | set(members))
    rows = []
    for name in names:
        folds = sorted((r for r in runs if r.member == name and r.fold != ALL_FOLDS), key=lambda r: r.fold)
        frames = [(r.metrics or {}).get("val_frames") or (r.infer or {}).get("oof_frames") for r in folds]
        last = [(r.swa or {}).get("last_miou", (r.metrics or {}).get("last_miou")) for r in folds]
        swa = [(r.swa or {}).get("swa_miou") for r in folds]
        row = {"member": name, "folds": [r.fold for r in folds], "family": None, "val_frames": None}
        row["last_mIoU"], row["last_folds"] = fold_mean(list(zip(last, frames)))
        row["swa_mIoU"], row["swa_folds"] = fold_mean(list(zip(swa, frames)))
        # both matrices of every fold: SWA vs last pooled over folds, as the other columns
        cms = [((r.swa or {}).get("last_cm"), (r.swa or {}).get("swa_cm")) for r in folds]
        if folds and all(a is not None and b is not None for a, b in cms):
            row["last_mIoU"] = mean_iou(sum(np.asarray(a, np.int64) for a, _ in cms))
            row["swa_mIoU"] = mean_iou(sum(np.asarray(b, np.int64) for _, b in cms))
            row["swa_source"] = "pooled"
        else:
            row["swa_source"] = "fold mean" if row["swa_folds"] else None
        if all(frames) and frames:
            row["val_frames"] = int(sum(frames))
        if name in members:  # pooled confusion matrices of the stored maps
            member = members[name]
            pooled = member_summary(member)
            row["family"] = member.meta[member.folds[0]].get("family")
            row["swa_single_mIoU"], row["swa_tta_mIoU"] = pooled["oof_miou_single"], pooled["oof_miou_tta"]
            row["tta_folds"] = sum("oof_miou_tta" in f for f in pooled["folds"].values())
            row["tta_source"] = "pooled" if row["swa_tta_mIoU"] is not None else None
        else:  # no maps: the runs' own inference metrics, fold-weighted
            row["swa_single_mIoU"], _ = fold_mean([((r.infer or {}).get("oof_miou_single"), w)
                                                   for r, w in zip(folds, frames)])
            row["swa_tta_mIoU"], row["tta_folds"] = fold_mean([((r.infer or {}).get("oof_miou_tta"), w)
                                                               for r, w in zip(folds, frames)])
            row["tta_source"] = "fold mean" if row["tta_folds"] else None
        # infer.oof_sample: the 1-view and TTA columns are over sampled frames only
        row["oof_sampled"] = (any(m.get("oof_sample") for m in members[name].meta.values())
                              if name in members else any((r.infer or {}).get("oof_sampled") for r in folds))
        rows.append(row)
    return rows


def pooled_cm(member, kind: str = "tta") -> np.ndarray | None:
    """int64 [C, C] sum of a member's per-fold OOF confusion matrices (None without any)."""
    cms = [np.asarray(m[f"oof_cm_{kind}"], np.int64) for m in member.meta.values() if m.get(f"oof_cm_{kind}")]
    return sum(cms) if cms else None


def fused_cm(ensemble_dir: Path, metrics: dict | None) -> np.ndarray | None:
    """Confusion matrix [C, C] of the fused OOF row S_W_A from the search's ``confusion.json``
    ({row: [[...]]}), only when it reproduces ``metrics.json``'s S_W_A_mIoU (stale: ignored)."""
    path = ensemble_dir / "confusion.json"
    if metrics is None or metrics.get("S_W_A_mIoU") is None or not path.is_file():
        return None
    table = read_json(path)
    try:
        cm = np.asarray(table["S_W_A"], dtype=np.int64)
    except (KeyError, ValueError, TypeError) as err:
        raise PipelineError(f"{path}: no usable S_W_A confusion matrix ({type(err).__name__}: "
                            f"{err})") from None
    return cm if cm.ndim == 2 and abs(mean_iou(cm) - metrics["S_W_A_mIoU"]) < 1e-9 else None


# ----------------------------------------------------------------------------- the report
def _class_names(count: int, classes, members: dict) -> list[str]:
    if classes is not None and classes.num_classes == count:
        return list(classes.names)
    for member in members.values():
        names = member.meta[member.folds[0]].get("class_names") or []
        if len(names) == count:
            return list(names)
    return [str(c) for c in range(count)]


def _iou_series(best: str | None, best_cm, fused, evaluation: dict | None, name: str, runs: list[Run],
                rows: list[dict], classes, members: dict) -> tuple[dict[str, np.ndarray], list[str]]:
    """Per-class IoU [C] per source, all of one class count, and the class names."""
    series = {}
    if best_cm is not None:
        series[f"{best} (OOF, TTA): mIoU {100 * mean_iou(best_cm):.2f}"] = iou_per_class(best_cm)
    if fused is not None:
        series[f"ensemble S_W_A (OOF): mIoU {100 * mean_iou(fused):.2f}"] = iou_per_class(fused)
    if evaluation and isinstance(evaluation.get("per_class"), dict):
        per_class = evaluation["per_class"]
        order = list(classes.names) if classes is not None and set(classes.names) == set(per_class) \
            else list(per_class)
        score = "-" if evaluation.get("mIoU") is None else f"{100 * evaluation['mIoU']:.2f}"
        series[f"{name} (test): mIoU {score}"] = np.array([np.nan if (per_class[c] or {}).get("iou") is None
                                             else per_class[c]["iou"] for c in order], dtype=np.float64)
    if not series:  # no maps or scores past training: the best member's last validation
        ranked = [r for r in rows if r["last_mIoU"] is not None]
        top = max(ranked, key=lambda r: r["last_mIoU"])["member"] if ranked else None
        tables = [r.class_iou["per_class_iou"] for r in runs if r.member == top and r.class_iou
                  and isinstance(r.class_iou.get("per_class_iou"), dict)]
        if tables:
            names = list(tables[0])
            series[f"{top} (validation, last.pt)"] = np.nanmean(
                [[np.nan if t.get(c) is None else t[c] for c in names] for t in tables], axis=0)
            return series, names
    count = len(next(iter(series.values()))) if series else 0
    return ({k: v for k, v in series.items() if len(v) == count},
            _class_names(count, classes, members))


def _overlays(out: Path, *, submissions_dir: Path, submission: dict | None, name: str,
              ensemble_dir: Path, data_dir: Path, classes, progress: bool) -> str | None:
    """Copy the submission's previews, else draw image | gt | prediction of a few test frames;
    returns None on success, else why nothing was written."""
    listed = (submission or {}).get("previews") or []
    previews = [submissions_dir / p for p in listed if (submissions_dir / p).is_file()] or sorted(
        (submissions_dir / "previews" / name).glob("*.png"))
    if previews:
        for src in previews[:MAX_OVERLAYS]:
            with atomic.atomic_path(out / src.name) as tmp:
                shutil.copyfile(src, tmp)
        return None
    pred_dir, manifest = ensemble_dir / "test_pred", data_dir / "manifest.csv"
    if not (pred_dir.is_dir() and manifest.is_file() and classes is not None):
        return (f"overlays skipped: no previews in {submissions_dir / 'previews' / name} and no "
                f"{pred_dir} with {manifest} and classes.json")
    frames = sorted((f for f in read_manifest(manifest, split="test")
                     if (pred_dir / f"{f.id}.png").is_file()), key=lambda f: (f.video, f.frame, f.id))
    if not frames:
        return f"overlays skipped: {pred_dir} holds no prediction of a test frame of {manifest}"
    picks = np.unique(np.linspace(0, len(frames) - 1, min(MAX_OVERLAYS, len(frames))).round().astype(int))
    palette, lut = palette_table(classes), classes.lut_array()
    for index in tqdm(picks, desc="overlays", unit="frame", disable=not progress or None):
        frame = frames[index]
        image = read_image(frame.image)
        pred = read_raw_mask(pred_dir / f"{frame.id}.png")
        gt = read_mask(frame.mask, lut) if frame.mask else None
        if pred.shape != image.shape[:2]:
            raise PipelineError(f"{pred_dir / (frame.id + '.png')}: {pred.shape} differs from its "
                                f"image's {image.shape[:2]} (HxW)")
        with atomic.atomic_path(out / f"{frame.id}.png") as tmp:
            Image.fromarray(compose_overlay(image, pred, palette, gt)).save(tmp, format="png")
    return None


def ledger_inputs(rows: list[dict], runs: list[Run], maps: dict, models: dict | None,
                  test_scores: dict | None) -> tuple[dict, dict, dict]:
    """(members, teachers, ensemble) arguments of :func:`pipeline.reporting.ledger.build_ledger` from the
    member rows, the runs and the members' maps ({name: Member}: model and seed of members
    without a run folder), params' ``models:`` (None: unknown) and the ensemble's test scores."""
    model_of = {name: (m.meta[m.folds[0]].get("model"), int(m.meta[m.folds[0]].get("seed") or 0))
                for name, m in maps.items()}
    model_of.update({r.member: (r.model, r.seed) for r in runs})
    test_members = (test_scores or {}).get("members") or {}
    members = {}
    for row in rows:
        name = row["member"]
        model, seed = model_of[name]
        ema_last, ema = ema_scores([r.metrics for r in runs if r.member == name
                                    and r.fold != ALL_FOLDS])
        members[name] = MemberScores(
            model=model, seed=seed,
            oof={"last": row["last_mIoU"], "swa": row["swa_mIoU"],
                 "single": row["swa_single_mIoU"], "tta": row["swa_tta_mIoU"],
                 "ema_last": ema_last, "ema": ema},
            test={k: v for k, v in (test_members.get(name) or {}).items() if v is not None})
    teachers = {}
    for name, m in members.items():
        teacher = ((models or {}).get(m.model) or {}).get("distill", {}).get("teacher")
        if teacher and member_name(teacher, m.seed) in members:
            teachers[name] = member_name(teacher, m.seed)
    return members, teachers, {"test": (test_scores or {}).get("rows") or {}}


def build_report(*, runs_dir: str | Path, oof_dir: str | Path, ensemble_dir: str | Path,
                 submissions_dir: str | Path, data_dir: str | Path, out_dir: str | Path,
                 name: str = "submission", models: dict | None = None,
                 progress: bool = True) -> dict:
    """Write the figures, ``summary.json`` and ``summary.md`` into ``out_dir`` (replaced as a
    whole; an existing folder must be an earlier report) and return the summary dict:
    ``members`` (rows of :func:`member_rows`, mIoU as fractions), ``ensemble``, ``submission``,
    ``ledger`` (:func:`pipeline.reporting.ledger.build_ledger`; ``models`` is params' ``models:`` section,
    which tells students' teachers and the configs that differ in one switch), ``figures``
    (paths relative to ``out_dir``) and ``notes`` (one line per skipped part)."""
    runs_dir, oof_dir, ensemble_dir = Path(runs_dir), Path(oof_dir), Path(ensemble_dir)
    submissions_dir, data_dir, out_dir = Path(submissions_dir), Path(data_dir), Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir())
                                                      and not (out_dir / SUMMARY_JSON).is_file())):
        raise PipelineError(f"{out_dir}: exists and is not a report folder (no {SUMMARY_JSON}); "
                            f"choose another --out")
    runs = collect_runs(runs_dir)
    notes: list[str] = []
    classes_path = data_dir / "classes.json"
    classes = read_classes(classes_path) if classes_path.is_file() else None
    if classes is None:
        notes.append(f"{classes_path}: not found; classes named by index, no drawn overlays")
    members = {}
    if any(oof_dir.glob("*/f*/meta.json")):
        members = {m.name: m for m in list_members(oof_dir)}
    else:
        notes.append(f"{oof_dir}: no member maps; SWA+TTA from runs' infer_metrics.json where present")
    rows = member_rows(runs, members)
    ens_metrics = read_json(ensemble_dir / METRICS_FILE)
    ens_members = read_json(ensemble_dir / "members.json")
    for row in rows:
        row["group"] = ((ens_members or {}).get(row["member"]) or {}).get("group")
    # checked against the zip's bytes: a JSON or a score of another zip is never shown as its
    submission = read_sidecar(submissions_dir / f"{name}.zip") or None
    evaluation = read_json(submissions_dir / f"{name}.zip.eval.json")
    if (evaluation is not None and submission is not None and evaluation.get("sha256")
            and evaluation["sha256"] != submission.get("sha256")):
        notes.append(f"{submissions_dir / (name + '.zip.eval.json')}: scores another zip than "
                     f"{name}.zip (sha256 differs); re-run `python pipeline/evaluate.py`")
        evaluation = None

    scored = {n: cm for n, cm in ((n, pooled_cm(m)) for n, m in members.items()) if cm is not None}
    best = min(scored, key=lambda n: (-np.nan_to_num(mean_iou(scored[n]), nan=-1), n)) if scored else None
    fused = fused_cm(ensemble_dir, ens_metrics)
    figures = []
    with atomic.atomic_dir(out_dir) as tmp:
        if plot_training_curves(tmp / CURVES, runs):
            figures.append(CURVES)
        else:
            notes.append(f"training curves skipped: no DVCLive curves (<run>/dvclive/) under {runs_dir}")
        series, names = _iou_series(best, scored.get(best), fused, evaluation, name, runs, rows,
                                    classes, members)
        if series:
            plot_class_iou(tmp / CLASS_IOU, series, names)
            figures.append(CLASS_IOU)
        else:
            notes.append("per-class IoU skipped: no OOF confusion matrices, test scores or class_iou.json")
        cm = fused if fused is not None else scored.get(best)
        if cm is not None:
            title = "ensemble S_W_A, OOF" if fused is not None else f"{best}, OOF with TTA (pooled folds)"
            plot_confusion(tmp / CONFUSION, cm, _class_names(len(cm), classes, members), title)
            figures.append(CONFUSION)
        else:
            notes.append(f"confusion matrix skipped: no oof_cm_tta in {oof_dir}/*/f*/meta.json")
        if (ensemble_dir / "heatmap.png").is_file():
            with atomic.atomic_path(tmp / HEATMAP) as dst:
                shutil.copyfile(ensemble_dir / "heatmap.png", dst)
            figures.append(HEATMAP)
        else:
            notes.append(f"ensemble heatmap skipped: {ensemble_dir / 'heatmap.png'} not found")
        why = _overlays(tmp / OVERLAYS, submissions_dir=submissions_dir, submission=submission,
                        name=name, ensemble_dir=ensemble_dir, data_dir=data_dir, classes=classes,
                        progress=progress)
        if why:
            notes.append(why)
        else:
            figures += [f"{OVERLAYS}/{p.name}" for p in sorted((tmp / OVERLAYS).iterdir())]

        summary = {"members": rows, "ensemble": None, "submission": None, "figures": figures,
                   "notes": notes}
        if ens_metrics is not None:
            summary["ensemble"] = {
                "rows": {r: {k: ens_metrics.get(f"{r}_{k}") for k in ("mIoU", "mVC8", "mVC16")}
                         for r in ENSEMBLE_ROWS if f"{r}_mIoU" in ens_metrics},
                "alpha": ens_metrics.get("alpha"), "beta": ens_metrics.get("beta"),
                "frames": ens_metrics.get("frames"), "oof_sampled": bool(ens_metrics.get("oof_sampled")),
                "oof_sample": ens_metrics.get("oof_sample")}
        else:
            notes.append(f"ensemble table skipped: {ensemble_dir / METRICS_FILE} not found")
        zip_path = submissions_dir / (submission or {}).get("zip", f"{name}.zip")
        if submission is not None or evaluation is not None:
            summary["submission"] = {
                "name": name, "zip": str(zip_path) if zip_path.is_file() else None,
                "sha256": (submission or {}).get("sha256"), "frames": (submission or {}).get("frames"),
                "format": (submission or {}).get("format"), "oof_mIoU": (submission or {}).get("oof_score"),
                **{f"test_{k}": (evaluation or {}).get(k) for k in ("mIoU", "mVC8", "mVC16")}}
        if submission is None:
            notes.append(f"submission skipped: {submissions_dir / (name + '.json')} not found")
        if evaluation is None:
            notes.append(f"test score skipped: {submissions_dir / (name + '.zip.eval.json')} not found "
                         f"(run `python pipeline/evaluate.py {zip_path}` on labelled test frames)")
        members_in, teachers, ensemble_in = ledger_inputs(
            rows, runs, members, models, read_json(ensemble_dir / TEST_SCORES))
        ensemble_in["oof"] = {r: ens_metrics.get(f"{r}_mIoU") for r in ENSEMBLE_ROWS} \
            if ens_metrics is not None else {}
        summary["ledger"] = build_ledger(members=members_in, models=models, teachers=teachers,
                                         ensemble=ensemble_in)
        atomic.write_json(tmp / SUMMARY_JSON, summary)
        atomic.write_text(tmp / SUMMARY_MD, format_summary(summary))
    return summary


def _pct(value: float | None, used: int | None = None, total: int | None = None) -> str:
    text = "-" if value is None else f"{100 * value:.2f}"
    partial = value is not None and used is not None and used < (total or 0)
    return f"{text} ({used}/{total})" if partial else text


def format_summary(summary: dict) -> str:
    """Markdown of a :func:`build_report` summary (mIoU in %; "(k/n)" where k of n folds count)."""
    out = ["# Run summary", "", "## Members (OOF mIoU %)", "",
           "| member | family | group | folds | last | SWA | SWA 1 view | SWA + TTA |",
           "|---|---|---|---|---:|---:|---:|---:|"]
    for r in summary["members"]:
        n, star = len(r["folds"]), " *" if r.get("oof_sampled") else ""
        out.append(f"| {r['member']} | {r['family'] or '-'} | {r['group'] or '-'} | {n} | "
                   f"{_pct(r['last_mIoU'], r['last_folds'], n)} | {_pct(r['swa_mIoU'], r['swa_folds'], n)} | "
                   f"{_pct(r['swa_single_mIoU'])}{star} | {_pct(r['swa_tta_mIoU'], r['tta_folds'], n)}{star} |")
    out += ["", "last, SWA: the folds' validation mIoU averaged, weighted by their frames. "
            "SWA 1 view, SWA + TTA: the folds' confusion matrices pooled (else a fold mean)"
            + ("; * on the infer.oof_sample frames only, not every validation frame."
               if any(r.get("oof_sampled") for r in summary["members"]) else ".")]
    ens = summary["ensemble"]
    if ens:
        out += ["", f"## Ensemble (OOF, alpha={ens['alpha']}, beta={ens['beta']})", "",
                "| row | mIoU % | mVC8 % | mVC16 % |", "|---|---:|---:|---:|"]
        out += [f"| {row} | {_pct(v['mIoU'])} | {_pct(v['mVC8'])} | {_pct(v['mVC16'])} |"
                for row, v in ens["rows"].items()]
        out += ["", f"Fitted on {ens['frames']} OOF frames" + (
            f", sampled by infer.oof_sample {ens['oof_sample']} (not every train frame)."
            if ens.get("oof_sampled") else " (not sampled).")]
    sub = summary["submission"]
    if sub:
        out += ["", f"## Submission `{sub['name']}`", "", f"- zip: {sub['zip'] or '-'}"
                + (f" (sha256 {sub['sha256'][:16]}..., {sub['frames']} frames, {sub['format']})"
                   if sub["sha256"] else ""),
                f"- test mIoU {_pct(sub['test_mIoU'])} %, mVC8 {_pct(sub['test_mVC8'])} %, "
                f"mVC16 {_pct(sub['test_mVC16'])} %"]
    if summary.get("ledger"):
        out += ["", "## Technique ledger (mIoU %, gain in points, same weights and frames)"]
        out += format_ledger(summary["ledger"])
    out += ["", "## Figures", ""] + [f"- [{f}]({f})" for f in summary["figures"]]
    if summary["notes"]:
        out += ["", "## Skipped", ""] + [f"- {note}" for note in summary["notes"]]
    return "\n".join(out) + "\n"
