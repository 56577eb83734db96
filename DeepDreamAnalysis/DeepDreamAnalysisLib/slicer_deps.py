"""Dependencies of the Slicer module, the feature catalogue of its panel, and the model-format note.

Inside Slicer:

- torch comes only through the PyTorch extension (``PyTorchUtils``): it knows the right CUDA build
  for the machine and asks before installing.
- monai and the other packages of ``Resources/requirements.txt`` (``>=`` bounds) are installed on
  the first Apply, after asking (again after a no; once a yes is given, not again this session),
  with Slicer's own numpy, SimpleITK and vtk and the PyTorch extension's torch pinned through a pip
  constraints file so that they are never replaced.
- pyradiomics is optional (the SlicerRadiomics extension provides it; it has no wheel for every
  platform). Without it the run uses the native features and says which ones it left out.

Nothing here installs anything at import time; the pure helpers (requirement parsing, the missing
list, the constraints text, the catalogue) are tested outside Slicer.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import shutil
import tempfile
from pathlib import Path

from .config import PAPER_FEATURES_2D, PAPER_FEATURES_3D
from .errors import DeepDreamError

REQUIREMENTS = Path(__file__).resolve().parent.parent / "Resources" / "requirements.txt"
PROTECTED = ("numpy", "SimpleITK", "vtk", "torch")
"""Packages pip must never replace: Slicer's own, and torch (the PyTorch extension's build for this
machine's CUDA; monai would otherwise let pip pull a PyPI torch over it)."""

_approved_this_session = False
"""The user said yes to installing the requirements (asked again after a no, never after a yes)."""


class DependencyError(DeepDreamError):
    """A package the analysis needs is missing and was not installed."""


# ----------------------------------------------------------------------------- requirements

_REQ = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:>=\s*([0-9][0-9A-Za-z.]*))?\s*$")


def read_requirements(path: Path | str | None = None) -> list[tuple[str, str | None]]:
    """``(name, minimum version or None)`` per line of a requirements file (``name>=version``;
    default: the module's ``Resources/requirements.txt``)."""
    path = REQUIREMENTS if path is None else path
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = _REQ.match(line)
        if not m:
            raise ValueError(f"{path}: cannot read requirement {line!r}; write name>=version.")
        out.append((m.group(1), m.group(2)))
    return out


def _version_tuple(v: str) -> tuple:
    parts = []
    for piece in re.split(r"[.+-]", v):
        m = re.match(r"\d+", piece)
        if not m:
            break
        parts.append(int(m.group()))
    return tuple(parts)


def missing_requirements(requirements) -> list[str]:
    """The ``name>=version`` specs not satisfied by what is installed."""
    missing = []
    for name, minimum in requirements:
        try:
            have = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(f"{name}>={minimum}" if minimum else name)
            continue
        if minimum and _version_tuple(have) < _version_tuple(minimum):
            missing.append(f"{name}>={minimum}")
    return missing


def constraints_text(packages=PROTECTED) -> str:
    """A pip constraints file pinning the installed versions of ``packages`` (absent ones skipped)."""
    lines = []
    for name in packages:
        try:
            lines.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    return "\n".join(lines) + ("\n" if lines else "")


def radiomics_available() -> bool:
    return importlib.util.find_spec("radiomics") is not None


# ----------------------------------------------------------------------------- in Slicer

def require_torch():
    """Import torch or raise :class:`DependencyError` telling how to get it (no install here)."""
    try:
        import torch
    except ImportError:
        raise DependencyError(
            "PyTorch is not installed in Slicer. Install the 'PyTorch' extension (Extensions Manager), "
            "then press Apply in the DeepDream Analysis module (it offers to install torch), or run "
            "DeepDreamAnalysisLib.slicer_deps.ensure_dependencies() in the Python console."
        ) from None
    return torch


def ensure_dependencies(askConfirmation: bool = True) -> bool:
    """Inside Slicer: make torch and the requirements importable. False if the user declined."""
    global _approved_this_session
    import slicer

    try:
        import torch  # noqa: F401
    except ImportError:
        try:
            import PyTorchUtils
        except ImportError:
            raise DependencyError(
                "This module needs the 'PyTorch' extension. Install it from the Extensions Manager and "
                "restart Slicer."
            ) from None
        torchLogic = PyTorchUtils.PyTorchUtilsLogic()
        if not torchLogic.torchInstalled():
            if askConfirmation and not slicer.util.confirmOkCancelDisplay(
                    "DeepDream Analysis needs PyTorch. Install it now? (This can take several minutes.)",
                    windowTitle="DeepDream Analysis"):
                return False
            if torchLogic.installTorch(askConfirmation=False) is None:
                raise DependencyError("PyTorch could not be installed; see the PyTorch module for details.")
    missing = missing_requirements(read_requirements())
    if not missing:
        return True
    if askConfirmation and not _approved_this_session:
        if not slicer.util.confirmOkCancelDisplay(
                "DeepDream Analysis needs these Python packages: " + ", ".join(missing) + ". Install them now?",
                windowTitle="DeepDream Analysis"):
            return False  # asked again on the next Apply
    _approved_this_session = True
    folder = Path(tempfile.mkdtemp(prefix="deepdream-pip-"))  # removed once pip is done: nothing left in /tmp
    constraints = folder / "constraints.txt"
    try:
        constraints.write_text(constraints_text(), encoding="utf-8")
        try:  # a submodule: not imported with slicer itself
            import slicer.packaging as packaging
        except ImportError:
            packaging = None
        if packaging is not None and hasattr(packaging, "pip_ensure"):  # Slicer 5.12 and later
            from packaging.requirements import Requirement

            packaging.pip_ensure([Requirement(m) for m in missing], constraints=str(constraints),
                                 prompt_install=False, requester="DeepDreamAnalysis")
        else:
            slicer.util.pip_install(" ".join(f'"{m}"' for m in missing) + f' -c "{constraints}"')
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    still = missing_requirements(read_requirements())
    if still:
        raise DependencyError(f"Could not install {', '.join(still)}; see the Python console for pip's output.")
    return True


# ----------------------------------------------------------------------------- panel helpers

NATIVE_CLASSES = ("firstorder", "shape", "shape2D", "glcm", "gldm", "glrlm", "glszm")
"""pyradiomics classes the engine also computes natively, so they work without pyradiomics."""

GROUP_TITLES = {
    "firstorder": "First order (intensity)", "shape": "Shape (3D models)", "shape2D": "Shape (2D models)",
    "glcm": "GLCM (texture)", "gldm": "GLDM (texture)", "glrlm": "GLRLM (texture)",
    "glszm": "GLSZM (texture)", "ngtdm": "NGTDM (texture, pyradiomics)",
}


def feature_catalog(with_radiomics: bool | None = None) -> dict[str, list[str]]:
    """Group title -> full feature names (``class_Feature``) for the panel's checkable list.

    From ``features.catalog`` (a static table: no torch or pyradiomics import when the panel
    opens). Classes only pyradiomics computes appear when pyradiomics is importable.
    """
    CLASS_FEATURES = _catalog_module().CLASS_FEATURES
    if with_radiomics is None:
        with_radiomics = radiomics_available()
    out = {}
    for cls, names in CLASS_FEATURES.items():
        if cls not in NATIVE_CLASSES and not with_radiomics:
            continue
        out[GROUP_TITLES.get(cls, cls)] = [f"{cls}_{n}" for n in names]
    return out


def _catalog_module():
    """``features/catalog.py`` (a static table) loaded on its own: importing the ``features``
    package would import torch, which the panel must not need before the user presses Apply."""
    import sys

    name = "DeepDreamAnalysisLib.features.catalog"
    if name in sys.modules:
        return sys.modules[name]
    path = Path(__file__).resolve().parent / "features" / "catalog.py"
    spec = importlib.util.spec_from_file_location("_deepdream_feature_catalog", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def paper_feature_names() -> frozenset[str]:
    """The features ticked by default: the paper's seven, in their 2D and 3D forms."""
    return frozenset(PAPER_FEATURES_2D) | frozenset(PAPER_FEATURES_3D)


CODE_NOTE_TORCHSCRIPT = (
    "TorchScript and pickled models are programs: loading one runs code from the file. Load only models "
    "from people you trust. (A state dict with a model card that names its network runs no code.)"
)
CODE_NOTE_EXPORT = (
    "torch.export (.pt2) programs run the operators recorded in the file, which may include custom ones. "
    "Load only models from people you trust."
)
CODE_NOTE_BUNDLE = (
    "MONAI bundle configs can name Python code. Only monai. and torch. network classes are built unless "
    "you tick 'Allow code in bundle configs'; tick it only for bundles you trust."
)


def model_format_note(path) -> str:
    """The panel's warning for model formats that run code ('' when there is nothing to say)."""
    text = str(path or "").strip()
    if not text or text == ".":
        return ""
    p = Path(text)
    suffix = p.suffix.lower()
    if p.is_dir() or suffix == ".zip":
        return CODE_NOTE_BUNDLE
    if suffix == ".pt2":
        return CODE_NOTE_EXPORT
    if suffix in (".pt", ".pth", ".ts", ".jit", ".torchscript"):
        return CODE_NOTE_TORCHSCRIPT
    return ""
