"""The package layering of docs/design.md ("Layering"), checked on the source: every import
statement, also the ones inside functions, so a lazy import cannot hide a dependency.

A unit is a package under editd/ or a top-level module. `ALLOWED` lists, for every unit, the
units it may import; the table is acyclic, every import in the tree is in it, and so the
imports between units form no circle. Inside a unit the modules form no circle either (checked
on the modules themselves). `FORBIDDEN` adds what a unit must not import even indirectly
through a unit it may use (a library, or one module of an allowed unit).
"""

from __future__ import annotations

import ast
import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "editd"

# unit → the units it may import, lowest layer first. docs/design.md has the same table.
ALLOWED: dict[str, frozenset[str]] = {
    name: frozenset(deps)
    for name, deps in {
        # Leaves: no editd import at all.
        "editd": (),  # the package's __init__: only its version
        "exitcodes": (),
        "durable": (),
        "config": (),
        "memory": (),  # the gated form's parts
        "lowrank": ("memory",),  # the update type and the served-weight formula
        "facts": ("config",),
        # The parts, each testable alone.
        "store": ("durable", "lowrank", "memory"),
        "editing": ("config", "durable", "facts", "lowrank", "memory"),
        "world": ("config", "facts"),
        # The evaluator, policy and metrics import neither torch nor editing; quality.py
        # measures a loaded model through editing's scoring (MODULE_FORBIDDEN).
        "monitoring": ("config", "durable", "editing", "facts", "world"),
        "consumers": ("config", "durable", "exitcodes", "facts", "store"),
        # The one owner of what is served.
        "versions": ("editing", "facts", "lowrank", "memory", "store"),
        # Models: naming, fetching, C0's text and the factory from settings to objects.
        "models": ("config", "durable", "editing", "exitcodes", "world"),
        # Wiring and tools.
        "daemon": (
            "config",
            "consumers",
            "durable",
            "editd",  # its version, in /v1/status
            "editing",
            "exitcodes",
            "facts",
            "lowrank",
            "memory",
            "models",
            "monitoring",
            "store",
            "versions",
            "world",
        ),
        "bench": (
            "config",
            "consumers",
            # Its generator only: `editd bench serve` times what the HTTP server runs.
            "daemon",
            "editing",
            "exitcodes",
            "facts",
            "memory",
            "models",
            "monitoring",
            "versions",
            "world",
        ),
        "export": (
            "config",
            "durable",
            "editing",
            "exitcodes",
            "lowrank",
            "models",
            "monitoring",
            "store",
        ),
        "version_commands": ("config", "consumers", "daemon", "durable", "exitcodes", "store"),
        # The CLI names each handler as a "module:function" string and imports it only when
        # the command runs (`cli.resolve`), so its static imports stay light.
        "cli": ("config", "exitcodes"),
        "__main__": ("cli",),
    }.items()
}

# unit → imports it must never make (a prefix matches the module and its submodules).
FORBIDDEN = {
    "editing": ("kafka", "fastapi", "httpx", "uvicorn", "prometheus_client"),
    # No torch, directly or through a module of ours that needs it: of store/, the outbox,
    # the version record and the store's identity are torch-free; the store and the wire
    # format are not.
    "consumers": ("torch", "transformers", "safetensors", "editd.store.store", "editd.store.wire"),
    "store": ("kafka", "fastapi", "httpx", "uvicorn"),
    # The daemon is called by the CLI, never the other way round.
    "daemon": ("editd.models.cli",),
    # The evaluator judges scores it is handed; Kafka and HTTP are the daemon's.
    "monitoring": ("kafka", "fastapi", "httpx", "uvicorn", "torch", "transformers"),
    "models": ("kafka", "fastapi", "httpx", "uvicorn", "prometheus_client"),
    "world": ("kafka", "fastapi", "httpx", "uvicorn", "prometheus_client"),
    "versions": ("kafka", "fastapi", "httpx", "uvicorn", "prometheus_client"),
    "lowrank": ("kafka", "fastapi", "httpx", "uvicorn", "prometheus_client"),
    "memory": ("kafka", "fastapi", "httpx", "uvicorn", "prometheus_client"),
}

# module → imports it must never make, where one module of a unit is held to more than its unit.
_TORCH_FREE = ("torch", "transformers", "editd.editing", "editd.world", "editd.monitoring.quality")
MODULE_FORBIDDEN = {
    # The evaluator judges scores it is handed (docs/design.md, "Layering").
    "editd.monitoring.evaluator": _TORCH_FREE,
    "editd.monitoring.policy": _TORCH_FREE,
    "editd.monitoring.metrics": _TORCH_FREE,
    "editd.monitoring.canary": _TORCH_FREE,
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _unit(module: str) -> str:
    """`editd.store.outbox` → `store`; `editd.config` → `config`; `editd` → `editd`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in the file; `from a import b` names `a.b` when that is
    a module of ours, else `a`, and a relative import is resolved against the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    here = _module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            for alias in node.names:
                full = f"{base}.{alias.name}"
                out.append((node.lineno, full if full in MODULES else base))
    return list(dict.fromkeys(out))


def _edges() -> Iterator[tuple[str, str, str]]:
    """(unit, imported unit, where) for every import of one unit by another."""
    for module, path in MODULES.items():
        for line, name in _imports(path):
            if name == "editd" or name.startswith("editd."):
                src, dst = _unit(module), _unit(name)
                if src != dst:
                    yield src, dst, f"{path.relative_to(PACKAGE.parent)}:{line} imports {name}"


def _cycle(graph: dict[str, frozenset[str]]) -> list[str]:
    """One circle of `graph` (a path that returns to its start), or [] when there is none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return []


def test_every_unit_has_a_row_in_the_table() -> None:
    units = {_unit(m) for m in MODULES}
    assert units == set(ALLOWED), (
        f"missing rows: {sorted(units - set(ALLOWED))}; rows for nothing: "
        f"{sorted(set(ALLOWED) - units)}"
    )


def test_the_table_allows_no_circle() -> None:
    assert _cycle(ALLOWED) == []


def test_every_import_between_units_is_allowed() -> None:
    found = [where for src, dst, where in _edges() if dst not in ALLOWED[src]]
    assert not found, "\n".join(found)


def test_no_import_circle_between_units() -> None:
    graph: dict[str, set[str]] = {}
    where: dict[tuple[str, str], str] = {}
    for src, dst, at in _edges():
        graph.setdefault(src, set()).add(dst)
        where.setdefault((src, dst), at)
    circle = _cycle({k: frozenset(v) for k, v in graph.items()})
    steps = [where[a, b] for a, b in itertools.pairwise(circle)]
    assert not circle, " → ".join(circle) + "\n" + "\n".join(steps)


@pytest.mark.parametrize("unit", sorted(FORBIDDEN))
def test_unit_imports_respect_the_layering(unit: str) -> None:
    found = []
    for module, path in MODULES.items():
        if _unit(module) != unit:
            continue
        for line, name in _imports(path):
            for banned in FORBIDDEN[unit]:
                if name == banned or name.startswith(banned + "."):
                    found.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {name}")
    assert not found, "\n".join(found)


def _module_edges() -> dict[str, frozenset[str]]:
    """module → the modules of ours it imports, lazily or not (a package's __init__ too)."""
    return {
        module: frozenset(n for _, n in _imports(path) if n in MODULES and n != module)
        for module, path in MODULES.items()
    }


def test_no_import_circle_between_modules() -> None:
    # Between units the table rules circles out; inside one only this does: a lazy import
    # hides a circle from Python at start-up, not from the reader, who must know both ends
    # to change either (daemon/main.py and daemon/replica.py were one).
    graph = _module_edges()
    circle = _cycle(graph)
    assert not circle, " → ".join(circle)


@pytest.mark.parametrize("module", sorted(MODULE_FORBIDDEN))
def test_module_imports_respect_the_layering(module: str) -> None:
    found = [
        f"{MODULES[module].relative_to(PACKAGE.parent)}:{line} imports {name}"
        for line, name in _imports(MODULES[module])
        for banned in MODULE_FORBIDDEN[module]
        if name == banned or name.startswith(banned + ".")
    ]
    assert not found, "\n".join(found)


def test_the_cycle_finder_finds_a_circle() -> None:
    # The acyclicity tests pass vacuously if the finder never finds anything.
    graph = {"a": frozenset({"b"}), "b": frozenset({"c"}), "c": frozenset({"a"})}
    assert _cycle(graph) == ["a", "b", "c", "a"]
    assert _cycle({"a": frozenset({"b"}), "b": frozenset()}) == []


def test_the_update_type_and_formula_live_in_one_leaf_module() -> None:
    # lowrank may name the gated form's parts (editd.memory), itself a leaf.
    ours = {n for _, n in _imports(PACKAGE / "lowrank.py") if n.startswith("editd")}
    assert ours <= {"editd.memory"}
    assert [n for _, n in _imports(PACKAGE / "memory.py") if n.startswith("editd")] == []
