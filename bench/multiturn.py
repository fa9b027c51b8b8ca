"""Follow-up questions: recall@k of the second turn's source searched for as asked, rewritten, and hand-written.

Each two-turn conversation in ``<docs>/conversations.jsonl`` (``data/demo/conversations.jsonl``: ten written for
the demo corpus, each second turn meaningful only after the first) is played as a chat: the pipeline answers the
first question, its answer becomes the assistant turn, and the follow-up is then searched for three ways: as asked
(what retrieval saw before ``rag/rewrite.py``), as the reader rewrote it from the conversation, and as the
hand-written ``standalone`` question (the ceiling a perfect rewrite would reach). Retrieval is scored against the
second turn's ``sources`` as ``rag eval`` scores it (recall@1/3/5/10 over the ranked passages, MRR); the second
answer is generated for the as-asked and rewritten queries and scored by ``contains``. The default pipeline
settings apply (mode, abstention rule), so an as-asked follow-up may also be refused by the gate.

    python -m bench.multiturn --json docs/results/multiturn-demo.json   # a few minutes on 2 cores (1.5B reader)

Left out: conversations longer than two turns, and follow-ups that change the topic entirely.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections import Counter
from pathlib import Path

from rag import metrics as M
from rag.config import load_jsonl, setup_logging, write_report
from rag.pipeline import RagConfig, RagPipeline
from rag.rewrite import standalone

log = logging.getLogger("bench.multiturn")
WAYS = ("as_asked", "rewritten", "standalone")
KS = (1, 3, 5, 10)


def scores(pipe: RagPipeline, query: str, expected: set[str]) -> tuple[dict, list[str]]:
    docs = [h.doc_id for h in pipe.ranked(query, k=max(KS)).hits]
    return {**{f"recall@{k}": M.recall_at(docs, expected, k) for k in KS},
            "mrr": M.reciprocal_rank(docs, expected)}, docs


def correct(text: str, abstained: bool, turn: dict) -> float:
    return float(not abstained and bool(M.contains(text, [turn["answer"], *turn.get("aliases", [])])))


def run(pipe: RagPipeline, conversations: list[dict]) -> dict:
    rows = []
    for c in conversations:
        first, follow = c["turns"]
        t0 = time.perf_counter()
        a1 = pipe.answer(first["question"])
        messages = [{"role": "user", "content": first["question"]}, {"role": "assistant", "content": a1.text},
                    {"role": "user", "content": follow["question"]}]
        rw = standalone(pipe.generator, messages)
        queries = {"as_asked": follow["question"], "rewritten": rw.query, "standalone": c["standalone"]}
        row = {"id": c["id"], "kind": c.get("kind"), "first_answer": a1.text,
               "first_correct": correct(a1.text, a1.abstained, first), "queries": queries,
               "rewrite_reason": rw.reason, "rewrite_s": round(rw.seconds, 2), "sources": follow["sources"]}
        row["retrieval"], row["retrieved"] = {}, {}
        for way, q in queries.items():
            row["retrieval"][way], row["retrieved"][way] = scores(pipe, q, set(follow["sources"]))
        for way in ("as_asked", "rewritten"):
            a2 = pipe.answer(queries[way])
            row.setdefault("answers", {})[way] = {"text": a2.text, "abstained": a2.abstained,
                                                  "correct": correct(a2.text, a2.abstained, follow)}
        log.info("%s: %s -> %r (%s), recall@3 as asked %.0f, rewritten %.0f, %.0f s", c["id"], follow["question"],
                 rw.query, rw.reason, row["retrieval"]["as_asked"]["recall@3"],
                 row["retrieval"]["rewritten"]["recall@3"], time.perf_counter() - t0)
        rows.append(row)
    metrics = [*(f"recall@{k}" for k in KS), "mrr"]
    return {"settings": {"docs": pipe.cfg.docs, "model": pipe.cfg.model, "k": pipe.cfg.k, "mode": pipe.mode,
                         "abstain": pipe.cfg.abstain, "conversations": len(rows)},
            "retrieval": {w: {m: M.mean([r["retrieval"][w][m] for r in rows]) for m in metrics} for w in WAYS},
            "answers_contains": {w: M.mean([r["answers"][w]["correct"] for r in rows]) for w in ("as_asked",
                                                                                                 "rewritten")},
            "first_turn_contains": M.mean([r["first_correct"] for r in rows]),
            "rewrites": dict(Counter(r["rewrite_reason"] for r in rows)),
            "rewrite_ms": M.percentiles([r["rewrite_s"] for r in rows]),
            "per_conversation": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.multiturn", description=__doc__.splitlines()[0])
    p.add_argument("--docs", default="data/demo", help="documents folder")
    p.add_argument("--conversations", default="", help="two-turn conversations (default <docs>/conversations.jsonl)")
    p.add_argument("--index-dir", default="", help="the index (default .openbook/index/<folder>)")
    p.add_argument("--model", default=RagConfig.model, help="reader and rewriter (default: the RAG default)")
    p.add_argument("--json", default=".openbook/reports/multiturn.json", help="where the results go")
    a = p.parse_args(argv)
    setup_logging()
    path = Path(a.conversations or Path(a.docs) / "conversations.jsonl")
    if not path.exists():
        print(f"error: no conversations file {path}; pass --conversations FILE", file=sys.stderr)
        return 2
    pipe = RagPipeline(RagConfig(docs=a.docs, index_dir=a.index_dir, model=a.model))
    pipe.update_index(progress=False)
    conversations = load_jsonl(path)
    unknown = {s for c in conversations for t in c["turns"] for s in t["sources"]} - set(pipe.index.manifest[
        "documents"])
    if unknown:
        print(f"error: {path}: sources not in {a.docs}: {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    result = run(pipe, conversations)
    result["settings"]["seconds"] = round(time.perf_counter() - t0, 1)
    for w in WAYS:
        r = result["retrieval"][w]
        print(f"{w:11s} " + "  ".join(f"{m} {v:.2f}" for m, v in r.items()))
    print("second answer contains: " + ", ".join(f"{w} {v:.2f}" for w, v in result["answers_contains"].items())
          + f"; rewrites: {result['rewrites']}")
    write_report(result, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
