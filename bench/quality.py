"""Retrieval quality on third-party data: fitz-gov test queries (or any BEIR-format set), per retrieval mode.

Documents go through openbook's own chunker (semantic, 120 words) with and without the contextual header, are
indexed with rag.bm25 and rag.dense (exact FAISS), and each mode is scored at the document level (a document
ranks at its best chunk): nDCG@10, recall@10, recall@100 and MRR, with a 95% paired bootstrap interval of the
nDCG@10 difference to ``hybrid``. ``hybrid+rerank`` is the pipeline's default: the trained cross-encoder re-orders
the fused top 30 and its order joins the BM25 and dense lists in a second RRF (rag/pipeline.py). fitz-gov uses
only the *test* split of ``rag.fitzgov.fitzgov_split`` (the re-ranker trained on the rest), and also reports
the document-level runs that rag.fitzgov caches (``retrieve_all``: "title. content", no chunking).
Left out on purpose: the BEIR datasets themselves (none installs offline; pass ``--beir DIR``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.measure import set_threads
from rag.bm25 import BM25, tokenize
from rag.chunk import ChunkConfig, chunk_document
from rag.fitzgov import Query, fitzgov_split
from rag.fuse import rrf
from rag.ingest import Document
from rag.metrics import ndcg_at, paired_bootstrap, recall_at, reciprocal_rank
from rag.models import DEFAULT_EMBEDDER, DEFAULT_RERANKER, cache_dir

log = logging.getLogger(__name__)
DEPTH = 100  # documents per ranking (recall@100)
RERANK_N = 30  # fused candidates the cross-encoder re-orders, as RagConfig.rerank_n


@dataclass
class Corpus:
    name: str
    docs: dict[str, tuple[str, str]]  # id -> (title, text)
    queries: list[Query]


class BeirError(ValueError):
    """A folder that is not in the BEIR layout; the message names the missing or malformed file."""


def load_beir(path: str | Path, split: str = "test") -> Corpus:
    """A BEIR-format folder: ``corpus.jsonl`` ({_id, title, text}), ``queries.jsonl`` ({_id, text}) and
    ``qrels/<split>.tsv`` (query-id, corpus-id, score; a header line). Queries without a positive qrel are dropped.
    """
    root = Path(path)
    files = {"corpus": root / "corpus.jsonl", "queries": root / "queries.jsonl",
             "qrels": root / "qrels" / f"{split}.tsv"}
    for what, f in files.items():
        if not f.is_file():
            raise BeirError(f"--beir {root}: {what} file {f} is missing (expected corpus.jsonl, queries.jsonl, "
                            f"qrels/{split}.tsv)")

    def jsonl(f: Path) -> list[dict]:
        rows = []
        for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise BeirError(f"{f}:{n}: not valid JSON ({e.msg})") from None
        return rows

    docs = {str(d["_id"]): (d.get("title") or "", d.get("text") or "") for d in jsonl(files["corpus"])}
    texts = {str(q["_id"]): q["text"] for q in jsonl(files["queries"])}
    relevant: dict[str, list[str]] = {}
    for n, line in enumerate(files["qrels"].read_text(encoding="utf-8").splitlines(), 1):
        cols = line.strip().split("\t")
        if not line.strip() or (n == 1 and not cols[-1].lstrip("-").isdigit()):
            continue  # blank line or header
        if len(cols) < 3:
            raise BeirError(f"{files['qrels']}:{n}: expected 'query-id<TAB>corpus-id<TAB>score'")
        if int(cols[-1]) > 0 and cols[1] in docs and cols[0] in texts:
            relevant.setdefault(cols[0], []).append(cols[1])
    queries = [Query(q, texts[q], tuple(r)) for q, r in relevant.items()]
    if not queries:
        raise BeirError(f"--beir {root}: no query in qrels/{split}.tsv has a positive judgement on a known document")
    return Corpus(root.name, docs, queries)


def load_fitzgov(smoke: bool = False, seed: int = 0) -> Corpus:
    """fitz-gov documents and its *test* queries; ``smoke`` keeps 4 queries over 40 documents."""
    from rag.fitzgov import fitzgov_dir

    docs = {}
    for line in (fitzgov_dir() / "corpus" / "documents.jsonl").read_text().splitlines():
        d = json.loads(line)
        docs[d["id"]] = (d.get("title") or "", d["content"])
    test = fitzgov_split(seed)[1]
    if smoke:
        test = random.Random(seed).sample(test, 4)
        keep = {d for q in test for d in q.relevant}
        keep |= set(random.Random(seed).sample(sorted(set(docs) - keep), 40 - len(keep)))
        docs = {i: docs[i] for i in sorted(keep)}
    return Corpus("fitz-gov" + (" (smoke subset)" if smoke else ""), docs, test)


def chunks(corpus: Corpus, contextual: bool) -> tuple[list[str], list[str], list[str]]:
    """(chunk ids, their document ids, indexed texts) from openbook's default chunker."""
    cfg = ChunkConfig(contextual=contextual)
    ids, doc_of, texts = [], [], []
    for did, (title, text) in corpus.docs.items():
        for c in chunk_document(Document(did, did, title, text, "", 0.0), cfg):
            if c.indexed:
                ids.append(c.id)
                doc_of.append(did)
                texts.append(c.index_text)
    return ids, doc_of, texts


def embed_cached(texts: list[str], embedder: str = DEFAULT_EMBEDDER) -> tuple[np.ndarray, float | None]:
    """Unit vectors for ``texts``, cached on disk by content; (vectors, seconds spent embedding or None if cached)."""
    key = hashlib.sha256(json.dumps([embedder, texts]).encode()).hexdigest()[:16]
    path = cache_dir() / "bench" / f"vectors-{key}.npy"
    if path.exists():
        return np.load(path), None
    from rag.dense import embed

    t0 = time.perf_counter()
    vecs = embed(embedder, texts, progress=False)
    secs = time.perf_counter() - t0
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path.with_suffix(".tmp.npy"), vecs)
    path.with_suffix(".tmp.npy").replace(path)
    return vecs, secs


def to_docs(hits: list[tuple[str, float]], doc_of: dict[str, str], depth: int = DEPTH) -> list[str]:
    """Best-first document ids from best-first chunk hits (a document ranks at its best chunk)."""
    return list(dict.fromkeys(doc_of[c] for c, _ in hits))[:depth]


def score(rankings: dict[str, list[list[str]]], queries: list[Query], seed: int = 0) -> dict:
    """Mean nDCG@10, recall@10/100 and MRR per system; nDCG@10 difference to hybrid with a 95% CI (and, for
    hybrid+rerank, to bm25 and to dense)."""
    out, ndcg = {}, {}
    for name, runs in rankings.items():
        rel = [set(q.relevant) for q in queries]
        ndcg[name] = np.array([ndcg_at(r, s) for r, s in zip(runs, rel, strict=True)])
        out[name] = {"ndcg@10": ndcg[name].mean(),
                     "recall@10": np.mean([recall_at(r, s, 10) for r, s in zip(runs, rel, strict=True)]),
                     "recall@100": np.mean([recall_at(r, s, 100) for r, s in zip(runs, rel, strict=True)]),
                     "mrr": np.mean([reciprocal_rank(r, s) for r, s in zip(runs, rel, strict=True)])}
        out[name] = {k: round(float(v), 4) for k, v in out[name].items()}
    for name in rankings:
        if name != "hybrid" and "hybrid" in ndcg:
            d, lo, hi = paired_bootstrap(ndcg[name], ndcg["hybrid"], seed=seed)
            out[name]["ndcg@10 vs hybrid"] = [round(d, 4), round(lo, 4), round(hi, 4)]
    if "hybrid+rerank" in ndcg:  # the bar: beat each single retriever by more than the interval
        for single in ("bm25", "dense"):
            d, lo, hi = paired_bootstrap(ndcg["hybrid+rerank"], ndcg[single], seed=seed)
            out["hybrid+rerank"][f"ndcg@10 vs {single}"] = [round(d, 4), round(lo, 4), round(hi, 4)]
    return out


def run_modes(corpus: Corpus, contextual: bool, rerank: bool, threads: int) -> dict:
    """Index ``corpus`` with openbook's chunker, BM25 and FAISS; score every mode on its queries."""
    from rag.dense import DenseIndex, embed

    ids, doc_list, texts = chunks(corpus, contextual)
    doc_of = dict(zip(ids, doc_list, strict=True))
    set_threads(threads)
    vecs, embed_secs = embed_cached(texts)
    bm25 = BM25(ids, [tokenize(t) for t in texts])
    dense = DenseIndex(ids, vecs)
    qvecs = embed(DEFAULT_EMBEDDER, [q.text for q in corpus.queries])
    wide = DEPTH * 2  # chunks per retriever, so that ~DEPTH distinct documents remain after de-duplication
    ranks: dict[str, list[list[str]]] = {m: [] for m in ("bm25", "dense", "hybrid", "hybrid+rerank")}
    ce_model, ce_secs, text_of = None, [], dict(zip(ids, texts, strict=True))
    if rerank:
        from rag.rerank import load_reranker
        from rag.rerank import rerank as ce_rerank

        ce_model = load_reranker(DEFAULT_RERANKER)
    for q, v in zip(corpus.queries, qvecs, strict=True):
        b, d = bm25.search(q.text, wide), dense.search_vector(v, wide)
        fused = rrf([b, d], k=60)
        ranks["bm25"].append(to_docs(b, doc_of))
        ranks["dense"].append(to_docs(d, doc_of))
        ranks["hybrid"].append(to_docs(fused, doc_of))
        if ce_model is not None:
            t0 = time.perf_counter()
            ce = ce_rerank(ce_model, q.text, [(c, text_of[c]) for c, _ in fused[:RERANK_N]])
            ce_secs.append(time.perf_counter() - t0)
            ranks["hybrid+rerank"].append(to_docs(rrf([b, d, ce], k=60), doc_of))
    if not rerank:
        del ranks["hybrid+rerank"]
    out = {"contextual_header": contextual, "chunks": len(ids), "documents": len(corpus.docs),
           "queries": len(corpus.queries), "systems": score(ranks, corpus.queries),
           "embed_seconds": None if embed_secs is None else round(embed_secs, 1),
           "embed_cached": embed_secs is None}
    if ce_secs:
        out["rerank_seconds_per_query_p50"] = round(float(np.median(ce_secs)), 3)
    return out


def run_cached_doc_level(queries: list[Query]) -> dict:
    """bm25 / dense / hybrid from ``rag.fitzgov.retrieve_all`` (document level, "title. content")."""
    from rag.fitzgov import hybrid, retrieve_all

    runs = retrieve_all()
    ranks = {"bm25": [[d for d, _ in runs[q.qid]["bm25"]] for q in queries],
             "dense": [[d for d, _ in runs[q.qid]["dense"]] for q in queries],
             "hybrid": [[d for d, _ in hybrid(runs, q.qid)][:DEPTH] for q in queries]}
    return {"queries": len(queries), "systems": score(ranks, queries)}


def run(smoke: bool = False, beir: str | None = None, threads: int = 2) -> dict:
    """The section: fitz-gov (header on, with re-ranking; header off; cached document level), or a BEIR folder."""
    t0 = time.perf_counter()
    corpus = load_beir(beir) if beir else load_fitzgov(smoke)
    log.info("quality: %s, %d documents, %d queries", corpus.name, len(corpus.docs), len(corpus.queries))
    out = {"dataset": corpus.name, "threads": threads, "variants": {}}
    out["variants"]["chunks + contextual header (default)"] = run_modes(corpus, True, rerank=True, threads=threads)
    out["variants"]["chunks, no header"] = run_modes(corpus, False, rerank=False, threads=threads)
    if not beir and not smoke:
        out["variants"]["documents, title. content (retrieve_all cache)"] = run_cached_doc_level(corpus.queries)
    out["note"] = ("document-level metrics (a document ranks at its best chunk); hybrid = RRF(k=60) of BM25 and dense; "
                   "hybrid+rerank = RRF of BM25, dense and the cross-encoder order of the fused top 30 (pipeline "
                   "default). Re-ranking runs on the default variant only, to bound run time.")
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out
