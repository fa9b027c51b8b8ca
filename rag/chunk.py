"""Split documents into chunks: fixed word windows, semantic (heading/paragraph) chunks, or parent/child.

Three strategies, because the guides disagree on which matters (CLAIMS.md #3) and openbook measures it:

- ``fixed``: windows of ``size`` words with ``overlap`` words, blind to structure (the baseline that can cut a
  rule from its exception).
- ``semantic``: split at headings, then merge whole paragraphs (tables and lists stay whole) up to ``size`` words.
- ``hierarchical``: semantic *parents* of ``parent_size`` words; each is cut into small overlapping *children*
  that are indexed, while the generator is shown the parent (the "small-to-big" pattern).

Tables stay pipe tables (``tables="grid"``, the default), or are read row by row (``tables="rows"``): each row
becomes one list item that names its column headers ("- Feature: Controllers per account; Free: 1; Grower: 3"), so
a row keeps its meaning in a chunk cut off from the header line. On the demo the rows did not read better: with the
1.5B reader and no abstention gate, 42 of 73 test answers against 43, table questions 14 of 22 against 16 (README,
"Chunking").

A contextual header ("title › section › subsection") can be prepended to what is indexed (``index_text``),
following Anthropic's contextual-retrieval idea without an LLM call. Sizes are counted in whitespace words,
not model tokens, so chunking needs no tokenizer; 1 word ≈ 1.3 MiniLM word pieces, and the defaults keep a
chunk under MiniLM's 256-piece limit. Chunk ids are ``<doc id>#<kind><n>``: stable for unchanged documents.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from rag.formats import heading_text
from rag.ingest import Document

STRATEGIES = ("fixed", "semantic", "hierarchical")
TABLES = ("rows", "grid")
# '#'s, spaces or tabs (not newlines: '#\n\nfoo' is no heading), then text starting with a non-space; a space run
# that fails to meet one gives back one character at a time to no avail, so a long run costs linear time
_HEADING = re.compile(r"^(#{1,6})[ \t]+(\S[^\n]*)$", re.M)
_WORD = re.compile(r"\S+")
_PARA = re.compile(r"(?:^[ \t]*\S[^\n]*(?:\n|\Z))+", re.M)  # a run of non-blank lines
# a pipe table's delimiter line, stripped: "|---|:--:|", "--- | ---"; each repeat starts at a '|', so no run of a long
# line can be matched two ways
_DELIMITER = re.compile(r"\|?[ \t]*:?-+:?[ \t]*(?:\|[ \t]*:?-+:?[ \t]*)*\|?")
_CELL_SEP = re.compile(r"(?<!\\)\|")
MAX_GROWTH = 8  # a table read as rows may be at most this many times its grid's length (+1000 characters)


@dataclass(frozen=True)
class Chunk:
    """A span of a document. ``start``/``end`` are character offsets into ``Document.text`` (tables read as rows
    when ``ChunkConfig.tables`` is "rows")."""

    id: str
    doc_id: str
    text: str
    start: int
    end: int
    section: str = ""  # heading path inside the document, "A › B"
    title: str = ""  # document title
    parent_id: str | None = None  # hierarchical children point at the parent the generator sees
    header: str = ""  # contextual header; empty when contextual headers are off
    indexed: bool = True  # parents of hierarchical chunking are stored but not indexed
    # the document's metadata (rag/metadata.py), shared by its chunks; saved once per document in the manifest
    meta: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def index_text(self) -> str:
        """What BM25 and the embedder see."""
        return f"{self.header}\n{self.text}" if self.header else self.text


@dataclass(frozen=True)
class ChunkConfig:
    strategy: str = "semantic"  # one of STRATEGIES
    size: int = 120  # words per chunk (children for hierarchical)
    overlap: int = 20  # words shared by neighbouring fixed windows / children
    parent_size: int = 400  # words per parent section (hierarchical only)
    contextual: bool = True  # prepend "title › section" to indexed text
    tables: str = "grid"  # one of TABLES

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"--chunker must be one of {', '.join(STRATEGIES)}, not '{self.strategy}'")
        if self.tables not in TABLES:
            raise ValueError(f"--tables must be one of {', '.join(TABLES)}, not '{self.tables}'")
        if self.size < 10:
            raise ValueError(f"--chunk-size must be at least 10 words, not {self.size}")
        if not 0 <= self.overlap < self.size:
            raise ValueError(f"--overlap must be in [0, chunk size {self.size}), not {self.overlap}")
        if self.parent_size < 10:
            raise ValueError(f"--parent-size must be at least 10 words, not {self.parent_size}")


def _cells(line: str) -> list[str]:
    line = line.strip()
    cells = [c.strip().replace("\\|", "|") for c in _CELL_SEP.split(line)]
    if cells and not cells[0] and line.startswith("|"):
        cells = cells[1:]
    if cells and not cells[-1] and line.endswith("|") and not line.endswith("\\|"):
        cells = cells[:-1]
    return cells


def _row(headers: list[str], cells: list[str]) -> str:
    pairs = [f"{h}: {c}" if h else c for h, c in zip(headers + [""] * len(cells), cells, strict=False) if c]
    return "- " + "; ".join(pairs) if pairs else ""


def table_rows(text: str) -> str:
    """Text with each pipe table (a header line, a delimiter line, rows) written as one list item per row that
    names its column headers; other lines as they were. A line without a '|' ends a table.

    >>> print(table_rows("Plans:\\n\\n| Limit | Free | Pro |\\n|---|:-:|--|\\n| Users | 1 | 10 |\\n| Zones || 24 |"))
    Plans:
    <BLANKLINE>
    - Limit: Users; Free: 1; Pro: 10
    - Limit: Zones; Pro: 24
    """
    lines, out, i = text.split("\n"), [], 0
    while i < len(lines):
        nxt = lines[i + 1].strip() if i + 1 < len(lines) else ""
        if "|" in lines[i] and "|" in nxt and _DELIMITER.fullmatch(nxt):
            start, headers, i = i, _cells(lines[i]), i + 2
            while i < len(lines) and "|" in lines[i] and lines[i].strip():
                i += 1
            grid = lines[start:i]
            # long headers over many short cells would multiply the text (a hostile file: 1000 columns of
            # 10,000-character headers over 1000 rows); such a table stays a grid, found before any row is written
            budget, rows = MAX_GROWTH * sum(map(len, grid)) + 1000, []
            for line in grid[2:]:
                cells = _cells(line)
                budget -= sum(len(h) + len(c) + 4 for h, c in zip(headers + [""] * len(cells), cells, strict=False))
                if budget < 0:
                    rows = grid
                    break
                rows += [r] if (r := _row(headers, cells)) else []
            out += rows
        else:
            out.append(lines[i])
            i += 1
    return "\n".join(out)


def _sections(text: str) -> list[tuple[int, int, str]]:
    """(start, end, heading path) for each heading-delimited section; text before the first heading too."""
    marks = [(m.start(), len(m.group(1)), heading_text(m.group(2))) for m in _HEADING.finditer(text)]
    bounds = [m[0] for m in marks] + [len(text)]
    out, path = [], []
    if not marks or marks[0][0] > 0:
        out.append((0, bounds[0], ""))
    for (start, level, name), end in zip(marks, bounds[1:], strict=False):
        path = [p for p in path if p[0] < level] + [(level, name)]
        out.append((start, end, " › ".join(n for _, n in path)))
    return out


def _windows(text: str, start: int, end: int, size: int, overlap: int) -> list[tuple[int, int]]:
    """Character spans of word windows over text[start:end]; neighbours share ``overlap`` words."""
    words = [(m.start(), m.end()) for m in _WORD.finditer(text, start, end)]
    if not words:
        return []
    step, spans = size - overlap, []
    for i in range(0, len(words), step):
        spans.append((words[i][0], words[min(i + size, len(words)) - 1][1]))
        if i + size >= len(words):
            break
    return spans


def _blocks(text: str, start: int, end: int, size: int) -> list[tuple[int, int]]:
    """Paragraph spans (blank-line separated); a paragraph over ``size`` words splits at line ends, then words."""
    out = []
    for m in _PARA.finditer(text, start, end):
        a, b = m.start(), m.start() + len(m.group().rstrip())
        if len(_WORD.findall(text, a, b)) <= size:
            out.append((a, b))
            continue
        lines = [(a + x.start(), a + x.end()) for x in re.finditer(r"[^\n]*\S[^\n]*", text[a:b])]
        for la, lb in lines:
            out.extend(_windows(text, la, lb, size, 0) if len(_WORD.findall(text, la, lb)) > size else [(la, lb)])
    return out


def _merge(text: str, blocks: list[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    """Greedily join consecutive blocks while the total stays within ``size`` words."""
    out, cur, n = [], None, 0
    for a, b in blocks:
        w = len(_WORD.findall(text, a, b))
        if cur and n + w <= size:
            cur, n = (cur[0], b), n + w
        else:
            if cur:
                out.append(cur)
            cur, n = (a, b), w
    if cur:
        out.append(cur)
    return out


def _semantic_spans(text: str, size: int) -> list[tuple[int, int, str]]:
    spans = []
    for a, b, path in _sections(text):
        spans += [(x, y, path) for x, y in _merge(text, _blocks(text, a, b, size), size)]
    return spans


def _section_at(sections: list[tuple[int, int, str]], pos: int) -> str:
    return next((p for a, b, p in sections if a <= pos < b), "")


def chunk_document(doc: Document, cfg: ChunkConfig) -> list[Chunk]:
    """Chunks of one document, in document order.

    >>> from rag.ingest import Document
    >>> d = Document("a.md", "/a.md", "A", "# A\\n\\nOne two three.\\n\\n## B\\n\\nFour five.", "0", 0.0)
    >>> [c.text for c in chunk_document(d, ChunkConfig(size=10, overlap=0))]
    ['# A\\n\\nOne two three.', '## B\\n\\nFour five.']
    """
    text = table_rows(doc.text) if cfg.tables == "rows" else doc.text

    def make(kind: str, i: int, a: int, b: int, path: str, **kw) -> Chunk:
        header = " › ".join(x for x in (doc.title, path) if x) if cfg.contextual else ""
        return Chunk(f"{doc.id}#{kind}{i}", doc.id, text[a:b], a, b, path, doc.title, header=header, meta=doc.meta,
                     **kw)

    if cfg.strategy == "fixed":
        sections = _sections(text)
        spans = _windows(text, 0, len(text), cfg.size, cfg.overlap)
        return [make("f", i, a, b, _section_at(sections, a)) for i, (a, b) in enumerate(spans)]
    if cfg.strategy == "semantic":
        return [make("s", i, a, b, p) for i, (a, b, p) in enumerate(_semantic_spans(text, cfg.size))]
    chunks, n = [], 0
    for i, (a, b, path) in enumerate(_semantic_spans(text, cfg.parent_size)):
        parent = make("p", i, a, b, path, indexed=False)
        chunks.append(parent)
        for x, y in _windows(text, a, b, cfg.size, cfg.overlap):
            chunks.append(make("c", n, x, y, path, parent_id=parent.id))
            n += 1
    return chunks


def chunk_documents(docs: list[Document], cfg: ChunkConfig) -> list[Chunk]:
    return [c for d in docs for c in chunk_document(d, cfg)]
