"""Feature computation beside the dream loop.

Native and custom features run inline on the loop's thread: on the small regions a dream makes
they take a fraction of a millisecond (the numpy path of features/native_small.py), and a helper
thread measured no faster, since their Python overhead holds the GIL either way. pyradiomics
features run in a worker process, because pyradiomics is slow and holds the GIL in its C code: the
loop never waits for them, and their values are filled into the steps as they arrive (reported
through ``Progress.late_steps``).

When the worker cannot start, or its pool breaks (``BrokenProcessPool``: most often a user's script
without an ``if __name__ == "__main__":`` guard, which the spawned worker re-runs and dies in), the
remaining pyradiomics features are computed inline on the loop's thread for the rest of the run
(slower, but no values are lost). Every failure is recorded once in ``FeatureComputer.failures``
(feature name -> the error) for the run's metadata, and warned about once.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import logging
import math
import multiprocessing
import sys
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import numpy as np

from .config import FeatureConfig
from .result import Step

log = logging.getLogger(__name__)

_WORKER_SET: Any = None

MAIN_GUARD_HINT = (
    "guard your script with if __name__ == '__main__': (the worker process re-runs a script "
    "that has no guard, and dies in it)"
)


def worker_python() -> str:
    """The Python executable for the worker process.

    Inside 3D Slicer ``sys.executable`` is the application itself, which must not be spawned; its
    ``PythonSlicer`` launcher (same folder) runs plain Python with Slicer's packages.
    """
    exe = Path(sys.executable)
    if exe.name.lower().startswith("slicer"):
        for name in ("PythonSlicer", "PythonSlicer.exe"):
            candidate = exe.with_name(name)
            if candidate.exists():
                return str(candidate)
    return str(exe)


def _init_worker(config: FeatureConfig, spatial_dims: int) -> None:
    global _WORKER_SET
    from .features import build_feature_set
    from .stopping import exit_with_parent

    exit_with_parent()  # the parent may end without shutting the pool down (a second Ctrl-C: os._exit)
    _WORKER_SET = build_feature_set(config, spatial_dims)


def _compute_in_worker(image: np.ndarray, mask: np.ndarray, spacing) -> dict[str, float]:
    return _WORKER_SET.compute(image, mask, spacing)


def bounding_box(mask: np.ndarray, pad: int = 1) -> tuple[slice, ...]:
    """Slices of ``mask``'s bounding box grown by ``pad`` voxels (clipped to the array)."""
    idx = np.nonzero(mask)
    return tuple(slice(max(int(a.min()) - pad, 0), min(int(a.max()) + pad + 1, n)) for a, n in zip(idx, mask.shape))


class FeatureComputer:
    """Computes each requested feature for (image, mask) pairs; inline or in a worker process.

    ``spacing`` is (i, j, k) in mm. Images are ``[k, j, i]`` tensors or arrays in image units.
    ``failures``: feature name -> the first error that made its value NaN or moved its computation
    out of the worker (for the run's metadata ``feature_failures``). ``inline``: True once the
    pyradiomics features are computed on the caller's thread (the worker could not start or broke).
    """

    def __init__(self, feature_set, config: FeatureConfig, spatial_dims: int, spacing):
        self.names = tuple(feature_set.names)
        self.spacing = tuple(spacing)
        self.min_voxels = max(int(config.min_mask_voxels), 1)
        self.failures: dict[str, str] = {}
        self.inline = False
        self._warned: set[str] = set()
        self._inline_set: Any = None
        self._inline_error: str | None = None
        self._worker_answered = False
        self.spatial_dims = spatial_dims
        backend_of = getattr(feature_set, "backend_of", {}) or {}
        remote = tuple(n for n in self.names if backend_of.get(n) == "pyradiomics")
        self.remote_names = remote
        local = tuple(n for n in self.names if n not in remote)
        if remote and local:
            from .features import build_feature_set

            self.local_set = build_feature_set(dataclasses.replace(config, names=local), spatial_dims)
        else:
            self.local_set = None if not local else feature_set
        self.pool = None
        self.remote_config = None
        if remote:
            self.remote_config = dataclasses.replace(
                config, names=remote, backend="pyradiomics",
                custom={k: v for k, v in config.custom.items() if k in remote})
            try:
                ctx = multiprocessing.get_context("spawn")
                ctx.set_executable(worker_python())
                self.pool = cf.ProcessPoolExecutor(1, mp_context=ctx, initializer=_init_worker,
                                                   initargs=(self.remote_config, spatial_dims))
            except Exception as exc:  # noqa: BLE001 - no worker: compute inline instead
                self._go_inline(exc)
        self.pending: list[tuple[Step, cf.Future, np.ndarray, np.ndarray]] = []

    def submit(self, step: Step, image, mask: np.ndarray, context=None) -> None:
        """Compute the features of ``step``: local ones now, pyradiomics ones in the worker
        (or now, inline, once the worker has failed). ``context``: the
        :class:`~.features.custom.FeatureContext` for custom features that take one."""
        enough = int(mask.sum()) >= self.min_voxels
        if self.local_set is not None:
            if enough:
                step.features.update(self.local_set.compute(image, mask, self.spacing, context))
            else:
                step.features.update({n: math.nan for n in self.local_set.names})
                self.submit_window(step, image, mask, context)
        if not self.remote_names:
            return
        if not enough:
            step.features.update({n: math.nan for n in self.remote_names})
            return
        box = bounding_box(mask, pad=2)
        img = image.detach().cpu().numpy() if hasattr(image, "detach") else np.asarray(image)
        img_box = np.ascontiguousarray(img[box])
        mask_box = np.ascontiguousarray(mask[box])
        if self.pool is not None:
            try:
                fut = self.pool.submit(_compute_in_worker, img_box, mask_box, self.spacing)
            except Exception as exc:  # noqa: BLE001 - the worker cannot start or has broken
                self._go_inline(exc)
            else:
                self.pending.append((step, fut, img_box, mask_box))
                return
        self._compute_inline(step, img_box, mask_box)

    def submit_window(self, step: Step, image, mask: np.ndarray, context=None) -> None:
        """Compute only the window features of ``step`` (custom features computed whatever the mask)."""
        if self.local_set is not None and self.local_set.window_names:
            step.features.update(self.local_set.compute_window(image, mask, self.spacing, context))

    def collect(self) -> list[Step]:
        """Fill in the steps whose worker results have arrived; return them."""
        done = []
        still = []
        for entry in self.pending:
            if entry[1].done():
                self._fill(*entry)
                done.append(entry[0])
            else:
                still.append(entry)
        self.pending = still
        return done

    def finish(self, wait: bool = True) -> None:
        """Wait for outstanding results (or, when not ``wait``, drop them as NaN) and stop the worker."""
        pending, self.pending = self.pending, []
        for step, fut, img_box, mask_box in pending:
            if wait:
                self._fill(step, fut, img_box, mask_box)
            else:
                fut.cancel()
                if fut.done() and not fut.cancelled():
                    self._fill(step, fut, img_box, mask_box, recompute=False)
                else:
                    step.features.update({n: math.nan for n in self.remote_names})
        if self.pool is not None:
            self.pool.shutdown(wait=wait, cancel_futures=not wait)
            self.pool = None

    def _fill(self, step: Step, fut: cf.Future, img_box: np.ndarray, mask_box: np.ndarray,
              recompute: bool = True) -> None:
        try:
            step.features.update(fut.result())
            self._worker_answered = True
        except (BrokenProcessPool, cf.CancelledError) as exc:
            # cancelled: only when the pool was shut down because it broke or could not start
            self._go_inline(exc)
            if recompute:
                self._compute_inline(step, img_box, mask_box)
            else:
                step.features.update({n: math.nan for n in self.remote_names})
        except Exception as exc:  # noqa: BLE001 - a failed feature is NaN, never a failed run
            self._record(exc, "failed in the worker process; their values are NaN for that iteration "
                              "(further failures are not reported)", key="call")
            step.features.update({n: math.nan for n in self.remote_names})

    # ------------------------------------------------------------------ failures and inline fallback

    def _record(self, exc: BaseException, what: str, key: str, hint: str = "") -> None:
        """Note ``exc`` for every pyradiomics feature (first error each) and warn once per ``key``."""
        error = f"{type(exc).__name__}: {str(exc).strip().rstrip('.') or 'no message'}"
        for n in self.remote_names:
            self.failures.setdefault(n, error)
        if key not in self._warned:
            self._warned.add(key)
            log.warning("pyradiomics features (%s) %s: %s.%s", ", ".join(self.remote_names), what, error,
                        f" Fix: {hint}." if hint else "")

    def _go_inline(self, exc: BaseException) -> None:
        """The worker could not start or has stopped: compute the rest inline from now on."""
        if self.inline:
            return
        self.inline = True
        pool, self.pool = self.pool, None
        if pool is not None:
            try:
                pool.shutdown(wait=False, cancel_futures=True)
            except Exception:  # noqa: BLE001 - it is broken already
                pass
        exe = worker_python()
        if self._worker_answered:
            how = "stopped"
            hint = "it was killed (out of memory?); if this recurs, free memory or use the native backend"
        elif isinstance(exc, BrokenProcessPool) or "bootstrapping phase" in str(exc):
            how = "could not start"
            hint = f"{MAIN_GUARD_HINT}; if it is guarded, check that {exe} runs Python"
        else:
            how = "could not start"
            hint = f"check that {exe} runs Python"
        self._record(exc, f"worker process {how}; computing them inline on the loop's thread for the rest "
                          "of the run (slower)", key="pool", hint=hint)

    def _compute_inline(self, step: Step, img_box: np.ndarray, mask_box: np.ndarray) -> None:
        if self._inline_set is None and self._inline_error is None:
            try:
                from .features import build_feature_set

                self._inline_set = build_feature_set(self.remote_config, self.spatial_dims)
            except Exception as exc:  # noqa: BLE001
                self._inline_error = f"{type(exc).__name__}: {exc}"
                self._record(exc, "cannot be computed inline either; their values are NaN", key="inline")
        if self._inline_set is None:
            step.features.update({n: math.nan for n in self.remote_names})
            return
        try:
            step.features.update(self._inline_set.compute(img_box, mask_box, self.spacing))
        except Exception as exc:  # noqa: BLE001 - a failed feature is NaN, never a failed run
            self._record(exc, "failed inline; their values are NaN for that iteration "
                              "(further failures are not reported)", key="inline-call")
            step.features.update({n: math.nan for n in self.remote_names})
