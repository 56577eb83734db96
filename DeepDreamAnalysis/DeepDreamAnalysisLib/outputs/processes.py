"""Who a process is, and whether it is gone: the proof that a leftover's maker can no longer use it.

A process is named by its PID, its start time (Linux: clock ticks after boot, from ``/proc``) and the
machine's boot id, so a PID the system gave to a later process is not taken for the one that made a
leftover. Every doubt counts as *alive*: a leftover is only ever removed when its maker is surely
gone, never on a guess.

- :func:`identity`: ``(pid, start, boot)`` of a process (this one by default).
- :func:`is_gone`: True only when that process has ended: no process has the PID, or the process
  with the PID started at another time or in another boot, or it is a zombie (ended, not yet reaped)
  none of whose threads still runs.
  A PID out of range, an unknown start time with the PID in use, or a system without ``/proc`` and
  ``kill(pid, 0)`` (Windows, where ``os.kill`` would end the process) count as alive.
"""

from __future__ import annotations

import os

PID_MAX = 1 << 22
"""The largest PID Linux can give (``/proc/sys/kernel/pid_max`` is at most this)."""

CAN_TELL = os.name == "posix"
"""Whether :func:`is_gone` can ever say True here (Windows: never)."""


def boot_id() -> str:
    """This boot of the machine (Linux), else ``""``."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip().replace("-", "")
    except (OSError, UnicodeDecodeError):
        return ""


def _stat_fields(pid: int) -> list[str] | None:
    """``/proc/<pid>/stat`` from the state on (field 3), or None when it cannot be read."""
    try:
        with open(f"/proc/{int(pid)}/stat", "rb") as f:
            text = f.read().decode("ascii", "replace")
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split() if ")" in text else None


def start_time(pid: int) -> str:
    """When the process started (Linux: clock ticks after boot), ``""`` when not known."""
    fields = _stat_fields(pid)
    return fields[19] if fields is not None and len(fields) > 19 and fields[19].isdigit() else ""


def identity(pid: int | None = None) -> tuple[int, str, str]:
    """``(pid, start, boot)`` of the process ``pid`` (default: this one)."""
    pid = os.getpid() if pid is None else int(pid)
    return pid, start_time(pid), boot_id()


def valid_pid(pid) -> bool:
    return isinstance(pid, int) and 1 <= pid < PID_MAX


def is_gone(pid: int, start: str = "", boot: str = "") -> bool:
    """True only when the process ``(pid, start, boot)`` has surely ended (see the module docstring)."""
    if not CAN_TELL or not valid_pid(pid) or pid == os.getpid():
        return False
    if boot:
        now = boot_id()
        if now and now != boot:
            return True  # the machine was restarted since: every process of that boot has ended
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # EPERM: the PID is in use (by another user's process); the start time decides below
        pass
    fields = _stat_fields(pid)
    if fields is None:
        return False  # no /proc (macOS): the PID is in use, so alive as far as we can tell
    if fields[0] in ("Z", "X"):
        # a zombie: ended, its files closed, only its exit status waiting for its parent; unless only its
        # main thread has ended and other threads still run (then its open files, and their locks, live on)
        return not _other_threads_run(pid)
    if start and len(fields) > 19 and fields[19].isdigit() and fields[19] != start:
        return True  # the PID was given to a later process
    return False


def _other_threads_run(pid: int) -> bool:
    """Whether a thread of the process ``pid`` (whose main thread has ended) still runs."""
    try:
        tasks = os.listdir(f"/proc/{int(pid)}/task")
    except FileNotFoundError:
        return False  # the process is gone altogether
    except OSError:
        return True  # cannot tell: alive
    for task in tasks:
        try:
            with open(f"/proc/{int(pid)}/task/{task}/stat", "rb") as f:
                text = f.read().decode("ascii", "replace")
        except FileNotFoundError:
            continue  # that thread has just gone
        except OSError:
            return True
        state = text[text.rindex(")") + 2:].split()[:1] if ")" in text else []
        if not state or state[0] not in ("Z", "X"):
            return True
    return False
