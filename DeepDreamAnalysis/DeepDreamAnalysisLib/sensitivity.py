"""Alias of :mod:`DeepDreamAnalysisLib.studies.sensitivity` (the module moved into ``studies/``)."""

import sys as _sys

from .studies import sensitivity as _sensitivity

_sys.modules[__name__] = _sensitivity
