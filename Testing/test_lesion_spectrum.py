"""The lesion-spectrum dream method (docs/dream-methods.md): the change keeps the reference lesions'
amplitude spectrum, only its phase moves, it needs a reference, and its options are checked."""

import json

import numpy as np
import pytest
import torch

from DeepDreamAnalysisLib.analysis import run_analysis
from DeepDreamAnalysisLib.cli import main
from DeepDreamAnalysisLib.config import AnalysisConfig, DreamConfig, FeatureConfig
from DeepDreamAnalysisLib.dream import DreamLoop
from DeepDreamAnalysisLib.dreaming import list_methods
from DeepDreamAnalysisLib.dreaming.lesion_spectrum import LesionSpectrum
from DeepDreamAnalysisLib.errors import ConfigError, ReferenceStatsError
from DeepDreamAnalysisLib.features import build_feature_set
from DeepDreamAnalysisLib.reference import ReferenceStats, compute_reference
from DeepDreamAnalysisLib.volume import Volume

from tiny_models import liver_like, tiny_card, tiny_model, tiny_net, write_case

CPU = torch.device("cpu")
SPACING = (0.8, 0.8, 3.0)


@pytest.fixture(scope="module")
def reference():
    """Reference statistics of three dark round lesions (60 HU below a 110 HU background), one per slice."""
    rng = np.random.default_rng(0)
    img = rng.normal(110, 15, (3, 64, 64)).astype(np.float32)
    lab = np.zeros(img.shape, np.int16)
    yy, xx = np.mgrid[:64, :64]
    for k, (cy, cx, r) in enumerate([(20, 20, 6), (40, 44, 9), (30, 30, 4)]):
        disk = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        img[k][disk] -= 60
        lab[k][disk] = 1
    fs = build_feature_set(FeatureConfig(names=("firstorder_Mean",)), 2)
    return compute_reference([(Volume(img, SPACING), Volume(lab, SPACING))], fs)


def _loop(reference, iterations=12, dims=2, **cfg):
    cfg = DreamConfig(iterations=iterations, method=cfg.pop("method", "lesion-spectrum"), step=cfg.pop("step", 10.0), **cfg)
    image = liver_like((1, 24, 24) if dims == 2 else (8, 16, 16))
    seed = tuple(n // 2 for n in image.shape)
    return DreamLoop(tiny_net(dims), tiny_card(dims), image, seed, cfg, CPU, spacing=SPACING, reference=reference)


def test_it_is_listed_with_its_source_and_options():
    info = {m.name: m for m in list_methods()}["lesion-spectrum"]
    assert "MAgnitude Constrained Optimization" in info.source and "Fel et al. 2023" in info.source
    assert "phase" in info.description and "--reference" in info.description
    assert set(info.options) == {"strength", "max_phase"}


def test_the_reference_stores_the_lesions_amplitude_spectrum(reference, tmp_path):
    spectrum = reference.spectrum
    assert spectrum.lesions == 3 and spectrum.spatial_dims == 2
    # a dark disk's transform peaks at zero frequency: its area x contrast (HU x mm^2), about 60 x 124 mm^2
    assert 3000 < spectrum.amplitude[0] < 10000 and spectrum.amplitude[0] > 10 * spectrum.amplitude[-1]
    path = reference.save(tmp_path / "stats.json")
    assert ReferenceStats.load(path).spectrum == spectrum
    data = json.loads(path.read_text())
    data["spectrum"]["amplitude"][2] = -1.0
    path.write_text(json.dumps(data))
    with pytest.raises(ReferenceStatsError, match="non-negative finite amplitudes.*deepdream-analysis reference"):
        ReferenceStats.load(path)


def test_the_spectrum_on_a_crop_follows_the_real_spacing(reference):
    iso = reference.spectrum.on_grid((32, 32), (0.8, 0.8))
    aniso = reference.spectrum.on_grid((32, 32), (3.0, 0.8))
    assert iso[0, 0] == 0 and iso[16, 0] == 0  # the self-conjugate frequencies carry nothing
    # the same voxel index is a higher frequency (cycles/mm) along the 0.8 mm axis than along the 3 mm one
    assert aniso[2, 0] / aniso[0, 2] != pytest.approx(1.0, rel=0.05)
    assert iso[2, 0] == pytest.approx(iso[0, 2])


@pytest.mark.parametrize("dims", [2, 3])
def test_the_gradient_reaches_the_phase_and_the_dream_rises(reference3d_or_2d, dims):
    loop = _loop(reference3d_or_2d[dims], dims=dims)
    states = [(s.probability_at_seed, s.image.clone()) for s in loop]
    phase = loop.method.phase
    assert torch.equal(states[0][1], torch.as_tensor(liver_like((1, 24, 24) if dims == 2 else (8, 16, 16))))
    grad = torch.zeros(states[0][1].shape)
    grad[tuple(n // 2 for n in grad.shape)] = 1.0
    assert float(phase.phase_gradient(grad).abs().max()) > 0
    assert states[-1][0] > states[0][0] + 0.01, [round(p, 3) for p, _ in states]


@pytest.fixture(scope="module")
def reference3d_or_2d(reference):
    rng = np.random.default_rng(1)
    img = rng.normal(110, 15, (16, 32, 32)).astype(np.float32)
    lab = np.zeros(img.shape, np.int16)
    kk, yy, xx = np.mgrid[:16, :32, :32]
    for c in [(4, 8, 8), (10, 20, 22)]:
        ball = ((kk - c[0]) * 3.0) ** 2 + ((yy - c[1]) * 0.8) ** 2 + ((xx - c[2]) * 0.8) ** 2 <= 6.0 ** 2
        img[ball] -= 50
        lab[ball] = 1
    fs = build_feature_set(FeatureConfig(names=("firstorder_Mean",)), 3)
    return {2: reference, 3: compute_reference([(Volume(img, SPACING), Volume(lab, SPACING))], fs)}


def test_the_change_has_the_reference_amplitude_spectrum(reference):
    loop = _loop(reference, iterations=15, step=5.0)
    phase = loop.method.phase
    start = None
    for state in loop:  # the phase object is at the state's iteration while the state is out
        start = state.image.clone() if start is None else start
        change, gain = state.image - start, phase.gain
    assert gain > 0 and float(change.abs().max()) > 1.0
    measured = torch.fft.fftn(change, dim=(1, 2)).abs()[0]
    expected = gain * torch.as_tensor(reference.spectrum.on_grid((24, 24), (0.8, 0.8)), dtype=torch.float32)
    # the image moved by exactly that change (nothing was clamped at 110 +- 15 HU with a -100..250 window)
    torch.testing.assert_close(measured, expected, atol=1e-3 * float(expected.max()), rtol=1e-3)


def test_deterministic_under_a_seed(reference):
    runs = [[s.image.clone() for s in _loop(reference, iterations=6, random_seed=3)] for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    other = [s.image.clone() for s in _loop(reference, iterations=6, random_seed=4)]
    assert not torch.equal(runs[0][-1], other[-1])


def test_it_combines_with_robust_and_adam(reference):
    for method in ("lesion-spectrum+robust", "lesion-spectrum+adam"):
        states = [s.probability_at_seed for s in _loop(reference, iterations=10, method=method)]
        assert states[-1] > states[0], method


def test_without_a_reference_the_error_names_the_fix(reference, tmp_path, capsys):
    with pytest.raises(ConfigError, match="no reference was given.*--reference stats.json"):
        _loop(None)
    model = tiny_model(2)
    volume = Volume(liver_like((1, 24, 24)), SPACING)
    config = AnalysisConfig(dream=DreamConfig(iterations=2, method="lesion-spectrum+robust"),
                            features=FeatureConfig(names=("firstorder_Mean",)))
    with pytest.raises(ConfigError, match="'lesion-spectrum\\+robust' takes its amplitude spectrum from real lesions"):
        run_analysis(volume, (12, 12, 0), model, config)
    old = ReferenceStats(reference.mean, reference.std, reference.n, settings=reference.settings, source="old.json")
    with pytest.raises(ConfigError, match="old.json holds no lesion spectrum.*Recompute it with `deepdream-analysis reference"):
        run_analysis(volume, (12, 12, 0), model, config, old)
    case = write_case(tmp_path / "case")
    code = main(["run", "--image", str(case["image"]), "--model", str(case["model"]), "--seed", "24,20,1",
                 "--out", str(tmp_path / "o"), "--iterations", "2", "--method", "lesion-spectrum"])
    err = capsys.readouterr().err
    assert code == 2 and "--reference stats.json" in err and "Traceback" not in err
    assert not (tmp_path / "o" / "run.json").exists()


def test_a_3d_network_refuses_a_2d_lesion_spectrum(reference):
    with pytest.raises(ConfigError, match="spectrum is 2D but the network dreams in 3D.*--dims 3"):
        _loop(reference, dims=3)


@pytest.mark.parametrize("method, options, text", [
    ("lesion-spectrum", {"colour": 1}, "'colour' is not an option.*strength, max_phase"),
    ("lesion-spectrum", {"strength": 0}, "strength=0 is out of range.*a number > 0"),
    ("lesion-spectrum", {"max_phase": 4.0}, "max_phase=4.0 is out of range.*at most pi"),
    ("lesion-spectrum", {"decay": 1.0}, "'decay' belongs to the 'spectral' method"),
    ("lesion-spectrum+spectral", {}, "'lesion-spectrum' and 'spectral' do not combine"),
    ("accentuate+lesion-spectrum", {}, "'lesion-spectrum' and 'accentuate' do not combine.*--update-radius"),
])
def test_bad_options_are_refused(method, options, text):
    with pytest.raises(ConfigError, match=text):
        DreamConfig(method=method, method_options=options).validate()


def test_a_hand_made_spectrum_block_is_checked():
    with pytest.raises(ReferenceStatsError, match="format 'lesion-amplitude-profile'"):
        LesionSpectrum.from_dict({"amplitude": [1, 2]}, "x.json")
