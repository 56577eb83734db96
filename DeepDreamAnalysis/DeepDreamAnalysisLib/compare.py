"""Alias of :mod:`DeepDreamAnalysisLib.studies.compare` (the module moved into ``studies/``)."""

import sys as _sys

from .studies import compare as _compare

_sys.modules[__name__] = _compare
