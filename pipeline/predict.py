"""Predict a folder of new images with the fitted ensemble:
``python pipeline/predict.py INPUT_DIR --out OUT_DIR [--bundle FILE] [--zip] [--compare ZIP]``.

Without ``--bundle`` the ensemble comes from the workspace (``--weights``, ``--runs``, ``--data``
classes.json, ``--params``' ``infer.tta`` and ``submit``); with it, from that one file (made by
``pipeline/bundle.py``) alone, from any folder (``--data``, when given, must hold the same
classes). Writes ``OUT_DIR/<image stem>.png`` (train ids), or with ``--zip``
``OUT_DIR/<submit.name>.zip`` in the submission format. ``--compare ZIP`` prints the share of
pixels that agree with an earlier submission zip. How: :mod:`pipeline.ensembling.folder`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from pipeline.core.device import resolve_device
from pipeline.core.errors import PipelineError, run_cli
from pipeline.core.params import DEFAULT_PARAMS
from pipeline.ensembling.folder import predict_images

WORKSPACE = {"weights": "ensemble/weights.json", "runs": "runs", "data": "data",
             "params": DEFAULT_PARAMS}


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input_dir", help="folder of *.png / *.jpg images")
    parser.add_argument("--out", required=True, help="folder of the label PNGs (or of the zip)")
    parser.add_argument("--bundle", default=None, help="a file of pipeline/bundle.py")
    parser.add_argument("--zip", action="store_true", help="write a submission zip instead")
    parser.add_argument("--compare", default=None, help="a submission zip to compare with")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    for key, default in WORKSPACE.items():
        parser.add_argument(f"--{key}", default=None, help=f"default {default} (not with --bundle"
                            + (", except to check its classes)" if key == "data" else ")"))
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    given = [f"--{k}" for k in WORKSPACE if k != "data" and getattr(args, k) is not None]
    if args.bundle and given:
        raise PipelineError(f"{', '.join(given)}: read from the bundle {args.bundle}; drop "
                            f"{'it' if len(given) == 1 else 'them'} or --bundle")
    paths = {k: getattr(args, k) or (None if args.bundle else v) for k, v in WORKSPACE.items()}
    summary = predict_images(input_dir=Path(args.input_dir), out=Path(args.out),
                             device=resolve_device(args.device, key="--device"),
                             bundle=Path(args.bundle) if args.bundle else None,
                             **{k: Path(v) if v else None for k, v in paths.items()},
                             as_zip=args.zip, compare=Path(args.compare) if args.compare else None,
                             progress=not args.no_progress)
    where = summary.get("zip") or f"{summary['out']}/<stem>.png"
    print(f"predicted {summary['images']} image(s) with {summary['runs']} run(s) of "
          f"{len(summary['members'])} member(s), {summary['views']} TTA view(s) -> {where}")
    if summary["compared"]:
        print(f"agreement with {summary['compared']}: {100 * summary['agreement']:.3f}% of "
              f"{summary['compared_pixels']} pixels ({summary['images']} images)")
    return summary


if __name__ == "__main__":
    run_cli(main)
