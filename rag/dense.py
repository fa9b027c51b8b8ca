"""Dense retrieval: sentence-transformers embeddings searched with FAISS inner product on unit vectors.

Vectors are L2-normalised, so inner product is cosine similarity. ``exact`` (IndexFlatIP) is the default:
at 10k chunks a query costs about a millisecond on one thread. ``hnsw`` (IndexHNSWFlat, M=32) trades a little
recall for sub-linear search on large corpora. FAISS's OpenMP threads are set to 1 for single queries, which
on a 2-core machine is far faster than 2 (MODELS.md). Left out on purpose: IVF/PQ compression and GPU FAISS.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from rag.models import embedder_path

log = logging.getLogger(__name__)
KINDS = ("exact", "hnsw")
_LOADED: dict[str, object] = {}


def load_embedder(name: str):
    """A cached SentenceTransformer for a registry name, local path or hub id (on the best device)."""
    if name not in _LOADED:
        from sentence_transformers import SentenceTransformer

        from rag.generate import pick_device

        _LOADED[name] = SentenceTransformer(embedder_path(name), device=pick_device())
    return _LOADED[name]


def embed(name: str, texts: list[str], progress: bool = False, batch_size: int = 32) -> np.ndarray:
    """Unit-length float32 embeddings, one row per text."""
    model = load_embedder(name)
    if not texts:
        return np.zeros((0, model.get_embedding_dimension()), dtype=np.float32)
    vecs = model.encode(texts, batch_size=batch_size, normalize_embeddings=True, show_progress_bar=progress,
                        convert_to_numpy=True)
    return np.ascontiguousarray(vecs, dtype=np.float32)


class DenseIndex:
    """FAISS over a fixed list of chunk ids; ``search`` returns ``[(chunk_id, cosine)]`` best first."""

    def __init__(self, ids: list[str], vectors: np.ndarray, kind: str = "exact"):
        import faiss

        if kind not in KINDS:
            raise ValueError(f"--faiss must be one of {', '.join(KINDS)}, not '{kind}'")
        faiss.omp_set_num_threads(1)
        self.ids, self.kind = ids, kind
        dim = vectors.shape[1]
        self.index = faiss.IndexFlatIP(dim) if kind == "exact" else faiss.IndexHNSWFlat(dim, 32,
                                                                                         faiss.METRIC_INNER_PRODUCT)
        if len(vectors):
            self.index.add(vectors)

    def search_vector(self, q: np.ndarray, k: int) -> list[tuple[str, float]]:
        if not self.ids:
            return []
        scores, idx = self.index.search(q.reshape(1, -1).astype(np.float32), min(k, len(self.ids)))
        return [(self.ids[i], float(s)) for s, i in zip(scores[0], idx[0], strict=True) if i >= 0]

    def save(self, path: Path) -> None:
        import faiss

        faiss.write_index(self.index, str(path))

    @classmethod
    def load(cls, path: Path, ids: list[str], kind: str) -> DenseIndex:
        import faiss

        faiss.omp_set_num_threads(1)
        obj = cls.__new__(cls)
        obj.ids, obj.kind, obj.index = ids, kind, faiss.read_index(str(path))
        return obj
