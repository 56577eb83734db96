"""Explain why ``torch.load(weights_only=True)`` refused a file, without passing on torch's advice.

torch's message for a refused pickle says that retrying with ``weights_only=False`` "will likely
succeed"; for a file from someone else that advice runs their code. :func:`explain_load_error` reads
the global the file asked for and says what it means, and never repeats that advice.
"""

from __future__ import annotations

import re

# Modules whose functions run programs, evaluate code or touch files: a pickle naming one runs code.
_CODE_MODULES = ("posix", "nt", "os", "subprocess", "builtins", "__builtin__", "sys", "shutil", "socket",
                 "importlib", "runpy", "pty", "commands", "webbrowser", "code", "ctypes", "pickle", "marshal",
                 "types", "operator", "functools", "io", "pathlib", "urllib", "requests", "http")
_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def refused_global(exc: BaseException) -> str | None:
    """The ``module.name`` a pickle asked to load, from torch's error text; None if none is named."""
    found = _GLOBAL.search(str(exc))
    return found.group(1) if found else None


def explain_load_error(exc: BaseException, where: str) -> str:
    """A message for a file ``torch.load(weights_only=True)`` could not read."""
    name = refused_global(exc)
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
