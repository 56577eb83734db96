"""``deepdream-manifest.json``: the files the tool wrote into an output folder.

Format (JSON object): ``{"tool": "deepdream-analysis", "complete": bool, "files": [relative posix
paths, sorted], "records": {path: {"size": bytes, "mtime_ns": int, "sha256": hex}}, "pending":
{path: record}}``. ``complete`` is false while a write is going on (and stays false when it was
interrupted: the folder then holds a partial result, each file in it whole). ``pending`` holds the
record of a file the tool has written under a hidden temporary name and is about to rename into
place: a process killed between the rename and the final record (a study's worker at Ctrl-C) leaves
a file that matches its pending record, so the next run still knows it as the tool's.

Each record says what the tool wrote: the size and modification time (ns) of the file, and its
sha256 for files up to :data:`HASH_LIMIT` bytes. A listed file is the tool's only while it still
matches its record (same size, and the same sha256 where one is recorded, else the same mtime): a
manifest forged by hand, copied from another folder or written by an older version (no records)
cannot make a rerun replace or delete a user's file. Such a file is left alone; replacing it is
refused with a message naming it (:func:`changed_message`), and a stale one is kept with a warning.

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

import hashlib
import json
import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from .. import atomic
from ..errors import OutputError

log = logging.getLogger(__name__)

MANIFEST_NAME = "deepdream-manifest.json"
TOOL = "deepdream-analysis"
HASH_LIMIT = 16 << 20
"""Files up to this size (bytes) are recorded with their sha256 (a copied results folder stays the
tool's); larger ones by size and mtime only."""


@dataclass
class Manifest:
    """The parsed manifest: ``files`` relative posix paths; ``complete`` False for a partial write;
    ``records`` path -> ``{"size", "mtime_ns", "sha256"?}`` (what the tool wrote); ``pending`` path ->
    the record of what the tool was about to rename there (an interrupted write)."""

    files: list[str] = field(default_factory=list)
    complete: bool = True
    records: dict[str, dict] = field(default_factory=dict)
    pending: dict[str, dict] = field(default_factory=dict)


def file_record(path: str | os.PathLike) -> dict:
    """What the manifest records of a file just written: size (bytes), mtime (ns), sha256 (small files)."""
    st = os.lstat(path)
    rec = {"size": int(st.st_size), "mtime_ns": int(st.st_mtime_ns)}
    if st.st_size <= HASH_LIMIT:
        rec["sha256"] = _sha256(path)
    return rec


def _sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _valid_record(rec) -> bool:
    return (isinstance(rec, dict) and all(isinstance(rec.get(k), int) and not isinstance(rec.get(k), bool)
                                          for k in ("size", "mtime_ns"))
            and (rec.get("sha256") is None or isinstance(rec.get("sha256"), str)))


def why_changed(folder: Path, rel: str, record: dict | None) -> str | None:
    """None when ``folder/rel`` is absent or still the file the tool wrote (``record``); else why not."""
    path = Path(folder) / rel
    parent = os.path.dirname(rel)
    if parent and os.path.realpath(Path(folder) / parent) != os.path.join(os.path.realpath(folder), parent):
        return "its folder is now a link to another folder"
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"it cannot be checked ({exc.strerror or exc})"
    if record is None:
        return "the manifest has no record of what the tool wrote there (an older version's manifest, or one edited by hand)"
    if not stat.S_ISREG(st.st_mode):
        return "it is no longer a regular file"
    if st.st_size != record["size"]:
        return f"its size is {st.st_size} bytes, the tool wrote {record['size']}"
    if record.get("sha256"):
        try:
            same = _sha256(path) == record["sha256"]
        except OSError as exc:
            return f"it cannot be read ({exc.strerror or exc})"
        return None if same else "its contents differ from what the tool wrote"
    if st.st_mtime_ns != record["mtime_ns"]:
        return "it was modified after the tool wrote it"
    return None


def changed_message(folder: Path, rel: str, why: str) -> str:
    """The message for a listed file that is no longer what the tool wrote (the problem and the fix)."""
    return (f"{Path(folder) / rel} is listed in {Path(folder) / MANIFEST_NAME} but is not the file the tool wrote "
            f"({why}), so it may be yours: the tool will not replace or delete it. Move that file away (or delete it "
            "yourself if it is an old result), or choose another output folder.")


def verify(folder: str | os.PathLike, manifest: "Manifest | None") -> tuple[set[str], dict[str, str]]:
    """``(owned, changed)``: the listed files that are still what the tool wrote (or gone), and the
    listed files that are not (relative path -> why), see :func:`why_changed`."""
    owned: set[str] = set()
    changed: dict[str, str] = {}
    if manifest is None:
        return owned, changed
    for rel in manifest.files:
        why = why_changed(Path(folder), rel, manifest.records.get(rel))
        if why is not None and rel in manifest.pending:  # renamed into place, then interrupted?
            why = why_changed(Path(folder), rel, manifest.pending[rel])
            if why is None:
                manifest.records[rel] = manifest.pending[rel]  # the file the tool was placing: its own
        if why is None:
            owned.add(rel)
        else:
            changed[rel] = why
    return owned, changed


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
    records, pending = (_records(data.get(key), safe) for key in ("records", "pending"))
    return Manifest(files=safe, complete=bool(data.get("complete", True)), records=records, pending=pending)


def _records(value, files: list[str]) -> dict[str, dict]:
    """The valid records of ``value`` (a manifest's ``records`` or ``pending``) for listed ``files``."""
    if not isinstance(value, dict):
        return {}
    return {k: v for k, v in value.items() if k in files and _valid_record(v)}


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
        self.owned, self.changed = verify(self.folder, old)
        """``owned``: the previous run's files still as the tool wrote them; ``changed``: listed files
        that are not (path -> why): never replaced or deleted."""
        self.records: dict[str, dict] = {r: old.records[r] for r in self.owned if r in old.records} if old else {}
        self.pending: dict[str, dict] = {}
        """path -> record of the file about to be renamed there (:meth:`about_to_place`)."""
        self.left_alone: list[str] = []
        """Files of ``changed`` that :meth:`finish` kept (each with a warning)."""
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
        if rel in self.changed and rel not in self.written:
            return False
        return rel in self.owned or rel in self.written or rel in self._claimed or rel == MANIFEST_NAME

    # -- writing
    def claim(self, path: str | os.PathLike, save: bool = True) -> None:
        """Before writing ``path``: refuse when a file the tool did not write is there; list it (``save``:
        in the manifest file at once)."""
        rel = self.relative(path)
        if rel is None or rel == MANIFEST_NAME or any(p.startswith(".") for p in rel.split("/")):
            return  # outside the folder, or a hidden staging file of ours
        if self.reaches_through_a_link(rel):
            raise OutputError(
                f"{self.folder / os.path.dirname(rel)} is a link to another folder: the tool writes only into folders "
                "it made. Remove the link, or choose another output folder.")
        if os.path.lexists(path) and rel in self.changed and rel not in self.written:
            raise OutputError(changed_message(self.folder, rel, self.changed[rel]))
        if os.path.lexists(path) and not self.is_ours(rel):
            raise OutputError(
                f"{path} is in the way: the tool did not write it (it is not listed in {self.folder / MANIFEST_NAME}), "
                "so it will not replace it. Move that file away, or choose another output folder."
            )
        if rel not in self._claimed and rel not in self.owned:
            self._claimed.add(rel)
            if save:
                self._save(complete=False)

    def about_to_place(self, path: str | os.PathLike, staged: str | os.PathLike, save: bool = True) -> None:
        """Before the complete file ``staged`` is renamed to ``path`` (claimed): note what will be
        there (``save``: in the manifest file at once), so a process killed right after the rename
        leaves a file the next run recognises (a rename keeps size, contents and mtime)."""
        rel = self.relative(path)
        if rel is None or rel == MANIFEST_NAME or any(p.startswith(".") for p in rel.split("/")):
            return
        try:
            self.pending[rel] = file_record(staged)
        except OSError:
            return
        if save:
            self._save(complete=False)

    def record(self, path: str | os.PathLike, save: bool = True) -> None:
        """After ``path`` was written completely (``save``: list it in the manifest file at once)."""
        rel = self.relative(path)
        if rel is not None and rel != MANIFEST_NAME and not any(p.startswith(".") for p in rel.split("/")):
            placed = self.pending.pop(rel, None)
            try:
                st = os.lstat(path)
                if placed is not None and (st.st_size, st.st_mtime_ns) == (placed["size"], placed["mtime_ns"]):
                    self.records[rel] = placed  # the file just renamed into place: hashed once, before the rename
                else:
                    self.records[rel] = file_record(path)
            except OSError:
                self.records.pop(rel, None)
            self.written.add(rel)
            self.changed.pop(rel, None)
            if save:
                self._save(complete=False)  # at once: an interruption never leaves a file of ours unrecorded

    def keep(self, path: str | os.PathLike) -> bool:
        """Keep a file of the previous run that this run does not write again (:meth:`finish` would
        delete it otherwise); False when it is not the tool's."""
        rel = self.relative(path)
        if rel is None or rel not in self.owned or not os.path.lexists(path):
            return False
        self.written.add(rel)
        return True

    def begin(self) -> None:
        self._save(complete=False)

    def move_files(self, staging: Path, dest: Path) -> None:
        """Move every file of the (hidden) folder ``staging`` into ``dest``, one atomic rename each."""
        sources = [src for src in sorted(staging.iterdir()) if src.is_file()]
        for src in sources:  # every name checked and listed, with what will be there (one manifest write)
            self.claim(dest / src.name, save=False)
            self.about_to_place(dest / src.name, src, save=False)
        if sources:
            self._save(complete=False)
        moved = []
        try:
            for src in sources:
                target = dest / src.name
                try:
                    dest.mkdir(parents=True, exist_ok=True)
                    os.replace(src, target)
                except OSError as exc:
                    raise OutputError(f"Cannot write {target} ({exc.strerror or exc}). Check free space and "
                                      "permissions.") from None
                self.record(target, save=False)
                moved.append(target)
        finally:
            if moved:
                self._save(complete=False)  # one manifest write for all the renames

    def finish(self) -> list[str]:
        """Delete the previous run's files this run did not write again; write the final manifest.

        Returns the relative paths deleted."""
        stale = sorted(self.owned - self.written)
        deleted = []
        for rel in stale:
            path = self.folder / rel
            if self.reaches_through_a_link(rel):
                continue  # the name is ours, the folder it now points to is not: keep it, delete nothing there
            why = why_changed(self.folder, rel, self.records.get(rel))
            if why is not None:  # changed while this run went on: not ours any more
                self.changed[rel] = why
                continue
            try:
                if path.is_file():
                    path.unlink()
                    deleted.append(rel)
            except OSError:
                continue  # kept: listed again below so the next run still knows it is ours
        kept = {rel for rel in stale if rel not in deleted and rel not in self.changed
                and os.path.lexists(self.folder / rel)}
        for rel in deleted:  # a folder of ours (snapshots/) left empty goes too
            parent = (self.folder / rel).parent
            if parent != self.folder:
                try:
                    parent.rmdir()
                except OSError:
                    pass
        self.owned = set(self.written) | kept
        self._claimed.clear()
        self.left_alone = sorted(r for r in self.changed if os.path.lexists(self.folder / r))
        for rel in self.left_alone:
            log.warning("%s", changed_message(self.folder, rel, self.changed[rel]).replace(
                "the tool will not replace or delete it", "the tool left it as it is"))
        self.pending.clear()  # every rename of this run is recorded (or never happened)
        self._save(complete=True)
        return deleted

    def _save(self, complete: bool) -> None:
        files = sorted(self.owned | self.written | self._claimed)
        records = {r: self.records[r] for r in files if r in self.records}
        pending = {r: self.pending[r] for r in files if r in self.pending}
        text = json.dumps({"tool": TOOL, "complete": complete, "files": files, "records": records, "pending": pending},
                          indent=1) + "\n"
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
