"""The one runner for grids of training runs: the demo's, the study's and the paper's tables.

A grid is a list of :class:`Run`: its directory under the grid's root, its training config
(for runs made in this process) and the one shell command that makes it alone. One
directory scheme names every run (:func:`run_directory`)::

    <root>/[<context>/...]<method[-scheme]>/epc<k | _all>/[<key=value_...>/]seed<s>

the context being what the grid varies besides the method (the paper's tables: table and
target; the study: the source; the demo: nothing), and the settings a run changes from its
grid's recipe. Seeds of one setting are siblings, which is how the summaries and pictures
group them.

:func:`run_grid` works through a grid: finished runs (those with ``result.json``,
:func:`l2t_jax.training.workdir.is_finished`) are skipped, so the same call resumes an
interrupted grid; ``only`` keeps the run of one directory, ``shard='i/n'`` every n-th run
from the i-th (one process per core); ``dry_run`` prints the commands of the unfinished
runs and makes none. It logs "run k of N, elapsed, ETA" lines (:class:`GridProgress`) and
each run's test accuracy. Runs are made in this process (:func:`in_process`) or as
``python -m l2t_jax.main`` subprocesses (:func:`as_subprocess`), as the caller chooses.

A run of the demo or the study is made alone by its program with a filter
(:func:`program_command`: ``--config=study --workdir=W --config.only=<run directory>``):
the program prepares what its runs share (the data, the pre-trained sources) and builds the
run's config, which a command line of the training program could not. A run of the paper's
tables is an ordinary ``python -m l2t_jax.main --config=<target> --workdir=<run directory>``.

Nothing here imports JAX until a run is made in this process (:func:`in_process`,
:func:`run_once`).
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import os
import shlex
import subprocess
import sys
import time
from typing import Any, Callable, Sequence

import ml_collections

from l2t_jax.training import logs, workdir as workdir_files

logger = logging.getLogger(__name__)

# Keys of a program's config that choose which runs a process makes, not what a run is:
# no run's command repeats them.
SELECTION_KEYS = ("only", "shard", "dry_run")


@dataclasses.dataclass(frozen=True)
class Run:
    """One run of a grid.

    ``directory`` is relative to the grid's root (:func:`run_directory`); ``command`` the
    argv that makes this run alone (``("python", "-m", "l2t_jax.main", ...)``, printed by a
    dry run, executed by :func:`as_subprocess`); ``label`` names it in progress lines;
    ``build_config`` returns its training config (called by :func:`in_process` when the run
    starts, as it may need what the program prepared first), None for runs made as
    subprocesses.
    """

    directory: str
    command: tuple[str, ...]
    label: str
    build_config: Callable[[], ml_collections.ConfigDict] | None = dataclasses.field(
        default=None, compare=False)

    def command_line(self) -> str:
        """``command`` as one shell line."""
        return shlex.join(self.command)


def run_directory(entry: str, examples_per_class: int, seed: int, context: Sequence[str] = (),
                  settings: Sequence[tuple[str, Any]] = ()) -> str:
    """The directory of a run under its grid's root (module docstring).

    Args:
      entry: ``method[:scheme]`` (``fm:one_to_one`` -> ``fm-one_to_one``).
      examples_per_class: labelled images per class; 0 is the whole training set
        (``epc_all``).
      seed: the run's seed.
      context: leading directories, e.g. ``("main", "stl10")``.
      settings: (key, value) pairs the run changes from its grid's recipe, in this order
        (floats as ``%g``): ``learning_rate=0.02_meta_update_every=2``.
    """
    epc = f"epc{examples_per_class}" if examples_per_class else "epc_all"
    tag = "_".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in settings)
    return os.path.join(*context, entry.replace(":", "-"), epc, *([tag] if tag else []),
                        f"seed{seed}")


# ---------------------------------------------------------------------------- commands
def main_command(*args: str) -> tuple[str, ...]:
    """``python -m l2t_jax.main ARGS``."""
    return ("python", "-m", "l2t_jax.main", *args)


def override_flags(config: ml_collections.ConfigDict, defaults: ml_collections.ConfigDict,
                   skip: Sequence[str] = ()) -> list[str]:
    """``--config.KEY=VALUE`` flags that turn ``defaults`` into ``config``: one per leaf
    (nested keys dotted, ``--config.source_specs.demo_resnet20.widths=(8, 16, 32)``) whose
    value differs, in key order; top-level keys in ``skip`` left out. Values as the
    config flag parses them back: strings as they are, everything else as Python
    literals."""
    flags = []

    def visit(value, default, prefix):
        if isinstance(value, ml_collections.ConfigDict):
            for key in value.keys():
                if not prefix and key in skip:
                    continue
                inner = default.get(key) if isinstance(default, ml_collections.ConfigDict) \
                    else None
                visit(value[key], inner, f"{prefix}{key}.")
        elif value != default:
            text = value if isinstance(value, str) else _literal(value)
            flags.append(f"--config.{prefix[:-1]}={text}")

    visit(config, defaults, "")
    return flags


def _literal(value) -> str:
    """A Python literal of ``value`` with strings in double quotes, which a shell line
    quotes more readably than ``repr``'s single ones: ``("fm:one_to_one",)``."""
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, tuple):
        inner = ", ".join(_literal(v) for v in value)
        return f"({inner},)" if len(value) == 1 else f"({inner})"
    if isinstance(value, list):
        return "[" + ", ".join(_literal(v) for v in value) + "]"
    return repr(value)


def program_command(config: ml_collections.ConfigDict, workdir: str,
                    directory: str) -> tuple[str, ...]:
    """The command that makes run ``directory`` of a program's grid (the demo's, the
    study's) alone: the program's shipped config (``config.program``, with
    ``config.variant``), ``config``'s overrides of it (:func:`override_flags`), and
    ``--config.only=DIRECTORY``, which the program hands to :func:`run_grid`."""
    module = importlib.import_module(f"l2t_jax.configs.{config.program}")
    defaults = module.get_config(config.variant or None)
    spec = config.program + (f":{config.variant}" if config.variant else "")
    return main_command(f"--config={spec}", f"--workdir={workdir}",
                        *override_flags(config, defaults, skip=SELECTION_KEYS),
                        f"--config.only={directory}")


# ----------------------------------------------------------------------------- progress
class GridProgress:
    """Progress of a grid of runs: ``run 3/18 (fm, 5 per class, seed 2) | elapsed 4 min 10 s,
    ETA 20 min 50 s``.

    The ETA is the mean time of the runs that ran in this call times the runs left; runs
    skipped because they had finished earlier count as done and take no time.
    """

    def __init__(self, total: int):
        self.total = total
        self.started = time.time()
        self.ran = 0          # runs that ran (not skipped) and finished in this call
        self.done = 0         # runs finished or skipped

    def finished(self, skipped: bool = False) -> None:
        """Marks one run as done (``skipped``: it had finished before this call)."""
        self.done += 1
        self.ran += 0 if skipped else 1

    def line(self, index: int, what: str) -> str:
        """The line to print before run ``index`` (1-based) of the grid starts."""
        elapsed = time.time() - self.started
        text = f"run {index}/{self.total} ({what}) | elapsed {logs.duration(elapsed)}"
        if self.ran:
            left = self.total - self.done
            text += f", ETA {logs.duration(elapsed / self.ran * left)}"
        return text


# ------------------------------------------------------------------------ making runs
def run_once(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """``workdir``'s result: read when the run had finished, else made by the training
    program in this process (:func:`l2t_jax.training.train.train_and_evaluate`)."""
    if workdir_files.is_finished(workdir):
        return read_result(workdir)
    from l2t_jax.training import train
    return train.train_and_evaluate(config, workdir)


def read_result(workdir: str) -> dict:
    """A finished run's ``result.json``."""
    return workdir_files.read_json(workdir_files.path(workdir, workdir_files.RESULT))


def in_process(run: Run, workdir: str) -> int:
    """Makes ``run`` with the training program in this process; its errors propagate (the
    entry point turns them into exit codes)."""
    if run.build_config is None:
        raise ValueError(f"run {run.directory} has no config to run in this process")
    from l2t_jax.training import train
    train.train_and_evaluate(run.build_config(), workdir)
    return 0


def as_subprocess(run: Run, workdir: str) -> int:
    """Makes ``run`` by its command with this interpreter; returns the exit code."""
    del workdir    # named by the command
    return subprocess.run([sys.executable, *run.command[1:]], check=False).returncode


class GridError(RuntimeError):
    """A run of :func:`run_grid` failed; the message says which and how to continue."""


def select(runs: Sequence[Run], only: str = "", shard: str = "") -> list[Run]:
    """The runs a process makes: the one of directory ``only`` (if given), then every n-th
    from the i-th for ``shard='i/n'`` (if given).

    Raises:
      ValueError: ``only`` is no run's directory, or ``shard`` is not ``'i/n'`` with
        0 <= i < n.
    """
    runs = list(runs)
    if only:
        chosen = [run for run in runs
                  if os.path.normpath(run.directory) == os.path.normpath(only)]
        if not chosen:
            example = f", e.g. {runs[0].directory}" if runs else ""
            raise ValueError(f"only={only!r} is not the directory of a run of this grid "
                             f"(relative to the grid's root{example})")
        runs = chosen
    if shard:
        try:
            index, count = (int(part) for part in shard.split("/"))
            if not 0 <= index < count:
                raise ValueError
        except ValueError:
            raise ValueError(f"shard={shard!r}: expected 'i/n' with 0 <= i < n") from None
        runs = runs[index::count]
    return runs


def run_grid(runs: Sequence[Run], root: str, *, execute: Callable[[Run, str], int] = in_process,
             dry_run: bool = False, only: str = "", shard: str = "") -> dict[str, list[Run]]:
    """Makes the unfinished runs of ``runs`` (after :func:`select`) one after another.

    Args:
      runs: the grid, in run order.
      root: the grid's root; run ``r`` lives in ``root/r.directory``.
      execute: ``execute(run, workdir) -> exit code``: :func:`in_process` or
        :func:`as_subprocess` (tests pass a fake).
      dry_run: print the command of each unfinished run on stdout (the skipped ones are
        logged, not printed, so stdout can go straight to a cluster's job list) and make
        none.
      only, shard: :func:`select`.

    Returns:
      ``{"skipped": [...], "ran": [...], "pending": [...]}`` (pending: the dry run's).

    Raises:
      GridError: on the first run whose ``execute`` returns a non-zero exit code. Finished
      runs are left alone; the same call again skips them and resumes the failed run from
      its last checkpoint. Errors ``execute`` raises propagate as they are.
    """
    runs = select(runs, only, shard)
    outcome: dict[str, list[Run]] = {"skipped": [], "ran": [], "pending": []}
    progress = GridProgress(len(runs))
    for i, run in enumerate(runs, 1):
        workdir = os.path.join(root, run.directory)
        if workdir_files.is_finished(workdir):
            outcome["skipped"].append(run)
            progress.finished(skipped=True)
            logger.info("run %d/%d (%s): finished earlier, skipped (%s)", i, len(runs),
                        run.label, workdir)
            continue
        if dry_run:
            outcome["pending"].append(run)
            print(run.command_line(), flush=True)
            continue
        logger.info("%s\n  %s", progress.line(i, run.label), run.command_line())
        code = execute(run, workdir)
        progress.finished()
        if code != 0:
            raise GridError(
                f"run {i}/{len(runs)} failed with exit code {code}: {run.command_line()}\n"
                f"{len(outcome['ran'])} run(s) finished in this call and "
                f"{len(outcome['skipped'])} earlier are kept. Run the same command again to "
                "continue: finished runs are skipped and this one resumes from its last "
                "checkpoint.")
        outcome["ran"].append(run)
        accuracy = (read_result(workdir).get("test_at_best_val")
                    if workdir_files.is_finished(workdir) else None)
        if accuracy is not None:
            logger.info("  test accuracy at best val: %.2f%%", accuracy)
    return outcome
