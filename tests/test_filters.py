"""Metadata and ``--where`` filters on a real index: front matter kept as data, filters applied before fusion."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from rag.chunk import ChunkConfig
from rag.filters import allowed, matching, parse_where
from rag.generate import IDK
from rag.index import Index, update_index
from rag.ingest import load_folder
from rag.metadata import split_front_matter
from rag.pipeline import RagConfig, RagPipeline

CHUNKS = ChunkConfig(size=40, overlap=5)
MTIME = 1592222400.0  # 2020-06-15T12:00:00Z: every file's time, so dates from file times are known
BLOG = ("---\ntags: [news]\ndate: 2023-0{n}-01\n---\n# TW-300 warranty, part {n}\n\nThe TW-300 warranty lasts "
        "{n} years. Warranty claims for the TW-300 go to the warranty desk; the TW-300 warranty covers parts.\n")
DOCS = {
    "policies/returns.md": "---\ntitle: Returns\ntags: [hr, policy]\ndate: 2024-05-01\nowner: legal\n---\n"
    "# Returns\n\nA device may be returned within 45 days. Include the warranty card.\n",
    "policies/leave.md": "---\ntags: HR\ndate: 2024-11-20\ndraft: false\n---\n# Parental leave\n\nStaff get 16 "
    "weeks of paid leave. Leave does not change the warranty of company laptops.\n",
    "policies/travel.md": "---\ntags: [policy, travel]\ndate: 2022-01-10\n---\n# Travel\n\nTrain travel is "
    "reimbursed in second class. Laptops taken on trips keep their warranty.\n",
    "handbook/desks.md": "# Desks\n\nHot desks are booked in the office app before nine.\n",
    "handbook/bikes.md": "---\ndate: someday\ntags: [travel]\n---\n# Bikes\n\nBikes are parked in the basement.\n",
    "broken.md": "---\ntags: [hr\ntitle: broken\n---\n# Canteen\n\nThe canteen opens at noon on weekdays.\n",
    **{f"blog/warranty-{n}.md": BLOG.format(n=n) for n in range(1, 7)},
}
POLICIES = {"policies/returns.md", "policies/leave.md", "policies/travel.md"}
BLOGS = {f"blog/warranty-{n}.md" for n in range(1, 7)}
QUESTION = "How long does the TW-300 warranty last?"


def write_docs(root: Path) -> Path:
    for rel, text in DOCS.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text, encoding="utf-8")
        os.utime(p, (MTIME, MTIME))
    return root


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path, Index]:
    root = tmp_path_factory.mktemp("filters")
    docs = write_docs(root / "docs")
    index, _ = update_index(docs, root / "index", CHUNKS, "minilm", progress=False)
    return docs, root / "index", index


def pipeline(built, **over) -> RagPipeline:
    docs, index_dir, index = built
    return RagPipeline(RagConfig(docs=str(docs), index_dir=str(index_dir), chunk_size=40, overlap=5, **over), index)


def docs_of(hits) -> set[str]:
    return {h.doc_id for h in hits}


def test_front_matter_is_kept_as_metadata_and_not_in_any_chunk_text(built):
    _, _, index = built
    returns = [c for c in index.chunks.values() if c.doc_id == "policies/returns.md"]
    assert returns and all(c.meta["front"] == {"title": "Returns", "tags": ["hr", "policy"], "date": "2024-05-01",
                                               "owner": "legal"} for c in returns)
    for c in index.chunks.values():
        if c.doc_id != "broken.md":
            assert not any(s in f"{c.text}\n{c.index_text}" for s in ("---", "tags:", "owner:", "date:")), c.id
    leave = next(c for c in index.chunks.values() if c.doc_id == "policies/leave.md")
    assert leave.meta["folder"] == "policies" and leave.meta["date"] == "2024-11-20"
    desks = next(c for c in index.chunks.values() if c.doc_id == "handbook/desks.md")  # no front matter
    assert desks.meta == {"folder": "handbook", "modified": "2020-06-15T12:00:00Z", "date": "2020-06-15", "front": {}}
    # the manifest holds each document's metadata once; the chunk store does not repeat it per chunk
    loaded = Index.load(built[1])
    assert loaded.chunks["policies/leave.md#s0"].meta == leave.meta
    assert '"meta"' not in (loaded.path / "chunks.jsonl").read_text(encoding="utf-8")


def test_malformed_front_matter_warns_and_the_file_is_indexed_as_plain_text(built, caplog):
    with caplog.at_level(logging.WARNING, logger="rag.ingest"):
        docs = {d.id: d for d in load_folder(built[0], progress=False)}
    broken = [r.getMessage() for r in caplog.records if "broken.md" in r.getMessage()]
    assert len(broken) == 1 and "front matter ignored" in broken[0] and "not valid YAML" in broken[0]
    assert docs["broken.md"].meta["front"] == {} and docs["broken.md"].text.startswith("---\ntags: [hr")
    # a front matter date that is no date: one warning, and the file's day instead
    bikes = [r.getMessage() for r in caplog.records if "handbook/bikes.md" in r.getMessage()]
    assert len(bikes) == 1 and "'someday' is not a date" in bikes[0]
    assert docs["handbook/bikes.md"].meta["date"] == "2020-06-15"
    assert pipeline(built, mode="bm25").ranked("When does the canteen open?").hits[0].doc_id == "broken.md"


@pytest.mark.parametrize("raw, front, rest", [
    (b"\xef\xbb\xbf---\r\ntags: [a, b]\r\nwhen: 2024-02-29\r\n---\r\n# T\r\n", {"tags": ["a", "b"],
                                                                              "when": "2024-02-29"}, b"# T\r\n"),
    (b"---\n---\nbody\n", {}, b"body\n"),  # empty front matter
    (b"---\nx: .inf\n...\nbody", {"x": "inf"}, b"body"),  # '...' closes it too; inf is no JSON number
    (b"---\nunterminated: yes\n\nbody\n", {}, b"---\nunterminated: yes\n\nbody\n"),  # no closing line: text
    (b"--- \nnot: front\n", {}, b"--- \nnot: front\n"),
])
def test_split_front_matter_cases(raw, front, rest):
    assert split_front_matter(raw, "x.md") == (front, rest)


@pytest.mark.parametrize("block, why", [
    ("a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
     "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: [*c, *c, *c, *c, *c, *c, *c, *c, *c]", "more than 1000 values"),
    ("x: !!python/object/apply:os.system ['touch pwned']", "not valid YAML"),
    ("- just\n- a list", "not a 'key: value' mapping"),
    ("k: " + "v" * (70 << 10), "over the 64 KiB limit"),
])
def test_untrusted_front_matter_is_refused_without_running_or_expanding_it(block, why, caplog, tmp_path,
                                                                          monkeypatch):
    raw = f"---\n{block}\n---\n# Body\n".encode()
    monkeypatch.chdir(tmp_path)  # where os.system would have left its file
    t0 = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="rag.ingest"):
        assert split_front_matter(raw, "evil.md") == ({}, raw)
    assert time.perf_counter() - t0 < 1 and not (tmp_path / "pwned").exists()
    assert why in caplog.text and "evil.md" in caplog.text


@pytest.mark.parametrize("where, expected", [
    (["path=policies/*"], POLICIES),
    (["path=*.md", "path!=blog/*"], {*POLICIES, "handbook/desks.md", "handbook/bikes.md", "broken.md"}),
    (["tag=hr"], {"policies/returns.md", "policies/leave.md"}),  # a list, and a string 'HR': case is ignored
    (["tag=travel"], {"policies/travel.md", "handbook/bikes.md"}),
    (["owner=legal"], {"policies/returns.md"}),
    (["draft=false"], {"policies/leave.md"}),  # a YAML boolean, compared as YAML writes it
    (["date>=2024-01-01"], {"policies/returns.md", "policies/leave.md"}),
    (["date<2023-01-01"], {"policies/travel.md", "handbook/desks.md", "handbook/bikes.md", "broken.md"}),
    (["date=2020-06-15"], {"handbook/desks.md", "handbook/bikes.md", "broken.md"}),  # the file's day
    (["path=policies/*", "tag=hr", "date>=2024-06-01"], {"policies/leave.md"}),  # AND of clauses
    (["tag=hr", "tag=travel"], set()),
])
def test_filters_let_through_exactly_the_matching_documents(built, where, expected):
    _, _, index = built
    assert set(matching(index, where)) == expected
    mask = allowed(index, where)
    assert {index.chunks[cid].doc_id for cid, ok in zip(index.ids, mask, strict=True) if ok} == expected
    for mode in ("bm25", "dense", "hybrid"):
        trace: dict = {}
        hits = pipeline(built, where=where).ranked(QUESTION, mode=mode, k=5, trace=trace).hits
        assert docs_of(hits) <= expected, (mode, where)
        assert {index.chunks[cid].doc_id for lst in trace.values() for cid, _ in lst} <= expected
        if mode != "bm25":  # dense scores every allowed chunk: k come back when k exist
            assert len(hits) == min(5, int(mask.sum()))


@pytest.mark.parametrize("mode", ["bm25", "dense", "hybrid", "hybrid+rerank"])
def test_k_allowed_passages_come_back_when_the_unfiltered_top_k_are_all_disallowed(built, mode):
    # each retriever fetches only k × 1 candidates: a filter applied after fusion would be left with nothing;
    # the dated blog posts are near-identical versions, of which --versions newest would show one
    unfiltered = pipeline(built, k=3, fetch_factor=1, rerank_n=1, versions="all").ranked(QUESTION, mode=mode).hits
    assert len(unfiltered) == 3 and docs_of(unfiltered) <= BLOGS
    trace: dict = {}
    hits = pipeline(built, k=3, fetch_factor=1, rerank_n=1, where=["path=policies/*"]).ranked(
        QUESTION, mode=mode, trace=trace).hits
    assert len(hits) == 3 and docs_of(hits) == POLICIES, [h.chunk_id for h in hits]
    for name in ("bm25", "dense"):  # each retriever's own list is already the allowed chunks'
        if name in trace:
            assert {built[2].chunks[cid].doc_id for cid, _ in trace[name]} == POLICIES


@pytest.mark.parametrize("kind", ["exact", "hnsw"])
def test_dense_filter_returns_the_exact_top_k_of_the_allowed_vectors(kind):
    from rag.dense import DenseIndex

    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((2000, 32)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    ids = [f"c{i}" for i in range(len(vecs))]
    index = DenseIndex(ids, vecs, kind)
    for n_allowed in (1, 4, 300):  # a few allowed: HNSW's walk alone comes back short
        allow = np.zeros(len(vecs), dtype=bool)
        allow[rng.choice(len(vecs), n_allowed, replace=False)] = True
        q = vecs[0]
        sims = np.where(allow, vecs @ q, -np.inf)
        want = [ids[i] for i in np.argsort(-sims, kind="stable")[: min(10, n_allowed)]]
        got = [cid for cid, _ in index.search_vector(q, 10, allow)]
        assert got == want if kind == "exact" else len(got) == len(want) and set(got) <= {ids[i] for i in
                                                                                          np.flatnonzero(allow)}
    assert index.search_vector(vecs[0], 5, np.zeros(len(vecs), dtype=bool)) == []


def test_no_allowed_passage_is_an_i_dont_know_without_loading_the_reader(built, capsys):
    pipe = pipeline(built, where=["tag=nowhere"])
    assert pipe.ranked(QUESTION).hits == []
    a = pipe.answer(QUESTION)
    assert a.abstained and a.text == IDK and a.sources == [] and pipe._generator is None
    from rag.cli import main

    docs, index_dir, _ = built
    argv = ["ask", "--docs", str(docs), "--index-dir", str(index_dir), "--chunk-size", "40", "--overlap", "5",
            "--mode", "bm25", "--where", "tag=nowhere", QUESTION]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"--where tag=nowhere: 0 of {len(DOCS)} documents" in out and "no passage was retrieved" in out


def test_sources_show_the_documents_date_and_tags(built, capsys):
    from rag.cli import _print_answer
    from rag.ranking import Answer

    hits = pipeline(built, where=["owner=legal"]).ranked(QUESTION, mode="bm25").hits
    assert [h.doc_id for h in hits] == ["policies/returns.md"]
    _print_answer(Answer(QUESTION, "Keep the card [1].", False, "", hits, hits, True, None), streamed=False)
    assert "[1] policies/returns.md › Returns  (date 2024-05-01 · tags hr, policy)" in capsys.readouterr().out


@pytest.mark.parametrize("clause", ["tag", "=hr", "tag=", "tag>hr", "owner<=x", "date>=2024-13-01", "date>=soon"])
def test_a_malformed_clause_is_a_one_line_error(clause, capsys):
    from rag.cli import main

    with pytest.raises(ValueError, match="--where"):
        RagConfig(where=[clause])
    assert main(["ask", "--where", "tag=hr", "--where", clause, "a question"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --where") and err.count("\n") == 1


def test_where_from_a_config_file_is_a_list_of_clauses(tmp_path):
    from rag.cli import parser
    from rag.config import config_from
    from rag.config_file import ConfigFileError, parse_args

    (tmp_path / "ok.toml").write_text('[rag]\nwhere = ["tag=hr", "date>=2024-01-01"]\n')
    args = parse_args(parser(), ["ask", "--config", str(tmp_path / "ok.toml"), "q"], "rag")
    assert config_from(args, RagConfig).where == ["tag=hr", "date>=2024-01-01"]
    (tmp_path / "bad.toml").write_text("where = 3\n")
    with pytest.raises(ConfigFileError, match="a string or a list of strings"):
        parse_args(parser(), ["ask", "--config", str(tmp_path / "bad.toml"), "q"], "rag")


def copy_built(built, dest: Path) -> tuple[Path, Path]:
    docs, index_dir, _ = built
    shutil.copytree(docs, dest / "docs")
    shutil.copytree(index_dir, dest / "index")
    return dest / "docs", dest / "index"


def test_reindex_picks_up_front_matter_edits_and_file_times(built, tmp_path):
    docs, index_dir = copy_built(built, tmp_path)
    leave = docs / "policies" / "leave.md"
    leave.write_text(leave.read_text().replace("tags: HR", "tags: [finance]"))
    index, stats = update_index(docs, index_dir, CHUNKS, "minilm", progress=False)
    assert stats.changed == 1 and stats.unchanged == len(DOCS) - 1
    assert set(matching(index, ["tag=hr"])) == {"policies/returns.md"}
    assert set(matching(index, ["tag=finance"])) == {"policies/leave.md"}
    # a file touched, its text the same: its date (from the file time) moves, nothing is re-embedded
    later = MTIME + 3 * 365 * 86400
    os.utime(docs / "handbook" / "desks.md", (later, later))
    index, stats = update_index(docs, index_dir, CHUNKS, "minilm", progress=False)
    assert stats.wrote and stats.metadata == 1 and stats.embedded_chunks == 0
    assert set(matching(Index.load(index_dir), ["date>=2023-06-02"])) == {"handbook/desks.md", "policies/returns.md",
                                                                          "policies/leave.md"}


def test_an_index_from_before_metadata_loads_and_is_upgraded_without_reembedding(built, tmp_path, caplog):
    docs, index_dir = copy_built(built, tmp_path)
    live = index_dir / (index_dir / "CURRENT").read_text().strip()
    manifest = json.loads((live / "manifest.json").read_text())
    for entry in manifest["documents"].values():
        del entry["meta"]
    (live / "manifest.json").write_text(json.dumps(manifest))
    old = Index.load(index_dir)  # loads: each document's folder and file time, no front matter
    assert old.chunks["policies/leave.md#s0"].meta == {"folder": "policies", "modified": "2020-06-15T12:00:00Z",
                                                        "date": "2020-06-15", "front": {}}
    assert matching(old, ["tag=hr"]) == [] and len(matching(old, ["date=2020-06-15"])) == len(DOCS)
    with caplog.at_level(logging.INFO, logger="rag.index"):
        new, stats = update_index(docs, index_dir, CHUNKS, "minilm", progress=False)
    assert "predates document metadata" in caplog.text
    assert stats.wrote and stats.embedded_chunks == 0 and stats.metadata == len(DOCS)
    assert np.array_equal(new.vectors, old.vectors) and new.ids == old.ids
    assert set(matching(Index.load(index_dir), ["tag=hr"])) == {"policies/returns.md", "policies/leave.md"}


def test_clauses_parse_to_what_they_say():
    c = parse_where([" date >= 2024-01-01 ", "title=a=b", "path!=blog/*"])
    assert [(x.key, x.op, x.value) for x in c] == [("date", ">=", "2024-01-01"), ("title", "=", "a=b"),
                                                  ("path", "!=", "blog/*")]
