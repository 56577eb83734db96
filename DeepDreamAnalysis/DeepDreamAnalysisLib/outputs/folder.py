"""The checks made on an output folder before any work starts.

:func:`check_output_folder` refuses, with a message naming the problem and the fix:

- an output folder that holds one of the run's inputs (image, model, card, reference) or lies inside
  one of them (a DICOM folder, a bundle folder): writing there could replace or delete the input;
- a folder that is not empty and has no manifest (it is not a results folder of this tool), unless
  ``overwrite`` (``--overwrite``): then the tool writes beside the files there, and still never
  replaces or deletes any file it did not write;
- a folder another run is writing into (:mod:`.lock`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from ..errors import OutputError
from .lock import LOCK_NAME, FolderLock
from .manifest import MANIFEST_NAME, changed_message, read_manifest, verify


def _real(path) -> str:
    try:
        return os.path.realpath(os.path.abspath(os.fspath(path)))
    except (ValueError, OSError):  # a NUL in the path: the reader's own check names it
        return os.fspath(path)


def _inside(child: str, parent: str) -> bool:
    return child == parent or child.startswith(parent.rstrip(os.sep) + os.sep)


def inputs_inside(out: str | os.PathLike, inputs: Iterable) -> list[tuple[str, str]]:
    """``(input, how)`` for each input that lies inside ``out`` or that ``out`` lies inside."""
    out_real = _real(out)
    found = []
    for item in inputs:
        if item is None:
            continue
        real = _real(item)
        if _inside(real, out_real):
            found.append((os.fspath(item), "is inside the output folder"))
        elif _inside(out_real, real):
            found.append((os.fspath(item), "contains the output folder"))
    return found


OUTPUT_NAMES = ("curves.csv", "run.json", "report.html", "curves.png", "strip.png", "sensitivity.csv")
"""Files a run writes at the top of its folder (snapshots go to ``snapshots/iter_*``)."""


def foreign_outputs(path: Path, manifest=None, names: Iterable[str] = OUTPUT_NAMES,
                    snapshots: bool = True) -> list[str]:
    """Files in ``path`` that have the name of an output (``names``, and ``snapshots/iter_*``) but are
    not the tool's: not in its manifest, or no longer as the tool wrote them (relative paths).

    Checked before the run, so a file in the way is named before any work is done (each write checks
    again, see :class:`.manifest.ManifestWriter`)."""
    owned, _ = verify(path, manifest)
    found = [n for n in names if os.path.lexists(path / n) and n not in owned]
    snaps = path / "snapshots"
    if not snapshots:
        pass
    elif snaps.is_dir() and not snaps.is_symlink():
        found += sorted(f"snapshots/{p.name}" for p in snaps.iterdir()
                        if p.name.startswith("iter_") and f"snapshots/{p.name}" not in owned)
    elif os.path.lexists(snaps) and "snapshots" not in owned:
        found.append("snapshots")
    return found


@dataclass
class OutputFolder:
    """A checked, locked output folder. ``created``: the outermost folder this run made (or None)."""

    path: Path
    created: Path | None
    lock: FolderLock

    def release(self, remove_if_empty: bool = False) -> None:
        self.lock.release()
        if remove_if_empty and self.created is not None:
            for p in [self.path, *self.path.parents]:
                try:
                    p.rmdir()
                except OSError:
                    return
                if p == self.created:
                    return

    def __enter__(self) -> "OutputFolder":
        return self

    def __exit__(self, *exc) -> bool:
        self.release()
        return False


def check_output_folder(out: str | os.PathLike, inputs: Iterable = (), overwrite: bool = False,
                        what: str = "--out", names: Iterable[str] = OUTPUT_NAMES,
                        snapshots: bool = True) -> OutputFolder:
    """Check, create and lock the output folder ``out``; see the module docstring.

    ``names`` (and ``snapshots/iter_*`` when ``snapshots``): the files the command will write at the
    top of the folder, checked before any work starts (a file of those names the tool did not write
    is in the way)."""
    path = Path(out).expanduser()
    clash = inputs_inside(path, inputs)
    if clash:
        item, how = clash[0]
        raise OutputError(
            f"The output folder {path} cannot be used: the input {item} {how}, and writing results there could "
            f"replace or delete it. Choose an output folder ({what}) outside the inputs, e.g. a new folder "
            "beside them."
        )
    if os.path.lexists(path) and not path.is_dir():
        raise OutputError(f"The output path {path} exists and is not a folder. Choose a folder ({what}).")
    created = None
    for p in [path, *path.parents]:
        if p.exists():
            break
        created = p
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"Cannot write into the output folder {path} ({exc.strerror or exc}). Choose a writable "
                          "folder.") from None
    lock = FolderLock(path).acquire()
    try:
        manifest = listed = read_manifest(path)
        why_not = f"no {MANIFEST_NAME}"
        if manifest is not None:
            owned, changed = verify(path, manifest)
            if changed and not any(os.path.lexists(path / rel) for rel in owned):
                manifest = None  # nothing it lists is what the tool wrote: a forged or copied manifest
                why_not = f"its {MANIFEST_NAME} lists no file as the tool wrote it"
        if manifest is None and not overwrite:
            others = sorted(p.name for p in path.iterdir() if p.name not in (LOCK_NAME, MANIFEST_NAME))
            if others:
                shown = ", ".join(others[:5]) + (f", ... ({len(others)} in all)" if len(others) > 5 else "")
                hidden = [n for n in others if n.startswith(".")]
                raise OutputError(
                    f"The output folder {path} is not empty ({shown}) and holds no results of this tool "
                    f"({why_not}). Choose a new or empty folder, or pass --overwrite to write beside those "
                    "files (the tool never replaces or deletes a file it did not write)."
                    + (f" Hidden items such as {hidden[0]} are not ones this tool logged as its own (an older "
                       "version's leftovers, or yours): look inside and delete them yourself if they are old "
                       "results." if hidden else "")
                )
        in_the_way = foreign_outputs(path, manifest, names, snapshots)
        _, changed = verify(path, listed)
        if in_the_way and in_the_way[0] in changed:
            raise OutputError(changed_message(path, in_the_way[0], changed[in_the_way[0]]))
        if in_the_way:
            raise OutputError(
                f"{path / in_the_way[0]} is in the way: the tool did not write it (it is not listed in "
                f"{path / MANIFEST_NAME}), so it will not replace it. Move that file away, or choose another output "
                "folder." + (f" ({len(in_the_way)} such files.)" if len(in_the_way) > 1 else "")
            )
    except BaseException:
        lock.release()
        if created is not None:
            OutputFolder(path, created, FolderLock(path)).release(remove_if_empty=True)
        raise
    return OutputFolder(path=path, created=created, lock=lock)
