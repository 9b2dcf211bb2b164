"""Pack the fitted ensemble into one file that predicts new images anywhere:
``python pipeline/bundle.py OUT_FILE``.

The file (a zip: ``bundle.json`` + the runs' checkpoints, byte for byte, with their sha256)
holds every checkpoint the ensemble of ``--weights`` uses, with each member's mix of its runs,
alpha and beta, classes.json, ``infer.tta`` and the ``submit`` format. Predict with it:
``python pipeline/predict.py INPUT_DIR --out OUT_DIR --bundle OUT_FILE``. The format:
:mod:`pipeline.ensembling.bundle`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from pipeline.core.errors import run_cli
from pipeline.core.params import DEFAULT_PARAMS
from pipeline.ensembling.bundle import pack_bundle


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_file", help="the bundle to write, e.g. ensemble.bundle.zip")
    parser.add_argument("--weights", default="ensemble/weights.json")
    parser.add_argument("--runs", default="runs")
    parser.add_argument("--data", default="data", help="folder of classes.json")
    parser.add_argument("--params", default=DEFAULT_PARAMS)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    index = pack_bundle(out=Path(args.out_file), weights=Path(args.weights), runs=Path(args.runs),
                        data=Path(args.data), params=Path(args.params),
                        progress=not args.no_progress)
    runs = [r for m in index["members"].values() for r in m["runs"]]
    groups = "  ".join(f"{g}: {', '.join(n) or '-'}" for g, n in index["groups"].items())
    print(f"wrote {args.out_file}: {len(runs)} checkpoints of {len(index['members'])} member(s), "
          f"{sum(r['bytes'] for r in runs) / 2**20:.1f} MiB")
    print(f"  {groups}  (alpha {index['alpha']:g}, beta {index['beta']:g}); "
          f"{len(index['tta']['scales'])} scale(s), flip {index['tta']['flip']}; "
          f"submit format {index['submit']['format']}")
    return index


if __name__ == "__main__":
    run_cli(main)
