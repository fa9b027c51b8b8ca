"""Answer-then-verify as abstention signals: after its answer, is the reader sure the sources state it?

For each golden question of one split the default pipeline retrieves its passages once; the reader is asked the
shipped judgement (``judge``), then answers with no gate, then is asked about its own answer in a third turn of the
same conversation (llama.cpp re-reads only the new turn):

- ``verify``: "Is that answer stated in the sources? Answer Yes or No." — log-odds of Yes over No;
- ``grounded``: the share of the answer's figures (words holding a digit) found in the sources' text; 1.0 when the
  answer states no figure;
- ``said_idk``: the answer itself says the sources do not state it.

Every signal's ROC AUC for "unanswerable scores lower" is reported, with the answers' "contains" on the answerable
questions. Choose on ``train``; ``test`` is for reporting what was chosen.

    python -m bench.verify --split train --json .openbook/reports/verify-train.json   # ~10 min, 1.5B

Its answers without a gate also compare reading set-ups (``--mode``, ``--k``, ``--tables rows``,
``--versions all``) on one split.
"""

from __future__ import annotations

import argparse
import re
import sys
import time

from tqdm import tqdm

from rag import metrics as M
from rag.config import setup_logging, write_report
from rag.evaluate import golden_for, load_golden
from rag.generate import is_abstention
from rag.pipeline import RagConfig, RagPipeline
from rag.ranking import sources

VERIFY = "Is that answer stated in the sources? Answer Yes or No."
_FIGURE = re.compile(r"[\w.,/-]*\d[\w.,/-]*")


def _norm(text: str) -> str:
    return re.sub(r"[\s,]", "", text.lower())


def grounded(answer: str, passages: list[str]) -> float:
    """Share of the answer's figures (words with a digit, citation marks aside) that occur in the passages.

    >>> grounded("It costs EUR 495 and weighs 2 kg [1].", ["Price: EUR 495. Weight 3 kg."])
    0.5
    """
    body = re.sub(r"\[\d{1,2}\]", "", answer)
    figures = [f.strip(".,/-") for f in _FIGURE.findall(body)]
    figures = [f for f in figures if f]
    if not figures:
        return 1.0
    text = _norm(" ".join(passages))
    return sum(_norm(f) in text for f in figures) / len(figures)


def run(docs: str, split: str, model: str, mode: str, k: int, tables: str = RagConfig.tables,
        versions: str = RagConfig.versions) -> dict:
    pipe = RagPipeline(RagConfig(docs=docs, model=model, mode=mode, k=k, tables=tables, versions=versions))
    pipe.update_index(progress=False)
    gen = pipe.generator
    questions = [q for q in load_golden(golden_for(docs), docs) if q["split"] == split]
    rows, t0 = [], time.perf_counter()
    for q in tqdm(questions, desc=f"answer then verify ({split})", unit="question"):
        ranked = pipe.ranked(q["question"])
        hits = ranked.hits[:pipe.cfg.k]
        src = sources(hits)
        row = {"id": q["id"], "type": q.get("type", ""), "unanswerable": q["answer"] is None,
               "retrieved": bool(q["sources"]) and any(h.doc_id in q["sources"] for h in hits)}
        row |= {k: float(v) for k, v in ranked.signals.items()}
        row["judge"] = gen.judge(q["question"], src)
        reply = gen.answer(q["question"], src).text
        convo = [*gen.prompt(q["question"], src), {"role": "assistant", "content": reply},
                 {"role": "user", "content": VERIFY}]
        row |= {"answer": reply, "verify": gen._yes_logodds(convo),
                "grounded": grounded(reply, [t for _, t in src]), "said_idk": float(not is_abstention(reply))}
        if q["answer"] is not None:
            row["contains"] = M.contains(reply, [q["answer"], *q["aliases"]])
        rows.append(row)
    unanswerable = [r["unanswerable"] for r in rows]
    names = ["bm25", "dense", "rerank", "judge", "verify", "grounded", "said_idk"]
    auc = {n: M.separation_auc([r.get(n, 0.0) for r in rows], unanswerable) for n in names}
    scored = [r["contains"] for r in rows if "contains" in r]
    return {"docs": docs, "split": split, "model": model, "mode": mode, "k": k, "tables": tables, "versions": versions,
            "verify": VERIFY, "n": len(rows), "n_unanswerable": sum(unanswerable), "auc": auc,
            "contains": M.mean(scored) if scored else None,
            "seconds": round(time.perf_counter() - t0, 1), "per_question": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.verify", description=__doc__.splitlines()[0])
    p.add_argument("--docs", default="data/demo", help="folder with a golden file")
    p.add_argument("--split", default="train", help="golden split to measure on (choose on train)")
    p.add_argument("--model", default=RagConfig.model, help="reader (default: the RAG default)")
    p.add_argument("--mode", default=RagConfig.mode, help="retrieval mode (default: the RAG default)")
    p.add_argument("--k", type=int, default=RagConfig.k, help="passages shown to the reader")
    p.add_argument("--tables", default=RagConfig.tables, help="tables as 'grid' or 'rows' (rag --tables; the "
                   "index is rebuilt when it changes)")
    p.add_argument("--versions", default=RagConfig.versions, help="near-identical passages of two versions of a "
                   "document: 'newest' or 'all' (rag --versions)")
    p.add_argument("--json", default=".openbook/reports/verify.json", help="where the results go")
    a = p.parse_args(argv)
    setup_logging()
    result = run(a.docs, a.split, a.model, a.mode, a.k, a.tables, a.versions)
    print(f"{a.split}: {result['n']} questions ({result['n_unanswerable']} unanswerable); ROC AUC "
          + ", ".join(f"{k} {v:.3f}" for k, v in result["auc"].items())
          + f"; answers contain {result['contains']:.3f}")
    write_report(result, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
