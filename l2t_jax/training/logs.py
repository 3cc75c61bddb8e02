"""What a run prints: the program's own lines, and libraries' chatter only when asked.

The package's modules log through ``logging.getLogger(__name__)`` (the ``l2t_jax`` tree).
:func:`configure` keeps that tree at INFO and puts everything else (orbax's ~35 INFO lines
per checkpoint save, absl's and jax's platform probing, matplotlib's font cache) at WARNING,
unless ``log_libraries`` asks for their INFO lines too. :class:`GridProgress` formats the
"run k of N, elapsed, ETA" lines of the demo and the experiment grids.

Nothing here imports JAX.
"""
from __future__ import annotations

import logging
import time

PACKAGE_LOGGER = "l2t_jax"


def configure(log_libraries: bool = False, keep_library_level: bool = False) -> None:
    """The program's lines at INFO; libraries' at WARNING (INFO with ``log_libraries``;
    unchanged with ``keep_library_level``, e.g. when absl's ``--verbosity`` was given).

    Sets levels only: the handler is the caller's (absl's under ``app.run``, whose verbosity
    flag sets the root level, hence called after flag parsing).
    """
    logging.getLogger(PACKAGE_LOGGER).setLevel(logging.INFO)
    if not keep_library_level:
        logging.getLogger().setLevel(logging.INFO if log_libraries else logging.WARNING)
    # absl's own logger (orbax logs through it) follows the root level once app.run has
    # installed absl's handler; make that explicit for callers without app.run.
    logging.getLogger("absl").setLevel(logging.NOTSET)


def duration(seconds: float) -> str:
    """``75`` -> ``'1 min 15 s'``; ``4000`` -> ``'1 h 07 min'``; ``8.2`` -> ``'8.2 s'``."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        minutes, secs = divmod(int(round(seconds)), 60)
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(int(round(seconds / 60)), 60)
    return f"{hours} h {minutes:02d} min"


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
        text = f"run {index}/{self.total} ({what}) | elapsed {duration(elapsed)}"
        if self.ran:
            left = self.total - self.done
            text += f", ETA {duration(elapsed / self.ran * left)}"
        return text
