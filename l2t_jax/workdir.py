"""The files of a run's workdir: their names, how they are written and how they are read.

This module owns the workdir's format; the training loop writes through it, the summaries
and pictures read through it. Nothing here imports JAX.

- ``config.json``: the run's config minus the keys that may change on resume
  (:func:`write_config`, :func:`read_config`).
- ``metrics.jsonl``: one JSON object per line, each with ``step``: a ``{"step", "run"}``
  record at every start of the run (:mod:`l2t_jax.provenance`), then flat
  ``train/<metric>`` and ``eval/<split>`` values (:class:`MetricLog`, :func:`read_metrics`).
  TensorBoard event files beside it in ``tensorboard/`` (tensorboardX, if installed).
- ``result.json``: written last, so its presence marks a finished run (:func:`write_result`,
  :func:`is_finished`, :func:`read_json`).
- ``transfer_weights.json``: what phi learned, for the pictures
  (:func:`write_transfer_weights`).
- ``checkpoints/``, ``best/``, ``source/``: orbax directories (:mod:`l2t_jax.checkpoints`).
- ``eval_<split>_<best|last>.json`` and ``confusion_<split>_<best|last>.png``: what
  :mod:`l2t_jax.evaluate` writes (:func:`evaluation_files`).
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any

import numpy as np

CONFIG = "config.json"
METRICS = "metrics.jsonl"
RESULT = "result.json"
TRANSFER_WEIGHTS = "transfer_weights.json"
TENSORBOARD = "tensorboard"
CHECKPOINTS = "checkpoints"
BEST = "best"
SOURCE = "source"


def evaluation_files(split: str, which: str) -> tuple[str, str]:
    """The names of :mod:`l2t_jax.evaluate`'s JSON report and confusion-matrix picture."""
    return f"eval_{split}_{which}.json", f"confusion_{split}_{which}.png"


def path(workdir: str, name: str) -> str:
    """The absolute path of file or directory ``name`` of ``workdir``."""
    return os.path.join(os.path.abspath(workdir), name)


# --------------------------------------------------------------------------- writing
def _write_json(file_path: str, value: Any, indent: int | None = 1) -> None:
    with open(file_path, "w") as f:
        json.dump(value, f, indent=indent)


def write_config(workdir: str, values: dict) -> None:
    _write_json(path(workdir, CONFIG), values)


def write_result(workdir: str, result: dict) -> str:
    """Writes result.json (the run is then finished); returns its path."""
    result_path = path(workdir, RESULT)
    _write_json(result_path, result)
    return result_path


def write_transfer_weights(workdir: str, weights: dict) -> None:
    """``weights``: ``{'pairs', 'source_taps', 'target_taps', 'pair_weights',
    'channel_weights'}`` (lists; see :func:`l2t_jax.train` for how they are computed)."""
    _write_json(path(workdir, TRANSFER_WEIGHTS), weights, indent=None)


class MetricLog:
    """Appends to metrics.jsonl, and to TensorBoard events when tensorboardX is installed."""

    def __init__(self, workdir: str):
        self.path = path(workdir, METRICS)
        try:
            from tensorboardX import SummaryWriter
            self.tensorboard = SummaryWriter(path(workdir, TENSORBOARD))
        except ImportError:  # pragma: no cover - optional
            self.tensorboard = None

    def write(self, step: int, values: dict) -> None:
        """One line of scalars: arrays are flattened to ``key/i``."""
        flat = {}
        for key, value in values.items():
            value = np.asarray(value)
            if value.ndim == 0:
                flat[key] = float(value)
            else:
                for i, v in enumerate(value.ravel()):
                    flat[f"{key}/{i}"] = float(v)
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **flat}) + "\n")
        if self.tensorboard is not None:
            for key, value in flat.items():
                self.tensorboard.add_scalar(key, value, step)
            self.tensorboard.flush()

    def write_run(self, step: int, run: dict) -> None:
        """The record that opens each start of a run: ``{"step": step, "run": run}``."""
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "run": run}) + "\n")

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


class NoLog:
    """The metric log of processes other than 0: writes nothing."""

    def write(self, step: int, values: dict) -> None:
        pass

    def write_run(self, step: int, run: dict) -> None:
        pass

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------- reading
def is_finished(workdir: str) -> bool:
    """A run is finished when its workdir has result.json (written last)."""
    return os.path.isfile(path(workdir, RESULT))


def read_json(file_path: str) -> Any:
    """A JSON file; FileNotFoundError / ValueError name the file."""
    if not os.path.isfile(file_path):
        raise FileNotFoundError(f"{file_path} does not exist")
    try:
        with open(file_path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{file_path} is not valid JSON ({e})") from None


def read_config(workdir: str) -> dict:
    return read_json(path(workdir, CONFIG))


def read_metrics(file_path: str) -> list[dict[str, Any]]:
    """metrics.jsonl -> one dict per line (each has ``step``).

    A malformed final line without a newline is skipped: a run killed while writing leaves
    one. A malformed line anywhere else raises ValueError with the file and line number.
    """
    if not os.path.isfile(file_path):
        raise FileNotFoundError(f"{file_path} does not exist")
    with open(file_path) as f:
        text = f.read()
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or "step" not in record:
                raise ValueError("not an object with a 'step' key")
        except ValueError as e:
            if number == len(lines) and not text.endswith("\n"):
                print(f"note: {file_path}: skipping the unfinished last line {number}",
                      file=sys.stderr)
                continue
            raise ValueError(f"{file_path}, line {number}: malformed metrics line ({e})") from None
        records.append(record)
    return records
