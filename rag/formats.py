"""File formats to normalised Markdown: the reader for each extension (text, HTML, PDF) and the text clean-up.

YAML front matter is taken off Markdown and text files before their reader runs (``rag/metadata.py``).
Every format ends up in one shape for the chunkers: '#'-prefixed heading lines and paragraphs separated
by blank lines. Markdown and plain text are kept, with setext headings ('Title' over '===') turned into
'#' lines. HTML keeps the reader's view: scripts, navigation, asides and the page header/footer are
dropped (a <header>/<footer> inside <article>/<main>/<section> is content, as in the HTML-AAM role
mapping, and so is a page header holding the page's only <h1>), <main>/<article> wins when present,
and tables become Markdown pipe tables so a cell stays on a row with its headers. PDF text comes from
pypdf; its `visitor_text` hook gives each line's font size and position, so lines clearly larger than
the body font become '#'/'##'/'###' by size rank, and a vertical gap starts a new paragraph.

A reader raises `Skip` with the reason and the fix; `rag.ingest.load_file` logs it and goes on. Which files are
read, size limits and the folder walk are in `rag/ingest.py`.

Left out on purpose: OCR of scanned PDFs, PDF table/column layout (rows come out as lines), .docx and charset
sniffing beyond UTF-8 -> cp1252/Latin-1.

    >>> READERS[".md"](b"# Notes ##\\n\\nBody.", "notes.md")
    ('# Notes ##\\n\\nBody.', 'Notes')
"""

from __future__ import annotations

import io
import logging
import math
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

from bs4 import BeautifulSoup
from bs4.element import PreformattedString, Tag
from pypdf import PageObject, PdfReader

# one logger for everything said about a file, whichever module says it
log = logging.getLogger("rag.ingest")

DROP_TAGS = ("script", "style", "nav", "aside", "noscript", "form", "svg", "iframe", "template", "head")
DROP_ROLES = ("navigation", "banner", "contentinfo")
SECTIONING = ("article", "main", "section")
HEADINGS = ("h1", "h2", "h3", "h4", "h5", "h6")
BLOCK_TAGS = HEADINGS + ("address", "article", "blockquote", "body", "br", "dd", "details", "div", "dl",
                         "dt", "figure", "hr", "li", "main", "ol", "p", "pre", "section", "table", "ul")
HEADING_RATIO = 1.15  # a PDF line this much larger than the body font is a heading
PARAGRAPH_GAP = 1.7   # a PDF line further than this x its font size below the last one starts a paragraph
WRAPPED = 0.6         # a PDF line this share as long as the longest body line wrapped into the next one
# a one-line paragraph (blank line or start of file before it) over a '===' or '---' underline
SETEXT = re.compile(r"^(?<![^\n]\n)([^\s#>|*-].*)\n {0,3}(={3,}|-{3,})[ \t]*$", re.M)
LIST_ITEM = re.compile(r"(?:[-*\u2022\u2013]|(\d{1,2}[.)]))\s+")  # a bullet becomes '- ', a number stays
ATX_TITLE = re.compile(r"^# +(.*)$", re.M)  # no lazy group before a trailing [ #]*: that was quadratic in spaces
MAX_SPAN = 1000  # colspan above this is clamped, as the HTML standard and browsers do (a 56-byte page made 66k chunks)


class Skip(Exception):
    """Why a file is skipped and how to fix it; `rag.ingest.load_file` logs it once."""


def squash(text: str) -> str:
    return " ".join(text.split())


def tidy(text: str) -> str:
    lines = text.replace("\r\n", "\n").replace("\r", "\n").lstrip("\ufeff").split("\n")
    return re.sub(r"\n{3,}", "\n\n", "\n".join(line.rstrip() for line in lines)).strip()


def decode(raw: bytes, rel: str) -> str:
    if b"\x00" in raw:  # the whole file: binary data after a text header is still binary
        raise Skip("binary content (NUL bytes), not text; fix its extension or remove it")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        log.warning("decoding %s: not valid UTF-8, read as cp1252/Latin-1; re-save it as UTF-8", rel)
    try:
        return raw.decode("cp1252")
    except UnicodeDecodeError:  # one of the five bytes cp1252 leaves undefined
        return raw.decode("latin-1")


def heading_text(text: str) -> str:
    """An ATX heading's text without its closing '#'s, which CommonMark counts only after a space (or as the
    whole text): '# Title ##' -> 'Title', but '# C#' -> 'C#'.

    >>> [heading_text(t) for t in ("Title ##", "C#", "C #", "##", "a # b")]
    ['Title', 'C#', 'C', '', 'a # b']
    """
    text = text.strip()
    bare = text.rstrip("#")
    return bare.rstrip() if not bare or bare[-1] in " \t" else text


def atx_title(text: str) -> str | None:
    match = next((m for m in ATX_TITLE.finditer(text) if heading_text(m[1])), None)
    return heading_text(match[1]) if match else None


def _read_text(raw: bytes, rel: str) -> tuple[str, str | None]:
    text = tidy(decode(raw, rel))
    text = SETEXT.sub(lambda m: ("# " if m[2][0] == "=" else "## ") + m[1].strip() + "\n", text)
    return text, atx_title(text)


def _span(cell: Tag) -> int:
    span = str(cell.get("colspan", "1")).strip()
    return (int(span) if len(span) < 8 else MAX_SPAN + 1) if span.isascii() and span.isdigit() else 1


def _html_table(table: Tag, rel: str) -> str:
    rows = [[(squash(cell.get_text(" ")).replace("|", "\\|"), max(_span(cell), 1))
             for cell in tr.find_all(("th", "td"), recursive=False)] for tr in table.find_all("tr")]
    rows = [r for r in rows if any(text for text, _ in r)]
    if any(n > MAX_SPAN for r in rows for _, n in r):
        log.warning("%s: a table cell spans over %d columns; read as %d", rel, MAX_SPAN, MAX_SPAN)
    # repeat a spanned cell so every value sits under its own column header, and pad short rows, while the table
    # stays linear in its source: 300 cells spanning 999 columns each must not become 300,000 cells to embed
    budget = max(10 * sum(len(r) for r in rows), 4 * MAX_SPAN)
    if sum(min(n, MAX_SPAN) for r in rows for _, n in r) > budget:
        log.warning("%s: a table's column spans would make it over %d cells; each cell is kept once", rel, budget)
        rows = [[text for text, _ in r] for r in rows]
    else:
        rows = [[text for text, n in r for _ in range(min(n, MAX_SPAN))] for r in rows]
    width = max((len(r) for r in rows), default=0)
    if width * len(rows) <= budget:
        rows = [r + [""] * (width - len(r)) for r in rows]
    lines = ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines[:1] + ["|" + " --- |" * width] + lines[1:]) if rows else ""


def _html_blocks(root: Tag, out: list[str], rel: str) -> None:
    """Append root's blocks to out: '#' headings, paragraphs, '- ' items, pipe tables, fenced code.

    A loop over a stack of open elements, not recursion: 1000 nested <div>s must not hit Python's recursion limit.
    """
    # per open element: its children still to read, where its blocks go, its inline text not yet a paragraph, and
    # for an <li> the list its items join when it closes
    Frame = tuple[Iterator, list[str], list[str], list[str] | None]
    stack: list[Frame] = [(iter(root.children), out, [], None)]
    # which elements hold a block: one walk up from each block, stopping at a marked element, is linear in the
    # page, where asking find(BLOCK_TAGS) of every element costs the square of the nesting depth
    holds_block: set[int] = set()
    for block in root.find_all(BLOCK_TAGS):
        el = block.parent
        while el is not None and id(el) not in holds_block:
            holds_block.add(id(el))
            el = el.parent
    while stack:
        children, dest, buf, item_of = stack[-1]
        child = next(children, None)
        if isinstance(child, PreformattedString):  # comments, doctype, CDATA
            continue
        if child is not None and (not isinstance(child, Tag) or (child.name not in BLOCK_TAGS
                                                                 and id(child) not in holds_block)):
            buf.append(child.get_text() if isinstance(child, Tag) else str(child))  # inline text, <a>, <b>
            continue
        if text := squash("".join(buf)):  # a block, or the end of the element, ends the inline paragraph
            dest.append(text)
        buf.clear()
        if child is None:
            stack.pop()
            if item_of is not None and dest:  # items of a nested list follow their parent item
                item_of += ["- " + dest[0].removeprefix("- ")] + dest[1:]
            continue
        name = child.name
        if name in HEADINGS:
            if text := squash(child.get_text()).rstrip("\u00b6 "):  # drop Sphinx-style permalink marks
                dest.append("#" * int(name[1]) + " " + text)
        elif name == "li":
            stack.append((iter(child.children), [], [], dest))
        elif name == "table":
            dest.append(_html_table(child, rel))
        elif name == "pre":
            code = child.get_text().strip("\n")
            dest.append(f"```\n{code}\n```" if code.strip() else "")
        else:
            stack.append((iter(child.children), dest, [], None))


def _read_html(raw: bytes, rel: str) -> tuple[str, str | None]:
    soup = BeautifulSoup(decode(raw, rel), "html.parser")
    h1 = soup.find("h1")
    title = squash(soup.title.get_text()) if soup.title else ""
    title = title or (squash(h1.get_text()) if h1 else "")
    drop = soup.find_all(DROP_TAGS) + soup.find_all(attrs={"role": DROP_ROLES})
    # only page-level header/footer are site chrome; inside an article they hold its title and byline
    chrome = [el for el in soup.find_all(("header", "footer")) if not el.find_parent(SECTIONING)]
    for el in drop + chrome:
        el.extract()
    articles = soup.find_all("article")
    root = soup.find("main") or (articles[0] if len(articles) == 1 else None) or soup.body or soup
    blocks: list[str] = []
    # ...unless the page header holds the page's only <h1>: then it is the title block (owner, version, date)
    intro = next((el for el in chrome if el.name == "header" and el.find("h1")), None)
    if intro and not root.find("h1"):
        _html_blocks(intro, blocks, rel)
    _html_blocks(root, blocks, rel)
    return "\n\n".join(b for b in blocks if b), title or None


@dataclass
class _Line:
    text: str = ""
    sizes: Counter[float] = field(default_factory=Counter)  # effective font size -> characters set in it
    y: float = 0.0


def _pdf_lines(page: PageObject) -> list[tuple[str, float, float]]:
    """(text, main font size, baseline y) of each text line on a page."""
    lines = [_Line()]

    def visit(text: str, cm: list[float], tm: list[float], font: object, size: float) -> None:
        # text space -> page space is Tm x CTM (PDF 32000-1, 9.4.4); the font size scales with it
        scale = math.hypot(tm[2] * cm[0] + tm[3] * cm[2], tm[2] * cm[1] + tm[3] * cm[3])
        for i, part in enumerate(text.split("\n")):
            if i:
                lines.append(_Line())
            line = lines[-1]
            line.text += part
            if n := len(part.strip()):
                if not line.sizes:
                    line.y = tm[4] * cm[1] + tm[5] * cm[3] + cm[5]
                line.sizes[round((size or 0) * scale * 2) / 2] += n

    page.extract_text(visitor_text=visit)  # pypdf reports the text, in order, exactly as it returns it
    return [(squash(ln.text), ln.sizes.most_common(1)[0][0], ln.y) for ln in lines if ln.sizes]


def _pdf_markdown(pages: list[list[tuple[str, float, float]]]) -> str:
    chars: Counter[float] = Counter()
    for text, size, _ in (line for page in pages for line in page):
        chars[size] += len(text)
    body = chars.most_common(1)[0][0] if chars else 0.0
    big = sorted({size for size in chars if size >= body * HEADING_RATIO}, reverse=True)
    level_of = {size: min(rank + 1, 3) for rank, size in enumerate(big)}
    full = max((len(text) for page in pages for text, size, _ in page if size == body), default=0)
    blocks: list[str] = []
    prev_text, prev_size, prev_level = "", 0.0, None
    for lines in pages:
        prev_y = None
        for text, size, y in lines:
            level = level_of.get(size) if len(text) <= 120 else None
            item = LIST_ITEM.match(text)
            # a line that ran to the margin wrapped; a short one ended (a paragraph, a table row)
            wrapped = bool(level) or len(prev_text) >= WRAPPED * full
            if prev_y is None:  # top of a page: only a paragraph cut mid-line by the page break goes on
                near = wrapped and prev_level == 0 and size == prev_size
            else:
                near = 0 <= prev_y - y <= PARAGRAPH_GAP * max(size, prev_size)
            if near and prev_level == (level or 0) and not item:
                blocks[-1] += (" " if wrapped else "\n") + text
            elif level:
                blocks.append("#" * level + " " + text)
            else:
                blocks.append(f"{item[1] or '-'} {text[item.end():]}" if item else text)
            prev_text, prev_size, prev_y, prev_level = text, size, y, level or 0
    return "\n\n".join(blocks)


def _read_pdf(raw: bytes, rel: str) -> tuple[str, str | None]:
    try:
        reader = PdfReader(io.BytesIO(raw))
        if reader.is_encrypted and not reader.decrypt(""):
            raise Skip("encrypted PDF; save a decrypted copy (e.g. qpdf --decrypt in.pdf out.pdf)")
        text = _pdf_markdown([_pdf_lines(page) for page in reader.pages])
        meta_title = squash((reader.metadata.title or "") if reader.metadata else "")
    except Skip:
        raise
    except Exception as e:  # pypdf raises many exception types on damaged files
        raise Skip(f"unreadable PDF ({type(e).__name__}: {squash(str(e))[:160]}); re-export it") from e
    if not text:
        raise Skip("no extractable text (a scanned PDF?); run OCR on it first")
    return text, meta_title or atx_title(text)


READERS = {".md": _read_text, ".markdown": _read_text, ".txt": _read_text,
           ".html": _read_html, ".htm": _read_html, ".pdf": _read_pdf}
