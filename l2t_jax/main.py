"""Entry point: ``python -m l2t_jax.main --config=configs/<experiment>.py --workdir=DIR``.

Overrides on the command line: ``--config.T=5 --config.batch_size=64``. A variant after a
colon selects a preset of the config file (``configs/cifar100.py:tiny``).
All logic lives in :func:`l2t_jax.train.train_and_evaluate`, or for a config with
``program = "demo"`` (configs/demo.py) in :func:`l2t_jax.demo.run_demo`.

Exit status: 0 when the run finished; 1 with a one-line message (no traceback) for config
and data errors, a diverged run and a checkpoint that could not be written; 143 (as for a
process ended by SIGTERM) when SIGTERM stopped the run after saving a checkpoint, so that
schedulers and ``l2t_jax.experiments`` treat it as unfinished: the same command resumes.
Several processes (multi-host) start jax's distributed runtime first
(:func:`l2t_jax.parallel.maybe_initialize_distributed`).
"""
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from l2t_jax import demo, parallel, train

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (configs/*.py), optionally file.py:variant.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and "
                               "result.json; an existing one is resumed.")
flags.mark_flags_as_required(["config", "workdir"])


def parse_flags(argv):
    """absl's parser, with config-override mistakes (``--config.lr=3`` for a key that does
    not exist, a value of the wrong type) reported in one line instead of a traceback."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        sys.exit(f"error: {e}\nPass --helpfull for the flags; configs/default.py lists "
                 "every config key.")
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        overrides = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
        valid = ", ".join(sorted(train.default_config().keys()))
        sys.exit(f"error: a config override failed ({type(e).__name__}: {e}); overrides "
                 f"given: {' '.join(overrides) or 'none'}. Valid top-level keys: {valid}")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.INFO)
    try:
        parallel.maybe_initialize_distributed()    # before anything touches a jax backend
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    config = _CONFIG.value
    program = demo.run_demo if config.get("program") == "demo" else train.train_and_evaluate
    try:
        result = program(config, _WORKDIR.value)
    except train.Preempted:          # logged by train; the checkpoint is saved
        sys.exit(train.PREEMPTED_EXIT_CODE)
    except (train.DivergenceError, train.CheckpointError) as e:
        sys.exit(f"error: {e}")
    except (ValueError, FileNotFoundError) as e:   # config and data errors: no traceback
        raise app.UsageError(str(e)) from None
    logging.info("result: %s", result)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
