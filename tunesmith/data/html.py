"""Text out of HTML pages, with BeautifulSoup: what a reader sees, not what a browser runs.

Scripts, styles, navigation, headers, footers, sidebars and forms are dropped; the main content
(<main>, else <article>s, else <body>) is kept with one line per block element, spaces collapsed
as a browser does (except inside <pre>). With html_split: headings, every h1-h6 starts a section:
the rows are {title, heading, body, text}, where text is heading and body together, so a FAQ page
becomes question/answer rows with data.columns: {question: heading, answer: body}.
"""

from __future__ import annotations

import re
import sys
from itertools import pairwise
from pathlib import Path

from tunesmith.errors import DataError

DROP = {"script", "style", "noscript", "template", "nav", "header", "footer", "aside", "form", "iframe",
        "svg", "canvas", "button", "select", "input", "textarea", "menu", "dialog", "object", "embed"}
BLOCKS = {"p", "div", "section", "article", "main", "li", "ul", "ol", "dl", "dt", "dd", "table", "tr",
          "td", "th", "thead", "tbody", "blockquote", "pre", "figure", "figcaption", "details",
          "summary", "address", "hr", "body", "h1", "h2", "h3", "h4", "h5", "h6"}
HEADINGS = ("h1", "h2", "h3", "h4", "h5", "h6")
PARAGRAPHS = {"p", "pre", "blockquote", "table", "ul", "ol", "dl", "figure", "hr", "section", "article",
              "details", "address", *HEADINGS}  # followed by a blank line, like paragraphs in Markdown
BOILERPLATE_ROLES = {"navigation", "banner", "contentinfo", "complementary", "search"}
# permalink anchors documentation generators put in headings ("¶" in Sphinx, "#" in MkDocs and others)
HEADER_LINK_CLASSES = {"headerlink", "anchor", "anchorjs-link", "heading-anchor", "header-anchor"}


def read_html(path: Path, text: str, split: str) -> list[tuple[dict, str]]:
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(text, "html.parser")
    if soup.find(True) is None:
        raise DataError(f"{path}: not HTML (no tags found); give .txt/.md files for plain text")
    title = soup.title.get_text(" ", strip=True) if soup.title else path.stem
    content = _main_content(soup)
    _drop_boilerplate(content)
    try:  # the text is walked out of the tree recursively, one level of Python per level of HTML
        if split == "headings":
            return _sections(content, title, path)
        body = page_text(content)
    except RecursionError:
        raise DataError(f"{path}: elements nested too deeply to read (about {sys.getrecursionlimit()} "
                        "levels or more)") from None
    return [({"title": title, "text": body}, str(path))]


def _main_content(soup):
    main = soup.find("main") or soup.find(attrs={"role": "main"})
    if main is not None:
        return main
    articles = soup.find_all("article")
    if len(articles) == 1:
        return articles[0]
    return soup.body or soup


def _drop_boilerplate(content) -> None:
    for tag in content.find_all(True):
        if tag.decomposed:
            continue
        role = (tag.get("role") or "").lower() if tag.attrs is not None else ""
        if tag.name in DROP or role in BOILERPLATE_ROLES or tag.get("aria-hidden") == "true" \
                or tag.has_attr("hidden") or _is_header_link(tag):
            tag.decompose()


def _is_header_link(tag) -> bool:
    return tag.name == "a" and bool(HEADER_LINK_CLASSES.intersection(tag.get("class") or []))


def page_text(node) -> str:
    """The readable text of a node: one line per block element, browser-style spaces."""
    pieces: list[str] = []
    _walk(node, pieces, in_pre=False)
    text = "".join(pieces)
    text = re.sub(r"[ \t]+\n", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _walk(node, pieces: list[str], in_pre: bool) -> None:
    from bs4 import Comment, Declaration, Doctype, NavigableString, ProcessingInstruction

    for child in getattr(node, "children", []):
        if isinstance(child, (Comment, Doctype, Declaration, ProcessingInstruction)):
            continue
        if isinstance(child, NavigableString):
            text = str(child) if in_pre else re.sub(r"\s+", " ", str(child))
            if not in_pre and (not pieces or pieces[-1].endswith("\n")):
                text = text.lstrip()  # a block starts at the beginning of its line
            if text:
                pieces.append(text)
            continue
        if child.name == "br":
            pieces.append("\n")
            continue
        block = child.name in BLOCKS
        if block:
            _end_line(pieces)
        _walk(child, pieces, in_pre or child.name == "pre")
        if block:
            _end_line(pieces, blank=child.name in PARAGRAPHS)


def _end_line(pieces: list[str], blank: bool = False) -> None:
    if pieces and not pieces[-1].endswith("\n"):
        pieces[-1] = pieces[-1].rstrip(" ")
        pieces.append("\n")
    if blank and pieces and not "".join(pieces[-2:]).endswith("\n\n"):
        pieces.append("\n")


def _sections(content, title: str, path: Path) -> list[tuple[dict, str]]:
    """Cut the content at every heading: each heading with everything up to the next one."""
    rows = []
    for heading, body in _split_at_headings(content):
        if not heading and not body:
            continue
        number = len(rows) + 1
        text = f"{heading}\n\n{body}".strip() if heading else body
        where = f"{path}#section {number}" + (f" ({heading[:40]})" if heading else "")
        rows.append(({"title": title, "heading": heading, "body": body, "text": text}, where))
    return rows


def _split_at_headings(content) -> list[tuple[str, str]]:
    """(heading, body text) in document order; text before the first heading has heading ''."""
    pieces: list[str] = []
    marks: list[tuple[int, str]] = []  # (index into pieces where a section starts, heading)
    _walk_marking(content, pieces, marks)
    bounds = marks + [(len(pieces), "")]
    out = []
    first_end = marks[0][0] if marks else len(pieces)
    out.append(("", _clean("".join(pieces[:first_end]))))
    for (start, heading), (end, _) in pairwise(bounds):
        out.append((heading, _clean("".join(pieces[start:end]))))
    return out


def _walk_marking(node, pieces: list[str], marks: list[tuple[int, str]]) -> None:
    """Like _walk, but a heading records where its section starts instead of adding its text."""
    for child in getattr(node, "children", []):
        name = getattr(child, "name", None)
        if name in HEADINGS:
            _end_line(pieces)
            marks.append((len(pieces), child.get_text(" ", strip=True)))
            continue
        if name is None or name == "br" or child.find(HEADINGS) is None:
            _walk_one(child, pieces)
            continue
        block = name in BLOCKS
        if block:
            _end_line(pieces)
        _walk_marking(child, pieces, marks)
        if block:
            _end_line(pieces, blank=name in PARAGRAPHS)


def _walk_one(child, pieces: list[str]) -> None:
    wrapper = _Single(child)
    _walk(wrapper, pieces, in_pre=False)


class _Single:
    """A node seen as the only child of a parent, so _walk handles it with its own rules."""

    def __init__(self, child):
        self.children = [child]


def _clean(text: str) -> str:
    text = re.sub(r"[ \t]+\n", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()
