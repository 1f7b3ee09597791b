"""The package layering of DESIGN.md, checked on the source: every import statement, also the
ones inside functions, so a lazy import cannot hide a dependency."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "editd"

# package → imports it must never make (a prefix matches the module and its submodules).
FORBIDDEN = {
    "editing": (
        "kafka",
        "fastapi",
        "httpx",
        "uvicorn",
        "editd.world",
        "editd.store",
        "editd.consumers",
        "editd.daemon",
        "editd.versions",
    ),
    # No torch, directly or through a module of ours that needs it.
    "consumers": (
        "torch",
        "transformers",
        "editd.editing",
        "editd.lowrank",
        "editd.store.store",
        "editd.versions",
        "editd.daemon",
    ),
    "store": ("kafka", "editd.daemon", "editd.consumers", "editd.editing", "editd.versions"),
    # The daemon is called by the CLI, never the other way round.
    "daemon": ("editd.cli", "editd.checkpoints", "editd.models.cli", "editd.bench"),
}


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
            out += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return out


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_respect_the_layering(package: str) -> None:
    found = []
    for path in sorted((PACKAGE / package).rglob("*.py")):
        for line, module in _imports(path):
            for banned in FORBIDDEN[package]:
                if module == banned or module.startswith(banned + "."):
                    found.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {module}")
    assert not found, "\n".join(found)


def test_the_update_type_and_formula_live_in_one_leaf_module() -> None:
    # lowrank may name the gated form's parts (editd.memory), itself a leaf.
    leaf = [m for _, m in _imports(PACKAGE / "lowrank.py") if m.startswith("editd")]
    assert {m.rsplit(".", 1)[0] if m.count(".") > 1 else m for m in leaf} <= {"editd.memory"}
    assert [m for _, m in _imports(PACKAGE / "memory.py") if m.startswith("editd")] == []
