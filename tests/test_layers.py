"""The package's layers import only downwards: foundation < engine < inference < operations < cli."""

import ast
from pathlib import Path

import pytest

from .conftest import ROOT

pytestmark = pytest.mark.unit

PACKAGE = ROOT / "src" / "lifelong_hashing"
RANK = {"config": 0, "files": 0, "__init__": 0, "engine": 1, "inference": 2, "operations": 3, "cli": 4}


def layer(module: str) -> str:
    """``lifelong_hashing.engine.batch`` → ``engine``; ``lifelong_hashing`` → ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imported_modules(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lifelong_hashing"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("lifelong_hashing")}
    return found


def test_no_module_imports_from_a_layer_above_its_own():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        own = layer(".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts))
        for module in imported_modules(path):
            if RANK[layer(module)] > RANK[own]:
                upward.append(f"{path.relative_to(ROOT)} ({own}) imports {module}")
    assert not upward, "\n".join(upward)


def test_every_module_sits_in_a_known_layer():
    assert {layer(".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts)) for p in PACKAGE.rglob("*.py")} \
        <= set(RANK)


def test_every_file_the_package_writes_goes_through_files_py():
    """Records, arrays and reports are written atomically (``files.py``): no ``write_text``,
    ``write_bytes`` or ``json.dump`` anywhere else, so a crash never leaves half a file."""
    plain = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "files.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and (
                    node.func.attr in ("write_text", "write_bytes")
                    or (node.func.attr == "dump" and getattr(node.func.value, "id", "") == "json")):
                plain.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.func.attr}")
    assert not plain, "\n".join(plain)


def test_nothing_imports_evidently_legacy_or_private_modules():
    """Evidently's custom metrics and widgets come from its public API; ``evidently.legacy`` may
    go in its next major release."""
    found = []
    for path in sorted([*PACKAGE.rglob("*.py"), *(ROOT / "flows").glob("*.py"), *(ROOT / "bench").glob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([node.module] if isinstance(node, ast.ImportFrom) and node.module else
                     [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            found += [f"{path.relative_to(ROOT)}: {n}" for n in names
                      if n.startswith(("evidently.legacy", "evidently._"))]
    assert not found, "\n".join(found)
