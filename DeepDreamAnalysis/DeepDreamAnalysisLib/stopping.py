"""A stop from outside (SIGTERM, SIGHUP) taken like Ctrl-C, for the command-line entry points.

``timeout``, ``kill``, a cluster scheduler, systemd and a closing terminal stop a program with
SIGTERM or SIGHUP, sent to the one process they started. Python's default for both ends that
process at once: no ``finally``, no ``atexit``, so the processes it started (training workers, an
embedded Ray) are orphaned and keep running, and the runs in progress are never marked. Within
:func:`stop_signals_interrupt` either signal raises :class:`Stopped`, a ``KeyboardInterrupt``, in the
main thread, so the work stops along Ctrl-C's path: the ``finally`` blocks end the child
processes, the runs in progress are marked, and the command says how to resume.

Only entry points (``deepdream-analysis``, ``scripts/reproduce.py``) use it; library functions
called from Python never install signal handlers of their own for these signals.
"""

from __future__ import annotations

import contextlib
import signal
import threading

STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP arrived: the same exception path as Ctrl-C (``except KeyboardInterrupt``)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum

    @property
    def signal_name(self) -> str:
        try:
            return signal.Signals(self.signum).name
        except ValueError:
            return f"signal {self.signum}"


_received: list = []  # the stop signal received in the active stop_signals_interrupt block
_deferring: list = []  # one entry per active deferred() block
_pending: list = []  # a stop signal that arrived within a deferred() block


def stop_reason(exc: BaseException | None = None) -> str:
    """What stopped the work: ``SIGTERM``/``SIGHUP`` (also when a library turned the :class:`Stopped`
    into a plain KeyboardInterrupt, as Ray's waits do), else ``Ctrl-C``."""
    if isinstance(exc, Stopped):
        return exc.signal_name
    return Stopped(_received[-1]).signal_name if _received else "Ctrl-C"


@contextlib.contextmanager
def stop_signals_interrupt(signals=STOP_SIGNALS):
    """Within the block, SIGTERM and SIGHUP raise :class:`Stopped` in the main thread (once: a
    repeated signal while the stop is being handled is ignored, since the clean-up is bounded; Ctrl-C
    still interrupts it). The previous handlers come back at the end. Outside the main thread
    (where Python cannot install handlers) it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    state = {"stopping": False}

    def handle(signum, frame):
        if state["stopping"]:
            return
        state["stopping"] = True
        _received.append(signum)
        if _deferring:
            _pending.append(signum)
            return
        raise Stopped(signum)

    previous = {}
    for sig in signals:
        try:
            previous[sig] = signal.signal(sig, handle)
        except (ValueError, OSError):
            pass
    _received.clear()
    _pending.clear()
    try:
        yield
    finally:
        _received.clear()
        _pending.clear()
        for sig, handler in previous.items():
            try:
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
            except (ValueError, OSError, TypeError):
                pass


def python_handlers(signals=STOP_SIGNALS) -> dict:
    """The stop signals' current handlers that are Python functions (installed by the caller, such as
    :func:`stop_signals_interrupt`'s), main thread only; for :func:`restore_handlers`."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: h for sig in signals if callable(h := signal.getsignal(sig))}


def restore_handlers(handlers: dict) -> None:
    """Put back handlers from :func:`python_handlers` that a library (``ray.init``: exit at once on
    SIGTERM, and a native crash handler) replaced."""
    for sig, handler in handlers.items():
        try:
            signal.signal(sig, handler)
        except (ValueError, OSError, TypeError):
            pass


@contextlib.contextmanager
def deferred():
    """A stop signal arriving within the block (under :func:`stop_signals_interrupt`) raises
    :class:`Stopped` only at its end: for a few steps that must not be cut in half, such as starting
    worker processes (a start cut short leaves a child that prints a traceback)."""
    _deferring.append(True)
    try:
        yield
    finally:
        _deferring.pop()
    if _pending and not _deferring:
        signum = _pending.pop()
        _pending.clear()
        raise Stopped(signum)


def exit_with_parent() -> None:
    """In a worker process started by multiprocessing (a pool's initializer): end this process when
    its parent ends, however the parent ended (``os._exit`` after a second Ctrl-C, SIGKILL, a crash).
    An idle pool worker otherwise outlives its parent for good, and a busy one finishes its job first."""
    import multiprocessing
    import os

    parent = multiprocessing.parent_process()
    if parent is None or getattr(parent, "sentinel", None) is None:
        return

    def watch():
        from multiprocessing.connection import wait

        wait([parent.sentinel])
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()
