"""Entry point: ``python -m l2t_jax.main --config=cifar100 --workdir=DIR``.

``--config`` is a config file (``configs/cifar100.py`` in a checkout) or the name of one
shipped in :mod:`l2t_jax.configs` (``cifar100``, from any directory and any install). A
variant after a colon selects a preset (``cifar100:tiny``); overrides follow as
``--config.T=5 --config.batch_size=64``. ``--help`` lists the shipped configs and their
variants (:func:`usage`), ``--show_config`` prints the config and exits, and
``--log_libraries`` adds the libraries' INFO lines (orbax, absl, jax) to the program's own.
A mistake on the command line is one line naming it and the fix (:func:`parse_flags`).

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
import difflib
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

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "A config file (configs/*.py) or a shipped config's name (cifar100), "
    "optionally with :variant.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and "
                               "result.json; an existing one is resumed.")
_SHOW_CONFIG = flags.DEFINE_bool("show_config", False, "Print the config (every key, with "
                                 "the overrides) and exit; no --workdir needed.")
_LOG_LIBRARIES = flags.DEFINE_bool("log_libraries", False, "Also print the libraries' INFO "
                                   "lines (orbax, absl, jax); by default only warnings.")
_COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache", None, "jax's persistent compilation cache, shared by all runs: a "
    "directory, or 'off'; default ~/.cache/l2t_jax/xla (JAX_COMPILATION_CACHE_DIR wins).")
flags.mark_flags_as_required(["config"])

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


HELP_FLAGS = ("-h", "--help", "-help", "-?", "--helpshort", "-helpshort")


def usage() -> str:
    """What ``--help`` prints before the flags: the command, and the shipped configs with
    their variants (each config module's ``VARIANTS``) and what each trains."""
    lines = ["Trains a target network with L2T-ww or a baseline, and evaluates it.", "",
             "  python -m l2t_jax.main --config=NAME[:VARIANT] --workdir=DIR "
             "[--config.KEY=VALUE ...]", "",
             "NAME is a shipped config (below) or a config file (path/to/file.py, with",
             "get_config(variant=None)); variants join with commas (stl10:plus_resnet20,tiny).",
             "An existing DIR is resumed. --show_config prints the config's keys and values.",
             "", "Shipped configs:"]
    for name in configs.names():
        variants = configs.variants(name)
        listed = ", ".join(variants) if variants else f"see l2t_jax/configs/{name}.py"
        lines += [f"  {name} (variants: {listed})", f"      {configs.summary(name)}"]
    return "\n".join(lines) + "\n"


def _config_spec(argv: list[str]) -> str | None:
    """The ``--config`` value of ``argv``, or None."""
    for i, arg in enumerate(argv):
        match = re.match(r"^--?config=(.*)$", arg)
        if match:
            return match.group(1)
        if arg in ("--config", "-config") and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _overridden_keys(argv: list[str]) -> list[str]:
    """The dotted keys of ``--config.KEY=VALUE`` (or ``--config.KEY VALUE``) overrides."""
    found = []
    for arg in argv:
        match = re.match(r"^--?config\.([^=]+)", arg)
        if match:
            found.append(match.group(1))
    return found


def _shown(spec: str) -> str:
    """A resolved ``--config`` value as the user would write it: a shipped config by name
    (``cifar100:tiny``), a file as its path."""
    path, colon, variant = spec.partition(":")
    if os.path.dirname(os.path.abspath(path)) == configs.CONFIG_DIR:
        return os.path.basename(path)[:-3] + colon + variant
    return spec


def _nearest(word: str, keys: list[str], most: int = 3) -> list[str]:
    """The keys a mistyped ``word`` most likely meant: those whose words' initials spell it
    (``lr`` -> ``learning_rate``), then difflib's closest spellings."""
    initials = [k for k in keys if "_" in k and "".join(w[:1] for w in k.split("_")) == word]
    close = difflib.get_close_matches(word, keys, n=most, cutoff=0.6)
    return list(dict.fromkeys(initials + close))[:most]


def _unknown_key(config, key: str) -> str | None:
    """None when the dotted ``key`` exists in ``config``; else what is wrong with it, with
    the nearest existing keys (difflib) at the level where it breaks off."""
    node, walked = config, []
    for part in key.split("."):
        if not hasattr(node, "keys"):
            return (f"{'.'.join(walked)} is a value ({type(node).__name__}), not a group "
                    f"of keys, so there is no key {key}")
        if part not in node.keys():
            prefix = "".join(f"{p}." for p in walked)
            close = [prefix + k for k in _nearest(part, list(node.keys()))]
            hint = f"; did you mean {' or '.join(close)}?" if close else ""
            return f"unknown key {prefix}{part}{hint}"
        node, walked = node[part], walked + [part]
    return None


def _explain_config_failure(argv: list[str], error: Exception) -> str:
    """One line for a config that failed to load or to take its overrides: a file without
    ``get_config``; an override of a key that the config given (not the defaults) lacks,
    with the nearest keys; else the error itself."""
    spec = _config_spec(argv)
    if spec is None:
        return f"{type(error).__name__}: {error}"
    try:
        config = configs.load(spec)
    except (configs.ConfigFileError, FileNotFoundError) as e:
        return str(e)
    except Exception:  # noqa: BLE001 - the config's own failure: reported as it came below
        config = None
    if config is not None:
        for key in _overridden_keys(argv):
            problem = _unknown_key(config, key)
            if problem:
                return (f"{problem} (--config={_shown(spec)}; add --show_config to list "
                        "its keys)")
    return f"--config={_shown(spec)}: {type(error).__name__}: {error}"


def parse_flags(argv):
    """absl's parser, with every mistake in one line instead of a traceback or absl's usage
    text: an unknown config name, a bad variant, a config file without ``get_config``, an
    override of a key that does not exist (with the nearest keys), a value of the wrong
    type. ``--help`` prints :func:`usage` and the flags."""
    if any(arg in HELP_FLAGS for arg in argv[1:]):
        sys.stdout.write(usage() + "\nflags:\n" + flags.FLAGS.main_module_help() + "\n")
        sys.exit(0)
    try:
        resolved = _resolve_config_arguments(argv)
    except FileNotFoundError as e:
        sys.exit(f"error: {e}")
    try:
        return flags.FLAGS(resolved)
    except flags.Error as e:
        spec = _config_spec(resolved)
        line = _last_line(e).replace(spec, _shown(spec)) if spec else _last_line(e)
        sys.exit(f"error: {line}\nPass --help for the configs and flags.")
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        sys.exit(f"error: {_explain_config_failure(resolved, e)}")


def main(argv):
    if len(argv) > 1:
        sys.exit(f"error: unexpected arguments {argv[1:]}; flags are --config, --workdir "
                 "and --config.KEY=VALUE overrides")
    # absl's own -v/--verbosity, when given, sets the libraries' level instead.
    logs.configure(log_libraries=_LOG_LIBRARIES.value,
                   keep_library_level=flags.FLAGS["verbosity"].present > 0)
    config = _CONFIG.value
    if _SHOW_CONFIG.value:
        print(config)
        return
    if not _WORKDIR.value:
        sys.exit("error: --workdir is required: the run's directory (checkpoints, metrics, "
                 "result.json); an existing one is resumed")
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
