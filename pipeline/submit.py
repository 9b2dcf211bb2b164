"""Stage: pack the test predictions into a checked, deterministic submission zip.

    python pipeline/submit.py [--pred ensemble/test_pred] [--data data] [--name NAME] [--format F]
                              [--vspw-offset 0|1] [--out submissions] [--weights ensemble/weights.json]
                              [--previews N] [--params params.yaml]

``--pred`` holds one single-channel PNG ``<id>.png`` of train ids per test frame of the manifest
(void 255 is refused: a submission needs a class for every pixel). Writes, from the ``submit:``
section of params.yaml:

* ``<out>/<name>.zip``   entries in the format's layout (:mod:`pipeline.submission.formats`), reopened and
  checked (one entry per test frame, nothing else, sizes, modes and values) before it replaces
  any earlier zip; the same predictions give the same bytes, whatever the files' dates;
* ``<out>/previews/<name>/<id>.png``  image | prediction overlay for a few frames spread over the
  test videos;
* ``<out>/<name>.json``  format, frame count, the zip's sha256, and the ensemble members, weights
  and OOF score copied from ``--weights`` when that file exists.

All three are written to hidden temporaries first (the zip checked, its sha256 taken from the
temporary); only then is the old JSON deleted and the zip, the previews and the JSON moved into
place, in that order. So a failure (a bad prediction, a full disk, a read-only folder: one
``error:`` line) changes nothing, and a kill at any moment leaves either the old pair, or a zip
without a JSON (read as "unknown", rebuilt by the next run), never a zip beside another zip's
JSON; :func:`pipeline.submission.formats.read_sidecar` refuses such a pair made by hand. Temporaries of a
killed run are removed by the next one (:func:`pipeline.core.atomic.remove_stale_tmp`). Outputs that
would overwrite an input (the predictions, manifest, classes, weights or params) are refused.

Score a zip against labelled test frames with ``python pipeline/evaluate.py <out>/<name>.zip``.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from pipeline.core.errors import run_cli
from pipeline.core.params import DEFAULT_PARAMS, load_section
from pipeline.submission.packing import make_submission


@dataclass
class SubmitParams:
    """The ``submit:`` section of params.yaml."""

    name: str = "submission"
    format: str = "auto"        # auto | folder | camvid | cityscapes | vspw
    vspw_offset: int = 0        # vspw only: 0 = train ids 0..123 (official eval), 1 = stored ids 1..124
    previews: int = 4


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="Pack test predictions into a checked submission zip.")
    parser.add_argument("--pred", default="ensemble/test_pred", help="folder of <id>.png train-id maps")
    parser.add_argument("--data", default="data", help="folder of manifest.csv and classes.json")
    parser.add_argument("--name", default=None, help="override submit.name")
    parser.add_argument("--format", default=None, help="override submit.format")
    parser.add_argument("--vspw-offset", type=int, default=None, help="override submit.vspw_offset")
    parser.add_argument("--previews", type=int, default=None, help="override submit.previews")
    parser.add_argument("--out", default="submissions")
    parser.add_argument("--weights", default="ensemble/weights.json",
                        help="ensemble weights copied into the JSON when present")
    parser.add_argument("--params", default=DEFAULT_PARAMS)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    params = load_section(SubmitParams, "submit", args.params, overrides={
        "name": args.name, "format": args.format, "vspw_offset": args.vspw_offset, "previews": args.previews})
    summary = make_submission(pred_dir=args.pred, data=args.data, out_dir=args.out, name=params.name,
                              fmt=params.format, vspw_offset=params.vspw_offset, weights=args.weights,
                              previews=params.previews, progress=not args.no_progress,
                              params=args.params)
    print(f"wrote {Path(args.out) / summary['zip']}: {summary['frames']} frames, format {summary['format']}, "
          f"sha256 {summary['sha256'][:16]}...")
    return summary


if __name__ == "__main__":
    run_cli(main)
