"""The compiled specs a KFP user loads or submits: components/<step>/component.yaml and pipelines/bin_counting.yaml,
pipelines/bin_audit.yaml and pipelines/bin_monitor.yaml, written from the definitions in this package and checked
for drift by a test."""

from __future__ import annotations

import tempfile
from pathlib import Path

from bincount.errors import BincountError

HEADER = ("# Compiled by `bincount pipeline compile` from src/bincount/kfp/. Edit the Python and recompile:\n"
          "# a test fails when this file and the definitions disagree.\n")
PIPELINE_FILE = Path("pipelines") / "bin_counting.yaml"
AUDIT_PIPELINE_FILE = Path("pipelines") / "bin_audit.yaml"
MONITOR_PIPELINE_FILE = Path("pipelines") / "bin_monitor.yaml"
COMPONENTS_DIR = Path("components")


def compiled() -> dict[Path, str]:
    """Every compiled spec by its path relative to the repository root."""
    from kfp import compiler

    from bincount.kfp.components import COMPONENTS
    from bincount.kfp.pipeline import bin_audit, bin_counting, bin_monitor

    targets = {PIPELINE_FILE: bin_counting, AUDIT_PIPELINE_FILE: bin_audit, MONITOR_PIPELINE_FILE: bin_monitor}
    targets |= {COMPONENTS_DIR / name.replace("-", "_") / "component.yaml": c for name, c in COMPONENTS.items()}
    out = {}
    with tempfile.TemporaryDirectory(prefix="bincount-compile-") as tmp:
        for path, definition in targets.items():
            target = Path(tmp) / "spec.yaml"
            compiler.Compiler().compile(definition, str(target))
            out[path] = HEADER + target.read_text()
    return out


def write(root: Path) -> list[Path]:
    """Writes what changed; returns those paths."""
    changed = []
    for path, text in compiled().items():
        target = root / path
        if not target.exists() or target.read_text() != text:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
            changed.append(path)
    return changed


def drift(root: Path) -> list[str]:
    """How the compiled specs under `root` differ from a fresh compile: `missing X`, `changed X`. With none of them
    there, `root` is no checkout of bincount: an error that says where it looked."""
    wanted = compiled()
    missing = [path for path in wanted if not (root / path).is_file()]
    if len(missing) == len(wanted):
        raise BincountError(f"the compiled pipeline and components are missing under {root.resolve()} (looked for "
                            f"{PIPELINE_FILE} and {COMPONENTS_DIR}/<step>/component.yaml); run this in a checkout "
                            "of bincount, or point --root at one")
    return [f"missing {path}" for path in missing] + [
        f"changed {path}" for path, text in wanted.items() if path not in missing and (root / path).read_text() != text]
