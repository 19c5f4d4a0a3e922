"""The packages are layers that point one way: ``store`` imports neither of the others, ``optimizers`` imports
``store`` but never ``proxy``, and ``proxy`` sits on top. Read from the source (every import, also one inside a
function or under ``TYPE_CHECKING``), so that a lazy import cannot hide a crossing."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# What each package may import of the three.
ALLOWED = {"store": {"store"}, "optimizers": {"optimizers", "store"}, "proxy": {"proxy", "optimizers", "store"}}


def imported(path: Path) -> list[tuple[int, str]]:
    """The modules a file imports by absolute name, with the line of each import. (A relative import stays inside
    its own top-level package: it cannot cross a layer.)"""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            out.append((node.lineno, node.module))
    return out


def crossings(root: Path) -> list[str]:
    """Every import of a package that the importing file's layer may not import, as ``file:line -> module``."""
    wrong = []
    for name, allowed in ALLOWED.items():
        for path in sorted((root / name).rglob("*.py")):
            for line, module in imported(path):
                top = module.partition(".")[0]
                if top in ALLOWED and top not in allowed:
                    wrong.append(f"{path.relative_to(root)}:{line} -> {module}")
    return wrong


def test_store_and_optimizers_never_import_a_layer_above_them() -> None:
    assert crossings(ROOT) == []


def test_imports_inside_functions_and_sub_packages_are_seen(tmp_path: Path) -> None:
    (tmp_path / "store" / "sub").mkdir(parents=True)
    (tmp_path / "store" / "sub" / "m.py").write_text(
        "from store import writer\nfrom . import x\n\n\ndef f():\n    from optimizers.loop import Optimizer\n"
    )
    (tmp_path / "optimizers").mkdir()
    (tmp_path / "optimizers" / "m.py").write_text(
        "from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    import proxy\n"
    )
    assert crossings(tmp_path) == ["store/sub/m.py:6 -> optimizers.loop", "optimizers/m.py:4 -> proxy"]
