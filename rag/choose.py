"""Choices made on a folder's golden ``train`` split: the retrieval mode (``--mode auto``) and the abstention rule
(``--abstain calibrated``).

Both are measured once per index version and train questions and saved beside the index (``rag/calibration.py``
stores them; the pipeline reads them). The mode is chosen from retrieval alone; the rule from the signals of the
chosen mode's passages, the reader's judgement among them. The test split is never used here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math

from tqdm import tqdm

from rag import calibration
from rag import metrics as M
from rag.abstain import SIGNALS, format_rule
from rag.pipeline import RagPipeline
from rag.ranking import AUTO, DEFAULT_MODE, MODES
from rag.store import fingerprint

log = logging.getLogger(__name__)


def _cuts(values: list[float]) -> list[float]:
    """Candidate thresholds: midway between neighbouring observed values, and past both ends."""
    v = sorted(set(values))
    return [v[0] - 1e-6, *((a + b) / 2 for a, b in zip(v, v[1:], strict=False)), v[-1] + 1e-6]


def _f1(abstained: list[bool], unanswerable: list[bool]) -> float:
    m = M.abstention(abstained, unanswerable)
    p, r = m["abstain_precision"] or 0.0, m["abstain_recall"] or 0.0
    return 2 * p * r / (p + r) if p + r else 0.0


def _accuracy(abstained: list[bool], unanswerable: list[bool]) -> float:
    return sum(a == u for a, u in zip(abstained, unanswerable, strict=True)) / len(unanswerable)


# Why accuracy is the default: F1 of refusing counts a refused answerable question (a false positive) but never
# an answerable one let through (a true negative), so with few unanswerable questions it buys each extra right
# refusal with several wrong ones.
SCORE = {"accuracy": _accuracy, "f1": _f1}


def choose_rule(runs: list[tuple[dict, bool]], min_gain: float = 0.02, objective: str = "accuracy"
                ) -> tuple[float, list] | None:
    """The abstention rule for "unanswerable" by ``objective`` (``rag.abstain.OBJECTIVES``): one signal below a
    threshold, or one retrieval signal or the reader's judgement below theirs (a pair must beat the best single
    signal by ``min_gain``, so a second threshold is not fitted to noise). ``runs``: (signals, unanswerable) per
    train question.

    'f1' takes the best F1. 'accuracy' takes the most lenient rule (fewest train refusals) whose accuracy is within
    one standard error of the best (the one-standard-error rule of Breiman et al., Classification and Regression
    Trees, 1984): a few dozen train questions cannot rank rules closer than that, and the questions users ask are
    worded unlike the documents more often than train questions are, which lowers the judgement. On the demo the
    best-accuracy rule, judge < 0.68, refused 9 of 73 answerable train questions and 31 of 73 answerable test ones
    (paraphrases), 2026-12-04.
    """
    score = SCORE[objective]
    names = [n for n in SIGNALS if all(n in s for s, _ in runs)]
    truth = [u for _, u in runs]

    def scored(abstained: list[bool], rule: list) -> tuple[float, int, list]:
        return score(abstained, truth), sum(abstained), rule

    found = [scored([s[n] < t for s, _ in runs], [(n, t)])  # (score, train refusals, rule)
             for n in names for t in _cuts([s[n] for s, _ in runs])]
    if not found:
        return None
    single = max(v for v, _, _ in found)
    if "judge" in names:
        for n in (x for x in names if x != "judge"):
            for t in _cuts([s[n] for s, _ in runs]):
                for tj in _cuts([s["judge"] for s, _ in runs]):
                    pair = scored([s[n] < t or s["judge"] < tj for s, _ in runs], [(n, t), ("judge", tj)])
                    if pair[0] >= single + min_gain:
                        found.append(pair)
    best = max(v for v, _, _ in found)
    if objective == "f1":
        return next((v, rule) for v, _, rule in found if v == best)  # the first best, in SIGNALS order
    floor = best - math.sqrt(best * (1 - best) / len(runs))
    v, _, rule = min((x for x in found if x[0] >= floor - 1e-12), key=lambda x: (x[1], -x[0]))
    return v, rule


def _stamp(pipe: RagPipeline, questions: list[dict]) -> str:
    """The index contents and questions a choice was made from: the same ones give the same choice."""
    made = [fingerprint(pipe.index), [(q["question"], q["answer"]) for q in questions]]
    # a choice made under --where saw other passages: it must not pass for the whole folder's (nor the reverse)
    made = made + [pipe.cfg.where] if pipe.cfg.where else made
    return hashlib.sha256(json.dumps(made, sort_keys=True).encode()).hexdigest()[:16]


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
    the best ``--calibrate-for`` score on the train split (``choose_rule``); both are saved beside the index.

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
    objective, saved = pipe.cfg.calibrate_for, table.get(key, {})
    if saved.get("stamp") == stamp and "rule" in saved and saved.get("objective", "f1") == objective:
        log.info("abstention calibration unchanged since the last run (same index, reader and train questions)")
        return saved
    if saved.get("stamp") == stamp and saved.get("signals"):  # another objective: re-fit, no judgement asked again
        runs = [(s, u) for s, u in saved["signals"]]
    else:
        runs = []
        for q in tqdm(train, desc="calibrate abstention", disable=not progress, leave=False):
            r = pipe.ranked(q["question"])
            hits, signals = r.hits[:pipe.cfg.k], r.signals
            if hits:
                signals = signals | {"judge": pipe.judge(q["question"], hits)}
            runs.append((signals, q["answer"] is None))
    best = choose_rule(runs, objective=objective)
    if best is None:
        return None
    auc = {n: M.separation_auc([s[n] for s, _ in runs], [u for _, u in runs])
           for n in SIGNALS if all(n in s for s, _ in runs)}
    abstained = [any(s.get(n, float("inf")) < t for n, t in best[1]) for s, _ in runs]
    truth = [u for _, u in runs]
    entry = {"rule": [(n, round(t, 6)) for n, t in best[1]], "objective": objective,
             "train_accuracy": round(_accuracy(abstained, truth), 4), "train_f1": round(_f1(abstained, truth), 4),
             "n": len(runs), "train_auc": auc, "stamp": stamp,
             # per train question, so another --calibrate-for re-fits without asking the reader again
             "signals": [[{n: round(v, 6) for n, v in s.items()}, u] for s, u in runs]}
    calibration.save(pipe.cfg.index_dir, key, entry)
    log.info("abstention rule %s for %s (train accuracy %.3f, F1 %.3f; ROC AUC on train: %s)",
             format_rule(entry["rule"]), objective, entry["train_accuracy"], entry["train_f1"],
             ", ".join(f"{n} {v:.2f}" for n, v in auc.items() if v is not None))
    return entry
