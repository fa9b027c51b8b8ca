"""Evaluate the RAG pipeline on a golden file: retrieval per mode, answers, abstention, latency → one JSON.

The golden format is a public contract (README "Golden file"): one JSON object per line with ``id, question,
answer, aliases, sources, type, split``; ``answer`` null and ``sources`` empty for unanswerable questions;
sources are paths relative to the documents folder. Procedure: (1) calibrate the abstention rule on the ``train``
split from the retrieval signals and the reader's judgement (no answers generated), choosing the one with the
best F1 for "unanswerable"; (2) on the evaluated split, score retrieval for every mode and generate answers with the
configured mode; (3) label every answerable miss as a *retrieval miss* (no expected source among the passages
retrieved), a *gate miss* (the abstention rule withheld an answer whose source was retrieved) or a
*generation miss*; and report each abstention signal's ROC AUC on the evaluated split. The output shape is
documented in README and read by hybrid/.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from rag import calibration
from rag import metrics as M
from rag.abstain import SIGNALS, format_rule
from rag.config import UserError
from rag.pipeline import AUTO, DEFAULT_MODE, MODES, RagPipeline

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


def _cuts(values: list[float]) -> list[float]:
    """Candidate thresholds: midway between neighbouring observed values, and past both ends."""
    v = sorted(set(values))
    return [v[0] - 1e-6, *((a + b) / 2 for a, b in zip(v, v[1:], strict=False)), v[-1] + 1e-6]


def _f1(abstained: list[bool], unanswerable: list[bool]) -> float:
    m = M.abstention(abstained, unanswerable)
    p, r = m["abstain_precision"] or 0.0, m["abstain_recall"] or 0.0
    return 2 * p * r / (p + r) if p + r else 0.0


def choose_rule(runs: list[tuple[dict, bool]], min_gain: float = 0.02) -> tuple[float, list] | None:
    """The abstention rule with the best F1 for "unanswerable": one signal below a threshold, or one retrieval
    signal or the reader's judgement below theirs (a pair must beat the best single signal by ``min_gain``, so
    a second threshold is not fitted to noise). ``runs``: (signals, unanswerable) per train question."""
    names = [n for n in SIGNALS if all(n in s for s, _ in runs)]
    truth = [u for _, u in runs]
    best: tuple[float, list] | None = None
    for n in names:
        for t in _cuts([s[n] for s, _ in runs]):
            f1 = _f1([s[n] < t for s, _ in runs], truth)
            if best is None or f1 > best[0]:
                best = (f1, [(n, t)])
    if "judge" in names and best is not None:
        single = best[0]
        for n in (x for x in names if x != "judge"):
            for t in _cuts([s[n] for s, _ in runs]):
                for tj in _cuts([s["judge"] for s, _ in runs]):
                    f1 = _f1([s[n] < t or s["judge"] < tj for s, _ in runs], truth)
                    if f1 >= single + min_gain and f1 > best[0]:
                        best = (f1, [(n, t), ("judge", tj)])
    return best


def _stamp(pipe: RagPipeline, questions: list[dict]) -> str:
    """The index version and questions a choice was made from: the same ones give the same choice."""
    return hashlib.sha256(json.dumps([pipe.index.path.name, [(q["question"], q["answer"]) for q in questions]])
                          .encode()).hexdigest()[:16]


def choose_mode(pipe: RagPipeline, golden: list[dict], progress: bool = True, margin: int = 2) -> dict | None:
    """For ``--mode auto``: the retrieval mode whose top k holds the most expected sources on the train split
    (recall@k), saved beside the index for the pipeline to use. Another mode replaces the default only when it
    finds the sources of at least ``margin`` more train questions: the mode also changes what the reader is shown
    and so its judgement. On the demo BM25 led by half a question (train recall@3 0.932 vs 0.925); taken anyway,
    the test answers got worse (contains 0.343 vs 0.397, judgement ROC AUC 0.80 vs 0.82, 2026-12-03).

    Retrieval only (no reader): seconds, most of it re-ranking. Why per folder: exact codes and prices favour
    BM25, paraphrased prose favours the fusion with the dense list.
    """
    train = [q for q in golden if q["split"] == "train" and q["sources"]]
    if pipe.cfg.mode != AUTO or not train:
        return None
    stamp, key = _stamp(pipe, train), pipe.mode_key()
    saved = calibration.load(pipe.cfg.index_dir).get(key, {})
    if saved.get("stamp") == stamp and saved.get("margin") == margin and saved.get("mode") in MODES:
        pipe.forget_mode()
        return saved
    k, scores = pipe.cfg.k, {}
    for m in tqdm(MODES, desc="choose the retrieval mode", disable=not progress, leave=False):
        found = [[h.doc_id for h in pipe.ranked(q["question"], mode=m, k=k).hits] for q in train]
        scores[m] = {f"recall@{k}": round(M.mean([M.recall_at(d, set(q["sources"]), k)
                                                   for d, q in zip(found, train, strict=True)]), 4),
                     "mrr": round(M.mean([M.reciprocal_rank(d, set(q["sources"]))
                                          for d, q in zip(found, train, strict=True)]), 4)}
    best = max(scores, key=lambda m: (scores[m][f"recall@{k}"], m == DEFAULT_MODE, scores[m]["mrr"]))
    gain = (scores[best][f"recall@{k}"] - scores[DEFAULT_MODE][f"recall@{k}"]) * len(train)  # in questions
    mode = best if gain >= margin - 1e-6 else DEFAULT_MODE
    entry = {"mode": mode, "n": len(train), "margin": margin, "train": scores, "stamp": stamp}
    calibration.save(pipe.cfg.index_dir, key, entry)
    pipe.forget_mode()
    log.info("retrieval mode %s (train recall@%d: %s)", mode, k,
             ", ".join(f"{m} {v[f'recall@{k}']:.3f}" for m, v in scores.items()))
    return entry


def calibrate(pipe: RagPipeline, golden: list[dict], progress: bool = True) -> dict | None:
    """With ``--mode auto``, choose the retrieval mode first (``choose_mode``); then pick the abstention rule with
    the best F1 on the train split (``choose_rule``); both are saved beside the index.

    The signals: the retrieval scores the mode produces and the reader's yes/no judgement (one prompt per train
    question, sharing nothing with retrieval). Which separates answerable from unanswerable questions depends on
    the corpus and the reader; every signal's ROC AUC on the train split is saved with the choice.
    """
    choose_mode(pipe, golden, progress)
    train = [q for q in golden if q["split"] == "train"]
    if not any(q["answer"] is None for q in train) or all(q["answer"] is None for q in train):
        log.info("no train split with both answerable and unanswerable questions: no calibrated abstention")
        return None
    # the same index version and train questions give the same signals: re-use the saved choice
    stamp = _stamp(pipe, train)
    table = calibration.load(pipe.cfg.index_dir)
    key = pipe.calibration_key()
    if table.get(key, {}).get("stamp") == stamp and "rule" in table[key]:
        log.info("abstention calibration unchanged since the last run (same index, reader and train questions)")
        return table[key]
    runs = []
    for q in tqdm(train, desc="calibrate abstention", disable=not progress, leave=False):
        r = pipe.ranked(q["question"])
        hits, signals = r.hits[:pipe.cfg.k], r.signals
        if hits:
            signals = signals | {"judge": pipe.judge(q["question"], hits)}
        runs.append((signals, q["answer"] is None))
    best = choose_rule(runs)
    if best is None:
        return None
    auc = {n: M.separation_auc([s[n] for s, _ in runs], [u for _, u in runs])
           for n in SIGNALS if all(n in s for s, _ in runs)}
    entry = {"rule": [(n, round(t, 6)) for n, t in best[1]], "train_f1": round(best[0], 4), "n": len(runs),
             "train_auc": auc, "stamp": stamp}
    calibration.save(pipe.cfg.index_dir, key, entry)
    log.info("abstention rule %s (train F1 %.3f; ROC AUC on train: %s)", format_rule(entry["rule"]), best[0],
             ", ".join(f"{n} {v:.2f}" for n, v in auc.items() if v is not None))
    return entry


def evaluate(pipe: RagPipeline, golden: list[dict], split: str = "test", modes: tuple[str, ...] = tuple(MODES),
             answers: bool = True, progress: bool = True) -> dict:
    """Run the evaluation and return the JSON-ready result (shape in README "Eval output")."""
    qs = [q for q in golden if split == "all" or q["split"] == split]
    if not qs:
        raise GoldenError(f"no questions with split '{split}'; use --split all|train|test")
    if answers:
        choose_mode(pipe, golden, progress)
    cal = calibrate(pipe, golden, progress) if answers and pipe.cfg.abstain == "calibrated" else None
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
                hit = not a.abstained and M.contains(a.text, refs)
                row |= {"contains": float(hit), "exact": M.exact_match(a.text, refs), "f1": M.token_f1(a.text, refs),
                        "citation_ok": bool(a.cited) and a.cited[0].doc_id in expected}
                row["miss"] = None if hit else miss_kind(a, seen & expected)
            for stage in lat:
                if stage in a.timings:
                    lat[stage].append(a.timings[stage])
        per_q.append(row)
    ans = [r for r in per_q if r["expected_answer"] is not None]
    result = {"settings": asdict(pipe.cfg) | {"mode_used": pipe.mode, "split": split, "n_questions": len(qs),
                                              "n_answerable": len(ans), "calibration": cal},
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
        result["signal_auc"] = {n: M.separation_auc([r["signals"][n] for r in per_q],
                                                    [r["expected_answer"] is None for r in per_q])
                                for n in SIGNALS if all(n in r.get("signals", {}) for r in per_q)}
    result["per_question"] = per_q
    return result
