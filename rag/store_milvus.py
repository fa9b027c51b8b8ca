"""The Milvus store (``--store milvus``): BM25 and dense retrieval by the Milvus engine, the embedded index's answers.

One collection per index version holds each indexed chunk: our BM25 tokens (``rag.bm25.tokenize``, joined by
spaces) in a text field whose whitespace analyzer feeds Milvus's BM25 function (sparse inverted index, k1=1.5,
b=0.75 and Lucene's idf, as ``rag/bm25.py``), its vector (FLAT inner product; HNSW M=32 for ``--faiss hnsw`` on a
server) and the chunk itself as JSON. A ``_meta`` collection beside it holds the manifest (settings, one row per
document, hierarchical parents). Measured on the demo: the same top 30 BM25 and dense chunks as the embedded index
for all 186 golden questions, scores equal to float32 precision; exact ties come back in any order, so hits are
sorted by (score, chunk position) as the embedded index keeps them.

Without ``--store-url`` the engine is Milvus Lite (``milvus-lite`` 2.5.x: Milvus's C++ core in a child process,
data in ``<index-dir>/milvus.db``, one process at a time); with ``--store-url http://host:19530`` the same code
talks to Milvus standalone or a cluster. Updates are incremental by sha256 (only new and edited documents are
embedded; kept chunks are copied from the live version) and atomic: a new version is written and verified, then
published by inserting a row into the ``_live`` pointer collection, so a crash leaves the previous version live
(Milvus Lite has no aliases: ``create_alias`` is UNIMPLEMENTED). ``--where`` masks become a ``doc_id in [...]``
filter that Milvus applies before the top k. Left out on purpose: keeping old versions for long-running readers
on a server (they reopen), partitions and sharding options (Milvus's own settings).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import re
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from rag.atomic import writer_lock
from rag.bm25 import tokenize
from rag.chunk import Chunk, ChunkConfig
from rag.config import UserError
from rag.dense import KINDS, embed
from rag.index import (
    FORMAT,
    LOCK_TIMEOUT,
    IndexDamaged,
    IndexMissing,
    UpdateStats,
    embed_fresh,
    index_settings,
    plan_update,
)
from rag.metadata import legacy_meta

log = logging.getLogger(__name__)
BATCH = 1000  # rows per insert or query page: well under gRPC's 64 MB message at 384-dim vectors
TIE_SLACK = 10  # extra hits fetched so exact ties at the cut are broken by position, as the embedded index does
MAX_TEXT = 65535  # Milvus VARCHAR limit, bytes
LITE_FILE = "milvus.db"  # Milvus Lite's data in --index-dir (its lock file is .milvus.db.lock beside it)
_CLIENTS: dict[str, object] = {}


class StoreUnavailable(UserError, RuntimeError):
    """The engine cannot be reached or opened; the message says what to do."""


def connect(root: Path, url: str = ""):
    """A MilvusClient: Milvus Lite on ``<root>/milvus.db`` (started here, a child process), else the server at url."""
    key = url or str(root.resolve() / LITE_FILE)
    if key not in _CLIENTS:
        from pymilvus import MilvusClient

        # Milvus Lite 2.5 imports pkg_resources (a deprecation warning); Lite has no MVCC timestamp for iterators
        warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
        logging.getLogger("pymilvus.client.iterator.query_iterator").setLevel(logging.ERROR)
        try:
            if url:
                _CLIENTS[key] = MilvusClient(uri=url, token=os.environ.get("MILVUS_TOKEN", ""))
            else:
                root.mkdir(parents=True, exist_ok=True)
                _CLIENTS[key] = MilvusClient(key)
        except Exception as e:  # noqa: BLE001 -- pymilvus raises several types; all mean "cannot open it"
            where = url or f"Milvus Lite at {key}"
            raise StoreUnavailable(f"cannot open the Milvus store ({where}): {str(e)[:160]}; Milvus Lite allows one "
                                   "process per file (stop the other), or start a server and pass --store-url") from e
    return _CLIENTS[key]


def close(root: Path, url: str = "") -> None:
    """Let go of the engine: Milvus Lite's child process stops, so another process may open the file."""
    key = url or str(root.resolve() / LITE_FILE)
    client = _CLIENTS.pop(key, None)
    if client is not None:
        client.close()
        if not url:
            from milvus_lite.server_manager import server_manager_instance

            server_manager_instance.release_server(key)


def base_name(root: Path) -> str:
    """Collection prefix of one index: its folder name plus a hash of its path (many indexes share a server)."""
    tag = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:8]
    return f"ob_{re.sub(r'[^A-Za-z0-9]', '_', root.name)[:40]}_{tag}"


def _chunk_schema(client, dim: int):
    from pymilvus import DataType, Function, FunctionType

    s = client.create_schema(auto_id=False)
    s.add_field("id", DataType.VARCHAR, is_primary=True, max_length=MAX_TEXT)
    s.add_field("doc_id", DataType.VARCHAR, max_length=MAX_TEXT)
    s.add_field("tokens", DataType.VARCHAR, max_length=MAX_TEXT, enable_analyzer=True,
                analyzer_params={"tokenizer": "whitespace"})  # our tokenizer already ran: stems, codes, stop words
    s.add_field("sparse", DataType.SPARSE_FLOAT_VECTOR)
    s.add_field("vec", DataType.FLOAT_VECTOR, dim=dim)
    s.add_field("chunk", DataType.JSON)
    s.add_function(Function(name="bm25", function_type=FunctionType.BM25, input_field_names=["tokens"],
                            output_field_names=["sparse"]))
    return s


def _keyed_schema(client):
    """Meta and pointer collections: a key, a JSON body, and the 2-d vector Milvus requires of every collection."""
    from pymilvus import DataType

    s = client.create_schema(auto_id=False)
    s.add_field("key", DataType.VARCHAR, is_primary=True, max_length=MAX_TEXT)
    s.add_field("body", DataType.JSON)
    s.add_field("vec", DataType.FLOAT_VECTOR, dim=2)
    return s


def _create(client, name: str, schema, vector_index: tuple[str, str, dict], bm25: bool = False) -> None:
    params = client.prepare_index_params()
    kind, metric, extra = vector_index
    params.add_index("vec", index_type=kind, metric_type=metric, params=extra)
    if bm25:
        params.add_index("sparse", index_type="SPARSE_INVERTED_INDEX", metric_type="BM25",
                         params={"bm25_k1": 1.5, "bm25_b": 0.75})  # rag/bm25.py's BM25Okapi settings
    client.create_collection(name, schema=schema, index_params=params, consistency_level="Strong")


def _vector_index(faiss_kind: str, url: str) -> tuple[str, str, dict]:
    """``--faiss exact`` → FLAT; ``hnsw`` → HNSW (M=32, efConstruction=40: FAISS's) on a server. Milvus Lite builds
    only FLAT, IVF_FLAT and AUTOINDEX ("local mode only support ..."), so there hnsw stays exact."""
    if faiss_kind not in KINDS:
        raise ValueError(f"--faiss must be one of {', '.join(KINDS)}, not '{faiss_kind}'")
    if faiss_kind == "exact" or not url:
        if faiss_kind == "hnsw":
            log.info("Milvus Lite has no HNSW index: --faiss hnsw searches exactly (FLAT)")
        return "FLAT", "IP", {}
    return "HNSW", "IP", {"M": 32, "efConstruction": 40}


def _rows(client, name: str, fields: list[str], filter: str = "") -> Iterator[dict]:
    it = client.query_iterator(name, batch_size=BATCH, filter=filter, output_fields=fields)
    try:
        while page := it.next():
            yield from page
    finally:
        it.close()


def _token_text(tokens: list[str]) -> str:
    text = " ".join(tokens) or "_"  # rank-bm25 gets a placeholder for an empty chunk too (rag/bm25.py)
    if len(text.encode()) > MAX_TEXT:
        log.warning("a chunk has %d bytes of BM25 tokens; Milvus keeps the first %d", len(text.encode()), MAX_TEXT)
        text = text.encode()[:MAX_TEXT].decode(errors="ignore").rsplit(" ", 1)[0]
    return text


def _chunk_row(c: Chunk) -> dict:
    return {k: v for k, v in asdict(c).items() if k != "meta"}  # the manifest holds meta, once per document


class _Chunks(Mapping):
    """Chunks by id, fetched from the engine on first use (search hits arrive with theirs) and kept."""

    def __init__(self, store: MilvusStore, parents: dict[str, Chunk]):
        self._store, self._parents, self._got = store, parents, {}

    def __getitem__(self, cid: str) -> Chunk:
        if cid in self._parents:
            return self._parents[cid]
        if cid not in self._got:
            self._store._fetch([cid])
        return self._got[cid]

    def __iter__(self) -> Iterator[str]:
        for entry in self._store.manifest["documents"].values():
            yield from entry["chunks"]

    def __len__(self) -> int:
        return len(self._store.ids) + len(self._parents)

    def __contains__(self, cid) -> bool:
        return cid in self._parents or cid in self._store._pos

    def values(self) -> Iterator[Chunk]:  # in batches: one request per chunk would take minutes at 100k
        for batch in _batched(iter(self), BATCH):
            self._store._fetch([c for c in batch if c not in self._got and c not in self._parents])
            yield from (self[c] for c in batch)


class MilvusStore:
    """A live version of a Milvus-backed index; the same reading interface as ``rag.index.Index``."""

    def __init__(self, client, base: str, name: str, manifest: dict, parents: dict[str, Chunk], url: str = ""):
        self.client, self.base, self.name, self.manifest = client, base, name, manifest
        self.path = Path(url or "milvus-lite") / name
        docs = manifest["documents"]
        self.ids = [cid for entry in docs.values() for cid in entry["chunks"] if cid not in parents]
        self._doc_of = [d for d, entry in docs.items() for cid in entry["chunks"] if cid not in parents]
        self._pos = {cid: i for i, cid in enumerate(self.ids)}
        self._meta = {d: legacy_meta(d, entry) for d, entry in docs.items()}
        self._filters: dict[int, tuple[np.ndarray, str | None]] = {}
        self.chunks = _Chunks(self, parents)

    @property
    def embedder(self) -> str:
        return self.manifest["embedder"]

    # ---- reading
    @classmethod
    def open(cls, root: Path, url: str = "") -> MilvusStore:
        """The live version; ``IndexMissing`` when there is none, ``IndexDamaged`` when its collections are broken."""
        client, base = connect(root, url), base_name(root)
        name = _live_name(client, base)
        if name is None:
            raise IndexMissing(f"no Milvus index for {root}; run `python -m rag index --docs DIR --index-dir {root} "
                               "--store milvus`")
        try:
            client.load_collection(name)
            client.load_collection(f"{name}_meta")
            rows = list(_rows(client, f"{name}_meta", ["key", "body"]))
        except Exception as e:  # noqa: BLE001 -- any engine error here means the version cannot be read
            raise IndexDamaged(root, f"Milvus collection {name}: {str(e)[:160]}") from e
        settings = next((r["body"] for r in rows if r["key"] == "settings"), None)
        if settings is None or settings.get("format") != FORMAT:
            raise IndexDamaged(root, f"Milvus collection {name} has no settings of format {FORMAT}")
        docs = {r["key"][4:]: r["body"] for r in rows if r["key"].startswith("doc:")}
        manifest = {**settings, "documents": {d: docs[d] for d in sorted(docs)}}  # load_folder's order
        metas = {d: legacy_meta(d, e) for d, e in docs.items()}
        parents = {r["key"][6:]: Chunk(**r["body"], meta=metas.get(r["body"]["doc_id"], {}))
                   for r in rows if r["key"].startswith("chunk:")}
        store = cls(client, base, name, manifest, parents, url)
        got = client.query(name, filter="", output_fields=["count(*)"])[0]["count(*)"]
        if got != len(store.ids) or got != manifest["n_chunks"]:
            raise IndexDamaged(root, f"Milvus collection {name} holds {got} chunks, its manifest lists "
                                     f"{len(store.ids)}")
        return store

    def _fetch(self, ids: list[str]) -> None:
        for i in range(0, len(ids), BATCH):
            for r in self.client.get(self.name, ids=ids[i:i + BATCH], output_fields=["chunk"]):
                self._keep(r["chunk"])

    def _keep(self, row: dict) -> None:
        if row["id"] not in self.chunks._got:
            self.chunks._got[row["id"]] = Chunk(**row, meta=self._meta.get(row["doc_id"], {}))

    def _filter(self, allow: np.ndarray | None) -> str | None | bool:
        """A ``--where`` mask over ``ids`` as a Milvus filter on doc_id; None: no filter, False: nothing allowed."""
        if allow is None:
            return None
        if id(allow) not in self._filters:  # rag.filters keeps one mask per filter and version: cache by identity
            docs = np.asarray(self._doc_of, dtype=object)
            yes, no = set(docs[allow]), set(docs[~allow]) if len(docs) else set()
            expr = (False if not yes else None if not no else
                    f"doc_id in {_literal(yes)}" if len(yes) <= len(no) else f"doc_id not in {_literal(no)}")
            self._filters[id(allow)] = (allow, expr)  # holding the mask keeps its id from being reused
        return self._filters[id(allow)][1]

    def _search(self, data, field: str, metric: str, k: int, allow, params: dict | None = None):
        expr = self._filter(allow)
        if expr is False or not self.ids:
            return []
        hits = self.client.search(self.name, data=[data], anns_field=field, limit=min(k + TIE_SLACK, 16384),
                                  filter=expr or "", output_fields=["chunk"],
                                  search_params={"metric_type": metric, "params": params or {}})[0]
        for h in hits:
            self._keep(h["entity"]["chunk"])
        found = [(h["id"], float(h["distance"])) for h in hits if h["distance"] > 0 or field == "vec"]
        found.sort(key=lambda x: (-x[1], self._pos[x[0]]))  # exact ties by position, as the embedded index
        return found[:k]

    def search_bm25(self, query: str, k: int, allow: np.ndarray | None = None) -> list[tuple[str, float]]:
        q = tokenize(query)
        return self._search(" ".join(q), "sparse", "BM25", k, allow) if q else []

    def search_dense(self, query: str, k: int, allow: np.ndarray | None = None) -> list[tuple[str, float]]:
        if allow is not None and not allow.any():
            return []
        ef = {"ef": max(64, k + TIE_SLACK)} if self.manifest["faiss"] == "hnsw" else {}
        return self._search(embed(self.embedder, [query])[0].tolist(), "vec", "IP", k, allow, ef)

    def search_vector(self, vec: np.ndarray, k: int) -> list[tuple[str, float]]:
        """Dense search by a vector (bench/store.py: recall against exact search)."""
        return self._search(np.asarray(vec, dtype=np.float32).tolist(), "vec", "IP", k, None)

    # ---- writing
    @classmethod
    def write(cls, root: str | Path, url: str, manifest: dict, chunks: list[Chunk], tokens: list[list[str]],
              vectors: np.ndarray) -> MilvusStore:
        """Publish a whole index (built elsewhere, e.g. by Ray) as a new version."""
        root = Path(root)
        indexed = [c for c in chunks if c.indexed]
        rows = ({"id": c.id, "doc_id": c.doc_id, "tokens": _token_text(t), "vec": v, "chunk": _chunk_row(c)}
                for c, t, v in zip(indexed, tokens, vectors, strict=True))
        with writer_lock(_lock_dir(root), LOCK_TIMEOUT):
            client = connect(root, url)
            _sweep(client, base_name(root), keep=None)
            return _publish(client, root, url, manifest, chunks, rows, vectors.shape[1])


def _batched(items, n: int) -> Iterator[list]:
    """itertools.batched, which is Python 3.12+."""
    it = iter(items)
    while batch := list(itertools.islice(it, n)):
        yield batch


def _literal(values: set[str]) -> str:
    return "[" + ", ".join('"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"' for v in sorted(values)) + "]"


def _lock_dir(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    return root


def _live_name(client, base: str) -> str | None:
    """The live version's collection: the newest row of the pointer collection (one row after a clean publish)."""
    if not client.has_collection(f"{base}_live"):
        return None
    live = client.query(f"{base}_live", filter="key != ''", output_fields=["body"], limit=100)
    return max((r["body"] for r in live), key=lambda b: b["seq"])["name"] if live else None


def _sweep(client, base: str, keep: str | None) -> None:
    """Drop versions that are not live: older ones, and what a crashed or killed writer left."""
    keep = keep or _live_name(client, base)
    for name in client.list_collections():
        if re.fullmatch(rf"{base}_v\d+(_meta)?", name) and name.removesuffix("_meta") != keep:
            client.drop_collection(name)


def _publish(client, root: Path, url: str, manifest: dict, chunks: list[Chunk], rows, dim: int) -> MilvusStore:
    """Write ``rows`` (every indexed chunk) and the manifest as a new version, verify it, then make it live."""
    base = base_name(root)
    name = f"{base}_v{time.time_ns()}"
    _create(client, name, _chunk_schema(client, dim), _vector_index(manifest["faiss"], url), bm25=True)
    _create(client, f"{name}_meta", _keyed_schema(client), ("FLAT", "L2", {}))
    log.info("writing Milvus version %s (%d documents)", name, len(manifest["documents"]))
    for batch in _batched(rows, BATCH):
        client.insert(name, [dict(r, vec=np.asarray(r["vec"], dtype=np.float32).tolist()) for r in batch])
    settings = {k: v for k, v in manifest.items() if k not in ("documents", "files")}
    meta = [{"key": "settings", "body": settings}]
    meta += [{"key": f"doc:{d}", "body": e} for d, e in manifest["documents"].items()]
    meta += [{"key": f"chunk:{c.id}", "body": _chunk_row(c)} for c in chunks if not c.indexed]
    for batch in _batched(meta, BATCH):
        client.insert(f"{name}_meta", [dict(r, vec=[0.0, 0.0]) for r in batch])
    client.flush(name)
    client.flush(f"{name}_meta")
    if not client.has_collection(f"{base}_live"):
        _create(client, f"{base}_live", _keyed_schema(client), ("FLAT", "L2", {}))
    seq = time.time_ns()
    client.insert(f"{base}_live", [{"key": str(seq), "body": {"seq": seq, "name": name}, "vec": [0.0, 0.0]}])
    client.flush(f"{base}_live")  # published: from here on a crash leaves the new version live
    store = MilvusStore.open(root, url)  # the count of chunks is checked against the manifest there
    client.delete(f"{base}_live", filter=f'key != "{seq}"')
    _sweep(client, base, keep=name)
    return store


def update_milvus(docs_dir: str | Path, index_dir: str | Path, chunk_cfg: ChunkConfig, embedder: str,
                  faiss_kind: str = "exact", url: str = "", progress: bool = True, hard_links: bool = False,
                  work=None) -> tuple[MilvusStore, UpdateStats]:
    """Bring the Milvus index of ``index_dir`` up to date with ``docs_dir``; embed only what changed.

    ``work(plan, chunk_cfg, embedder, progress)`` chunks and embeds ``plan.fresh`` (the new and edited documents)
    and returns ``.chunks`` (parents too), ``.tokens`` and ``.vectors`` of the indexed ones: ``rag.index.embed_fresh``
    by default, or ``rag.ray_index.ray_work`` (``plan.old`` is None for it: the kept chunks stay in the engine)."""
    root = Path(index_dir)
    with writer_lock(_lock_dir(root), LOCK_TIMEOUT):
        client = connect(root, url)
        _sweep(client, base_name(root), keep=None)
        plan = plan_update(docs_dir, root, index_settings(chunk_cfg, embedder, faiss_kind), progress, hard_links,
                           load=lambda r: MilvusStore.open(r, url))
        if not plan.needed:
            return plan.old, plan.stats
        old, stats, docs, settings, t0 = plan.old, plan.stats, plan.docs, plan.settings, plan.t0
        old_docs = old.manifest["documents"] if old else {}
        kept = {d.id for d in docs} - {d.id for d in plan.fresh}
        # the kept chunks stay in the engine, so the work sees no old vectors to re-use
        work = (work or embed_fresh)(replace(plan, old=None), chunk_cfg, embedder, progress) if plan.fresh else None
        by_doc: dict[str, list[Chunk]] = {}
        for c in work.chunks if work else ():
            by_doc.setdefault(c.doc_id, []).append(c)
        chunks, doc_meta = [], {}
        for d in docs:
            if d.id in kept:  # copied engine-side: here only their ids count, and the parents, which live in meta
                dchunks = [old.chunks._parents.get(cid) or Chunk(cid, d.id, "", 0, 0)
                           for cid in old_docs[d.id]["chunks"]]
            else:
                dchunks = by_doc.get(d.id, [])
            doc_meta[d.id] = {"sha256": d.sha256, "title": d.title, "mtime": d.mtime, "meta": d.meta,
                              "chunks": [c.id for c in dchunks]}
            chunks += dchunks
        stats.chunks = sum(c.indexed for c in chunks)
        made = [c for c in work.chunks if c.indexed] if work else []
        stats.embedded_chunks = len(made)
        dim = work.vectors.shape[1] if made else old.manifest["embedding_dim"] if old else 0
        copied = (r for r in _rows(client, old.name, ["id", "doc_id", "tokens", "vec", "chunk"])
                  if r["doc_id"] in kept) if old else iter(())
        rows = ({"id": c.id, "doc_id": c.doc_id, "tokens": _token_text(t), "vec": v, "chunk": _chunk_row(c)}
                for c, t, v in zip(made, work.tokens, work.vectors, strict=True)) if made else iter(())
        manifest = {**settings, "docs_dir": str(Path(docs_dir).resolve()), "built": time.strftime("%Y-%m-%dT%H:%M:%S"),
                    "embedding_dim": dim, "n_chunks": stats.chunks, "documents": doc_meta}
        store = _publish(client, root, url, manifest, chunks, itertools.chain(copied, rows), dim)
        stats.seconds, stats.wrote = time.perf_counter() - t0, True
        return store, stats


def copy_milvus(src: str | Path, dest: str | Path, url: str = "") -> MilvusStore:
    """The live version of ``src``'s index published as ``dest``'s, engine to engine (Milvus Lite: into its own
    file in ``dest``; a server: collections named after ``dest``), so an update of one leaves the other as it was."""
    old, dest = MilvusStore.open(Path(src), url), Path(dest)
    rows = _rows(old.client, old.name, ["id", "doc_id", "tokens", "vec", "chunk"])
    with writer_lock(_lock_dir(dest), LOCK_TIMEOUT):
        client = connect(dest, url)
        _sweep(client, base_name(dest), keep=None)
        return _publish(client, dest, url, old.manifest, list(old.chunks._parents.values()), rows,
                        old.manifest["embedding_dim"])


def drop_milvus(root: str | Path, url: str = "") -> None:
    """Drop every collection of ``root``'s index (a temporary copy or build) and let go of its engine."""
    root = Path(root)
    client, base = connect(root, url), base_name(root)
    for name in client.list_collections():
        if re.fullmatch(rf"{base}_(live|v\d+(_meta)?)", name):
            client.drop_collection(name)
    if not url:  # Milvus Lite: this folder's own engine process; a server's client serves every index on it
        close(root)
