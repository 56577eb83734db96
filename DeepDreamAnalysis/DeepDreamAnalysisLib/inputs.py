"""Input hygiene: checks made on a path or a JSON document before any reader touches it (issue #11).

- :func:`check_path`: the path can be encoded (UTF-8, the libraries' C++ side aborts the process on
  anything else), no component is longer than 255 bytes, it exists, and it is a regular file (or a
  folder where one is accepted): a FIFO would block a reader forever, a device would be read without
  end, so both are refused before they are opened.
- :func:`read_json`: a size cap, then a parse whose nesting depth is capped (deeply nested JSON
  would otherwise end in a RecursionError deep inside the parser).
- :func:`available_memory`: bytes of memory the process may still use (``MemAvailable``).
- :func:`finite_number`: a number field that must be finite and within a range (integers where
  integers are meant).
"""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path
from typing import Any

from .errors import DeepDreamError

MAX_COMPONENT_BYTES = 255
MAX_JSON_BYTES = 64 << 20
MAX_JSON_DEPTH = 64

_KINDS = {
    stat.S_IFIFO: "a named pipe (FIFO)",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}


def check_path(path, what: str, error: type[DeepDreamError], folders: bool = False,
               missing: str | None = None) -> Path:
    """``path`` as a Path once it is safe to hand to a reader; ``error`` (naming ``what``) otherwise.

    ``folders``: a folder is accepted too (a DICOM series, a MONAI bundle). ``missing``: the message
    when the path does not exist (default: "<what> not found: <path>. Check the path.").
    """
    text = os.fspath(path)
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise error(f"The {what} path {text!r} is not UTF-8 text; rename the file (or folder) to a name with "
                        "ordinary characters.") from None
    if "\x00" in text:
        raise error(f"The {what} path {text!r} holds a NUL character; give a valid path.")
    try:
        encoded = text.encode("utf-8")
    except UnicodeEncodeError:
        shown = text.encode("utf-8", "backslashreplace").decode("ascii", "replace")
        raise error(f"The {what} path {shown} holds bytes that are not UTF-8 text, which the image and model "
                    "readers cannot open. Rename the file (or its folder) to a name with ordinary characters.") from None
    for part in encoded.split(b"/"):
        if len(part) > MAX_COMPONENT_BYTES:
            raise error(f"The {what} path has a component of {len(part)} bytes ({part[:40].decode('utf-8', 'replace')}"
                        f"...); file systems allow at most {MAX_COMPONENT_BYTES}. Give a shorter name.")
    p = Path(text).expanduser()
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise error(missing or f"The {what} was not found: {p}. Check the path.") from None
    except OSError as exc:
        raise error(f"Cannot open the {what} {p} ({exc.strerror or exc}). Check the path and its permissions.") from None
    kind = _KINDS.get(stat.S_IFMT(st.st_mode))
    if kind is not None:
        raise error(f"The {what} {p} is {kind}, not a regular file; reading it could block or never end. Give a "
                    "file" + (" or a folder." if folders else "."))
    if stat.S_ISDIR(st.st_mode) and not folders:
        raise error(f"The {what} {p} is a folder; give a file.")
    if not os.access(p, os.R_OK):
        raise error(f"The {what} {p} cannot be read (permission denied). Check its permissions.")
    return p


def read_json(path, what: str, error: type[DeepDreamError], max_bytes: int = MAX_JSON_BYTES,
              missing: str | None = None) -> Any:
    """Parse the JSON file at ``path`` after :func:`check_path`, a size cap and a nesting cap."""
    p = check_path(path, what, error, missing=missing)
    size = p.stat().st_size
    if size > max_bytes:
        raise error(f"The {what} {p} is {size / 2**20:.1f} MiB; a {what} is at most {max_bytes >> 20} MiB. Check "
                    "that this is the right file.")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"The {what} {p} is not valid JSON (not UTF-8 text: {exc.reason} at byte {exc.start}).") from None
    except OSError as exc:
        raise error(f"Cannot read the {what} {p} ({exc.strerror or exc}).") from None
    return loads(text, f"The {what} {p}", error)


def loads(text: str, source: str, error: type[DeepDreamError]) -> Any:
    """``json.loads`` with the nesting depth capped at :data:`MAX_JSON_DEPTH`; ``error`` otherwise."""
    depth = _max_depth(text)
    if depth > MAX_JSON_DEPTH:
        raise error(f"{source} is nested {depth} levels deep; at most {MAX_JSON_DEPTH} are accepted. Check that this "
                    "is the right file.")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(f"{source} is not valid JSON ({exc}).") from None
    except (RecursionError, ValueError) as exc:
        raise error(f"{source} is not valid JSON ({type(exc).__name__}).") from None


def _max_depth(text: str) -> int:
    """The deepest bracket nesting of a JSON text (strings skipped), without parsing it."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > MAX_JSON_DEPTH:
                    return deepest
        elif ch in "]}":
            depth -= 1
    return deepest


def nesting_depth(value: Any, limit: int = MAX_JSON_DEPTH) -> int:
    """The nesting depth of parsed data (dicts and lists), counting stops past ``limit``."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        node, d = stack.pop()
        if isinstance(node, (dict, list)):
            deepest = max(deepest, d)
            if deepest > limit:
                return deepest
            stack.extend((v, d + 1) for v in (node.values() if isinstance(node, dict) else node))
    return deepest


def available_memory() -> int | None:
    """Bytes of memory available to new allocations (Linux ``MemAvailable``), or None when unknown."""
    try:
        with open("/proc/meminfo", "rb") as fh:
            for line in fh:
                if line.startswith(b"MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def finite_number(value, name: str, error: type[DeepDreamError], low: float | None = None,
                  high: float | None = None, integer: bool = False):
    """``value`` as int/float when it is a finite number within [low, high] (a whole number when
    ``integer``); ``error`` naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise error(f"{name} must be a number, got {value!r}.")
    if not math.isfinite(value):
        raise error(f"{name} must be a finite number, got {value!r}.")
    if integer:
        if float(value) != int(value):
            raise error(f"{name} must be a whole number, got {value!r}.")
        value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"from {low:g} to {high:g}" if low is not None and high is not None else (
            f"at least {low:g}" if low is not None else f"at most {high:g}")
        raise error(f"{name} is {value!r}; it must be {bounds}.")
    return value


def human_bytes(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
