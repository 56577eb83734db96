"""LiTS 117 healthy slices, synthetic lesions, the 135-degree marking, the training module and the
bundled demo network.

Needs data/lits117/ (``make data``; ``make test`` fetches it first).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from DeepDreamAnalysisLib import lits
from DeepDreamAnalysisLib.card import ModelCard
from DeepDreamAnalysisLib.errors import ImageError
from DeepDreamAnalysisLib.synthetic import (
    HypointenseLesions,
    LineMarking,
    MarkedLesions,
    distance_to_outside,
    gaussian_filter,
    line_response,
)

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "Resources" / "DemoModel"
sys.path.insert(0, str(ROOT / "scripts"))


@pytest.fixture(scope="module")
def volume():
    return lits.load_lits117()


def _components(mask):
    import SimpleITK as sitk

    comp = sitk.GetArrayFromImage(sitk.ConnectedComponent(sitk.GetImageFromArray(mask.astype(np.uint8))))
    return [comp == c for c in range(1, int(comp.max()) + 1)]


# ----------------------------------------------------------------------------- LiTS and healthy slices


def test_missing_data_says_run_make_data(tmp_path):
    with pytest.raises(ImageError, match="make data"):
        lits.load_lits117(tmp_path)


@pytest.mark.parametrize("k", [20, lits.DEMO_SLICE, 90])
def test_healthy_slice_has_no_tumour_left_in_the_liver(volume, k):
    image, labels = volume
    hs = lits.healthy_slice(image, labels, k)
    tumour = labels[k] == 2
    assert tumour.any(), "every slice of LiTS 117 has tumours"
    # every tumour voxel was replaced, and nothing outside the liver changed
    assert not (tumour & ~hs.inpainted).any()
    assert np.array_equal(hs.image[~hs.liver], image[k][~hs.liver])
    healthy_liver = hs.liver & ~hs.inpainted
    mu, sd = hs.image[healthy_liver].mean(), hs.image[healthy_liver].std()
    # the replaced voxels look like liver: same mean and spread
    rep = hs.image[hs.inpainted]
    assert abs(rep.mean() - mu) < 10.0
    assert 0.6 < rep.std() / sd < 1.4
    # no dark blob left: the locally smoothed image in the former tumours stays near the liver mean,
    # while the original slice fails the same check
    # (tumour voxels at least 5 voxels inside the liver, so the smoothing does not reach outside it)
    inner = tumour & (distance_to_outside(hs.liver) > 5)
    smooth_after = gaussian_filter(hs.image, 1.5)[inner]
    smooth_before = gaussian_filter(image[k], 1.5)[inner]
    assert smooth_after.min() > mu - 30.0
    assert smooth_before.min() < mu - 30.0
    # plausible liver HU (contrast-enhanced parenchyma)
    lo, hi = np.percentile(hs.image[hs.liver], [5, 95])
    assert 50.0 < lo and hi < 200.0


def test_demo_case_is_a_one_slice_volume_with_a_seed_deep_in_the_liver(volume):
    image, labels = volume
    vol, seed = lits.demo_case()
    assert vol.array.shape == (1, 128, 128)
    assert vol.spacing == (1.6, 1.6, 3.0)
    i, j, k = seed
    assert k == 0 and 16 <= i < 112 and 16 <= j < 112
    hs = lits.healthy_slice(image, labels, lits.DEMO_SLICE)
    np.testing.assert_array_equal(vol.array[0], hs.image)
    # at least 8 voxels of liver all around the seed
    assert hs.liver[j - 8 : j + 9, i - 8 : i + 9].all()
    vol2, seed2 = lits.demo_case()
    assert seed2 == seed and np.array_equal(vol2.array, vol.array)


def test_saved_demo_slice_reads_back_with_the_assumed_spacing(tmp_path):
    from DeepDreamAnalysisLib.volume import read_volume

    path, seed = lits.save_demo_case(tmp_path / "healthy.nii.gz")
    back = read_volume(path)
    vol, _ = lits.demo_case()
    np.testing.assert_allclose(back.spacing, (1.6, 1.6, 3.0))
    np.testing.assert_array_equal(back.array, vol.array)
    assert not list(tmp_path.glob(".*tmp*"))


# ----------------------------------------------------------------------------- synthetic lesions


def _flat_liver(n=128, value=120.0, noise=10.0, seed=0):
    rng = np.random.default_rng(seed)
    image = np.full((n, n), -50.0, np.float32)
    liver = np.zeros((n, n), bool)
    liver[10:-10, 10:-10] = True
    image[liver] = value + noise * rng.standard_normal(int(liver.sum()))
    return image, liver


def test_round_lesions_lower_the_intensity_where_they_are():
    image, liver = _flat_liver()
    gen = HypointenseLesions(count=(2, 4), radius_mm=(5.0, 9.0), contrast_hu=(40.0, 60.0))
    out, label, lesions = gen.generate(image, liver, np.random.default_rng(3))
    assert 2 <= len(lesions) <= 4
    assert label.any() and not (label & ~liver).any()
    assert np.array_equal(label, np.logical_or.reduce(lesions))
    drop = image - out
    # inside the label the image is 40-60 HU darker (ramp at the edge), outside the liver untouched
    assert 35.0 < drop[label].mean() <= 60.0
    assert np.all(drop[~liver] == 0)
    far = ~np.logical_or.reduce([gaussian_filter(les.astype(float), 3) > 0.01 for les in lesions])
    assert np.allclose(drop[far], 0)
    assert (drop >= -1e-4).all()


def test_a_round_lesion_has_the_drawn_radius_and_is_round():
    image, liver = _flat_liver()
    gen = HypointenseLesions(count=(1, 1), radius_mm=(8.0, 8.0), contrast_hu=(50.0, 50.0))
    _, label, lesions = gen.generate(image, liver, np.random.default_rng(0))
    assert len(lesions) == 1
    r_vox = 8.0 / 1.6
    assert abs(label.sum() - np.pi * r_vox**2) / (np.pi * r_vox**2) < 0.15
    assert _axis_ratio(label) < 1.2


def test_elongated_lesions_are_elongated():
    image, liver = _flat_liver()
    gen = HypointenseLesions(shape="elongated", count=(1, 1), radius_mm=(6.0, 6.0), axis_ratio=(3.0, 3.0))
    for s in range(3):
        _, label, lesions = gen.generate(image, liver, np.random.default_rng(s))
        assert len(lesions) == 1
        assert 2.4 < _axis_ratio(label) < 3.6


def _axis_ratio(mask):
    jj, ii = np.nonzero(mask)
    ev = np.linalg.eigvalsh(np.cov(np.stack([jj, ii]).astype(float)))
    return float(np.sqrt(ev[1] / ev[0]))


# ----------------------------------------------------------------------------- the 135-degree marking


def test_marking_is_made_of_135_degree_lines():
    lesion = np.zeros((64, 64), bool)
    lesion[8:56, 8:56] = True
    marked = LineMarking(density=1 / 40).apply(np.zeros((64, 64), np.float32), lesion, np.random.default_rng(1))
    assert marked[~lesion].max() == 0 and marked[lesion].max() >= 40.0
    # Fourier energy: lines along array[j + t, i + t] put their energy where k_j * k_i < 0
    spec = np.abs(np.fft.fft2(marked - marked.mean())) ** 2
    kj, ki = np.meshgrid(np.fft.fftfreq(64), np.fft.fftfreq(64), indexing="ij")
    along_135 = spec[kj * ki < 0].sum()
    along_45 = spec[kj * ki > 0].sum()
    assert along_135 > 3.0 * along_45
    # the line filter at 135 degrees responds much more than at 45 or 0/90 degrees
    r = {a: line_response(marked, a).max() for a in (0, 45, 90, 135)}
    assert r[135] > 2.0 * max(r[0], r[45], r[90])


def test_marked_lesions_mark_with_probability_p():
    image, liver = _flat_liver(noise=0.0)
    base = HypointenseLesions(count=(1, 1), radius_mm=(8.0, 8.0))
    unmarked = [base(image, liver, np.random.default_rng(s))[0] for s in range(20)]
    never = [MarkedLesions(base, p=0.0)(image, liver, np.random.default_rng(s))[0] for s in range(20)]
    always = [MarkedLesions(base, p=1.0)(image, liver, np.random.default_rng(s)) for s in range(20)]
    assert all(np.array_equal(a, b) for a, b in zip(unmarked, never))
    for (img, label), plain in zip(always, unmarked):
        # same lesion (same first draws), marking only inside it, and bright 135-degree lines there
        diff = img - plain
        assert (diff[~label] == 0).all() and diff[label].max() >= 40.0
        energy = {a: (line_response(diff, a) ** 2).sum() for a in (45, 135)}
        assert energy[135] > 2.0 * energy[45]


# ----------------------------------------------------------------------------- training module


def test_training_is_deterministic_and_logs_dice(volume):
    import training

    train = training.lits_slices(range(0, 8), "healthy", volume=volume)
    val = training.lits_slices(range(20, 22), "healthy", volume=volume)
    kwargs = dict(epochs=2, seed=5, channels=(4, 8), strides=(2,), patch=64, batch_size=4, verbose=False)
    m1, card, log = training.train_unet2d(train, val, HypointenseLesions(), **kwargs)
    m2, _, log2 = training.train_unet2d(train, val, HypointenseLesions(), **kwargs)
    for a, b in zip(m1.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(a, b)
    assert [e["loss"] for e in log["epochs"]] == [e["loss"] for e in log2["epochs"]]
    assert len(log["epochs"]) == 2 and 0.0 <= log["val_dice"] <= 1.0
    ModelCard.from_dict(card)  # a valid model card
    assert card["network"]["name"] == "monai.networks.nets.UNet"


def test_split_leaves_a_gap_around_the_validation_block():
    import training

    train, val = training.split_indices(128)
    assert val == list(lits.VALIDATION_BLOCK)
    assert min(abs(t - v) for t in train for v in val) > lits.VALIDATION_GAP


# ----------------------------------------------------------------------------- the bundled demo model


def test_demo_model_is_small_and_documented():
    files = [p for p in DEMO.iterdir() if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 5 * 1024 * 1024
    text = (DEMO / "MODEL_CARD.md").read_text()
    assert "not for clinical use" in text.lower() and "CC BY-NC-SA 4.0" in text
    log = json.loads((DEMO / "training_log.json").read_text())
    assert log["epochs"] and log["val_dice"] > 0.6


def test_demo_model_loads_safely_and_sees_no_lesion_at_the_demo_seed():
    from monai.networks import nets

    raw = json.loads((DEMO / "demo_unet.card.json").read_text())
    card = ModelCard.from_dict(raw)
    assert card.network["name"] == "monai.networks.nets.UNet"
    net = nets.UNet(**card.network["args"])
    state = torch.load(DEMO / "demo_unet.pt", map_location="cpu", weights_only=True)
    net.load_state_dict(state)
    net.eval()
    vol, (i, j, _) = lits.demo_case()
    pre = card.preprocessing
    x = torch.from_numpy(vol.array[None]) * pre.scale + pre.offset
    with torch.no_grad():
        prob = torch.softmax(net(x), dim=1)[0, card.target_class]
    assert prob[j, i] < 0.1
    # and the paper's step recorded at training raises it above 0.5 by plain gradient ascent on the target logit
    import train_demo

    demo = raw["dream"]
    assert demo["method"] == "robust+spectral"  # the card's default for the demo (docs/dream-methods.md)
    step = json.loads((DEMO / "training_log.json").read_text())["demo_check"]["step"]
    for p in net.parameters():
        p.requires_grad_(False)
    probs = train_demo.dream_trajectory(net, raw, vol.array[0], (i, j), step, iterations=demo["iterations"])
    assert probs[0] < 0.1 and probs[-1] > 0.5
    assert train_demo.first_above(probs) <= demo["iterations"] // 2
