"""The channel pattern compiler of the `channels` server-API method (engine/glob.py)."""

from __future__ import annotations

import pytest

from centripy.engine.glob import compile_glob


@pytest.mark.parametrize(
    ("pattern", "name", "matches"),
    [
        ("*", "chat:index", True),
        ("chat:*", "chat:index", True),
        ("chat:*", "news:chat:x", False),
        ("*:index", "a:b:index", True),
        ("c?at", "chat", True),
        ("c?at", "cht", False),
        ("[a-c]hat", "chat", True),
        ("[a-c]hat", "dhat", False),
        ("[!a-c]hat", "dhat", True),
        ("[!a-c]hat", "chat", False),
        ("[xc]hat", "chat", True),
        ("{chat,news}:*", "news:1", True),
        ("{chat,news}:*", "user:1", False),
        ("a\\*b", "a*b", True),
        ("a\\*b", "axb", False),
        ("a.b", "axb", False),
        ("chat", "chat:index", False),
    ],
)
def test_glob(pattern: str, name: str, matches: bool) -> None:
    assert (compile_glob(pattern).fullmatch(name) is not None) is matches


@pytest.mark.parametrize("pattern", ["[abc", "a\\", "{a,b", "[]", "[z-a]"])
def test_bad_glob(pattern: str) -> None:
    with pytest.raises(ValueError):
        compile_glob(pattern)
