"""The names of the radiomic features this tool knows, grouped by pyradiomics class.

Names are pyradiomics' own, prefixed by the class: ``firstorder_Entropy``, ``shape_Sphericity``,
``shape2D_Elongation``, ``glcm_Contrast``... Deprecated pyradiomics features (``Compactness1``,
``Homogeneity1``, ...) are left out. 3D models use the ``shape`` class; 2D models (one axial slice,
pyradiomics ``force2D``) use ``shape2D``. ``Testing/test_features.py`` checks this table against the
installed pyradiomics, so that the list works (for the command line and the Slicer panel) even where
pyradiomics is not installed.
"""

from __future__ import annotations

CLASS_FEATURES: dict[str, tuple[str, ...]] = {
    "firstorder": (
        "10Percentile", "90Percentile", "Energy", "Entropy", "InterquartileRange", "Kurtosis", "Maximum",
        "Mean", "MeanAbsoluteDeviation", "Median", "Minimum", "Range", "RobustMeanAbsoluteDeviation",
        "RootMeanSquared", "Skewness", "TotalEnergy", "Uniformity", "Variance",
    ),
    "shape": (
        "Elongation", "Flatness", "LeastAxisLength", "MajorAxisLength", "Maximum2DDiameterColumn",
        "Maximum2DDiameterRow", "Maximum2DDiameterSlice", "Maximum3DDiameter", "MeshVolume",
        "MinorAxisLength", "Sphericity", "SurfaceArea", "SurfaceVolumeRatio", "VoxelVolume",
    ),
    "shape2D": (
        "Elongation", "MajorAxisLength", "MaximumDiameter", "MeshSurface", "MinorAxisLength", "Perimeter",
        "PerimeterSurfaceRatio", "PixelSurface", "Sphericity",
    ),
    "glcm": (
        "Autocorrelation", "ClusterProminence", "ClusterShade", "ClusterTendency", "Contrast", "Correlation",
        "DifferenceAverage", "DifferenceEntropy", "DifferenceVariance", "Id", "Idm", "Idmn", "Idn", "Imc1",
        "Imc2", "InverseVariance", "JointAverage", "JointEnergy", "JointEntropy", "MCC", "MaximumProbability",
        "SumAverage", "SumEntropy", "SumSquares",
    ),
    "glrlm": (
        "GrayLevelNonUniformity", "GrayLevelNonUniformityNormalized", "GrayLevelVariance",
        "HighGrayLevelRunEmphasis", "LongRunEmphasis", "LongRunHighGrayLevelEmphasis",
        "LongRunLowGrayLevelEmphasis", "LowGrayLevelRunEmphasis", "RunEntropy", "RunLengthNonUniformity",
        "RunLengthNonUniformityNormalized", "RunPercentage", "RunVariance", "ShortRunEmphasis",
        "ShortRunHighGrayLevelEmphasis", "ShortRunLowGrayLevelEmphasis",
    ),
    "glszm": (
        "GrayLevelNonUniformity", "GrayLevelNonUniformityNormalized", "GrayLevelVariance",
        "HighGrayLevelZoneEmphasis", "LargeAreaEmphasis", "LargeAreaHighGrayLevelEmphasis",
        "LargeAreaLowGrayLevelEmphasis", "LowGrayLevelZoneEmphasis", "SizeZoneNonUniformity",
        "SizeZoneNonUniformityNormalized", "SmallAreaEmphasis", "SmallAreaHighGrayLevelEmphasis",
        "SmallAreaLowGrayLevelEmphasis", "ZoneEntropy", "ZonePercentage", "ZoneVariance",
    ),
    "gldm": (
        "DependenceEntropy", "DependenceNonUniformity", "DependenceNonUniformityNormalized",
        "DependenceVariance", "GrayLevelNonUniformity", "GrayLevelVariance", "HighGrayLevelEmphasis", "LargeDependenceEmphasis",
        "LargeDependenceHighGrayLevelEmphasis", "LargeDependenceLowGrayLevelEmphasis", "LowGrayLevelEmphasis",
        "SmallDependenceEmphasis", "SmallDependenceHighGrayLevelEmphasis", "SmallDependenceLowGrayLevelEmphasis",
    ),
    "ngtdm": ("Busyness", "Coarseness", "Complexity", "Contrast", "Strength"),
}

GROUP_ORDER = ("firstorder", "shape", "shape2D", "glcm", "glrlm", "glszm", "gldm", "ngtdm")


def shape_class(spatial_dims: int) -> str:
    """``shape2D`` for 2D models, ``shape`` for 3D models."""
    return "shape2D" if spatial_dims == 2 else "shape"


def radiomics_names(spatial_dims: int) -> dict[str, tuple[str, ...]]:
    """Every known radiomic feature name for a 2D or 3D model, grouped by class (in GROUP_ORDER)."""
    skip = "shape" if spatial_dims == 2 else "shape2D"
    return {
        group: tuple(f"{group}_{n}" for n in CLASS_FEATURES[group])
        for group in GROUP_ORDER
        if group != skip
    }


def split_name(name: str) -> tuple[str, str]:
    """``'glcm_Contrast'`` -> ``('glcm', 'Contrast')``. The class is the part before the first ``_``."""
    cls, _, feat = name.partition("_")
    return cls, feat
