"""Dense retrieval: sentence-transformers embeddings searched with FAISS inner product on unit vectors.

Vectors are L2-normalised, so inner product is cosine similarity. ``exact`` (IndexFlatIP) is the default:
at 10k chunks a query costs about a millisecond on one thread. ``hnsw`` (IndexHNSWFlat, M=32) trades a little
recall for sub-linear search on large corpora. FAISS's OpenMP threads are set to 1 for single queries, which
on a 2-core machine is far faster than 2 (MODELS.md). A ``--where`` filter (``rag/filters.py``) restricts the
search itself to the allowed chunks with FAISS's ``IDSelectorBitmap``; HNSW, whose graph walk can come back short
when few chunks are allowed, is topped up by scoring every allowed vector exactly. Left out on purpose: IVF/PQ
compression and GPU FAISS.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from functools import cache
from pathlib import Path

import numpy as np

from rag.atomic import replace_dir
from rag.models import embedder_path, not_local, pick_device

log = logging.getLogger(__name__)
KINDS = ("exact", "hnsw")
_LOADED: dict[str, object] = {}


def load_embedder(name: str):
    """A cached SentenceTransformer for a registry name, local path or hub id (on the best device)."""
    if name not in _LOADED:
        from sentence_transformers import SentenceTransformer

        local = embedder_path(name)
        try:
            _LOADED[name] = SentenceTransformer(local, device=pick_device())
        except OSError as e:
            if Path(local).expanduser().exists():  # a damaged local model: its own error says more
                raise
            raise not_local("--embedder", name) from e
    return _LOADED[name]


@cache  # read per query otherwise: two JSON files and a glob on every embed() call
def _onnx_dir(name: str) -> Path | None:
    """Cache folder of the ONNX copy of a local mean-pooling model (keyed by its path and weights), else None."""
    from rag.models import cache_dir

    root = Path(embedder_path(name))
    try:
        modules = json.loads((root / "modules.json").read_text())
        pooling = json.loads((root / "1_Pooling" / "config.json").read_text())
        weights = next(root.glob("*.safetensors")).stat()
    except (OSError, StopIteration, ValueError):
        return None  # a hub id or another layout: sentence-transformers handles it
    kinds = [m["type"].rsplit(".", 1)[-1] for m in modules]
    mean_only = pooling.get("pooling_mode_mean_tokens") and sum(bool(v) for k, v in pooling.items()
                                                                if k.startswith("pooling_mode")) == 1
    if kinds not in (["Transformer", "Pooling", "Normalize"], ["Transformer", "Pooling"]) or not mean_only:
        return None
    key = hashlib.sha256(f"{root.resolve()}|{weights.st_size}|{weights.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / "onnx" / key


def export_onnx(name: str) -> Path | None:
    """Export the embedder's transformer to ONNX once, verified against sentence-transformers; None if it can't.

    Why: a cold ``python -m rag index`` after one edit spent ~6 s of ~8 importing sentence-transformers,
    transformers and torch to embed a handful of chunks; onnxruntime + tokenizers import in ~0.2 s and give the
    same vectors (max abs difference ~2e-7 on MiniLM). Only Transformer → mean Pooling (→ Normalize) models.
    """
    if ("onnx-failed", name) in _LOADED:
        return None
    out = _onnx_dir(name)
    if out is None or (out / "model.onnx").exists():
        return out
    import torch

    st = load_embedder(name)
    hf = st[0].auto_model.cpu().eval()
    names = [n for n in ("input_ids", "attention_mask", "token_type_ids")
             if n in st.tokenizer("x", return_tensors="pt")]

    class Encoder(torch.nn.Module):  # keyword call: transformers 5 changed forward()'s positional order
        def __init__(self):
            super().__init__()
            self.hf = hf  # a submodule, so its weights export as parameters

        def forward(self, *args):
            return self.hf(**dict(zip(names, args, strict=True))).last_hidden_state

    sample = st.tokenizer(["an example", "a second, longer example"], padding=True, return_tensors="pt")
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        with torch.no_grad():
            torch.onnx.export(Encoder(), tuple(sample[n] for n in names), str(tmp / "model.onnx"),
                              input_names=names, output_names=["hidden"], opset_version=17, dynamo=False,
                              dynamic_axes={n: {0: "batch", 1: "seq"} for n in [*names, "hidden"]})
        st.tokenizer.save_pretrained(str(tmp))
        (tmp / "settings.json").write_text(json.dumps({"inputs": names, "max_length": st.max_seq_length}))
        texts = ["The Pro plan costs EUR 49 per month.", "Returns within 30 days of delivery. " * 60]
        gap = float(np.abs(onnx_embed(tmp, texts) - st.encode(texts, normalize_embeddings=True)).max())
        if gap > 1e-4:
            raise ValueError(f"ONNX and sentence-transformers vectors differ by {gap:.1e}")
    except Exception as e:  # noqa: BLE001 -- any failure only costs speed: sentence-transformers stays in use
        log.warning("no fast ONNX embedder for %s (%s); using sentence-transformers", name, e)
        shutil.rmtree(tmp, ignore_errors=True)
        _LOADED[("onnx-failed", name)] = True  # one try per process, not one per bulk embed
        return None
    _LOADED.pop(("onnx", str(tmp)), None)
    replace_dir(tmp, out)
    log.info("exported %s to ONNX at %s", name, out)
    return out


def onnx_embed(folder: Path, texts: list[str], batch_size: int = 32) -> np.ndarray:
    """Mean-pooled, unit-length vectors from the ONNX copy (what sentence-transformers computes for these models)."""
    key = ("onnx", str(folder))
    if key not in _LOADED:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        settings = json.loads((folder / "settings.json").read_text())
        tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        tok.enable_truncation(settings["max_length"])
        tok.enable_padding()
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        _LOADED[key] = (tok, ort.InferenceSession(str(folder / "model.onnx"), opts,
                                                  providers=["CPUExecutionProvider"]), settings["inputs"])
    tok, sess, names = _LOADED[key]
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tok.encode_batch(texts[i:i + batch_size])
        feed = {"input_ids": [e.ids for e in enc], "attention_mask": [e.attention_mask for e in enc],
                "token_type_ids": [e.type_ids for e in enc]}
        hidden = sess.run(None, {n: np.asarray(feed[n], dtype=np.int64) for n in names})[0]
        mask = np.asarray(feed["attention_mask"], dtype=np.float32)[..., None]
        v = (hidden * mask).sum(1) / np.maximum(mask.sum(1), 1e-9)
        out.append(v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12))
    return np.concatenate(out).astype(np.float32)


def embed(name: str, texts: list[str], progress: bool = False, batch_size: int = 32) -> np.ndarray:
    """Unit-length float32 embeddings, one row per text.

    A few texts (a query, one edited document) go through the ONNX copy when one was exported, so a cold CLI
    need not import torch; bulk work uses sentence-transformers (and exports the ONNX copy on the way).
    """
    fast = _onnx_dir(name) if len(texts) <= 256 else None
    if fast is not None and (fast / "model.onnx").exists():
        return onnx_embed(fast, texts or ["x"], batch_size)[: len(texts)]  # ["x"]: the width of an empty result
    model = load_embedder(name)
    if not texts:
        return np.zeros((0, model.get_embedding_dimension()), dtype=np.float32)
    vecs = model.encode(texts, batch_size=batch_size, normalize_embeddings=True, show_progress_bar=progress,
                        convert_to_numpy=True)
    export_onnx(name)
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

    def search_vector(self, q: np.ndarray, k: int, allow: np.ndarray | None = None) -> list[tuple[str, float]]:
        """The ``k`` nearest chunks; ``allow``: a boolean mask over ``ids``, the only candidates, searched by FAISS
        with an ``IDSelectorBitmap`` (so k allowed chunks come back whenever k exist)."""
        import faiss

        q = q.reshape(1, -1).astype(np.float32)
        if allow is None:
            if not self.ids:
                return []
            scores, idx = self.index.search(q, min(k, len(self.ids)))
            return [(self.ids[i], float(s)) for s, i in zip(scores[0], idx[0], strict=True) if i >= 0]
        rows = np.flatnonzero(allow)
        k = min(k, len(rows))
        if k == 0:
            return []
        bitmap = np.packbits(allow, bitorder="little")  # referenced until the search returns: FAISS reads it
        sel = faiss.IDSelectorBitmap(bitmap)
        params = (faiss.SearchParameters(sel=sel) if self.kind == "exact" else
                  faiss.SearchParametersHNSW(sel=sel, efSearch=max(self.index.hnsw.efSearch, k)))
        scores, idx = self.index.search(q, k, params=params)
        found = [(int(i), float(s)) for s, i in zip(scores[0], idx[0], strict=True) if i >= 0]
        if len(found) < k:  # HNSW's walk can miss allowed vectors when few are allowed: score each of them instead
            sims = self.index.reconstruct_batch(rows) @ q[0]
            top = np.argsort(-sims, kind="stable")[:k]
            found = [(int(rows[j]), float(sims[j])) for j in top]
        return [(self.ids[i], s) for i, s in found]

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
