"""The library never imports the exporter: `fqat_tf` must stand alone (the exporter reads the
library's storage plan, not the other way round)."""
import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _imported_modules(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module


def test_no_module_under_fqat_tf_imports_export():
    files = sorted((ROOT / "fqat_tf").rglob("*.py"))
    assert len(files) > 20
    offenders = [f"{path.relative_to(ROOT)}: {module}" for path in files
                 for module in _imported_modules(path)
                 if module == "export" or module.startswith("export.")]
    assert offenders == []


def test_the_check_sees_lazy_imports(tmp_path):
    # An import inside a function (the trainer's former lazy import) is found as well.
    path = tmp_path / "m.py"
    path.write_text("def f():\n    from export.storage import int8_storage_model\n"
                    "import export\n")
    assert sorted(_imported_modules(path)) == ["export", "export.storage"]
