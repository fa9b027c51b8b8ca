"""Compare on a tiny corpus: every system gets a row of finite numbers, the report holds them all, and an edit
re-indexed into a copy of the corpus reaches the RAG answer (freshness)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from hybrid.compare import compare
from hybrid.freshness import apply_edits
from hybrid.systems import SYSTEMS, CompareConfig, judged, with_generator
from rag.pipeline import RagConfig, RagPipeline
from rag.ranking import Ranking
from tests.test_hybrid_raft import GOLDEN

EDITS = [{"id": "e-01", "path": "returns.md", "find": "within 45 days", "replace": "within 60 days",
          "why": "longer return window"}]
CHANGED = [{"id": "f-01", "question": "How many days do customers have to return a device?", "answer": "60 days",
            "aliases": [], "sources": ["returns.md"], "type": "lookup", "split": "test", "old_answer": "45 days",
            "edit": "e-01"}]


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    from finetune.train import TrainConfig, train
    from hybrid.raft import RaftConfig, build_raft
    from tests.conftest import write_corpus

    root = tmp_path_factory.mktemp("compare")
    docs = write_corpus(root / "docs")
    # no unanswerable train question: no calibrated threshold, so every system generates for every question
    (docs / "golden.jsonl").write_text("\n".join(json.dumps(q) for q in GOLDEN if q["id"] != "t2"))
    (docs / "changes").mkdir()
    (docs / "changes" / "edits.jsonl").write_text("\n".join(json.dumps(e) for e in EDITS))
    (docs / "changes" / "golden.jsonl").write_text("\n".join(json.dumps(q) for q in CHANGED))
    index = str(root / "index")
    raft, _ = build_raft(RaftConfig(model="smollm2-135m",
                                    docs=str(docs), index_dir=index, out=str(root / "raft" / "data"),
                                    paraphrases=0, synthetic_chunks=0), progress=False)
    few = dict(model="smollm2-135m", max_steps=2, batch_size=2, max_length=512, threads=1, eval_steps=10)
    train(TrainConfig(output_dir=str(root / "raft" / "m"), **few), raft)
    # the closed-book adapter: a few steps on the same questions in the closed-book format
    from datasets import Dataset

    from finetune.data import closed_book_messages, format_answer

    rows = [{"messages": closed_book_messages(q["question"], format_answer(q["answer"], (q["sources"] or [None])[0]))}
            for q in GOLDEN if q["split"] == "train"]
    Dataset.from_list(rows).save_to_disk(str(root / "ft" / "data"))  # where `--seeds` finds the training data
    train(TrainConfig(output_dir=str(root / "ft" / "m"), **few), Dataset.from_list(rows))
    cfg = CompareConfig(model="smollm2-135m", docs=str(docs), index_dir=index, finetuned=str(root / "ft" / "m"),
                        raft=str(root / "raft" / "m"), latency_sample=1, bootstrap=200, out=str(root / "report"))
    return compare(cfg, with_freshness=True, progress=False), cfg


def test_every_system_has_finite_scores(result):
    res, _ = result
    assert list(res["systems"]) == list(SYSTEMS)
    for name, s in res["systems"].items():
        assert 0 <= s["contains"]["mean"] <= 1 and 0 <= s["hallucination_rate"]["mean"] <= 1, name
        lo, hi = s["contains"]["ci"]
        assert lo <= s["contains"]["mean"] <= hi
        assert math.isfinite(s["latency_ms"]["total"]["p50"]) and s["prompt_tokens"] >= 0
    rows = res["per_question"]
    # no calibrated rule here (no unanswerable train question), so the reader's judgement gates (judge<0): a
    # question the gate refused was never answered and counts no prompt tokens
    for name in SYSTEMS:
        assert all(r["prompt_tokens"] > 0 for r in rows[name] if not r["abstained"]), name
    # retrieval systems read passages: their prompts are longer than closed-book ones
    answered = [r["prompt_tokens"] for r in rows["rag"] if not r["abstained"]]
    assert answered and min(answered) > max(r["prompt_tokens"] for r in rows["base"])
    assert res["systems"]["base"]["faithfulness"] is None
    assert set(res["differences"]) == set(SYSTEMS) - {"rag"}
    assert len(res["pairwise"]) == 10 and "rag - base" in res["pairwise"]  # every pair, later minus earlier
    # a pair and its reference difference agree: (base - rag) is minus (rag - base)
    assert res["pairwise"]["rag - base"]["contains"]["diff"] == -res["differences"]["base"]["contains"]["diff"]
    assert -1 <= res["forgetting"]["hybrid"] <= 1  # the RAFT adapter's general probes, measured by compare


def test_the_raft_adapters_forgetting_is_kept_beside_it_and_read_without_a_model(result, monkeypatch):
    """The RAFT adapter's general probes (``make hybrid`` measures them; here the first compare did) are saved
    beside the adapter; a later compare reads them without loading a model while the adapter is the same."""
    from hybrid import compare as C

    res, cfg = result
    saved = json.loads((Path(cfg.raft) / "probes.json").read_text())
    assert saved["change"] == res["forgetting"]["hybrid"] == round(saved["tuned"] - saved["base"], 4)
    monkeypatch.setattr(C, "model_to_score", lambda *a, **k: pytest.fail("the probes were asked again"))
    assert C.forgetting(cfg, ["hybrid"])["hybrid"] == saved["change"]


def test_report_files_hold_every_system(result):
    from hybrid import report

    res, cfg = result
    paths = report.write(res, cfg.out)
    md, page = paths["markdown"].read_text(), paths["html"].read_text()
    for name in SYSTEMS:
        assert f"| {name} |" in md or f" {name} " in md.splitlines()[4]
        assert name in page
    assert "data:image/png;base64," in page and "Decision matrix" in md


def test_freshness_reaches_retrieval_after_reindex(result):
    res, _ = result
    f = res["freshness"]
    assert f["reembedded_chunks"] > 0 and f["retrieved_new"] == 1.0  # the edited passage is what RAG reads
    # closed-book weights never saw the edit, so they cannot give the new value by reading it
    assert f["systems"]["rag"]["update"] == "re-index" and f["systems"]["finetuned"]["update"] == "retrain"


def test_freshness_judges_each_changed_question_once(result, monkeypatch):
    """The base model's judgement gates every retrieval system alike, so freshness asks it once a question and
    hands it on (as the comparison does), not once per system (~5 s a question for the 1.5B on 2 cores)."""
    from hybrid.freshness import freshness

    _, cfg = result
    base = RagPipeline(RagConfig(docs=cfg.docs, index_dir=cfg.index_dir, model=cfg.model, backend=cfg.backend))
    base.update_index(progress=False)
    asked, real = [], RagPipeline.judge
    monkeypatch.setattr(RagPipeline, "judge", lambda self, q, hits: asked.append(q) or real(self, q, hits))
    kind = type(base.generator)  # RAG's own arm judges with its answers (llama.cpp: judge_answer_batch)
    together = kind.judge_answer_batch
    monkeypatch.setattr(kind, "judge_answer_batch", lambda self, asks, passes, desc="": asked.extend(
        q for q, _ in asks) or together(self, asks, passes, desc))
    f = freshness(cfg, base, progress=False)
    assert sum(s in f["systems"] for s in ("rag", "finetuned+rag", "hybrid")) == 3
    assert sorted(asked) == sorted(q["question"] for q in f["asked"])  # judge<0 gates here: one judgement each


def test_apply_edits_refuses_an_ambiguous_find(tmp_path):
    from tests.conftest import write_corpus

    docs = write_corpus(tmp_path / "docs")
    with pytest.raises(ValueError, match="occurs 0 times"):
        apply_edits(docs, tmp_path / "copy", [{"id": "x", "path": "returns.md", "find": "no such text",
                                               "replace": "y"}])


def test_folder_without_golden_uses_held_out_synthetic_questions(tmp_path):
    """No golden file: the comparison answers `finetune data`'s held-out questions and says where they came from."""
    from tests.conftest import write_corpus

    docs = write_corpus(tmp_path / "docs")
    data = tmp_path / "ft" / "data"
    data.mkdir(parents=True)
    held = {"id": "syn-returns.md#s1", "question": "Within how many days may a device be returned?",
            "answer": "45 days", "aliases": [], "sources": ["returns.md"], "type": "synthetic", "split": "test"}
    (data / "heldout.jsonl").write_text(json.dumps(held) + "\n")
    cfg = CompareConfig(model="smollm2-135m",
                        docs=str(docs), index_dir=str(tmp_path / "index"), finetuned=str(tmp_path / "ft" / "m"),
                        systems="base,rag", latency_sample=1, bootstrap=50, probes=0, out=str(tmp_path / "r"))
    res = compare(cfg, progress=False)
    assert "held-out synthetic questions, no golden file" in res["settings"]["questions"]
    assert res["settings"]["n"] == 1 and set(res["systems"]) == {"base", "rag"}


def test_seeds_train_more_adapters_on_the_same_data_and_report_their_spread(result):
    from dataclasses import replace

    from hybrid import report
    from hybrid.compare import over_seeds
    from hybrid.seeds import seed_adapter
    from hybrid.systems import questions
    from rag.pipeline import RagConfig, RagPipeline

    res, cfg = result
    cfg = replace(cfg, seeds=2)
    qs, _, _ = questions(cfg)
    base = RagPipeline(RagConfig(docs=cfg.docs, index_dir=cfg.index_dir, model=cfg.model))
    base.update_index(progress=False)
    rankeds = [base.ranked(q["question"]) for q in qs]
    first = {s: res["per_question"][s] for s in ("finetuned", "rag", "finetuned+rag", "hybrid")}
    spread = over_seeds(cfg, base, qs, rankeds, first)
    assert set(spread) == {"finetuned", "finetuned+rag", "hybrid"}  # rag has no training to repeat
    vs = spread["finetuned+rag"]["vs_finetuned"]  # against the closed-book adapter of the same seed
    assert len(vs) == 2 and all(d["ci"][0] <= d["diff"] <= d["ci"][1] for d in vs)
    assert vs[0]["diff"] == res["pairwise"]["finetuned+rag - finetuned"]["contains"]["diff"]
    assert "finetuned+rag − finetuned with the same seed's adapter" in report.markdown(res | {"seeds": spread})
    for v in spread.values():
        c = v["contains"]
        assert v["n"] == 2 and len(c["per_seed"]) == 2 and c["min"] <= c["mean"] <= c["max"]
        assert set(v["significant_vs_ref"]) == {"contains", "hallucination_rate"}
    from pathlib import Path

    for root in (cfg.finetuned, cfg.raft):
        out = Path(root) / "seeds" / "1"
        assert json.loads((out / "config.json").read_text())["seed"] == 1
        weights = "adapter/adapter_model.safetensors"
        assert (out / weights).read_bytes() != (Path(root) / weights).read_bytes()  # another draw of LoRA's A
        before = (out / "metrics.json").stat().st_mtime
        assert seed_adapter(root, 1) == out and (out / "metrics.json").stat().st_mtime == before
    from hybrid.freshness import freshness

    # the changed facts are asked again with seed 1's adapters too (re-used, not trained again)
    f = freshness(cfg, base, progress=False)
    for s in ("finetuned", "finetuned+rag", "hybrid"):
        per_seed = f["systems"][s]["seeds"]["fresh"]["per_seed"]
        assert len(per_seed) == 2 and per_seed[0] == f["systems"][s]["fresh"]
        assert len(f["systems"][s]["seed_answers"]) == 1 and len(f["systems"][s]["seed_answers"][0]) == len(f["asked"])
    assert "seeds" not in f["systems"]["rag"] and "seeds" not in f["systems"]["base"]
    md = report.markdown(res | {"seeds": spread, "freshness": f})
    assert "## Over 2 training seeds" in md and "| hybrid | " in md.split("## Over 2 training seeds")[1]
    assert "| hybrid | " in md.split("Over 2 training seeds (the table above is seed 0's adapters)")[1]
    with pytest.raises(ValueError, match="--seeds"):
        CompareConfig(docs=cfg.docs, seeds=0)


def test_the_base_model_judges_for_adapter_systems(result):
    """The calibrated rule is the base model's, so an adapter's pipeline is gated by the base model's judgement,
    not its own (a LoRA moves the yes/no log-odds: the 1.5B's adapters fell below the base's threshold on almost
    every question when they judged themselves)."""
    _, cfg = result
    base = RagPipeline(RagConfig(docs=cfg.docs, index_dir=cfg.index_dir, model=cfg.model, backend=cfg.backend))
    base.update_index(progress=False)
    tuned = with_generator(base, cfg, "finetuned+rag")
    assert tuned.generator.adapter and tuned.judge_generator is base.generator  # one base model judges for all
    alone = RagPipeline(RagConfig(**{**vars(tuned.cfg)}), index=base.index)  # e.g. `hybrid ask`: loads the base
    assert alone.judge_generator.adapter is None and alone.generator.adapter == tuned.generator.adapter
    # (values are not compared: llama.cpp's logits for a prompt depend slightly on what its cache already held)
    q = "How many days do customers have to return a device?"
    hits = base.ranked(q).hits[: base.cfg.k]
    assert math.isfinite(alone.judge(q, hits))
    # a later system re-uses the judgements an earlier one asked for; questions not judged stay as they were
    r = Ranking(hits, {}, {"bm25": 1.0})
    again = judged([r, r], [{"signals": {"bm25": 1.0, "judge": 0.25}}, {"signals": {"bm25": 1.0}}])
    assert again[0].signals == {"bm25": 1.0, "judge": 0.25} and again[1] is r


def test_the_hybrid_answers_with_room_for_its_quote(result):
    """The RAFT adapter writes its answer, then a quote of up to 30 words: RAG's 48-token budget cut 12 of 93
    demo test answers mid-quote, so the hybrid's pipelines get ``ANSWER_TOKENS``; the other systems keep RAG's."""
    from hybrid.raft import ANSWER_TOKENS

    _, cfg = result
    base = RagPipeline(RagConfig(docs=cfg.docs, index_dir=cfg.index_dir, model=cfg.model, backend=cfg.backend))
    assert with_generator(base, cfg, "hybrid").cfg.max_new_tokens == ANSWER_TOKENS > base.cfg.max_new_tokens
    assert with_generator(base, cfg, "finetuned+rag").cfg.max_new_tokens == base.cfg.max_new_tokens


def test_a_second_compare_reuses_the_saved_answers_until_something_they_depend_on_changes(result, monkeypatch):
    """Each system's answers are saved when it finishes (hybrid/resume.py): the same comparison again asks no
    question; --no-resume, or a change to the code, asks them all again."""
    import shutil
    from dataclasses import replace
    from pathlib import Path

    import hybrid.resume

    res, cfg = result
    assert {p.name for p in (Path(cfg.out) / "answers").glob("*-seed0.json")} == {f"{s}-seed0.json" for s in SYSTEMS}
    asked = []

    def stub(*args, **kwargs):  # run_closed_book(cfg, system, qs) / run_retrieval(cfg, system, pipe, qs, rankeds)
        asked.append(args[1])
        return res["per_question"][args[1]]

    monkeypatch.setattr(hybrid.resume, "run_closed_book", stub)
    monkeypatch.setattr(hybrid.resume, "run_retrieval", stub)
    cfg = replace(cfg, probes=0)
    again = compare(cfg, progress=False)
    assert asked == [] and again["per_question"] == res["per_question"]
    assert set(again["settings"]["answers_reused"]) == {f"{s}-seed0" for s in SYSTEMS}
    from hybrid import report

    assert "Answers re-used from an earlier run with the same inputs and code: base-seed0 (answered 20" \
        in report.markdown(again)
    # a seed trained into the adapter's folder (what --seeds does) leaves seed 0's answers valid
    extra = Path(cfg.finetuned) / "seeds" / "9"
    extra.mkdir(parents=True)
    try:
        (extra / "metrics.json").write_text("{}")
        compare(cfg, progress=False)
    finally:
        shutil.rmtree(extra)
    assert asked == []
    compare(replace(cfg, resume=False), progress=False)
    assert asked == list(SYSTEMS)
    monkeypatch.setattr(hybrid.resume, "code_stamp", lambda: "edited")
    compare(cfg, progress=False)
    assert asked == list(SYSTEMS) * 2
