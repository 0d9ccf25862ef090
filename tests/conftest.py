"""Shared test configuration: the repository root is importable (so `tests.support` works
whichever way pytest is started) and the session-scoped Tansu broker fixture is available to
every test."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.support.services import tansu_broker  # noqa: E402

__all__ = ["tansu_broker"]
