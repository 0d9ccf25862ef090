"""Counters and gauges in Prometheus text format (no client library needed).

One `Metrics` object per node, passed in (no process-wide registry). Counters are
incremented on the loop; `render()` also calls the registered gauge callbacks, so values
such as the number of clients are read at scrape time rather than kept in sync.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

Labels = tuple[tuple[str, str], ...]
Sample = tuple[Labels, float]


@dataclass
class _Family:
    name: str
    kind: str  # "counter" | "gauge"
    help: str
    values: dict[Labels, float] = field(default_factory=dict)


class Metrics:
    def __init__(self) -> None:
        self._families: dict[str, _Family] = {}
        self._collectors: list[Callable[[], Iterable[tuple[str, str, Labels, float]]]] = []

    def _family(self, name: str, kind: str, help_text: str) -> _Family:
        family = self._families.get(name)
        if family is None:
            family = self._families[name] = _Family(name, kind, help_text)
        return family

    def inc(self, name: str, help_text: str = "", amount: float = 1.0, **labels: str) -> None:
        """Add `amount` to the counter `name` with `labels`."""
        values = self._family(name, "counter", help_text).values
        key = tuple(sorted(labels.items()))
        values[key] = values.get(key, 0.0) + amount

    def set(self, name: str, value: float, help_text: str = "", **labels: str) -> None:
        self._family(name, "gauge", help_text).values[tuple(sorted(labels.items()))] = value

    def collector(self, func: Callable[[], Iterable[tuple[str, str, Labels, float]]]) -> None:
        """Register a callback yielding (name, kind, labels, value) at every render."""
        self._collectors.append(func)

    def value(self, name: str, **labels: str) -> float:
        family = self._families.get(name)
        if family is None:
            return 0.0
        return family.values.get(tuple(sorted(labels.items())), 0.0)

    def render(self) -> bytes:
        for collect in self._collectors:
            for name, kind, labels, value in collect():
                self._family(name, kind, "").values[labels] = value
        lines: list[str] = []
        for family in sorted(self._families.values(), key=lambda f: f.name):
            if family.help:
                lines.append(f"# HELP {family.name} {family.help}")
            lines.append(f"# TYPE {family.name} {family.kind}")
            for labels, value in sorted(family.values.items()):
                lines.append(f"{family.name}{_labels(labels)} {_number(value)}")
        return ("\n".join(lines) + "\n").encode()


def _labels(labels: Labels) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
    return "{" + inner + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    return str(int(value)) if value == int(value) else repr(value)
