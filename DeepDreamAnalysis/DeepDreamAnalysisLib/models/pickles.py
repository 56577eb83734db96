"""Explain why ``torch.load(weights_only=True)`` refused a file, without passing on torch's advice.

torch's message for a refused pickle says that retrying with ``weights_only=False`` "will likely
succeed"; for a file from someone else that advice runs their code. :func:`explain_load_error` reads
the global the file asked for and says what it means, and never repeats that advice.
"""

from __future__ import annotations

import io
import pickletools
import re
import zipfile

# Modules whose functions run programs, evaluate code or touch files: a pickle naming one runs code.
_CODE_MODULES = ("posix", "nt", "os", "subprocess", "builtins", "__builtin__", "sys", "shutil", "socket",
                 "importlib", "runpy", "pty", "commands", "webbrowser", "code", "ctypes", "pickle", "marshal",
                 "types", "operator", "functools", "io", "pathlib", "urllib", "requests", "http")
_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def refused_global(exc: BaseException) -> str | None:
    """The ``module.name`` a pickle asked to load, from torch's error text; None if none is named."""
    found = _GLOBAL.search(str(exc))
    return found.group(1) if found else None


def file_globals(source, limit: int = 64 << 20) -> list[str]:
    """The ``module.name`` globals the pickle(s) in ``source`` (a path or bytes) ask to load, read from
    the file itself without unpickling (``pickletools``): for a torch zip, its ``*/data.pkl``; for a
    legacy file, each pickle in sequence. Best effort: [] when the file cannot be walked."""
    try:
        if isinstance(source, (bytes, bytearray)):
            data = bytes(source[:limit])
        else:
            with open(source, "rb") as fh:
                data = fh.read(limit)
        if data[:2] == b"PK":
            with zipfile.ZipFile(io.BytesIO(data) if len(data) < limit else source) as zf:
                names = [n for n in zf.namelist() if n.endswith("data.pkl")]
                if not names or zf.getinfo(names[0]).file_size > limit:
                    return []
                data = zf.read(names[0])
    except (OSError, zipfile.BadZipFile, ValueError, EOFError):
        return []
    found: list[str] = []
    stream = io.BytesIO(data)
    _walk(stream, data, found)
    return [_python3_name(n) for n in found]


def _python3_name(name: str) -> str:
    """Protocol-2 pickles spell globals the Python 2 way (``__builtin__.eval``); unpickling maps them
    back (``builtins.eval``): report the name that would be loaded."""
    import _compat_pickle

    module, _, attr = name.rpartition(".")
    if (module, attr) in _compat_pickle.NAME_MAPPING:
        module, attr = _compat_pickle.NAME_MAPPING[(module, attr)]
    elif module in _compat_pickle.IMPORT_MAPPING:
        module = _compat_pickle.IMPORT_MAPPING[module]
    return f"{module}.{attr}"


def _walk(stream, data: bytes, found: list[str]) -> None:
    for _ in range(8):  # legacy torch.save: a few pickles in a row, then raw storage bytes
        strings: list[str] = []
        memo: list[str] = []
        try:
            for op, arg, _pos in pickletools.genops(stream):
                if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8", "SHORT_BINSTRING",
                               "BINSTRING", "STRING"):
                    strings.append(str(arg))
                elif op.name == "MEMOIZE" and strings:
                    memo.append(strings[-1])
                elif op.name == "GLOBAL":
                    found.append(str(arg).replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    found.append(f"{strings[-2]}.{strings[-1]}")
                if op.name == "STOP":
                    break
        except Exception:  # noqa: BLE001 - not a pickle (any more): done
            break
        if stream.tell() >= len(data):
            break


_SAFE_ROOTS = ("torch", "collections", "numpy", "_codecs", "builtins.set", "builtins.frozenset", "builtins.slice")


def _dangerous(name: str) -> bool:
    return name.split(".", 1)[0] in _CODE_MODULES and not name.startswith(_SAFE_ROOTS[3:])


def explain_load_error(exc: BaseException, where: str, source=None) -> str:
    """A message for a file ``torch.load(weights_only=True)`` could not read (``source``: the file's path
    or bytes, read for the globals it names)."""
    names = file_globals(source) if source is not None else []
    code = [n for n in names if _dangerous(n)]
    if code:
        return (f"{where} is refused: this file asks to run code (`{code[0]}`) when loaded. It is not a plain set "
                "of weights; do not load it elsewhere either unless you know who made it. Ask for the weights as a "
                "state dict (torch.save(network.state_dict(), ...)).")
    name = refused_global(exc)
    if name is None:
        foreign = [n for n in names if not n.startswith(_SAFE_ROOTS[:3])]
        name = foreign[0] if foreign else None
    if name is not None:
        root = name.split(".", 1)[0]
        if root in _CODE_MODULES:
            return (f"{where} is refused: this file asks to run code (`{name}`) when loaded. It is not a plain "
                    "set of weights; do not load it elsewhere either unless you know who made it. Ask for the "
                    "weights as a state dict (torch.save(network.state_dict(), ...)).")
        return (f"{where} holds pickled Python objects ({name}: a whole torch.nn.Module saved with "
                "torch.save(model)?), not just weights. Loading it would run code from the file, so the loader "
                "refuses. Save the weights (torch.save(model.state_dict(), ...)) with a model card naming the "
                "network, or save TorchScript (torch.jit.save) or a torch.export program (.pt2).")
    text = " ".join(line for line in str(exc).splitlines()
                    if line.strip() and "weights_only" not in line and "torch.load" not in line)[:200]
    return (f"{where} is corrupt or truncated: it cannot be read as weights ({type(exc).__name__}"
            f"{': ' + text if text else ''}). Save or copy it again.")
