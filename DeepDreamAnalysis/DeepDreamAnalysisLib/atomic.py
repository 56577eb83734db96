"""Atomic file writes: write to a temporary name in the same folder, then rename.

A reader never sees a half-written file, and a failed write leaves the old file (or none). A process
killed mid-write leaves the temporary file; in an output folder (locked, :mod:`.outputs.lock`) the
next run removes it (:mod:`.outputs.leftovers`); elsewhere the temporary file's name names the
process that wrote it, and the next atomic write of the same target removes it once that process has
ended (:mod:`.outputs.orphans`).

While an :class:`~.outputs.manifest.ManifestWriter` is active (:data:`WRITE_GUARD`), every atomic
write asks it first (a file the tool did not write is never replaced) and tells it afterwards (the
file is listed in the folder's manifest).
"""

from __future__ import annotations

import contextvars
import os
from contextlib import contextmanager
from pathlib import Path

from .errors import OutputError

WRITE_GUARD: contextvars.ContextVar = contextvars.ContextVar("deepdream_write_guard", default=None)
"""The active :class:`~.outputs.manifest.ManifestWriter` (or None): consulted by :func:`atomic_path`."""


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None):
    """Yield a temporary path beside ``path``; on success rename it to ``path``.

    ``suffix`` keeps the extension writers look at (``.nii.gz``, ``.png``); default: ``path``'s.
    """
    target = Path(path)
    suffix = suffix if suffix is not None else "".join(target.suffixes)
    guard = WRITE_GUARD.get()
    if guard is not None:
        guard.claim(target, save=False)  # listed in the manifest file with its pending record, before the rename
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp, held = _new_temp(target, suffix)
    except OSError as exc:
        raise OutputError(f"Cannot write into {target.parent} ({exc.strerror}). Choose a writable output folder.") from None
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # made 0600; give the file the usual permissions
        if guard is not None:
            guard.about_to_place(target, tmp)  # a kill right after the rename still leaves a known file
        os.replace(tmp, target)
        if guard is not None:
            guard.record(target)
    except OSError as exc:
        _remove(tmp)
        raise OutputError(f"Cannot write {target} ({exc.strerror}). Check free space and permissions.") from None
    except BaseException:
        _remove(tmp)
        raise
    finally:
        if held is not None:
            os.close(held)


def _new_temp(target: Path, suffix: str) -> tuple[str, int | None]:
    """Create the empty temporary file for ``target``. In a folder this process holds the lock of, its
    name embeds the run's nonce and is logged in the lock before it is created, so a rerun after a
    kill knows it as the tool's and removes it (:mod:`.outputs.leftovers`); elsewhere its name names
    this process, and the temporary files of earlier writes of ``target`` by processes that have ended
    are removed first (:mod:`.outputs.orphans`). Returns the path and, outside a locked folder, the
    open temporary file whose lock this process holds until the write is over (or None)."""
    from .outputs import orphans
    from .outputs.lock import staging_path

    path = staging_path(target.parent, f".{target.name}.", ".tmp" + suffix, target=target.name)
    if path is None:
        orphans.remove_dead_temps(target)
        return orphans.new_temp(target, ".tmp" + suffix)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600))
    return str(path), None


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(data)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _remove(tmp):
    try:
        os.unlink(tmp)
    except OSError:
        pass
