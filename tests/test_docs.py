"""Every reference in the docs resolves inside the repository: the Markdown links of README.md and
docs/*.md (files and #anchors), the `....md` paths they quote, and the `docs/....md` paths that the
code's docstrings and comments cite. A user has the repository and nothing else."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
QUOTED_MD = re.compile(r"`((?:\.\./)*[\w./-]+\.md)(?:#[\w-]+)?`")
CITED_DOC = re.compile(r"(?<![\w/])(docs/[\w./-]+\.md)")


def anchors(md: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    out = set()
    for line in md.read_text().splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            out.add(re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", title)))
    return out


def inside(path: Path, root: Path) -> bool:
    path = path.resolve()
    return path == root or root in path.parents


def broken_links(root: Path) -> list[str]:
    bad = []
    for md in [root / "README.md"] + sorted((root / "docs").glob("*.md")):
        text = md.read_text()
        for target in LINK.findall(text):
            if "://" in target or target.startswith("mailto:"):
                continue
            path, _, anchor = target.partition("#")
            dest = (md.parent / path) if path else md
            if not dest.exists() or not inside(dest, root) or "shared" in Path(path).parts:
                bad.append(f"{md.relative_to(root)}: {target}")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                bad.append(f"{md.relative_to(root)}: {target} (no such heading)")
        for quoted in QUOTED_MD.findall(text):
            candidates = [md.parent / quoted, root / quoted]
            if "shared" in Path(quoted).parts or not any(c.exists() and inside(c, root) for c in candidates):
                bad.append(f"{md.relative_to(root)}: `{quoted}`")
    return bad


def broken_citations(root: Path) -> list[str]:
    bad = []
    for f in sorted((root / "mellum2").rglob("*.py")):
        for cited in CITED_DOC.findall(f.read_text()):
            if not (root / cited).is_file():
                bad.append(f"{f.relative_to(root)}: {cited}")
    return bad


def test_markdown_links_resolve_inside_the_repository():
    assert broken_links(ROOT) == []


def test_docs_cited_in_the_code_exist():
    assert broken_citations(ROOT) == []


def test_the_checks_find_what_is_broken(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "mellum2").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# Fast paths\n")
    (tmp_path / "README.md").write_text(
        "[ok](docs/a.md) [ok](docs/a.md#fast-paths) [gone](docs/b.md) [anchor](docs/a.md#nope) "
        "[out](../shared/docs/x.md) [web](https://example.com) `docs/a.md` `docs/c.md`\n")
    (tmp_path / "mellum2" / "m.py").write_text('"""See docs/a.md and docs/mellum2-facts.md."""\n')
    assert broken_links(tmp_path) == ["README.md: docs/b.md", "README.md: docs/a.md#nope (no such heading)",
                                      "README.md: ../shared/docs/x.md", "README.md: `docs/c.md`"]
    assert broken_citations(tmp_path) == ["mellum2/m.py: docs/mellum2-facts.md"]
