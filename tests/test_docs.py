"""The docs the code points at exist: no citation of a document users lack, and no dangling anchor.

Code comments explain a decision by pointing at ``docs/method.md#anchor``; a renamed heading or a
removed ``<a id>`` would leave such pointers leading nowhere, silently.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
# Where references are checked (the tests themselves are left out: they hold examples of bad links).
SOURCES = ("src", "configs", "bench", "scripts", "docs", "README.md")
TEXT_SUFFIXES = {".py", ".yaml", ".yml", ".md", ".txt", ".sh", ".toml", ".json", ".jsonl"}

# docs/<file>.md, optionally #anchor, written anywhere (comments, help texts, markdown links)
DOCS_REF = re.compile(r"docs/([\w.-]+\.md)(?:#([\w-]+))?")
# a relative markdown link inside docs/: (file.md#anchor), (file.md) or (#anchor)
MD_LINK = re.compile(r"\]\((?!https?:)([\w.-]+\.md)?(?:#([\w-]+))?\)")
ANCHOR_TAG = re.compile(r"<a\s+id=\"([^\"]+)\"")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)


def slug(heading: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped (word characters, spaces and hyphens
    kept), spaces turned into hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(doc: Path) -> set[str]:
    text = FENCE.sub("", doc.read_text(encoding="utf-8"))
    return set(ANCHOR_TAG.findall(text)) | {slug(h) for h in HEADING.findall(text)}


def text_files() -> list[Path]:
    files: list[Path] = []
    for name in SOURCES:
        p = ROOT / name
        if p.is_file():
            files.append(p)
        elif p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES
                            and "__pycache__" not in f.parts)
    return files


def references() -> list[tuple[Path, int, str, str | None]]:
    """(file, line, referenced doc name, anchor or None) for every docs reference in SOURCES."""
    refs = []
    for f in text_files():
        for lineno, line in enumerate(f.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            refs += [(f, lineno, m.group(1), m.group(2)) for m in DOCS_REF.finditer(line)]
            if f.parent == DOCS and f.suffix == ".md":
                for m in MD_LINK.finditer(line):
                    if m.group(1) or m.group(2):
                        refs.append((f, lineno, m.group(1) or f.name, m.group(2)))
    return refs


def test_slug_matches_github_for_the_headings_we_link():
    assert slug("Training memories never show the example's own task") == \
        "training-memories-never-show-the-examples-own-task"
    assert slug("Paraphrases: free-form tasks against templated banks") == \
        "paraphrases-free-form-tasks-against-templated-banks"
    assert slug("The `exprag bank` command") == "the-exprag-bank-command"
    assert slug("`task_type` labels") == "task_type-labels"


def test_no_source_file_cites_a_document_users_do_not_have():
    cited = [f"{f.relative_to(ROOT)}:{n}" for f in (ROOT / "src").rglob("*")
             if f.is_file() and f.suffix in TEXT_SUFFIXES
             for n, line in enumerate(f.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
             if re.search(r"\bSPEC\b", line)]
    assert cited == []


def test_method_doc_is_referenced_from_the_code():
    # the point of docs/method.md: code comments lead there (guards against the check above passing
    # only because the references vanished)
    refs = [r for r in references() if r[2] == "method.md" and r[3] and r[0].is_relative_to(ROOT / "src")]
    assert len(refs) >= 20


@pytest.mark.parametrize("doc", sorted(p.name for p in DOCS.glob("*.md")))
def test_each_doc_has_anchors(doc):
    assert anchors(DOCS / doc), doc


def test_every_docs_reference_resolves():
    cache: dict[str, set[str] | None] = {}
    broken = []
    for f, lineno, name, anchor in references():
        if name not in cache:
            cache[name] = anchors(DOCS / name) if (DOCS / name).is_file() else None
        known = cache[name]
        where = f"{f.relative_to(ROOT)}:{lineno}: docs/{name}" + (f"#{anchor}" if anchor else "")
        if known is None:
            broken.append(f"{where} (no such file)")
        elif anchor and anchor not in known:
            broken.append(f"{where} (no such anchor)")
    assert broken == []


# ---- the docs site -------------------------------------------------------------------------------
README = ROOT / "README.md"


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """`mkdocs build --strict` (what `make docs` runs): a broken link or anchor, a page missing from
    the nav or a docstring mkdocstrings cannot render fails the build."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("site")
    res = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
                          "--site-dir", str(out)], capture_output=True, text=True, timeout=600,
                         env={**__import__("os").environ, "NO_MKDOCS_2_WARNING": "1"})
    assert res.returncode == 0, res.stderr[-4000:]
    return out


def test_docs_site_builds_strictly_with_every_page(site):
    import yaml

    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]

    def pages(items):
        for item in items:
            for value in (item.values() if isinstance(item, dict) else [item]):
                yield from (pages(value) if isinstance(value, list) else [value])

    listed = set(pages(nav))
    assert listed == {p.name for p in DOCS.glob("*.md")}  # every page in the nav, every nav entry a page
    for page in listed:
        built = site / ("index.html" if page == "index.md" else f"{page[:-3]}/index.html")
        assert built.is_file(), page


def test_cli_reference_is_generated_from_the_parser(site):
    from exprag.cli import build_parser

    html = (site / "cli" / "index.html").read_text(encoding="utf-8")
    parser = build_parser()
    commands = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices
    for name, sub in commands.items():
        assert f"exprag {name}</code>" in html, name
        for action in sub._actions:
            for flag in action.option_strings:
                assert flag in html, f"exprag {name} {flag}"


def test_api_reference_documents_every_public_name(site):
    import exprag

    html = (site / "api" / "index.html").read_text(encoding="utf-8")
    for name in exprag.__all__:
        assert re.search(rf'id="exprag\.[\w.]*\b{name}"', html), name  # a heading of its own


def test_readme_is_short_and_leads_into_the_docs():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 160
    assert "make quickstart" in text and "make test" in text
    assert "docs/method.svg" in text
    linked = set(re.findall(r"\]\(docs/([\w.-]+\.md)", text))
    assert {"getting-started.md", "gpu.md", "own-agent.md"} <= linked
    assert all((DOCS / name).is_file() for name in linked)
