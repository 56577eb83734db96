"""The analysis in a worker thread, for callers that must stay responsive.

The worker thread runs :func:`~.analysis.run_analysis` (torch and numpy only; it never touches Qt,
VTK or MRML). Progress goes into a bounded buffer that the caller drains with :meth:`poll` from its
own thread (the Slicer panel's timer, the command line's progress bar): steps are kept (they are
small; beyond ``MAX_PENDING_STEPS`` undrained ones the oldest are dropped — the result always holds
them all), but only the newest ``queue_size`` snapshots are, so a slow drain never piles up images. :meth:`cancel` stops the loop within one iteration.
"""

from __future__ import annotations

import threading
from collections import deque

from .config import AnalysisConfig
from .errors import ConfigError
from .result import AnalysisResult, Progress


class AnalysisRunner:
    """Run one analysis in a daemon thread. See the module docstring."""

    MAX_PENDING_STEPS = 100_000

    def __init__(self, volume, seed_ijk, model, config: AnalysisConfig | None = None, reference=None,
                 queue_size: int = 4):
        if isinstance(queue_size, bool) or not isinstance(queue_size, int) or queue_size < 1:
            raise ConfigError(f"queue_size must be a positive integer, got {queue_size!r}.")
        self.volume = volume
        self.seed_ijk = seed_ijk
        self.model = model
        self.config = config or AnalysisConfig()
        self.reference = reference
        self.queue_size = queue_size
        self._pending: deque[Progress] = deque()
        self._lock = threading.Lock()
        self._cancel = threading.Event()
        self._thread: threading.Thread | None = None
        self.result: AnalysisResult | None = None
        self.error: BaseException | None = None
        self.last_progress: Progress | None = None

    @property
    def crop(self):
        """Where in the volume the loop works: a :class:`~.result.Crop` (start, size in [k, j, i])."""
        from .analysis import plan_crop

        return plan_crop(self.volume, self.seed_ijk, self.model.card, self.config)

    def start(self) -> "AnalysisRunner":
        if self._thread is not None:
            raise RuntimeError("This runner was started already; make a new one for another run.")
        self._thread = threading.Thread(target=self._work, name="DeepDreamAnalysis", daemon=True)
        self._thread.start()
        return self

    def _work(self) -> None:
        from .analysis import run_analysis

        try:
            self.result = run_analysis(self.volume, self.seed_ijk, self.model, self.config, self.reference,
                                       on_progress=self._push, cancel=self._cancel)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            self.error = exc

    def _push(self, progress: Progress) -> None:
        with self._lock:
            self._pending.append(progress)
            if progress.snapshot is not None:
                with_snap = [p for p in self._pending if p.snapshot is not None]
                for stale in with_snap[:-self.queue_size]:
                    stale.snapshot = None
            while len(self._pending) > self.MAX_PENDING_STEPS:
                self._pending.popleft()

    def poll(self) -> list[Progress]:
        """Everything reported since the last call (non-blocking)."""
        with self._lock:
            out = list(self._pending)
            self._pending.clear()
        if out:
            self.last_progress = out[-1]
        return out

    def cancel(self) -> None:
        """Ask the loop to stop; it ends within one iteration with a result marked ``cancelled``."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def done(self) -> bool:
        return self._thread is not None and not self._thread.is_alive()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the run; True when it has ended."""
        if self._thread is None:
            return False
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def wait(self) -> AnalysisResult:
        """Block until the end; return the result or raise the run's error."""
        self.join()
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result
