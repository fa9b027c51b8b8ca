"""Benchmarks are not tests; these check their plumbing: the BEIR loader, the bm25s backend, one cheap section."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from bench.quality import BeirError, load_beir
from rag.bm25 import BACKENDS, BM25, tokenize

CORPUS = [
    {"_id": "d1", "title": "Watering", "text": "Lawns need about 25 millimetres of water per week."},
    {"_id": "d2", "title": "Returns", "text": "Customers may return a device within 45 days of delivery."},
    {"_id": "d3", "title": "Offices", "text": "The Ghent office opens at 08:30 and has 12 meeting rooms."},
    {"_id": "d4", "text": "The company was founded in 2014 by two engineers in Ghent."},  # no title
]
QUERIES = [{"_id": "q1", "text": "How much water does a lawn need each week?"},
           {"_id": "q2", "text": "How many days do I have to return a device?"},
           {"_id": "q3", "text": "When was the company founded?"},
           {"_id": "q4", "text": "A query with only a zero-score judgement"}]
QRELS = "query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td2\t1\nq3\td4\t2\nq3\tmissing\t1\nq4\td3\t0\n"


def write_beir(root):
    root.mkdir(parents=True, exist_ok=True)
    (root / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in CORPUS))
    (root / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUERIES))
    (root / "qrels").mkdir(exist_ok=True)
    (root / "qrels" / "test.tsv").write_text(QRELS)
    return root


def test_beir_loader_reads_corpus_queries_and_positive_qrels(tmp_path):
    c = load_beir(write_beir(tmp_path / "tiny"))
    assert c.name == "tiny"
    assert c.docs["d1"] == ("Watering", CORPUS[0]["text"]) and c.docs["d4"][0] == ""
    # the header line is skipped, a zero score is not relevant, an unknown document is dropped
    assert {q.qid: q.relevant for q in c.queries} == {"q1": ("d1",), "q2": ("d2",), "q3": ("d4",)}
    assert c.queries[0].text == QUERIES[0]["text"]


def test_beir_loader_names_what_is_missing(tmp_path):
    root = write_beir(tmp_path / "tiny")
    (root / "qrels" / "test.tsv").unlink()
    with pytest.raises(BeirError, match=r"qrels/test\.tsv"):
        load_beir(root)
    (root / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\n")
    with pytest.raises(BeirError, match="query-id"):
        load_beir(root)


def test_retrieval_quality_on_the_beir_fixture(tmp_path):
    from bench.quality import run_modes

    res = run_modes(load_beir(write_beir(tmp_path / "tiny")), contextual=True, rerank=False, threads=1)
    assert res["documents"] == 4 and res["queries"] == 3 and set(res["systems"]) == {"bm25", "dense", "hybrid"}
    # every query has one relevant document and the corpus is four unambiguous sentences: each mode ranks it first
    for mode, m in res["systems"].items():
        assert m["ndcg@10"] == 1.0 and m["mrr"] == 1.0 and m["recall@100"] == 1.0, mode


def test_bm25s_backend_gives_rank_bm25_scores():
    docs = ["apple banana", "apple apple cherry", "cherry date", ""]
    ids = [f"d{i}" for i in range(len(docs))]
    a, b = (BM25(ids, [tokenize(d) for d in docs], backend=x) for x in BACKENDS)
    for q in ("apple cherry", "cherry", "date banana", "zebra"):
        assert np.allclose(a.scores(q), b.scores(q), atol=1e-5), q
        assert [i for i, _ in a.search(q, 4)] == [i for i, _ in b.search(q, 4)], q
    # worked by hand: Lucene idf, Okapi tf, k1=1.5, b=0.75; the empty document holds one placeholder token, so the
    # average length is (2 + 3 + 2 + 1) / 4 = 2 and a 2-token document has tf(1) = 2.5 / (1 + 1.5) = 1
    idf = lambda n: math.log(1 + (4 - n + 0.5) / (n + 0.5))  # noqa: E731
    assert b.scores("banana")[0] == pytest.approx(idf(1), rel=1e-5)
    assert b.scores("apple")[0] == pytest.approx(idf(2), rel=1e-5)
    with pytest.raises(ValueError, match="auto, rank-bm25 or bm25s"):
        BM25(ids, [[]] * 4, backend="lucene")


def test_backends_section_smoke_and_its_report():
    from bench.backends import bm25_compare, faiss_compare
    from bench.report import render

    bm = bm25_compare(smoke=True)
    assert bm["ndcg_diff_points"] == 0.0 and bm["same_top10_share"] == 1.0
    assert set(bm["backends"]) == set(BACKENDS)
    rng = np.random.default_rng(0)
    real = rng.normal(size=(200, 16)).astype(np.float32)
    real /= np.linalg.norm(real, axis=1, keepdims=True)
    fa = faiss_compare(real, real[:5], (400,))["400"]
    assert fa["exact"]["recall@10_vs_exact"] == 1.0 and fa["recommended"] in fa
    res = {"date": "today", "smoke": True, "host": {"host": "h", "cpu": "c", "cores": 2, "load_avg_1_5_15": []},
           "sections": {"backends": {"bm25": bm, "faiss": {"vectors": "v", "queries": 5, "threads": "1",
                                                          "rule": "r", "sizes": {"400": fa}}}}}
    md = render(res, "x.json")
    assert "## 3. Backends" in md and "| rank-bm25 |" in md and "SMOKE RUN" in md


def test_cli_rejects_an_unknown_section(capsys):
    from bench.__main__ import main

    assert main(["--sections", "scale,nope"]) == 2
    assert "unknown nope" in capsys.readouterr().err
