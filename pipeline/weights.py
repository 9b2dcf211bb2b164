"""Save an encoder's pretrained hub weights to a file, for machines without internet.

    python pipeline/weights.py ENCODER [--tag imagenet] [--out FILE | --dir DIR]

Run it where the network is (it downloads through smp / timm, e.g. ``resnet50`` or
``tu-convnext_tiny``), then attach the file to the offline machine: either point
``models.<name>.weights`` at it, or put it in a folder as ``<encoder>.<tag>.pth`` (``--dir``
names it so) and set ``train.weights_dir`` to that folder, keeping ``weights: imagenet`` in
the configs. Nothing else in the pipeline downloads unless a config asks for hub weights;
see :mod:`pipeline.models.pretrained`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from pipeline.core.errors import PipelineError, run_cli
from pipeline.models.pretrained import IMAGENET, save_encoder_weights, weights_file_name


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("encoder", help="smp encoder name or tu-<timm model>")
    parser.add_argument("--tag", default=IMAGENET, help="the hub's weights tag (imagenet, ssl, ...)")
    parser.add_argument("--out", default=None, help="the file to write")
    parser.add_argument("--dir", default=None,
                        help="write <dir>/<encoder>.<tag>.pth, the name train.weights_dir looks for")
    args = parser.parse_args(argv)
    if (args.out is None) == (args.dir is None):
        raise PipelineError("give exactly one of --out FILE and --dir DIR")
    out = Path(args.out) if args.out else Path(args.dir) / weights_file_name(args.encoder, args.tag)
    out.parent.mkdir(parents=True, exist_ok=True)
    saved = save_encoder_weights(args.encoder, out=out, tag=args.tag)
    print(f"{out}: {saved['tensors']} tensors of encoder '{args.encoder}' ({args.tag})")
    return saved


if __name__ == "__main__":
    run_cli(main)
