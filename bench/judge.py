"""The reader's judgement as an abstention signal, per prompt layout: ROC AUC for "unanswerable scores lower".

For each golden question of one split the default pipeline retrieves its passages once, and the reader is asked
"do these sources state the answer to this exact question?" in three layouts; the signal is the log-odds of "Yes"
over "No" for the first reply token (``Generator.judge``):

- ``shipped``: ``rag.generate``'s two-turn conversation (system prompt, a worked example, the sources and the
  question, then the yes/no question; the answer follows as a second turn on the same prefix);
- ``appended``: the layout before 2026-12-03 — the answer prompt (question, sources, question again) with the
  yes/no question appended to its last turn;
- ``alone``: the yes/no question on the sources with no system prompt and no example (costs a second reading of
  the sources when an answer follows, since nothing is shared with the answer prompt).

With ``--answers`` the shipped prompt's answer to each answerable question is generated too (no gate) and scored
by "contains". Choose on the ``train`` split; ``test`` is for reporting what was chosen.

    python -m bench.judge --split train --answers --json .openbook/reports/judge-train.json   # ~10 min, 1.5B

Left out: picking thresholds (``rag.choose.calibrate`` does that for the shipped layout).
"""

from __future__ import annotations

import argparse
import sys
import time

from tqdm import tqdm

from rag import metrics as M
from rag.config import setup_logging, write_report
from rag.evaluate import golden_for, load_golden
from rag.generate import ASK, DEMO, SYSTEM, redact
from rag.pipeline import RagConfig, RagPipeline
from rag.ranking import sources


def layouts(gen) -> dict:
    """name → function(question, sources) giving the judgement's chat messages."""
    def old_turn(q, src):
        blocks = [f"Source {i} ({label}):\n{gen.sanitize(redact(text, gen.control_tokens)).strip()}"
                  for i, (label, text) in enumerate(src, 1)]
        return f"Question: {q}\n\n" + "\n\n".join(blocks) + f"\n\nQuestion: {q}"

    def appended(q, src):
        demo_q, demo_sources, demo_a = DEMO
        return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": old_turn(demo_q, demo_sources)},
                {"role": "assistant", "content": demo_a},
                {"role": "user", "content": old_turn(q, src) + "\n\nBefore answering: do the sources above state "
                 "the answer to this exact question? Reply Yes or No."}]

    def alone(q, src):
        return [{"role": "user", "content": gen.judge_prompt(q, src)[-1]["content"]}]

    return {"shipped": gen.judge_prompt, "appended": appended, "alone": alone}


def run(docs: str, split: str, answers: bool, model: str) -> dict:
    pipe = RagPipeline(RagConfig(docs=docs, model=model))
    pipe.update_index(progress=False)
    gen = pipe.generator
    questions = [q for q in load_golden(golden_for(docs), docs) if q["split"] == split]
    ways = layouts(gen)
    rows, t0 = [], time.perf_counter()
    for q in tqdm(questions, desc=f"judge layouts ({split})", unit="question"):
        src = sources(pipe.ranked(q["question"]).hits[:pipe.cfg.k])
        row = {"id": q["id"], "unanswerable": q["answer"] is None}
        row |= {name: gen._yes_logodds(make(q["question"], src)) for name, make in ways.items()}
        if answers and q["answer"] is not None:
            reply = gen.answer(q["question"], src).text
            row |= {"answer": reply, "contains": M.contains(reply, [q["answer"], *q["aliases"]])}
        rows.append(row)
    unanswerable = [r["unanswerable"] for r in rows]
    auc = {name: M.separation_auc([r[name] for r in rows], unanswerable) for name in ways}
    scored = [r["contains"] for r in rows if "contains" in r]
    return {"docs": docs, "split": split, "model": model, "ask": ASK, "n": len(rows),
            "n_unanswerable": sum(unanswerable), "auc": auc, "contains": M.mean(scored) if scored else None,
            "seconds": round(time.perf_counter() - t0, 1), "per_question": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.judge", description=__doc__.splitlines()[0])
    p.add_argument("--docs", default="data/demo", help="folder with a golden file")
    p.add_argument("--split", default="train", help="golden split to measure on (choose on train)")
    p.add_argument("--answers", action="store_true", help="also answer with the shipped prompt and score contains")
    p.add_argument("--model", default=RagConfig.model, help="reader (default: the RAG default)")
    p.add_argument("--json", default=".openbook/reports/judge.json", help="where the results go")
    a = p.parse_args(argv)
    setup_logging()
    result = run(a.docs, a.split, a.answers, a.model)
    print(f"{a.split}: {result['n']} questions ({result['n_unanswerable']} unanswerable); ROC AUC "
          + ", ".join(f"{k} {v:.3f}" for k, v in result["auc"].items())
          + (f"; shipped answers contain {result['contains']:.3f}" if result["contains"] is not None else ""))
    write_report(result, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
