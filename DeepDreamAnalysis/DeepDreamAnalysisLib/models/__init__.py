"""Load a segmentation network and its model card, check that they fit, and freeze the network.

:func:`load_model` reads four formats, recognised by content (not by extension):

- TorchScript (``torch.jit.save``; usually ``.pt``/``.ts``/``.pth``): a zip with ``code/`` and
  ``constants.pkl`` entries. Runs the TorchScript code stored in the file.
- torch.export programs (``torch.export.save``; ``.pt2``): a zip with an ``archive_format`` entry;
  loaded with ``torch.export.load(...).module()``. Runs the graph stored in the file.
- MONAI bundles (a folder or a ``.zip``): see :mod:`.bundle`. The network is built from the
  config's ``network_def`` after the config has been checked; the weights load with
  ``weights_only=True``; the card is derived from ``configs/metadata.json``.
- state dicts (``torch.save(network.state_dict())``; ``.pt``/``.pth``): loaded with
  ``torch.load(weights_only=True)``, which runs no code from the file; the network is the one the
  card's ``network`` field names (``monai.networks.nets.*`` or ``torch.nn.*``).

The network the loader returns is called with a float tensor ``[1, C, *spatial]`` (``[D, H, W]`` or
``[H, W]``) and returns logits ``[1, out_channels, *spatial]`` of the same spatial size. A network
whose forward returns a tuple or list is wrapped to return its first tensor; one that returns a
dict, to return ``"pred"``, else ``"out"``, else the first tensor value (deep supervision and
auxiliary heads put the main output first). A probe forward on a zero tensor checks the card
against the network before anything else runs.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import re
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import bundle as _bundle
from ..card import CARD_TEMPLATE, REQUIRED_FIELDS, ModelCard, find_card
from ..errors import ModelCardError, ModelError
from . import allowlist, pickles

log = logging.getLogger(__name__)

FORMAT_TORCHSCRIPT = "torchscript"
FORMAT_EXPORT = "torch.export"
FORMAT_BUNDLE = "monai-bundle"
FORMAT_STATE_DICT = "state-dict"
FORMATS = (FORMAT_TORCHSCRIPT, FORMAT_EXPORT, FORMAT_BUNDLE, FORMAT_STATE_DICT)

# The format each extension announces (``.pt``/``.pth`` hold either TorchScript or a state dict).
EXTENSION_FORMATS = {
    ".ts": (FORMAT_TORCHSCRIPT,),
    ".pt2": (FORMAT_EXPORT,),
    ".zip": (FORMAT_BUNDLE,),
    ".pt": (FORMAT_TORCHSCRIPT, FORMAT_STATE_DICT),
    ".pth": (FORMAT_TORCHSCRIPT, FORMAT_STATE_DICT),
}
# Where a card's network class must be defined to be built without allow_code_targets (see allowlist).
SAFE_NETWORK_PREFIXES = tuple(ns + "." for ns in allowlist.NETWORK_NAMESPACES)
DEFAULT_PROBE = 64


class ModelFormatWarning(UserWarning):
    """The file's content is another format than its extension says; it was loaded by content."""


@dataclass
class LoadedModel:
    """A frozen network with its card.

    - ``network``: ``torch.nn.Module`` in eval mode, every parameter ``requires_grad=False``;
      ``network(x)`` with ``x`` float ``[1, in_channels, *spatial]`` returns logits
      ``[1, out_channels, *spatial]``.
    - ``format``: one of :data:`FORMATS`.
    - ``sha256``: of the model file; for a folder (a bundle), of the lines
      ``"<sha256 of file>  <path relative to the folder>\\n"`` over its files in sorted path order.
    - ``executes_code``: True when loading ran code stored in the model (TorchScript, .pt2, a bundle
      or card naming a target outside MONAI/torch); False for state dicts read with weights_only.
    - ``notes``: what the loader assumed or changed (format by content, wrapped output, derived
      card fields), for the user to read.
    """

    network: Any
    card: ModelCard
    path: Path
    format: str
    sha256: str
    executes_code: bool
    notes: list[str] = field(default_factory=list)
    device: str = "cpu"

    def to(self, device) -> "LoadedModel":
        """Move the network to ``device`` (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"auto"``); returns self."""
        dev = _device(device)
        try:
            self.network = self.network.to(dev)
        except (RuntimeError, AssertionError) as exc:
            raise ModelError(f"Cannot move the network to {dev} ({exc}). Use device='cpu'.") from None
        self.device = str(dev)
        return self


def load_model(path, card=None, device="cpu", allow_code_targets: bool = False) -> LoadedModel:
    """Load the model at ``path`` with its card; see the module docstring for the formats.

    ``card``: a :class:`ModelCard`, a dict, or the path of a card JSON; default: the card
    :func:`card.find_card` finds beside the model (for a MONAI bundle: derived from its configs, a
    ``card.json`` in it or a given card overriding the fields it names).
    ``allow_code_targets``: allow bundle ``_target_``\\ s and card ``network`` names outside MONAI and
    torch (they import and run that code).

    Raises :class:`ModelError` (file missing, empty, corrupt, not a model, weights that do not fit)
    or :class:`ModelCardError` (card missing, wrong, or contradicting the network).
    """
    from ..inputs import check_path

    p = check_path(path, "model", ModelError, folders=True,
                   missing=f"Model file not found: {Path(path).expanduser()}. Check the path (and that the file was "
                           "copied completely).")
    notes: list[str] = []
    fmt, detail = detect_format(p)
    expected = EXTENSION_FORMATS.get(p.suffix.lower()) if p.is_file() else None
    if expected is not None and fmt not in expected:
        note = (f"{p.name} holds a {_FORMAT_NAMES[fmt]}, not the {_FORMAT_NAMES[expected[0]]} its extension "
                f"{p.suffix} suggests; it was loaded by content. Rename it to avoid confusion.")
        notes.append(note)
        warnings.warn(note, ModelFormatWarning, stacklevel=2)

    if fmt == FORMAT_BUNDLE:
        network, model_card, executes, more = _load_bundle(p, card, allow_code_targets)
        notes += more
    else:
        model_card = _resolve_card(p, card)
        if fmt == FORMAT_TORCHSCRIPT:
            network, executes = _load_torchscript(p), True
        elif fmt == FORMAT_EXPORT:
            network, executes = _load_export(p), True
        else:
            network, executes, more = _load_state_dict(p, model_card, allow_code_targets)
            notes += more

    network = _freeze(network)
    network, more = probe(network, model_card, p.name)
    notes += more
    model = LoadedModel(network=network, card=model_card, path=p, format=fmt, sha256=sha256_of(p),
                        executes_code=executes, notes=notes)
    for n in notes:
        log.info("%s", n)
    if str(device) != "cpu":
        model.to(device)
    return model


# ---------------------------------------------------------------------------------------------- format

_FORMAT_NAMES = {
    FORMAT_TORCHSCRIPT: "TorchScript archive",
    FORMAT_EXPORT: "torch.export program",
    FORMAT_BUNDLE: "MONAI bundle",
    FORMAT_STATE_DICT: "state dict (torch.save)",
}


def detect_format(p: Path) -> tuple[str, str]:
    """The format of ``p`` by its content. Raises ModelError for anything that is not a model."""
    if p.is_dir():
        if _bundle.is_bundle_dir(p):
            return FORMAT_BUNDLE, "folder"
        raise ModelError(
            f"{p} is a folder but not a MONAI bundle (no configs/ or models/ inside). Give a model file, or a "
            "bundle folder with configs/inference.json, configs/metadata.json and models/model.pt."
        )
    if not p.is_file():
        raise ModelError(f"{p} is not a regular file. Give a model file.")
    try:
        size = p.stat().st_size
        with open(p, "rb") as fh:
            head = fh.read(4096)
    except OSError as exc:
        raise ModelError(f"Cannot read the model file {p} ({exc.strerror}). Check its permissions.") from None
    if size == 0:
        raise ModelError(f"The model file {p} is empty (0 bytes). The copy or the save did not finish: save or copy it again.")
    if head.startswith(b"PK"):
        try:
            with zipfile.ZipFile(p) as zf:
                names = zf.namelist()
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise ModelError(
                f"The model file {p} is corrupt: it starts like a zip archive (as torch files do) but cannot be "
                f"read as one ({exc}); it may be truncated. Save or download it again."
            ) from None
        if _bundle.zip_is_bundle(names):
            return FORMAT_BUNDLE, "zip"
        if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
            return FORMAT_TORCHSCRIPT, "zip"
        if any(n.endswith("/archive_format") or n == "archive_format" for n in names):
            return FORMAT_EXPORT, "zip"
        if any(n.endswith("data.pkl") for n in names):
            return FORMAT_STATE_DICT, "zip"
        raise ModelError(
            f"{p} is a zip archive but not a model: no TorchScript code, torch.export program, torch.save data "
            "or MONAI bundle configs inside."
        )
    if head[:1] == b"\x80" and len(head) > 1 and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return FORMAT_STATE_DICT, "legacy pickle"
    raise ModelError(f"{p} is not a model file: it looks like {_describe(head, size)}. " + _WHAT_TO_GIVE)


_WHAT_TO_GIVE = ("Give a TorchScript file (torch.jit.save), a torch.export program (.pt2), a MONAI bundle, or "
                 "a state dict (torch.save(network.state_dict())) with a model card naming the network.")


def _describe(head: bytes, size: int) -> str:
    if head[:2] == b"\x1f\x8b":
        return "gzip-compressed data (a .nii.gz or other compressed image?)"
    if len(head) >= 348 and head[344:348] in (b"n+1\x00", b"ni1\x00"):
        return "a NIfTI image"
    if head.startswith(b"NRRD"):
        return "an NRRD image"
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "a DICOM file"
    if head.startswith(b"\x89HDF"):
        return "an HDF5 file (Keras/TensorFlow?); convert the network to PyTorch"
    if head[:8] == b"\x08\x00\x12\x00" or head.startswith(b"\x08"):
        return "binary data (an ONNX or protobuf file?)"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return f"binary data of {size} bytes in no format the loader knows"
    if text.lstrip().startswith("{") and "spatial_dims" in text:
        return "a model card (JSON); give the model file and pass the card with card=... (--card)"
    return "a text file"


# ---------------------------------------------------------------------------------------------- card

def _resolve_card(p: Path, card) -> ModelCard:
    if isinstance(card, ModelCard):
        return card
    if isinstance(card, dict):
        return ModelCard.from_dict(card, source="The model card given")
    if card is not None:
        return ModelCard.load(card)
    found = find_card(p)
    if found is None:
        raise ModelCardError(missing_card_message(p))
    return ModelCard.load(found)


def missing_card_message(p: Path) -> str:
    example = {k: CARD_TEMPLATE[k] for k in ("name",) + REQUIRED_FIELDS}
    example.update(roi_size=CARD_TEMPLATE["roi_size"])
    return (
        f"No model card for {p.name}: the tool needs to know {', '.join(REQUIRED_FIELDS)}. Write "
        f"{p.name}.card.json (or card.json) beside the model, or pass card=... (--card), for example:\n"
        + json.dumps(example, indent=2)
        + "\nA state dict also needs \"network\": {\"name\": \"monai.networks.nets.UNet\", \"args\": {...}}. "
        "See docs/model-card.md for every field."
    )


# ---------------------------------------------------------------------------------------------- loaders

def _load_torchscript(p: Path):
    try:
        with warnings.catch_warnings():  # torch >= 2.10 deprecates TorchScript; we still read it
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.load(str(p), map_location="cpu")
    except Exception as exc:
        raise ModelError(f"The TorchScript file {p} cannot be loaded ({_first_line(exc)}). It may be corrupt or "
                         "saved by a newer torch; save it again with torch.jit.save.") from None


def _load_export(p: Path):
    try:
        program = torch.export.load(str(p))
        return program.module()
    except Exception as exc:
        raise ModelError(f"The torch.export program {p} cannot be loaded ({_first_line(exc)}). It may be corrupt "
                         "or saved by another torch version; export and torch.export.save it again.") from None


def _read_state_dict(p: Path) -> dict:
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, RuntimeError (zip), EOFError, ...
        raise ModelError(pickles.explain_load_error(exc, str(p), p)) from None
    return obj


def _unwrap_state_dict(obj, where: str) -> tuple[dict, list[str]]:
    notes = []
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "network", "model_state_dict"):
            if key in obj and isinstance(obj[key], dict) and obj[key] and not isinstance(obj[key], torch.Tensor):
                if all(isinstance(v, torch.Tensor) for v in obj[key].values()):
                    notes.append(f"{where} is a checkpoint; the weights were taken from its '{key}' entry.")
                    obj = obj[key]
                    break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        kind = type(obj).__name__ if not isinstance(obj, dict) else "dict that is not name -> tensor"
        raise ModelError(f"{where} holds a {kind}, not a state dict (parameter name -> tensor). Save it with "
                         "torch.save(network.state_dict(), ...).")
    keys = list(obj)
    if all(k.startswith("module.") for k in keys):
        obj = {k[len("module."):]: v for k, v in obj.items()}
        notes.append(f"{where}: the 'module.' prefix (torch.nn.DataParallel) was removed from the weight names.")
    return obj, notes


def _load_state_dict(p: Path, card: ModelCard, allow_code_targets: bool):
    state, notes = _unwrap_state_dict(_read_state_dict(p), p.name)
    if card.network is None:
        raise ModelCardError(
            f"{p.name} is a state dict (weights only): the card must name the network to build, for example\n"
            '  "network": {"name": "monai.networks.nets.UNet", "args": {"spatial_dims": 2, "in_channels": 1, '
            '"out_channels": 2, "channels": [16, 32, 64], "strides": [2, 2]}}\n'
            "with the arguments the network was created with. See docs/model-card.md."
        )
    network, executes = build_named_network(card.network, allow_code_targets)
    fit_state_dict(network, state, card.network, p.name)
    return network, executes, notes


def build_named_network(spec: dict, allow_code_targets: bool = False):
    """Build ``spec["name"](**spec["args"])``; returns ``(network, executes_code)``.

    Without ``allow_code_targets`` the name must resolve (see :mod:`.allowlist`) to a
    ``torch.nn.Module`` class defined under monai.networks or torch.nn, and building it may not start a
    program or reach the network; anything else is refused before it is imported or called.
    """
    name = spec.get("name")
    args = spec.get("args", {})
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_]\w*)+", name):
        raise ModelCardError(f"network.name must be a dotted Python name such as 'monai.networks.nets.UNet', got {name!r}.")
    if not isinstance(args, (dict, list)):
        raise ModelCardError(f"network.args must be an object of keyword arguments, got {args!r}.")
    try:
        factory = allowlist.network_class(name)
        safe = True
    except allowlist.NotAllowed as why:
        if not allow_code_targets:
            raise ModelCardError(
                f"network.name {name!r} is refused: {why}. The loader builds only torch.nn.Module classes defined "
                f"under monai.networks or torch.nn (for example 'monai.networks.nets.UNet'); building this would "
                "import and run other code. If you trust it, allow it with load_model(..., allow_code_targets=True) "
                "(command line: --allow-code-targets)."
            ) from None
        safe = False
        module_name, attr = name.rsplit(".", 1)
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ModelCardError(f"network.name {name!r} cannot be found ({exc}). Check the spelling and the MONAI "
                                 "version.") from None
    guard = allowlist.no_side_effects() if safe else _nullcontext()
    try:
        with guard:
            network = factory(**args) if isinstance(args, dict) else factory(*args)
    except Exception as exc:
        side = allowlist.find_side_effect(exc)
        if side is not None:
            raise ModelCardError(
                f"Building {name} with network.args {side}. Loading a model never starts programs or uses the "
                "network: set pretrained/download arguments to false in network.args and put the weights in the "
                "model file."
            ) from None
        if isinstance(exc, ImportError):  # MONAI's OptionalImportError: e.g. UNETR and SwinUNETR need einops
            raise ModelCardError(
                f"Building {name} needs a package that is not installed: {_first_line(exc)}. Install it in this "
                "Python (pip install einops for MONAI's transformer networks, UNETR and SwinUNETR)."
            ) from None
        raise ModelCardError(f"network.args do not fit {name}: {type(exc).__name__}: {_first_line(exc)}. Fix network.args "
                             "in the model card.") from None
    if not isinstance(network, torch.nn.Module):
        raise ModelCardError(f"network.name {name!r} built a {type(network).__name__}, not a torch.nn.Module.")
    return network, not safe


def _nullcontext():
    import contextlib

    return contextlib.nullcontext()


def fit_state_dict(network, state: dict, spec, where: str) -> None:
    """Load ``state`` into ``network`` strictly; a mismatch names the keys and the fix."""
    own = network.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} (file {list(state[k].shape)}, network {list(own[k].shape)})"
              for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s): {_some(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {_some(unexpected)}")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatch(es): {_some(shapes)}")
        named = f" ({spec.get('name')})" if isinstance(spec, dict) else ""
        raise ModelError(
            f"The weights in {where} do not fit the network{named}: {'; '.join(parts)}. Fix the network's name "
            "and args (model card 'network', or the bundle's network_def) so they build the network these "
            "weights were saved from."
        )
    network.load_state_dict(state, strict=True)


def _load_bundle(p: Path, card, allow_code_targets: bool):
    files = _bundle.read_bundle(p)
    # Check and build first: the config is checked before anything in it is instantiated.
    network, executes = _bundle.build_network(files, allow_code_targets)
    state, notes = _unwrap_state_dict(_bundle.load_weights(files), f"{p.name}/{files.weights_name}")
    fit_state_dict(network, state, None, f"{p.name}/{files.weights_name}")
    if isinstance(card, ModelCard):
        return network, card, executes, notes
    derived, more = _bundle.derive_card(files)
    notes += more
    override = None
    if isinstance(card, dict):
        override = card
    elif card is not None:
        override = _read_json(Path(card))
    elif files.card is None:
        found = find_card(p)
        if found is not None:
            override = _read_json(found)
    if override:
        derived.update(override)
        notes.append("The given model card overrides the fields it names of the card derived from the bundle.")
    if any(f not in derived for f in REQUIRED_FIELDS):
        raise ModelCardError(_bundle.missing_fields_message(p.name, derived, notes))
    model_card = ModelCard.from_dict(derived, source=f"The card derived from the bundle {p.name}")
    return network, model_card, executes, notes


def _read_json(path: Path) -> dict:
    from ..inputs import read_json

    data = read_json(path, "model card", ModelCardError, max_bytes=1 << 20,
                     missing=f"Model card not found: {path}. Write one (see docs/model-card.md).")
    if not isinstance(data, dict):
        raise ModelCardError(f"Model card {path} must be a JSON object; see docs/model-card.md.")
    return data


# ---------------------------------------------------------------------------------------------- checks

class OutputSelector(torch.nn.Module):
    """Wraps a network whose forward returns a tuple, list or dict; returns its main tensor
    (see :func:`select_output`)."""

    def __init__(self, inner, rule: str):
        super().__init__()
        self.inner = inner
        self.rule = rule

    def forward(self, x):
        tensor, _ = select_output(self.inner(x))
        return tensor

    def extra_repr(self):
        return f"select={self.rule!r}"


def select_output(y):
    """``(tensor, how)``: ``y`` itself, the first tensor of a tuple/list, or a dict's 'pred'/'out'/first tensor."""
    if isinstance(y, torch.Tensor):
        return y, None
    if isinstance(y, (tuple, list)):
        for i, v in enumerate(y):
            if isinstance(v, torch.Tensor):
                return v, f"element {i} of the {type(y).__name__} it returns"
    if isinstance(y, dict):
        for key in ("pred", "out"):
            if isinstance(y.get(key), torch.Tensor):
                return y[key], f"the {key!r} entry of the dict it returns"
        for key, v in y.items():
            if isinstance(v, torch.Tensor):
                return v, f"the {key!r} entry (first tensor) of the dict it returns"
    return None, None


def _freeze(network):
    try:
        network.eval()
    except NotImplementedError:
        pass  # torch.export modules keep the mode they were exported in
    for param in network.parameters():
        param.requires_grad_(False)
    return network


def probe_shape(card: ModelCard) -> tuple[int, ...]:
    """The probe input: ``[1, in_channels, *roi]`` with roi = card.roi_size or 64 per axis, rounded up to size_divisible."""
    roi = card.roi_size or (DEFAULT_PROBE,) * card.spatial_dims
    d = card.size_divisible
    return (1, card.in_channels) + tuple(-(-int(r) // d) * d for r in roi)


def first_conv(network):
    """``(in_channels, spatial_dims)`` of the network's first convolution, or ``(None, None)``."""
    for _, module in network.named_modules():
        kind = getattr(module, "original_name", type(module).__name__)
        m = re.fullmatch(r"(?:Lazy)?Conv(Transpose)?([123])d", kind or "")
        if m and hasattr(module, "weight") and getattr(module, "weight") is not None:
            w = module.weight
            try:
                groups = int(getattr(module, "groups", 1))
            except Exception:
                groups = 1
            ch = int(w.shape[0]) if m.group(1) else int(w.shape[1]) * groups
            return ch, int(m.group(2))
    for name, param in network.named_parameters():  # torch.export modules: first conv-shaped weight
        if name.endswith("weight") and param.dim() in (4, 5):
            return int(param.shape[1]), param.dim() - 2
    return None, None


def probe(network, card: ModelCard, where: str):
    """Run ``network`` on zeros of :func:`probe_shape`; check the output; wrap tuple/dict outputs.

    Returns ``(network, notes)``. Raises ModelCardError when the card contradicts the network.
    """
    shape = probe_shape(card)
    try:
        x = torch.zeros(shape)
        with torch.no_grad():
            y = network(x)
    except Exception as exc:  # RuntimeError from conv, AssertionError from export guards, ...
        raise _translate(exc, network, card, shape, where) from None
    notes = []
    tensor, how = select_output(y)
    if tensor is None:
        raise ModelError(f"The network in {where} returned a {type(y).__name__} with no tensor in it; it must return "
                         "logits [1, out_channels, *spatial].")
    if how is not None:
        network = OutputSelector(network, how)
        notes.append(f"The network returns a {type(y).__name__}; the loader uses {how} as its logits.")
    dims = card.spatial_dims
    fits = tensor.dim() == dims + 2 and tensor.shape[1] == card.out_channels and tuple(tensor.shape[2:]) == shape[2:]
    conv_dims = first_conv(network)[1]
    if not fits and conv_dims is not None and conv_dims != dims:
        # torch convolutions accept unbatched input, so a 3D network may run on a 2D probe and vice versa
        raise ModelCardError(
            f"The card says spatial_dims={dims} but the network is {conv_dims}D (its first convolution is "
            f"conv{conv_dims}d): fix spatial_dims (and roi_size) in the card."
        )
    if tensor.dim() != dims + 2:
        raise ModelCardError(
            f"The card says spatial_dims={dims}, but for an input of shape {list(shape)} the network returns shape "
            f"{list(tensor.shape)}, not [1, out_channels, {', '.join('...' for _ in range(dims))}]. Fix spatial_dims "
            "in the card."
        )
    if tensor.shape[1] != card.out_channels:
        raise ModelCardError(
            f"The card says out_channels={card.out_channels} but the network returns {tensor.shape[1]} channels: fix "
            "out_channels (and target_class, activation) in the card."
        )
    if tuple(tensor.shape[2:]) != tuple(shape[2:]):
        raise ModelError(
            f"For an input of spatial size {list(shape[2:])} the network returns {list(tensor.shape[2:])}: the analysis "
            "needs one logit per input voxel. Use a network whose output has the input's size (or set roi_size / "
            "size_divisible in the card to a size the network keeps)."
        )
    if not torch.is_floating_point(tensor):
        raise ModelError(f"The network returns {tensor.dtype} values; it must return float logits.")
    return network, notes


def _translate(exc: Exception, network, card: ModelCard, shape, where: str) -> Exception:
    text = str(exc)
    conv_ch, conv_dims = first_conv(network)
    m = re.search(r"to have (\d+) channels, but got (\d+) channels", text)
    if m:
        conv_ch = int(m.group(1))
    m_guard = re.search(r"size\(\)\[(\d+)\] == (\d+)", text) or re.search(r"shape\[(\d+)\] to be equal to (\d+)", text)
    m_dims = re.search(r"input to conv(\d)d", text)
    if m_dims:
        net_dims = int(m_dims.group(1))
        return ModelCardError(
            f"The card says spatial_dims={card.spatial_dims} but the network is {net_dims}D (its first convolution is "
            f"conv{net_dims}d): fix spatial_dims (and roi_size) in the card."
        )
    if m_guard and int(m_guard.group(1)) == 1:
        conv_ch = int(m_guard.group(2))
    if conv_ch is not None and conv_ch != card.in_channels and (m or (m_guard and int(m_guard.group(1)) == 1)
                                                                or "channel" in text):
        return ModelCardError(
            f"The card says in_channels={card.in_channels} but the network's first convolution expects {conv_ch}: fix "
            "in_channels in the card."
        )
    if m_guard and int(m_guard.group(1)) >= 2:
        axis = int(m_guard.group(1))
        return ModelCardError(
            f"The network in {where} accepts only a fixed input size ({m_guard.group(2)} along spatial axis {axis - 2}), "
            f"and the probe input was {list(shape[2:])}. Set roi_size in the card to the size it was exported with "
            "(or export it with dynamic shapes)."
        )
    if conv_dims is not None and conv_dims != card.spatial_dims:
        return ModelCardError(
            f"The card says spatial_dims={card.spatial_dims} but the network's first convolution is {conv_dims}D: fix "
            "spatial_dims in the card."
        )
    if conv_ch is not None and conv_ch != card.in_channels:
        return ModelCardError(
            f"The card says in_channels={card.in_channels} but the network's first convolution expects {conv_ch}: fix "
            "in_channels in the card."
        )
    return ModelCardError(
        f"A probe forward of {where} on zeros of shape {list(shape)} (from the card's in_channels, roi_size and "
        f"size_divisible) failed: {type(exc).__name__}: {_first_line(exc)}. Check in_channels, spatial_dims, roi_size "
        "and size_divisible in the card (many networks need sizes divisible by 16 or 32)."
    )


# ---------------------------------------------------------------------------------------------- helpers

def sha256_of(p: Path) -> str:
    """SHA-256 of a file; of a folder: of ``"<sha256>  <relative path>\\n"`` lines in sorted path order."""
    if p.is_file():
        return _file_sha256(p)
    h = hashlib.sha256()
    for f in sorted((q for q in p.rglob("*") if q.is_file()), key=lambda q: q.relative_to(p).as_posix()):
        h.update(f"{_file_sha256(f)}  {f.relative_to(p).as_posix()}\n".encode("utf-8"))
    return h.hexdigest()


def _file_sha256(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _device(device):
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ModelError(f"Unknown device {device!r} ({exc}); use 'cpu', 'cuda', 'cuda:N' or 'auto'.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelError("device 'cuda' was asked for but torch sees no CUDA GPU here; use device='cpu'.")
    return dev


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def _some(items, n=4) -> str:
    return ", ".join(items[:n]) + (f", ... (+{len(items) - n} more)" if len(items) > n else "")


__all__ = ["LoadedModel", "load_model", "detect_format", "probe", "probe_shape", "select_output",
           "build_named_network", "fit_state_dict", "sha256_of", "ModelFormatWarning", "FORMATS"]
