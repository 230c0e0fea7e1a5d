"""docs/design.md stays true to the tree: every path its op-family tables (§7) name exists, and every
"docs/design.md §N" citation in the code names a section the document has."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "design.md"
CITING = ["fastelbo", "kernels", "csrc", "tests", "bench", "docs", "examples", "README.md"]
SUFFIXES = {".py", ".h", ".cpp", ".cu", ".md", ".sh", ".json"}

# A cited path: `dir/.../name.ext` in backticks.
_PATH = re.compile(r"`([A-Za-z0-9_./-]+/[A-Za-z0-9_.-]+)`")


def _sections() -> dict[int, str]:
    """{N: the text of section N} of docs/design.md (headings "## N. Title")."""
    parts = re.split(r"^## (\d+)\. .*$", DOC.read_text(), flags=re.MULTILINE)
    return {int(n): body for n, body in zip(parts[1::2], parts[2::2])}


def _family_paths() -> list[str]:
    return sorted(set(_PATH.findall(_sections()[7])))


def test_family_tables_name_paths():
    # The check below must have something to check: one table per family, each naming its kernels.
    paths = _family_paths()
    for kernel in ["csrc/cpu/kl.cpp", "csrc/cuda/iwae.cu", "kernels/free_bits.py", "kernels/loglik.py"]:
        assert kernel in paths
    assert len(paths) >= 30


@pytest.mark.parametrize("path", _family_paths())
def test_family_table_path_exists(path):
    assert Path(path).suffix in SUFFIXES, f"{path}: not a file path"
    assert (ROOT / path).is_file(), f"docs/design.md §7 names {path}, which is not in the repository"


def _lines(suffixes=SUFFIXES):
    """("path:line", text) of every file the repository's citations can live in."""
    for top in CITING:
        base = ROOT / top
        files = [base] if base.is_file() else [p for p in base.rglob("*") if p.suffix in suffixes]
        for f in files:
            for n, line in enumerate(f.read_text(errors="replace").splitlines(), 1):
                yield f"{f.relative_to(ROOT)}:{n}", line


def _citations():
    cite = re.compile(r"design\.md[^\n§]{0,4}(§\s?\d+(?:\s?[,-]\s?§?\s?\d+)*)")
    for where, line in _lines(SUFFIXES | {".txt"}):
        for m in cite.finditer(line):
            for sec in re.findall(r"\d+", m.group(1)):
                yield where, int(sec)


def test_citations_name_real_sections():
    sections = _sections()
    cited = list(_citations())
    assert len(cited) >= 20  # the code does cite it; a broken pattern would find none
    missing = [(where, sec) for where, sec in cited if sec not in sections]
    assert not missing, f"citations of sections docs/design.md does not have: {missing}"


def test_no_citation_of_outside_documents():
    """The repository stands alone: every markdown document a file names is one of the repository's, and
    every section citation ("<doc> §N") cites docs/design.md."""
    ours = {p.name for p in ROOT.rglob("*.md") if ".git" not in p.parts and ".venv" not in p.parts}
    ours.add("report.md")  # written by the GPU check (bench/gpucheck/report.py), not a document it cites
    named = re.compile(r"(?<![\w-])([A-Za-z][\w-]*\.md)\b")
    section = re.compile(r"([\w./-]+\.md|\b[A-Z][A-Z-]{2,})\s?§\s?\d")  # "<doc>.md §N", "<DOC> §N"
    climb = re.compile(r"(?<![\w.])((?:\.\./)+[\w.-]+)")  # a relative path must stay inside the repository
    hits = []
    for where, line in _lines():
        hits += [f"{where}: {doc}" for doc in named.findall(line) if doc not in ours]
        here = (ROOT / where.rsplit(":", 1)[0]).parent
        hits += [f"{where}: {rel}" for rel in climb.findall(line) if ROOT not in (here / rel).resolve().parents]
        hits += [f"{where}: {doc}" for doc in re.findall(r"(?<![\w.~])/(?:[\w.-]+/)+[\w.-]+\.md\b", line)]
        hits += [f"{where}: {doc} §" for doc in section.findall(line) if not doc.endswith("design.md")]
    assert not hits, "references to documents outside the repository:\n" + "\n".join(hits)
