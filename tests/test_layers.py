"""The architecture as a test: packages import only downward in LAYERS (function-level imports included), so the
tree has no import cycle and no lower layer reaches the CLI."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Lowest first; README's layer map lists the same order.
LAYERS = ["core", "calibration_data", "evaluation", "models", "graph", "quant", "engines", "tasks", "search",
          "pipeline", "report", "workbench"]
RANK = {name: i for i, name in enumerate(LAYERS)} | {"plugins": 0}


def imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from ((a.name.split(".")[0], node.lineno) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            yield node.module.split(".")[0], node.lineno


def upward_imports(root: Path = ROOT) -> list[str]:
    bad = []
    for package in RANK:
        for path in sorted((root / package).rglob("*.py")):
            for target, line in imports(path):
                if target in RANK and RANK[target] > RANK[package]:
                    bad.append(f"{path.relative_to(root)}:{line}: {package} imports {target}, a higher layer")
    return bad


def test_every_package_is_in_a_layer():
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests", "experiments"}
    assert packages <= set(RANK), sorted(packages - set(RANK))


def test_imports_only_go_down():
    assert upward_imports() == []


def test_the_check_catches_an_upward_import(tmp_path):
    for package in RANK:
        (tmp_path / package).mkdir()
    (tmp_path / "graph" / "bad.py").write_text("def f():\n    from workbench.cli import main\n")
    assert upward_imports(tmp_path) == ["graph/bad.py:2: graph imports workbench, a higher layer"]
