"""The studies package sits below the command line: it never imports cli, and cli reaches it only
through the package (no import cycle), while the old module names keep working."""

import ast
from pathlib import Path

LIB = Path(__file__).resolve().parents[1] / "DeepDreamAnalysis" / "DeepDreamAnalysisLib"


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            names.add(base)
            names.update(f"{base}.{a.name}" if node.module else f"{base}{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_studies_never_import_the_command_line():
    for path in (LIB / "studies").glob("*.py"):
        mods = _imported_modules(path)
        assert not any(m.rstrip(".").endswith("cli") or ".cli." in m for m in mods), (path.name, mods)


def test_cli_does_not_import_the_compare_module():
    mods = _imported_modules(LIB / "cli.py")
    assert ".compare" not in mods and ".sensitivity" not in mods, mods
    assert ".studies" in mods  # the command line reaches compare through the studies package


def test_old_module_names_are_the_moved_modules():
    from DeepDreamAnalysisLib import compare, sensitivity
    from DeepDreamAnalysisLib.studies import compare as moved_compare
    from DeepDreamAnalysisLib.studies import sensitivity as moved_sensitivity

    assert compare is moved_compare and sensitivity is moved_sensitivity
    from DeepDreamAnalysisLib.compare import compare_models as a
    from DeepDreamAnalysisLib.studies import compare_models as b

    assert a is b
