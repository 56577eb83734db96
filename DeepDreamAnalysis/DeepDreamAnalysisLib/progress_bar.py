"""A one-line terminal progress bar for the command line (no dependency)."""

from __future__ import annotations

import sys
import time

from .result import Progress


def _fmt_time(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    m, s = divmod(seconds, 60)
    h, m = divmod(m, 60)
    return f"{h:d}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class ProgressBar:
    """Prints ``iteration i/N | objective | p(seed) | elapsed < left`` on one line of ``stream``."""

    def __init__(self, stream=None, width: int = 24, min_interval_s: float = 0.1):
        self.stream = stream or sys.stderr
        self.width = width
        self.min_interval_s = min_interval_s
        self._last = 0.0
        self._tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def __call__(self, p: Progress) -> None:
        now = time.monotonic()
        last_one = p.step.iteration + 1 >= p.total_iterations
        if not last_one and now - self._last < (self.min_interval_s if self._tty else 5.0):
            return
        self._last = now
        done = (p.step.iteration + 1) / p.total_iterations
        filled = int(self.width * done)
        bar = "#" * filled + "-" * (self.width - filled)
        line = (f"[{bar}] {p.step.iteration + 1}/{p.total_iterations} objective {p.step.objective:+.3f} "
                f"p(seed) {p.step.probability:.3f} mask {p.step.mask_voxels} vox "
                f"{_fmt_time(p.elapsed_s)} < {_fmt_time(p.eta_s)}")
        self.stream.write(("\r" + line + "\033[K") if self._tty else line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self._tty:
            self.stream.write("\n")
            self.stream.flush()
