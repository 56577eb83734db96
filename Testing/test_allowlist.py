"""The allow-list accepts a name by what it resolves to: only torch.nn.Module classes defined under
monai.networks or torch.nn are built without --allow-code-targets (issue #11)."""

from __future__ import annotations

import importlib
import inspect
import os
import pickle
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from test_models import UNET_CARD, UNET_ARGS, bundle_config, make_bundle, tiny_unet  # noqa: E402

from DeepDreamAnalysisLib.errors import ModelCardError, ModelError  # noqa: E402
from DeepDreamAnalysisLib.models import allowlist, build_named_network, load_model  # noqa: E402

NAMESPACES = ("monai.networks", "torch.nn")


def _defined_under_networks(obj) -> bool:
    return (isinstance(obj, type) and issubclass(obj, torch.nn.Module)
            and any(obj.__module__ == ns or obj.__module__.startswith(ns + ".") for ns in NAMESPACES))


def _public_names(root: str, max_depth: int = 3):
    """Every public ``root.a.b...`` name reachable by attribute from the already imported modules."""
    seen_modules = set()
    out = []
    stack = [(root, importlib.import_module(root), 0)]
    while stack:
        prefix, module, depth = stack.pop()
        if id(module) in seen_modules:
            continue
        seen_modules.add(id(module))
        for attr, value in list(vars(module).items()):
            if attr.startswith("_"):
                continue
            name = f"{prefix}.{attr}"
            if inspect.ismodule(value):
                if depth < max_depth and getattr(value, "__name__", "").startswith(root):
                    stack.append((name, value, depth + 1))
                continue
            if callable(value):
                out.append((name, value))
    return out


@pytest.mark.parametrize("root", ["torch", "monai"])
def test_only_network_classes_of_torch_nn_and_monai_networks_pass(root):
    pytest.importorskip(root)
    if root == "monai":  # make the network packages' names reachable as a bundle would see them
        importlib.import_module("monai.networks.nets")
    names = _public_names(root)
    assert len(names) > 500  # the walk really covers the namespace
    passed, refused = [], []
    for name, value in names:
        try:
            cls = allowlist.network_class(name)
        except allowlist.NotAllowed:
            refused.append(name)
            continue
        passed.append(name)
        assert cls is value, name
        assert _defined_under_networks(cls), name
    # Every network class of the namespace that the walk reached passes (nothing useful is lost) ...
    assert all(allowlist.is_allowed_network(n) for n, v in names if _defined_under_networks(v))
    # ... and the notorious functions and loaders are refused.
    for bad in ("torch.load", "torch.hub.load", "torch.jit.load", "torch.save", "torch.compile", "torch.from_file",
                "monai.apps.download_url", "monai.bundle.load", "monai.utils.optional_import",
                "monai.networks.utils.pytorch_after", "torch.utils.cpp_extension.load_inline"):
        assert not allowlist.is_allowed_network(bad), bad
    assert passed and refused


@pytest.mark.parametrize("name,why", [
    ("os.system", "outside torch and monai"),
    ("builtins.eval", "outside torch and monai"),
    ("torch.load", "a function, not a network class"),
    ("torch.hub.load", "a function"),
    ("torch.Tensor", "not a torch.nn.Module"),
    ("monai.apps.download_url", "cannot be found|a function"),
    ("torch.nn.Module.__init__", "a function|not a Python name|cannot be found"),
    ("UNet; import os", "not a Python name"),
    ("open", "short name"),
    ("torch.nn.modules.module.torch.load", "a function|cannot be found"),
])
def test_names_that_are_refused_say_why(name, why):
    with pytest.raises(allowlist.NotAllowed, match=why):
        allowlist.network_class(name)


def test_aliases_and_short_names_resolve_to_the_class_itself():
    from monai.networks.nets import UNet
    from monai.networks.nets.unet import UNet as defined

    assert allowlist.network_class("UNet") is UNet is defined
    assert allowlist.network_class("monai.networks.nets.unet.UNet") is UNet
    assert allowlist.network_class("torch.nn.Conv2d") is torch.nn.Conv2d
    assert allowlist.network_class("torch.nn.modules.conv.Conv2d") is torch.nn.Conv2d


def test_a_monai_network_that_would_download_is_stopped(tmp_path):
    """A network class whose constructor reaches the network (pretrained weights) is refused while built."""
    with allowlist.no_side_effects(), pytest.raises(allowlist.SideEffectRefused, match="reach the network"):
        import socket

        socket.getaddrinfo("example.invalid", 80)
    with allowlist.no_side_effects(), pytest.raises(allowlist.SideEffectRefused, match="shell command"):
        os.system("true")


def test_card_naming_a_torch_function_is_refused_before_it_runs(tmp_path):
    victim = tmp_path / "ran.txt"
    path = tmp_path / "w.pt"
    torch.save(tiny_unet().state_dict(), path)
    for name, args in (("torch.from_file", [str(victim), True, 1]), ("torch.load", [str(path)]),
                       ("torch.hub.load", [str(tmp_path), "x"])):
        with pytest.raises(ModelCardError, match=rf"network.name '{name}' is refused: .*a function.*"
                                                 "--allow-code-targets"):
            build_named_network({"name": name, "args": args})
    assert not victim.exists()


@pytest.mark.parametrize("target", [
    "torch.from_file", "torch.load", "torch.hub.load", "monai.bundle.load", "monai.apps.download_and_extract",
    "torch.utils.cpp_extension.load_inline", "importlib.import_module", "monai.utils.optional_import",
    "monai.transforms.Lambda", "Lambda", "monai.transforms.LoadImage",
])
def test_bundle_target_resolving_to_anything_but_a_network_class_is_refused(tmp_path, target):
    nd = {"_target_": target, "filename": str(tmp_path / "victim"), "shared": True, "size": 1}
    root = make_bundle(tmp_path / "b", config=bundle_config(network_def=nd))
    with pytest.raises(ModelError, match=r"allow_code_targets=True") as err:
        load_model(root)
    assert "network_def" in str(err.value) and repr(target) in str(err.value)
    assert not (tmp_path / "victim").exists()


@pytest.mark.parametrize("extra,what", [
    ({"_requires_": "@other"}, "_requires_"),
    ({"_mode_": "callable"}, "_mode_ 'callable'"),
    ({"_mode_": "debug"}, "_mode_ 'debug'"),
    ({"channels": "%configs/other.json#x"}, "macro"),
    ({"channels": "$[4, 8]"}, "Python expression"),
    ({"channels": "@os.system"}, "names no config entry|does not define"),
])
def test_bundle_network_def_code_paths_are_refused(tmp_path, extra, what):
    nd = {"_target_": "UNet", **UNET_ARGS, **extra}
    root = make_bundle(tmp_path / "b", config=bundle_config(network_def=nd, other={"_target_": "torch.nn.ReLU"}))
    with pytest.raises(ModelError, match=what):
        load_model(root)


def test_malicious_pickle_is_refused_without_torch_weights_only_advice(tmp_path):
    victim = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {victim}",))

    for path in (tmp_path / "evil.pt", tmp_path / "evil_legacy.pt"):
        if path.name == "evil.pt":
            torch.save(Evil(), path)
        else:
            path.write_bytes(pickle.dumps(Evil(), protocol=2))
        with pytest.raises(ModelError) as err:
            load_model(path, card=UNET_CARD)
        msg = str(err.value)
        assert "refused: this file asks to run code (`posix.system`) when loaded" in msg
        assert "weights_only" not in msg
    assert not victim.exists()


def test_bundle_with_malicious_weights_is_refused_without_the_advice(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    root = make_bundle(tmp_path / "b")
    weights = next(root.rglob("model.pt"))
    torch.save(Evil(), weights)
    with pytest.raises(ModelError, match="asks to run code") as err:
        load_model(root)
    assert "weights_only" not in str(err.value)
