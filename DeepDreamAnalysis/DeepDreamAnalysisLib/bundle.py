"""MONAI bundles: read one (folder or .zip), check its config, build its network, derive its card.

A bundle is a folder (or a zip of one) holding ``configs/inference.json`` (or ``.yaml``) and/or
``configs/metadata.json``, and the weights ``models/model.pt`` (a state dict). The network is built
from the config's ``network_def`` and its weights are loaded with ``torch.load(weights_only=True)``.

Bundle configs are code: every ``{"_target_": ...}`` entry names a Python callable that MONAI's
ConfigParser would call, and ``"$..."`` strings are Python expressions it would ``eval``. Before
anything is built, :func:`check_config` walks the whole config and refuses any ``_target_`` that does
not *resolve* to a ``torch.nn.Module`` class defined under monai.networks or torch.nn (or one of the
MONAI transforms read as data, :data:`.models.allowlist.TRANSFORM_NAMES`), and
:func:`network_subconfig` refuses expressions, macros, ``_requires_``, a non-default ``_mode_`` and
references to anything but config entries in the part that builds the network, unless the caller
passes ``allow_code_targets=True``. Only ``network_def`` and the entries it references are handed to
the parser, with each ``_target_`` pinned to the class that was checked; nothing else in the config
is ever evaluated, and building may not start a program or reach the network.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from .errors import ModelCardError, ModelError

CONFIG_NAMES = ("inference.json", "inference.yaml", "inference.yml")
WEIGHT_NAMES = ("model.pt", "model.pth")
# Names under monai./torch. that load, download or run other code: refused like a foreign target.
ALLOW_HINT = (
    "If you trust this bundle, allow it with load_model(..., allow_code_targets=True) "
    "(command line: --allow-code-targets)."
)


@dataclass
class BundleFiles:
    """The parts of a bundle the loader needs, read into memory."""

    source: Path
    config: dict[str, Any]
    config_name: str | None
    metadata: dict[str, Any] | None
    weights: bytes | None
    weights_name: str | None
    card: dict[str, Any] | None
    notes: list[str] = field(default_factory=list)


def is_bundle_dir(path: Path) -> bool:
    return path.is_dir() and ((path / "configs").is_dir() or (path / "models").is_dir())


def zip_is_bundle(names: list[str]) -> bool:
    return any(PurePosixPath(n).parent.name == "configs" and PurePosixPath(n).name in CONFIG_NAMES + ("metadata.json",)
               for n in names)


def read_bundle(path: Path) -> BundleFiles:
    """Read a bundle folder or zip: config, metadata, weights and an optional ``card.json``."""
    if path.is_dir():
        files = {p.relative_to(path).as_posix(): p for p in path.rglob("*") if p.is_file()}
        read = lambda name: _read_file_capped(files[name], name, path)  # noqa: E731
        names = sorted(files)
    else:
        try:
            zf = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as exc:
            raise ModelError(f"{path} is not a readable zip file ({exc}). Re-download or re-export the bundle.") from None
        names = sorted(n for n in zf.namelist() if not n.endswith("/"))
        read = lambda name: _read_zip_capped(zf, name, path)  # noqa: E731
    # Bundles are often zipped with a top folder ("spleen_ct_segmentation/configs/..."): find the root.
    roots = sorted({str(PurePosixPath(n).parent.parent) for n in names
                    if PurePosixPath(n).parent.name == "configs" and PurePosixPath(n).name in CONFIG_NAMES + ("metadata.json",)})
    if not roots:
        raise ModelError(
            f"{path} is not a MONAI bundle: it has no configs/inference.json nor configs/metadata.json. "
            "A bundle holds configs/inference.json (with network_def), configs/metadata.json and models/model.pt."
        )
    root = roots[0]
    prefix = "" if root in (".", "") else root + "/"

    def find(*candidates):
        for c in candidates:
            if prefix + c in names:
                return prefix + c
        return None

    config_name = find(*(f"configs/{n}" for n in CONFIG_NAMES))
    config = _parse_config(read(config_name), config_name, path) if config_name else {}
    meta_name = find("configs/metadata.json")
    metadata = _parse_config(read(meta_name), meta_name, path) if meta_name else None
    weights_name = find(*(f"models/{n}" for n in WEIGHT_NAMES))
    weights = read(weights_name) if weights_name else None
    card_name = find("card.json", "configs/card.json")
    card = _parse_config(read(card_name), card_name, path) if card_name else None
    return BundleFiles(path, config, config_name, metadata, weights, weights_name, card)


MAX_CONFIG_BYTES = 16 << 20
MAX_WEIGHTS_BYTES = 16 << 30
MAX_RATIO = 100             # uncompressed / compressed size of a zip entry beyond which it is a bomb ...
MAX_PLAIN_BYTES = 32 << 20  # ... once it is larger than this


def _cap(name: str) -> int:
    """The most bytes the loader reads of the bundle entry ``name``."""
    if PurePosixPath(name).name in WEIGHT_NAMES:
        from .inputs import available_memory

        avail = available_memory()
        return min(MAX_WEIGHTS_BYTES, avail // 2) if avail else MAX_WEIGHTS_BYTES
    return MAX_CONFIG_BYTES


def _too_big(bundle: Path, name: str, size: int | None, cap: int) -> ModelError:
    from .inputs import human_bytes

    told = f"{human_bytes(size)}" if size is not None else f"more than {human_bytes(cap)}"
    return ModelError(f"The bundle {bundle}: {name} is {told} once unpacked; the loader reads at most "
                      f"{human_bytes(cap)} of it. A bundle's configs are small and its weights fit in memory: check "
                      "that this is the right file.")


def _read_zip_capped(zf: zipfile.ZipFile, name: str, bundle: Path) -> bytes:
    """A zip entry read as a stream, refused as soon as it grows past its cap (the declared size may lie)."""
    cap = _cap(name)
    info = zf.getinfo(name)
    if info.file_size > MAX_PLAIN_BYTES and info.file_size > MAX_RATIO * max(info.compress_size, 1):
        from .inputs import human_bytes

        raise ModelError(
            f"The bundle {bundle}: {name} inflates {info.file_size // max(info.compress_size, 1)} times (to "
            f"{human_bytes(info.file_size)}); real weights and configs barely compress, so this is a zip bomb or a "
            "damaged file. Re-download the bundle from its source."
        )
    if info.file_size > cap:
        raise _too_big(bundle, name, info.file_size, cap)
    cap = min(cap, info.file_size)  # the declared size may lie: never read more than it
    out = bytearray()
    try:
        with zf.open(info) as fh:
            while True:
                chunk = fh.read(1 << 20)
                if not chunk:
                    break
                out += chunk
                if len(out) > cap:
                    raise _too_big(bundle, name, None, cap)
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as exc:
        raise ModelError(f"The bundle {bundle}: {name} cannot be unpacked ({exc}). Re-download the bundle.") from None
    return bytes(out)


def _read_file_capped(p: Path, name: str, bundle: Path) -> bytes:
    from .inputs import check_path

    check_path(p, f"bundle file {name}", ModelError)
    cap = _cap(name)
    size = p.stat().st_size
    if size > cap:
        raise _too_big(bundle, name, size, cap)
    try:
        return p.read_bytes()
    except OSError as exc:
        raise ModelError(f"Cannot read {p} ({exc.strerror or exc}). Check its permissions.") from None


def _parse_config(data: bytes, name: str, bundle: Path) -> dict[str, Any]:
    from .inputs import MAX_JSON_DEPTH, loads, nesting_depth

    try:
        if name.endswith((".yaml", ".yml")):
            try:
                import yaml
            except ImportError:
                raise ModelError(f"{bundle}: {name} is YAML and PyYAML is not installed. pip install pyyaml.") from None
            value = yaml.safe_load(data.decode("utf-8"))
            if nesting_depth(value) > MAX_JSON_DEPTH:
                raise ModelError(f"{bundle}: {name} is nested more than {MAX_JSON_DEPTH} levels deep; check that this "
                                 "is the right file.")
        else:
            value = loads(data.decode("utf-8"), f"{bundle}: {name}", ModelError)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ModelError(f"{bundle}: {name} is not valid JSON/YAML ({type(exc).__name__}: {str(exc)[:200]}). Fix or "
                         "re-download the bundle.") from None
    if not isinstance(value, dict):
        raise ModelError(f"{bundle}: {name} must hold an object at the top level.")
    return value


# ---------------------------------------------------------------------------------------------- safety

def target_is_allowed(target) -> bool:
    """True when ``target`` resolves (see :mod:`.models.allowlist`) to a ``torch.nn.Module`` class defined
    under monai.networks or torch.nn, or is one of the MONAI transforms read as data
    (:data:`~.models.allowlist.TRANSFORM_NAMES`)."""
    return _why_target_refused(target) is None


def _why_target_refused(target) -> str | None:
    """None when ``target`` may appear in a bundle config; else why not, in words."""
    from .models import allowlist

    if not isinstance(target, str):
        return f"{target!r} is not a name"
    if target.startswith(("$", "%", "@")):
        return f"{target[:60]!r} is an expression or reference, not a class name"
    if allowlist.transform_name(target) is not None:
        return None
    try:
        allowlist.network_class(target)
    except allowlist.NotAllowed as why:
        return str(why)
    return None


def iter_targets(node: Any, where: str = ""):
    """Yield ``(config_id, target)`` for every ``_target_`` in a nested config."""
    if isinstance(node, dict):
        if "_target_" in node:
            yield where or "<top>", node["_target_"]
        for k, v in node.items():
            yield from iter_targets(v, f"{where}::{k}" if where else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from iter_targets(v, f"{where}::{i}" if where else str(i))


def _iter_strings(node: Any, where: str = ""):
    if isinstance(node, str):
        yield where, node
    elif isinstance(node, dict):
        for k, v in node.items():
            yield from _iter_strings(v, f"{where}::{k}" if where else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _iter_strings(v, f"{where}::{i}" if where else str(i))


def _iter_dicts_at(node: Any, where: str = ""):
    if isinstance(node, dict):
        yield where or "<top>", node
        for k, v in node.items():
            yield from _iter_dicts_at(v, f"{where}::{k}" if where else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _iter_dicts_at(v, f"{where}::{i}" if where else str(i))


def foreign_targets(config: dict[str, Any]) -> list[tuple[str, str, str]]:
    """``(config_id, target, why)`` for every ``_target_`` that is neither an allowed network class nor a
    listed transform. Nothing outside torch.nn / monai.networks is imported to decide."""
    out = []
    for where, t in iter_targets(config):
        why = _why_target_refused(t)
        if why is not None:
            out.append((where, str(t), why))
    return out


def check_config(config: dict[str, Any], source: str, allow_code_targets: bool) -> bool:
    """Refuse any ``_target_`` in the config that is not an allowed class; return True if code would run.

    Called before anything in the config is built or evaluated. Entries outside ``network_def`` (and
    what it references) are never built: they are read as data (the card derivation reads the listed
    transforms' settings), yet a name there that is not an allowed class is refused all the same.
    """
    bad = foreign_targets(config)
    if bad and not allow_code_targets:
        listed = "; ".join(f"_target_ {t!r} at {w}: {why}" for w, t, why in bad[:5]) + ("; ..." if len(bad) > 5 else "")
        raise ModelError(
            f"The bundle config {source} is refused: {listed}. Bundle targets must be torch.nn.Module classes "
            "defined under monai.networks or torch.nn (or the MONAI transforms the loader reads as data); "
            f"building anything else would import and run that code. {ALLOW_HINT}"
        )
    return bool(bad)


def network_subconfig(config: dict[str, Any], source: str, allow_code_targets: bool, key: str = "network_def"):
    """``{key: config[key], ...referenced ids}``: the only part of the config that is parsed.

    Refused unless allowed: expressions (``"$..."``, MONAI evaluates them as Python), macros
    (``"%..."``, they read other files), ``_requires_`` (runs other entries first), a ``_mode_`` other
    than ``"default"`` (``callable`` returns the function itself, ``debug`` starts a debugger), and
    ``@`` references to anything but another entry of this config. Returns ``(subconfig, executes_code)``.
    """
    if key not in config:
        raise ModelError(
            f"The bundle config {source} has no '{key}': the loader builds the network from it. Add "
            "\"network_def\": {\"_target_\": \"monai.networks.nets.UNet\", ...} to configs/inference.json."
        )
    sub: dict[str, Any] = {}
    pending = [key]
    code = False

    def refuse(what: str) -> None:
        nonlocal code
        if not allow_code_targets:
            raise ModelError(f"The bundle's network definition {what}. MONAI would run it to build the network. "
                             f"{ALLOW_HINT}")
        code = True

    while pending:
        ident = pending.pop()
        if ident in sub:
            continue
        if ident not in config:
            raise ModelError(f"The bundle config {source} refers to '@{ident}', which it does not define: "
                             "references may only name other entries of the config.")
        sub[ident] = config[ident]
        for where, s in _iter_strings(config[ident], ident):
            if s.startswith(("$", "%")):
                kind = "a Python expression" if s.startswith("$") else "a macro that reads another file"
                refuse(f"holds {kind} at {where}: {s[:80]!r}")
            elif s.startswith("@"):
                ref = re.split(r"::|#", s[1:], maxsplit=1)[0]
                if not re.fullmatch(r"[A-Za-z_][\w\-]*", ref or ""):
                    refuse(f"holds the reference {s[:80]!r} at {where}, which names no config entry")
                    continue
                pending.append(ref)
        for where, node in _iter_dicts_at(config[ident], ident):
            if "_requires_" in node:
                refuse(f"asks at {where} for _requires_ (other entries run first)")
            mode = node.get("_mode_", "default")
            if mode != "default":
                refuse(f"asks at {where} for _mode_ {mode!r} (only 'default', building the class, is allowed)")
        for where, t in iter_targets(config[ident], ident):
            why = _why_target_refused(t)
            if why is None and isinstance(t, str) and _transform(t):
                why = f"{t!r} is a transform, not a network class"
            if why is not None:
                refuse(f"names _target_ {t!r} at {where}: {why}")
    return sub, code


def _transform(target: str) -> bool:
    from .models import allowlist

    return allowlist.transform_name(target) is not None


def _pin_targets(node: Any):
    """A copy of ``node`` with every ``_target_`` replaced by the full name of the class it resolved to,
    so MONAI's parser builds exactly the class the allow-list checked."""
    from .models import allowlist

    if isinstance(node, dict):
        out = {k: _pin_targets(v) for k, v in node.items()}
        t = node.get("_target_")
        if isinstance(t, str):
            cls = allowlist.network_class(t)
            out["_target_"] = f"{cls.__module__}.{cls.__qualname__}"
        return out
    if isinstance(node, list):
        return [_pin_targets(v) for v in node]
    return node


def _iter_dicts(node):
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from _iter_dicts(v)
    elif isinstance(node, list):
        for v in node:
            yield from _iter_dicts(v)


def build_network(files: BundleFiles, allow_code_targets: bool):
    """Check the config, then build ``network_def``. Returns ``(network, executes_code)``."""
    import torch
    from monai.bundle import ConfigParser

    source = f"{files.source.name}/{files.config_name}" if files.config_name else str(files.source)
    if not files.config_name:
        raise ModelError(
            f"The bundle {files.source} has no configs/inference.json: the loader builds the network from its "
            "network_def. Add one (see docs/model-card.md, 'MONAI bundles')."
        )
    code = check_config(files.config, source, allow_code_targets)
    sub, sub_code = network_subconfig(files.config, source, allow_code_targets)
    from .models import allowlist

    safe = not (code or sub_code)
    parser = ConfigParser(_pin_targets(sub) if safe else files.config)
    try:
        with allowlist.no_side_effects() if safe else contextlib.nullcontext():
            network = parser.get_parsed_content("network_def", instantiate=True)
    except Exception as exc:  # the parser wraps constructor errors in RuntimeError/ValueError/...
        side = allowlist.find_side_effect(exc)
        if side is not None:
            raise ModelError(
                f"Building the bundle's network_def {side}. Loading a model never starts programs or uses the "
                f"network: set pretrained/download arguments to false in {source} and put the weights in "
                "models/model.pt."
            ) from None
        raise ModelError(
            f"Building the bundle's network_def failed: {type(exc).__name__}: {exc}. Check network_def in "
            f"{source} against the MONAI version installed."
        ) from None
    if not isinstance(network, torch.nn.Module):
        raise ModelError(f"The bundle's network_def built a {type(network).__name__}, not a torch.nn.Module.")
    return network, code or sub_code


def load_weights(files: BundleFiles) -> dict[str, Any]:
    """The bundle's ``models/model.pt`` as a state dict (weights_only=True)."""
    import torch

    if files.weights is None:
        raise ModelError(
            f"The bundle {files.source} has no models/model.pt (the network's weights). Put the state dict "
            "there (torch.save(network.state_dict(), 'models/model.pt'))."
        )
    if not files.weights:
        raise ModelError(f"The bundle's {files.weights_name} is empty. Re-download or re-save the weights.")
    try:
        state = torch.load(io.BytesIO(files.weights), map_location="cpu", weights_only=True)
    except Exception as exc:
        from .models import pickles

        raise ModelError(pickles.explain_load_error(exc, f"The bundle's {files.weights_name}", files.weights)) from None
    return state


# ---------------------------------------------------------------------------------------------- card

def derive_card(files: BundleFiles) -> tuple[dict[str, Any], list[str]]:
    """A model-card dict from the bundle's metadata and transforms; ``card.json`` keys override.

    Returns ``(card_dict, notes)``; the dict may lack required fields (the caller says which).
    """
    notes: list[str] = []
    card: dict[str, Any] = {}
    meta = files.metadata or {}
    if meta.get("name"):
        card["name"] = str(meta["name"])
    if meta.get("description"):
        card["description"] = str(meta["description"])
    fmt = meta.get("network_data_format") or {}
    image = (fmt.get("inputs") or {}).get("image") or {}
    pred = (fmt.get("outputs") or {}).get("pred") or {}
    if _is_int(image.get("num_channels")):
        card["in_channels"] = int(image["num_channels"])
    shape = image.get("spatial_shape")
    if isinstance(shape, list) and len(shape) in (2, 3):
        card["spatial_dims"] = len(shape)
        if all(_is_int(s) for s in shape):
            card["roi_size"] = [int(s) for s in shape]
        else:  # e.g. ["16*n", "16*n", "16*n"]: sizes divisible by 16
            divs = {int(m.group(1)) for s in shape if isinstance(s, str) for m in [re.fullmatch(r"\s*(\d+)\s*\*\s*n\s*", s)] if m}
            if len(divs) == 1:
                card["size_divisible"] = divs.pop()
    if _is_int(pred.get("num_channels")):
        card["out_channels"] = int(pred["num_channels"])
    config = files.config or {}
    roi = _find_key(config, "roi_size")
    if "roi_size" not in card and isinstance(roi, list) and all(_is_int(v) for v in roi) and len(roi) in (2, 3):
        card["roi_size"] = [int(v) for v in roi]
    net = config.get("network_def")
    if "spatial_dims" not in card and isinstance(net, dict) and net.get("spatial_dims") in (2, 3):
        card["spatial_dims"] = net["spatial_dims"]
    if isinstance(net, dict):
        for ours, theirs in (("in_channels", "in_channels"), ("out_channels", "out_channels")):
            if ours not in card and _is_int(net.get(theirs)):
                card[ours] = int(net[theirs])
    if "roi_size" in card and "spatial_dims" in card and len(card["roi_size"]) != card["spatial_dims"]:
        card.pop("roi_size")
    pre, pre_note = _preprocessing(config)
    if pre is not None:
        card["preprocessing"] = pre
    if pre_note:
        notes.append(pre_note)
    act = _activation(config)
    if act is not None:
        card["activation"] = act
    elif "out_channels" in card:
        card["activation"] = "softmax" if card["out_channels"] >= 2 else "sigmoid"
        notes.append(f"activation not found in the bundle's postprocessing; assumed {card['activation']!r}.")
    if "out_channels" in card:
        card["target_class"] = 1 if card["out_channels"] >= 2 else 0
        notes.append(f"target_class not in the bundle; assumed {card['target_class']} "
                     f"({_channel_name(pred, card['target_class'])}). Set it in card.json to choose another class.")
    spacing = _find_transform(config, "Spacingd", "Spacing")
    if spacing is not None:
        pix = spacing.get("pixdim")
        if isinstance(pix, list) and len(pix) in (2, 3) and all(_is_num(v) for v in pix) and min(pix) > 0:
            card["spacing"] = [float(v) for v in pix]
    if files.card:
        card.update(files.card)
        notes.append("card.json in the bundle overrides the derived fields it names.")
    return card, notes


def _channel_name(pred, index):
    name = ((pred.get("channel_def") or {}).get(str(index))) if isinstance(pred, dict) else None
    return f"channel {index}: {name}" if name else f"channel {index}"


def _preprocessing(config):
    window = _find_transform(config, "ScaleIntensityRanged", "ScaleIntensityRange")
    if window is not None:
        vals = {k: window.get(k) for k in ("a_min", "a_max", "b_min", "b_max")}
        if _is_num(vals["a_min"]) and _is_num(vals["a_max"]):
            out = {"type": "window", "min": float(vals["a_min"]), "max": float(vals["a_max"])}
            if _is_num(vals["b_min"]) and _is_num(vals["b_max"]):
                out.update(out_min=float(vals["b_min"]), out_max=float(vals["b_max"]))
            return out, None
    norm = _find_transform(config, "NormalizeIntensityd", "NormalizeIntensity")
    if norm is not None:
        sub, div = norm.get("subtrahend"), norm.get("divisor")
        if _is_num(sub) and _is_num(div) and div > 0:
            return {"type": "normalize", "mean": float(sub), "std": float(div)}, None
        return None, ("The bundle normalises each image by its own mean and std (NormalizeIntensityd without "
                      "subtrahend/divisor); write preprocessing {\"type\": \"normalize\", \"mean\": ..., \"std\": ...} "
                      "with typical values in card.json.")
    return None, None


def _activation(config):
    act = _find_transform(config, "Activationsd", "Activations")
    if act is None:
        return None
    if act.get("softmax") is True:
        return "softmax"
    if act.get("sigmoid") is True:
        return "sigmoid"
    return None


def _find_transform(config, *names):
    for node in _iter_dicts(config):
        t = node.get("_target_")
        if isinstance(t, str) and t.rsplit(".", 1)[-1] in names:
            return node
    return None


def _find_key(config, key):
    for node in _iter_dicts(config):
        if key in node:
            return node[key]
    return None


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def missing_fields_message(source: str, card: dict[str, Any], notes: list[str]) -> str:
    from .card import CARD_TEMPLATE, REQUIRED_FIELDS

    missing = [f for f in REQUIRED_FIELDS if f not in card]
    msg = (f"The bundle {source} does not say {', '.join(missing)} (derived from configs/metadata.json "
           f"network_data_format and the preprocessing transforms). Write them into card.json at the bundle's "
           "root; for example:\n" + json.dumps({k: CARD_TEMPLATE[k] for k in missing}, indent=2))
    if notes:
        msg += "\nNotes: " + " ".join(notes)
    return msg + "\nSee docs/model-card.md."


__all__ = ["BundleFiles", "read_bundle", "build_network", "load_weights", "derive_card", "check_config",
           "target_is_allowed", "is_bundle_dir", "zip_is_bundle", "missing_fields_message", "ModelCardError"]
