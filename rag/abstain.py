"""The abstention rule: say "I don't know" without generating when a confidence signal is below its threshold.

A rule is one or two ``(signal, threshold)`` pairs, written ``judge<0.5,bm25<4`` on the command line; any one signal
below its threshold abstains. The signals are the best re-ranker, BM25 and cosine scores of a question's ranking
(retrieval computes them anyway) and the reader's own judgement of whether the passages state the answer
(``Generator.judge``), asked only when the rule uses it and the retrieval signals have passed, since it costs a
forward pass over the prompt. Left to others: choosing the thresholds on the golden train split
(``rag.choose.calibrate``), storing them (``rag/calibration.py``) and building the abstaining answer
(``RagPipeline``).
"""

from __future__ import annotations

import time
from collections.abc import Callable

# best cross-encoder score, best BM25 score, best cosine similarity; the reader's yes/no log-odds
SIGNALS = ("rerank", "bm25", "dense", "judge")
Rule = list[tuple[str, float]]  # abstain when any signal is below its threshold
# Without a golden train split there is nothing to fit a threshold on, and the reader almost never says "I don't
# know" by itself once asked to answer; its own yes/no judgement is the one signal with a natural threshold:
# abstain when it finds "No" likelier than "Yes" (on the demo test split it stops 7 of 20 unanswerable questions
# and 4 answerable ones, against none at all without a rule).
UNCALIBRATED: Rule = [("judge", 0.0)]
# what calibration maximises on the train split (rag.choose.choose_rule): the share of right gate decisions, or the
# F1 of refusing unanswerable questions, which never counts an answerable question let through
OBJECTIVES = ("accuracy", "f1")


def parse_rule(text: str) -> Rule:
    """An abstention rule from its flag form.

    >>> parse_rule("judge<0.5, bm25<4")
    [('judge', 0.5), ('bm25', 4.0)]
    """
    rule = []
    for part in text.split(","):
        name, _, value = part.strip().partition("<")
        try:
            threshold = float(value)
        except ValueError:
            threshold = float("nan")
        if name.strip() not in SIGNALS or threshold != threshold or abs(threshold) == float("inf"):
            raise ValueError(f"--abstain '{text}': write SIGNAL<NUMBER[,SIGNAL<NUMBER] with signals from "
                             f"{', '.join(SIGNALS)}, or 'calibrated' or 'none'")
        rule.append((name.strip(), threshold))
    return rule


def format_rule(rule: Rule | None) -> str:
    return ",".join(f"{name}<{t:g}" for name, t in rule) if rule else "none"


def below(rule: Rule | None, signals: dict[str, float], timings: dict[str, float], judge: Callable[[], float]) -> bool:
    """Whether a signal of ``rule`` is below its threshold. ``judge()`` is called, and its value and seconds added
    to ``signals`` and ``timings``, only when the rule uses it, every retrieval signal has passed and ``signals``
    holds no judgement yet (the comparison hands one system's judgements to the next: the same base model's).

    >>> below([("bm25", 4.0)], {"bm25": 3.2}, {}, judge=lambda: 1.0)
    True
    >>> below([("judge", 0.5)], {"judge": 0.9}, {}, judge=lambda: -1.0)  # a judgement given is not asked again
    False
    """
    failed = False
    for name, threshold in sorted(rule or [], key=lambda r: r[0] == "judge"):  # the costly signal last
        if failed:
            break
        if name == "judge" and "judge" not in signals:
            t0 = time.perf_counter()
            signals["judge"] = judge()
            timings["judge"] = time.perf_counter() - t0
        failed = name in signals and signals[name] < threshold
    return failed


def confidence(rule: Rule | None, signals: dict[str, float]) -> float | None:
    """The value of the rule's first signal (what an answer reports as its confidence)."""
    return signals.get(rule[0][0]) if rule else None
