"""The README's Python example runs as written (with small stand-in files of the same names)."""

import json
import re
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from DeepDreamAnalysisLib.config import FeatureConfig
from DeepDreamAnalysisLib.features import build_feature_set
from DeepDreamAnalysisLib.reference import compute_reference
from DeepDreamAnalysisLib.volume import Volume

from tiny_models import tiny_card, tiny_net

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    assert blocks, "README has no Python example"
    return blocks[0]


def test_readme_python_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    ct = rng.normal(100.0, 15.0, (41, 97, 121)).astype(np.float32)  # [k, j, i]: the seed (120, 96, 40) is inside
    img = sitk.GetImageFromArray(ct)
    img.SetSpacing((0.8, 0.8, 2.5))
    sitk.WriteImage(img, "CT.nii.gz")
    torch.jit.save(torch.jit.script(tiny_net(2)), "model.pt")  # a TorchScript stand-in for the user's model
    Path("model.card.json").write_text(json.dumps(tiny_card(2).to_dict()))
    lesions = []
    for n in range(4):
        arr = rng.normal(80.0, 20.0, (1, 40, 40)).astype(np.float32)
        mask = np.zeros(arr.shape, bool)
        mask[0, 10:20 + n, 12:25] = True
        lesions.append((Volume(arr), Volume(mask.astype(np.float32))))
    fs = build_feature_set(FeatureConfig(), 2)
    compute_reference(lesions, fs).save("stats.json")

    code = _python_example().replace("iterations=300", "iterations=12")
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    result = namespace["result"]
    assert result.status == "completed" and len(result.steps) == 12
    assert (tmp_path / "results" / "run1" / "run.json").is_file()
