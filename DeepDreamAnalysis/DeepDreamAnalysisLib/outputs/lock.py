"""``deepdream.lock``: one run at a time per output folder.

The lock is an advisory ``flock`` on ``<folder>/deepdream.lock`` (``O_EXCL`` creation where ``fcntl`` is
missing, i.e. Windows): the operating system drops it when the process ends, however it ends, so a
crashed run never blocks the next one. A second run that finds the folder locked fails at once with
a message naming the other process. Within one process the lock is re-entrant (the command line
holds it for the whole run; :func:`~..report.write_outputs` takes it again while writing).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from ..errors import OutputError

LOCK_NAME = "deepdream.lock"

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

_HELD: dict[str, list] = {}  # realpath of the folder -> [fd, count]
_HELD_LOCK = threading.Lock()


class FolderLock:
    """``with FolderLock(folder):`` holds the folder's lock; OutputError if another process holds it."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self._key = os.path.realpath(self.folder)

    def acquire(self) -> "FolderLock":
        with _HELD_LOCK:
            held = _HELD.get(self._key)
            if held is not None:
                held[1] += 1
                return self
            fd = self._take()
            _HELD[self._key] = [fd, 1]
        return self

    def _take(self) -> int:
        try:
            if fcntl is not None:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    other = _read_pid(fd)
                    os.close(fd)
                    raise OutputError(self._busy(other)) from None
            else:  # pragma: no cover - Windows
                try:
                    fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
                except FileExistsError:
                    raise OutputError(self._busy(None)) from None
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        except OutputError:
            raise
        except OSError as exc:
            raise OutputError(f"Cannot write into the output folder {self.folder} ({exc.strerror or exc}). Choose a "
                              "writable folder.") from None

    def _busy(self, pid) -> str:
        who = f"(process {pid})" if pid else ""
        return (f"Another deepdream-analysis run {who} is writing into {self.folder} right now. Wait for it to "
                f"finish, or choose another output folder. (If no run is going on, delete {self.path}.)"
                .replace("run  is", "run is"))

    def release(self) -> None:
        with _HELD_LOCK:
            held = _HELD.get(self._key)
            if held is None:
                return
            held[1] -= 1
            if held[1] > 0:
                return
            del _HELD[self._key]
            fd = held[0]
        try:
            os.unlink(self.path)  # unlink first, while still holding the lock
        except OSError:
            pass
        try:
            os.close(fd)
        except OSError:
            pass

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> bool:
        self.release()
        return False


def _read_pid(fd: int):
    try:
        os.lseek(fd, 0, 0)
        text = os.read(fd, 32).decode("ascii", "replace").strip()
        return int(text) if text.isdigit() else None
    except OSError:
        return None


def release_all() -> None:
    """Drop every lock this process holds (used just before the process exits at once)."""
    with _HELD_LOCK:
        keys = list(_HELD)
    for key in keys:
        lock = FolderLock(key)
        with _HELD_LOCK:
            if key in _HELD:
                _HELD[key][1] = 1
        lock.release()
