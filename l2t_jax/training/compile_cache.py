"""jax's persistent compilation cache for runs: one directory per user, shared by every run
and workdir, so that a second run of the same program loads it instead of compiling it.

On a CPU the L2T-ww step takes tens of seconds to compile, a full-size one minutes; every
seed, budget and restart of a method compiles the same program (the cache key is the
program, its compile options and XLA flags, and the jax version), so the cache turns those
compiles into reads of a few seconds.

Where: ``JAX_COMPILATION_CACHE_DIR`` when the user set it; else the directory given to
:func:`enable` (``--compilation_cache`` on the command line); else ``DEFAULT`` under the
package's cache (``~/.cache/l2t_jax/xla``, or ``$L2T_CACHE_DIR/xla``). ``off`` disables it.
The directory is capped at :data:`MAX_BYTES`; jax deletes the least recently used entries
(its size accounting needs the ``filelock`` package, a dependency of ours: without it jax
fails every cache read and write, so the cap is then left unset, the cache stays unbounded
and a warning says so). Where the cache is is logged at the first compile that uses it, not
when it is turned on: a run that stops on a config or data error prints that error alone.
"""
from __future__ import annotations

import logging
import os
import threading
from typing import Optional

logger = logging.getLogger(__name__)

OFF = "off"
MAX_BYTES = 4 * 2 ** 30
# Programs that compile faster than this are not written (jax's default is 1 s; the tiny
# test and demo programs are just above it).
MIN_COMPILE_SECONDS = 0.5

_saved = {"hits": 0, "seconds": 0.0}
_announce = {"directory": None}   # logged at the first compile that consults the cache
_by_thread: dict = {}
_lock = threading.Lock()
_listening = False
_configured = False


def default_directory() -> str:
    from l2t_jax.training import assets
    return os.path.join(assets.cache_dir(), "xla")


def enable(directory: Optional[str] = None) -> Optional[str]:
    """Turns the cache on (before the first compile) and returns its directory, or None
    when it is off. ``directory``: a path, ``off``, or None for the default."""
    import jax
    global _listening, _configured
    _configured = True
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        directory = os.environ["JAX_COMPILATION_CACHE_DIR"]   # jax reads it itself
    elif directory == OFF:
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    else:
        directory = os.path.abspath(os.path.expanduser(directory or default_directory()))
        jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_enable_compilation_cache", True)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    if _have_filelock():
        jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    else:
        logger.warning("compilation cache: the filelock package is missing, so the cache "
                       "is not capped at %d GiB (pip install filelock)", MAX_BYTES // 2 ** 30)
    if not _listening:
        jax.monitoring.register_event_listener(_on_event)
        jax.monitoring.register_event_duration_secs_listener(_on_duration)
        _listening = True
    with _lock:
        _announce["directory"] = directory
    return directory


def _have_filelock() -> bool:
    try:
        import filelock  # noqa: F401
    except ImportError:
        return False
    return True


def configured() -> bool:
    """Whether :func:`enable` ran in this process (on, or turned off)."""
    return _configured


def _on_event(event: str, **_) -> None:
    if event == "/jax/compilation_cache/compile_requests_use_cache":
        with _lock:
            directory, _announce["directory"] = _announce["directory"], None
        if directory:
            logger.info("compilation cache: %s (--compilation_cache=off disables it)",
                        directory)
    if event == "/jax/compilation_cache/cache_hits":
        with _lock:
            _saved["hits"] += 1
            _this_thread()["hits"] += 1


def _on_duration(event: str, seconds: float, **_) -> None:
    if event == "/jax/compilation_cache/compile_time_saved_sec":
        with _lock:
            _saved["seconds"] += seconds
            _this_thread()["seconds"] += seconds


def _this_thread() -> dict:
    # jax reports a compile's events in the thread that compiles it.
    return _by_thread.setdefault(threading.get_ident(), {"hits": 0, "seconds": 0.0})


def saved(this_thread: bool = False) -> dict:
    """Cache hits so far in this process (``this_thread``: in the calling thread, so that
    a compile can tell its own hit from a concurrent one) and the compile seconds they
    saved (as jax estimates them: the recorded compile time minus the read)."""
    with _lock:
        return dict(_this_thread() if this_thread else _saved)
