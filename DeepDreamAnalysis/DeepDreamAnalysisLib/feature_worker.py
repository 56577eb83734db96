"""Feature computation beside the dream loop.

Native and custom features run inline on the loop's thread: on the small regions a dream makes
they take a fraction of a millisecond (the numpy path of features/native_small.py), and a helper
thread measured no faster, since their Python overhead holds the GIL either way. pyradiomics
features run in a worker process, because pyradiomics is slow and holds the GIL in its C code: the
loop never waits for them, and their values are filled into the steps as they arrive (reported
through ``Progress.late_steps``).
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import math
import multiprocessing
import sys
from pathlib import Path
from typing import Any

import numpy as np

from .config import FeatureConfig
from .result import Step

_WORKER_SET: Any = None


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
    """

    def __init__(self, feature_set, config: FeatureConfig, spatial_dims: int, spacing):
        self.names = tuple(feature_set.names)
        self.spacing = tuple(spacing)
        self.min_voxels = max(int(config.min_mask_voxels), 1)
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
        if remote:
            remote_config = dataclasses.replace(
                config, names=remote, backend="pyradiomics",
                custom={k: v for k, v in config.custom.items() if k in remote})
            ctx = multiprocessing.get_context("spawn")
            ctx.set_executable(worker_python())
            self.pool = cf.ProcessPoolExecutor(1, mp_context=ctx, initializer=_init_worker,
                                               initargs=(remote_config, spatial_dims))
        self.pending: list[tuple[Step, cf.Future]] = []

    def submit(self, step: Step, image, mask: np.ndarray) -> None:
        """Compute the features of ``step``: local ones now, pyradiomics ones in the worker."""
        enough = int(mask.sum()) >= self.min_voxels
        if self.local_set is not None:
            if enough:
                step.features.update(self.local_set.compute(image, mask, self.spacing))
            else:
                step.features.update({n: math.nan for n in self.local_set.names})
        if self.pool is not None:
            if not enough:
                step.features.update({n: math.nan for n in self.remote_names})
                return
            box = bounding_box(mask, pad=2)
            img = image.detach().cpu().numpy() if hasattr(image, "detach") else np.asarray(image)
            fut = self.pool.submit(_compute_in_worker, np.ascontiguousarray(img[box]),
                                   np.ascontiguousarray(mask[box]), self.spacing)
            self.pending.append((step, fut))

    def collect(self) -> list[Step]:
        """Fill in the steps whose worker results have arrived; return them."""
        done = []
        still = []
        for step, fut in self.pending:
            if fut.done():
                self._fill(step, fut)
                done.append(step)
            else:
                still.append((step, fut))
        self.pending = still
        return done

    def finish(self, wait: bool = True) -> None:
        """Wait for outstanding results (or, when not ``wait``, drop them as NaN) and stop the worker."""
        for step, fut in self.pending:
            if wait:
                self._fill(step, fut)
            else:
                fut.cancel()
                if fut.done() and not fut.cancelled():
                    self._fill(step, fut)
                else:
                    step.features.update({n: math.nan for n in self.remote_names})
        self.pending = []
        if self.pool is not None:
            self.pool.shutdown(wait=wait, cancel_futures=not wait)
            self.pool = None

    def _fill(self, step: Step, fut: cf.Future) -> None:
        try:
            step.features.update(fut.result())
        except Exception:  # noqa: BLE001 - a failed feature is NaN, never a failed run
            step.features.update({n: math.nan for n in self.remote_names})
