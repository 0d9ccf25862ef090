"""The documentation site (mkdocs.yml, docs/) builds with `mkdocs build --strict`, and the
facts its pages list by name are those of the code.

- The strict build fails on a broken link or anchor, or on a file included with `--8<--` (the
  tutorial includes examples/) that does not exist; a copy of the site with one broken link
  must fail, so the strictness is proven, not assumed.
- Keys that a page names between `<!-- warned-keys -->` markers (unsupported Centrifugo
  features) are warned or refused by centripy.config_reference.status, so the page cannot claim
  something is missing after it was implemented.
- The metric names on docs/metrics.md are the names the code exports, both ways.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from centripy.config_reference import status

ROOT = Path(__file__).resolve().parent.parent
MKDOCS = Path(sys.executable).with_name("mkdocs")
CODE_DIRS = ("engine", "actors", "storage", "transports", "centripy")


def build(config: Path, site_dir: Path) -> subprocess.CompletedProcess[str]:
    assert MKDOCS.is_file(), f"{MKDOCS} is missing: ./scripts/setup.sh installs the test extra"
    return subprocess.run(
        [str(MKDOCS), "build", "--strict", "-f", str(config), "--site-dir", str(site_dir)],
        cwd=config.parent,  # snippets are included relative to the repository root
        capture_output=True,
        text=True,
        timeout=300,
        env={"NO_MKDOCS_2_WARNING": "1", "PATH": str(MKDOCS.parent)},
    )


def test_the_site_builds_strictly(tmp_path: Path) -> None:
    result = build(ROOT / "mkdocs.yml", tmp_path / "site")
    assert result.returncode == 0, result.stderr
    site = tmp_path / "site"
    for page in ("index.html", "tutorial/index.html", "reference/configuration/index.html"):
        assert (site / page).is_file(), page
    tutorial = (site / "tutorial/index.html").read_text(encoding="utf-8")
    # the included example files are in the page, not the include markers
    assert "add_message" in tutorial and "--8&lt;--" not in tutorial and "--8<--" not in tutorial


def test_a_broken_link_fails_the_build(tmp_path: Path) -> None:
    copy = tmp_path / "repo"
    shutil.copytree(ROOT / "docs", copy / "docs")
    shutil.copytree(ROOT / "examples", copy / "examples", ignore=shutil.ignore_patterns("*.db*"))
    shutil.copy(ROOT / "mkdocs.yml", copy / "mkdocs.yml")
    index = copy / "docs" / "index.md"
    index.write_text(index.read_text() + "\n[gone](no-such-page.md)\n", encoding="utf-8")
    result = build(copy / "mkdocs.yml", tmp_path / "site")
    assert result.returncode != 0
    assert "no-such-page.md" in result.stderr


def warned_keys() -> list[tuple[str, str]]:
    region = re.compile(r"<!-- warned-keys.*?-->(.*?)<!-- /warned-keys -->", re.S)
    found = []
    for page in sorted((ROOT / "docs").glob("*.md")):
        for block in region.findall(page.read_text(encoding="utf-8")):
            for token in re.findall(r"`([^`]+)`", block):
                if re.fullmatch(r"[a-z][a-z0-9_]*\*?", token):
                    found.append((page.name, token.rstrip("*")))
    return found


def test_pages_name_unsupported_keys() -> None:
    keys = warned_keys()
    assert len(keys) >= 15
    assert {page for page, _ in keys} >= {"migration.md", "proxies.md"}


@pytest.mark.parametrize(("page", "key"), warned_keys())
def test_a_key_a_page_calls_unsupported_is_not_supported(page: str, key: str) -> None:
    state, _ = status(key)
    assert state in ("warned", "refused"), f"docs/{page} calls {key} unsupported, but it works"


def code_metric_names() -> set[str]:
    """Metric names in the code: string literals, f-string families expanded by hand."""
    literal = re.compile(r'"((?:centrifugo|centripy)_[a-z_]+)"')
    names: set[str] = set()
    for folder in CODE_DIRS:
        for path in (ROOT / folder).rglob("*.py"):
            names.update(literal.findall(path.read_text(encoding="utf-8")))
    # tables and prefixes, not metrics
    names -= {"centripy_broker_messages", "centripy_presence", "centrifugo_outbox"}
    names.discard("centrifugo_transport_messages_")
    for what in ("sent", "sent_size", "received", "received_size"):
        names.add(f"centrifugo_transport_messages_{what}")
    server = (ROOT / "centripy" / "server.py").read_text(encoding="utf-8")
    consumer_loop = r'for key in \(([^)]*)\):\s*\n.*\n.*\n\s*out\.append\(\(f"centripy_consumer_'
    keys = re.search(consumer_loop, server)
    assert keys, "the consumer counters' loop in centripy/server.py changed: update this test"
    for key in re.findall(r'"([a-z_]+)"', keys.group(1)):
        names.add(f"centripy_consumer_{key}_total")
    return names


def test_the_metrics_page_lists_the_exported_metrics() -> None:
    page = (ROOT / "docs" / "metrics.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"^\| `((?:centrifugo|centripy)_[a-z_]+)` \|", page, re.M))
    exported = code_metric_names()
    assert len(exported) >= 35
    assert exported - documented == set(), "exported but not on docs/metrics.md"
    assert documented - exported == set(), "on docs/metrics.md but not exported"
