"""Evaluate the RAG pipeline on a golden file: retrieval per mode, answers, abstention, latency → one JSON.

The golden format is a public contract (README "Golden file"): one JSON object per line with ``id, question,
answer, aliases, sources, type, split``; ``answer`` null and ``sources`` empty for unanswerable questions;
sources are paths relative to the documents folder. Procedure: (1) on the ``train`` split, choose the retrieval
mode (``--mode auto``) and calibrate the abstention rule (rag/choose.py; no answers generated); (2) on the
evaluated split, score retrieval for every mode and generate answers with the mode in use; (3) label every
answerable miss as a *retrieval miss* (no expected source among the passages retrieved), a *gate miss* (the
abstention rule withheld an answer whose source was retrieved) or a *generation miss*; and report each
abstention signal's ROC AUC on the evaluated split. The output shape is documented in README and read by hybrid/.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from rag import metrics as M
from rag.abstain import SIGNALS, format_rule
from rag.choose import calibrate, choose_mode
from rag.config import UserError
from rag.pipeline import RagPipeline
from rag.ranking import MODES

log = logging.getLogger(__name__)
MISSES = ("retrieval", "gate", "generation")
TYPES = ("lookup", "table", "multi-hop", "exception", "paraphrase", "unanswerable")


class GoldenError(UserError, ValueError):
    """A malformed golden file; the message names the file and line."""


def golden_for(docs: str | Path, golden: str | Path = "") -> str:
    """The golden file to use: ``golden`` when given, else ``<docs>/golden.jsonl`` if it exists, else ''."""
    default = Path(docs) / "golden.jsonl"
    return str(golden) if golden else str(default) if default.exists() else ""


def _field_error(where: str, q: dict) -> str | None:
    """What is wrong with the first malformed field of a golden line, or None."""
    def text(v) -> bool:
        return isinstance(v, str) and bool(v.strip())

    def texts(v) -> bool:
        return isinstance(v, list) and all(map(text, v))

    def inside(v) -> bool:  # document ids are relative POSIX paths: anything else can never be retrieved
        return texts(v) and not any(PurePosixPath(s).is_absolute() or ".." in PurePosixPath(s).parts for s in v)

    checks = [  # field, required, valid, what it must be
        ("question", True, text, "a non-empty string"),
        ("answer", True, lambda v: v is None or text(v), "a non-empty string, or null when unanswerable"),
        ("id", False, lambda v: text(v) or type(v) is int, "a string"),
        ("aliases", False, texts, 'a list of strings, e.g. ["45"]'),
        ("sources", False, inside, 'a list of paths relative to the docs folder, e.g. ["policies/returns.md"]'),
        ("type", False, text, "a string, e.g. lookup or unanswerable"),
        ("split", False, lambda v: v in ("train", "test"), "'train' or 'test'"),
    ]
    for name, required, valid, want in checks:
        if name not in q:
            if required:
                return f"{where}: '{name}' is missing; it must be {want}"
        elif not valid(q[name]):
            return f"{where}: '{name}' must be {want}, not {json.dumps(q[name], ensure_ascii=False)[:60]}"
    return None


def load_golden(path: str | Path, docs_dir: str | Path | None = None) -> list[dict]:
    """Read and validate a golden JSONL file; with ``docs_dir``, warn about sources missing from the folder."""
    path = Path(path)
    if not path.is_file():
        raise GoldenError(f"golden file not found: {path}; pass --golden FILE (format: README 'Golden file')")
    items, seen = [], set()
    for n, raw in enumerate(path.read_bytes().splitlines(), 1):  # bytes: only \n and \r end a line
        try:
            line = raw.decode("utf-8").lstrip("\ufeff")
        except UnicodeDecodeError as e:
            raise GoldenError(f"{path}:{n}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                              "save the file as UTF-8") from None
        if not line.strip():
            continue
        try:
            q = json.loads(line)
        except json.JSONDecodeError as e:
            raise GoldenError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(q, dict):
            raise GoldenError(f"{path}:{n}: each line needs an object with a non-empty 'question'")
        if problem := _field_error(f"{path}:{n}", q):
            raise GoldenError(problem + " (format: README 'Golden file')")
        q.setdefault("id", f"q{n}")
        if q["id"] in seen:
            raise GoldenError(f"{path}:{n}: duplicate id '{q['id']}'")
        seen.add(q["id"])
        q.setdefault("aliases", [])
        q.setdefault("sources", [])
        q.setdefault("split", "test")
        q.setdefault("type", "unanswerable" if q["answer"] is None else "lookup")
        if (q["answer"] is None) != (q["type"] == "unanswerable"):
            raise GoldenError(f"{path}:{n}: 'answer' must be null exactly when type is 'unanswerable'")
        if q["answer"] is not None and not q["sources"]:
            raise GoldenError(f"{path}:{n}: an answerable question needs at least one entry in 'sources'")
        items.append(q)
    if not items:
        raise GoldenError(f"{path}: no questions")
    if docs_dir is not None:
        missing = {s for q in items for s in q["sources"] if not (Path(docs_dir) / s).exists()}
        if missing:
            log.warning("%d golden sources are not in %s (e.g. %s); they can never be retrieved",
                        len(missing), docs_dir, sorted(missing)[0])
    return items


def miss_kind(a, found_expected: set) -> str:
    """Why an answerable question was missed: its source was not retrieved, the abstention rule stopped the
    answer although the source was there, or the generator got it wrong from the right passages."""
    if not found_expected:
        return "retrieval"
    return "gate" if a.reason == "low-confidence" else "generation"


def evaluate(pipe: RagPipeline, golden: list[dict], split: str = "test", modes: tuple[str, ...] = tuple(MODES),
             answers: bool = True, progress: bool = True) -> dict:
    """Run the evaluation and return the JSON-ready result (shape in README "Eval output")."""
    qs = [q for q in golden if split == "all" or q["split"] == split]
    if not qs:
        raise GoldenError(f"no questions with split '{split}'; use --split all|train|test")
    cal = None
    if answers and pipe.cfg.abstain == "calibrated":
        cal = calibrate(pipe, golden, progress)  # chooses the retrieval mode first
    elif answers:
        choose_mode(pipe, golden, progress)
    stages = ("retrieve", "rerank", "judge", "generate", "total")
    per_q, retrieval, lat = [], {m: [] for m in modes}, {s: [] for s in stages}
    for q in tqdm(qs, desc=f"eval ({len(qs)} questions)", disable=not progress):
        expected = set(q["sources"])
        row = {k: q[k] for k in ("id", "question", "type", "split")} | {"expected_answer": q["answer"],
                                                                         "sources": q["sources"]}
        row["retrieved"], ranked = {}, {}
        for m in modes:
            ranked[m] = pipe.ranked(q["question"], mode=m, k=10)
            docs = [h.doc_id for h in ranked[m].hits]
            row["retrieved"][m] = docs
            if expected:
                retrieval[m].append(M.retrieval_scores(docs, expected))
        if answers:
            # the top k of the mode's top 10 are exactly what answer() would retrieve: do not re-rank twice
            a = pipe.answer(q["question"], ranked=ranked.get(pipe.mode))
            a.timings["total"] = sum(a.timings.values())
            signals = dict(a.signals)
            if "judge" not in signals and a.sources:  # not asked (gated earlier, or no rule uses it): for its AUC
                signals["judge"] = pipe.judge(q["question"], a.sources)
            refs = [q["answer"], *q["aliases"]] if q["answer"] is not None else []
            seen = {h.doc_id for h in a.sources}
            row |= {"answer": a.text, "abstained": a.abstained, "abstain_reason": a.reason,
                    "confidence": a.confidence, "cited": [h.doc_id for h in a.cited],
                    "explicit_citation": a.explicit_citation, "prompt_tokens": a.prompt_tokens,
                    "new_tokens": a.new_tokens, "latency_s": a.timings, "signals": signals}
            if refs:
                row |= M.graded(a.text, refs, a.abstained)  # a RAFT generator's quote of its passage is not its answer
                row["citation_ok"] = bool(a.cited) and a.cited[0].doc_id in expected
                row["miss"] = None if row["contains"] else miss_kind(a, seen & expected)
            for stage in lat:
                if stage in a.timings:
                    lat[stage].append(a.timings[stage])
        per_q.append(row)
    ans = [r for r in per_q if r["expected_answer"] is not None]
    result = {"settings": asdict(pipe.cfg) | {"mode_used": pipe.mode, "split": split, "n_questions": len(qs),
                                              "n_answerable": len(ans), "calibration": cal,
                                              "rule": format_rule(pipe.rule())},
              "retrieval": {m: {k: M.mean([s[k] for s in v]) for k in ("recall@1", "recall@5", "recall@10", "mrr",
                                                                         "ndcg@10")} for m, v in retrieval.items()}}
    if answers:
        abst = M.abstention([r["abstained"] for r in per_q], [r["expected_answer"] is None for r in per_q])
        result["answers"] = {"contains": M.mean([r["contains"] for r in ans]),
                             "exact": M.mean([r["exact"] for r in ans]), "f1": M.mean([r["f1"] for r in ans]),
                             "citation_accuracy": M.mean([float(r["citation_ok"]) for r in ans if not r["abstained"]]),
                             **{k: None if v is None else round(v, 4) for k, v in abst.items()},
                             **{f"{k}_misses": sum(r["miss"] == k for r in ans) for k in MISSES}}
        result["latency_ms"] = {s: M.percentiles(v) for s, v in lat.items() if v}
        result["settings"]["reader_weights"] = pipe.generator.weights or None
        result["signal_auc"] = {n: M.separation_auc([r["signals"][n] for r in per_q],
                                                    [r["expected_answer"] is None for r in per_q])
                                for n in SIGNALS if all(n in r.get("signals", {}) for r in per_q)}
    result["per_question"] = per_q
    return result
