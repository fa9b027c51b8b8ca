"""Re-ranking: score (query, passage) pairs with a sentence-transformers CrossEncoder, best first.

The cross-encoder reads query and passage together, so it can judge relevance that BM25 and bi-encoder
similarity miss; it is too slow to run over a corpus, so it only re-orders the fused top-N (default 30).
Scores go through the model's sigmoid, so they lie in [0, 1] and one abstention threshold can be calibrated
on them. On a CPU with native bf16 matrix instructions (Intel AMX or AVX512-BF16) the model runs in bf16: on the
demo it re-ranks 30 passages in 0.18 s instead of 0.70 s, with the same top passage for 39 of 40 questions (scores
differ by 0.02 at most); elsewhere, and where ``--rerank-precision fp32`` says so, it runs in fp32. No pretrained
cross-encoder installs offline, so the default is the one ``python -m rag
train-reranker`` builds (rag/train_reranker.py); any CrossEncoder path or hub id works instead (``RERANKER=``).
"""

from __future__ import annotations

from pathlib import Path

from rag.models import ModelNotFound, file_stamp, not_local, pick_device, reranker_path

_LOADED: dict[tuple[str, str], object] = {}
PRECISIONS = ("auto", "fp32", "bf16")
NATIVE_BF16 = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of CPUs that multiply bf16 in hardware


def rerank_precision(choice: str = "auto") -> str:
    """'bf16' or 'fp32': ``choice`` itself, or for 'auto' bf16 on a CPU that multiplies bf16 natively (emulated
    bf16 is slower than fp32, so other CPUs and GPUs keep fp32)."""
    if choice != "auto":
        return choice
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:  # not Linux: no cheap way to tell, keep fp32
        return "fp32"
    return "bf16" if flags & set(NATIVE_BF16) and pick_device() == "cpu" else "fp32"


def reranker_stamp(name: str) -> str:
    """A key of a local cross-encoder's weight files (path, size, modification time, as the ONNX and GGUF caches
    key theirs), or the name itself for a hub id or a missing model: `python -m rag train-reranker --force` writes
    new weights under the same name, and a rule calibrated on the old model's scores, or answers given behind it,
    do not hold for the new one (two trainings of the same config on one 2-core Xeon, 2026-12-07, scored a demo
    pair 0.077 / 0.076 and 0.087 / 0.135)."""
    try:
        files = [f for pat in ("*.safetensors", "*.bin") for f in sorted(Path(reranker_path(name)).glob(pat))]
    except ModelNotFound:
        return name
    return "-".join(file_stamp(f, 16) for f in files) or name


def load_reranker(name: str, max_length: int = 256, precision: str = "auto"):
    """A cached CrossEncoder for the default name, a local path or a hub id, in ``rerank_precision(precision)``."""
    key = (name, rerank_precision(precision))
    if key not in _LOADED:
        import torch
        from sentence_transformers import CrossEncoder

        local = reranker_path(name)
        try:
            model = CrossEncoder(local, max_length=max_length, device=pick_device())
        except OSError as e:
            if Path(local).expanduser().exists():  # a damaged local model: its own error says more
                raise
            raise not_local("--reranker", name) from e
        if key[1] == "bf16":
            model.model.to(torch.bfloat16)
        _LOADED[key] = model
    return _LOADED[key]


def rerank(model, query: str, candidates: list[tuple[str, str]], batch_size: int = 32) -> list[tuple[str, float]]:
    """Score ``(id, text)`` candidates against ``query``; returns ``[(id, score)]`` best first."""
    if not candidates:
        return []
    pairs = [(query, text) for _, text in candidates]
    # bf16 scores use oneDNN's AMX kernels; llama.cpp's share no thread with them (rag.backend_llamacpp)
    scores = model.predict(pairs, batch_size=batch_size, show_progress_bar=False,
                           convert_to_numpy=True).astype("float32")
    ranked = sorted(zip((i for i, _ in candidates), scores.tolist(), strict=True), key=lambda x: -x[1])
    return [(i, float(s)) for i, s in ranked]
