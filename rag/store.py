"""The store interface: what an index must do for retrieval, and the one place the stores register (``--store``).

A store is brought up to date from a docs folder (incrementally by content hash: only new or edited documents
are chunked and embedded, removed ones disappear, and a crash mid-update leaves the previous version usable), and
then answers ``search_bm25`` / ``search_dense`` with one result shape, ``[(chunk_id, score)]`` best first, only
from the chunks a ``--where`` mask allows (``rag.filters.allowed``, a boolean mask over ``ids``, applied before
the top k). Fusion, re-ranking and the cut stay in ``rag.pipeline``, so two stores differ only in the retrievers.
``copy_store`` and ``drop_store`` make and remove a separate copy (the freshness demo, a timed fresh build).

    embedded   rag.index.Index: BM25 + FAISS in this process, files in --index-dir (the default)
    milvus     rag.store_milvus.MilvusStore: Milvus's BM25 function + a vector index in one collection; Milvus
               Lite (the engine in a child process, a file in --index-dir) or a server/cluster at --store-url

Left out on purpose: engines without BM25 beside vectors (the lexical half would be a Python stand-in).
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import numpy as np

from rag.chunk import Chunk
from rag.index import UpdateStats, update_index

STORES = ("embedded", "milvus")


class Store(Protocol):
    """What retrieval, filters and the pipeline read from an index (``rag.index.Index`` is the reference)."""

    path: Path  # names this version (a key for cached choices, rag/choose.py)
    manifest: dict  # settings and ``documents``: {doc id: {sha256, title, mtime, meta, chunks}}
    ids: list[str]  # the indexed chunk ids in a fixed order; ``--where`` masks are over it
    chunks: Mapping[str, Chunk]  # every chunk (hierarchical parents too) by id

    @property
    def embedder(self) -> str: ...

    def search_bm25(self, query: str, k: int, allow: np.ndarray | None = None) -> list[tuple[str, float]]: ...

    def search_dense(self, query: str, k: int, allow: np.ndarray | None = None) -> list[tuple[str, float]]: ...


def check_store(store: str, url: str) -> None:
    """``--store`` / ``--store-url`` as a user wrote them; a ValueError names the flag."""
    if store not in STORES:
        raise ValueError(f"--store must be one of {', '.join(STORES)}, not '{store}'")
    if url and store == "embedded":
        raise ValueError("--store-url is for an engine (--store milvus); the embedded store lives in --index-dir")
    if url and not url.startswith(("http://", "https://", "tcp://", "grpc://", "unix:")):
        raise ValueError(f"--store-url {url!r}: write the server's address, e.g. http://localhost:19530")


def update_store(cfg, progress: bool = True, work=None) -> tuple[Store, UpdateStats]:
    """Bring ``cfg``'s store (a RagConfig: store, store_url, docs, index_dir, chunking, embedder, faiss) up to date.
    ``work``: who chunks and embeds the new and edited documents (e.g. ``rag.ray_index.ray_work``); default here."""
    extra = {"work": work} if work is not None else {}
    if cfg.store == "embedded":
        return update_index(cfg.docs, cfg.index_dir, cfg.chunk_config(), cfg.embedder, cfg.faiss, progress,
                            cfg.hard_links, **extra)
    from rag.store_milvus import update_milvus

    return update_milvus(cfg.docs, cfg.index_dir, cfg.chunk_config(), cfg.embedder, cfg.faiss, cfg.store_url,
                         progress, cfg.hard_links, **extra)


def fingerprint(store: Store) -> str | list:
    """What retrieval reads from a store version: its files' hashes and each document's metadata (status and dates
    decide which version gives way, ``--where`` filters on the rest); a key for choices and answers computed from
    it (``rag/choose.py``, ``hybrid/resume.py``). A rebuild that writes the same bytes (the same documents, settings
    changed and changed back, an edit undone) keeps them. A store without file hashes (Milvus) is named by its
    version."""
    files = store.manifest.get("files")
    if not files:
        return store.path.name
    return [files, {d: e.get("meta") for d, e in sorted(store.manifest["documents"].items())}]


def copy_store(cfg, dest: str | Path) -> None:
    """Copy ``cfg``'s index folder (the calibration beside the index too) and its store to ``dest``: a separate
    store, so ``update_store`` with ``index_dir=dest`` leaves ``cfg``'s as it was (hybrid/freshness.py)."""
    if cfg.store == "embedded":
        shutil.copytree(cfg.index_dir, dest)
        return
    from rag.store_milvus import LITE_FILE, copy_milvus

    # the engine copies its own data: a Milvus Lite file copied while its engine runs may be torn, and its
    # collections are named after the folder they were written for (rag/store_milvus.py, base_name)
    shutil.copytree(cfg.index_dir, dest, ignore=shutil.ignore_patterns(f"{LITE_FILE}*", f".{LITE_FILE}*"))
    copy_milvus(cfg.index_dir, dest, cfg.store_url)


def drop_store(cfg) -> None:
    """Delete ``cfg``'s store (a temporary one: a copy, a timed build) and let go of its engine."""
    if cfg.store == "embedded":
        shutil.rmtree(cfg.index_dir, ignore_errors=True)
        return
    from rag.store_milvus import drop_milvus

    drop_milvus(cfg.index_dir, cfg.store_url)
