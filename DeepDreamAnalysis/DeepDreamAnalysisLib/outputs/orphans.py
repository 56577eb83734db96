"""Leftovers of a killed process outside a locked output folder, and the proof that they are the tool's.

Inside an output folder the lock file is the staging log that proves which hidden items a killed run
left (:mod:`.leftovers`). Two kinds of temporary items live elsewhere; here the proof is the item's
own record of the process that made it (:mod:`.processes`: PID, start time, boot) and that process
being gone. Every doubt keeps the item; nothing is ever followed through a link.

**The Slicer panel's worker folder** (``<temp>/deepdream-run-<nonce>``, :class:`RunFolder`): the
private folder a :class:`~..process_runner.ProcessRunner` hands its worker process (a copy of the
image, the job, the progress and snapshot files). **A study worker's scratch folder**: the copy of a
model a Ray worker loads (``<temp>/ddstudy-<nonce>``, removed once loaded), or of a custom feature's
file it imports (``<temp>/ddstudy-features-<nonce>``, removed when the worker exits). Each is made
with mode 0700; its first file, ``deepdream-owner``, names the folder's random 128-bit nonce, each
process that uses it (Slicer's process, then the worker) with its start time and the boot, and (a
study's scratch folder) each file the tool puts there, before it is created; it stays ``flock``-ed
for as long as a process using it lives (the panel's worker inherits the open file). A run that
ends removes its folder; a Slicer crash or a SIGKILL cannot, so :func:`remove_dead_run_folders` (at
each panel run's start, each start of the module's logic, and before a study worker makes such a
folder) removes a folder of the temporary folder only when all of this holds:

- its name is ``deepdream-run-``, ``ddstudy-`` or ``ddstudy-features-`` and 32 hex digits, it is a
  real folder (not a link), owned by you;
- it holds ``deepdream-owner``, a regular file owned by you, naming the same nonce;
- nobody holds the owner file's lock, and every process it names has ended;
- it holds nothing but regular files, owned by you, with no other link, with the names the tool
  writes there: ``volume.npy``, ``job.pkl``, ``worker.log``, ``progress.bin``, ``outcome.pkl``,
  ``snap-<n>.pkl``, their ``.part`` files (a panel run's); the files the owner file names (a
  study's), and Python's ``__pycache__/<name>.*.pyc`` of a logged ``<name>.py``.

A folder with anything else in it is left as it is, with a warning naming it; anything not proven
the tool's (an older version's ``deepdream-run-xxxxxxxx``, another user's, a link) is not touched.

**An atomic write's temporary file outside a locked folder** (``--out file.json`` of
``deepdream-analysis reference``, a model card, ...): :func:`new_temp` names it
``.<target>.deepdream-tmp-<pid>-<start>-<host>-<nonce>.tmp<suffix>`` (``<host>``: 8 hex digits of a
hash of the machine's name, so that a process of another machine writing into a shared folder is
never judged by this machine's process table); the writer holds the file's ``flock`` until the
write is over. The next atomic write of the same target (:func:`remove_dead_temps`) removes such a
file when its ``<host>`` is this machine's, the process it names has ended, nobody holds its lock,
and it is a regular file owned by you with no other link to it. A file you name that way yourself
is taken for a leftover.

Windows: nothing is removed (no ``flock``, no ``O_NOFOLLOW`` operations; ``os.kill`` cannot test a
process there).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import socket
import stat
import tempfile
from pathlib import Path

from . import processes

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

log = logging.getLogger(__name__)

SUPPORTED = (fcntl is not None and processes.CAN_TELL and hasattr(os, "O_NOFOLLOW") and hasattr(os, "O_DIRECTORY")
             and os.open in os.supports_dir_fd and os.unlink in os.supports_dir_fd
             and os.rmdir in os.supports_dir_fd and os.stat in os.supports_dir_fd and os.scandir in os.supports_fd)

# --- the worker's folder -------------------------------------------------------------------------

RUN_PREFIX = "deepdream-run-"
STUDY_PREFIX = "ddstudy-"
FEATURES_PREFIX = "ddstudy-features-"
OWNER_NAME = "deepdream-owner"
PYCACHE = "__pycache__"
_RUN_NAME = re.compile(r"^(deepdream-run-|ddstudy-features-|ddstudy-)([0-9a-f]{32})$")
_RUN_FILES = re.compile(r"^(?:volume\.npy|job\.pkl|worker\.log|progress\.bin|outcome\.pkl|snap-\d{1,12}\.pkl)"
                        r"(?:\.part)?$")
_OWNER_HEADER = "deepdream-analysis worker-folder {nonce}"
_OWNER_LINE = re.compile(r"^process (\d{1,7}) (\d{0,20}) ([0-9a-f]{0,32})$")
_FILE_LINE = re.compile(r'^file (".*")$')
_OWNER_MAX = 4096


def _owner_line(pid: int) -> str:
    pid, start, boot = processes.identity(pid)
    return f"process {pid} {start} {boot}\n"


class RunFolder:
    """A worker's private folder (see the module docstring). ``path``; ``fd``: the open, locked owner
    file (None where the system has no ``flock``): pass it to the worker (:attr:`pass_fds`) so the
    folder counts as in use for as long as the worker lives."""

    def __init__(self, path: Path, fd: int | None):
        self.path = path
        self.fd = fd

    @classmethod
    def create(cls, base: str | os.PathLike | None = None, prefix: str = RUN_PREFIX) -> "RunFolder":
        """A new folder ``<base>/<prefix><nonce>`` (``prefix``: :data:`RUN_PREFIX`, or :data:`STUDY_PREFIX`
        or :data:`FEATURES_PREFIX` for one whose files are logged with :meth:`add_file`)."""
        if prefix not in (RUN_PREFIX, STUDY_PREFIX, FEATURES_PREFIX):
            raise ValueError(f"unknown kind of temporary folder: {prefix!r}")
        base = Path(base if base is not None else tempfile.gettempdir())
        if not SUPPORTED:  # pragma: no cover - Windows
            return cls(Path(tempfile.mkdtemp(prefix=prefix, dir=base)), None)
        for _ in range(100):
            nonce = secrets.token_hex(16)
            path = base / f"{prefix}{nonce}"
            try:
                os.mkdir(path, 0o700)
                break
            except FileExistsError:
                continue
        else:  # pragma: no cover - 100 random 128-bit names taken
            raise FileExistsError(f"no free name for a temporary folder in {base}")
        fd = None
        try:
            dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
            try:
                os.fchmod(dfd, 0o700)  # the image of a patient in a shared temporary folder: yours only
                fd = os.open(OWNER_NAME, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_APPEND, 0o600,
                             dir_fd=dfd)
            finally:
                os.close(dfd)
            fcntl.flock(fd, fcntl.LOCK_EX)  # held while this process or the worker lives
            os.write(fd, (_OWNER_HEADER.format(nonce=nonce) + "\n" + _owner_line(os.getpid())).encode("ascii"))
        except BaseException:
            if fd is not None:
                os.close(fd)
            shutil.rmtree(path, ignore_errors=True)
            raise
        return cls(path, fd)

    @property
    def pass_fds(self) -> tuple[int, ...]:
        return () if self.fd is None else (self.fd,)

    def add_file(self, name: str) -> Path:
        """Log the file ``name`` (a plain name) as the tool's, before the caller creates it; its path."""
        if not _plain_name(name) or name in (OWNER_NAME, PYCACHE):
            raise ValueError(f"not a name for a file of a temporary folder: {name!r}")
        if self.fd is not None:
            os.write(self.fd, f"file {json.dumps(name)}\n".encode("ascii"))
        return self.path / name

    def add_process(self, pid: int) -> None:
        """Record a process that uses the folder (the worker), before anything else can happen."""
        if self.fd is not None:
            try:
                os.write(self.fd, _owner_line(pid).encode("ascii"))
            except OSError:  # the lock it inherited keeps the folder in use all the same
                pass

    def remove(self) -> None:
        """Delete the folder (this process's own), then let go of the owner file."""
        shutil.rmtree(self.path, ignore_errors=True)
        if self.fd is not None:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = None


def _plain_name(name) -> bool:
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\0" not in name \
        and (os.altsep is None or os.altsep not in name)


def _parse_owner(data: bytes, nonce: str) -> tuple[list[tuple[int, str, str]], set[str]] | None:
    """The processes and the files an owner file names, or None when it is not the owner file of the
    folder ``nonce``."""
    try:
        lines = data.decode("ascii").split("\n")
    except UnicodeDecodeError:
        return None
    if lines[0] != _OWNER_HEADER.format(nonce=nonce):
        return None
    owners, files = [], set()
    for line in lines[1:-1]:  # the last piece follows the last newline: "" or a line cut short by a kill
        m = _OWNER_LINE.match(line)
        if m is not None:
            owners.append((int(m.group(1)), m.group(2), m.group(3)))
            continue
        m = _FILE_LINE.match(line)
        try:
            name = json.loads(m.group(1)) if m is not None else None
        except ValueError:
            name = None
        if not _plain_name(name):
            return None
        files.add(name)
    return (owners, files) if owners else None


def _own_plain_file(st: os.stat_result) -> bool:
    return stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid() and st.st_nlink == 1


def remove_dead_run_folders(base: str | os.PathLike | None = None) -> list[Path]:
    """Remove the worker folders (a panel run's, a study worker's) in ``base`` (default: the temporary
    folder) whose processes have all ended (see the module docstring); returns those removed. Never
    raises for a folder: one it cannot remove is kept, with a warning when it is the tool's."""
    if not SUPPORTED:  # pragma: no cover - Windows
        return []
    base = os.fspath(base if base is not None else tempfile.gettempdir())
    try:
        bfd = os.open(base, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return []
    removed = []
    try:
        with os.scandir(bfd) as it:
            names = [e.name for e in it if _RUN_NAME.match(e.name)]
        for name in names:
            try:
                if _remove_run_folder(base, bfd, name):
                    removed.append(Path(base) / name)
            except OSError as exc:
                log.warning("%s is a worker folder of deepdream-analysis whose processes have ended, but it could not "
                            "be removed (%s). Delete it yourself.", os.path.join(base, name), exc.strerror or exc)
    finally:
        os.close(bfd)
    return removed


def _remove_run_folder(base: str, bfd: int, name: str) -> bool:
    kind, nonce = _RUN_NAME.match(name).groups()
    try:
        st = os.stat(name, dir_fd=bfd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        return False  # a link, a file, another user's folder: not ours
    try:
        dfd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=bfd)
    except OSError:
        return False
    try:
        here = os.fstat(dfd)
        if (here.st_dev, here.st_ino) != (st.st_dev, st.st_ino):
            return False  # replaced since it was looked at
        try:
            ofd = os.open(OWNER_NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dfd)
        except OSError:
            return False  # no owner file (an older version's folder, or not the tool's)
        try:
            ost = os.fstat(ofd)
            if not _own_plain_file(ost) or ost.st_size > _OWNER_MAX:
                return False
            try:
                fcntl.flock(ofd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return False  # in use: a live run holds it (or another start is cleaning it up)
            parsed = _parse_owner(os.pread(ofd, _OWNER_MAX, 0), nonce)
            if parsed is None or not all(processes.is_gone(*owner) for owner in parsed[0]):
                return False  # not the tool's owner file, or a process that uses the folder still lives
            files = None if kind == RUN_PREFIX else parsed[1]
            with os.scandir(dfd) as it:
                entries = [(e.name, e.stat(follow_symlinks=False)) for e in it]
            cache = [] if any(n == PYCACHE for n, _ in entries) else None
            foreign = sorted(n for n, s in entries if n != OWNER_NAME and not _ours(n, s, files, dfd, cache))
            if foreign:
                shown = ", ".join(foreign[:5]) + (f", ... ({len(foreign)} in all)" if len(foreign) > 5 else "")
                log.warning("%s is the temporary folder of a %s of deepdream-analysis that has ended, but it holds %s, "
                            "which the tool did not put there, so the tool left the folder as it is. Move your files "
                            "out of it (the next run then deletes the rest), or delete the folder yourself.",
                            os.path.join(base, name), "Slicer panel run" if files is None else "study worker", shown)
                return False
            if cache:
                _remove_pycache(dfd, cache)
            for entry, _ in entries:
                if entry not in (OWNER_NAME, PYCACHE):
                    os.unlink(entry, dir_fd=dfd)
            os.unlink(OWNER_NAME, dir_fd=dfd)  # last: until here a second look still finds the proof
        finally:
            os.close(ofd)
    finally:
        os.close(dfd)
    os.rmdir(name, dir_fd=bfd)
    return True


def _ours(name: str, st: os.stat_result, files: set[str] | None, dfd: int, cache: list | None) -> bool:
    """Whether the entry ``name`` of a dead worker's folder is one the tool writes there."""
    if name == PYCACHE:
        return files is not None and _pycache_ours(dfd, st, files, cache)
    if not _own_plain_file(st):
        return False
    return _RUN_FILES.match(name) is not None if files is None else name in files


def _pycache_ours(dfd: int, st: os.stat_result, files: set[str], cache: list) -> bool:
    """Python's byte-code cache of a logged ``.py`` file (a custom feature imported from the folder):
    a real folder of yours holding only ``<stem>.<tag>.pyc`` files of logged ``<stem>.py`` files."""
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        return False
    stems = {f[:-3] for f in files if f.endswith(".py")}
    fd = os.open(PYCACHE, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dfd)
    try:
        with os.scandir(fd) as it:
            inside = [(e.name, e.stat(follow_symlinks=False)) for e in it]
    finally:
        os.close(fd)
    for n, s in inside:
        stem, _, rest = n.partition(".")
        if not (_own_plain_file(s) and stem in stems and re.fullmatch(r"[A-Za-z0-9_-]+(?:\.opt-[12])?\.pyc", rest)):
            return False
    cache.extend(n for n, _ in inside)
    return True


def _remove_pycache(dfd: int, names: list[str]) -> None:
    fd = os.open(PYCACHE, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dfd)
    try:
        for n in names:
            os.unlink(n, dir_fd=fd)
    finally:
        os.close(fd)
    os.rmdir(PYCACHE, dir_fd=dfd)


# --- an atomic write's temporary file outside a locked folder ------------------------------------

TEMP_MARK = ".deepdream-tmp-"
_NAME_KEPT = 100  # bytes of the target's name kept in its temporary file's name (a name has at most 255)


def host_tag() -> str:
    """8 hex digits naming this machine in temporary file names."""
    return hashlib.sha256(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:8]


def _temp_prefix(name: str) -> str:
    kept = name.encode("utf-8", "surrogateescape")[:_NAME_KEPT].decode("utf-8", "ignore")
    return f".{kept}{TEMP_MARK}"


def new_temp(target: Path, suffix: str) -> tuple[str, int | None]:
    """Create the empty temporary file for an atomic write of ``target``, named after it and this process
    (see the module docstring), mode 0600; returns its path and an open descriptor of it holding its
    ``flock`` (close it once the write is over; None where there is no ``flock``)."""
    pid, start, _ = processes.identity()
    prefix = _temp_prefix(target.name)
    for _ in range(100):
        path = target.parent / f"{prefix}{pid}-{start or 0}-{host_tag()}-{secrets.token_hex(8)}{suffix}"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
        except FileExistsError:  # pragma: no cover - a 64-bit random name taken
            continue
        if fcntl is None:  # pragma: no cover - Windows
            os.close(fd)
            return str(path), None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new file: nobody else holds it
        except OSError:  # pragma: no cover - a file system without flock: the PID alone proves it
            pass
        return str(path), fd
    raise FileExistsError(f"no free temporary name beside {target}")  # pragma: no cover


def remove_dead_temps(target: str | os.PathLike) -> list[str]:
    """Remove the temporary files of earlier atomic writes of ``target`` whose processes have ended (see
    the module docstring); returns their names. Never raises."""
    if not SUPPORTED:  # pragma: no cover - Windows
        return []
    target = Path(target)
    pattern = re.compile(re.escape(_temp_prefix(target.name)) + r"(\d{1,7})-(\d{1,20})-([0-9a-f]{8})-[0-9a-f]{16}"
                         r"\.tmp(?:\..*)?$", re.DOTALL)
    host = host_tag()
    removed = []
    try:
        dfd = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return []
    try:
        with os.scandir(dfd) as it:
            found = [(e.name, m) for e in it for m in [pattern.match(e.name)] if m]
        for name, m in found:
            if m.group(3) != host:
                continue  # another machine's process (a shared folder): not this machine's to judge
            start = "" if m.group(2) == "0" else m.group(2)
            if not processes.is_gone(int(m.group(1)), start):
                continue  # a write going on now
            try:
                if _remove_temp(dfd, name):
                    removed.append(name)
            except OSError:
                pass
    finally:
        os.close(dfd)
    return removed


def _remove_temp(dfd: int, name: str) -> bool:
    """Unlink ``name`` in ``dfd`` if it is a plain file of yours that no process holds the lock of."""
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dfd)  # a link: refused (ELOOP)
    try:
        st = os.fstat(fd)
        if not _own_plain_file(st):
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False  # its writer still holds it (a process this machine cannot see, e.g. in a container)
        now = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
            return False  # replaced since it was opened
        os.unlink(name, dir_fd=dfd)
        return True
    finally:
        os.close(fd)
