"""Scale and speed: openbook's real index at 1k / 10k / 100k chunks — build rates, size on disk, RSS, latency.

The corpus is fitz-gov's documents written as Markdown files, repeated under distinct folder names until the
chunk count is reached, then ingested and chunked by rag.ingest / rag.chunk and written in rag.index's own
on-disk format. Embedding 100k chunks at ~30 passages/s would take an hour, so embedding throughput is measured
on a sample, and the FAISS index is filled with *real MiniLM vectors of fitz-gov chunks reused cyclically*, with
a small jitter (σ = 0.01, re-normalised) on the copies so that no two vectors are identical — labelled as such
in the output. Everything else (tokenising, BM25, FAISS, writing, loading, querying through RagPipeline.ranked,
and the incremental update of one edited document through rag.index.update_index) is the real code path.
Each size runs in a fresh process, so its peak RSS is its own. Threads: FAISS 1 (as rag.dense sets it: one
query on 2 OpenMP threads was ~20x slower), torch 2 for the re-ranker (measured at 1 and 2 below). Note that with
replicated vectors the dense half of the re-ranker's pool is not query-related, so hybrid+rerank latency here
measures cost (30 real chunks of corpus-typical length), not a realistic candidate mix.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.measure import cores, du_mb, isolated, latencies, set_threads, summary_ms, timed

log = logging.getLogger(__name__)
JITTER = 0.01


def source_docs() -> list[tuple[str, str, str]]:
    """(id, title, content) of every fitz-gov document."""
    from bench.quality import load_fitzgov

    return [(i, t, c) for i, (t, c) in load_fitzgov().docs.items()]


def write_corpus(root: Path, target_chunks: int, docs: list[tuple[str, str, str]]) -> int:
    """Write fitz-gov documents as ``r<n>/<id>.md`` until they hold about ``target_chunks`` chunks; returns files."""
    from rag.chunk import ChunkConfig, chunk_document
    from rag.ingest import Document

    cfg, n_chunks, files, rep = ChunkConfig(), 0, 0, 0
    while n_chunks < target_chunks:
        for did, title, content in docs:
            text = f"# {title}\n\n{content}\n" if title else content + "\n"
            n_chunks += len(chunk_document(Document(did, did, title, text, "", 0.0), cfg))
            p = root / f"r{rep}" / f"{did}.md"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(text, encoding="utf-8")
            files += 1
            if n_chunks >= target_chunks:
                break
        rep += 1
    return files


def replicated(real: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """``n`` unit vectors: the real ones first, then jittered copies of them, cyclically."""
    out = real[np.arange(n) % len(real)].copy()
    if n > len(real):
        rng = np.random.default_rng(seed)
        out[len(real):] += rng.normal(0, JITTER, out[len(real):].shape).astype(np.float32)
        out /= np.linalg.norm(out, axis=1, keepdims=True)
    return np.ascontiguousarray(out, dtype=np.float32)


def one_size(size: int, vectors_file: str, queries: list[str], n_rerank: int, threads: int) -> dict:
    """Build, write, load, query and incrementally update one index of ~``size`` chunks (run in its own process)."""
    from rag.bm25 import BM25, tokenize
    from rag.chunk import ChunkConfig, chunk_document
    from rag.dense import DenseIndex
    from rag.index import Index, index_settings, update_index, write_version
    from rag.ingest import load_folder
    from rag.models import DEFAULT_EMBEDDER
    from rag.pipeline import RagConfig, RagPipeline

    logging.basicConfig(level=logging.WARNING)
    set_threads(threads)
    work = Path(tempfile.mkdtemp(prefix=f"openbook-bench-{size}-"))
    try:
        docs_dir, index_dir, out = work / "docs", work / "index", {"target_chunks": size}
        out["files"], t = timed(write_corpus, docs_dir, size, source_docs())[0], {}
        docs, t["ingest"] = timed(load_folder, docs_dir, False)
        cfg = ChunkConfig()
        chunks, t["chunk"] = timed(lambda: [c for d in docs for c in chunk_document(d, cfg)])
        indexed = [c for c in chunks if c.indexed]
        ids = [c.id for c in indexed]
        tokens, t["tokenize"] = timed(lambda: [tokenize(c.index_text) for c in indexed])
        _, t["bm25_build"] = timed(BM25, ids, tokens)
        real = np.load(vectors_file)
        vecs = replicated(real, len(ids))
        dense, t["faiss_build"] = timed(DenseIndex, ids, vecs, "exact")
        n = len(ids)
        out.update(chunks=n, real_vectors=min(len(real), n), replicated_vectors=max(n - len(real), 0))
        manifest = {**index_settings(cfg, DEFAULT_EMBEDDER, "exact"), "docs_dir": str(docs_dir.resolve()),
                    "built": time.strftime("%Y-%m-%dT%H:%M:%S"), "embedding_dim": vecs.shape[1], "n_chunks": n,
                    "documents": {d.id: {"sha256": d.sha256, "title": d.title, "mtime": d.mtime, "chunks": []}
                                  for d in docs}}
        for c in chunks:
            manifest["documents"][c.doc_id]["chunks"].append(c.id)
        path, t["write"] = timed(write_version, index_dir, manifest, chunks, tokens, vecs, dense)
        out["disk_mb"] = {"total": du_mb(path), **{f.name: du_mb(f) for f in sorted(path.iterdir())}}
        index, t["load"] = timed(Index.load, index_dir)
        out["seconds"] = {k: round(v, 3) for k, v in t.items()}
        out["chunks_per_second"] = {"tokenize": round(n / t["tokenize"]), "bm25_build": round(n / t["bm25_build"]),
                                    "tokenize+bm25": round(n / (t["tokenize"] + t["bm25_build"])),
                                    "faiss_add": round(n / t["faiss_build"])}
        pipe = RagPipeline(RagConfig(docs=str(docs_dir), index_dir=str(index_dir)), index)
        out["query_ms"] = {}
        for mode in ("bm25", "dense", "hybrid"):
            out["query_ms"][mode] = latencies(lambda q, m=mode: pipe.ranked(q, mode=m), queries)
        rr = []
        out["query_ms"]["hybrid+rerank"] = latencies(
            lambda q: rr.append(pipe.ranked(q, mode="hybrid+rerank").timings["rerank"]), queries[:n_rerank])
        out["rerank_30_ms"] = summary_ms(rr[2:])  # the first two were warm-up calls
        victim = docs_dir / docs[len(docs) // 2].id
        victim.write_text(victim.read_text() + "\nThis paragraph was added to measure an incremental update.\n")
        (_, stats), secs = timed(update_index, docs_dir, index_dir, cfg, DEFAULT_EMBEDDER, "exact", False)
        out["incremental_update"] = {"seconds": round(secs, 2), "changed_documents": stats.changed,
                                     "embedded_chunks": stats.embedded_chunks, "chunks": stats.chunks,
                                     "note": "re-reads and hashes every file, re-embeds only the changed "
                                             "document, rebuilds BM25 + FAISS and rewrites the version folder"}
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)


def embedding_throughput(texts: list[str], threads: int) -> dict:
    """Passages/s of the bulk embedding path (sentence-transformers, batch 32) on a sample of real chunks."""
    from rag.dense import load_embedder
    from rag.models import DEFAULT_EMBEDDER

    set_threads(threads)
    model = load_embedder(DEFAULT_EMBEDDER)
    model.encode(texts[:8], batch_size=32)
    vecs, secs = timed(model.encode, texts, batch_size=32, normalize_embeddings=True, convert_to_numpy=True)
    words = float(np.mean([len(t.split()) for t in texts]))
    return {"passages_per_second": round(len(texts) / secs, 1), "n": len(texts), "threads": threads,
            "mean_words": round(words, 1), "vectors": np.asarray(vecs, dtype=np.float32)}


def rerank_threads(queries: list[str], passages: list[str], n: int) -> dict:
    """Latency of re-ranking 30 (query, passage) pairs with 1 and with 2 torch threads.

    Each query gets 30 passages drawn at random (seeded), so pair lengths follow the corpus: the cross-encoder pads
    a batch to its longest pair, which makes the cost depend on the longest of the 30.
    """
    import random

    from rag.models import DEFAULT_RERANKER
    from rag.rerank import load_reranker, rerank

    model, out, rng = load_reranker(DEFAULT_RERANKER), {}, random.Random(0)
    pools = {q: [(str(i), p) for i, p in enumerate(rng.sample(passages, 30))] for q in queries[:n]}
    for th in sorted({1, min(2, cores())}):
        set_threads(th)
        out[f"{th}_threads"] = latencies(lambda q: rerank(model, q, pools[q]), queries[:n])
    return out


def run(smoke: bool = False, threads: int = 2, sizes: tuple[int, ...] | None = None) -> dict:
    from bench.quality import chunks, embed_cached, load_fitzgov

    t0 = time.perf_counter()
    sizes = sizes or ((300,) if smoke else (1_000, 10_000, 100_000))
    corpus = load_fitzgov()
    _, _, texts = chunks(corpus, contextual=True)
    queries = [q.text for q in corpus.queries][: 8 if smoke else 50]
    sample = texts[:: max(len(texts) // (32 if smoke else 256), 1)][: 32 if smoke else 256]
    emb = embedding_throughput(sample, threads)
    if smoke:
        real, label = emb.pop("vectors"), f"{len(sample)} real vectors (the throughput sample)"
    else:
        emb.pop("vectors")
        real, label = embed_cached(texts)[0], f"{len(texts)} real vectors (all fitz-gov chunks, cached by quality)"
    out = {"threads": {"faiss": 1, "torch": threads, "note": "FAISS 1 OpenMP thread for single queries (MODELS.md: "
                       "2 threads ~20x slower); torch threads for the re-ranker and embedding"},
           "embedding": emb,
           "vectors": f"{label}; larger indexes reuse them cyclically with jitter σ={JITTER} (replicated, not "
                      "embedded) — build rates below exclude embedding",
           "rerank_30_pairs_ms": rerank_threads(queries, texts, 2 if smoke else 20), "sizes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        vf = Path(tmp) / "vectors.npy"
        np.save(vf, real)
        for size in sizes:
            log.info("scale: %d chunks", size)
            try:
                res, rss = isolated(one_size, size, str(vf), queries, 2 if smoke else 20, threads)
                res["peak_rss_mb"] = rss
            except Exception as e:  # noqa: BLE001 -- e.g. out of memory at 100k: keep the smaller sizes' results
                res = {"error": f"{type(e).__name__}: {e}"}
            out["sizes"][str(size)] = res
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out
