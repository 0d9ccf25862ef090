"""Channel patterns of the `channels` server-API method: Centrifugo's gobwas/glob syntax
without separators, compiled to a regular expression (cached). Pure.
"""

from __future__ import annotations

import functools
import re


@functools.lru_cache(maxsize=256)
def compile_glob(pattern: str) -> re.Pattern[str]:
    """`*` any run, `?` one char, `[abc]`/`[a-z]`/`[!..]` a class, `{a,b}` alternatives,
    `\\x` a literal; matched against the whole name. ValueError on a malformed pattern."""
    out: list[str] = []
    depth, i = 0, 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            if i + 1 == len(pattern):
                raise ValueError("pattern ends with an escape")
            out.append(re.escape(pattern[i + 1]))
            i += 2
            continue
        if c == "[":
            cls, i = _glob_class(pattern, i + 1)
            out.append(cls)
            continue
        if c == "{":
            depth += 1
            out.append("(?:")
        elif c == "}" and depth:
            depth -= 1
            out.append(")")
        elif c == "," and depth:
            out.append("|")
        else:
            out.append({"*": ".*", "?": "."}.get(c) or re.escape(c))
        i += 1
    if depth:
        raise ValueError("unclosed '{' in pattern")
    try:
        return re.compile("".join(out), re.DOTALL)
    except re.error as exc:
        raise ValueError(f"bad pattern: {exc}") from exc


def _glob_class(pattern: str, i: int) -> tuple[str, int]:
    """Translate the class starting after `[`; returns (regex, index after `]`)."""
    negate = i < len(pattern) and pattern[i] == "!"
    i += negate
    parts: list[str] = []
    while i < len(pattern) and pattern[i] != "]":
        lo = pattern[i]
        if i + 2 < len(pattern) and pattern[i + 1] == "-" and pattern[i + 2] != "]":
            if pattern[i + 2] < lo:
                raise ValueError("reversed range in pattern")
            parts.append(f"{re.escape(lo)}-{re.escape(pattern[i + 2])}")
            i += 3
        else:
            parts.append(re.escape(lo))
            i += 1
    if i >= len(pattern) or not parts:
        raise ValueError("unclosed or empty '[' in pattern")
    return ("[^" if negate else "[") + "".join(parts) + "]", i + 1
