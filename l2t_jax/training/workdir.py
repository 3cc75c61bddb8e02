"""The files of a run's workdir: their names, how they are written and how they are read.

This module owns the workdir's format; the training loop writes through it, the summaries
and pictures read through it. Nothing here imports JAX.

- ``config.json``: the run's config minus the keys that may change on resume
  (:func:`write_config`, :func:`read_config`).
- ``metrics.jsonl``: one JSON object per line, each with ``step``: a ``{"step", "run"}``
  record at every start of the run (:mod:`l2t_jax.training.provenance`), then flat
  ``train/<metric>`` and ``eval/<split>`` values (:class:`MetricLog`, :func:`read_metrics`).
  TensorBoard event files beside it in ``tensorboard/`` (tensorboardX, if installed).
- ``result.json``: written last, so its presence marks a finished run (:func:`write_result`,
  :func:`is_finished`, :func:`read_json`).
- ``transfer_weights.json``: what the run learned about where to transfer (phi's pair and
  channel weights, or AFD's / SemCKD's attention per pair), for the pictures
  (:func:`write_transfer_weights`).
- ``checkpoints/``, ``best/``, ``source/``: orbax directories (:mod:`l2t_jax.training.checkpoints`).
- ``eval_<split>_<best|last>.json`` and ``confusion_<split>_<best|last>.png``: what
  :mod:`l2t_jax.evaluate` writes (:func:`evaluation_files`).

Writes that fail (disk full, a read-only directory) raise :class:`RunFileError` naming the
file. JSON files are written to a temporary name and renamed, so a failed write never leaves
half a ``result.json`` (which would mark the run finished); an unfinished last line of
``metrics.jsonl`` (a run stopped while writing it) is dropped when the log is reopened.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

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
class RunFileError(OSError):
    """A file of the run's own (metrics.jsonl, TensorBoard events, the JSON files, the
    pictures) could not be written; ``str()`` is one line naming the file and the reason
    (the training loop adds which checkpoints are intact)."""

    def __init__(self, file_path: str, error: OSError):
        super().__init__(error.errno, error.strerror)
        self.path = file_path
        self.message = f"could not write {file_path} ({error.strerror or error})"

    def __str__(self) -> str:
        return self.message


@contextlib.contextmanager
def writing(file_path: str):
    """Turns an OSError raised inside into a :class:`RunFileError` naming ``file_path``."""
    try:
        yield
    except RunFileError:
        raise
    except OSError as e:
        raise RunFileError(file_path, e) from e


def _write_json(file_path: str, value: Any, indent: int | None = 1) -> None:
    temporary = f"{file_path}.tmp"
    with writing(file_path):
        try:
            with open(temporary, "w") as f:
                json.dump(value, f, indent=indent)
            os.replace(temporary, file_path)
        finally:
            if os.path.exists(temporary):
                os.remove(temporary)


def write_config(workdir: str, values: dict) -> None:
    _write_json(path(workdir, CONFIG), values)


def write_result(workdir: str, result: dict) -> str:
    """Writes result.json (the run is then finished); returns its path."""
    result_path = path(workdir, RESULT)
    _write_json(result_path, result)
    return result_path


def write_transfer_weights(workdir: str, weights: dict) -> None:
    """``weights``: ``{'pairs', 'source_taps', 'target_taps', 'pair_weights',
    'pair_attention', 'channel_weights', 'where', ...}`` (see
    :func:`l2t_jax.training.results.transfer_weights` for what they hold)."""
    _write_json(path(workdir, TRANSFER_WEIGHTS), weights, indent=None)


def _drop_unfinished_line(file_path: str) -> None:
    """Cuts ``file_path`` after its last newline: lines appended after half a line would
    leave a malformed line inside the file, which :func:`read_metrics` refuses."""
    if not os.path.isfile(file_path) or os.path.getsize(file_path) == 0:
        return
    with open(file_path, "rb+") as f:
        text = f.read()
        if text.endswith(b"\n"):
            return
        f.truncate(text.rfind(b"\n") + 1)
    logger.warning("%s: dropped an unfinished last line (the run stopped while writing it)",
                   file_path)


class MetricLog:
    """Appends to metrics.jsonl, and to TensorBoard events when tensorboardX is installed.

    The events are written synchronously (tensorboardX's writer classes, not its
    SummaryWriter, whose background thread would swallow a write error and then block on
    its full queue), so a full disk raises :class:`RunFileError` here.
    """

    def __init__(self, workdir: str):
        self.path = path(workdir, METRICS)
        with writing(self.path):
            _drop_unfinished_line(self.path)
        self.events = None
        try:
            from tensorboardX import summary
            from tensorboardX.event_file_writer import EventsWriter
            from tensorboardX.proto import event_pb2
        except ImportError:  # pragma: no cover - optional
            return
        directory = path(workdir, TENSORBOARD)
        with writing(directory):
            os.makedirs(directory, exist_ok=True)
            self.events = EventsWriter(os.path.join(directory, "events"))
        self._scalar, self._event = summary.scalar, event_pb2.Event

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
        self._append(json.dumps({"step": step, **flat}) + "\n")
        if self.events is not None:
            with writing(self.events._file_name):
                now = time.time()
                for key, value in flat.items():
                    self.events.write_event(self._event(wall_time=now, step=step,
                                                        summary=self._scalar(key, value)))
                self.events.flush()

    def write_run(self, step: int, run: dict) -> None:
        """The record that opens each start of a run: ``{"step": step, "run": run}``."""
        self._append(json.dumps({"step": step, "run": run}) + "\n")

    def _append(self, line: str) -> None:
        with writing(self.path):
            with open(self.path, "a") as f:
                f.write(line)

    def close(self) -> None:
        if self.events is not None:
            try:
                self.events.close()
            except OSError:      # already reported by the write that failed
                pass
            self.events = None


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
