"""Stores: the embedded index vs Milvus (Lite) at 100k and 1M chunks — build rate, query latency, recall, RSS, disk.

Chunks are fitz-gov's (openbook's default chunker, contextual headers), repeated under distinct ``r<n>/`` document
ids until the size is reached; their vectors are real MiniLM vectors reused cyclically with jitter, as
bench/scale.py does (replicated, not embedded: build rates exclude embedding), and their BM25 tokens are the real
tokens of the repeated text. Each store is built by its real writer (``rag.index.write_version`` after BM25 +
FAISS; ``MilvusStore.write``: insert, flush, index, load, verify, publish) in one fresh process, then opened and
queried in another, so build and serving memory are each their own. Milvus's memory is its engine's child
process plus the Python client. Latency: one query at a time, k=10, BM25 by query text (tokenising included),
dense by a precomputed query vector (the embedder is the same for both and not what is compared).
recall@10: dense against exact inner product computed with numpy; BM25 against the embedded BM25's scores
(replicated texts tie in groups, so the ids within a tie are arbitrary; the top-10 scores are compared).
First, the same answers: both stores over the real fitz-gov chunks, every test query through bm25, dense and
hybrid (RRF), nDCG@10 and recall@5 by document with the paired bootstrap interval of the difference.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.measure import du_mb, isolated, latencies, rss_mb, set_threads, timed

log = logging.getLogger(__name__)
K = 10
STORES = ("embedded", "milvus")
SIZE_RATE = 600  # chunks per second of a whole size (both stores built, opened, queried): 20k took ~35 s here


def build_corpus(n: int, data: dict):
    """``n`` chunks (fitz-gov's, repeated), their BM25 tokens, unit vectors and an index manifest."""
    from bench.scale import replicated
    from rag.bm25 import tokenize
    from rag.chunk import Chunk, ChunkConfig
    from rag.index import index_settings
    from rag.models import DEFAULT_EMBEDDER

    ids, doc_of, texts = data["ids"], data["doc_of"], data["texts"]
    base_tokens = [tokenize(t) for t in texts]
    chunks, tokens, docs = [], [], {}
    for i in range(n):
        j, rep = i % len(texts), i // len(texts)
        did = f"r{rep:04d}/{doc_of[j]}"  # data is sorted by document: chunk order = sorted ids, as load_folder's
        chunks.append(Chunk(f"r{rep:04d}/{ids[j]}", did, texts[j], 0, len(texts[j])))
        tokens.append(base_tokens[j])
        docs.setdefault(did, {"sha256": f"{rep}-{doc_of[j]}", "title": "", "mtime": 0.0, "meta": {}, "chunks": []})
        docs[did]["chunks"].append(chunks[-1].id)
    vecs = replicated(data["vectors"], n)
    manifest = {**index_settings(ChunkConfig(), DEFAULT_EMBEDDER, "exact"), "docs_dir": "bench", "built": "",
                "embedding_dim": vecs.shape[1], "n_chunks": n, "documents": docs}
    return chunks, tokens, vecs, manifest


def peak_mb() -> float:
    """This process's peak RSS from /proc (VmHWM starts afresh at exec; ru_maxrss carries the forking parent's)."""
    status = Path("/proc/self/status").read_text()
    return round(int(status.split("VmHWM:")[1].split()[0]) / 1024, 1)


def engine_rss_mb(root: Path) -> dict:
    """Current and peak RSS of Milvus Lite's engine process for the file in ``root``."""
    from milvus_lite.server_manager import server_manager_instance

    server = server_manager_instance._servers.get(str((root / "milvus.db").resolve()))
    if server is None or server._p is None:
        return {}
    status = dict(line.split(":", 1) for line in Path(f"/proc/{server._p.pid}/status").read_text().splitlines())
    return {k: round(int(status[v].split()[0]) / 1024, 1) for k, v in (("rss_mb", "VmRSS"), ("peak_mb", "VmHWM"))}


def build(store: str, n: int, data: dict, root: str) -> dict:
    """Write one store of ``n`` chunks (in its own process); seconds, chunks/s, disk and memory."""
    from rag.bm25 import BM25
    from rag.dense import DenseIndex
    from rag.index import write_version
    from rag.store_milvus import MilvusStore, close

    logging.basicConfig(level=logging.WARNING)
    set_threads(1)
    chunks, tokens, vecs, manifest = build_corpus(n, data)
    ids, root, before = [c.id for c in chunks], Path(root), rss_mb()
    if store == "embedded":
        def write():
            BM25(ids, tokens)  # built at load too; timed here as the work of a build
            return write_version(root, manifest, chunks, tokens, vecs, DenseIndex(ids, vecs, "exact"))
        _, secs = timed(write)
        out = {"disk_mb": du_mb(root)}
    else:
        _, secs = timed(MilvusStore.write, root, "", manifest, chunks, tokens, vecs)
        out = {"disk_mb": du_mb(root), "engine": engine_rss_mb(root)}
        close(root)
    return out | {"chunks": n, "seconds": round(secs, 2), "chunks_per_second": round(n / secs),
                  "client_rss_mb": {"data": before, "after": rss_mb(), "peak": peak_mb()}}


def serve(store: str, n: int, root: str, queries: list[str], qvecs: np.ndarray, exact: list[list[int]],
          bm25_ref: list[list[float]] | None) -> dict:
    """Open a built store in a fresh process and query it: load time, latency, recall@10, memory."""
    from rag.index import Index
    from rag.store_milvus import MilvusStore, close

    logging.basicConfig(level=logging.WARNING)
    set_threads(1)
    root, before = Path(root), rss_mb()
    index, load_s = timed(Index.load if store == "embedded" else MilvusStore.open, root)
    pos = {c: i for i, c in enumerate(index.ids)}
    dense = index.dense.search_vector if store == "embedded" else index.search_vector
    out = {"load_seconds": round(load_s, 2), "query_ms": {
        "bm25": latencies(lambda q: index.search_bm25(q, K), queries),
        "dense": latencies(lambda i: dense(qvecs[i], K), list(range(len(queries))))}}
    found = [[pos[c] for c, _ in dense(qvecs[i], K)] for i in range(len(queries))]
    out["dense_recall@10_vs_exact"] = round(float(np.mean([len(set(f) & set(e)) / K
                                                           for f, e in zip(found, exact, strict=True)])), 4)
    scores = [[s for _, s in index.search_bm25(q, K)] for q in queries]
    if bm25_ref is not None:
        out["bm25_top10_scores_match"] = round(float(np.mean([
            len(a) == len(b) and np.allclose(a, b, rtol=1e-4) for a, b in zip(scores, bm25_ref, strict=True)])), 4)
    out["client_rss_mb"] = {"before_open": before, "after_queries": rss_mb(), "peak": peak_mb()}
    if store == "milvus":
        out["engine"] = engine_rss_mb(root)
        close(root)
    return out | {"bm25_scores": scores}


def agreement(data: dict, queries: list[str], qvecs: np.ndarray, relevant: list[list[str]], root: str) -> dict:
    """Both stores over the real fitz-gov chunks (no replication): per mode (bm25, dense, hybrid = RRF of the two,
    as rag.pipeline fuses) nDCG@10 and recall@5 by document, and the paired bootstrap interval of Milvus − embedded."""
    from bench.quality import DEPTH, to_docs
    from rag.fuse import rrf
    from rag.index import Index
    from rag.metrics import ndcg_at, paired_bootstrap, recall_at
    from rag.store_milvus import MilvusStore, close

    logging.basicConfig(level=logging.WARNING)
    set_threads(1)
    chunks, tokens, vecs, manifest = build_corpus(len(data["texts"]), data)
    doc_of = {c.id: c.doc_id.split("/", 1)[1] for c in chunks}  # r0000/<fitz-gov id>
    stores = {"embedded": Index(Path(root), manifest, chunks, tokens, vecs),
              "milvus": MilvusStore.write(Path(root), "", manifest, chunks, tokens, vecs)}
    scores = {}
    for name, st in stores.items():
        dense = st.dense.search_vector if name == "embedded" else st.search_vector
        for i, q in enumerate(queries):
            b, d = st.search_bm25(q, DEPTH * 2), dense(qvecs[i], DEPTH * 2)
            for mode, hits in (("bm25", b), ("dense", d), ("hybrid", rrf([b, d], 60))):
                docs, rel = to_docs(hits, doc_of), set(relevant[i])
                row = scores.setdefault(mode, {}).setdefault(name, {"ndcg@10": [], "recall@5": []})
                row["ndcg@10"].append(ndcg_at(docs, rel, 10))
                row["recall@5"].append(recall_at(docs, rel, 5))
    close(Path(root))
    out = {"chunks": len(chunks), "queries": len(queries)}
    for mode, by in scores.items():
        out[mode] = {m: {"embedded": round(float(np.mean(by["embedded"][m])), 4),
                         "milvus": round(float(np.mean(by["milvus"][m])), 4),
                         "milvus_minus_embedded": [round(x, 4) for x in paired_bootstrap(by["milvus"][m],
                                                                                         by["embedded"][m])]}
                     for m in ("ndcg@10", "recall@5")}
    return out


def run(smoke: bool = False, threads: int = 1, sizes: tuple[int, ...] | None = None) -> dict:
    from bench.quality import chunks, embed_cached, load_fitzgov
    from rag.dense import embed
    from rag.models import DEFAULT_EMBEDDER

    t0 = time.perf_counter()
    sizes = sizes or ((2_000,) if smoke else (100_000, 1_000_000))
    corpus = load_fitzgov()
    ids, doc_of, texts = chunks(corpus, contextual=True)
    if smoke:  # a sample of real vectors, embedded now (the full fitz-gov set is cached by the quality section)
        keep = list(range(0, len(texts), max(len(texts) // 200, 1)))[:200]
        ids, doc_of, texts = [ids[i] for i in keep], [doc_of[i] for i in keep], [texts[i] for i in keep]
        vectors = embed(DEFAULT_EMBEDDER, texts)
    else:
        vectors = embed_cached(texts)[0]
    every = corpus.queries[:10] if smoke else corpus.queries  # agreement: all test queries; latency: 100
    all_q, relevant = [q.text for q in every], [list(q.relevant) for q in every]
    all_v = embed(DEFAULT_EMBEDDER, all_q)
    queries, qvecs = all_q[:100], all_v[:100]
    order = sorted(range(len(texts)), key=lambda j: doc_of[j])  # stable: chunks keep their order in a document
    data = {"ids": [ids[j] for j in order], "doc_of": [doc_of[j] for j in order], "texts": [texts[j] for j in order],
            "vectors": vectors[order]}
    out = {"k": K, "threads": threads, "queries": len(queries), "sizes": {},
           "vectors": f"{len(texts)} real MiniLM vectors reused cyclically with jitter (bench/scale.py); build "
                      "rates exclude embedding",
           "engine": "Milvus Lite 2.5 (milvus-lite; Milvus's C++ core in a child process), FLAT IP + BM25 "
                     "SPARSE_INVERTED_INDEX; embedded: rag.index (FAISS IndexFlatIP + BM25)"}
    from bench.scale import replicated

    with tempfile.TemporaryDirectory(prefix="openbook-store-fitzgov-") as tmp:
        log.info("store: fitz-gov test queries on both stores (%d chunks)", len(texts))
        out["fitzgov"], _ = isolated(agreement, data, all_q, all_v, relevant, str(Path(tmp) / "index"))
    for n in sizes:
        left = float(os.environ.get("OPENBOOK_BENCH_DEADLINE", "inf")) - time.time()
        if not smoke and n / SIZE_RATE > left:  # python -m bench --budget-minutes: 1M alone takes ~half an hour
            out["sizes"][str(n)] = {"skipped": f"~{n / SIZE_RATE / 60:.0f} min, {max(left, 0) / 60:.0f} min left "
                                    "of the run's budget; run `python -m bench --sections store --budget-minutes 90`"}
            continue
        vecs = replicated(data["vectors"], n)
        exact = [np.argsort(-(vecs @ q), kind="stable")[:K].tolist() for q in qvecs]
        del vecs
        res, ref = {}, None
        for store in STORES:
            log.info("store: %s at %d chunks", store, n)
            work = Path(tempfile.mkdtemp(prefix=f"openbook-store-{store}-{n}-"))
            try:
                built, _ = isolated(build, store, n, data, str(work / "index"))
                served, _ = isolated(serve, store, n, str(work / "index"), queries, qvecs, exact, ref)
                ref = ref or served["bm25_scores"]
                served.pop("bm25_scores")
                res[store] = {"build": built, "serve": served}
            except Exception as e:  # noqa: BLE001 -- e.g. out of memory at 1M: keep the other results
                res[store] = {"error": f"{type(e).__name__}: {e}"}
                log.error("store %s at %d failed: %s", store, n, e)
            finally:
                shutil.rmtree(work, ignore_errors=True)
        out["sizes"][str(n)] = res
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def compare_evals(embedded: dict, engine: dict, n: int = 2000) -> dict:
    """Two ``rag eval --retrieval-only --json`` results on the same questions: per mode, each store's recall@5 and
    nDCG@10 and the paired bootstrap interval of engine − embedded (per question; unanswerable ones have no
    sources and are left out, as rag.evaluate does)."""
    from rag import metrics as M

    rows = {q["id"]: q for q in embedded["per_question"] if q["sources"]}
    other = {q["id"]: q for q in engine["per_question"] if q["sources"]}
    if rows.keys() != other.keys():
        raise ValueError("the two evaluations are not over the same questions")
    out = {"questions": len(rows), "modes": {}}
    for mode in embedded["retrieval"]:
        per = {name: [M.retrieval_scores(qs[i]["retrieved"][mode], set(qs[i]["sources"])) for i in sorted(rows)]
               for name, qs in (("embedded", rows), ("engine", other))}
        out["modes"][mode] = {"identical_rankings": sum(rows[i]["retrieved"][mode] == other[i]["retrieved"][mode]
                                                        for i in rows)}
        for metric in ("recall@5", "ndcg@10"):
            a, b = ([s[metric] for s in per[name]] for name in ("engine", "embedded"))
            diff = M.paired_bootstrap(a, b, n)
            out["modes"][mode][metric] = {"embedded": round(float(np.mean(b)), 4),
                                          "engine": round(float(np.mean(a)), 4),
                                          "engine_minus_embedded": [round(x, 4) for x in diff]}
    return out


if __name__ == "__main__":  # python -m bench.store EMBEDDED.json ENGINE.json OUT.json
    import json
    import sys

    a, b = (json.loads(Path(p).read_text()) for p in sys.argv[1:3])
    res = {"embedded": sys.argv[1], "engine": sys.argv[2], **compare_evals(a, b)}
    Path(sys.argv[3]).write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))
