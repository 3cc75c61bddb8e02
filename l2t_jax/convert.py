"""Convert a PyTorch checkpoint (the authors' or torchvision's layout) to a Flax source.

    python -m l2t_jax.convert --model resnet32 \\
        --checkpoint tinyimagenet-200-resnet32.pth.tar --output DIR

Needs torch (the ``[convert]`` extra). The keys are mapped by the model family's rules
(:mod:`l2t_jax.models.torch_layout`), strictly: a missing, unexpected or mis-shaped key is
an error naming it. The output is the converted format of
:mod:`l2t_jax.training.converted`, which ``config.source_checkpoint`` reads.
"""
from __future__ import annotations

import argparse
import json
import os

from l2t_jax import models
from l2t_jax.training import converted


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m l2t_jax.convert",
        description="Convert a PyTorch checkpoint (reference layout) to a Flax checkpoint.")
    parser.add_argument("--model", required=True, choices=models.model_names())
    parser.add_argument("--checkpoint", required=True, help="the .pth / .pth.tar file")
    parser.add_argument("--output", required=True, help="directory to write (must not exist)")
    parser.add_argument("--num_classes", type=int, default=None,
                        help="default: the checkpoint's num_classes, else the classifier size")
    parser.add_argument("--source_dataset", default=None,
                        help="recorded in the metadata, e.g. tinyimagenet or imagenet")
    parser.add_argument("--allow_pickle", action="store_true",
                        help="read a file that needs full unpickling (it can run code: only "
                             "for files you trust); by default only tensors and numbers")
    args = parser.parse_args(argv)
    if os.path.exists(args.output):
        parser.error(f"--output {args.output!r} exists; choose a new directory")
    try:
        metadata = converted.convert_checkpoint(args.model, args.checkpoint, args.output,
                                      args.num_classes, args.source_dataset,
                                      args.allow_pickle)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    print(json.dumps(metadata, indent=1))


if __name__ == "__main__":
    main()
