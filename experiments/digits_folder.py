"""Writes sklearn's bundled digits as an image folder, to try configs/image_folder.py
without data of one's own (README, "Transfer to your own data"):

    python experiments/digits_folder.py --output digits_folder [--train_per_class 40]

ROOT/{train,test}/<zero..nine>/<k>.png (and val/ with --val_per_class), grayscale, RGB and
RGBA files of five sizes (l2t_jax.tools.digits.write_digits_image_folder). Nothing is downloaded.
"""
import argparse
import json

from l2t_jax.tools import digits


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True)
    parser.add_argument("--train_per_class", type=int, default=40)
    parser.add_argument("--test_per_class", type=int, default=30)
    parser.add_argument("--val_per_class", type=int, default=0,
                        help="0: no val/ folder (the config carves one from train)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    counts = digits.write_digits_image_folder(
        args.output, train_per_class=args.train_per_class, test_per_class=args.test_per_class,
        val_per_class=args.val_per_class, seed=args.seed)
    print(json.dumps({"folder": args.output, "images": counts}))


if __name__ == "__main__":
    main()
