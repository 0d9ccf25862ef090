"""The layers install under one namespace: `centripy.engine`, `centripy.actors`,
`centripy.transports`, `centripy.storage`; nothing imports them by a top-level name."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ("engine", "actors", "transports", "storage")


def test_the_server_imports_only_namespaced_modules(tmp_path: Path) -> None:
    """Run outside the checkout (its folders are not on sys.path there): the whole server
    imports, and no top-level `engine`/`actors`/... module is loaded or importable."""
    script = (
        "import importlib.util, sys\n"
        "import centripy.server, centripy.cli\n"
        "import centripy.engine.protocol.protobuf_codec\n"
        f"layers = {LAYERS!r}\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in layers))\n"
        "print([n for n in layers if importlib.util.find_spec(n) is not None])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert out == ["[]", "[]"]


def test_no_source_file_imports_a_layer_by_its_top_level_name() -> None:
    offenders = []
    for folder in (*LAYERS, "tests", "bench", "examples"):
        for path in (ROOT / folder).rglob("*.py"):
            if ".venv" in path.parts or "node_modules" in path.parts:
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                words = line.split()
                top = words[1].split(".")[0] if len(words) >= 2 else ""
                if words[0:1] in (["from"], ["import"]) and top in LAYERS:
                    offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert offenders == []


# What each layer may import from the `centripy` namespace: dependencies point inwards only
# (docs/design/ARCHITECTURE.md, "Layout"); the engine owns the contracts storage implements.
ALLOWED_IMPORTS = {
    "engine": ("centripy.engine",),
    "storage": ("centripy.engine", "centripy.storage"),
    "actors": ("centripy.engine", "centripy.actors"),
}


def _imported_modules(path: Path, package: str) -> list[tuple[int, str]]:
    """Every module `path` imports (module level, in functions, under TYPE_CHECKING, and
    literal `importlib.import_module(...)` names), relative imports made absolute."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute | ast.Name)
            and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append((node.lineno, node.args[0].value))
    return found


def _layer_offenders(layer: str) -> list[str]:
    allowed = ALLOWED_IMPORTS[layer]
    offenders = []
    for path in sorted((ROOT / layer).rglob("*.py")):
        rel = path.relative_to(ROOT)
        package = ".".join(("centripy", *rel.parent.parts))
        for line, module in _imported_modules(path, package):
            inside = module == "centripy" or module.startswith("centripy.")
            if inside and not any(module == a or module.startswith(a + ".") for a in allowed):
                offenders.append(f"{rel}:{line}: {module}")
    return offenders


def test_engine_imports_no_outer_layer() -> None:
    """No module under engine/ imports centripy.storage, .actors, .transports or the
    composition root: the contracts the engine needs live in engine/contracts.py."""
    assert _layer_offenders("engine") == []


def test_storage_imports_only_the_engine() -> None:
    """Storage back ends implement the engine's contracts and import nothing outward."""
    assert _layer_offenders("storage") == []


def test_actors_import_only_the_engine() -> None:
    assert _layer_offenders("actors") == []


def test_the_layer_check_sees_every_kind_of_import(tmp_path: Path) -> None:
    source = (
        "import centripy.storage.sql\n"
        "from centripy.actors import hub\n"
        "from ..transports import websocket\n"
        "def f():\n"
        "    from centripy.storage.memory import MemoryEventLog\n"
        "    importlib.import_module('centripy.transports.server')\n"
    )
    path = tmp_path / "m.py"
    path.write_text(source)
    modules = {m for _, m in _imported_modules(path, "centripy.engine")}
    assert {
        "centripy.storage.sql",
        "centripy.actors",
        "centripy.transports.websocket",
        "centripy.storage.memory",
        "centripy.transports.server",
    } <= modules
