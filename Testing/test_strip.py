"""strip.png shows small dreams: the change row with its own window, a grey window from the data
when the card's hides the dream, slices oriented as a radiological viewer shows them."""

import numpy as np
import pytest

from DeepDreamAnalysisLib.report import display_orientation, display_window, strip_figure, write_outputs
from DeepDreamAnalysisLib.result import AnalysisResult, Crop, Snapshot, Step
from DeepDreamAnalysisLib.volume import Volume

CT_CARD = {"model": {"card": {"preprocessing": {"type": "window", "min": -100.0, "max": 250.0}}}}


def _dream_result(dream_hu=20.0, base=110.0, direction=None, card=CT_CARD, seed_ji=(20, 30)):
    rng = np.random.default_rng(0)
    start = (base + rng.normal(0, 5, (1, 48, 48))).astype(np.float32)
    jj, ii = np.mgrid[:48, :48]
    blob = np.exp(-((jj - seed_ji[0]) ** 2 + (ii - seed_ji[1]) ** 2) / (2 * 3.0 ** 2))
    snaps, steps = [], []
    for n, it in enumerate((0, 10, 20, 29)):
        image = start + (n / 3) * dream_hu * blob[None].astype(np.float32)
        prob = np.where(blob > 0.5, n / 3, 0.0)[None].astype(np.float32)
        snaps.append(Snapshot(it, image, prob, prob > 0.5))
        steps.append(Step(it, 0.0, n / 3, int((prob > 0.5).sum())))
    meta = {**card, "input": {"seed_ijk": [seed_ji[1] + 5, seed_ji[0] + 4, 2],
                              "direction": list(np.asarray(direction if direction is not None else np.eye(3)).ravel())}}
    return AnalysisResult(steps, snaps, Crop((2, 4, 5), (1, 48, 48)), (), None, meta)


def _rows(fig, n=4):
    axes = [ax for ax in fig.axes if ax.images]
    return axes[:n * 3:3], axes[1:n * 3:3], axes[2:n * 3:3]


def test_a_20_hu_dream_is_visible_in_the_image_row_and_the_change_row():
    result = _dream_result(20.0)
    fig = strip_figure(result, result.snapshots, (0, 20, 30))
    top, middle, _ = _rows(fig)
    last = top[-1].images[0]
    shown = np.asarray(last.get_array())
    norm = last.norm
    background = float(np.median(np.ma.getdata(norm(shown[:10, :10]))))
    at_seed = float(norm(shown[20, 30]))
    # the card's 350 HU window would make this a 6% grey step; the data window makes it a large one
    assert at_seed - background > 0.3
    change = middle[-1].images[0]
    assert float(change.norm(np.asarray(change.get_array())[20, 30])) > 0.95  # full red at the seed
    assert abs(float(change.norm(np.asarray(change.get_array())[0, 0])) - 0.5) < 0.05  # no change: the middle
    assert "from the data" in fig._suptitle.get_text()


def test_a_large_dream_keeps_the_cards_window():
    result = _dream_result(200.0)
    first, last = result.snapshots[0].image[0], result.snapshots[-1].image[0]
    assert display_window(result, first, last) == (-100.0, 250.0)


def test_an_mr_image_outside_the_cards_window_gets_a_window_from_the_data():
    result = _dream_result(30.0, base=600.0)  # MR-like values, a CT window on the card
    first, last = result.snapshots[0].image[0], result.snapshots[-1].image[0]
    lo, hi = display_window(result, first, last)
    assert 570 < lo < 600 < hi < 650


def test_slices_are_shown_as_a_radiological_viewer_shows_them():
    assert display_orientation(np.eye(3)) == (False, False, False)
    ras = np.diag([-1.0, -1.0, 1.0])  # stored right-to-left and front-to-back
    assert display_orientation(ras) == (False, True, True)
    result = _dream_result(20.0, direction=ras)
    fig = strip_figure(result, result.snapshots, (0, 20, 30))
    top, _, _ = _rows(fig)
    shown = np.asarray(top[0].images[0].get_array())
    np.testing.assert_array_equal(shown, result.snapshots[0].image[0][::-1, ::-1])
    cross = top[0].lines[0]
    assert (cross.get_xdata()[0], cross.get_ydata()[0]) == (47 - 30, 47 - 20)


def test_strip_png_is_written_with_three_rows(tmp_path):
    from matplotlib.image import imread

    result = _dream_result(20.0)
    volume = Volume(np.zeros((5, 60, 60), np.float32))
    paths = write_outputs(result, tmp_path / "out", volume)
    strip = imread(paths["strip"])
    assert strip.shape[0] > 600  # three rows of images
    red = (strip[..., 0] > 0.6) & (strip[..., 1] < 0.2) & (strip[..., 2] < 0.25)
    assert red.sum() > 20  # the dream in the change row (and the seed's cross)
