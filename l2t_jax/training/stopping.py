"""Stopping a run cleanly: SIGTERM (preemption) and SIGINT (Ctrl-C) at a step boundary.

:class:`StopRequest` notes the first signal (in several processes, jax's preemption sync
point agrees on the step); the loop (:mod:`l2t_jax.training.train`) then saves a
checkpoint and raises :class:`Preempted`, on which :mod:`l2t_jax.main` exits with
:data:`PREEMPTED_EXIT_CODE` or :data:`INTERRUPTED_EXIT_CODE`: the status a shell reports for
a process ended by that signal, so that schedulers count the run as unfinished.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
import time

import jax

logger = logging.getLogger(__name__)

PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM   # 143: what a shell reports after SIGTERM
INTERRUPTED_EXIT_CODE = 128 + signal.SIGINT  # 130: ... after Ctrl-C


class Preempted(Exception):
    """SIGTERM (preemption) or SIGINT (Ctrl-C) stopped the run at a step boundary after
    saving a checkpoint; running the same command again resumes from it. :mod:`l2t_jax.main`
    exits with :attr:`exit_code` on it: 143 after SIGTERM (:data:`PREEMPTED_EXIT_CODE`), 130
    after Ctrl-C (:data:`INTERRUPTED_EXIT_CODE`), as a shell reports a process ended by that
    signal (non-zero: the run is not finished)."""

    def __init__(self, step: int, directory: str, signum: int = signal.SIGTERM,
                 evaluation_cut: int | None = None):
        what = "Ctrl-C (SIGINT)" if signum == signal.SIGINT else "SIGTERM"
        cut = (f" (the evaluation of epoch {evaluation_cut} was cut short: it runs again on "
               "resume)" if evaluation_cut is not None else "")
        super().__init__(f"stopped by {what} after step {step}: saved a checkpoint of step "
                         f"{step} in {directory}{cut}; run the same command again to resume")
        self.step = step
        self.exit_code = 128 + int(signum)


class StopRequest:
    """SIGTERM (preemption) or SIGINT (Ctrl-C) -> stop at the next step boundary.

    One process: handlers that only note the signal and its time (restored by
    :meth:`close`). Several processes: they must stop at the same step, so jax's preemption
    sync point decides (its service catches SIGTERM in every process and agrees on a step);
    Ctrl-C is handed to it as SIGTERM. After the first signal the second is left to the OS
    (its default action ends the process at once, nothing saved), so that it works even
    while the main thread is inside a compiled step, where Python handlers cannot run.
    """

    def __init__(self):
        self.signum = None               # the first signal received
        self.received_at = None          # time.monotonic() of it
        self.previous = {}
        self.multiprocess = jax.process_count() > 1
        if threading.current_thread() is not threading.main_thread():
            return                       # signal handlers can only be set in the main thread
        if self.multiprocess:
            from jax._src import distributed
            if distributed.global_state.preemption_sync_manager is None:
                logger.warning("jax's preemption service is off: SIGTERM will not save a "
                               "checkpoint before the processes end")
                self.multiprocess = None
                return
            handled = (signal.SIGINT,)   # SIGTERM is the preemption service's
        else:
            handled = (signal.SIGTERM, signal.SIGINT)
        for signum in handled:
            self.previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum, frame):
        if self.signum is not None:      # a second one before the first handler returned
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signum, self.received_at = signum, time.monotonic()
        signal.signal(signum, signal.SIG_DFL)        # the next one ends the process
        if self.multiprocess and signum == signal.SIGINT:
            os.kill(os.getpid(), signal.SIGTERM)     # to jax's preemption service

    def requested(self, step: int) -> bool:
        """Whether to stop after ``step``. Several processes: every process must call it
        at every step (the sync point is collective)."""
        if self.multiprocess:
            from jax.experimental import multihost_utils
            return multihost_utils.reached_preemption_sync_point(step)
        return self.signum is not None

    def cut_evaluation(self, grace_s: float) -> bool:
        """Whether an evaluation in progress stops now: a signal came ``grace_s`` seconds
        ago or more. One process only: several would have to agree on the batch (a
        collective per batch), so their evaluations run to the end."""
        return (not self.multiprocess and self.signum is not None
                and time.monotonic() - self.received_at >= grace_s)

    @property
    def exit_signal(self) -> int:
        return self.signum if self.signum is not None else signal.SIGTERM

    def close(self) -> None:
        for signum, previous in self.previous.items():
            signal.signal(signum, previous)
        self.previous = {}
