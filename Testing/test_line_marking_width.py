"""synthetic.LineMarking(width=...): the anti-aliased 135-degree marking tried in the reproduction (section 3.1)."""

import numpy as np
import pytest

from DeepDreamAnalysisLib.features.custom import line135_selectivity
from DeepDreamAnalysisLib.synthetic import LineMarking


def _one_segment(width, seed=3):
    lesion = np.zeros((40, 40), bool)
    lesion[8:32, 8:32] = True
    m = LineMarking(width=width, min_segments=1, density=0.0, length=(9, 9), intensity_hu=(60.0, 60.0))
    return m.apply(np.zeros((40, 40), np.float32), lesion, np.random.default_rng(seed)), lesion


def test_default_marking_is_a_one_voxel_diagonal():
    img, _ = _one_segment(None)
    jj, ii = np.nonzero(img)
    assert np.all(img[jj, ii] == pytest.approx(60.0))
    assert np.all(np.diff(jj) == 1) and np.all(jj - ii == jj[0] - ii[0])  # array[j0 + t, i0 + t]
    assert len(jj) == 7  # 9 steps of one voxel along the diagonal round to 7 distinct voxels


def test_antialiased_marking_is_a_band_along_the_same_diagonal():
    thin, _ = _one_segment(None)
    wide, lesion = _one_segment(2.0)
    jj, ii = np.nonzero(thin)
    assert np.all(wide[jj, ii] == pytest.approx(60.0))  # same random position, length and intensity
    j, i = jj[len(jj) // 2], ii[len(ii) // 2]
    # side neighbours lie 1/sqrt(2) voxel from the segment: 60 * (1 + 1/2 - 0.707)
    assert wide[j, i + 1] == pytest.approx(60.0 * (1.5 - 2 ** -0.5), abs=1e-4)
    assert wide[j - 1, i] == pytest.approx(wide[j, i + 1], abs=1e-4)
    # across the line (the 45-degree direction) it fades within 1.5 voxels
    assert wide[j - 1, i + 1] == pytest.approx(60.0 * (1.5 - 2 ** 0.5), abs=1e-4)
    assert wide[j - 2, i + 2] == 0.0 and wide[j, i + 3] == 0.0
    assert line135_selectivity(wide[None].astype(float), lesion[None]) > 0.5


def test_width_keeps_the_random_draws():
    """The width changes the drawing only: the generator's state after a marking is the same."""
    lesion = np.zeros((40, 40), bool)
    lesion[5:35, 5:35] = True
    rngs = [np.random.default_rng(7), np.random.default_rng(7)]
    LineMarking().apply(np.zeros((40, 40)), lesion, rngs[0])
    LineMarking(width=2.0).apply(np.zeros((40, 40)), lesion, rngs[1])
    assert rngs[0].random() == rngs[1].random()
