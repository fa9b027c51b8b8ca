"""Backends side by side: rank-bm25 vs bm25s on the same tokens, and FAISS exact vs HNSW vs IVF.

BM25: both backends of rag.bm25.BM25 index the same rag.bm25.tokenize tokens of fitz-gov's chunks (openbook's
chunker, contextual header); quality is document-level nDCG@10 on the fitz-gov test queries, speed is one query
at a time at the real chunk count and at 100k chunks (the token lists repeated: same vocabulary, more rows), both
through ``BM25.search`` (tokenizer + scoring + a full stable sort) and for the backend's scoring alone. The
issue's bar for bm25s: the same nDCG@10 (±0.5 points) and ≥ 10x faster queries through ``search`` at 100k.
FAISS: recall@10 of HNSW (M=32; efSearch 16, 64, 128) and IVF-Flat (nlist = 4√N; nprobe 8 and 32) against exact
search, and query latency on 1 OpenMP thread, at 10k and 100k real fitz-gov chunk vectors reused with jitter
(see bench/scale.py). Index building uses every core; queries one. Left out on purpose: PQ compression.
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np

from bench.measure import cores, latencies, set_threads, timed

log = logging.getLogger(__name__)


def bm25_compare(smoke: bool) -> dict:
    from bench.quality import chunks, load_fitzgov, score, to_docs
    from rag.bm25 import BACKENDS, BM25, tokenize

    corpus = load_fitzgov(smoke)
    ids, doc_list, texts = chunks(corpus, contextual=True)
    doc_of = dict(zip(ids, doc_list, strict=True))
    tokens = [tokenize(t) for t in texts]
    queries = [q.text for q in corpus.queries]
    out: dict = {"chunks": len(ids), "queries": len(queries), "backends": {}}
    big_n = 2_000 if smoke else 100_000
    big_tokens = [tokens[i % len(tokens)] for i in range(big_n)]
    big_ids = [f"c{i}" for i in range(big_n)]
    tops = {}
    for backend in BACKENDS:
        index, build = timed(BM25, ids, tokens, backend=backend)
        ranks = [to_docs(index.search(q, 200), doc_of) for q in queries]
        tops[backend] = [r[:10] for r in ranks]
        quality = score({backend: ranks}, corpus.queries)[backend]
        qtok = [tokenize(q) for q in queries[:100]]
        lat = latencies(lambda q, ix=index: ix.search(q, 100), queries[:100])
        big, big_build = timed(BM25, big_ids, big_tokens, backend=backend)
        big_lat = latencies(lambda q, ix=big: ix.search(q, 100), queries[:30])
        # the backend's scoring alone, without openbook's tokenizer and full sort that search() adds to both
        big_score = latencies(lambda t, ix=big: ix._bm25.get_scores(t), qtok[:30])
        out["backends"][backend] = {**quality, "build_s": round(build, 3), "query_ms": lat,
                                    f"build_s_{big_n}": round(big_build, 2), f"query_ms_{big_n}": big_lat,
                                    f"score_only_ms_{big_n}": big_score}
    a, b = out["backends"]["rank-bm25"], out["backends"]["bm25s"]
    out["same_top10_share"] = round(float(np.mean([x == y for x, y in zip(*tops.values(), strict=True)])), 4)
    out["ndcg_diff_points"] = round(100 * (b["ndcg@10"] - a["ndcg@10"]), 2)
    out["speedup"] = {f"{len(ids)}": round(a["query_ms"]["p50_ms"] / b["query_ms"]["p50_ms"], 1),
                      f"{big_n}": round(a[f"query_ms_{big_n}"]["p50_ms"] / b[f"query_ms_{big_n}"]["p50_ms"], 1),
                      f"{big_n} scoring only": round(a[f"score_only_ms_{big_n}"]["p50_ms"]
                                                     / b[f"score_only_ms_{big_n}"]["p50_ms"], 1)}
    ok = abs(out["ndcg_diff_points"]) <= 0.5 and out["speedup"][f"{big_n}"] >= 10  # through search(), at 100k
    out["meets_bar"] = ok
    out["verdict"] = verdict(ok)
    return out


def verdict(meets_bar: bool) -> str:
    """What the measurement means for rag.bm25's default (``backend='auto'``)."""
    from rag.bm25 import BM25S_FROM

    return (f"bm25s meets the bar (same nDCG ±0.5, ≥10x faster): rag.bm25's default 'auto' uses it from "
            f"{BM25S_FROM:,} chunks, rank-bm25 below" if meets_bar else
            "bm25s does not meet the bar here: re-consider rag.bm25's 'auto' switch (BM25S_FROM)")


def _indexes(vecs: np.ndarray):
    """(name, build function, [(setting name, apply function)]) per FAISS kind."""
    import faiss

    d, n = vecs.shape[1], len(vecs)
    nlist = max(int(4 * math.sqrt(n)), 8)

    def exact():
        ix = faiss.IndexFlatIP(d)
        ix.add(vecs)
        return ix

    def hnsw():
        ix = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
        ix.add(vecs)
        return ix

    def ivf():
        ix = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        ix.train(vecs)
        ix.add(vecs)
        return ix

    def ef(v):
        return lambda ix: setattr(ix.hnsw, "efSearch", v)

    def probe(v):
        return lambda ix: setattr(ix, "nprobe", v)

    return [("exact", exact, [("", lambda ix: None)]),
            ("hnsw", hnsw, [("efSearch=16", ef(16)), ("efSearch=64", ef(64)), ("efSearch=128", ef(128))]),
            (f"ivf(nlist={nlist})", ivf, [("nprobe=8", probe(8)), ("nprobe=32", probe(32))])]


def faiss_compare(real: np.ndarray, qvecs: np.ndarray, sizes: tuple[int, ...]) -> dict:
    from bench.scale import replicated

    out = {}
    for n in sizes:
        vecs = replicated(real, n)
        truth = None
        row = {}
        for name, build, settings in _indexes(vecs):
            set_threads(cores())
            ix, secs = timed(build)
            set_threads(1)
            for label, apply in settings:
                apply(ix)
                found = ix.search(qvecs, 10)[1]
                truth = found if truth is None else truth
                recall = float(np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth, strict=True)]))
                lat = latencies(lambda q, ix=ix: ix.search(q.reshape(1, -1), 10), list(qvecs))
                row[f"{name} {label}".strip()] = {"recall@10_vs_exact": round(recall, 4), "build_s": round(secs, 2),
                                                  "query_ms": lat}
        fast_enough = {k: v for k, v in row.items() if v["recall@10_vs_exact"] >= 0.95}
        best = min(fast_enough, key=lambda k: fast_enough[k]["query_ms"]["p50_ms"])
        row["recommended"] = best if row[best]["query_ms"]["p50_ms"] < 0.5 * row["exact"]["query_ms"]["p50_ms"] \
            else "exact"
        out[str(n)] = row
    return out


def run(smoke: bool = False, threads: int = 2) -> dict:
    from bench.quality import chunks, embed_cached, load_fitzgov
    from rag.dense import embed
    from rag.models import DEFAULT_EMBEDDER

    t0 = time.perf_counter()
    set_threads(threads)
    out = {"bm25": bm25_compare(smoke)}
    corpus = load_fitzgov(smoke)
    real = embed_cached(chunks(corpus, contextual=True)[2])[0]
    qvecs = embed(DEFAULT_EMBEDDER, [q.text for q in corpus.queries[:50]])
    sizes = (1_000,) if smoke else (10_000, 100_000)
    out["faiss"] = {"vectors": f"{len(real)} real fitz-gov chunk vectors reused cyclically with jitter",
                    "queries": len(qvecs), "threads": "build: all cores; query: 1 OpenMP thread, one query at a time",
                    "rule": "recommended = fastest setting with recall@10 ≥ 0.95 if it is at least 2x faster than "
                            "exact, else exact", "sizes": faiss_compare(real, qvecs, sizes)}
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out
