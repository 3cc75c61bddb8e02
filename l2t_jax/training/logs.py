"""What a run prints: the program's own lines, and libraries' chatter only when asked.

The package's modules log through ``logging.getLogger(__name__)`` (the ``l2t_jax`` tree).
:func:`configure` keeps that tree at INFO and puts everything else (orbax's ~35 INFO lines
per checkpoint save, absl's and jax's platform probing, matplotlib's font cache) at WARNING,
unless ``log_libraries`` asks for their INFO lines too. :func:`duration` writes seconds as a
person reads them.

Nothing here imports JAX.
"""
from __future__ import annotations

import logging

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
