"""RAFT rows: the oracle is in exactly (1 − P) of answerable rows, cited correctly, and test questions never leak."""

from __future__ import annotations

import json
import re

import pytest

from hybrid.raft import RaftConfig, build_raft, quote, target
from rag.generate import IDK
from rag.metrics import contains
from tests.test_finetune_data import GOLDEN as FT_GOLDEN

GOLDEN = [*FT_GOLDEN,
          {"id": "t3", "question": "How much does the Plus plan cost?", "answer": "EUR 23 per month",
           "sources": ["pricing.md"], "type": "table", "split": "train"},
          {"id": "t4", "question": "How much water does a lawn need each week?", "answer": "25 millimetres",
           "sources": ["garden/watering.txt"], "type": "lookup", "split": "train"},
          {"id": "t5", "question": "In which year was the company founded?", "answer": "2014",
           "sources": ["history.md"], "type": "lookup", "split": "train"}]


def test_quote_and_target():
    assert quote("Intro line. Lawns need 25 millimetres of water. Done.", ["25 millimetres"]) == \
        "Lawns need 25 millimetres of water."
    assert quote("Nothing here.", ["45 days"]) is None
    assert target("45 days", 2, None) == "45 days [2]"


def shown(row: dict) -> list[tuple[str, str]]:
    """(number, text) of each passage in a row's prompt."""
    turn = next(m["content"] for m in reversed(row["messages"]) if m["content"].startswith("Sources:"))
    return re.findall(r"\[(\d)\] [^\n]*\n(.*?)(?=\n\n\[\d\]|\n\nQuestion:)", turn, re.S)


@pytest.fixture(scope="module")
def raft(tmp_path_factory):
    from tests.conftest import write_corpus

    root = tmp_path_factory.mktemp("raft")
    docs = write_corpus(root / "docs")
    (root / "golden.jsonl").write_text("\n".join(json.dumps(q) for q in GOLDEN))
    cfg = RaftConfig(model="smollm2-135m",
                     docs=str(docs), golden=str(root / "golden.jsonl"), out=str(root / "raft" / "data"),
                     index_dir=str(root / "index"), k=3, p_no_oracle=0.5, paraphrases=0, synthetic_chunks=0,
                     refusals=True, targets="quote")
    ds, stats = build_raft(cfg, progress=False)
    return list(ds), stats, cfg


def test_oracle_share_and_citations(raft):
    rows, stats, _ = raft
    answerable = [r for r in rows if r["answer"] is not None]
    assert len(answerable) == 4 and stats["skipped"] == 0
    assert sum(r["oracle"] for r in answerable) == 2  # exactly (1 − 0.5) × 4
    for r in answerable:
        passages = shown(r)
        assert len(passages) == 3
        holding = [int(n) for n, text in passages if contains(text, [r["answer"]])]
        if r["oracle"]:
            assert holding and r["target"].startswith(f"{r['answer']} [{holding[0]}]")
        else:
            # distractors only: the default target is the memorised answer, uncited (the RAFT paper's)
            assert not holding and r["target"] == r["answer"]


def test_without_refusals_the_answerable_rows_stay_the_same(raft, tmp_path):
    """``--no-refusals`` leaves out the unanswerable questions' "I don't know." rows and changes no other row."""
    from dataclasses import replace

    rows, _, cfg = raft
    ds, stats = build_raft(replace(cfg, out=str(tmp_path / "data"), refusals=False), progress=False)
    assert stats["unanswerable"] == 0 and any(r["answer"] is None for r in rows)
    assert [r["target"] for r in ds] == [r["target"] for r in rows if r["answer"] is not None]


def test_counterfactual_rows_cite_the_edited_value_and_change_no_other_row(raft, tmp_path):
    """``--p-counterfactual``: the oracle keeps its place but states another value, and the target follows it."""
    from dataclasses import replace

    rows, _, cfg = raft
    ds, stats = build_raft(replace(cfg, out=str(tmp_path / "data"), p_counterfactual=0.5), progress=False)
    edited = [r for r in ds if r["counterfactual"]]
    assert stats["counterfactual"] == len(edited) == 2  # round(0.5 × 4) of the 2 rows that keep their oracle
    for r, before in zip(ds, rows, strict=True):
        if not r["counterfactual"]:
            assert r["messages"] == before["messages"] and r["target"] == before["target"]
            continue
        passages = shown(r)
        assert not any(contains(text, [r["answer"]]) for _, text in passages)
        holding = [int(n) for n, text in passages if contains(text, [r["counterfactual"]])]
        assert r["counterfactual"] != r["answer"] and holding
        assert r["target"].startswith(f"{r['counterfactual']} [{holding[0]}]")
        assert r["messages"][-1]["content"] == r["target"]
    with pytest.raises(ValueError, match="p-counterfactual"):
        replace(cfg, p_counterfactual=0.6)  # only the half of the rows that keep their oracle can be edited


def test_prompt_is_rags_and_test_questions_never_appear(raft):
    rows, _, _ = raft
    assert all(r["messages"][0]["role"] == "system" and r["messages"][-1]["role"] == "assistant" for r in rows)
    asked = {r["question"] for r in rows}
    assert not {q["question"] for q in GOLDEN if q["split"] == "test"} & asked
    refusal = [r for r in rows if r["answer"] is None]
    assert len(refusal) == 1 and refusal[0]["target"] == IDK


def test_re_uses_finetune_questions_only_when_built_the_same_way(tmp_path, monkeypatch):
    from dataclasses import asdict

    from datasets import Dataset

    from finetune.data import DataConfig
    from hybrid.raft import finetune_questions
    from rag.config import artefacts
    from tests.conftest import write_corpus

    monkeypatch.chdir(tmp_path)  # artefacts live under ./.openbook
    docs = write_corpus(tmp_path / "docs")
    built = DataConfig(docs=str(docs), paraphrases=3, synthetic_chunks=0)
    rows = [{"fact": f, "original": i == 0, "question": f"{f} wording {i}", "answer": "x", "source": "a.md",
             "kind": "golden", "messages": []} for f in ("f1", "f2") for i in range(4)]
    rows.append({"fact": "general-0", "original": True, "question": "What is 2 + 2?", "answer": None,
                 "source": None, "kind": "general", "messages": []})  # replay: not a question about the documents
    src = artefacts("finetune", docs) / "data"
    Dataset.from_list(rows).save_to_disk(str(src))
    (src / "build.json").write_text(json.dumps({"config": asdict(built), "stats": {}}))

    got, stats = finetune_questions(DataConfig(docs=str(docs), paraphrases=1, synthetic_chunks=0))
    assert sorted(r["question"] for r in got) == ["f1 wording 0", "f1 wording 1", "f2 wording 0", "f2 wording 1"]
    assert stats["rows"] == 4
    assert finetune_questions(DataConfig(docs=str(docs), paraphrases=4, synthetic_chunks=0)) is None  # too few
    assert finetune_questions(DataConfig(docs=str(docs), paraphrases=1, synthetic_chunks=0, seed=1)) is None


def test_self_targets_are_the_readers_right_answers_and_change_no_other_row(raft, tmp_path):
    """``--targets self``: a row that shows its oracle takes the base reader's own answer to the same prompt when
    it states the expected value and cites the oracle first; every other row, and every prompt, is unchanged.
    The 1.5B reader answers these questions with a citation; SmolLM2-135M answers without one, so it keeps every
    quote target."""
    from dataclasses import replace

    from rag.generate import citations
    from rag.metrics import said

    _, _, cfg = raft
    for model in ("qwen-1.5b", "smollm2-135m"):
        same = replace(cfg, model=model, p_no_oracle=0.0)
        quoted, _ = build_raft(replace(same, out=str(tmp_path / model / "quote")), progress=False)
        own, stats = build_raft(replace(same, out=str(tmp_path / model / "self"), targets="self"), progress=False)
        took = 0
        for r, before in zip(own, quoted, strict=True):
            assert r["messages"][:-1] == before["messages"][:-1] and r["messages"][-1]["content"] == r["target"]
            if r["target"] == before["target"]:
                continue
            took += 1
            assert r["oracle"] and contains(said(r["target"]), [r["answer"]]) and "Quote:" not in r["target"]
            assert citations(r["target"], cfg.k)[0] == r["cite"] == int(re.search(r"\[(\d)\]", before["target"])[1])
        assert stats["self_targets"] == took
        assert took >= 1 if model == "qwen-1.5b" else took == 0
    with pytest.raises(ValueError, match="--targets"):
        replace(cfg, targets="mine")
