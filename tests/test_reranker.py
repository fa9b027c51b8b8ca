"""Re-ranker training support: the fitz-gov split, the ranking metrics, and the trained model (if built)."""

from __future__ import annotations

import math

import pytest

from rag.fitzgov import fitzgov_split, normalise, split_by_text
from rag.metrics import ndcg_at, recall_at, reciprocal_rank
from rag.models import DEFAULT_RERANKER, cache_dir
from rag.train_reranker import RerankerConfig


def test_split_is_deterministic_and_disjoint_by_text():
    train, test = fitzgov_split()
    train2, test2 = fitzgov_split()
    assert [q.qid for q in test] == [q.qid for q in test2]
    assert [q.qid for q in train] == [q.qid for q in train2]
    assert not {normalise(q.text) for q in train} & {normalise(q.text) for q in test}
    assert all(q.relevant for q in train + test)
    texts = {normalise(q.text) for q in train + test}
    assert 0.15 < len({normalise(q.text) for q in test}) / len(texts) < 0.25
    # the split does not depend on the order queries arrive in
    again = split_by_text(list(reversed(train + test)), 0.2, 0)[1]
    assert [q.qid for q in again] == [q.qid for q in test][::-1]


def test_normalise_merges_case_and_punctuation():
    assert normalise("What is  RRF?") == normalise("what is rrf") == "what is rrf"


def test_metrics_on_a_hand_worked_ranking():
    ranked, rel = ["x", "a", "y", "b"], {"a", "b"}
    # DCG = 1/log2(3) + 1/log2(5); IDCG = 1 + 1/log2(3)
    want = (1 / math.log2(3) + 1 / math.log2(5)) / (1 + 1 / math.log2(3))
    assert ndcg_at(ranked, rel) == pytest.approx(want)
    assert ndcg_at(["a", "b"], rel) == pytest.approx(1.0)
    assert ndcg_at(ranked, rel, k=1) == 0.0
    assert recall_at(ranked, rel, k=2) == 0.5
    assert reciprocal_rank(ranked, rel) == 0.5
    assert reciprocal_rank(["x", "y"], rel) == 0.0


def test_config_validation_names_the_flag():
    with pytest.raises(ValueError, match="--loss"):
        RerankerConfig(loss="hinge")
    with pytest.raises(ValueError, match="--neg-depth"):
        RerankerConfig(negatives=30, neg_depth=30)


@pytest.fixture(scope="session")
def trained():
    path = cache_dir() / "rerankers" / DEFAULT_RERANKER
    if not (path / "config.json").exists():
        pytest.skip(f"no trained re-ranker at {path}; run `python -m rag train-reranker`")
    import torch
    from sentence_transformers import CrossEncoder

    torch.set_num_threads(2)
    return CrossEncoder(str(path), device="cpu")


@pytest.mark.parametrize("query, relevant, unrelated", [
    ("How do plants make energy from sunlight?",
     "Photosynthesis occurs in the chloroplasts of plant cells, converting light energy into glucose.",
     "The central bank raised interest rates by a quarter point to slow inflation."),
    ("What is the boiling point of water at sea level?",
     "At sea level, pure water boils at 100 degrees Celsius (212 degrees Fahrenheit).",
     "The midfielder signed a three-year contract with the club on Monday."),
    ("Who wrote the novel Pride and Prejudice?",
     "Pride and Prejudice is an 1813 novel by Jane Austen about Elizabeth Bennet.",
     "To reset the router, hold the power button for ten seconds until the light blinks."),
])
def test_trained_model_prefers_the_relevant_passage(trained, query, relevant, unrelated):
    good, bad = trained.predict([(query, relevant), (query, unrelated)])
    assert good > bad


def test_bf16_reranker_orders_like_fp32_within_a_small_score_gap(trained):
    from rag.rerank import load_reranker, rerank, rerank_precision

    assert rerank_precision("fp32") == "fp32" and rerank_precision("bf16") == "bf16"
    assert rerank_precision("auto") in ("fp32", "bf16")
    query = "How long is the lid warranty?"
    candidates = [("a", "Every lid carries a 7-year warranty against cracks."),
                  ("b", "Lids come in green, grey and sand."),
                  ("c", "The controller keeps time for 30 days without mains power.")]
    fp32 = rerank(load_reranker(DEFAULT_RERANKER, precision="fp32"), query, candidates)
    bf16 = rerank(load_reranker(DEFAULT_RERANKER, precision="bf16"), query, candidates)
    assert [i for i, _ in bf16][0] == [i for i, _ in fp32][0] == "a"
    assert max(abs(dict(fp32)[i] - s) for i, s in bf16) < 0.05  # bf16 keeps ~3 significant digits


MIXED = """
from rag.models import DEFAULT_RERANKER
from rag.rerank import load_reranker, rerank
from rag.runtime import load_generator
ce = load_reranker(DEFAULT_RERANKER, precision="bf16")
gen = load_generator("qwen-1.5b", 4, backend="llamacpp")  # its weights take ggml's AMX kernels; SmolLM2's do not
text = "Every lid carries a 7-year warranty against cracks. " * 20  # a prompt long enough for the tile kernels
for _ in range(2):  # re-rank, then generate, in one process: where both use AMX they must not share a thread
    rerank(ce, "How long is the lid warranty?", [("a", text), ("b", "Lids are green.")])  # bf16 on this thread
    gen.judge("How long is the lid warranty?", [("lids.md", text)])
    gen.answer("How long is the lid warranty?", [("lids.md", text)])
print("ok")
"""


def test_bf16_reranking_and_llamacpp_generation_share_a_process(trained):
    """On a CPU with AMX, bf16 torch work on the generating thread killed the next llama.cpp call with SIGILL."""
    import os
    import subprocess
    import sys

    pytest.importorskip("llama_cpp")
    from rag.models import ModelNotFound, gguf_path

    try:
        gguf_path("qwen-1.5b")
    except ModelNotFound as e:
        pytest.skip(str(e))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-c", MIXED], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", (run.returncode, run.stderr[-2000:])
