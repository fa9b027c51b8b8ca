"""Indexing on Ray Data: the chunk → tokenize → embed work of an index update, spread over a Ray cluster.

``python -m rag index --ray [ADDRESS]`` plans the update as the in-process path does (``rag.index.plan_update``:
which documents are new or edited, by sha256), runs the work of it on Ray Data::

    ray.data.from_items(fresh documents)
      → map_batches(chunk_batch)       tasks: chunks (parents too) + BM25 tokens, each row with its position
      → map_batches(Embed)             a pool of N actors, each loading the embedder once
      → materialize                    sorted back into document order on the driver

and hands the result, a plain ``Bundle(chunks, tokens, vectors)``, to the same writer (``rag.index.write_update``:
one atomic version, under the same writer lock), so the index equals the in-process one: the same chunk ids,
texts and tokens, vectors within 1e-6. A store backend can take the same bundle. Without an address a local
cluster with N CPUs is started and shut down; with one (``ray start --head`` prints it, or ``auto``) the work runs
there and the ``rag`` package is shipped to the workers, which need openbook's dependencies and the embedder (the
same path, or a hub id). Killed midway, the driver or the cluster, nothing is published: CURRENT still names the
previous version, and the next run clears the partial work and does it again.

Left out on purpose: reading and parsing the files stays in the driver (their hashes decide the plan, and the
rules for bad files and links stay in one place), and so do the merge, FAISS build and write (one version
folder); past a few million chunks the driver's memory for the vectors (1.5 KB each) is the limit, and the store
engine is the place to write them.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import asdict, fields
from functools import partial
from pathlib import Path

import numpy as np

from rag.bm25 import tokenize
from rag.chunk import Chunk, ChunkConfig, chunk_document
from rag.config import UserError
from rag.dense import _onnx_dir, export_onnx, load_embedder, onnx_embed
from rag.index import Bundle, Index, Plan, UpdateStats, embed_fresh, update_index
from rag.ingest import Document

log = logging.getLogger(__name__)
WORKERS = 2  # embedding actors, and CPUs of the local cluster
OBJECT_STORE = 256 * 2**20  # bytes for the local cluster: blocks are spilled to disk past it, never lost
DOC_FIELDS = ("id", "path", "title", "text", "sha256", "mtime")  # meta stays on the driver: write_update adds it
DOCS_PER_BATCH, CHUNKS_PER_BATCH = 8, 128  # 128 ≤ 256: rag.dense's ONNX path, a cold actor imports no torch


def chunk_batch(batch: dict[str, np.ndarray], cfg: dict) -> dict[str, np.ndarray]:
    """Documents → their chunks: document and chunk position, the chunk as JSON, its indexed text and tokens."""
    chunk_cfg, rows = ChunkConfig(**cfg), []
    for k, i in enumerate(batch["i"]):
        doc = Document(*(str(batch[f][k]) for f in DOC_FIELDS[:-1]), float(batch["mtime"][k]))
        for j, c in enumerate(chunk_document(doc, chunk_cfg)):
            row = {f.name: getattr(c, f.name) for f in fields(c) if f.name != "meta"}
            text = c.index_text if c.indexed else ""
            rows.append((int(i), j, json.dumps(row, ensure_ascii=False), text, c.indexed,
                         json.dumps(tokenize(text) if c.indexed else [])))
    cols = ("i", "j", "chunk", "text", "indexed", "tokens")
    kinds = (np.int64, np.int64, object, object, bool, object)
    return {n: np.array([r[x] for r in rows], dtype=t) for x, (n, t) in enumerate(zip(cols, kinds, strict=True))}


class Embed:
    """An embedding actor: loads the embedder once, then adds a unit ``vector`` to each chunk row (zeros for
    parents, which are stored but not indexed). Uses ``threads`` cores, the CPUs Ray reserved for it."""

    def __init__(self, name: str, threads: int = 1):
        self.fast = _onnx_dir(name)
        if self.fast is not None and (self.fast / "model.onnx").exists():
            _onnx_threads(self.fast, threads)
        else:  # no ONNX copy on this machine: sentence-transformers (exporting here would race the other actors)
            import torch

            torch.set_num_threads(threads)
            self.fast, self.model = None, load_embedder(name)
        self.dim = self._embed(["warm-up"]).shape[1]

    def _embed(self, texts: list[str]) -> np.ndarray:
        if self.fast is not None:
            return onnx_embed(self.fast, texts)
        return np.asarray(self.model.encode(texts, batch_size=32, normalize_embeddings=True), dtype=np.float32)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = np.flatnonzero(batch["indexed"])
        vectors = np.zeros((len(batch["indexed"]), self.dim), dtype=np.float32)
        if len(rows):
            vectors[rows] = self._embed([str(t) for t in batch["text"][rows]])
        return {"i": batch["i"], "j": batch["j"], "chunk": batch["chunk"], "indexed": batch["indexed"],
                "tokens": batch["tokens"], "vector": vectors}


def _onnx_threads(folder: Path, threads: int) -> None:
    """Put an ONNX session on ``threads`` threads into rag.dense's cache: ONNX Runtime would otherwise start one
    per core in every actor, and N actors on N cores would fight over them."""
    import onnxruntime as ort

    from rag import dense

    onnx_embed(folder, ["x"])  # caches the tokenizer and input names with a default session
    opts = ort.SessionOptions()
    opts.log_severity_level, opts.intra_op_num_threads, opts.inter_op_num_threads = 3, threads, 1
    tok, _, names = dense._LOADED[("onnx", str(folder))]
    session = ort.InferenceSession(str(folder / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    dense._LOADED[("onnx", str(folder))] = (tok, session, names)


def run_pipeline(docs: list[Document], chunk_cfg: ChunkConfig, embedder: str, workers: int) -> Bundle:
    """Chunk, tokenize and embed ``docs`` on the connected Ray cluster; the bundle is in document order."""
    import ray.data

    items = [{"i": i, **{f: getattr(d, f) for f in DOC_FIELDS}} for i, d in enumerate(docs)]
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), workers * 8)))
    # chunking is ~1% of the work (bench/ray_index.py): it takes no CPU from the N embedding actors
    ds = ds.map_batches(chunk_batch, batch_size=DOCS_PER_BATCH, fn_kwargs={"cfg": asdict(chunk_cfg)},
                        num_cpus=0, compute=ray.data.TaskPoolStrategy(size=workers))
    ds = ds.map_batches(Embed, batch_size=CHUNKS_PER_BATCH, fn_constructor_kwargs={"name": embedder},
                        num_cpus=1, compute=ray.data.ActorPoolStrategy(size=workers))
    with warnings.catch_warnings():  # a few edited documents make one block, and Ray warns N workers can't share it
        warnings.filterwarnings("ignore", "The (minimum|maximum) number of concurrent", UserWarning)
        parts = list(ds.materialize().iter_batches(batch_size=None, batch_format="numpy"))
    if not parts:
        return Bundle([], [], np.zeros((0, 0), dtype=np.float32))
    cols = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    order = np.lexsort((cols["j"], cols["i"]))  # blocks come back in any order: sort into document order
    indexed = cols["indexed"][order]
    chunks = [Chunk(**json.loads(s)) for s in cols["chunk"][order]]
    tokens = [json.loads(t) for t in cols["tokens"][order][indexed]]
    return Bundle(chunks, tokens, np.ascontiguousarray(cols["vector"][order][indexed], dtype=np.float32))


def connect(address: str | None, workers: int) -> bool:
    """Connect to the cluster at ``address``, or start a local one with ``workers`` CPUs; True if we started it."""
    try:
        import ray
    except ImportError:
        raise UserError('--ray needs Ray Data: pip install "ray[data]"') from None
    if ray.is_initialized():  # a caller (a test, a notebook) already connected: use its cluster, leave it running
        return False
    try:
        if address in (None, "", "local"):
            ray.init(num_cpus=workers, include_dashboard=False, object_store_memory=OBJECT_STORE,
                     logging_level=logging.WARNING)
        else:
            package = str(Path(__file__).resolve().parent)  # workers elsewhere import this rag/, not theirs
            ray.init(address=address, runtime_env={"py_modules": [package]}, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise UserError(f"--ray {address}: cannot start or reach the Ray cluster ({str(e)[:160]}); start one "
                        "with `ray start --head`, or pass --ray alone for a local one") from None
    return True


def ray_work(plan: Plan, chunk_cfg: ChunkConfig, embedder: str, progress: bool, *, address: str | None = None,
             workers: int = WORKERS) -> Bundle:
    """``rag.index.update_index``'s ``work`` step on Ray: the plan's fresh documents, chunked and embedded."""
    if not plan.fresh:  # metadata alone changed: nothing to embed, no cluster to start
        return embed_fresh(plan, chunk_cfg, embedder, progress)
    owned = connect(address, workers)
    import ray

    try:
        if address in (None, "", "local"):  # once per machine: the actors then load the fast copy, import no torch
            export_onnx(embedder)
        log.info("chunking and embedding %d documents on Ray (%d workers)", len(plan.fresh), workers)
        return run_pipeline(plan.fresh, chunk_cfg, embedder, workers)
    except ray.exceptions.RayError as e:  # a dead node or cluster: the live version was never touched
        raise UserError(f"the Ray cluster failed midway ({type(e).__name__}: {str(e).splitlines()[0][:160]}); "
                        "the previous index is still live; run the same command again") from None
    finally:
        if owned:
            ray.shutdown()


def update_index_ray(docs_dir: str | Path, index_dir: str | Path, chunk_cfg: ChunkConfig, embedder: str,
                     faiss_kind: str = "exact", progress: bool = True, hard_links: bool = False,
                     address: str | None = None, workers: int = WORKERS) -> tuple[Index, UpdateStats]:
    """``rag.index.update_index`` with the work on Ray Data: same plan, same lock, same atomic write."""
    if workers < 1:
        raise UserError(f"--ray-workers must be at least 1, not {workers}")
    work = partial(ray_work, address=address, workers=workers)
    return update_index(docs_dir, index_dir, chunk_cfg, embedder, faiss_kind, progress, hard_links, work=work)


def update_pipeline(pipe, address: str | None, workers: int, progress: bool = True) -> UpdateStats:
    """``RagPipeline.update_index`` on Ray (for ``python -m rag index --ray``)."""
    c = pipe.cfg
    if getattr(c, "store", "embedded") != "embedded":
        raise UserError(f"--ray writes the embedded index; --store {c.store} updates itself in process (drop --ray)")
    pipe.index, stats = update_index_ray(c.docs, c.index_dir, c.chunk_config(), c.embedder, c.faiss, progress,
                                         c.hard_links, address, workers)
    return stats
