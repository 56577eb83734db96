"""Native torch features against pyradiomics (called here on the same arrays) and IBSI reference values.

Data: IBSI-1 digital phantom (CC BY 4.0) and the IBSI-1 CT phantom cropped to its mask
(CC BY-NC 3.0), copies with their licences in Testing/Data/ibsi/; LiTS volume 117 from `make data`
(data/lits117, CC BY-NC-SA 4.0), spacing assumed 1.6 x 1.6 x 3.0 mm (not recorded in the file).
Tolerance: 1e-4 relative (plus 1e-9 absolute for values that are zero).
"""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from DeepDreamAnalysisLib.features import native_shape_tables
from DeepDreamAnalysisLib.features.native import (NATIVE_FEATURES, NATIVE_FEATURES_2D, NATIVE_FEATURES_3D,
                                                  compute_native)

radiomics = pytest.importorskip("radiomics")
from radiomics import firstorder, glcm, gldm, glrlm, glszm, shape, shape2D  # noqa: E402

logging.getLogger("radiomics").setLevel(logging.ERROR)
DATA = Path(__file__).parent / "Data" / "ibsi"
LITS = Path(__file__).resolve().parents[1] / "data" / "lits117"
RTOL, ATOL = 1e-4, 1e-9
# Features whose native value is allowed to differ from pyradiomics, with the reason (docs/native-features.md).
DOCUMENTED_DIFFERENCES: dict[str, str] = {}


def pyradiomics_features(img, msk, spacing, bin_width, force2d=False) -> dict[str, float]:
    """pyradiomics' values on the bounding-box crop (as its feature extractor computes shape)."""
    nz = np.nonzero(msk)
    bb = tuple(slice(a.min(), a.max() + 1) for a in nz)
    im = sitk.GetImageFromArray(np.ascontiguousarray(img[bb]))
    im.SetSpacing(tuple(float(s) for s in spacing))
    mk = sitk.GetImageFromArray(np.ascontiguousarray(msk[bb]).astype(np.uint8))
    mk.SetSpacing(tuple(float(s) for s in spacing))
    settings = dict(binWidth=bin_width, force2D=force2d, force2Ddimension=0)
    classes = [("firstorder", firstorder.RadiomicsFirstOrder), ("glcm", glcm.RadiomicsGLCM),
               ("gldm", gldm.RadiomicsGLDM), ("glrlm", glrlm.RadiomicsGLRLM), ("glszm", glszm.RadiomicsGLSZM),
               ("shape2D", shape2D.RadiomicsShape2D) if force2d else ("shape", shape.RadiomicsShape)]
    out = {}
    for prefix, cls in classes:
        f = cls(im, mk, **settings)
        f.enableAllFeatures()
        f.execute()
        out.update({f"{prefix}_{k}": float(v) for k, v in f.featureValues.items()})
    return out


def assert_agree(img, msk, spacing, bin_width, force2d=False, as_tensor=False):
    ref = pyradiomics_features(img, msk, spacing, bin_width, force2d)
    names = sorted((NATIVE_FEATURES_2D if force2d else NATIVE_FEATURES_3D) & set(ref))
    assert len(names) >= 60
    args = (torch.from_numpy(img), torch.from_numpy(msk)) if as_tensor else (img, msk)
    nat = compute_native(*args, spacing, names, bin_width=bin_width, force2d=force2d)
    bad = {n: (nat[n], ref[n]) for n in names
           if n not in DOCUMENTED_DIFFERENCES and not np.isclose(nat[n], ref[n], rtol=RTOL, atol=ATOL, equal_nan=True)}
    assert not bad, f"native != pyradiomics (native, pyradiomics): {bad}"
    return nat, ref


def blob(rng, shape, force2d):
    z, y, x = np.indices(shape)
    c = np.array(shape) / 2 + rng.uniform(-1, 1, 3)
    r = rng.uniform(3, min(shape[1:]) / 2.5)
    dz = 0 if force2d else (z - c[0]) ** 2 * rng.uniform(0.5, 2)
    m = dz + (y - c[1]) ** 2 * rng.uniform(0.5, 2) + (x - c[2]) ** 2 < r ** 2
    return m & (rng.random(shape) > 0.15)


@pytest.mark.parametrize("seed", range(4))
def test_random_blobs_3d_match_pyradiomics(seed):
    rng = np.random.default_rng(seed)
    shape_ = (12, 18, 17)
    msk = blob(rng, shape_, False)
    img = rng.normal(40, 60, shape_).astype(np.float32)
    assert_agree(img, msk, tuple(rng.uniform(0.5, 3, 3)), 25.0, as_tensor=seed % 2 == 1)


@pytest.mark.parametrize("seed", range(3))
def test_random_blobs_2d_match_pyradiomics(seed):
    rng = np.random.default_rng(100 + seed)
    shape_ = (1, 30, 26)
    msk = blob(rng, shape_, True)
    img = rng.normal(0, 40, shape_).astype(np.float32)
    assert_agree(img, msk, tuple(rng.uniform(0.5, 3, 3)), 10.0, force2d=True)


def read(path):
    im = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(im), im.GetSpacing()


def ibsi_reference():
    mapping = {}
    with open(DATA / "reference_values" / "pyradiomics_mapping_phantom.csv") as f:
        for row in csv.DictReader(f):
            if row["pyradiomics_feature"].startswith("3D_original_"):
                mapping[row["tag"]] = row["pyradiomics_feature"][len("3D_original_"):]
    ref = {}
    with open(DATA / "reference_values" / "ibsi_1_dig_phantom.csv") as f:
        for row in csv.DictReader(f, delimiter=";"):
            if row["tag"] in mapping and row["reference value"]:
                ref[mapping[row["tag"]]] = (float(row["reference value"]), float(row["tolerance"]))
    return ref


def within_ibsi(value, reference, tolerance):
    # IBSI gives 3 significant figures: allow the rounding as well as the stated tolerance
    rounding = 0.5 * 10 ** (math.floor(math.log10(abs(reference))) - 2) if reference else 0.0
    return abs(value - reference) <= tolerance + rounding + 1e-12


def test_ibsi_digital_phantom_matches_pyradiomics_and_ibsi():
    img, spacing = read(DATA / "ibsi_1_digital_phantom" / "nifti" / "image" / "phantom.nii.gz")
    msk, _ = read(DATA / "ibsi_1_digital_phantom" / "nifti" / "mask" / "mask.nii.gz")
    img = img.astype(np.float32)
    nat, pyr = assert_agree(img, msk == 1, spacing, 1.0)  # binWidth 1: reference_values/pyradiomics_Phantom.yml
    checked = []
    for name, (value, tol) in ibsi_reference().items():
        if name not in nat:
            continue
        if within_ibsi(pyr[name], value, tol):
            assert within_ibsi(nat[name], value, tol), f"{name}: native {nat[name]} vs IBSI {value} +- {tol}"
            checked.append(name)
    assert {"shape_MeshVolume", "shape_Sphericity", "firstorder_Entropy", "glcm_Contrast"} <= set(checked)
    assert len(checked) >= 40, checked


def test_ibsi_ct_phantom_matches_pyradiomics():
    d = DATA / "ibsi_1_ct_radiomics_phantom" / "nifti"
    img, spacing = read(d / "phantom_cropped.nii.gz")
    msk, _ = read(d / "mask_cropped.nii.gz")
    assert_agree(img.astype(np.float32), msk == 1, spacing, 25.0)


def lits_lesions(n):
    import mrcfile

    if not (LITS / "img_117.mrc").exists():
        pytest.fail(f"LiTS volume 117 missing in {LITS}: run `make data` (CI runs it via `make test`).")
    img = np.asarray(mrcfile.open(LITS / "img_117.mrc", permissive=True).data, dtype=np.float32)
    lab = np.asarray(mrcfile.open(LITS / "lab_117.mrc", permissive=True).data)
    comps = sitk.GetArrayFromImage(sitk.ConnectedComponent(sitk.GetImageFromArray((lab == 2).astype(np.uint8)), True))
    sizes = np.bincount(comps.ravel())[1:]
    order = np.argsort(sizes)[::-1]
    out = []
    for c in order[:n]:
        m = comps == c + 1
        bb = tuple(slice(max(a.min() - 2, 0), a.max() + 3) for a in np.nonzero(m))
        out.append((img[bb], m[bb]))
    return out


SPACING_LITS = (1.6, 1.6, 3.0)  # (i, j, k) mm, assumed: the file does not record it


def test_lits_lesions_match_pyradiomics():
    for img, m in lits_lesions(2):
        assert_agree(img, m, SPACING_LITS, 25.0)


def test_lits_lesion_axial_slice_force2d_matches_pyradiomics():
    img, m = lits_lesions(1)[0]
    k = int(np.argmax(m.sum((1, 2))))
    assert_agree(img[k:k + 1], m[k:k + 1], SPACING_LITS, 25.0, force2d=True)


def test_empty_and_single_voxel_masks_give_nan():
    img = np.zeros((4, 4, 4), np.float32)
    names = ["firstorder_Entropy", "shape_Sphericity", "glcm_Contrast"]
    single = np.zeros((4, 4, 4), bool)
    single[1, 2, 2] = True
    for msk in (np.zeros((4, 4, 4), bool), single):
        out = compute_native(img, msk, (1, 1, 1), names)
        assert set(out) == set(names) and all(math.isnan(v) for v in out.values())


def test_unknown_feature_names_are_refused_with_the_fix():
    img = np.zeros((3, 3, 3), np.float32)
    with pytest.raises(ValueError, match="ngtdm_Busyness.*pyradiomics backend"):
        compute_native(img, img > -1, (1, 1, 1), ["ngtdm_Busyness"])
    with pytest.raises(ValueError, match="shape2D_Elongation"):
        compute_native(img, img > -1, (1, 1, 1), ["shape2D_Elongation"])  # 2D shape needs force2d
    assert "shape_Sphericity" in NATIVE_FEATURES and "shape2D_Sphericity" in NATIVE_FEATURES


def test_glrlm_is_native_in_2d_and_3d_and_counts_runs_by_hand():
    """A row of 3 pixels of one grey level: along the row 1 run of length 3, along the 3 other
    in-plane directions 3 runs of length 1; features are the mean over the 4 directions. Every
    implementation (numpy, torch, CPU tensors) gives these values: GLRLM has no torch version."""
    from DeepDreamAnalysisLib.features.native_small import GLRLM_NAMES

    assert len(GLRLM_NAMES) == 16 and GLRLM_NAMES <= NATIVE_FEATURES_2D and GLRLM_NAMES <= NATIVE_FEATURES_3D
    img = np.full((1, 3, 5), 10.0, np.float32)
    msk = np.zeros(img.shape, bool)
    msk[0, 1, 1:4] = True
    names = ["glrlm_RunPercentage", "glrlm_ShortRunEmphasis", "glrlm_LongRunEmphasis", "glrlm_RunEntropy"]
    expected = {"glrlm_RunPercentage": (1 / 3 + 3) / 4, "glrlm_ShortRunEmphasis": (1 / 9 + 3) / 4,
                "glrlm_LongRunEmphasis": (9 + 3) / 4, "glrlm_RunEntropy": 0.0}
    for impl in ("auto", "numpy", "torch"):
        got = compute_native(torch.from_numpy(img), torch.from_numpy(msk), (1, 1, 1), names, force2d=True, impl=impl)
        assert got == pytest.approx(expected, abs=1e-12)


def test_glszm_zones_are_8_connected_in_2d_and_26_connected_in_3d():
    """Zones by hand: two diagonal pixels of one level are one zone in 2D (8-connected), a far pixel
    of that level another; in 3D, voxels touching only at a corner are one zone (26-connected)."""
    from DeepDreamAnalysisLib.features.native_small import GLSZM_NAMES

    assert len(GLSZM_NAMES) == 16 and GLSZM_NAMES <= NATIVE_FEATURES_2D and GLSZM_NAMES <= NATIVE_FEATURES_3D
    names = ["glszm_ZonePercentage", "glszm_LargeAreaEmphasis", "glszm_SizeZoneNonUniformity"]
    img = np.full((1, 6, 6), 10.0, np.float32)
    msk = np.zeros(img.shape, bool)
    msk[0, 1, 1] = msk[0, 2, 2] = msk[0, 5, 5] = True
    for impl in ("numpy", "torch"):
        got = compute_native(img, msk, (1, 1, 1), names, force2d=True, impl=impl)
        assert got == pytest.approx({"glszm_ZonePercentage": 2 / 3, "glszm_LargeAreaEmphasis": (4 + 1) / 2,
                                     "glszm_SizeZoneNonUniformity": (1 + 1) / 2}, abs=1e-12)
    img3 = np.full((3, 3, 3), 10.0, np.float32)
    msk3 = np.zeros(img3.shape, bool)
    msk3[0, 0, 0] = msk3[1, 1, 1] = msk3[2, 2, 2] = True
    assert compute_native(img3, msk3, (1, 1, 1), names)["glszm_ZonePercentage"] == pytest.approx(1 / 3)


def test_glszm_long_winding_zones_match_pyradiomics():
    """A one-pixel-wide serpentine zone (its two ends are hundreds of steps apart: the zone search
    must follow the whole path) and a 3D helix-like staircase, on two grey levels."""
    n = 41
    m = np.zeros((1, n, n), bool)
    m[0, ::2, :] = True
    for r in range(1, n, 2):
        m[0, r, n - 1 if (r // 2) % 2 == 0 else 0] = True
    img = np.where(m, 30.0, 0.0).astype(np.float32)
    img[0, 20, 5:9] = 80.0  # a zone of another level cuts the serpentine in two
    assert_agree(img, m, (0.8, 0.8, 2.0), 25.0, force2d=True)
    m3 = np.zeros((12, 8, 8), bool)
    for k in range(12):
        j, i = [(1, 1), (1, 6), (6, 6), (6, 1)][k % 4]
        m3[k, j - 1:j + 1, i - 1:i + 1] = True
        m3[k, 1:7, 1] = k % 2 == 0
    img3 = np.where(m3, 30.0, 0.0).astype(np.float32) + np.indices(m3.shape)[0].astype(np.float32) * 4
    assert_agree(img3, m3, (1.0, 1.0, 2.5), 25.0)


def test_marching_cubes_tables_rederive_from_pyradiomics():
    classes, area, v0, n = native_shape_tables.derive_tables()
    c, a, v, nn = native_shape_tables.tables()
    assert np.array_equal(np.array(classes) / 16.0, c)
    assert np.array_equal(area, a) and np.array_equal(v0 / 8.0, v) and np.array_equal(n / 8.0, nn)


@pytest.mark.parametrize("kind", ["sphere", "needle", "disk", "cloud"])
def test_maximum_distance_search_equals_all_pairs(kind):
    """The pruned search of the largest distance (used above a few hundred mesh vertices) returns
    exactly the all-pairs maximum, on digital spheres, thin needles, flat disks and random clouds."""
    from DeepDreamAnalysisLib.features import native_shape

    rng = np.random.default_rng(len(kind))
    if kind == "cloud":
        pts = rng.normal(0, 1, (3000, 3)) * (30, 10, 3)
    else:
        n = 61
        z, y, x = (np.indices((n, n, n)) - n // 2).astype(float)
        scale = {"sphere": (1, 1, 1), "needle": (1, 6, 6), "disk": (7, 1, 1)}[kind]
        m = (z * scale[0]) ** 2 + (y * scale[1]) ** 2 + (x * scale[2]) ** 2 <= 29.5 ** 2
        pts = native_shape._vertices(torch.from_numpy(m), (0, 1, 2)).numpy() * (3.0, 0.8, 0.7)
    assert len(pts) > 300  # above the all-pairs threshold: the pruned search runs
    t = torch.from_numpy(pts)
    expected = float(torch.cdist(t, t, compute_mode="donot_use_mm_for_euclid_dist").max())
    got = math.sqrt(float(native_shape._max_dist_sq(t)))
    assert got == pytest.approx(expected, rel=1e-12)


def test_in_plane_maximum_distance_search_equals_all_pairs():
    """The per-plane search (shape_Maximum2DDiameterSlice/Column/Row) equals all pairs plane by plane."""
    from DeepDreamAnalysisLib.features import native_shape

    n = 41
    z, y, x = (np.indices((n, n, n)) - n // 2).astype(float)
    m = (z * 1.3) ** 2 + (y * 0.7) ** 2 + x ** 2 + 3 * np.sin(y) * x <= 19.5 ** 2
    sp = np.array([3.0, 0.8, 0.7])
    for axis in range(3):
        v = native_shape._vertices(torch.from_numpy(m), tuple(a for a in range(3) if a != axis)).numpy()
        pts = (v * sp)[:, [a for a in range(3) if a != axis]]
        groups = np.round(v[:, axis] * 2).astype(np.int64)
        expected = max(float(np.max(np.sum((pts[groups == g][:, None] - pts[groups == g][None]) ** 2, -1)))
                       for g in np.unique(groups))
        got = float(native_shape._grouped_max_dist_sq(torch.from_numpy(pts), torch.from_numpy(groups)))
        assert got == pytest.approx(expected, rel=1e-12)


# ------------------------------------------------------------------------------------------------
# numpy fast path (native_small) for small CPU regions, against the torch path and pyradiomics

def both_paths(img, msk, spacing, names, bin_width=25.0, force2d=False):
    a = compute_native(img, msk, spacing, names, bin_width, force2d, impl="numpy")
    b = compute_native(img, msk, spacing, names, bin_width, force2d, impl="torch")
    return a, b


@pytest.mark.parametrize("seed", range(8))
def test_numpy_path_equals_torch_path_on_every_feature(seed):
    rng = np.random.default_rng(500 + seed)
    force2d = seed % 2 == 0
    shape_ = (1, 30, 26) if force2d else (12, 18, 17)
    msk = blob(rng, shape_, force2d)
    if seed % 4 < 2:
        msk &= rng.random(shape_) > 0.5  # ragged, with holes and islands
    dtype = np.float64 if seed % 3 == 0 else np.float32
    img = rng.normal(40, 60, shape_).astype(dtype)
    names = sorted(NATIVE_FEATURES_2D if force2d else NATIVE_FEATURES_3D)
    a, b = both_paths(img, msk, tuple(rng.uniform(0.5, 3, 3)), names, 25.0, force2d)
    bad = {n: (a[n], b[n]) for n in names if not np.isclose(a[n], b[n], rtol=1e-9, atol=1e-12, equal_nan=True)}
    assert not bad, f"numpy path != torch path: {bad}"


def test_numpy_path_equals_torch_path_on_degenerate_regions():
    """Lines (zero minor axis), two far-apart pixels (no co-occurrence: GLCM NaN), a flat image, a
    2-pixel region and a 3D region one slice thick: both paths give the same values and NaNs."""
    rng = np.random.default_rng(7)
    img = rng.normal(0, 50, (1, 20, 20)).astype(np.float32)
    cases = []
    m = np.zeros((1, 20, 20), bool)
    m[0, 5, 2:15] = True
    cases.append((img, m))
    m = np.zeros((1, 20, 20), bool)
    m[0, np.arange(3, 13), np.arange(3, 13)] = True
    cases.append((img, m))
    m = np.zeros((1, 20, 20), bool)
    m[0, 2, 2] = m[0, 15, 17] = True
    cases.append((img, m))
    m = np.zeros((1, 20, 20), bool)
    m[0, 4:9, 4:12] = True
    cases.append((np.full_like(img, 40.0), m))
    m = np.zeros((1, 20, 20), bool)
    m[0, 6, 6:8] = True
    cases.append((img, m))
    names2 = sorted(NATIVE_FEATURES_2D)
    for im, mk in cases:
        a, b = both_paths(im, mk, (0.7, 0.9, 2.0), names2, force2d=True)
        bad = {n: (a[n], b[n]) for n in names2 if not np.isclose(a[n], b[n], rtol=1e-9, atol=1e-9, equal_nan=True)}
        assert not bad, bad
    assert math.isnan(a["glcm_Contrast"]) is False and a["shape2D_PixelSurface"] == pytest.approx(2 * 0.7 * 0.9)
    flat3d = np.zeros((5, 12, 12), bool)
    flat3d[2, 3:9, 2:10] = True
    img3 = rng.normal(0, 50, flat3d.shape)
    names3 = sorted(NATIVE_FEATURES_3D)
    a, b = both_paths(img3, flat3d, (1.0, 1.0, 2.5), names3)
    bad = {n: (a[n], b[n]) for n in names3 if not np.isclose(a[n], b[n], rtol=1e-9, atol=1e-6, equal_nan=True)}
    assert not bad, bad
    assert a["shape_LeastAxisLength"] == 0.0


@pytest.mark.parametrize("seed", range(2))
def test_torch_path_on_small_regions_matches_pyradiomics(seed):
    """Small CPU regions now go through numpy by default; the torch path (GPU tensors, large
    regions) is still checked against pyradiomics on them."""
    rng = np.random.default_rng(seed)
    force2d = seed == 1
    shape_ = (1, 30, 26) if force2d else (12, 18, 17)
    msk = blob(rng, shape_, force2d)
    img = rng.normal(40, 60, shape_).astype(np.float32)
    spacing = tuple(rng.uniform(0.5, 3, 3))
    ref = pyradiomics_features(img, msk, spacing, 25.0, force2d)
    names = sorted((NATIVE_FEATURES_2D if force2d else NATIVE_FEATURES_3D) & set(ref))
    nat = compute_native(torch.from_numpy(img), torch.from_numpy(msk), spacing, names, 25.0, force2d, impl="torch")
    bad = {n: (nat[n], ref[n]) for n in names if not np.isclose(nat[n], ref[n], rtol=RTOL, atol=ATOL, equal_nan=True)}
    assert not bad, bad


def test_large_region_takes_the_torch_path_with_the_same_values():
    """Above native_small.SMALL_BOX_VOXELS the default goes to torch: values equal the forced paths."""
    from DeepDreamAnalysisLib.features import native_small

    rng = np.random.default_rng(3)
    n = int(round(native_small.SMALL_BOX_VOXELS ** (1 / 3))) + 4
    z, y, x = np.indices((n, n, n)) - n / 2
    msk = z ** 2 + y ** 2 + x ** 2 <= (n / 2 - 0.5) ** 2
    img = rng.normal(40, 60, msk.shape).astype(np.float32)
    names = list(paper_features_3d())
    auto = compute_native(img, msk, (1.0, 1.0, 1.5), names)
    a, b = both_paths(img, msk, (1.0, 1.0, 1.5), names)
    for k in names:
        assert auto[k] == b[k] and auto[k] == pytest.approx(a[k], rel=1e-9)


def paper_features_3d():
    from DeepDreamAnalysisLib.config import paper_features

    return paper_features(3)


def test_unknown_implementation_is_refused():
    img = np.zeros((1, 3, 3), np.float32)
    with pytest.raises(ValueError, match="impl must be 'auto', 'torch' or 'numpy'"):
        compute_native(img, img > -1, (1, 1, 1), ["firstorder_Mean"], impl="cuda")
