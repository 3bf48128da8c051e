"""What the package's source imports, read with `ast` so that imports inside functions count too: the CLI sits
on top (DESIGN.md "Direction of imports"), and every dependency pyproject.toml declares is used."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
PACKAGE = SRC / "bincount"
# Declared for what another dependency imports on bincount's behalf: optuna's samplers that tuning.yaml can name.
INDIRECT = {"scipy": "optuna's GPSampler and QMCSampler (bayesianoptimization, sobol)",
            "cmaes": "optuna's CmaEsSampler (cmaes)"}


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


def provided_modules(distribution: str) -> set[str]:
    """The Python modules an installed distribution's files hold."""
    out = set()
    for file in metadata.distribution(distribution).files or []:
        if file.suffix == ".py":
            parts = file.with_suffix("").parts
            out.add(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return out


def test_every_declared_dependency_is_imported():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    declared = [*project["dependencies"],
                *(r for name, reqs in extras.items() if name not in ("all", "dev") for r in reqs)]
    names = [re.match(r"[A-Za-z0-9._-]+", r).group(0) for r in declared]
    from bincount.model.zoo import LITE

    # the weight wheels are imported by name, one per Lite model (bincount.model.zoo._lite_source)
    imported = set().union(*(imports(p) for p in sources())) | {spec.module for _, spec in LITE.values()}
    unused = [n for n in names if n not in INDIRECT and not provided_modules(n) & imported]
    assert unused == [], "declared in pyproject.toml, imported nowhere in src/: drop them or use them"


CLUSTER_SDKS = ("kubernetes", "kubeflow", "kubeflow_trainer_api", "kubeflow_katib_api", "pydantic")
BLOCKING = f"""
import sys

class Blocked:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name.split(".")[0] in {CLUSTER_SDKS!r}:
            raise ImportError("the cluster extra is not installed: no " + name)

sys.meta_path.insert(0, Blocked)
import bincount.cli, bincount.backends, bincount.tune.local, bincount.tune.space, bincount.kfp.stages
bincount.tune.space.load_space()
"""


def test_the_cli_and_the_local_backend_load_without_the_cluster_extra():
    """The cluster SDKs load where a cluster is used: `bincount` and local training and tuning work without them."""
    done = subprocess.run([sys.executable, "-c", BLOCKING], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
