"""The project stands alone: no file points at theory notes outside the repository, and every
`docs/theory.md §N` cited anywhere names a section that docs/theory.md has."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCANNED = ("trajlab", "tests", "examples", "analyses", "benchmarks", "docs")
# spelled in pieces so that this file does not match itself
FORBIDDEN = ("THEORY" + ".md", "FACTS" + ".md", ".." + "/shared", "/work" + "/shared")
SKIP_DIRS = {"__pycache__", ".ipynb_checkpoints"}
SKIP_SUFFIXES = {".pyc", ".pyo", ".so", ".png", ".jpg", ".jpeg", ".gif", ".pt", ".safetensors", ".npz", ".npy",
                 ".nc", ".zarr", ".pdf"}
THEORY = REPO / "docs" / "theory.md"
SECTION_HEADING = re.compile(r"^#{2,4} §(\d+(?:\.\d+)*)\s", re.M)
CITATION = re.compile(r"docs/theory\.md([^\n]*)")
SECTION_REF = re.compile(r"§(\d+(?:\.\d+)*)")


def _files():
    """Text files under the scanned folders plus README.md, this test excluded."""
    me = Path(__file__).resolve()
    out = [REPO / "README.md"]
    for top in SCANNED:
        for f in sorted((REPO / top).rglob("*")):
            if (f.is_file() and f.resolve() != me and not SKIP_DIRS & set(f.relative_to(REPO).parts)
                    and f.suffix.lower() not in SKIP_SUFFIXES):
                out.append(f)
    return [f for f in out if f.is_file()]


def _text(f: Path) -> str:
    return f.read_bytes().decode("utf-8", errors="ignore")


def test_no_reference_to_notes_outside_the_repository():
    hits = []
    for f in _files():
        for n, line in enumerate(_text(f).splitlines(), 1):
            for bad in FORBIDDEN:
                if bad in line:
                    hits.append(f"{f.relative_to(REPO)}:{n}: {bad}")
    assert not hits, "references to files users do not have:\n" + "\n".join(hits)


def test_theory_doc_exists_with_numbered_sections():
    assert THEORY.is_file(), "docs/theory.md is missing"
    sections = set(SECTION_HEADING.findall(_text(THEORY)))
    assert {str(i) for i in range(1, 13)} <= sections, sorted(sections)


def test_every_cited_section_exists():
    sections = set(SECTION_HEADING.findall(_text(THEORY)))
    bad, n_cited = [], 0
    for f in _files():
        if f.resolve() == THEORY.resolve():
            continue
        for n, line in enumerate(_text(f).splitlines(), 1):
            for tail in CITATION.findall(line):
                for ref in SECTION_REF.findall(tail):
                    n_cited += 1
                    if ref not in sections:
                        bad.append(f"{f.relative_to(REPO)}:{n}: §{ref}")
    assert n_cited > 0  # the code does cite the document
    assert not bad, f"cited sections missing from docs/theory.md (has {sorted(sections)}):\n" + "\n".join(bad)
