"""DeepDreamAnalysis engine: DeepDream analysis of segmentation networks (Couteaux et al., 2019).

This package imports no slicer, qt or vtk (except :mod:`.scene`, the MRML bridge).
"""

__version__ = "0.1.0"
