"""Checks of the Slicer module that need no Slicer: the .ui file matches the widget code, CMake lists
every shipped file (and nothing that does not exist), the module file compiles and imports nothing
heavy at the top, and the panel's feature list and dependency helpers are right."""

from __future__ import annotations

import ast
import json
import py_compile
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE_DIR = ROOT / "DeepDreamAnalysis"
MODULE_PY = MODULE_DIR / "DeepDreamAnalysis.py"
UI = MODULE_DIR / "Resources" / "UI" / "DeepDreamAnalysis.ui"
HEAVY = {"torch", "monai", "radiomics", "matplotlib", "SimpleITK", "scipy"}

# Widget classes the parameterNodeWrapper can bind, per parameter type (Slicer's guiConnectors).
BINDABLE = {
    "bool": {"QCheckBox", "QPushButton"},
    "int": {"QSpinBox", "QSlider", "QComboBox"},
    "float": {"QDoubleSpinBox", "ctkSliderWidget", "QComboBox"},
    "str": {"QComboBox", "QLineEdit", "QTextEdit"},
    "pathlib.Path": {"ctkPathLineEdit", "ctkDirectoryButton"},
    "node": {"qMRMLNodeComboBox", "qMRMLSubjectHierarchyTreeView"},
}


def _ui_widgets() -> dict[str, ET.Element]:
    return {w.get("name"): w for w in ET.parse(UI).getroot().iter("widget")}


def _tree():
    return ast.parse(MODULE_PY.read_text(encoding="utf-8"))


def _cmake_list(variable: str) -> list[str]:
    text = (MODULE_DIR / "CMakeLists.txt").read_text(encoding="utf-8")
    m = re.search(rf"set\({variable}\s+(.*?)\)", text, re.S)
    assert m, f"{variable} is not set in DeepDreamAnalysis/CMakeLists.txt"
    return [item.replace("${MODULE_NAME}", "DeepDreamAnalysis") for item in m.group(1).split()]


def test_every_widget_the_widget_uses_exists_in_the_ui_file():
    used = set()
    for node in ast.walk(_tree()):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) \
                and node.value.attr == "ui" and isinstance(node.value.value, ast.Name) and node.value.value.id == "self":
            used.add(node.attr)
    assert len(used) >= 10, used
    missing = sorted(used - set(_ui_widgets()))
    assert not missing, f"DeepDreamAnalysis.py uses self.ui.{missing} but the .ui file has no such widget"


def test_every_bound_widget_matches_a_parameter_of_a_type_it_can_show():
    params = {}
    for node in ast.walk(_tree()):
        if isinstance(node, ast.ClassDef) and node.name == "DeepDreamAnalysisParameterNode":
            for item in node.body:
                if isinstance(item, ast.AnnAssign):
                    ann = ast.unparse(item.annotation)
                    m = re.match(r"Annotated\[(\w[\w.]*),", ann)
                    base = m.group(1) if m else ann
                    params[item.target.id] = "node" if base.startswith("slicer.vtkMRML") else base
    assert params, "no parameter node class found"
    bound = {}
    for name, widget in _ui_widgets().items():
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[prop.find("string").text] = widget.get("class")
    assert bound, "the .ui file binds no widget to the parameter node"
    for param, cls in bound.items():
        assert param in params, f"the .ui binds {param!r}, which the parameter node does not have"
        assert cls in BINDABLE[params[param]], f"{param} ({params[param]}) cannot be shown by a {cls}"
    # everything a user sets in the panel is bound, except the feature list (a tree: no connector) and
    # the two paths (a ctkPathLineEdit binds only pathlib.Path, which shows an empty path as ".")
    assert set(params) - set(bound) == {"features", "modelPath", "referencePath"}
    assert params["features"] == "list[str]"


# Q_PROPERTY names of the Slicer/CTK widgets the .ui uses (Slicer 5.10 sources), beyond QWidget's.
QWIDGET_PROPERTIES = {"geometry", "toolTip", "visible", "enabled", "styleSheet", "sizePolicy", "minimumSize",
                      "maximumSize", "whatsThis", "statusTip"}
SLICER_WIDGET_PROPERTIES = {
    "qSlicerMarkupsPlaceWidget": {"buttonsVisible", "deleteAllControlPointsOptionVisible",
                                  "unsetLastControlPointOptionVisible", "unsetAllControlPointsOptionVisible",
                                  "placeMultipleMarkups", "placeModeEnabled", "placeModePersistency"},
    "qMRMLNodeComboBox": {"nodeTypes", "showHidden", "showChildNodeTypes", "hideChildNodeTypes", "baseName",
                          "noneEnabled", "addEnabled", "removeEnabled", "editEnabled", "renameEnabled",
                          "selectNodeUponCreation", "noneDisplay", "interactionNodeSingletonTag", "sizeAdjustPolicy"},
    "ctkPathLineEdit": {"label", "nameFilters", "filters", "options", "showBrowseButton", "showHistoryButton",
                        "sizeAdjustPolicy", "minimumContentsLength", "settingKey", "currentPath"},
    "ctkCollapsibleButton": {"text", "collapsed", "collapsedHeight", "contentsFrameShape", "contentsFrameShadow",
                             "contentsLineWidth", "contentsMidLineWidth", "buttonTextAlignment", "indicatorAlignment",
                             "checkable", "checked", "icon"},
    "qMRMLWidget": set(),
}


def test_no_unknown_property_on_the_slicer_widgets_of_the_ui_file():
    """A property a Slicer widget does not have (such as placeButtonVisible on the markups place
    widget) is silently ignored by Slicer: the panel then misbehaves without any error."""
    seen = set()
    for name, widget in _ui_widgets().items():
        cls = widget.get("class")
        if cls not in SLICER_WIDGET_PROPERTIES:
            continue
        seen.add(cls)
        for prop in widget.findall("property"):
            key = prop.get("name")
            if prop.get("stdset") == "0":  # a dynamic property (SlicerParameterName)
                continue
            assert key in SLICER_WIDGET_PROPERTIES[cls] | QWIDGET_PROPERTIES, f"{cls} {name!r} has no property {key!r}"
    assert {"qSlicerMarkupsPlaceWidget", "qMRMLNodeComboBox", "ctkPathLineEdit"} <= seen
    code = MODULE_PY.read_text(encoding="utf-8")
    # only the Place button: hide the buttons, then show the place button again
    assert code.index("seedPlaceWidget.buttonsVisible = False") < code.index("seedPlaceWidget.placeButton().show()")


def test_every_raw_url_of_the_extension_names_a_file_of_the_repository():
    """The Extensions Index checker downloads the icon and every screenshot."""
    top = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    fields = dict(re.findall(r'set\((EXTENSION_\w+) "([^"]*)"\)', top))
    urls = [fields["EXTENSION_ICONURL"]] + fields["EXTENSION_SCREENSHOTURLS"].split()
    for url in urls:
        m = re.match(r"https://raw\.githubusercontent\.com/[^/]+/SlicerDeepDreamAnalysis/main/(.+)$", url)
        assert m, f"not a raw URL of the repository: {url}"
        assert (ROOT / m.group(1)).is_file(), f"{url} names {m.group(1)}, which is not in the repository"


def test_module_file_compiles_and_imports_nothing_heavy_at_top_level():
    py_compile.compile(str(MODULE_PY), doraise=True)
    for path in [MODULE_PY, MODULE_DIR / "DeepDreamAnalysisLib" / "slicer_logic.py",
                 MODULE_DIR / "DeepDreamAnalysisLib" / "slicer_deps.py",
                 MODULE_DIR / "DeepDreamAnalysisLib" / "scene.py"]:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in tree.body:  # module level only; imports inside functions are the point
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in HEAVY, f"{path.name} imports {name} at the top"
    # scene.py is the MRML bridge: slicer and vtk, never qt
    scene_tree = ast.parse((MODULE_DIR / "DeepDreamAnalysisLib" / "scene.py").read_text(encoding="utf-8"))
    imported = {a.name.split(".")[0] for n in ast.walk(scene_tree) if isinstance(n, ast.Import) for a in n.names}
    assert "qt" not in imported and "slicer" in imported


def test_module_imports_of_the_library_stay_light():
    """What DeepDreamAnalysis.py imports from the library at its top must not pull torch in."""
    import subprocess
    import sys

    code = ("import sys\n"
            "import DeepDreamAnalysisLib.config, DeepDreamAnalysisLib.slicer_logic, DeepDreamAnalysisLib.slicer_deps\n"
            "import DeepDreamAnalysisLib.slicer_deps as d; d.feature_catalog(); d.model_format_note('m.pt')\n"
            "print(sorted(m for m in ('torch', 'monai', 'radiomics', 'matplotlib') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_cmake_lists_every_shipped_file_and_only_existing_ones():
    scripts = _cmake_list("MODULE_PYTHON_SCRIPTS")
    resources = _cmake_list("MODULE_PYTHON_RESOURCES")
    listed = set(scripts) | set(resources)
    missing_files = sorted(f for f in listed if not (MODULE_DIR / f).is_file())
    assert not missing_files, f"CMakeLists.txt lists files that do not exist: {missing_files}"
    shipped = {"DeepDreamAnalysis.py"}
    shipped |= {p.relative_to(MODULE_DIR).as_posix() for p in (MODULE_DIR / "DeepDreamAnalysisLib").rglob("*.py")}
    shipped |= {p.relative_to(MODULE_DIR).as_posix() for p in (MODULE_DIR / "Resources").rglob("*") if p.is_file()}
    unlisted = sorted(shipped - listed)
    assert not unlisted, f"add these to DeepDreamAnalysis/CMakeLists.txt (else they are missing when installed): {unlisted}"
    text = (MODULE_DIR / "CMakeLists.txt").read_text(encoding="utf-8")
    assert "WITH_GENERIC_TESTS" in text and "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text
    for script in re.findall(r"slicer_add_python_unittest\(SCRIPT \$\{CMAKE_CURRENT_SOURCE_DIR\}/(\S+)\)",
                             (MODULE_DIR / "Testing" / "Python" / "CMakeLists.txt").read_text()):
        assert (MODULE_DIR / "Testing" / "Python" / script).is_file()


def test_extension_metadata_agrees_with_the_catalog_entry():
    top = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    fields = dict(re.findall(r'set\((EXTENSION_\w+) "([^"]*)"\)', top))
    assert re.search(r"^project\(DeepDreamAnalysis\)", top, re.M)
    assert fields["EXTENSION_CATEGORY"] == "Quantification"
    assert fields["EXTENSION_DEPENDS"] == "PyTorch"
    assert fields["EXTENSION_ICONURL"].startswith("https://raw.githubusercontent.com/")
    assert fields["EXTENSION_ICONURL"].endswith("DeepDreamAnalysis/Resources/Icons/DeepDreamAnalysis.png")
    assert "add_subdirectory(DeepDreamAnalysis)" in top
    entry = json.loads((ROOT / "DeepDreamAnalysis.json").read_text(encoding="utf-8"))
    assert entry["category"] == fields["EXTENSION_CATEGORY"]
    assert entry["build_dependencies"] == fields["EXTENSION_DEPENDS"].split(";")
    assert entry["scm_url"].rstrip(".git").endswith("/SlicerDeepDreamAnalysis")
    assert fields["EXTENSION_HOMEPAGE"] in entry["scm_url"]
    assert {"$schema", "scm_revision"} <= set(entry)


def test_requirements_have_lower_bounds_and_never_name_slicers_own_packages():
    from DeepDreamAnalysisLib.slicer_deps import PROTECTED, REQUIREMENTS, read_requirements

    reqs = read_requirements(REQUIREMENTS)
    assert reqs and all(minimum for _, minimum in reqs), reqs
    names = {n.lower() for n, _ in reqs}
    assert not names & {p.lower() for p in PROTECTED} and "torch" not in names and "pyradiomics" not in names


def test_missing_requirements_and_constraints(tmp_path):
    from DeepDreamAnalysisLib.slicer_deps import constraints_text, missing_requirements, read_requirements

    f = tmp_path / "requirements.txt"
    f.write_text("# comment\nnumpy>=1.0\nnumpy>=999.0\nsurely-not-installed-pkg>=1.2\n")
    reqs = read_requirements(f)
    assert missing_requirements(reqs) == ["numpy>=999.0", "surely-not-installed-pkg>=1.2"]
    import numpy

    assert f"numpy=={numpy.__version__}" in constraints_text().splitlines()
    f.write_text("numpy<2\n")
    with pytest.raises(ValueError, match="name>=version"):
        read_requirements(f)


def test_feature_catalogue_works_without_pyradiomics_and_ticks_the_papers_features():
    from DeepDreamAnalysisLib.features.native import NATIVE_FEATURES
    from DeepDreamAnalysisLib.slicer_deps import feature_catalog, paper_feature_names

    without = {n for names in feature_catalog(with_radiomics=False).values() for n in names}
    assert without <= NATIVE_FEATURES  # what the panel offers without pyradiomics can be computed
    assert paper_feature_names() <= without
    with_ = {n for names in feature_catalog(with_radiomics=True).values() for n in names}
    assert "ngtdm_Busyness" in with_ and "ngtdm_Busyness" not in without
    assert "glrlm_RunEntropy" in without  # GLRLM is native


def test_model_format_note_names_formats_that_run_code(tmp_path):
    from DeepDreamAnalysisLib.slicer_deps import model_format_note

    assert "runs code" in model_format_note("model.pt")
    assert "trust" in model_format_note("model.pt2")
    assert "bundle" in model_format_note(tmp_path)
    assert model_format_note("") == model_format_note(".") == ""
