"""``deepdream.lock``: one run at a time per output folder.

The lock is an advisory ``flock`` on ``<folder>/deepdream.lock`` (``O_EXCL`` creation where ``fcntl`` is
missing, i.e. Windows): the operating system drops it when the process ends, however it ends, so a
crashed run never blocks the next one. A second run that finds the folder locked fails at once with
a message naming the other process. Within one process the lock is re-entrant (the command line
holds it for the whole run; :func:`~..report.write_outputs` takes it again while writing).

The lock file is also the run's *staging log* (:mod:`.leftovers`): its first line names the process
and a random nonce, and each hidden staging item the run creates in the folder (a temporary file, the
snapshots' staging folder) is logged there, by :func:`staging_path`, before it is created. The next
run that takes the lock removes the logged items an interrupted run left (only those, and only as
the tool made them) before anything else. A file named ``deepdream.lock`` that is not such a lock
file (a link, a folder, a file with other data) is never opened for writing, truncated or deleted.
"""

from __future__ import annotations

import os
import secrets
import stat
import threading
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import OutputError
from . import leftovers

LOCK_NAME = "deepdream.lock"

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

_LOG_LIMIT = 64 << 20  # a staging log larger than this is not read (its items stay, as before)


@dataclass
class _Held:
    """A lock this process holds: the open lock file, how many holders, the run's nonce, the staging
    items logged (relative paths of the items themselves, to tell at release whether one is left)."""

    fd: int
    count: int
    nonce: str
    made: int = 0
    units: set = field(default_factory=set)


_HELD: dict[str, _Held] = {}  # realpath of the folder -> its lock
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
                held.count += 1
                return self
            _HELD[self._key] = self._take()
        return self

    def _take(self) -> _Held:
        fd = None
        try:
            if fcntl is not None:
                fd = self._open(os.O_RDWR | os.O_CREAT | os.O_APPEND)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    other = _read_pid(fd)
                    raise OutputError(self._busy(other)) from None
                kept = self._clean_up(fd)  # the lock is ours: an interrupted run's staging items go first
            else:  # pragma: no cover - Windows
                try:
                    fd = self._open(os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_APPEND)
                except FileExistsError:
                    raise OutputError(self._busy(None)) from None
                kept = []
            held = _Held(fd=fd, count=1, nonce=secrets.token_hex(16))
            os.ftruncate(fd, 0)
            os.write(fd, (leftovers.header(os.getpid(), held.nonce)
                          + "".join(leftovers.entry(n, r) for n, r in kept)).encode())
            held.units.update("/".join(leftovers.unit_of(r, n)) for n, r in kept)
            return held
        except BaseException as exc:
            if fd is not None:
                os.close(fd)
            if isinstance(exc, OSError):
                raise OutputError(f"Cannot write into the output folder {self.folder} ({exc.strerror or exc}). "
                                  "Choose a writable folder.") from None
            raise

    def _open(self, flags: int) -> int:
        """Open the lock file, never through a link, and only when it is a regular file."""
        try:
            fd = os.open(self.path, flags | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0), 0o644)
        except OSError:
            if os.path.islink(self.path) or (os.path.lexists(self.path) and not os.path.isfile(self.path)):
                raise OutputError(self._not_ours("it is a link or not a file")) from None
            raise
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise OutputError(self._not_ours("it is not a regular file"))
        return fd

    def _clean_up(self, fd: int) -> list[tuple[str, str]]:
        """Read the staging log a run killed before its end left; remove its items (see
        :mod:`.leftovers`); return the log entries of the items left in place."""
        size = os.fstat(fd).st_size
        if size > _LOG_LIMIT:
            raise OutputError(self._not_ours(f"it is {size} bytes long"))
        text = os.pread(fd, size, 0).decode("ascii", "replace") if size else ""
        ours, entries = leftovers.parse(text)
        if not ours:
            raise OutputError(self._not_ours("it holds other data"))
        return leftovers.remove_leftovers(self.folder, entries)

    def _not_ours(self, why: str) -> str:
        return (f"{self.path} is not a lock file of deepdream-analysis ({why}), so the tool will not use, overwrite or "
                "delete it. Move it away, or choose another output folder.")

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
            held.count -= 1
            if held.count > 0:
                return
            del _HELD[self._key]
        left = [u for u in held.units if os.path.lexists(os.path.join(self._key, u))]
        try:
            if not left:  # a staging item still there (a kept one, or a write cut short): the log stays for the next run
                os.unlink(self.path)  # unlink first, while still holding the lock
        except OSError:
            pass
        try:
            os.close(held.fd)
        except OSError:
            pass

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> bool:
        self.release()
        return False


def _read_pid(fd: int):
    try:
        text = os.pread(fd, 64, 0).decode("ascii", "replace").split("\n")[0].split(" ")[0].strip()
        return int(text) if text.isdigit() else None
    except OSError:
        return None


def staging_path(parent: str | os.PathLike, prefix: str, suffix: str = "", target: str | None = None) -> Path | None:
    """A new name ``<prefix><nonce>-<n><suffix>`` in the folder ``parent`` for a staging item, logged in
    the lock this process holds on ``parent`` or on a folder above it, BEFORE the caller creates it;
    ``target``: the name of the file the item will be renamed to, logged too when ``parent`` is itself
    a staging folder. None when this process holds no such lock (the caller picks a name itself)."""
    real = os.path.realpath(parent)
    with _HELD_LOCK:
        key = real
        while key not in _HELD:
            up = os.path.dirname(key)
            if up == key:
                return None
            key = up
        held = _HELD[key]
        held.made += 1
        name = f"{prefix}{held.nonce}-{held.made}{suffix}"
        where = os.path.relpath(real, key).replace(os.sep, "/")
        where = "" if where == "." else where + "/"
        rels = [where + name]
        if target and leftovers.unit_of(where + target, held.nonce) is not None:
            rels.append(where + target)  # a file inside a staging folder: the folder's contents are proven too
        os.write(held.fd, "".join(leftovers.entry(held.nonce, r) for r in rels).encode())
        held.units.add("/".join(leftovers.unit_of(rels[0], held.nonce)))
    return Path(parent) / name


def release_all() -> None:
    """Drop every lock this process holds (used just before the process exits at once)."""
    with _HELD_LOCK:
        keys = list(_HELD)
    for key in keys:
        lock = FolderLock(key)
        with _HELD_LOCK:
            if key in _HELD:
                _HELD[key].count = 1
        lock.release()
