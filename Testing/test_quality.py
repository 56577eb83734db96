"""Quality flags (engine/quality.py): each raised by a case made to raise it, on real tiny networks
or constructed mask sequences, and shown in run.json, report.html and the command's summary."""

import json

import numpy as np
import pytest
import torch

from DeepDreamAnalysisLib.analysis import run_analysis
from DeepDreamAnalysisLib.cli import main
from DeepDreamAnalysisLib.config import AnalysisConfig, DreamConfig, FeatureConfig
from DeepDreamAnalysisLib.engine.quality import (CODES, QualityFlag, QualityMonitor, checkerboard_index,
                                                 crop_flag)
from DeepDreamAnalysisLib.report import write_outputs
from DeepDreamAnalysisLib.volume import Volume

from tiny_models import TinyModel, blur_model as _model, liver_like, tiny_card, write_case


def _config(iterations=30, step=20.0, **dream):
    dream.setdefault("method", "paper")  # the cases below are made with the paper's update
    return AnalysisConfig(dream=DreamConfig(iterations=iterations, step=step, normalize_gradient=True, **dream),
                          features=FeatureConfig(names=("firstorder_Mean",)), snapshot_every=10)


@pytest.fixture
def volume():
    return Volume(liver_like((3, 40, 48), std=5.0), spacing=(0.8, 0.8, 2.5))


SEED = (24, 20, 1)
# preprocessing (window -100..250 HU): y = (x + 100) / 350, about 0.6 for liver at 110 HU
DREAMS = dict(weights=[0.0, 20.0], biases=[0.0, -16.0])  # p(seed) about 0.02 at the start


def codes(result):
    return [f.code for f in result.quality_flags]


def test_a_compact_dream_at_the_seed_is_trustworthy(volume):
    result = run_analysis(volume, SEED, _model(**DREAMS), _config())
    assert result.first_iteration_above(0.5) is not None
    assert 0 < result.steps[-1].mask_voxels < 100
    assert result.quality_flags == [] and result.trustworthy
    assert result.metadata["quality_flags"] == []


def test_no_dream_when_the_probability_never_passes_the_threshold(volume):
    result = run_analysis(volume, SEED, _model(**DREAMS), _config(iterations=3, step=0.01))
    assert codes(result) == ["no_dream"]
    flag = result.quality_flags[0]
    assert flag.value < 0.5 and "never rose above the threshold 0.5" in flag.message and "--step" in flag.message
    assert not result.trustworthy


def test_wrong_class_when_another_class_rises_faster_and_log_odds_fixes_it(volume):
    # class 1 is the target; class 2 rises three times as fast with the image: the logit objective
    # dreams class 2, log-odds does not
    net = dict(weights=[0.0, 1.0, 3.0], biases=[0.0, -2.0, -6.0])
    result = run_analysis(volume, SEED, _model(**net), _config(iterations=40, step=30.0, objective="logit"))
    assert "wrong_class" in codes(result)
    flag = next(f for f in result.quality_flags if f.code == "wrong_class")
    assert "class 2 wins" in flag.message and "--objective log_odds" in flag.message and flag.value > 0.5
    fixed = run_analysis(volume, SEED, _model(**net), _config(iterations=40, step=30.0, objective="log_odds"))
    assert "wrong_class" not in codes(fixed)
    auto = run_analysis(volume, SEED, _model(**net), _config(iterations=40, step=30.0))  # auto: 3 classes -> log-odds
    assert [s.probability for s in auto.steps] == [s.probability for s in fixed.steps]


def test_change_outside_the_update_region_is_flagged(volume):
    # the start image holds values below the card's intensity_range: the clamp moves them, far from the seed
    array = volume.array.copy()
    array[1, 10:13, 14:17] = -2000.0  # in the crop (j 8..31, i 12..35), far from the seed
    vol = Volume(array, spacing=volume.spacing)
    result = run_analysis(vol, SEED, _model(**DREAMS), _config(iterations=5, update_radius=3.0))
    flag = next(f for f in result.quality_flags if f.code == "change_outside_region")
    assert flag.value == pytest.approx(2000.0 - 1024.0)
    assert "intensity_range" in flag.message
    inside = run_analysis(volume, SEED, _model(**DREAMS), _config(iterations=5, update_radius=3.0))
    assert "change_outside_region" not in codes(inside)


def test_checkerboard_index_separates_texture_from_an_object():
    jj, ii = np.mgrid[:48, :48]
    blob = np.exp(-((jj - 24) ** 2 + (ii - 24) ** 2) / (2 * 4.0 ** 2))
    board = np.where((jj + ii) % 2 == 0, 1.0, -1.0)
    noise = np.random.default_rng(0).normal(size=(48, 48))
    assert checkerboard_index(blob) < 0.05
    assert checkerboard_index(board) > 0.99
    assert 0.7 < checkerboard_index(noise) < 0.9
    assert np.isnan(checkerboard_index(np.zeros((4, 4))))


def test_a_voxelwise_dream_is_flagged_as_checkerboard(volume):
    # no blur: every voxel answers for itself, and a dream over the whole crop is per-voxel texture
    net = TinyModel(torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3, padding=1)).eval(), tiny_card(2, roi=(24, 24)))
    torch.manual_seed(0)
    net.network[0].weight.data.normal_()
    result = run_analysis(volume, SEED, net, _config(iterations=5))
    flag = next(f for f in result.quality_flags if f.code == "checkerboard")
    assert flag.value > 0.5 and "--method" in flag.message


def test_intensity_range_limits_are_flagged(volume):
    model = _model(**DREAMS)
    model.card.intensity_range = (-100.0, 125.0)  # the dream has to push past 125 HU
    result = run_analysis(volume, SEED, model, _config(iterations=20, step=40.0))
    flag = next(f for f in result.quality_flags if f.code == "out_of_intensity_range")
    assert flag.value >= 1 and "[-100, 125]" in flag.message


def test_mask_sequences_raise_border_explosion_and_half_crop_flags():
    shape = (32, 64, 64)
    mon = QualityMonitor(shape, 3)
    small = np.zeros(shape, bool)
    small[14:18, 30:34, 30:34] = True  # 64 voxels, inside
    mon.observe(0, small, 0.9)
    assert mon.sorted() == []
    merged = np.zeros(shape, bool)
    merged[4:28, 0:40, 8:30] = True  # 21,120 voxels reaching j = 0
    mon.observe(1, merged, 0.95)
    got = {f.code: f for f in mon.finish()}
    assert set(got) == {"mask_touches_border", "mask_exploded"}
    assert got["mask_exploded"].iteration == 1 and got["mask_exploded"].value == pytest.approx(21120 / 64)
    assert "64 to 21,120 voxels" in got["mask_exploded"].message
    assert got["mask_touches_border"].iteration == 1
    huge = np.zeros(shape, bool)
    huge[:, 2:62, 2:62] = True
    mon.observe(2, huge, 0.99)
    assert "mask_covers_half_crop" in {f.code for f in mon.finish()}


def test_growth_from_a_tiny_mask_is_not_an_explosion():
    shape = (1, 40, 40)
    mon = QualityMonitor(shape, 2)
    for it, r in enumerate((0, 1, 6, 12)):  # 0 -> 1 -> 121 -> 529 voxels
        m = np.zeros(shape, bool)
        if r:
            m[0, 20 - r:20 + r + (r == 1) - (r == 1), 20 - r:20 + r] = True
        mon.observe(it, m, 0.9)
    assert mon.sorted() == []


def test_a_2d_crop_is_not_touching_its_single_slice_border():
    mon = QualityMonitor((1, 20, 20), 2)
    m = np.zeros((1, 20, 20), bool)
    m[0, 8:12, 8:12] = True
    mon.observe(0, m, 0.9)
    assert mon.sorted() == []


def test_crop_changed_names_both_sizes(volume):
    flag = crop_flag((32, 96, 96), (24, 96, 96), (24, 300, 300))
    assert flag.code == "crop_changed" and "32 x 96 x 96 to 24 x 96 x 96" in flag.message
    assert "only 24 voxels along k" in flag.message
    divisible = crop_flag((32, 96, 96), (16, 96, 96), (20, 300, 300), size_divisible=16)
    assert "multiples of 16 along k" in divisible.message
    assert crop_flag((1, 24, 24), (1, 24, 24), (3, 40, 48)) is None
    result = run_analysis(volume, SEED, _model(**DREAMS), _config(iterations=3, roi_size=(64, 64)))
    assert codes(result)[0] == "crop_changed"
    assert "1 x 64 x 64 to 1 x 40 x 48" in result.quality_flags[0].message


def test_crop_reordered_is_flagged_with_the_sizes():
    # a roi written in (i, j, k) order: [96, 96, 32] does not fit a 40-slice image, [32, 96, 96] does
    flag = crop_flag((96, 96, 32), (40, 96, 32), (40, 200, 200), spatial_dims=3)
    assert flag.code == "crop_changed" and "96 x 96 x 32 to 40 x 96 x 32" in flag.message
    assert "roi_size looks reordered" in flag.message and "as 32 x 96 x 96 do" in flag.message
    # the image's spacing matches the card's only with j and k swapped: the volume was stored transposed
    swapped = crop_flag((32, 32, 32), (32, 32, 32), (40, 60, 60), spacing_ijk=(0.8, 2.5, 0.8),
                        card_spacing_ijk=(0.8, 0.8, 2.5), spatial_dims=3)
    assert "axes look reordered" in swapped.message and "(0.8, 2.5, 0.8)" in swapped.message
    assert "32 x 32 x 32" in swapped.message and swapped.value == 0.0
    assert crop_flag((32, 32, 32), (32, 32, 32), (40, 60, 60), spacing_ijk=(0.8, 0.8, 2.5),
                     card_spacing_ijk=(0.8, 0.8, 2.5), spatial_dims=3) is None


def test_a_2d_network_on_sagittal_slices_is_flagged_reordered():
    # a volume stored sagittally: its k axis runs left-right (LPS x), its i axis head-feet
    sagittal = np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    volume = Volume(liver_like((3, 40, 48), std=5.0), spacing=(0.8, 0.8, 2.5), direction=sagittal)
    result = run_analysis(volume, SEED, _model(**DREAMS), _config(iterations=2))
    flag = next(f for f in result.quality_flags if f.code == "crop_changed")
    assert "reordered against the anatomy" in flag.message and "k runs LR" in flag.message
    assert "1 x 24 x 24 [k, j, i] of an image of 3 x 40 x 48" in flag.message
    axial = run_analysis(Volume(volume.array, spacing=(0.8, 0.8, 2.5)), SEED, _model(**DREAMS), _config(iterations=2))
    assert "crop_changed" not in codes(axial)


def test_flags_reach_run_json_report_and_the_command_summary(tmp_path, capsys):
    case = write_case(tmp_path / "case")
    out = tmp_path / "out"
    rc = main(["run", "--image", str(case["image"]), "--model", str(case["model"]), "--seed", "24,20,1",
               "--out", str(out), "--iterations", "3", "--features", "firstorder_Mean", "--roi", "64,64"])
    assert rc == 0
    err = capsys.readouterr().err
    assert "quality:" in err and "[crop_changed] The crop was shrunk from the requested 1 x 64 x 64" in err
    run = json.loads((out / "run.json").read_text())
    assert run["trustworthy"] is False
    first = run["quality_flags"][0]
    assert set(first) == {"code", "message", "iteration", "value"} and first["code"] == "crop_changed"
    html = (out / "report.html").read_text()
    assert 'id="quality"' in html and "crop_changed" in html


def test_a_clean_run_says_so_in_the_report(volume, tmp_path):
    result = run_analysis(volume, SEED, _model(**DREAMS), _config())
    paths = write_outputs(result, tmp_path / "out", volume)
    assert "No quality flag" in open(paths["html"]).read()
    assert json.loads(open(paths["json"]).read())["quality_flags"] == []


def test_flag_round_trips_and_every_code_is_documented():
    flag = QualityFlag("no_dream", "m", 3, float("nan"))
    assert flag.to_dict() == {"code": "no_dream", "message": "m", "iteration": 3, "value": None}
    assert QualityFlag.from_dict({"code": "no_dream", "message": "m", "iteration": 3, "value": 0.2}).value == 0.2
    with pytest.raises(Exception):
        flag.code = "x"  # frozen
    from pathlib import Path
    doc = (Path(__file__).resolve().parents[1] / "docs" / "quality-flags.md").read_text()
    for code in CODES:
        assert f"`{code}`" in doc


def test_compare_leaves_flagged_runs_out_of_the_ranking_with_a_visible_note(volume, tmp_path):
    from DeepDreamAnalysisLib.studies import compare_models, write_comparison

    from tiny_models import tiny_model

    models = {"clean": _model(**DREAMS), "flagged": tiny_model(2)}  # tiny_model's mask fills the crop
    comp = compare_models(volume, SEED, models, _config(iterations=12), restarts=1)
    assert comp.flagged_runs() == {"flagged": {0: ["mask_touches_border", "mask_covers_half_crop", "checkerboard"]}}
    assert {r.model for r in comp.ranking()} == {"clean"}
    note = comp.ranking_note()
    assert len(note) == 1 and note[0].startswith("flagged: every run has a quality flag")
    assert {r.model for r in comp.ranking(keep_flagged=True)} == {"clean", "flagged"}
    paths = write_comparison(comp, tmp_path / "cmp")
    md = paths["ranking_md"].read_text()
    assert md.startswith("> flagged: every run has a quality flag") and "--keep-flagged" in md
    meta = json.loads(paths["json"].read_text())
    assert meta["runs"]["flagged"][0]["quality_flags"][0] == "mask_touches_border"
    kept = compare_models(volume, SEED, models, _config(iterations=12), restarts=1, keep_flagged=True)
    assert {r.model for r in kept.ranking()} == {"clean", "flagged"}
    assert "are ranked (--keep-flagged)" in kept.ranking_note()[0]


def test_status_line_names_the_codes():
    from DeepDreamAnalysisLib.engine.quality import status_line

    assert status_line([]) == "Quality: no flag, the dream passed every check."
    line = status_line([QualityFlag("no_dream", "m"), QualityFlag("checkerboard", "m")])
    assert "2 flag(s)" in line and "no_dream, checkerboard" in line


def test_a_dream_merging_with_false_positives_is_flagged_as_exploded():
    # a bright band 8 rows below the seed is segmented already (false positives); the mask is the
    # component at the seed, so it is small until the growing dream touches the band, then jumps
    array = liver_like((3, 60, 60), std=5.0)
    array[:, 38:, :] = 300.0
    volume = Volume(array, spacing=(0.8, 0.8, 2.5))
    config = _config(iterations=25, step=40.0, roi_size=(60, 60))
    result = run_analysis(volume, (30, 30, 1), _model(**DREAMS, roi=(60, 60)), config)
    sizes = [s.mask_voxels for s in result.steps]
    flag = next(f for f in result.quality_flags if f.code == "mask_exploded")
    before, after = sizes[flag.iteration - 1], sizes[flag.iteration]
    assert 20 <= before < 200 and after > 10 * before and flag.value == pytest.approx(after / before)
    assert "false positives" in flag.message and "--update-radius" in flag.message
    healthy = Volume(liver_like((3, 60, 60), std=5.0), spacing=(0.8, 0.8, 2.5))
    clean = run_analysis(healthy, (30, 30, 1), _model(**DREAMS, roi=(60, 60)), config)
    assert "mask_exploded" not in codes(clean)
