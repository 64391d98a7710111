"""The architecture stays as written in syncengine/__init__.py: layers, public surface."""

from __future__ import annotations

import ast
from pathlib import Path

import syncengine

PACKAGE = Path(syncengine.__file__).parent
CORE = {
    "errors",
    "clock",
    "cells",
    "codec",
    "merge",
    "protocol",
    "tiers",
    "regions",
    "resources",
    "config",
    "crashpoints",
    "steps",
}
SEAMS = {"migrations", "devservers", "scheduler", "service", "bundle", "tasks"}
LAYER = {
    **dict.fromkeys(CORE, 1),
    **dict.fromkeys(SEAMS, 2),
    "edge": 3,
    "hub": 3,
    "demo": 4,
    "cli": 4,
    "__main__": 4,
    "__init__": 4,
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "syncengine":
            found |= {a.name for a in node.names}  # from syncengine import crashpoints
        elif (
            isinstance(node, ast.ImportFrom)
            and node.module
            and node.module.startswith("syncengine.")
        ):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("syncengine.")}
    return found


def test_layers_import_only_downwards() -> None:
    violations = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE)
        top = rel.parts[0].removesuffix(".py")
        own = LAYER[top]
        for target in _imports(path):
            if LAYER[target] > own or (own == 3 and target in {"edge", "hub"} and target != top):
                violations.append(f"{rel} imports syncengine.{target}")
    assert not violations, violations


def test_every_module_is_placed_in_a_layer() -> None:
    tops = {
        p.relative_to(PACKAGE).parts[0].removesuffix(".py")
        for p in PACKAGE.glob("*")
        if p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").exists())
    }
    assert tops <= set(LAYER), tops - set(LAYER)


def test_public_surface_is_sorted_and_importable() -> None:
    assert syncengine.__all__ == sorted(syncengine.__all__)
    for name in syncengine.__all__:
        assert getattr(syncengine, name) is not None
