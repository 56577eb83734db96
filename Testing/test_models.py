"""Model loading: every format made here as a tiny real network, and every bad input with its message."""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.networks.nets import UNet

from DeepDreamAnalysisLib.card import ModelCard
from DeepDreamAnalysisLib.errors import DeepDreamError, ModelCardError, ModelError
from DeepDreamAnalysisLib.models import ModelFormatWarning, load_model, probe_shape, sha256_of

CARD_2D = {"name": "tiny", "spatial_dims": 2, "in_channels": 1, "out_channels": 2, "activation": "softmax",
           "target_class": 1, "preprocessing": {"type": "window", "min": -100, "max": 250}, "roi_size": [32, 32]}
UNET_ARGS = {"spatial_dims": 2, "in_channels": 1, "out_channels": 2, "channels": [4, 8], "strides": [2],
             "num_res_units": 0}
UNET_CARD = dict(CARD_2D, network={"name": "monai.networks.nets.UNet", "args": UNET_ARGS})


def two_conv(in_ch=1, out_ch=2, dims=2, seed=0):
    torch.manual_seed(seed)
    conv = torch.nn.Conv2d if dims == 2 else torch.nn.Conv3d
    return torch.nn.Sequential(conv(in_ch, 4, 3, padding=1), torch.nn.ReLU(), conv(4, out_ch, 1)).eval()


def tiny_unet(seed=0, **over):
    torch.manual_seed(seed)
    return UNet(**dict(UNET_ARGS, **over)).eval()


def x2d(size=32, seed=1):
    return torch.randn(1, 1, size, size, generator=torch.Generator().manual_seed(seed))


def save_torchscript(net, path):
    torch.jit.save(torch.jit.script(net), str(path))
    return path


def save_export(net, path, size=32):
    torch.export.save(torch.export.export(net, (torch.zeros(1, 1, size, size),)), str(path))
    return path


def assert_frozen(model):
    assert all(not p.requires_grad for p in model.network.parameters())
    # The analysis needs gradients with respect to the input through the frozen network.
    x = torch.zeros(1, 1, 32, 32, requires_grad=True)
    model.network(x)[0, 1, 16, 16].backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------ formats

def test_torchscript_loads_frozen_with_card_beside(tmp_path):
    net = two_conv()
    path = save_torchscript(net, tmp_path / "net.pt")
    (tmp_path / "net.pt.card.json").write_text(json.dumps(CARD_2D))
    model = load_model(path)
    assert model.format == "torchscript" and model.executes_code is True
    assert model.card.out_channels == 2 and model.path == path
    assert model.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert not model.network.training
    assert_frozen(model)
    torch.testing.assert_close(model.network(x2d()), net(x2d()))
    assert model.notes == []


def test_torch_export_program(tmp_path):
    net = two_conv()
    path = save_export(net, tmp_path / "net.pt2")
    model = load_model(path, card=CARD_2D)
    assert model.format == "torch.export" and model.executes_code is True
    assert_frozen(model)
    torch.testing.assert_close(model.network(x2d()), net(x2d()))


def test_state_dict_with_card_network(tmp_path):
    net = tiny_unet()
    path = tmp_path / "weights.pth"
    torch.save(net.state_dict(), path)
    (tmp_path / "card.json").write_text(json.dumps(UNET_CARD))
    model = load_model(path)
    assert model.format == "state-dict" and model.executes_code is False
    assert isinstance(model.network, UNet) and not model.network.training
    assert_frozen(model)
    torch.testing.assert_close(model.network(x2d()), net(x2d()))


def test_state_dict_checkpoint_and_dataparallel_prefix(tmp_path):
    net = tiny_unet()
    path = tmp_path / "ckpt.pt"
    torch.save({"epoch": 3, "state_dict": {"module." + k: v for k, v in net.state_dict().items()}}, path)
    model = load_model(path, card=UNET_CARD)
    torch.testing.assert_close(model.network(x2d()), net(x2d()))
    assert any("'state_dict' entry" in n for n in model.notes)
    assert any("module." in n for n in model.notes)


def test_card_argument_as_path_dict_or_modelcard(tmp_path):
    path = save_torchscript(two_conv(), tmp_path / "net.ts")
    card_path = tmp_path / "elsewhere.json"
    card_path.write_text(json.dumps(dict(CARD_2D, name="from-path")))
    assert load_model(path, card=card_path).card.name == "from-path"
    assert load_model(path, card=str(card_path)).card.name == "from-path"
    assert load_model(path, card=dict(CARD_2D, name="from-dict")).card.name == "from-dict"
    assert load_model(path, card=ModelCard.from_dict(dict(CARD_2D, name="obj"))).card.name == "obj"


def test_to_device_returns_self_and_bad_device_is_clear(tmp_path):
    model = load_model(save_torchscript(two_conv(), tmp_path / "net.ts"), card=CARD_2D)
    assert model.to("cpu") is model and model.device == "cpu"
    with pytest.raises(ModelError, match="Unknown device 'warp-drive'"):
        model.to("warp-drive")


# ------------------------------------------------------------------------------------------ bundles

BUNDLE_META = {
    "name": "tiny liver bundle",
    "description": "a test bundle",
    "network_data_format": {
        "inputs": {"image": {"type": "image", "num_channels": 1, "spatial_shape": [32, 32]}},
        "outputs": {"pred": {"type": "image", "num_channels": 2, "channel_def": {"0": "background", "1": "lesion"}}},
    },
}


def bundle_config(**over):
    cfg = {
        "imports": ["$import os"],
        "device": "$torch.device('cpu')",
        "network_def": dict({"_target_": "UNet"}, **UNET_ARGS),
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "LoadImaged", "keys": "image"},
            {"_target_": "Spacingd", "keys": "image", "pixdim": [1.5, 1.5, 2.0]},
            {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": -57, "a_max": 164, "b_min": 0.0,
             "b_max": 1.0, "clip": True},
        ]},
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "Activationsd", "keys": "pred", "softmax": True}]},
    }
    cfg.update(over)
    return cfg


def make_bundle(root: Path, net=None, config=None, metadata=BUNDLE_META, card=None, weights=True) -> Path:
    (root / "configs").mkdir(parents=True)
    (root / "models").mkdir()
    if weights:
        torch.save((net or tiny_unet()).state_dict(), root / "models" / "model.pt")
    (root / "configs" / "inference.json").write_text(json.dumps(config or bundle_config()))
    if metadata is not None:
        (root / "configs" / "metadata.json").write_text(json.dumps(metadata))
    if card is not None:
        (root / "card.json").write_text(json.dumps(card))
    return root


def zip_bundle(root: Path, out: Path) -> Path:
    with zipfile.ZipFile(out, "w") as zf:
        for f in sorted(root.rglob("*")):
            if f.is_file():
                zf.write(f, f"{root.name}/{f.relative_to(root).as_posix()}")
    return out


def test_bundle_folder_derives_card_and_loads_weights(tmp_path):
    net = tiny_unet(seed=5)
    root = make_bundle(tmp_path / "tiny_bundle", net=net)
    model = load_model(root)
    assert model.format == "monai-bundle" and model.executes_code is False
    card = model.card
    assert (card.spatial_dims, card.in_channels, card.out_channels) == (2, 1, 2)
    assert card.roi_size == (32, 32) and card.activation == "softmax" and card.target_class == 1
    pre = card.preprocessing
    assert (pre.type, pre.min, pre.max, pre.out_min, pre.out_max) == ("window", -57.0, 164.0, 0.0, 1.0)
    assert card.spacing == (1.5, 1.5, 2.0) and card.name == "tiny liver bundle"
    assert any("lesion" in n for n in model.notes)  # the assumed target class is named
    assert_frozen(model)
    torch.testing.assert_close(model.network(x2d()), net(x2d()))
    # folder hash: sha256sum-style lines over the files in sorted order
    lines = "".join(f"{hashlib.sha256(f.read_bytes()).hexdigest()}  {f.relative_to(root).as_posix()}\n"
                    for f in sorted(p for p in root.rglob("*") if p.is_file()))
    assert model.sha256 == hashlib.sha256(lines.encode()).hexdigest()


def test_bundle_zip_with_card_json_override(tmp_path):
    net = tiny_unet(seed=2)
    root = make_bundle(tmp_path / "zipped_bundle", net=net, card={"target_class": 0, "roi_size": [48, 48]})
    path = zip_bundle(root, tmp_path / "zipped_bundle.zip")
    shutil.rmtree(root)
    model = load_model(path)
    assert model.format == "monai-bundle" and model.path == path
    assert model.card.target_class == 0 and model.card.roi_size == (48, 48)
    assert model.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    torch.testing.assert_close(model.network(x2d()), net(x2d()))


def test_bundle_normalize_transform_and_divisible_shape(tmp_path):
    cfg = bundle_config(preprocessing={"_target_": "Compose", "transforms": [
        {"_target_": "monai.transforms.NormalizeIntensityd", "keys": "image", "subtrahend": 40.0, "divisor": 80.0}]})
    meta = json.loads(json.dumps(BUNDLE_META))
    meta["network_data_format"]["inputs"]["image"]["spatial_shape"] = ["16*n", "16*n"]
    model = load_model(make_bundle(tmp_path / "b", config=cfg, metadata=meta))
    pre = model.card.preprocessing
    assert (pre.type, pre.mean, pre.std) == ("normalize", 40.0, 80.0)
    assert model.card.size_divisible == 16 and model.card.roi_size is None


def test_bundle_without_derivable_fields_names_them(tmp_path):
    meta = {"name": "x", "network_data_format": {"inputs": {"image": {"num_channels": 1}}, "outputs": {}}}
    cfg = bundle_config(network_def={"_target_": "monai.networks.nets.BasicUNet", "spatial_dims": 2,
                                     "features": [4, 4, 4, 4, 4, 4]},
                        preprocessing={}, postprocessing={})
    root = make_bundle(tmp_path / "b", config=cfg, metadata=meta,
                       net=_basic_unet())
    with pytest.raises(ModelCardError) as err:
        load_model(root)
    msg = str(err.value)
    assert "out_channels" in msg and "preprocessing" in msg and "card.json" in msg
    assert "in_channels" not in msg.split("does not say")[1].split("(")[0]  # derived: not asked for


def _basic_unet():
    from monai.networks.nets import BasicUNet

    torch.manual_seed(0)
    return BasicUNet(spatial_dims=2, features=(4, 4, 4, 4, 4, 4))


def test_bundle_foreign_target_is_refused_before_anything_is_built(tmp_path):
    victim = tmp_path / "created_by_bundle.txt"
    cfg = bundle_config()
    cfg["postprocessing"]["transforms"].append({"_target_": "builtins.open", "file": str(victim), "mode": "w"})
    root = make_bundle(tmp_path / "evil", config=cfg)
    with pytest.raises(ModelError) as err:
        load_model(root)
    msg = str(err.value)
    assert "'builtins.open'" in msg and "allow_code_targets=True" in msg and "postprocessing" in msg
    assert not victim.exists()
    # Allowed: the bundle loads, is flagged as executing code, and nothing outside network_def is built.
    model = load_model(root, allow_code_targets=True)
    assert model.executes_code is True
    assert not victim.exists()


@pytest.mark.parametrize("network_def", [
    {"_target_": "open", "file": "{victim}", "mode": "w"},                  # short name MONAI does not know
    {"_target_": "pathlib.Path.touch", "self": "{victim}"},
    {"_target_": "torch.hub.load", "repo_or_dir": "{victim}", "model": "x"},  # a torch loader of foreign code
])
def test_bundle_network_def_with_foreign_target_is_refused(tmp_path, network_def):
    victim = tmp_path / "created.txt"
    nd = {k: (v.format(victim=victim) if isinstance(v, str) else v) for k, v in network_def.items()}
    root = make_bundle(tmp_path / "evil", config=bundle_config(network_def=nd))
    with pytest.raises(ModelError, match="allow_code_targets=True") as err:
        load_model(root)
    assert repr(nd["_target_"]) in str(err.value)
    assert not victim.exists()


def test_bundle_expression_in_network_def_is_refused(tmp_path):
    victim = tmp_path / "created.txt"
    nd = dict({"_target_": "UNet"}, **UNET_ARGS)
    nd["channels"] = f"$open({str(victim)!r}, 'w') and [4, 8]"
    root = make_bundle(tmp_path / "evil", config=bundle_config(network_def=nd))
    with pytest.raises(ModelError, match="Python expression at network_def::channels"):
        load_model(root)
    assert not victim.exists()


def test_bundle_references_inside_network_def_resolve(tmp_path):
    nd = dict({"_target_": "UNet"}, **UNET_ARGS)
    nd["channels"] = "@net_channels"
    cfg = bundle_config(network_def=nd, net_channels=[4, 8])
    model = load_model(make_bundle(tmp_path / "b", config=cfg))
    assert model.executes_code is False


def test_bundle_problems_are_named(tmp_path):
    with pytest.raises(ModelError, match="no models/model.pt"):
        load_model(make_bundle(tmp_path / "noweights", weights=False))
    cfg = bundle_config()
    del cfg["network_def"]
    with pytest.raises(ModelError, match="has no 'network_def'"):
        load_model(make_bundle(tmp_path / "nodef", config=cfg))
    with pytest.raises(ModelError, match="do not fit the network") as err:
        load_model(make_bundle(tmp_path / "wrongweights", net=tiny_unet(channels=[4, 16])))
    assert "shape mismatch" in str(err.value)
    plain = tmp_path / "plain_folder"
    plain.mkdir()
    with pytest.raises(ModelError, match="not a MONAI bundle"):
        load_model(plain)


# ------------------------------------------------------------------------------------------ outputs

class TupleNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.main = two_conv()
        self.aux = torch.nn.Conv2d(1, 2, 1)

    def forward(self, x):
        return self.main(x), self.aux(x)


class DictNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.main = two_conv()
        self.aux = torch.nn.Conv2d(1, 3, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"aux": self.aux(x), "pred": self.main(x)}


def test_tuple_output_is_wrapped_to_its_first_tensor(tmp_path):
    net = TupleNet().eval()
    model = load_model(save_torchscript(net, tmp_path / "tuple.pt"), card=CARD_2D)
    out = model.network(x2d())
    assert isinstance(out, torch.Tensor)
    torch.testing.assert_close(out, net(x2d())[0])
    assert any("element 0 of the tuple" in n for n in model.notes)
    assert_frozen(model)


def test_dict_output_uses_pred(tmp_path):
    net = DictNet().eval()
    model = load_model(save_torchscript(net, tmp_path / "dict.pt"), card=CARD_2D)
    torch.testing.assert_close(model.network(x2d()), net(x2d())["pred"])
    assert any("'pred' entry" in n for n in model.notes)


def test_list_output_from_export_is_wrapped(tmp_path):
    class ListNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.main = two_conv()

        def forward(self, x):
            return [self.main(x), x]

    net = ListNet().eval()
    model = load_model(save_export(net, tmp_path / "list.pt2"), card=CARD_2D)
    torch.testing.assert_close(model.network(x2d()), net(x2d())[0])


# ------------------------------------------------------------------------------------------ bad input

def test_missing_file(tmp_path):
    with pytest.raises(ModelError, match="Model file not found: .*nope.pt. Check the path"):
        load_model(tmp_path / "nope.pt", card=CARD_2D)


def test_empty_file(tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(ModelError, match=r"is empty \(0 bytes\).*save or copy it again"):
        load_model(tmp_path / "empty.pt", card=CARD_2D)


def test_truncated_torchscript_is_corrupt(tmp_path):
    path = save_torchscript(two_conv(), tmp_path / "net.pt")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="corrupt.*truncated"):
        load_model(path, card=CARD_2D)


def test_garbage_inside_torch_zip_is_corrupt(tmp_path):
    path = tmp_path / "sd.pt"
    torch.save(tiny_unet().state_dict(), path)
    with zipfile.ZipFile(path) as zf:
        entries = {n: zf.read(n) for n in zf.namelist()}
    with zipfile.ZipFile(path, "w") as zf:
        for n, data in entries.items():
            zf.writestr(n, b"not a pickle" if n.endswith("data.pkl") else data)
    with pytest.raises(ModelError, match="corrupt"):
        load_model(path, card=UNET_CARD)


def test_text_file_is_not_a_model(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("these are my notes, not weights\n")
    with pytest.raises(ModelError, match="is not a model file: it looks like a text file"):
        load_model(path, card=CARD_2D)


@pytest.mark.parametrize("name", ["ct.nii", "ct.nii.gz"])
def test_nifti_image_is_not_a_model(tmp_path, name):
    import SimpleITK as sitk

    path = tmp_path / name
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 5, 6), np.float32)), str(path))
    with pytest.raises(ModelError, match="not a model file: it looks like (a NIfTI image|gzip-compressed)"):
        load_model(path, card=CARD_2D)


def test_card_given_as_model_says_so(tmp_path):
    path = tmp_path / "card.pt"
    path.write_text(json.dumps(CARD_2D))
    with pytest.raises(ModelError, match="a model card.*give the model file"):
        load_model(path)


def test_other_zip_is_not_a_model(tmp_path):
    path = tmp_path / "photos.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("a.txt", "hello")
    with pytest.raises(ModelError, match="zip archive but not a model"):
        load_model(path, card=CARD_2D)


def test_format_other_than_extension_loads_by_content_with_a_note(tmp_path):
    ts_as_pt2 = save_torchscript(two_conv(), tmp_path / "really_torchscript.pt2")
    with pytest.warns(ModelFormatWarning, match="holds a TorchScript archive, not the torch.export program"):
        model = load_model(ts_as_pt2, card=CARD_2D)
    assert model.format == "torchscript" and "loaded by content" in model.notes[0]
    sd_as_ts = tmp_path / "weights.ts"
    torch.save(tiny_unet().state_dict(), sd_as_ts)
    with pytest.warns(ModelFormatWarning, match="holds a state dict"):
        model = load_model(sd_as_ts, card=UNET_CARD)
    assert model.format == "state-dict" and model.executes_code is False
    pt2_as_pt = save_export(two_conv(), tmp_path / "program.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error", ModelFormatWarning)  # .pt2 content in .pt: said so
        with pytest.raises(ModelFormatWarning, match="torch.export program"):
            load_model(pt2_as_pt, card=CARD_2D)


def test_pickled_whole_module_is_refused_without_running_it(tmp_path):
    path = tmp_path / "whole.pt"
    torch.save(two_conv(), path)
    with pytest.raises(ModelError, match="pickled Python objects \\(torch.nn.modules.container.Sequential.*state_dict"):
        load_model(path, card=CARD_2D)


def test_state_dict_without_network_in_card(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(tiny_unet().state_dict(), path)
    with pytest.raises(ModelCardError, match=r"(?s)is a state dict.*the card must name the network.*\"network\": \{\"name\": \"monai.networks.nets.UNet\""):
        load_model(path, card=CARD_2D)


def test_state_dict_that_does_not_fit_names_the_keys(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(tiny_unet(num_res_units=1).state_dict(), path)
    with pytest.raises(ModelError) as err:
        load_model(path, card=UNET_CARD)
    msg = str(err.value)
    assert "do not fit the network (monai.networks.nets.UNet)" in msg
    assert "8 missing key(s): model.0.conv.weight, model.0.conv.bias" in msg
    assert "unexpected key(s): model.0.conv.unit0.conv.weight" in msg and "(+" in msg  # the list is cut short
    assert "Fix the network's name and args" in msg


def test_state_dict_that_is_not_a_state_dict(tmp_path):
    path = tmp_path / "numbers.pt"
    torch.save([1, 2, 3], path)
    with pytest.raises(ModelError, match="holds a list, not a state dict"):
        load_model(path, card=UNET_CARD)


def test_network_name_outside_monai_and_torch_is_refused(tmp_path):
    victim = tmp_path / "created.txt"
    path = tmp_path / "weights.pt"
    torch.save(tiny_unet().state_dict(), path)
    card = dict(CARD_2D, network={"name": "pathlib.Path.touch", "args": [str(victim)]})
    with pytest.raises(ModelCardError, match="'pathlib.Path.touch' is outside.*allow_code_targets=True"):
        load_model(path, card=card)
    assert not victim.exists()


def test_network_args_that_do_not_fit(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(tiny_unet().state_dict(), path)
    card = dict(CARD_2D, network={"name": "monai.networks.nets.UNet", "args": {"spatial_dims": 2, "colour": 3}})
    with pytest.raises(ModelCardError, match="network.args do not fit monai.networks.nets.UNet"):
        load_model(path, card=card)
    card = dict(CARD_2D, network={"name": "monai.networks.nets.NoSuchNet"})
    with pytest.raises(ModelCardError, match="'monai.networks.nets.NoSuchNet' cannot be found"):
        load_model(path, card=card)


def test_a_network_that_needs_a_missing_package_says_which(tmp_path, monkeypatch):
    from monai.utils import OptionalImportError

    from DeepDreamAnalysisLib.models import allowlist

    def needs_einops(**kwargs):
        raise OptionalImportError("from einops import rearrange (No module named 'einops').")

    monkeypatch.setattr(allowlist, "network_class", lambda name: needs_einops)
    path = tmp_path / "weights.pt"
    torch.save(tiny_unet().state_dict(), path)
    card = dict(CARD_2D, network={"name": "monai.networks.nets.UNETR", "args": {"spatial_dims": 2}})
    with pytest.raises(ModelCardError, match="needs a package that is not installed: from einops.*pip install einops"):
        load_model(path, card=card)


def test_missing_card_lists_fields_and_where_to_put_it(tmp_path):
    path = save_torchscript(two_conv(), tmp_path / "net.ts")
    with pytest.raises(ModelCardError) as err:
        load_model(path)
    msg = str(err.value)
    for f in ("spatial_dims", "in_channels", "out_channels", "activation", "target_class", "preprocessing"):
        assert f'"{f}"' in msg
    assert "net.ts.card.json" in msg and "docs/model-card.md" in msg


def test_in_channels_mismatch_is_translated(tmp_path):
    path = save_torchscript(two_conv(in_ch=3), tmp_path / "rgb.pt")
    with pytest.raises(ModelCardError, match="The card says in_channels=1 but the network's first convolution "
                                             "expects 3: fix in_channels in the card"):
        load_model(path, card=CARD_2D)


def test_in_channels_mismatch_in_export_program(tmp_path):
    path = save_export(two_conv(), tmp_path / "net.pt2")
    with pytest.raises(ModelCardError, match="in_channels=3 but the network's first convolution expects 1"):
        load_model(path, card=dict(CARD_2D, in_channels=3))


def test_spatial_dims_mismatch_is_translated(tmp_path):
    path = save_torchscript(two_conv(), tmp_path / "net2d.pt")
    card = dict(CARD_2D, spatial_dims=3, roi_size=[8, 8, 8])
    with pytest.raises(ModelCardError, match="spatial_dims=3 but the network is 2D.*fix spatial_dims"):
        load_model(path, card=card)


def test_out_channels_mismatch(tmp_path):
    path = save_torchscript(two_conv(out_ch=3), tmp_path / "net.pt")
    with pytest.raises(ModelCardError, match="out_channels=2 but the network returns 3 channels: fix out_channels"):
        load_model(path, card=CARD_2D)


def test_fixed_size_export_names_roi_size(tmp_path):
    path = save_export(two_conv(), tmp_path / "net.pt2", size=32)
    with pytest.raises(ModelCardError, match="fixed input size.*Set roi_size"):
        load_model(path, card=dict(CARD_2D, roi_size=None))


def test_probe_respects_size_divisible(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(tiny_unet(channels=[4, 8, 8], strides=[2, 2]).state_dict(), path)
    card = dict(UNET_CARD, roi_size=[30, 30], network={"name": "monai.networks.nets.UNet",
                                                      "args": dict(UNET_ARGS, channels=[4, 8, 8], strides=[2, 2])})
    with pytest.raises(ModelCardError, match="probe forward.*size_divisible"):
        load_model(path, card=card)
    model = load_model(path, card=dict(card, size_divisible=4))
    assert probe_shape(model.card) == (1, 1, 32, 32)
    assert probe_shape(ModelCard.from_dict(dict(CARD_2D, spatial_dims=3, roi_size=None))) == (1, 1, 64, 64, 64)


def test_output_not_same_size_as_input(tmp_path):
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3)).eval()  # no padding: shrinks by 2
    with pytest.raises(ModelError, match="one logit per input voxel"):
        load_model(save_torchscript(net, tmp_path / "valid.pt"), card=CARD_2D)


def test_all_loader_errors_are_deepdream_errors(tmp_path):
    """The command line and the panel catch DeepDreamError: nothing else may escape for bad files."""
    rng = np.random.default_rng(0)
    for i, blob in enumerate([rng.bytes(10), b"PK\x03\x04" + rng.bytes(200), b"\x80\x02" + rng.bytes(50)]):
        path = tmp_path / f"junk{i}.pt"
        path.write_bytes(blob)
        with pytest.raises(DeepDreamError):
            load_model(path, card=UNET_CARD)
