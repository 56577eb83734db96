"""``deepdream-manifest.json``: the files the tool wrote into an output folder.

Format (JSON object): ``{"tool": "deepdream-analysis", "complete": bool, "files": [relative posix
paths, sorted]}``. ``complete`` is false while a write is going on (and stays false when it was
interrupted: the folder then holds a partial result, each file in it whole).

:class:`ManifestWriter` is the only way the writers touch an output folder:

- before a file is written, :meth:`~ManifestWriter.claim` checks that no file the tool did not write
  is in the way (OutputError naming it otherwise) and lists it in the manifest first, so an
  interruption never leaves a file of ours that the next run would not recognise;
- :meth:`~ManifestWriter.finish` deletes the files of the previous run that this one did not write
  again (only those: they are in the old manifest) and writes the final manifest.

Atomic writes (:mod:`..atomic`) call :meth:`claim` themselves while a writer is active, so every
writer that uses them is covered without knowing about manifests.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from .. import atomic
from ..errors import OutputError

MANIFEST_NAME = "deepdream-manifest.json"
TOOL = "deepdream-analysis"


@dataclass
class Manifest:
    """The parsed manifest: ``files`` relative posix paths; ``complete`` False for a partial write."""

    files: list[str] = field(default_factory=list)
    complete: bool = True


def read_manifest(folder: str | os.PathLike) -> Manifest | None:
    """The folder's manifest, None when it has none; OutputError when it is unreadable."""
    path = Path(folder) / MANIFEST_NAME
    if not os.path.lexists(path):
        return None
    try:
        if not path.is_file() or path.stat().st_size > 4 << 20:
            raise ValueError("not a small regular file")
        data = json.loads(path.read_text(encoding="utf-8"))
        files = data["files"]
        if data.get("tool") != TOOL or not isinstance(files, list) or not all(isinstance(f, str) for f in files):
            raise ValueError("not a deepdream-analysis manifest")
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
        raise OutputError(
            f"{path} cannot be read ({exc}), so the tool cannot tell which files in {folder} it wrote and will not "
            "write there. Choose another output folder (or delete the folder's old results yourself)."
        ) from None
    safe = [f for f in files if _is_safe_relative(f)]
    return Manifest(files=safe, complete=bool(data.get("complete", True)))


def _is_safe_relative(rel: str) -> bool:
    """A manifest entry may only name a path inside the folder (no '..', no absolute path)."""
    parts = rel.split("/")
    return bool(rel) and not rel.startswith("/") and "\\" not in rel and all(p not in ("", ".", "..") for p in parts) \
        and ":" not in parts[0]


class ManifestWriter:
    """Writes into ``folder`` only over files listed in its manifest; see the module docstring.

    Use as a context manager: while active, atomic writes into the folder go through :meth:`claim`.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        old = read_manifest(self.folder)
        self.owned: set[str] = set(old.files) if old else set()
        self.written: set[str] = set()
        self._claimed: set[str] = set()
        self._token = None

    # -- paths
    def relative(self, path: str | os.PathLike) -> str | None:
        """``path`` relative to the folder (posix), or None when it lies outside it."""
        try:
            rel = Path(os.path.abspath(path)).relative_to(os.path.abspath(self.folder))
        except ValueError:
            return None
        return rel.as_posix()

    def reaches_through_a_link(self, rel: str) -> bool:
        """True when a folder between the output folder and ``rel`` is a link (or not a folder): the
        path's name is ours, but what it points to may be a user's folder elsewhere."""
        parent = os.path.dirname(rel)
        if not parent:
            return False
        expected = os.path.join(os.path.realpath(self.folder), parent)
        return os.path.realpath(self.folder / parent) != expected

    def is_ours(self, rel: str) -> bool:
        return rel in self.owned or rel in self.written or rel in self._claimed or rel == MANIFEST_NAME

    # -- writing
    def claim(self, path: str | os.PathLike) -> None:
        """Before writing ``path``: refuse when a file the tool did not write is there; list it."""
        rel = self.relative(path)
        if rel is None or rel == MANIFEST_NAME or any(p.startswith(".") for p in rel.split("/")):
            return  # outside the folder, or a hidden staging file of ours
        if self.reaches_through_a_link(rel):
            raise OutputError(
                f"{self.folder / os.path.dirname(rel)} is a link to another folder: the tool writes only into folders "
                "it made. Remove the link, or choose another output folder.")
        if os.path.lexists(path) and not self.is_ours(rel):
            raise OutputError(
                f"{path} is in the way: the tool did not write it (it is not listed in {self.folder / MANIFEST_NAME}), "
                "so it will not replace it. Move that file away, or choose another output folder."
            )
        if rel not in self._claimed and rel not in self.owned:
            self._claimed.add(rel)
            self._save(complete=False)

    def record(self, path: str | os.PathLike) -> None:
        """After ``path`` was written completely."""
        rel = self.relative(path)
        if rel is not None and rel != MANIFEST_NAME and not any(p.startswith(".") for p in rel.split("/")):
            self.written.add(rel)

    def begin(self) -> None:
        self._save(complete=False)

    def move_files(self, staging: Path, dest: Path) -> None:
        """Move every file of the (hidden) folder ``staging`` into ``dest``, one atomic rename each."""
        for src in sorted(staging.iterdir()):
            if not src.is_file():
                continue
            target = dest / src.name
            self.claim(target)
            try:
                dest.mkdir(parents=True, exist_ok=True)
                os.replace(src, target)
            except OSError as exc:
                raise OutputError(f"Cannot write {target} ({exc.strerror or exc}). Check free space and "
                                  "permissions.") from None
            self.record(target)

    def finish(self) -> list[str]:
        """Delete the previous run's files this run did not write again; write the final manifest.

        Returns the relative paths deleted."""
        stale = sorted(self.owned - self.written)
        deleted = []
        for rel in stale:
            path = self.folder / rel
            if self.reaches_through_a_link(rel):
                continue  # the name is ours, the folder it now points to is not: keep it, delete nothing there
            try:
                if path.is_symlink() or path.is_file():
                    path.unlink()
                    deleted.append(rel)
            except OSError:
                continue  # kept: listed again below so the next run still knows it is ours
        kept = {rel for rel in stale if rel not in deleted and os.path.lexists(self.folder / rel)}
        for rel in deleted:  # a folder of ours (snapshots/) left empty goes too
            parent = (self.folder / rel).parent
            if parent != self.folder:
                try:
                    parent.rmdir()
                except OSError:
                    pass
        self.owned = set(self.written) | kept
        self._claimed.clear()
        self._save(complete=True)
        return deleted

    def _save(self, complete: bool) -> None:
        files = sorted(self.owned | self.written | self._claimed)
        text = json.dumps({"tool": TOOL, "complete": complete, "files": files}, indent=1) + "\n"
        token = atomic.WRITE_GUARD.set(None)  # the manifest itself is not claimed
        try:
            atomic.write_text_atomic(self.folder / MANIFEST_NAME, text)
        finally:
            atomic.WRITE_GUARD.reset(token)

    def __enter__(self) -> "ManifestWriter":
        self._token = atomic.WRITE_GUARD.set(self)
        return self

    def __exit__(self, *exc) -> bool:
        if self._token is not None:
            atomic.WRITE_GUARD.reset(self._token)
            self._token = None
        return False
