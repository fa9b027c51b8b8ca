"""Rank fusion: reciprocal rank fusion (RRF) of several best-first result lists.

RRF (Cormack, Clarke & Büttcher, SIGIR 2009): score(d) = Σ_lists 1 / (k + rank(d)), ranks from 1, k = 60.
It needs no score calibration between BM25 and cosine, which is why hybrid search defaults to it.
Left out on purpose: learned fusion weights; a user can pass ``weights`` to favour one list.
"""

from __future__ import annotations

Results = list[tuple[str, float]]


def rrf(lists: list[Results], k: int = 60, weights: list[float] | None = None) -> Results:
    """Fuse best-first lists of ``(id, score)`` into one best-first list of ``(id, rrf score)``.

    >>> rrf([[("a", 9.0), ("b", 5.0)], [("b", 0.9), ("c", 0.8)]], k=1)
    [('b', 0.8333333333333333), ('a', 0.5), ('c', 0.3333333333333333)]
    """
    weights = weights or [1.0] * len(lists)
    fused: dict[str, float] = {}
    for results, w in zip(lists, weights, strict=True):
        for rank, (doc, _) in enumerate(results, start=1):
            fused[doc] = fused.get(doc, 0.0) + w / (k + rank)
    # ties keep first-seen order, so the first list (BM25) breaks them deterministically
    return sorted(fused.items(), key=lambda x: -x[1])
