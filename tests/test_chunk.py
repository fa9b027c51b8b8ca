"""Chunker invariants: no text lost, overlaps as configured, parents cover children, ids stable."""

from __future__ import annotations

import re

import pytest

from rag.chunk import ChunkConfig, chunk_document, table_rows
from rag.ingest import Document

TEXT = (
    "# Returns policy\n\nIntro paragraph about returns.\n\n## Window\n\n"
    + " ".join(f"w{i}" for i in range(150))
    + "\n\n| product | days |\n|---|---|\n| Sprout | 45 |\n| Probe | 14 |\n\n## Exceptions\n\n"
    + "Opened probes: 14 days only.\n"
)
DOC = Document("policies/returns.md", "/x/policies/returns.md", "Returns policy", TEXT, "abc", 0.0)


def words(s: str) -> list[str]:
    return re.findall(r"\S+", s)


@pytest.mark.parametrize("strategy", ["fixed", "semantic"])
@pytest.mark.parametrize("tables", ["rows", "grid"])
def test_no_text_lost_and_spans_match(strategy, tables):
    chunks = chunk_document(DOC, ChunkConfig(strategy, size=40, overlap=10, tables=tables))
    source = table_rows(TEXT) if tables == "rows" else TEXT
    for c in chunks:
        assert c.text == source[c.start : c.end]
    covered = set()
    for c in chunks:
        covered |= {m.start() + c.start for m in re.finditer(r"\S+", c.text)}
    assert covered == {m.start() for m in re.finditer(r"\S+", source)}


def test_fixed_windows_overlap_and_size():
    chunks = chunk_document(DOC, ChunkConfig("fixed", size=40, overlap=10))
    assert all(len(words(c.text)) <= 40 for c in chunks)
    for a, b in zip(chunks, chunks[1:], strict=False):
        assert words(a.text)[-10:] == words(b.text)[:10]


def test_semantic_respects_headings_and_keeps_table_whole():
    rows = [c for c in chunk_document(DOC, ChunkConfig("semantic", size=40, overlap=0, tables="rows"))
            if "- product: Sprout; days: 45" in c.text]
    assert len(rows) == 1 and "- product: Probe; days: 14" in rows[0].text and "|" not in rows[0].text
    chunks = chunk_document(DOC, ChunkConfig("semantic", size=40, overlap=0))
    table = [c for c in chunks if "| Sprout | 45 |" in c.text]
    assert len(table) == 1 and "| Probe | 14 |" in table[0].text  # the table is not cut
    assert table[0].section == "Returns policy › Window"
    exc = [c for c in chunks if "Opened probes" in c.text][0]
    assert exc.section == "Returns policy › Exceptions" and "| Sprout" not in exc.text
    assert all(len(words(c.text)) <= 40 for c in chunks)


def test_hierarchical_children_inside_parents():
    chunks = chunk_document(DOC, ChunkConfig("hierarchical", size=20, overlap=5, parent_size=80))
    parents = {c.id: c for c in chunks if c.parent_id is None}
    children = [c for c in chunks if c.parent_id]
    assert parents and children
    assert all(not p.indexed for p in parents.values()) and all(c.indexed for c in children)
    for c in children:
        p = parents[c.parent_id]
        assert p.start <= c.start and c.end <= p.end and c.text in p.text
    assert all(len(words(p.text)) <= 80 for p in parents.values())


def test_contextual_header_and_stable_ids():
    on = chunk_document(DOC, ChunkConfig("semantic", size=40, overlap=0, contextual=True))
    off = chunk_document(DOC, ChunkConfig("semantic", size=40, overlap=0, contextual=False))
    assert [c.id for c in on] == [c.id for c in off] == [c.id for c in chunk_document(DOC, ChunkConfig(size=40))]
    exc = [c for c in on if "Opened probes" in c.text][0]
    assert exc.index_text.startswith("Returns policy › Returns policy › Exceptions\n")
    assert all(c.index_text == c.text for c in off)
    assert on[0].id == "policies/returns.md#s0"


def test_table_rows_name_their_headers():
    text = ("Intro | not a table.\n\n"
            "Header a | b\n--- | :---:\nx | y\n\n"  # no outer pipes
            "| Item | Note | Price |\n|:--|---|--:|\n| Lid \\| cap | | EUR 5 |\n| Box | big | EUR 9 | extra |\n"
            "after the table")
    assert table_rows(text).split("\n") == [
        "Intro | not a table.", "",
        "- Header a: x; b: y", "",
        "- Item: Lid | cap; Price: EUR 5",  # an escaped pipe stays in its cell; an empty cell is left out
        "- Item: Box; Note: big; Price: EUR 9; extra",  # a cell past the headers keeps its value
        "after the table"]
    assert table_rows("a | b\n---\nc | d") == "a | b\n---\nc | d"  # '---' without a '|' is no delimiter line
    # headers far longer than their cells would multiply the text: such a table stays a grid
    head = "| " + " | ".join("h" * 200 for _ in range(50)) + " |\n"
    hostile = head + "|---" * 50 + "|\n" + ("| x " * 50 + "|\n") * 200
    assert table_rows(hostile) == hostile


def test_long_table_rows_keep_their_headers_in_every_chunk():
    rows = "\n".join(f"| Limit {i} | {i} | {i * 10} |" for i in range(40))
    doc = Document("plans.md", "/x/plans.md", "Plans", f"# Plans\n\n| Limit | Free | Pro |\n|---|---|---|\n{rows}",
                   "abc", 0.0)
    chunks = chunk_document(doc, ChunkConfig("semantic", size=40, overlap=0, tables="rows"))
    assert len(chunks) > 3 and all(len(words(c.text)) <= 40 for c in chunks)
    lines = [ln for c in chunks for ln in c.text.split("\n") if ln.startswith("- ")]
    assert len(lines) == 40 and all(re.fullmatch(r"- Limit: Limit \d+; Free: \d+; Pro: \d+", ln) for ln in lines)
    grid = chunk_document(doc, ChunkConfig("semantic", size=40, overlap=0))
    assert sum("| Limit | Free | Pro |" in c.text for c in grid) == 1  # a grid's later chunks lose the header


def test_bad_config_names_the_flag():
    with pytest.raises(ValueError, match="--tables"):
        ChunkConfig(tables="csv")
    with pytest.raises(ValueError, match="--chunker"):
        ChunkConfig("sentences")
    with pytest.raises(ValueError, match="--overlap"):
        ChunkConfig("fixed", size=20, overlap=20)
