"""The README fits on a screen, and every link in it resolves: a relative path to a file of
the repository, and an ``#anchor`` to a heading of the Markdown page it names (as MkDocs
names headings). The pages of ``docs/`` are checked by ``mkdocs build --strict``
(``make docs``, which ``make test`` runs)."""

from __future__ import annotations

import importlib
import re
import unicodedata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_README_LINES = 300

_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
_FENCE = re.compile(r"^```.*?^```$", re.DOTALL | re.MULTILINE)


def slug(heading: str) -> str:
    """A heading's anchor as MkDocs' table of contents makes it (Python-Markdown's
    ``toc.slugify``) from the heading's text: code spans and links by their text."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "")
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def anchors(markdown: str) -> set[str]:
    prose = _FENCE.sub("", markdown)
    return {slug(m[1]) for m in re.finditer(r"^#{1,6} +(.+?) *#*$", prose, re.MULTILINE)}


def broken_links(markdown: str, base: Path) -> list[str]:
    """Every relative link of ``markdown`` (read from a file in ``base``) that names no file,
    or an anchor its Markdown page does not have."""
    broken = []
    for target in _LINK.findall(_FENCE.sub("", markdown)):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...
            continue
        path, _, anchor = target.partition("#")
        page = (base / path).resolve() if path else None
        if page is not None and not page.exists():
            broken.append(f"{target}: no such file")
            continue
        if not anchor:
            continue
        if page is not None and page.suffix != ".md":
            broken.append(f"{target}: an anchor into a file that is not a page")
        elif anchor not in anchors(page.read_text("utf-8") if page is not None else markdown):
            broken.append(f"{target}: no heading with that anchor")
    return broken


def test_the_readme_fits_on_a_screen() -> None:
    lines = README.read_text("utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES, len(lines)


def test_every_readme_link_resolves() -> None:
    text = README.read_text("utf-8")
    links = _LINK.findall(_FENCE.sub("", text))
    assert any(link.startswith("docs/") and "#" in link for link in links)
    assert broken_links(text, ROOT) == []


def test_a_broken_link_or_anchor_is_found(tmp_path: Path) -> None:
    """The check can fail: a missing page, a missing heading, a missing file."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "page.md").write_text("# A page\n\n## Before the first start: `check`\n")
    text = (
        "# Top\n\n[ok](docs/page.md#before-the-first-start-check) [ok](#top)"
        " [web](https://example.com/x#y)\n"
        "[gone](docs/other.md) [no heading](docs/page.md#after) [here](#nowhere)\n"
        "```\n[inside a fence](docs/ignored.md)\n```\n"
    )
    assert broken_links(text, tmp_path) == [
        "docs/other.md: no such file",
        "docs/page.md#after: no heading with that anchor",
        "#nowhere: no heading with that anchor",
    ]


def test_the_slug_is_mkdocs_own() -> None:
    """Headings with punctuation and code spans, named as the site names them (the heading's
    rendered text through Python-Markdown's own slugify, which MkDocs uses)."""
    toc = importlib.import_module("markdown.extensions.toc")
    for page in sorted((ROOT / "docs").glob("*.md")):
        prose = _FENCE.sub("", page.read_text("utf-8"))
        for heading in re.findall(r"^#{1,6} +(.+?) *#*$", prose, re.MULTILINE):
            assert slug(heading) == toc.slugify(heading.replace("`", ""), "-"), heading
    assert slug("Kill switch: everything on a symbol") == "kill-switch-everything-on-a-symbol"
    assert slug("Before the first start: `config` and `check`") == (
        "before-the-first-start-config-and-check"
    )
    assert slug("A newcomer's path") == "a-newcomers-path"
    assert slug("Why exactly-once's paced tail sits above the floor") == (
        "why-exactly-onces-paced-tail-sits-above-the-floor"
    )
