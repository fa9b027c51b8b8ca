"""Retrieval on a hand-made corpus with known answers: BM25, dense, hybrid, and re-ranking."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rag.bm25 import BM25, tokenize
from rag.ranking import MODES

QUESTIONS = {  # question -> the one document that answers it
    "How many days do I have to return a device?": "returns.md",
    "What does the Plus plan cost each month?": "pricing.md",
    "How much water does a lawn need weekly?": "garden/watering.txt",
    "When does the Ghent office open?": "office.html",
    "In which year was the company founded?": "history.md",
}


def test_tokenizer_stems_drops_stop_words_and_joins_codes():
    assert tokenize("The returns were RETURNED") == ["return", "return"]
    assert "tw300" in tokenize("Model TW-300") and "tw300" in tokenize("model tw300")


def test_bm25_ranking_worked_by_hand():
    ids = ["d1", "d2", "d3"]
    docs = ["apple banana", "apple apple cherry", "cherry date"]
    bm = BM25(ids, [tokenize(d) for d in docs])
    # Lucene idf and Okapi tf saturation, k1=1.5, b=0.75, average length 7/3 tokens
    idf = lambda n: math.log(1 + (3 - n + 0.5) / (n + 0.5))  # noqa: E731
    tf = lambda f, dl: f * 2.5 / (f + 1.5 * (0.25 + 0.75 * dl / (7 / 3)))  # noqa: E731
    expected = [idf(2) * tf(1, 2), idf(2) * tf(2, 3) + idf(2) * tf(1, 3), idf(2) * tf(1, 2)]
    assert np.allclose(bm.scores("apple cherry"), expected)
    # a term in 2 of 3 documents still counts (Okapi idf would be negative here)
    assert {i for i, _ in bm.search("cherry", 3)} == {"d2", "d3"}
    assert bm.search("date", 1)[0][0] == "d3" and bm.search("banana", 1)[0][0] == "d1"
    assert bm.search("zebra", 3) == []  # no shared term, no result


def test_bm25_top_k_equals_a_full_stable_sort_ties_included():
    rng = np.random.default_rng(0)
    words = ["apple", "banana", "cherry", "date", "elder"]
    docs = [" ".join(rng.choice(words, size=3)) for _ in range(200)]  # many identical scores
    bm = BM25([f"d{i}" for i in range(200)], [tokenize(d) for d in docs])
    s = bm.scores("apple cherry")
    full = [(f"d{i}", float(s[i])) for i in np.argsort(-s, kind="stable") if s[i] > 0]
    for k in (1, 7, 50, 199, 200, 500):
        assert bm.search("apple cherry", k) == full[:k], k
    assert bm.backend == "rank-bm25"  # 'auto' below BM25S_FROM chunks


def test_bm25_auto_backend_switches_to_bm25s_on_a_large_corpus_with_the_same_scores():
    from rag.bm25 import BM25S_FROM

    docs = [tokenize(f"item {i} costs {i % 97} euro in zone {i % 13}") for i in range(BM25S_FROM)]
    ids = [str(i) for i in range(BM25S_FROM)]
    big, ref = BM25(ids, docs), BM25(ids, docs, backend="rank-bm25")
    assert big.backend == "bm25s"
    assert np.allclose(big.scores("costs 42 euro zone 7"), ref.scores("costs 42 euro zone 7"), atol=1e-4)


@pytest.mark.parametrize("mode", list(MODES))
def test_every_mode_finds_the_answering_document_first(tiny_pipeline, mode):
    for q, doc in QUESTIONS.items():
        hits, timings, _ = tiny_pipeline.ranked(q, mode=mode, k=3)
        assert hits[0].doc_id == doc, (mode, q, [h.doc_id for h in hits])
        assert len({h.chunk_id for h in hits}) == len(hits)  # de-duplicated
        assert ("rerank" in timings) == (mode == "hybrid+rerank")
        trace: dict = {}
        assert tiny_pipeline.ranked(q, mode=mode, k=3, trace=trace)[0] == hits  # tracing changes nothing
        stages = {"bm25": ["bm25"], "dense": ["dense"], "hybrid": ["bm25", "dense"]}.get(mode, ["bm25", "dense",
                                                                                               "rerank"])
        assert set(trace) == {*stages, "fused", "final"} and trace["final"][0][0] == hits[0].chunk_id


def test_dense_finds_paraphrase_that_bm25_misses(tiny_pipeline):
    q = "Which year did the firm start?"  # no content word shared with history.md
    assert all(h.doc_id != "history.md" for h in tiny_pipeline.ranked(q, mode="bm25", k=3)[0])
    assert tiny_pipeline.ranked(q, mode="dense", k=1)[0][0].doc_id == "history.md"


# (question, a passage that answers it, an unrelated one)
RERANK_TRIPLES = [
    ("How long is the return window?", "Customers may return a device within 45 days of delivery.",
     "Lawns need about 25 millimetres of water per week."),
    ("What is the boiling point of water at sea level?", "At sea level, water boils at 100 degrees Celsius.",
     "The museum opens at nine on weekdays."),
    ("Who wrote the novel Pride and Prejudice?", "Pride and Prejudice is an 1813 novel by Jane Austen.",
     "Copper is a good conductor of electricity."),
    ("How much does the extended warranty cost?", "An extended warranty costs 49 euros per year.",
     "The river floods every spring after the snow melts."),
    ("When was the bridge opened?", "The bridge opened to traffic in 1932 after six years of construction.",
     "Tomatoes need full sun and regular watering."),
    ("What is the maximum upload size?", "Files larger than 20 MB cannot be uploaded.",
     "The committee meets on the first Monday of each month."),
    ("How do I reset my password?", "To reset your password, open Settings and choose Forgot password.",
     "The train to Lyon leaves from platform 4."),
    ("What is the capital of Australia?", "Canberra is the capital city of Australia.",
     "Bananas are rich in potassium."),
    ("How many vacation days do employees get?", "Full-time employees receive 25 days of paid vacation a year.",
     "The printer on floor two uses A4 paper."),
    ("What voltage does the charger accept?", "The charger accepts 100 to 240 volts AC input.",
     "Owls hunt mostly at night."),
]


def test_reranker_scores_relevant_above_irrelevant(tiny_pipeline):
    """Nine of ten, not every one: `make setup` trains the re-ranker on each machine and the training is not
    repeatable (three trainings of one config, three models); one of them tied the first pair (0.077 / 0.077) and
    won the other nine, and on 200 fitz-gov test queries it ranked as well as the others. An untrained head (about
    half right) passes nine of ten about 1% of the time."""
    from rag.rerank import rerank

    won = 0
    for question, answer, unrelated in RERANK_TRIPLES:
        ranked = rerank(tiny_pipeline.reranker, question, [("x", unrelated), ("y", answer)])
        assert 0 <= ranked[1][1] <= ranked[0][1] <= 1
        won += ranked[0][0] == "y" and ranked[0][1] > ranked[1][1]
    assert won >= 9, f"the re-ranker put the answering passage first for {won} of {len(RERANK_TRIPLES)} questions"


def test_a_retrained_reranker_voids_the_calibrated_rule(tiny_pipeline, tmp_path):
    """The rule's key names the re-ranker's weights, not only its name: `train-reranker --force` writes new
    weights under the same name, and thresholds calibrated on the old scores must not be re-used."""
    from dataclasses import replace

    from rag.pipeline import RagPipeline
    from rag.rerank import reranker_stamp

    ce = tmp_path / "ce"
    ce.mkdir()
    (ce / "config.json").write_text("{}")  # only read when the model loads, which this test never does
    (ce / "model.safetensors").write_bytes(b"first weights")
    pipe = RagPipeline(replace(tiny_pipeline.cfg, reranker=str(ce)), index=tiny_pipeline.index)
    before = pipe.calibration_key()
    (ce / "model.safetensors").write_bytes(b"second weights")
    assert pipe.calibration_key() != before and reranker_stamp(str(ce)) in pipe.calibration_key()
    assert reranker_stamp("no/such-cross-encoder") == "no/such-cross-encoder"  # a hub id: its name


def test_hierarchical_hits_show_the_parent(tmp_path):
    from rag.pipeline import RagConfig, RagPipeline
    from tests.conftest import write_corpus

    docs = write_corpus(tmp_path / "docs")
    pipe = RagPipeline(RagConfig(docs=str(docs), index_dir=str(tmp_path / "ix"), chunker="hierarchical",
                                 chunk_size=10, overlap=2, parent_size=60))
    pipe.update_index(progress=False)
    hits, _, _ = pipe.ranked("Opened moisture probes return", mode="hybrid", k=3)
    top = hits[0]
    assert top.doc_id == "returns.md" and "#c" in top.chunk_id
    assert "Opened moisture probes" in top.text and len(top.text) > len(pipe.index.chunks[top.chunk_id].text)
    parents = [pipe.index.chunks[h.chunk_id].parent_id for h in hits]
    assert len(set(parents)) == len(parents)  # one hit per parent


def test_onnx_fast_path_gives_sentence_transformers_vectors():
    from rag.dense import embed, export_onnx, load_embedder, onnx_embed

    folder = export_onnx("minilm")
    assert folder is not None and (folder / "model.onnx").exists()
    texts = ["How long is the return window?", "Customers may return a device within 45 days. " * 80, "x"]
    ref = load_embedder("minilm").encode(texts, normalize_embeddings=True)
    fast = onnx_embed(folder, texts)
    assert fast.shape == ref.shape and np.abs(fast - ref).max() < 1e-4  # the long text is truncated alike
    assert np.allclose(embed("minilm", texts[:1]), ref[:1], atol=1e-4)  # a short call takes the ONNX path
    assert embed("minilm", []).shape == (0, ref.shape[1])


def test_auto_mode_is_the_best_on_the_train_split_and_kept_beside_the_index(tmp_path):
    from rag.choose import choose_mode
    from rag.pipeline import RagConfig, RagPipeline
    from rag.ranking import DEFAULT_MODE
    from tests.conftest import write_corpus

    cfg = dict(docs=str(write_corpus(tmp_path / "docs")), index_dir=str(tmp_path / "ix"), chunk_size=40, overlap=5,
               k=1, model="smollm2-135m")
    pipe = RagPipeline(RagConfig(**cfg))
    pipe.update_index(progress=False)
    assert pipe.cfg.mode == "auto" and pipe.mode == DEFAULT_MODE  # nothing measured yet

    def golden(questions: dict) -> list[dict]:
        return [{"id": f"q{i}", "question": q, "answer": "x", "aliases": [], "sources": [doc], "type": "lookup",
                 "split": "train"} for i, (q, doc) in enumerate(questions.items())]

    # every mode finds these first: the tie goes to the default
    assert choose_mode(pipe, golden(QUESTIONS), progress=False)["mode"] == DEFAULT_MODE
    # a paraphrase BM25 cannot match: whatever wins (a lead of one question is enough here), it is the best
    # measured, and it is what the pipeline uses
    entry = choose_mode(pipe, golden({"Which year did the firm start?": "history.md"}), progress=False, margin=1)
    recall = {m: v["recall@1"] for m, v in entry["train"].items()}
    assert recall["bm25"] == 0.0 and recall[entry["mode"]] == max(recall.values()) == 1.0
    assert pipe.mode == entry["mode"] == RagPipeline(RagConfig(**cfg)).mode  # saved beside the index
    assert RagPipeline(RagConfig(**cfg, mode="bm25")).mode == "bm25"  # an explicit --mode is never overridden
    assert choose_mode(RagPipeline(RagConfig(**cfg, mode="dense")), golden(QUESTIONS), progress=False) is None

    # a rebuild that writes the same bytes (settings changed and changed back) keeps the choice; an edit does not
    from rag.choose import _stamp

    RagPipeline(RagConfig(**cfg | {"chunk_size": 41})).update_index(progress=False)
    again = RagPipeline(RagConfig(**cfg))
    again.update_index(progress=False)
    assert again.index.path != pipe.index.path
    again.ranked = lambda *a, **k: pytest.fail("an identical rebuild measured the retrieval modes again")
    paraphrase = golden({"Which year did the firm start?": "history.md"})
    assert choose_mode(again, paraphrase, progress=False, margin=1)["stamp"] == entry["stamp"]
    (tmp_path / "docs" / "history.md").write_text("# Company history\n\nThe company was founded in 2015.\n")
    edited = RagPipeline(RagConfig(**cfg))
    edited.update_index(progress=False)
    assert _stamp(edited, paraphrase) != entry["stamp"]
