"""What a model may ask the loader to build: allowed by what a name *is*, not how it is spelled.

A MONAI bundle's ``_target_`` and a model card's ``network.name`` are names of Python objects the
loader would call. Both ``torch`` and ``monai`` hold functions that run commands, unpickle, download
or import any module by name, so a prefix rule ("starts with ``monai.``") guarantees nothing. Here a
name is **resolved** first, without importing anything outside the two namespaces that hold networks:

- the name must be ``torch.…``, ``monai.…`` or a short name (``"UNet"``, as MONAI bundles write
  them, looked up in :data:`SHORT_NAME_MODULES`);
- it is walked attribute by attribute through the objects' own ``__dict__`` (no ``getattr`` hooks,
  no lazy imports); a module that is not loaded yet is imported only when its full name lies under
  ``monai.networks`` or ``torch.nn`` (aliases and re-exports are followed, since they are the same
  object);
- the object found is accepted only when it is a **class** that **subclasses torch.nn.Module** and
  is **defined** (its ``__module__``) under ``monai.networks`` or ``torch.nn``;
- for reading a bundle's preprocessing (never building it), :data:`TRANSFORM_NAMES` names the few
  MONAI transform classes the card derivation understands, one by one.

Everything else is refused with :class:`NotAllowed`, whose message names why. ``allow_code_targets``
(``--allow-code-targets``, the panel's checkbox) is the only way past this check.

While an allowed network is being built, :func:`no_side_effects` refuses (through a Python audit
hook) any attempt to start a process, run a shell command or reach the network: a constructor
argument such as ``pretrained=True`` would otherwise download weights.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import re
import sys
import threading
from contextlib import contextmanager
from types import ModuleType

NETWORK_NAMESPACES = ("monai.networks", "torch.nn")
"""Modules (and their submodules) whose ``torch.nn.Module`` classes may be built."""

ROOTS = ("torch", "monai")
"""The only top-level packages a name may start with."""

SHORT_NAME_MODULES = ("monai.networks.nets", "monai.networks.blocks", "monai.networks.layers")
"""Where a short name (``"UNet"``) is looked up, in this order."""

TRANSFORM_NAMES = frozenset({
    "Compose", "LoadImage", "LoadImaged", "EnsureChannelFirst", "EnsureChannelFirstd", "EnsureType",
    "EnsureTyped", "Orientation", "Orientationd", "Spacing", "Spacingd", "ScaleIntensityRange",
    "ScaleIntensityRanged", "NormalizeIntensity", "NormalizeIntensityd", "Activations", "Activationsd",
    "AsDiscrete", "AsDiscreted",
})
"""MONAI transforms (``monai.transforms.<name>``) whose settings the card derivation reads from a
bundle's pre/postprocessing. They are read as data, never built."""

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


class NotAllowed(Exception):
    """A name that does not resolve to an allowed class; ``str()`` says why."""


def _under(module_name: str, namespaces=NETWORK_NAMESPACES) -> bool:
    return any(module_name == ns or module_name.startswith(ns + ".") for ns in namespaces)


def _own_attr(obj, name: str):
    """``obj.name`` without running code: a module's or class's own ``__dict__`` (classes: their MRO)."""
    if isinstance(obj, ModuleType):
        d = vars(obj)
        if name in d:
            return d[name]
        raise KeyError(name)
    try:
        return inspect.getattr_static(obj, name)
    except AttributeError:
        raise KeyError(name) from None


def resolve(name: str):
    """The object ``name`` denotes, found without importing modules outside :data:`NETWORK_NAMESPACES`.

    Raises NotAllowed when the name is malformed, outside torch/monai, or cannot be found without
    importing other code.
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise NotAllowed(f"{name!r} is not a Python name")
    parts = name.split(".")
    if len(parts) == 1:
        return _resolve_short(name)
    if parts[0] not in ROOTS:
        raise NotAllowed(f"{name!r} is outside torch and monai")
    obj = _import_root(parts[0])
    for i, part in enumerate(parts[1:], start=1):
        prefix = ".".join(parts[: i + 1])
        try:
            obj = _own_attr(obj, part)
            continue
        except KeyError:
            pass
        if isinstance(obj, ModuleType) and _under(prefix) and _is_module_name(prefix):
            try:
                obj = importlib.import_module(prefix)
                continue
            except ImportError:
                pass
        raise NotAllowed(f"{name!r} cannot be found ({prefix!r} is not defined"
                         + (" or not loaded" if not _under(prefix) else "") + ")")
    return obj


def _import_root(root: str):
    if root == "torch":
        import torch

        return torch
    try:
        import monai
    except ImportError:
        raise NotAllowed("monai is not installed") from None
    return monai


def _is_module_name(name: str) -> bool:
    if name in sys.modules:
        return True
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _resolve_short(name: str):
    for module_name in SHORT_NAME_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        if name in vars(module):
            return vars(module)[name]
    raise NotAllowed(f"the short name {name!r} is not a network in {', '.join(SHORT_NAME_MODULES)}")


def why_not_network(obj, name: str) -> str | None:
    """None when ``obj`` may be built as a network; else the reason, in words."""
    import torch

    if not isinstance(obj, type):
        kind = "a function" if callable(obj) else f"a {type(obj).__name__}"
        if isinstance(obj, ModuleType):
            kind = "a module"
        return f"{name!r} is {kind}, not a network class"
    if not issubclass(obj, torch.nn.Module):
        return f"{name!r} is the class {obj.__module__}.{obj.__qualname__}, which is not a torch.nn.Module"
    module = getattr(obj, "__module__", "") or ""
    if not _under(module):
        return (f"{name!r} is the class {module}.{obj.__qualname__}, defined outside "
                f"{' and '.join(NETWORK_NAMESPACES)}")
    return None


def network_class(name: str):
    """The ``torch.nn.Module`` class ``name`` resolves to, if it may be built; else NotAllowed."""
    obj = resolve(name)
    reason = why_not_network(obj, name)
    if reason is not None:
        raise NotAllowed(reason)
    return obj


def is_allowed_network(name: str) -> bool:
    """True when ``name`` resolves to a network class the loader builds without allow_code_targets."""
    try:
        network_class(name)
    except NotAllowed:
        return False
    return True


def transform_name(target) -> str | None:
    """The short name of a transform :data:`TRANSFORM_NAMES` lists, spelled ``X`` or
    ``monai.transforms.X``; None otherwise. Nothing is imported."""
    if not isinstance(target, str):
        return None
    short = target[len("monai.transforms."):] if target.startswith("monai.transforms.") else target
    return short if short in TRANSFORM_NAMES else None


# ---------------------------------------------------------------------------------------------- guard

_GUARDED = threading.local()
_HOOK_LOCK = threading.Lock()
_HOOK_INSTALLED = False
# Audit events that mean "run another program" or "use the network".
_REFUSED_EVENTS = {
    "os.system": "run a shell command",
    "os.exec": "start another program",
    "os.posix_spawn": "start another program",
    "os.spawn": "start another program",
    "os.fork": "start another process",
    "os.forkpty": "start another process",
    "subprocess.Popen": "start another program",
    "socket.connect": "reach the network",
    "socket.getaddrinfo": "reach the network",
    "socket.gethostbyname": "reach the network",
    "urllib.Request": "download from the network",
    "http.client.connect": "reach the network",
}


class SideEffectRefused(RuntimeError):
    """Raised inside a guarded build that tried to start a program or reach the network."""

    def __init__(self, event: str, what: str, detail: str):
        super().__init__(f"tried to {what} ({event}{': ' + detail if detail else ''})")
        self.event, self.what, self.detail = event, what, detail


def _audit(event: str, args) -> None:
    if not getattr(_GUARDED, "on", False) or event not in _REFUSED_EVENTS:
        return
    detail = ""
    try:
        detail = str(args[0])[:120] if args else ""
    except Exception:
        pass
    raise SideEffectRefused(event, _REFUSED_EVENTS[event], detail)


@contextmanager
def no_side_effects():
    """Within the block, on this thread, starting a program or reaching the network raises
    :class:`SideEffectRefused` (a Python audit hook, installed once per process)."""
    global _HOOK_INSTALLED
    with _HOOK_LOCK:
        if not _HOOK_INSTALLED:
            sys.addaudithook(_audit)
            _HOOK_INSTALLED = True
    previous = getattr(_GUARDED, "on", False)
    _GUARDED.on = True
    try:
        yield
    finally:
        _GUARDED.on = previous


def find_side_effect(exc: BaseException) -> SideEffectRefused | None:
    """The SideEffectRefused that caused ``exc`` (libraries wrap errors), or None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, SideEffectRefused):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


__all__ = ["NotAllowed", "resolve", "network_class", "is_allowed_network", "why_not_network", "transform_name",
           "no_side_effects", "SideEffectRefused", "find_side_effect", "NETWORK_NAMESPACES", "TRANSFORM_NAMES"]
