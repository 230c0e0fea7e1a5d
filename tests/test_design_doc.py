"""docs/design.md stays true to the tree: every path its op-family tables (§7) name exists, and every
"docs/design.md §N" citation in the code names a section the document has."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DESIGN = ROOT / "docs" / "design.md"
CITING = ["fastelbo", "kernels", "csrc", "tests", "bench", "docs", "examples", "README.md"]
SUFFIXES = {".py", ".h", ".cpp", ".cu", ".md", ".sh", ".json"}

# A cited path: `dir/.../name.ext` in backticks.
_PATH = re.compile(r"`([A-Za-z0-9_./-]+/[A-Za-z0-9_.-]+)`")


def _sections() -> dict[int, str]:
    """{N: the text of section N} of docs/design.md (headings "## N. Title")."""
    parts = re.split(r"^## (\d+)\. .*$", DESIGN.read_text(), flags=re.MULTILINE)
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


def _citations():
    cite = re.compile(r"design\.md[^\n§]{0,4}(§\s?\d+(?:\s?[,-]\s?§?\s?\d+)*)")
    for top in CITING:
        base = ROOT / top
        files = [base] if base.is_file() else [p for p in base.rglob("*") if p.suffix in SUFFIXES | {".txt"}]
        for f in files:
            for n, line in enumerate(f.read_text(errors="replace").splitlines(), 1):
                for m in cite.finditer(line):
                    for sec in re.findall(r"\d+", m.group(1)):
                        yield f"{f.relative_to(ROOT)}:{n}", int(sec)


def test_citations_name_real_sections():
    sections = _sections()
    cited = list(_citations())
    assert len(cited) >= 20  # the code does cite it; a broken pattern would find none
    missing = [(where, sec) for where, sec in cited if sec not in sections]
    assert not missing, f"citations of sections docs/design.md does not have: {missing}"


def test_no_citation_of_outside_documents():
    outside = re.compile(r"DESIGN §|DESIGN\.md|PERF-NOTES|CONVENTIONS\.md|\.\./shared|/work/shared")
    hits = []
    for top in CITING:
        base = ROOT / top
        files = [base] if base.is_file() else [p for p in base.rglob("*") if p.suffix in SUFFIXES]
        for f in files:
            if f.resolve() == Path(__file__).resolve():
                continue
            for n, line in enumerate(f.read_text(errors="replace").splitlines(), 1):
                if outside.search(line):
                    hits.append(f"{f.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not hits, "references to documents outside the repository:\n" + "\n".join(hits)
