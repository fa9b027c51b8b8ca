"""Retrieval and answer metrics: recall@k, MRR, nDCG@10, exact match, token F1, contains, abstention, latency.

Retrieval is judged at the document level, as in the golden set: a retrieved chunk is a hit when its document
is one of the question's expected sources. Answer normalisation follows the SQuAD evaluation script
(lowercase, drop punctuation and articles, squeeze spaces); "contains" asks whether the normalised answer or
any alias appears inside the normalised prediction, which suits short factual answers inside a sentence.
Left out on purpose: LLM-as-judge scoring (no judge model is available offline, and it would not be
reproducible); faithfulness is measured by the comparison in hybrid/.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter

import numpy as np

# "a" right after a number is a unit (5 A = five amperes), not an article
_ARTICLES = re.compile(r"\b(?:an|the)\b|(?<!\d )\ba\b")
_PUNCT = str.maketrans({c: " " for c in string.punctuation + "€£$›»«“”‘’–—"})


def normalize(text: str) -> str:
    """SQuAD-style normalisation, plus "1,240" → "1240" so thousands separators do not decide a match.

    >>> normalize("The fee is EUR 1,240."), normalize("A relay rated 5 A")
    ('fee is eur 1240', 'relay rated 5 a')
    """
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text.lower())
    text = re.sub(r"(?<=\d)\.(?=\d)", "\x00", text)  # keep decimals and versions (4.2.1) together
    return " ".join(_ARTICLES.sub(" ", text.translate(_PUNCT)).split()).replace("\x00", ".")


def exact_match(pred: str, answers: list[str]) -> float:
    return float(any(normalize(pred) == normalize(a) for a in answers))


def token_f1(pred: str, answers: list[str]) -> float:
    """Best bag-of-tokens F1 against any acceptable answer."""
    p = normalize(pred).split()
    best = 0.0
    for a in answers:
        g = normalize(a).split()
        common = sum((Counter(p) & Counter(g)).values())
        if common:
            prec, rec = common / len(p), common / len(g)
            best = max(best, 2 * prec * rec / (prec + rec))
    return best


def contains(pred: str, answers: list[str]) -> float:
    """1 when a normalised answer appears in the normalised prediction as whole words.

    >>> contains("It supports 16 zones [1].", ["16 zones", "sixteen"]), contains("It has 160 zones", ["16 zones"])
    (1.0, 0.0)
    """
    p = f" {normalize(pred)} "
    return float(any(f" {normalize(a)} " in p for a in answers if normalize(a)))


QUOTE = re.compile(r"^\s*Quote:", re.M)
CITATION = re.compile(r"\[\d{1,2}\]")  # a source number, as RAG's prompt asks for it: "... 45 days [2]."


def said(reply: str) -> str:
    """A reply without the supporting quote the RAFT hybrid writes after its answer (``Quote: "..."`` to the end)
    and without its source numbers: what is scored is what the system answered, not the passage it quotes, which
    can hold the expected value beside a wrong answer (a table row quoted under "50 [3]" held the expected "5"), nor
    the number of the passage it cites ("50 [3]" does not say "3", the old value of that freshness question).

    >>> contains(said('50 [3]\\nQuote: "per account | 1 | 5 | 10 | 50 |"'), ["5"]), contains(said("50 [3]"), ["3"])
    (0.0, 0.0)
    >>> exact_match(said("EUR 5 [1]."), ["EUR 5"])
    1.0
    """
    return CITATION.sub(" ", QUOTE.split(reply, maxsplit=1)[0])


def graded(reply: str, refs: list[str], abstained: bool) -> dict[str, float | None]:
    """``contains`` (0 for a refusal), ``exact`` and ``f1`` of what ``reply`` answered (``said``) against the
    acceptable answers ``refs``; all None for a question without an answer (``refs`` empty). One scorer for every
    system, so RAG's, the adapters' and the closed-book evaluations cannot drift apart.

    >>> graded('50 [3]\\nQuote: "per account | 1 | 5 | 10 | 50 |"', ["5"], abstained=False)["contains"]
    0.0
    >>> graded("EUR 5 [1]", ["EUR 5"], abstained=False), graded("I don't know.", [], abstained=True)["f1"]
    ({'contains': 1.0, 'exact': 1.0, 'f1': 1.0}, None)
    """
    if not refs:
        return {"contains": None, "exact": None, "f1": None}
    answer = said(reply)
    return {"contains": float(not abstained and bool(contains(answer, refs))), "exact": exact_match(answer, refs),
            "f1": token_f1(answer, refs)}


def ndcg_at(ranked: list[str], relevant: set[str], k: int = 10) -> float:
    """Binary-gain nDCG@k over a best-first list of ids.

    >>> round(ndcg_at(["x", "a"], {"a"}), 3)  # (1/log2 3) / 1
    0.631
    """
    dcg = sum(1 / math.log2(i + 2) for i, d in enumerate(ranked[:k]) if d in relevant)
    ideal = sum(1 / math.log2(i + 2) for i in range(min(len(relevant), k)))
    return dcg / ideal if ideal else 0.0


def recall_at(ranked: list[str], relevant: set[str], k: int = 10) -> float:
    """Share of the relevant ids among the first ``k``."""
    return len(set(ranked[:k]) & relevant) / len(relevant) if relevant else 0.0


def reciprocal_rank(ranked: list[str], relevant: set[str]) -> float:
    """1 / rank of the first relevant id, 0 if none is there."""
    return next((1 / (i + 1) for i, d in enumerate(ranked) if d in relevant), 0.0)


def retrieval_scores(ranked_docs: list[str], expected: set[str]) -> dict[str, float]:
    """recall@1/5/10, MRR and nDCG@10 for one question, from the document ids of a best-first *passage* list.

    Decided once: recall@k and MRR count passages as ranked (recall@5 is "an expected document is among the 5
    passages", what a reader with k=5 would get); nDCG@10 ranks documents, each counted once at its best rank
    (graded relevance over documents; counting a document's every passage would reward repeating it).
    """
    out = {f"recall@{k}": recall_at(ranked_docs, expected, k) for k in (1, 5, 10)}
    out["mrr"] = reciprocal_rank(ranked_docs, expected)
    out["ndcg@10"] = ndcg_at(list(dict.fromkeys(ranked_docs)), expected, 10)
    return out


def abstention(abstained: list[bool], unanswerable: list[bool]) -> dict[str, float | None]:
    """Precision and recall of abstaining, treating unanswerable questions as the positive class."""
    tp = sum(a and u for a, u in zip(abstained, unanswerable, strict=True))
    n_abst, n_unans = sum(abstained), sum(unanswerable)
    return {"abstain_precision": tp / n_abst if n_abst else None,
            "abstain_recall": tp / n_unans if n_unans else None}


def separation_auc(scores: list[float], unanswerable: list[bool]) -> float | None:
    """ROC AUC of a confidence signal for "answerable scores higher" (0.5: chance; None without both kinds).

    >>> separation_auc([0.9, 0.8, 0.3, 0.5], [False, False, True, True])
    1.0
    """
    from sklearn.metrics import roc_auc_score

    if len(set(unanswerable)) < 2:
        return None
    return round(float(roc_auc_score([not u for u in unanswerable], scores)), 4)


def percentiles(seconds: list[float]) -> dict[str, float]:
    """p50/p95 in milliseconds."""
    if not seconds:
        return {"p50": 0.0, "p95": 0.0}
    a = np.asarray(seconds) * 1000
    return {"p50": round(float(np.percentile(a, 50)), 1), "p95": round(float(np.percentile(a, 95)), 1)}


def mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return round(sum(vals) / len(vals), 4) if vals else None


def spread(s: dict) -> str:
    """A summary over seeds as text: mean ± sd [min, max].

    >>> spread({"mean": 0.5, "sd": 0.01, "min": 0.49, "max": 0.51})
    '0.500 ± 0.010 [0.490, 0.510]'
    """
    return f"{s['mean']:.3f} ± {s['sd']:.3f} [{s['min']:.3f}, {s['max']:.3f}]"


def paired_bootstrap(a, b, n: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of a − b over paired items and its 95% percentile interval, resampling items with replacement.

    >>> paired_bootstrap([1, 1, 1, 1], [0, 0, 0, 0])
    (1.0, 1.0, 1.0)
    """
    diff = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    idx = np.random.default_rng(seed).integers(0, len(diff), (n, len(diff)))
    means = diff[idx].mean(axis=1)
    return float(diff.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def bootstrap_ci(values, n: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean and 95% percentile interval of one list of per-item scores."""
    return paired_bootstrap(values, np.zeros(len(values)), n, seed)


SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+|\n+")  # after . ! or ?, or at a line break


def faithfulness(answer: str, passages: list[str], tokenize, min_overlap: float = 0.8) -> float | None:
    """Share of the answer's sentences whose content words are (≥ ``min_overlap``) found in ``passages``.

    Token overlap, not entailment: cheap, reproducible and judge-free, but it credits a sentence that copies
    words in a wrong order. Citation markers and "Quote:" labels are ignored; None when nothing is left.
    """
    vocab = set(tokenize(" ".join(passages)))
    sentences = [t for s in SENTENCE_BREAK.split(re.sub(r"\[\d+\]|^Quote:", " ", answer, flags=re.M))
                 if (t := set(tokenize(s)))]
    if not sentences:
        return None
    return sum(len(t & vocab) / len(t) >= min_overlap for t in sentences) / len(sentences)
