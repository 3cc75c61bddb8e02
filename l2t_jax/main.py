"""Entry point of the training program: ``python -m l2t_jax.main --config=... --workdir=...``.

The training program (configs, data pipelines, the loop, checkpoints) is issue 4 and is not
written yet; this module says so instead of pretending to train.
"""
import sys


def main(argv=None) -> int:
    print("l2t_jax.main: not yet. The training program (configs/, data, training loop, "
          "checkpoints) is issue 4 and has not landed. What exists now is the core: see "
          "README.md ('What exists now') and `python -m l2t_jax.bench`.", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
