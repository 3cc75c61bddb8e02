"""Entry point: ``python -m l2t_jax.main --config=cifar100 --workdir=DIR``.

``--config`` is a config file (``configs/cifar100.py`` in a checkout) or the name of one
shipped in :mod:`l2t_jax.configs` (``cifar100``, from any directory and any install). A
variant after a colon selects a preset (``cifar100:tiny``); overrides follow as
``--config.T=5 --config.batch_size=64``. ``--log_libraries`` adds the libraries' INFO lines
(orbax, absl, jax) to the program's own.

All logic lives in :func:`l2t_jax.training.train.train_and_evaluate`, or for a config with
a ``program`` key in the experiment tool it names (:data:`PROGRAMS`: ``demo``,
configs/demo.py; ``study``, configs/study.py), imported only then.

Exit status: 0 when the run finished; 1 with a one-line message (no traceback) for config
and data errors, a missing optional dependency, a diverged run, a checkpoint or a file of
the run (metrics, results, pictures) that could not be written, and in a multi-process run
a failed or unreachable process (named); 143 (as for a process ended by SIGTERM) when
SIGTERM stopped the run after saving a checkpoint, so that schedulers and
:mod:`l2t_jax.tools.runner` treat it as unfinished: the same command resumes; 130 likewise after
Ctrl-C (SIGINT). Several processes (multi-host) start jax's distributed runtime first
(:func:`l2t_jax.training.parallel.maybe_initialize_distributed`), with the config's timeouts.
"""
import importlib
import os
import re
import sys
import traceback

import jax

from absl import app, flags
from ml_collections import config_flags

from l2t_jax import configs
from l2t_jax.training import (checkpoints, compile_cache, converted, logs, parallel, stopping,
                              train)
from l2t_jax.training import workdir as workdir_files
from l2t_jax.training.config import default_config

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "A config file (configs/*.py) or a shipped config's name (cifar100), "
    "optionally with :variant.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and "
                               "result.json; an existing one is resumed.")
_LOG_LIBRARIES = flags.DEFINE_bool("log_libraries", False, "Also print the libraries' INFO "
                                   "lines (orbax, absl, jax); by default only warnings.")
_COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache", None, "jax's persistent compilation cache, shared by all runs: a "
    "directory, or 'off'; default ~/.cache/l2t_jax/xla (JAX_COMPILATION_CACHE_DIR wins).")
flags.mark_flags_as_required(["config", "workdir"])

# Programs other than one training run, by the config's ``program`` key: experiment tools,
# which sit above the library, so they are imported only when a config names them.
PROGRAMS = {"demo": "l2t_jax.tools.demo:run_demo", "study": "l2t_jax.tools.study:run_study"}


def program_of(config):
    """The function that runs ``config``: ``train_and_evaluate`` for a training run, else
    the tool of :data:`PROGRAMS` its ``program`` key names."""
    name = config.get("program")
    if not name:
        return train.train_and_evaluate
    if name not in PROGRAMS:
        raise ValueError(f"config.program={name!r}; valid: {', '.join(PROGRAMS)}")
    module, _, function = PROGRAMS[name].partition(":")
    return getattr(importlib.import_module(module), function)


def _resolve_config_arguments(argv: list[str]) -> list[str]:
    """``--config=NAME`` (or ``--config NAME``, ``-config``, also inside a ``--flagfile``)
    with NAME a shipped config -> its path."""
    argv = flags.FLAGS.read_flags_from_files(list(argv), force_gnu=False)
    for i, arg in enumerate(argv):
        match = re.match(r"^(--?config=)(.*)$", arg)
        if match:
            argv[i] = match.group(1) + configs.resolve(match.group(2))
        elif arg in ("--config", "-config") and i + 1 < len(argv):
            argv[i + 1] = configs.resolve(argv[i + 1])
    return argv


def _last_line(error: Exception) -> str:
    """ml_collections reports an error raised inside ``get_config`` as the flag's message
    followed by the whole traceback; the last line is the error itself."""
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    if "Traceback" not in str(error) or not lines:
        return str(error)
    flag = lines[0].split(": Error whilst parsing config file")[0]
    return f"{flag}: {lines[-1]}"


def parse_flags(argv):
    """absl's parser, with every mistake in one line instead of a traceback or absl's usage
    text: an unknown config name, a bad variant, an override of a key that does not exist,
    a value of the wrong type."""
    try:
        return flags.FLAGS(_resolve_config_arguments(argv))
    except FileNotFoundError as e:
        sys.exit(f"error: {e}")
    except flags.Error as e:
        sys.exit(f"error: {_last_line(e)}\nPass --helpfull for the flags; "
                 "l2t_jax/configs/default.py lists every config key.")
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        overrides = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
        valid = ", ".join(sorted(default_config().keys()))
        sys.exit(f"error: a config override failed ({type(e).__name__}: {e}); overrides "
                 f"given: {' '.join(overrides) or 'none'}. Valid top-level keys: {valid}")


def main(argv):
    if len(argv) > 1:
        sys.exit(f"error: unexpected arguments {argv[1:]}; flags are --config, --workdir "
                 "and --config.KEY=VALUE overrides")
    # absl's own -v/--verbosity, when given, sets the libraries' level instead.
    logs.configure(log_libraries=_LOG_LIBRARIES.value,
                   keep_library_level=flags.FLAGS["verbosity"].present > 0)
    config = _CONFIG.value
    try:   # before anything touches a jax backend
        parallel.maybe_initialize_distributed(
            timeouts=parallel.DistributedTimeouts.from_config(config))
    except ValueError as e:
        sys.exit(f"error: {e}")
    compile_cache.enable(_COMPILATION_CACHE.value)
    try:
        program_of(config)(config, _WORKDIR.value)
    except stopping.Preempted as e:  # logged by train; the checkpoint is saved
        sys.exit(e.exit_code)
    except KeyboardInterrupt:        # Ctrl-C outside the training loop (start-up, the end)
        print("interrupted (Ctrl-C); run the same command again to resume", file=sys.stderr)
        sys.exit(stopping.INTERRUPTED_EXIT_CODE)
    # Config and data errors, a diverged run, files that could not be written, and torch
    # missing to read a .pth file: the message names the problem and the fix, a traceback
    # would not.
    except (train.DivergenceError, checkpoints.CheckpointError, workdir_files.RunFileError,
            ValueError, FileNotFoundError, converted.TorchMissingError) as e:
        _fail(_peer_failure(e, config) or f"error: {e}", e)
    except Exception as e:
        if jax.process_count() == 1:
            raise
        peer = _peer_failure(e, config)
        if peer is None:
            traceback.print_exc()
        _fail(peer or f"error: process {jax.process_index()} failed", e)


def _peer_failure(error: Exception, config) -> str | None:
    """With several processes, a collective that failed (in the step, or inside an orbax
    save: a CheckpointError) because another process died names no process:
    ``error: process 1 of 2 stopped ...`` when that is the cause, else None."""
    if jax.process_count() == 1:
        return None
    cause = error
    while cause is not None and not isinstance(cause, jax.errors.JaxRuntimeError):
        cause = cause.__cause__ or cause.__context__
    if cause is None:
        return None
    peer = parallel.describe_peer_failure(
        cause, parallel.DistributedTimeouts.from_config(config).heartbeat_s)
    return parallel.peer_failure_line(peer) if peer else None


def _fail(line: str, error: Exception) -> None:
    """Exits with status 1 and ``line``. One of several processes first reports the
    failure to the others (they stop, naming this process: parallel.report_failure), then
    exits without jax's shutdown barrier, where it would wait for them up to
    config.distributed_shutdown_timeout_s."""
    if jax.process_count() == 1:
        sys.exit(line)
    parallel.report_failure(error)
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
    os._exit(1)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
