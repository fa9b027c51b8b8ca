"""fitz-gov, the third-party retrieval benchmark the re-ranker trains and is measured on: its queries and qrels,
a split by question text, and openbook's own BM25 + dense runs over its documents (cached).

Documents are ``"title. content"``, one per fitz-gov document, not chunked: document-level retrieval, which is
what the qrels judge. The split hashes each normalised question, so a question asked twice under two qids never
lands on both sides. Left out: training and measuring the re-ranker (rag/train_reranker.py) and the chunked,
end-to-end retrieval benchmark (bench/quality.py).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from rag.atomic import write_text
from rag.bm25 import BM25, tokenize
from rag.config import UserError
from rag.fuse import rrf
from rag.models import cache_dir

log = logging.getLogger(__name__)
DEPTH = 100  # retrieval depth per retriever; MRR is computed over the fused list of this depth


@dataclass(frozen=True)
class Query:
    qid: str
    text: str
    relevant: tuple[str, ...]


def fitzgov_dir() -> Path:
    spec = importlib.util.find_spec("fitz_gov")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("fitz-gov is not installed; run `make setup`")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


@lru_cache(maxsize=1)
def data_version() -> str:
    """sha256 of the corpus and qrels files: changes whenever the evaluation data does."""
    h = hashlib.sha256()
    for p in ("corpus/documents.jsonl", "queries/query_mappings.json"):
        h.update((fitzgov_dir() / p).read_bytes())
    return h.hexdigest()[:16]


@lru_cache(maxsize=1)
def load_corpus() -> dict[str, str]:
    """fitz-gov documents as ``{id: "title. content"}`` (some have no title)."""
    out = {}
    for line in (fitzgov_dir() / "corpus" / "documents.jsonl").read_text().splitlines():
        d = json.loads(line)
        out[d["id"]] = f"{d['title']}. {d['content']}" if d.get("title") else d["content"]
    return out


def normalise(text: str) -> str:
    """Lowercase, punctuation and spacing removed: 'What is X?' and 'what is  x' are the same question."""
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def split_by_text(queries: list[Query], fraction: float, seed: int) -> tuple[list[Query], list[Query]]:
    """Hash each normalised text, so every copy of a question lands on the same side, whatever the order."""
    def held_out(q: Query) -> bool:
        h = hashlib.sha256(f"{seed}:{normalise(q.text)}".encode()).digest()
        return int.from_bytes(h[:8], "big") / 2**64 < fraction
    return [q for q in queries if not held_out(q)], [q for q in queries if held_out(q)]


def fitzgov_split(seed: int = 0, test_fraction: float = 0.2) -> tuple[list[Query], list[Query]]:
    """fitz-gov queries that have qrels, split into (train, test) by normalised query text.

    Not by qid: 131 test qids would otherwise repeat a training question word for word.
    """
    maps = json.loads((fitzgov_dir() / "queries" / "query_mappings.json").read_text())["mappings"]
    queries = [Query(qid, m["query"], tuple(m["relevant_docs"]))
               for cat in sorted(maps) for qid, m in sorted(maps[cat].items()) if m.get("relevant_docs")]
    return split_by_text(queries, test_fraction, seed)


def retrieve_all(embedder: str = "minilm") -> dict[str, dict[str, list[tuple[str, float]]]]:
    """BM25 and dense top-100 for every fitz-gov query, ``{qid: {"bm25": [...], "dense": [...]}}``.

    Encoding the corpus takes ~85 s on 2 cores, so results are cached under the cache dir, keyed by data.
    """
    key = hashlib.sha256(f"{data_version()}:{embedder}:{DEPTH}".encode()).hexdigest()[:16]
    path = cache_dir() / "fitzgov" / f"retrieval-{key}.json"
    if path.exists():
        return json.loads(path.read_text())
    from rag.dense import DenseIndex, embed

    corpus = load_corpus()
    ids = list(corpus)
    train, test = fitzgov_split()
    queries = train + test
    log.info("mining: BM25 + dense (%s) over %d fitz-gov documents for %d queries (once)", embedder, len(ids),
             len(queries))
    bm25 = BM25(ids, [tokenize(corpus[i]) for i in ids])
    dense = DenseIndex(ids, embed(embedder, [corpus[i] for i in ids], progress=True))
    qvecs = embed(embedder, [q.text for q in queries])
    out = {q.qid: {"bm25": bm25.search(q.text, DEPTH), "dense": dense.search_vector(v, DEPTH)}
           for q, v in zip(queries, qvecs, strict=True)}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(out))
    return out


def hybrid(runs: dict, qid: str) -> list[tuple[str, float]]:
    return rrf([runs[qid]["bm25"], runs[qid]["dense"]], k=60)
