"""Every `*.md` document that a comment or docstring of the code refers to is in the repository.

The source and the tests cite the team's design and spec documents (`docs/spec/protocol.md 4.4`,
`docs/design/ARCHITECTURE.md decision 2`). A reference is written as a path from the repository
root; this test reads the comments (tokenize) and docstrings (ast) of every `.py` file in the tree,
and checks that each referenced file exists and that each cited section number is a heading of
that document (a cited decision of docs/design/ARCHITECTURE.md is one of its numbered ones)."""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SKIP_DIRS = {".venv", "node_modules", ".git", "build", "dist", "__pycache__"}

# A document reference: a path ending in `.md`, optionally followed by the sections it cites
# ("4.4", "section 6", "sections 1, 2 and 8", "1.1-1.3", "decision 2").
NUMBER = r"\d+(?:\.\d+)*"
REFERENCE = re.compile(
    rf"(?P<path>[A-Za-z0-9_./-]*[A-Za-z0-9_-]\.md)\b"
    rf"(?:[ \t\n]+(?:(?:sections?|§|decisions?)[ \t\n]*)?"
    rf"(?P<sections>{NUMBER}(?:[ \t\n]*(?:,|and|-|\u2013)[ \t\n]*{NUMBER})*))?"
)


def python_files() -> list[Path]:
    files = []
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT).parts
        if any(part in SKIP_DIRS or part.endswith(".egg-info") for part in parts[:-1]):
            continue
        files.append(path)
    return sorted(files)


def comments_and_docstrings(source: str) -> list[str]:
    """The comment texts (consecutive comment lines joined) and the docstrings of a module."""
    texts: list[str] = []
    block: list[str] = []
    last_row = -2
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            text = token.string.lstrip("#").strip()
            if token.start[0] == last_row + 1 and block:
                block.append(text)
            else:
                if block:
                    texts.append("\n".join(block))
                block = [text]
            last_row = token.start[0]
    if block:
        texts.append("\n".join(block))
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                texts.append(doc)
    return texts


def references(text: str) -> list[tuple[str, list[str]]]:
    found = []
    for match in REFERENCE.finditer(text):
        sections = re.findall(NUMBER, match.group("sections") or "")
        found.append((match.group("path"), sections))
    return found


def all_references() -> list[tuple[str, str, list[str]]]:
    """(file that cites, referenced path, cited sections) for the whole tree."""
    cited = []
    for path in python_files():
        source = path.read_text(encoding="utf-8")
        for text in comments_and_docstrings(source):
            for ref, sections in references(text):
                cited.append((str(path.relative_to(ROOT)), ref, sections))
    return cited


def section_exists(document: str, section: str) -> bool:
    """`section` is a heading number ("## 4.", "### 4.4 ...") or a numbered list item
    ("2. **...") of the document."""
    number = re.escape(section)
    heading = re.compile(rf"^#+[ \t]+{number}(?:\.|[ \t])", re.MULTILINE)
    item = re.compile(rf"^{number}\.[ \t]", re.MULTILINE)
    return bool(heading.search(document) or item.search(document))


REFS = all_references()


def test_the_scanner_sees_the_references_of_the_tree() -> None:
    # The code cites the spec in dozens of places; a scanner that finds none proves nothing.
    assert len(REFS) >= 30
    assert any(ref == "docs/spec/protocol.md" and sections for _, ref, sections in REFS)
    assert any(ref == "docs/design/ARCHITECTURE.md" for _, ref, _ in REFS)


def test_the_scanner_parses_paths_and_sections() -> None:
    text = (
        "see docs/spec/protocol.md 4.4, 5.2 and 8 (traps 10-11); docs/spec/server_api.md\n"
        "sections 1.1-1.3. Also docs/design/ARCHITECTURE.md decision 2 and `README.md`."
    )
    assert references(text) == [
        ("docs/spec/protocol.md", ["4.4", "5.2", "8"]),
        ("docs/spec/server_api.md", ["1.1", "1.3"]),
        ("docs/design/ARCHITECTURE.md", ["2"]),
        ("README.md", []),
    ]
    source = '"""Module doc: docs/x.md 1."""\n# a comment on\n# two lines: docs/y.md\nX = "no.md"\n'
    assert [references(t) for t in comments_and_docstrings(source)] == [
        [("docs/y.md", [])],
        [("docs/x.md", ["1"])],
    ]

    protocol = (ROOT / "docs/spec/protocol.md").read_text(encoding="utf-8")
    assert section_exists(protocol, "4.4") and section_exists(protocol, "8")
    assert not section_exists(protocol, "4.9") and not section_exists(protocol, "4.4.1")
    architecture = (ROOT / "docs/design/ARCHITECTURE.md").read_text(encoding="utf-8")
    assert section_exists(architecture, "2") and not section_exists(architecture, "9")


@pytest.mark.parametrize(
    ("citing", "ref", "sections"),
    REFS,
    ids=[f"{citing}->{ref}" for citing, ref, _ in REFS],
)
def test_referenced_document_and_sections_exist(citing: str, ref: str, sections: list[str]) -> None:
    target = ROOT / ref
    assert target.is_file(), f"{citing} cites {ref}, which is not a file of the repository"
    document = target.read_text(encoding="utf-8")
    missing = [s for s in sections if not section_exists(document, s)]
    assert not missing, f"{citing} cites {ref} sections {missing}, which it does not have"
