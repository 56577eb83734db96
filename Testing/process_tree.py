"""The processes a command started, read from /proc (Linux): for the tests that stop a command from
outside and check that nothing it started is left running."""

from __future__ import annotations

import os
import time
from pathlib import Path


def _parents() -> dict[int, int]:
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat[stat.rindex(")") + 2:].split()[1])
    return parents


def descendants(pid: int) -> dict[int, str]:
    """``{pid: command line}`` of every process below ``pid`` (children, grandchildren...)."""
    children: dict[int, list[int]] = {}
    for child, parent in _parents().items():
        children.setdefault(parent, []).append(child)
    found, todo = {}, [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found[child] = command_line(child)
            todo.append(child)
    return found


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"


def alive(pid: int) -> bool:
    """Running (a zombie waiting for its parent to collect it is not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def still_alive(pids, within: float = 10.0) -> dict[int, str]:
    """Those of ``pids`` still alive after waiting up to ``within`` seconds for them to end."""
    end = time.monotonic() + within
    left = {p: command_line(p) for p in pids if alive(p)}
    while left and time.monotonic() < end:
        time.sleep(0.2)
        left = {p: c for p, c in left.items() if alive(p)}
    return left


def kill_all(pids) -> None:
    """Clean up after a failed test (SIGKILL)."""
    import signal

    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except OSError:
            pass


def stop_and_expect_nothing_left(proc, sig, started, what: str, output) -> None:
    """Send ``sig`` to ``proc``; it must exit with 130 within 60 s, and none of ``started`` (its
    processes, recorded before) may be alive 30 s later (``what`` names the command in the message,
    ``output()`` gives its output for a failed assertion). Cleans up with SIGKILL either way. The
    bounds are for a loaded machine: on a quiet one both take a few seconds."""
    proc.send_signal(sig)
    try:
        assert proc.wait(timeout=60) == 130, output()
        left = still_alive(started, within=30)
        assert not left, f"still running after {what} ended: {left}"
    finally:
        kill_all(started)
        proc.kill()
