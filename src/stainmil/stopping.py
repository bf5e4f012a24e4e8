"""Stopping a command cleanly on SIGTERM (a SLURM time limit, ``scancel``, ``kill``).

SIGTERM becomes :class:`Terminated`, raised where the main thread is, so every ``finally`` on the way out runs:
temporary files are removed and locks released, exactly as for Ctrl-C. The same handler is installed in the
worker processes of a local pool (:mod:`stainmil.launch`), so a fold stopped there cleans up the same way.
Processes *forked* from a command (decoders, DataLoader workers) keep the default: they simply end.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_COMMAND_PID: list[int] = []
_IDLE: list[bool] = [False]  # a pool worker between jobs: SIGTERM ends it at once (nothing of its own to clean up)


class Terminated(BaseException):
    """SIGTERM reached the command (a BaseException, like KeyboardInterrupt: no ``except Exception`` swallows it)."""


def _on_sigterm(signum, frame) -> None:
    if os.getpid() not in _COMMAND_PID:  # a forked worker (decoders, DataLoader) ends as it always did
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        return
    if _IDLE[0]:
        os._exit(128 + signal.SIGTERM)
    raise Terminated()


def stop_cleanly_on_sigterm(pool_worker: bool = False) -> None:
    """From now on SIGTERM raises :class:`Terminated` in this process's main thread — unless something else
    already handles SIGTERM here (submitit, inside a SLURM job: it requeues). ``pool_worker``: this process runs
    jobs inside :func:`job` and ends at once when SIGTERM finds it between two."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) in (
            signal.SIG_DFL, _on_sigterm):
        _COMMAND_PID[:] = [os.getpid()]
        _IDLE[0] = pool_worker
        signal.signal(signal.SIGTERM, _on_sigterm)


@contextmanager
def job() -> Iterator[None]:
    """A pool worker's job: SIGTERM during it raises :class:`Terminated` (its ``finally`` blocks run)."""
    idle, _IDLE[0] = _IDLE[0], False
    try:
        yield
    finally:
        _IDLE[0] = idle
