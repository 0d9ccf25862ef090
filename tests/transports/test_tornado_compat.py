"""`tornado_compat`: the one module touching Tornado internals, checked at import."""

from __future__ import annotations

import importlib
import socket
import subprocess
from pathlib import Path

import pytest
import tornado.iostream

from centripy.transports import tornado_compat

ROOT = Path(__file__).resolve().parents[2]
LAYERS = ("transports", "actors", "engine", "storage", "centripy")


def test_websocket_mask() -> None:
    assert tornado_compat.websocket_mask(b"\x01\x02\x03\x04", b"\x00" * 6) == bytes(
        [1, 2, 3, 4, 1, 2]
    )


async def test_unread() -> None:
    left, right = socket.socketpair()
    stream = tornado.iostream.IOStream(left)
    right.sendall(b"HEAD\r\n\r\nrest")
    assert await stream.read_until(b"\r\n\r\n") == b"HEAD\r\n\r\n"
    tornado_compat.unread(stream, b"HEAD\r\n\r\n")
    assert await stream.read_until(b"\r\n\r\n") == b"HEAD\r\n\r\n"
    assert await stream.read_bytes(4) == b"rest"
    stream.close()
    right.close()


def test_import_fails_clearly_without_the_internals(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(tornado.util, "_websocket_mask")
    with pytest.raises(ImportError, match=r"Tornado 6\.\d+.*_websocket_mask"):
        importlib.reload(tornado_compat)
    monkeypatch.undo()
    importlib.reload(tornado_compat)


def test_no_other_module_touches_tornado_internals() -> None:
    found = subprocess.run(
        ["grep", "-rlE", "--include=*.py", r"\._read_buffer|_websocket_mask", *LAYERS],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    ).stdout.split()
    assert found == ["transports/tornado_compat.py"]
