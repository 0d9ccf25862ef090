"""The layers install under one namespace: `centripy.engine`, `centripy.actors`,
`centripy.transports`, `centripy.storage`; nothing imports them by a top-level name."""

from __future__ import annotations

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
