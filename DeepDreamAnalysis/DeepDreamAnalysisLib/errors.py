"""The error types of the engine.

Every failure a user can cause (a wrong file, a seed outside the volume, a model that does not fit
the image, ...) raises a subclass of :class:`DeepDreamError` whose message names the problem and
the fix. Callers (the command line, the Slicer module) catch ``DeepDreamError`` and show
``str(error)``; anything else escaping the engine is a bug.
"""

from __future__ import annotations


class DeepDreamError(Exception):
    """Base class of every error the engine raises on purpose."""


class ImageError(DeepDreamError):
    """The input image is missing, unreadable, or not a scalar 2D/3D volume."""


class ModelError(DeepDreamError):
    """The model file is missing, corrupt, not a model, or does not fit the image."""


class ModelCardError(DeepDreamError):
    """The model card is missing, has a wrong field, or contradicts the model."""


class SeedError(DeepDreamError):
    """The seed point is outside the volume or where the model cannot see."""


class FeatureError(DeepDreamError):
    """An unknown feature name, or a custom feature that cannot be loaded."""


class ReferenceStatsError(DeepDreamError):
    """The reference statistics file is malformed or lacks a requested feature."""




class ConfigError(DeepDreamError):
    """A configuration value is out of range (for example a non-positive step size)."""


class OutputError(DeepDreamError):
    """The output folder cannot be created or written."""


class RunFault(DeepDreamError):
    """The run stopped on a fault (NaN gradients, out of memory, an exception in the model).

    ``partial`` holds the result up to the last good iteration when there is one.
    """

    def __init__(self, message: str, partial=None):
        super().__init__(message)
        self.partial = partial
