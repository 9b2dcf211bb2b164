"""Scores on a labelled test split: every member and every ensemble row, with the weights the
search fitted out of fold (nothing is fitted here), so the technique ledger can say whether a
gain measured out of fold holds on held-out data.

Challenges hide their test labels, but a local split often has them (the demo's test videos,
CamVid's ``val`` when it is held out). ``ensemble.py --apply`` calls :func:`score_test` after it
writes the submission's label maps; it writes ``<out>/test_scores.json``:

* ``labelled_frames`` / ``test_frames``: how many test frames have masks (0: nothing scored);
* ``members``: {member: {"tta": mIoU}}: a member's test map (the mean of its fold models, as
  ``--apply`` uses it) against the masks;
* ``rows``: the OOF table's rows on test: ``best_single`` (the member best out of fold),
  ``uniform_mean``, ``S``, ``S_W`` (at the OOF ``alpha_S_W``), ``S_W_A`` (the fitted alpha,
  beta), and ``submitted`` (what ``--apply`` wrote: ``S_W_A``, or the best single member after
  a fallback), mIoU as fractions with the standard definition.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from pipeline.core import atomic
from pipeline.core.errors import PipelineError
from pipeline.core.names import BEST_SINGLE, UNIFORM_MEAN
from pipeline.data.manifest import Frame, read_classes, read_manifest, read_mask
from pipeline.ensembling import fusion
from pipeline.ensembling.outputs import MEMBERS, METRICS, WEIGHTS
from pipeline.ensembling.passes import frame_chunks, run_chunks
from pipeline.ensembling.testmaps import member_test, run_of
from pipeline.evaluation.metrics import MIOU_DEFINITION, confusion_matrix, mean_iou
from pipeline.inference.members import Member, list_members

TEST_SCORES = "test_scores.json"
Row = fusion.MeanRow | fusion.FusedRow


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise PipelineError(f"{path}: not found; run `python pipeline/ensemble.py --search` "
                            f"first") from None
    except (OSError, ValueError) as err:
        raise PipelineError(f"{path}: unreadable ({err})") from None
    if not isinstance(data, dict):
        raise PipelineError(f"{path}: expected a JSON object")
    return data


def _row_labels(row: Row, probs: Mapping[str, np.ndarray],
                groups: Mapping[str, Sequence[str]]) -> np.ndarray:
    if isinstance(row, fusion.MeanRow):
        return fusion.group_mean([probs[n] for n in row.members]).argmax(axis=0)
    means = {g: fusion.group_mean([probs[n] for n in groups[g]]) for g in fusion.GROUPS}
    return fusion.fuse_labels(means["S"], means["W"], means["A"], alpha=row.alpha, beta=row.beta)


def _score_chunk(frames: list[Frame], *, members: Mapping[str, Member],
                 mixes: Mapping[str, Mapping], rows: Mapping[str, Row],
                 groups: Mapping[str, Sequence[str]], lut: np.ndarray, num_classes: int,
                 ignore_index: int) -> dict[str, np.ndarray]:
    cms = {key: np.zeros((num_classes, num_classes), np.int64)
           for key in [*(f"member:{n}" for n in members), *rows]}
    for frame in frames:
        gt = read_mask(frame.mask, lut)
        probs = {n: member_test(m, frame.id, mixes[n]) for n, m in members.items()}
        for name, p in probs.items():
            if p.shape[1:] != gt.shape:
                raise PipelineError(f"{members[name].root}: test map of frame '{frame.id}' is "
                                    f"{list(p.shape[1:])} (HxW), its mask {list(gt.shape)}")
        labels = {f"member:{n}": p.argmax(axis=0) for n, p in probs.items()}
        labels.update({key: _row_labels(row, probs, groups) for key, row in rows.items()})
        for key, lab in labels.items():
            cms[key] += confusion_matrix(gt, lab.astype(np.uint8 if num_classes <= 256 else np.int64),
                                         num_classes=num_classes, ignore_index=ignore_index)
    return cms


def score_test(*, oof_root: Path, data_dir: Path, out_dir: Path, workers: int = 1,
               chunk_frames: int = 32, progress: bool = True) -> dict:
    """Score every member and row of the search on the labelled test frames; write and return
    ``<out_dir>/test_scores.json`` (see the module docstring)."""
    weights = _read(out_dir / WEIGHTS)
    metrics = _read(out_dir / METRICS)
    table = _read(out_dir / MEMBERS)
    classes = read_classes(data_dir / "classes.json")
    frames = sorted(read_manifest(data_dir / "manifest.csv", split="test"),
                    key=lambda f: (f.video, f.frame, f.id))
    labelled = [f for f in frames if f.mask]
    result = {"miou_definition": MIOU_DEFINITION, "labelled_frames": len(labelled),
              "test_frames": len(frames), "members": {}, "rows": {}}
    if labelled:
        names = sorted(table)
        members = {m.name: m for m in list_members(oof_root, names)}
        mixes = {n: {run_of(k): float(v) for k, v in (table[n].get("test_weights") or {}).items()}
                 for n in names}
        fused = weights.get("fused") or {"groups": weights["groups"], "alpha": weights["alpha"],
                                         "beta": weights["beta"]}
        best = (weights.get(BEST_SINGLE) or {}).get("member") or max(
            names, key=lambda n: (table[n].get("oof_mIoU") or -1.0, n))
        rows: dict[str, Row] = {
            BEST_SINGLE: fusion.MeanRow((best,)), UNIFORM_MEAN: fusion.MeanRow(tuple(names)),
            "S": fusion.FusedRow(0.0, 0.0),
            "S_W": fusion.FusedRow(float(metrics.get("alpha_S_W") or 0.0), 0.0),
            "S_W_A": fusion.FusedRow(float(fused["alpha"]), float(fused["beta"]))}
        rows["submitted"] = rows[BEST_SINGLE] if weights.get("fallback") else rows["S_W_A"]
        fn = functools.partial(_score_chunk, members=members, mixes=mixes, rows=rows,
                               groups=fused["groups"], lut=classes.lut_array(),
                               num_classes=classes.num_classes, ignore_index=classes.ignore_index)
        total: dict[str, np.ndarray] = {}
        for cms in run_chunks(fn, frame_chunks(labelled, chunk_frames),
                              workers=workers, progress=progress, desc="score test"):
            for key, cm in cms.items():
                total[key] = total.get(key, 0) + cm
        result["members"] = {n: {"tta": mean_iou(total[f"member:{n}"])} for n in names}
        result["rows"] = {key: mean_iou(total[key]) for key in rows}
    atomic.write_json(out_dir / TEST_SCORES, result)
    return result
