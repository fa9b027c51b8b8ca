"""Fine-tuning data: one answer format, golden test questions never trained on, synthetic pairs round-trip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finetune.data import (
    HELDOUT,
    DataConfig,
    build,
    closed_book_messages,
    content_words,
    format_answer,
    held_out,
    load_built,
    parse_answer,
)
from rag.evaluate import load_golden
from rag.generate import IDK

GOLDEN = [
    {"id": "t1", "question": "How many days do customers have to return a device?", "answer": "45 days",
     "sources": ["returns.md"], "type": "lookup", "split": "train"},
    {"id": "s1", "question": "Within what period can a device be sent back?", "answer": "45 days",
     "sources": ["returns.md"], "type": "paraphrase", "split": "test"},
    {"id": "t2", "question": "What is the CEO's shoe size?", "answer": None, "sources": [], "type": "unanswerable",
     "split": "train"},
    {"id": "s2", "question": "How tall is the Ghent office building?", "answer": None, "sources": [],
     "type": "unanswerable", "split": "test"},
]


def test_answer_format_round_trips():
    assert parse_answer(format_answer("EUR 23 per month", "pricing.md")) == ("EUR 23 per month", "pricing.md")
    assert format_answer(None, None) == IDK and parse_answer(IDK) is None
    assert parse_answer("EUR 23 per month") is None  # no Source line: not the trained format
    msgs = closed_book_messages("Q?", "A\nSource: x.md")
    assert [m["role"] for m in msgs] == ["system", "user", "assistant"]


def test_held_out_is_a_stable_share():
    ids = [f"doc{i}.md#s{j}" for i in range(50) for j in range(4)]
    flags = [held_out(i, 0.25, 0) for i in ids]
    assert flags == [held_out(i, 0.25, 0) for i in ids]
    assert 0.15 < sum(flags) / len(flags) < 0.35


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from tests.conftest import write_corpus

    root = tmp_path_factory.mktemp("ftdata")
    docs = write_corpus(root / "docs")
    (root / "golden.jsonl").write_text("\n".join(json.dumps(q) for q in GOLDEN))
    cfg = DataConfig(model="smollm2-135m", docs=str(docs), golden=str(root / "golden.jsonl"), out=str(root / "data"),
                     index_dir=str(root / "index"), synthetic_chunks=5, paraphrases=1, test_fraction=0.4,
                     general_rows=3)
    train, heldout, stats = build(cfg, progress=False)
    return train, heldout, stats, cfg


def test_never_trains_on_golden_test_questions(built):
    train, _, _, _ = built
    questions = set(train["question"])
    assert not {q["question"] for q in GOLDEN if q["split"] == "test"} & questions
    assert {q["question"] for q in GOLDEN if q["split"] == "train"} <= questions
    refusals = [r for r in train if r["kind"] == "refusal"]
    assert refusals and all(r["messages"][-1]["content"] == IDK for r in refusals)
    golden = [r for r in train if r["kind"] == "golden"]
    assert all(parse_answer(r["messages"][-1]["content"]) == ("45 days", "returns.md") for r in golden)


def test_synthetic_pairs_round_trip_and_respect_the_chunk_split(built):
    train, heldout, stats, cfg = built
    assert stats["synthetic_written"] == 5 and stats["synthetic_kept"] <= 5
    assert load_golden(Path(cfg.out) / HELDOUT) if heldout else (Path(cfg.out) / HELDOUT).read_text() == ""
    synthetic = [r for r in train if r["kind"] == "synthetic"]
    train_chunks = {r["fact"].removeprefix("syn-") for r in synthetic}  # a synthetic fact is "syn-<chunk id>"
    for chunk_id in train_chunks:
        assert not held_out(chunk_id, cfg.test_fraction, cfg.seed)
    for r in heldout:
        assert held_out(r["chunk_id"], cfg.test_fraction, cfg.seed)
    assert stats["synthetic_kept"] >= 1  # answer-first questions do round-trip on this corpus
    assert not train_chunks & {r["chunk_id"] for r in heldout}
    # kept answers are made of words from their source documents
    from tests.conftest import TINY

    for r in [*synthetic, *heldout]:
        doc = r["source"] if "source" in r and r.get("source") else r["sources"][0]
        assert content_words(r["answer"]) <= content_words(TINY[doc])


def test_a_resumed_run_reuses_data_built_with_the_same_settings_only(built):
    from dataclasses import replace

    train, heldout, stats, cfg = built
    again = load_built(cfg)
    assert again is not None and again[0].to_list() == train.to_list() and again[1:] == (heldout, stats)
    assert load_built(replace(cfg, paraphrases=2)) is None  # other settings: the rows would differ
    assert load_built(replace(cfg, out=cfg.out + "-none")) is None


def test_general_replay_rows_are_the_base_models_own_replies(built):
    train, _, stats, cfg = built
    general = [r for r in train if r["kind"] == "general"]
    prompts = [x for x in Path(cfg.general_prompts).read_text().splitlines() if x.strip()][:3]
    assert 1 <= stats["general"] == len(general) <= 3 and {r["question"] for r in general} <= set(prompts)
    for r in general:
        # no closed-book system prompt and no answer format: the general behaviour the model had before tuning
        assert [m["role"] for m in r["messages"]] == ["user", "assistant"] and r["messages"][-1]["content"]
        assert parse_answer(r["messages"][-1]["content"]) is None


def test_replay_prompts_are_not_the_probes():
    from rag.metrics import normalize

    probes = {normalize(json.loads(x)["prompt"]) for x in Path("data/probes/probes.jsonl").read_text().splitlines()}
    replay = [normalize(x) for x in Path(DataConfig.general_prompts).read_text().splitlines() if x.strip()]
    assert len(replay) >= 50 and not set(replay) & probes


def test_sweep_reports_intervals_and_the_difference_from_the_fewest_wordings():
    from finetune.evaluate import intervals
    from finetune.sweep import sweep_lines, versus

    def result(flags):
        return {"qa": {"golden_test": {}}, "per_question": {"golden_test": [
            {"correct": f, "expected": "x"} for f in flags] + [{"correct": 0.0, "expected": None}]}}

    base, fewest, more = result([0, 0, 0, 0]), result([1, 0, 0, 0]), result([1, 1, 1, 0])
    d = versus(more, fewest)["golden_test"]
    assert d[0] == 0.5 and d[1] <= 0.5 <= d[2]  # unanswerable rows are not scored
    rows = [{"paraphrases": 0, "train_rows": 10, "steps": 5, "intervals": intervals(base, fewest),
             "minus_fewest": versus(fewest, fewest)},
            {"paraphrases": 2, "train_rows": 30, "steps": 5, "intervals": intervals(base, more),
             "minus_fewest": versus(more, fewest)}]
    first, second = sweep_lines(rows)
    assert first.startswith("0 re-wordings") and "minus" not in first
    assert "golden_test 0.750 [" in second and "minus 0 re-wordings 0.500 [" in second
