"""Re-ranking: score (query, passage) pairs with a sentence-transformers CrossEncoder, best first.

The cross-encoder reads query and passage together, so it can judge relevance that BM25 and bi-encoder
similarity miss; it is too slow to run over a corpus, so it only re-orders the fused top-N (default 30).
Scores go through the model's sigmoid, so they lie in [0, 1] and one abstention threshold can be calibrated
on them. No pretrained cross-encoder installs offline, so the default is the one ``python -m rag
train-reranker`` builds (rag/train_reranker.py); any CrossEncoder path or hub id works instead (``RERANKER=``).
"""

from __future__ import annotations

from pathlib import Path

from rag.models import not_local, pick_device, reranker_path

_LOADED: dict[str, object] = {}


def load_reranker(name: str, max_length: int = 256):
    """A cached CrossEncoder for the default name, a local path or a hub id."""
    if name not in _LOADED:
        from sentence_transformers import CrossEncoder

        local = reranker_path(name)
        try:
            _LOADED[name] = CrossEncoder(local, max_length=max_length, device=pick_device())
        except OSError as e:
            if Path(local).expanduser().exists():  # a damaged local model: its own error says more
                raise
            raise not_local("--reranker", name) from e
    return _LOADED[name]


def rerank(model, query: str, candidates: list[tuple[str, str]], batch_size: int = 32) -> list[tuple[str, float]]:
    """Score ``(id, text)`` candidates against ``query``; returns ``[(id, score)]`` best first."""
    if not candidates:
        return []
    scores = model.predict([(query, text) for _, text in candidates], batch_size=batch_size,
                           show_progress_bar=False, convert_to_numpy=True)
    ranked = sorted(zip((i for i, _ in candidates), scores.tolist(), strict=True), key=lambda x: -x[1])
    return [(i, float(s)) for i, s in ranked]
