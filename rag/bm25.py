"""Lexical retrieval: a BM25 tokenizer (lowercase, punctuation split, stop words, Snowball stems) over rank-bm25.

Scoring is rank-bm25's ``BM25Okapi`` (Robertson & Zaragoza 2009; k1=1.5, b=0.75) with one change: Lucene's
idf, log(1 + (N − n + 0.5)/(n + 0.5)), which is never negative. rank-bm25's Okapi idf turns negative for a term
in more than half the documents, so in a small folder a matching chunk would rank *below* a non-matching one.
The tokenizer is where BM25 quality is won or lost:
scikit-learn's English stop-word list and the Snowball English stemmer, plus one extra token that joins a
letters-digits code ("TW-300" → "tw", "300", "tw300") so model numbers match however they are written.
Backends: ``rank-bm25`` or ``bm25s`` (Lù 2024, sparse-matrix scoring, much faster per query on large indexes;
``bench/`` measures both); ``auto`` (the default) picks bm25s from ``BM25S_FROM`` chunks. Both score with
Lucene's idf and give the same ranking; bm25s leaves out the constant factor (k1 + 1), which we put back, so
scores and calibrated thresholds match too.
Left out on purpose: persisting the backends' internals; they rebuild from stored tokens in well under a second
per 10k chunks. For millions of chunks, put the same ``search`` interface on a search engine instead.
"""

from __future__ import annotations

import logging
import math
import re
from functools import lru_cache
from pathlib import Path

import numpy as np

BACKENDS = ("rank-bm25", "bm25s")  # and "auto", which picks one of them by corpus size
# 'auto' switches to bm25s from this many chunks. Measured by `make bench` (backends section): the same nDCG@10 and
# top 10 for every fitz-gov test query, bm25s 18x faster per query at 7,258 chunks and 34x at 100k; below a few
# thousand chunks both score a query in about a millisecond and rank-bm25 imports 0.3 s faster (no scipy).
BM25S_FROM = 5000
_TOKEN = re.compile(r"[a-z0-9]+(?:[.,][0-9]+)*")
_CODE = re.compile(r"\b([a-z]{1,4})[-\s]?(\d{2,5})\b")


@lru_cache(maxsize=1)
def _stop_words() -> frozenset[str]:
    """scikit-learn's English stop-word list, loaded from its own module file.

    ``import sklearn`` costs ~1.4 s, most of a cold ``python -m rag ask``; the list module imports nothing.
    """
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    path = Path(spec.submodule_search_locations[0]) / "feature_extraction" / "_stop_words.py" if spec else None
    if path is None or not path.exists():  # another scikit-learn layout: take the slow, public route
        from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

        return frozenset(ENGLISH_STOP_WORDS)
    module = importlib.util.module_from_spec(importlib.util.spec_from_file_location("_openbook_stop_words", path))
    module.__spec__.loader.exec_module(module)
    return frozenset(module.ENGLISH_STOP_WORDS)


@lru_cache(maxsize=1)
def _stemmer():
    import snowballstemmer

    return snowballstemmer.stemmer("english")


def tokenize(text: str) -> list[str]:
    """Index/query tokens.

    >>> tokenize("The Delta (TW-300) supports 16 zones; returns within 45 days.")
    ['delta', 'tw', '300', 'support', '16', 'zone', 'return', '45', 'day', 'tw300']
    """
    low = text.lower()
    stop = _stop_words()
    words = [w.rstrip(".,") for w in _TOKEN.findall(low)]
    tokens = _stemmer().stemWords([w for w in words if w and w not in stop])
    return tokens + [a + b for a, b in _CODE.findall(low)]


def _lucene_bm25(corpus: list[list[str]], k1: float, b: float):
    from rank_bm25 import BM25Okapi

    class LuceneIdfBM25(BM25Okapi):
        def _calc_idf(self, nd):
            for word, n in nd.items():
                self.idf[word] = math.log(1 + (self.corpus_size - n + 0.5) / (n + 0.5))

    return LuceneIdfBM25(corpus, k1=k1, b=b)


class _Bm25s:
    """bm25s with method 'lucene' behind rank-bm25's ``get_scores``; scores × (k1 + 1) equal rank-bm25's."""

    def __init__(self, corpus: list[list[str]], k1: float, b: float):
        import bm25s

        self._scale = k1 + 1
        logging.getLogger("bm25s").setLevel(logging.WARNING)  # it logs every index build at DEBUG
        self._bm25 = bm25s.BM25(k1=k1, b=b, method="lucene")
        self._bm25.index(corpus, show_progress=False)

    def get_scores(self, query: list[str]) -> np.ndarray:
        return self._bm25.get_scores(query) * self._scale


class BM25:
    """BM25 over a fixed list of chunk ids; ``search`` returns ``[(chunk_id, score)]`` best first."""

    def __init__(self, ids: list[str], tokens: list[list[str]], k1: float = 1.5, b: float = 0.75,
                 backend: str = "auto"):
        if backend not in ("auto", *BACKENDS):
            raise ValueError(f"BM25 backend must be auto, {' or '.join(BACKENDS)}, not '{backend}'")
        if backend == "auto":
            backend = "bm25s" if len(ids) >= BM25S_FROM else "rank-bm25"
        self.ids, self.backend = ids, backend
        # rank-bm25 divides by zero on an empty corpus and mis-scores empty documents; a placeholder token
        # that no query produces keeps both cases well defined.
        corpus = [t or ["\x00"] for t in tokens] or [["\x00"]]
        self._bm25 = _lucene_bm25(corpus, k1, b) if backend == "rank-bm25" else _Bm25s(corpus, k1, b)

    def scores(self, query: str) -> np.ndarray:
        q = tokenize(query)
        return np.asarray(self._bm25.get_scores(q), dtype=np.float32) if q and self.ids else np.zeros(len(self.ids))

    def search(self, query: str, k: int, allow: np.ndarray | None = None) -> list[tuple[str, float]]:
        """The ``k`` best chunks with a positive score; ``allow``: a boolean mask over ``ids``, the only candidates
        (the rest score 0, so a filter never costs a slot of the k)."""
        s = self.scores(query)
        if allow is not None:
            s = np.where(allow, s, 0.0)
        if k < len(s):  # sort only the candidates: at 100k chunks a full sort cost more than bm25s's scoring
            kth = np.partition(s, len(s) - k)[len(s) - k]
            cand = np.flatnonzero(s >= kth)  # ties at the cut included, in index order, as a full sort keeps them
            top = cand[np.argsort(-s[cand], kind="stable")][:k]
        else:
            top = np.argsort(-s, kind="stable")
        return [(self.ids[i], float(s[i])) for i in top if s[i] > 0]
