"""Staging items of an interrupted run: what they are, how the next run knows them, what it does.

While a run writes into an output folder it creates hidden *staging items* there: the temporary
file of each atomic write (``.curves.csv.<nonce>-<n>.tmp.csv``, the manifest's own
``.deepdream-manifest.json.<nonce>-<n>.tmp.json``, a study's ``runs/<key>/.status.json...``) and the
folder the snapshots are written into before they are moved into ``snapshots/``
(``.snapshots-new-<nonce>-<n>``, with the snapshot files and their temporary files inside). A run
that ends normally removes them; a run killed with SIGKILL (or a power loss) leaves them.

Proof of ownership, never a name pattern alone: the folder's lock file ``deepdream.lock`` (held for
the whole run, :mod:`.lock`) is also the run's *staging log*. Its first line is
``<pid> deepdream-analysis <nonce>`` (a random 128-bit nonce per run); before the tool creates a
staging item it appends one line ``<nonce> "<relative path>"`` naming it, and every staging name
embeds the nonce. A run killed by any means leaves the lock file with its log (the operating
system drops the lock itself); the next run that takes the lock reads the log first and
(:func:`remove_leftovers`):

- deletes each logged temporary file that is still a regular file (not a link);
- deletes a logged staging folder only when it is a real folder (not a link) holding nothing but
  regular files the log names; it never follows a link and never descends into one (every step is
  made relative to an opened folder with ``O_NOFOLLOW``);
- leaves anything else as it is (a link put in place of a staging folder, a staging folder holding a
  file the tool did not put there, a folder on the way that became a link) and says so in a warning
  naming the path and what to do; its log lines are kept, so each later run warns again and removes
  the item once only the tool's files are left in it.

The log is not flushed to the disk (no fsync): after a power loss an item whose log line was lost
is not recognised and stays, it is never deleted on a guess.

Where the operating system offers no ``O_NOFOLLOW``/``dir_fd`` operations (Windows), nothing is
removed: the leftovers stay, as before.
"""

from __future__ import annotations

import json
import logging
import os
import re
import stat

log = logging.getLogger(__name__)

TOOL = "deepdream-analysis"
NONCE = re.compile(r"^[0-9a-f]{32}$")
_HEADER = re.compile(r"^(\d+)(?: deepdream-analysis(?: ([0-9a-f]{32}))?)?$")

SUPPORTED = (hasattr(os, "O_NOFOLLOW") and hasattr(os, "O_DIRECTORY") and os.open in os.supports_dir_fd
             and os.unlink in os.supports_dir_fd and os.rmdir in os.supports_dir_fd
             and os.stat in os.supports_dir_fd and os.scandir in os.supports_fd)


def header(pid: int, nonce: str) -> str:
    return f"{pid} {TOOL} {nonce}\n"


def entry(nonce: str, rel: str) -> str:
    return f"{nonce} {json.dumps(rel)}\n"


def parse(text: str) -> tuple[bool, list[tuple[str, str]]]:
    """``(ours, entries)`` of a lock file's text: ``ours`` False when it is not a lock file of this tool
    (then nothing in it is trusted); ``entries``: the logged ``(nonce, relative path)`` pairs."""
    if not text.strip("\0 \n\r\t"):
        return True, []  # empty (a run killed before writing its first line), or zero-filled after a power loss
    lines = text.split("\n")
    if not _HEADER.match(lines[0].strip()):
        return False, []
    entries = []
    for line in lines[1:]:
        nonce, _, rest = line.partition(" ")
        if not NONCE.match(nonce):
            continue  # a torn last line: nothing was created under it yet
        try:
            rel = json.loads(rest)
        except ValueError:
            continue
        if isinstance(rel, str) and unit_of(rel, nonce) is not None:
            entries.append((nonce, rel))
    return True, entries


def unit_of(rel: str, nonce: str) -> tuple[str, ...] | None:
    """The staging item a logged path belongs to: its components up to the first hidden one that
    embeds ``nonce`` (None when there is none, or the path is not a plain relative path)."""
    parts = rel.split("/")
    if not rel or rel.startswith("/") or "\\" in rel or any(p in ("", ".", "..") or "\0" in p for p in parts):
        return None
    for i, part in enumerate(parts):
        if part.startswith(".") and nonce in part:
            return tuple(parts[:i + 1])
    return None


def remove_leftovers(folder: str | os.PathLike, entries: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Remove the staging items of ``entries`` (a staging log) that are provably the tool's; returns
    the entries of the items left in place (each with a warning), see the module docstring."""
    if not entries:
        return []
    if not SUPPORTED:
        return list(entries)
    units: dict[tuple[str, ...], list[tuple[str, str]]] = {}
    for nonce, rel in entries:
        units.setdefault(unit_of(rel, nonce), []).append((nonce, rel))
    kept = []
    try:
        root = os.open(os.fspath(folder), os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return list(entries)
    try:
        for unit, logged in units.items():
            if not _remove_unit(folder, root, unit, {rel for _, rel in logged}):
                kept.extend(logged)
    finally:
        os.close(root)
    return kept


def _remove_unit(folder, root: int, unit: tuple[str, ...], logged: set[str]) -> bool:
    """Remove one staging item; False when it is left in place (warned)."""
    shown = os.path.join(os.fspath(folder), *unit)
    rel = "/".join(unit)
    if rel not in logged:
        return True  # only files inside it were logged, never the item itself: not ours to judge
    fds = []
    try:
        parent = root
        for depth, part in enumerate(unit[:-1]):  # the folders on the way, never through a link
            try:
                parent = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=parent)
            except FileNotFoundError:
                return True  # gone, and the item with it
            except OSError:
                _warn(shown, f"the folder {os.path.join(os.fspath(folder), *unit[:depth + 1])} on the way "
                      "to it is now a link or not a folder, so the tool did not look there",
                      "Remove that item yourself if it is a leftover of this tool")
                return False
            fds.append(parent)
        name = unit[-1]
        try:
            st = os.stat(name, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            return True
        if stat.S_ISREG(st.st_mode):
            os.unlink(name, dir_fd=parent)
            return True
        if stat.S_ISLNK(st.st_mode):
            _warn(shown, f"it is now a link (to {_readlink(name, parent)}), so the tool did not follow it and deleted "
                  "nothing", "Remove the link yourself (this does not touch what it points to)")
            return False
        if not stat.S_ISDIR(st.st_mode):
            _warn(shown, "it is no longer a file or a folder", "Remove it yourself")
            return False
        return _remove_folder(shown, parent, name, rel, logged)
    except OSError as exc:
        _warn(shown, f"it could not be removed ({exc.strerror or exc})", "Remove it yourself")
        return False
    finally:
        for fd in fds:
            os.close(fd)


def _remove_folder(shown: str, parent: int, name: str, rel: str, logged: set[str]) -> bool:
    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=parent)
    try:
        with os.scandir(fd) as it:
            entries = list(it)
        foreign = sorted(e.name for e in entries
                         if f"{rel}/{e.name}" not in logged or not e.is_file(follow_symlinks=False))
        if foreign:
            names = ", ".join(foreign[:5]) + (f", ... ({len(foreign)} in all)" if len(foreign) > 5 else "")
            _warn(shown, f"it holds {names}, which the tool did not put there, so the tool left the folder as it is",
                  "Move your files out of it; the next run into this folder then deletes the rest (or delete the "
                  "folder yourself)")
            return False
        for e in entries:
            os.unlink(e.name, dir_fd=fd)
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=parent)
    return True


def _readlink(name: str, parent: int) -> str:
    try:
        return os.readlink(name, dir_fd=parent)
    except (OSError, TypeError):
        return "?"


def _warn(path: str, why: str, fix: str) -> None:
    log.warning("%s is a staging item left by an interrupted run of deepdream-analysis, but %s. %s.", path, why, fix)
