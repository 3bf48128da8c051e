"""What the package's source imports, read with `ast` so that imports inside functions count too: the CLI sits
on top (DESIGN.md "Direction of imports")."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
PACKAGE = SRC / "bincount"


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module `path` imports anywhere in it; `from a import b` counts as both `a` and `a.b`."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0]
                base = f"{parent}.{base}" if base else parent
            found |= {base, *(f"{base}.{alias.name}" for alias in node.names)}
    return found


def sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_nothing_below_the_cli_imports_it():
    cli = PACKAGE / "cli.py"
    importers = [module_name(p) for p in sources() if p != cli and "bincount.cli" in imports(p)]
    assert importers == []
