"""Stage `prepare`: list a dataset with its adapter, check every frame, write the manifest.

    python pipeline/prepare.py [--dataset NAME] [--root PATH] [--out DIR] [--params params.yaml]

What it writes and guarantees: :mod:`pipeline.data.preparation`.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Sequence

from pipeline.core.errors import run_cli
from pipeline.core.params import DEFAULT_PARAMS, load_section
from pipeline.data.adapters import ADAPTERS, get_adapter, parse_options
from pipeline.data.preparation import PrepareResult, prepare_dataset, summary_text


@dataclass
class PrepareParams:
    """``prepare:`` in params.yaml; the nested sections are each adapter's options."""

    dataset: str = "demo"
    root: str = ""
    out: str = "data"
    workers: int = 2
    demo: dict = field(default_factory=dict)
    folder: dict = field(default_factory=dict)
    rle_csv: dict = field(default_factory=dict)
    camvid: dict = field(default_factory=dict)
    cityscapes: dict = field(default_factory=dict)
    vspw: dict = field(default_factory=dict)


def main(argv: Sequence[str] | None = None) -> PrepareResult:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", help=f"one of: {', '.join(ADAPTERS)}")
    parser.add_argument("--root", help="dataset root folder (unused by demo)")
    parser.add_argument("--out", help="output folder (manifest.csv, classes.json, class_counts.npz)")
    parser.add_argument("--workers", type=int, help="processes that check images and masks")
    parser.add_argument("--params", default=DEFAULT_PARAMS)
    args = parser.parse_args(argv)
    params = load_section(PrepareParams, "prepare", args.params, overrides={
        "dataset": args.dataset, "root": args.root, "out": args.out, "workers": args.workers})
    get_adapter(params.dataset)  # an unknown name is reported before any section typo
    # Every adapter's section is validated, so a typo in an unused one is caught too.
    options = {name: parse_options(name, getattr(params, name), source=args.params) for name in ADAPTERS}
    result = prepare_dataset(dataset=params.dataset, root=params.root, out=params.out,
                             options=options[params.dataset], workers=max(1, params.workers))
    print(summary_text(result))
    return result


if __name__ == "__main__":
    run_cli(main)
