"""Metrics on hand-worked examples."""

from __future__ import annotations

import math

import pytest

from rag import metrics as M
from rag.fuse import rrf


def test_retrieval_scores_by_hand():
    ranked = ["a", "x", "b", "x", "y", "c"]
    s = M.retrieval_scores(ranked, {"b", "c"})
    assert s["recall@1"] == 0 and s["recall@5"] == 0.5 and s["recall@10"] == 1.0
    assert s["mrr"] == pytest.approx(1 / 3)
    # distinct docs: a x b y c -> relevant at ranks 3 and 5
    dcg = 1 / math.log2(4) + 1 / math.log2(6)
    assert s["ndcg@10"] == pytest.approx(dcg / (1 + 1 / math.log2(3)))


def test_answer_metrics():
    assert M.contains("The Pro plan costs EUR 19 per month [2].", ["EUR 19", "19 euros"]) == 1.0
    assert M.contains("It costs EUR 190.", ["EUR 19"]) == 0.0
    assert M.contains("Firmware 4.2.1 fixed it", ["4.2.1"]) == 1.0
    assert M.contains("Firmware 4.2.10", ["4.2.1"]) == 0.0
    assert M.contains("List price: EUR 1240", ["EUR 1,240"]) == 1.0
    assert M.exact_match("the 45 days.", ["45 days"]) == 1.0
    assert M.contains("The fee is EUR 5 [2].", ["5 A"]) == 0.0  # "A" after a number is a unit, not an article
    assert M.contains("It switches 5 A at 250 VAC.", ["5 A"]) == 1.0
    assert M.token_f1("45 days", ["within 45 days"]) == pytest.approx(0.8)


def test_abstention_precision_recall():
    m = M.abstention([True, True, False, False], [True, False, True, False])
    assert m == {"abstain_precision": 0.5, "abstain_recall": 0.5}
    assert M.abstention([False], [False]) == {"abstain_precision": None, "abstain_recall": None}


def test_rrf_by_hand():
    fused = dict(rrf([[("a", 3), ("b", 2)], [("b", 9), ("c", 1)]], k=60))
    assert fused["b"] == pytest.approx(1 / 62 + 1 / 61)
    assert list(fused)[0] == "b"


def test_percentiles():
    assert M.percentiles([0.1, 0.2, 0.3]) == {"p50": 200.0, "p95": 290.0}


def test_calibration_objectives():
    """By hand (judge values; 5 of 25 unanswerable): F1 of refusing buys its last right refusals with two wrong
    ones (an answerable question let through never counts for it); accuracy is best (0.92) refusing the three
    lowest, and its one-standard-error rule takes the most lenient rule within 0.054 of that, refusing two (0.88)
    — until ten times the questions pin the best one down."""
    from rag.choose import choose_rule

    runs = [({"judge": j}, True) for j in (-3.0, -2.0, -1.0, 0.5, 1.5)] + \
           [({"judge": j}, False) for j in (0.0, 1.0, *(2 + i / 10 for i in range(18)))]

    def refused(rule, runs=runs):
        return (sum(s["judge"] < rule[0][1] and u for s, u in runs),
                sum(s["judge"] < rule[0][1] and not u for s, u in runs))

    f1, f1_rule = choose_rule(runs, objective="f1")
    assert refused(f1_rule) == (5, 2) and f1 == pytest.approx(2 * (5 / 7) / (5 / 7 + 1))
    acc, acc_rule = choose_rule(runs)  # accuracy is the default
    assert refused(acc_rule) == (2, 0) and acc == pytest.approx(22 / 25)
    more = runs * 10
    acc, acc_rule = choose_rule(more)
    assert refused(acc_rule, more) == (30, 0) and acc == pytest.approx(0.92)


def test_the_hybrids_quote_is_not_scored_as_its_answer():
    """A RAFT reply quotes its passage after the answer; a quoted table row can hold the expected value beside a
    wrong answer (the demo's freshness run, 2026-12-06: "50 [3]" over a row holding the expected "5")."""
    from hybrid.systems import score

    q = {"id": "q", "answer": "5", "sources": ["a.md"]}
    wrong = score(q, '50 [3]\nQuote: "Controllers per account | 1 | 5 | 10 | 50 |"', False, "a.md", None)
    right = score(q, '5 [3]\nQuote: "Controllers per account | 1 | 5 | 10 | 50 |"', False, "a.md", None)
    assert (wrong["contains"], wrong["hallucinated"], wrong["exact"]) == (0.0, 1.0, 0.0)
    assert (right["contains"], right["hallucinated"], right["exact"]) == (1.0, 0.0, 1.0)  # "[3]" is not the answer
    # nor is the cited source's number: "50 [3]" does not say 3 (freshness counted it as the old value 3)
    assert score(q | {"answer": "3"}, "50 [3]", False, "a.md", None)["contains"] == 0.0
