"""The index: chunks + BM25 tokens + embeddings + FAISS, saved together in one directory with a manifest.

Incremental by content hash: on re-index, documents whose sha256 is unchanged keep their chunks, tokens and
vectors; only new or edited documents are chunked and embedded, and removed ones disappear. A change of
chunker, embedder or FAISS settings rebuilds everything (old vectors would no longer match). Each document's
metadata (``rag/metadata.py``) is kept once, in the manifest, and put on its chunks at load. Metadata changes alone
(a touched file; an index from before metadata, which loads without front matter) write a version, with nothing
re-embedded.

Atomic by construction: each build is written to a fresh ``v-*`` folder and only then published by
``os.replace`` of the one-line ``CURRENT`` file, so a crash at any point leaves the previous version loadable.
A failed write (full disk, no permission) removes its partial folder and says so in one line; the next run
first clears what crashed writes left. Writers take the folder's lock (``rag.atomic.writer_lock``): a second
`rag index` on the same index waits for the first, then finds little left to do; old versions are deleted only
when no reader is loading one, and never the one ``CURRENT`` names when it is read again under the lock.

The manifest lists each file's size and sha256, checked at every load: a truncated, emptied, missing or
flipped-byte file makes the version damaged, and ``update_index`` rebuilds it with a warning. Hashing costs
about a tenth of a load (4.5 ms of ~35 ms for the 2.9 MB demo index on a 2-core CPU; 16 of 190 ms at 11 MB), less
than parsing the same bytes, so it is always on. Layout::

    <index dir>/CURRENT            name of the live version
    <index dir>/v-<stamp>/         manifest.json chunks.jsonl tokens.json vectors.npy faiss.index
    <index dir>/.lock-writer, .lock-readers    flock files (rag.atomic)

Left out on purpose: sharding; see README "Scale path".
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from rag.atomic import readers_lock, writer_lock
from rag.bm25 import BM25, tokenize
from rag.chunk import Chunk, ChunkConfig, chunk_document
from rag.config import UserError
from rag.dense import DenseIndex, embed
from rag.ingest import Document, load_folder
from rag.metadata import legacy_meta

log = logging.getLogger(__name__)
FORMAT = 1
FILES = ("chunks.jsonl", "tokens.json", "vectors.npy", "faiss.index")  # the manifest holds their sizes and hashes
LOCK_TIMEOUT = 600.0  # seconds a writer waits for another before giving up: a CPU builds a large corpus in minutes


class IndexMissing(UserError, RuntimeError):
    """No usable index at a path; the message says what to run."""


class IndexDamaged(IndexMissing):
    """The live version's files are missing, truncated or disagree; ``update_index`` rebuilds it."""

    def __init__(self, root: Path, why: str):
        super().__init__(f"index at {root} is damaged ({why}); rebuild it: `python -m rag index --docs DIR "
                         f"--index-dir {root}`")
        self.why = why


class IndexWriteError(UserError, RuntimeError):
    """The index folder cannot be written (full disk, no permission); the previous version stays live."""


@dataclass
class UpdateStats:
    documents: int = 0
    chunks: int = 0
    added: int = 0
    changed: int = 0
    removed: int = 0
    unchanged: int = 0
    metadata: int = 0  # unchanged documents whose metadata alone changed (file time; an index from before metadata)
    embedded_chunks: int = 0
    seconds: float = 0.0
    wrote: bool = False


class Index:
    """A loaded index version. ``chunks`` holds every chunk (parents too); ``ids`` the indexed ones, in order."""

    def __init__(self, path: Path, manifest: dict, chunks: list[Chunk], tokens: list[list[str]],
                 vectors: np.ndarray, dense: DenseIndex | None = None):
        self.path, self.manifest = path, manifest
        self.chunks = {c.id: c for c in chunks}
        self.ids = [c.id for c in chunks if c.indexed]
        self.tokens, self.vectors = tokens, vectors
        self.bm25 = BM25(self.ids, tokens)
        self.dense = dense or DenseIndex(self.ids, vectors, manifest["faiss"])

    @property
    def embedder(self) -> str:
        return self.manifest["embedder"]

    def search_bm25(self, query: str, k: int, allow: np.ndarray | None = None) -> list[tuple[str, float]]:
        """``allow``: a boolean mask over ``ids``; only those chunks are candidates (``rag.filters``)."""
        return self.bm25.search(query, k, allow)

    def search_dense(self, query: str, k: int, allow: np.ndarray | None = None) -> list[tuple[str, float]]:
        if allow is not None and not allow.any():
            return []  # nothing to search: no need to embed the query
        return self.dense.search_vector(embed(self.embedder, [query])[0], k, allow)

    @classmethod
    def load(cls, index_dir: str | Path) -> Index:
        """The live version; ``IndexMissing`` when there is none, ``IndexDamaged`` when its files are broken."""
        root = Path(index_dir)
        try:
            name = (root / "CURRENT").read_text().strip()
        except OSError as e:
            raise IndexMissing(f"no index at {root}; run `python -m rag index --docs DIR --index-dir {root}`") from e
        if not re.fullmatch(r"v-[\w.-]+", name):  # nothing outside the index folder is read
            raise IndexDamaged(root, f"CURRENT names {name[:80]!r}, not a version folder")
        path = root / name
        with readers_lock(root):  # a writer deletes no version while a reader is loading one
            return cls._load(root, path)

    @classmethod
    def _load(cls, root: Path, path: Path) -> Index:
        try:
            manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
            if manifest.get("format") != FORMAT:
                raise IndexMissing(f"index at {root} has an old format; rebuild with `python -m rag index`")
            _verify(path, manifest.get("files"))
            # metadata is kept once per document; a version written before it was gets the folder and file time
            metas = {d: legacy_meta(d, entry) for d, entry in manifest["documents"].items()}
            with open(path / "chunks.jsonl", encoding="utf-8") as f:
                chunks = [Chunk(**row, meta=metas.get(row["doc_id"], {})) for row in map(json.loads, f)]
            tokens = json.loads((path / "tokens.json").read_text(encoding="utf-8"))
            vectors = np.load(path / "vectors.npy")
            ids = [c.id for c in chunks if c.indexed]
            dense = DenseIndex.load(path / "faiss.index", ids, manifest["faiss"])
            # a file cut at a line end still parses: the counts must agree with the manifest
            counts = {len(ids), len(tokens), len(vectors), dense.index.ntotal, manifest["n_chunks"]}
            listed = {cid for d in manifest["documents"].values() for cid in d["chunks"]}
            if len(counts) > 1 or not listed <= {c.id for c in chunks}:
                raise ValueError("its files disagree on the number of chunks")
        except IndexMissing:
            raise
        except (OSError, EOFError, ValueError, TypeError, KeyError, AttributeError, RuntimeError) as e:
            why = f"{Path(e.filename).name}: {e.strerror}" if isinstance(e, OSError) and e.filename else e
            raise IndexDamaged(root, f"{type(e).__name__}: {str(why)[:160]}") from e
        return cls(path, manifest, chunks, tokens, vectors, dense)


def index_settings(chunk_cfg: ChunkConfig, embedder: str, faiss_kind: str) -> dict:
    chunk = asdict(chunk_cfg)
    if chunk["tables"] == "grid":  # as every index was before --tables: such an index is not rebuilt for it
        del chunk["tables"]
    return {"format": FORMAT, "chunk": chunk, "embedder": embedder, "faiss": faiss_kind}


def _digest(path: Path) -> dict:
    h = hashlib.sha256()  # hashlib.file_digest is Python 3.11+
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
        return {"bytes": f.tell(), "sha256": h.hexdigest()}


def _verify(path: Path, files: dict | None) -> None:
    """Each file's size and sha256 as the manifest lists them (versions written before checksums list none)."""
    for name, want in (files or {}).items():
        if name not in FILES:  # the manifest names nothing outside the version folder
            raise ValueError(f"the manifest lists an unknown file {name[:80]!r}")
        got = _digest(path / name)
        if got != want:
            what = "size" if got["bytes"] != want.get("bytes") else "sha256"
            raise ValueError(f"{name}: {what} differs from the manifest's")


def sweep_debris(root: Path) -> None:
    """Remove what failed or crashed writes left (a full disk stays full until they go) and old versions.

    Called under the writer lock, so no ``.tmp-*`` folder belongs to a live writer; ``CURRENT`` is read here, after
    any switch, and the version it names is kept. Old versions stay while a reader is loading (the next run
    removes them)."""
    if not root.is_dir():
        return
    try:
        live = (root / "CURRENT").read_text().strip()
    except OSError:
        live = None  # no version folder is known to be unused
    with contextlib.suppress(OSError):
        (root / ".CURRENT.tmp").unlink(missing_ok=True)
    # an unlistable folder is skipped here: write_version says what is wrong with it
    with readers_lock(root, exclusive=True) as no_readers, contextlib.suppress(OSError):
        for old in root.iterdir():
            stale = old.name.startswith("v-") and live and old.name != live and no_readers
            if old.name.startswith(".tmp-") or stale:
                shutil.rmtree(old, ignore_errors=True)


def write_version(root: Path, manifest: dict, chunks: list[Chunk], tokens: list, vectors: np.ndarray,
           dense: DenseIndex) -> Path:
    """Write a new version folder, then publish it by atomically replacing CURRENT; the caller holds the lock."""
    name = f"v-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{time.monotonic_ns() % 10**6}"
    tmp = root / f".tmp-{name}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        with open(tmp / "chunks.jsonl", "w", encoding="utf-8") as f:
            for c in chunks:
                row = {k: v for k, v in asdict(c).items() if k != "meta"}  # the manifest holds it, once per document
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        (tmp / "tokens.json").write_text(json.dumps(tokens), encoding="utf-8")
        np.save(tmp / "vectors.npy", vectors)
        dense.save(tmp / "faiss.index")
        manifest["files"] = {f: _digest(tmp / f) for f in FILES}  # read back: the hash is of what is on disk
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False), encoding="utf-8")
        for f in tmp.iterdir():  # data on disk before the rename that makes it visible
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        tmp.rename(root / name)
        pointer = root / ".CURRENT.tmp"
        pointer.write_text(name + "\n")
        os.replace(pointer, root / "CURRENT")
    except BaseException as e:  # CURRENT still names the previous version: drop the partial new one
        for debris in (tmp, root / name):
            shutil.rmtree(debris, ignore_errors=True)
        with contextlib.suppress(OSError):
            (root / ".CURRENT.tmp").unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise IndexWriteError(f"cannot write the index in {root} ({e.strerror or e}); free disk space or make "
                                  "the folder writable, or pass --index-dir elsewhere") from None
        raise
    sweep_debris(root)
    return root / name


def update_index(docs_dir: str | Path, index_dir: str | Path, chunk_cfg: ChunkConfig, embedder: str,
                 faiss_kind: str = "exact", progress: bool = True, hard_links: bool = False,
                 work: Callable[[Plan, ChunkConfig, str, bool], Bundle] | None = None) -> tuple[Index, UpdateStats]:
    """Bring the index at ``index_dir`` up to date with ``docs_dir``; re-embed only what changed.

    One writer at a time: a second waits for the first (up to ``LOCK_TIMEOUT`` s), then sees its result. ``work``
    chunks and embeds the plan's fresh documents (default ``embed_fresh``, in this process; ``rag.ray_index``)."""
    root = Path(index_dir)
    # the lock file lives inside; a folder that cannot be made fails in write_version, with its own message
    with contextlib.suppress(OSError):
        root.mkdir(parents=True, exist_ok=True)
    with writer_lock(root, LOCK_TIMEOUT):
        sweep_debris(root)  # what a crashed or killed run left, before anything is read or written
        plan = plan_update(docs_dir, root, index_settings(chunk_cfg, embedder, faiss_kind), progress, hard_links)
        if not plan.needed:
            return plan.old, plan.stats
        bundle = (work or embed_fresh)(plan, chunk_cfg, embedder, progress)
        return write_update(plan, bundle, docs_dir, root, faiss_kind)


@dataclass
class Plan:
    """What an update has to do: chunk and embed ``fresh`` (new or edited documents, in ``docs`` order); the other
    documents keep their chunks, tokens and vectors from ``old``. ``stats`` counts documents; chunks come later."""

    docs: list[Document]
    old: Index | None
    fresh: list[Document]
    stats: UpdateStats
    settings: dict
    t0: float

    @property
    def needed(self) -> bool:
        """False when the live index already matches the documents (nothing to write)."""
        s = self.stats
        return self.old is None or bool(s.added or s.changed or s.removed or s.metadata)


@dataclass
class Bundle:
    """The work of an update, what ``write_update`` takes: the fresh documents' chunks (plan order, parents too),
    and the BM25 tokens and unit vectors of their indexed chunks, in the same order. Whoever computes it (in
    process, ``rag.ray_index``) hands over the same three things."""

    chunks: list[Chunk]
    tokens: list[list[str]]
    vectors: np.ndarray


def plan_update(docs_dir: str | Path, index_dir: Path, settings: dict, progress: bool, hard_links: bool,
                load: Callable[[Path], Index] = lambda root: Index.load(root)) -> Plan:
    """Read the documents and the live version (``load``: another store's opener, e.g. Milvus's); decide which
    documents to chunk and embed again (by sha256)."""
    t0 = time.perf_counter()
    docs: list[Document] = load_folder(docs_dir, progress=progress, hard_links=hard_links)
    try:
        old = load(index_dir)
        if any(old.manifest.get(k) != v for k, v in settings.items()):
            log.info("index settings changed: rebuilding everything")
            old = None
    except IndexDamaged as e:
        log.warning("index at %s is damaged (%s): rebuilding it from %s", index_dir, e.why, docs_dir)
        old = None
    except IndexMissing:
        old = None
    old_docs = old.manifest["documents"] if old else {}
    if any("meta" not in entry for entry in old_docs.values()):
        log.info("index at %s predates document metadata (front matter, dates): adding it, nothing re-embedded",
                 index_dir)
    stats = UpdateStats(documents=len(docs), removed=len(set(old_docs) - {d.id for d in docs}))
    fresh = []
    for d in docs:
        prev = old_docs.get(d.id)
        if prev is not None and prev["sha256"] == d.sha256:
            stats.unchanged += 1
            stats.metadata += prev.get("meta") != d.meta
        else:
            stats.added += prev is None
            stats.changed += prev is not None
            fresh.append(d)
    plan = Plan(docs, old, fresh, stats, settings, t0)
    if not plan.needed:
        stats.chunks, stats.seconds = len(old.ids), time.perf_counter() - t0
    return plan


def embed_fresh(plan: Plan, chunk_cfg: ChunkConfig, embedder: str, progress: bool) -> Bundle:
    """The work of an update in this process: chunk, tokenize and embed the fresh documents."""
    chunks = [c for d in plan.fresh for c in chunk_document(d, chunk_cfg)]
    texts = [c.index_text for c in chunks if c.indexed]
    # only metadata changed: no embedder to load (seconds on a cold CPU) for zero texts
    vectors = plan.old.vectors[:0] if plan.old and not texts else embed(embedder, texts,
                                                                        progress=progress and len(texts) > 64)
    return Bundle(chunks, [tokenize(t) for t in texts], vectors)


def write_update(plan: Plan, work: Bundle, docs_dir: str | Path, index_dir: Path,
                 faiss_kind: str) -> tuple[Index, UpdateStats]:
    """Merge the kept chunks with the fresh ones in document order and write them as a new version."""
    old, stats = plan.old, plan.stats
    old_docs = old.manifest["documents"] if old else {}
    old_row = {cid: i for i, cid in enumerate(old.ids)} if old else {}
    fresh_ids = {d.id for d in plan.fresh}
    by_doc: dict[str, list[Chunk]] = {}
    for c in work.chunks:
        by_doc.setdefault(c.doc_id, []).append(c)
    chunks, tokens, rows, doc_meta = [], [], [], {}  # rows: old vector row, or -1 for a fresh chunk
    new_tokens = iter(work.tokens)
    for d in plan.docs:
        keep = d.id not in fresh_ids
        dchunks = ([replace(old.chunks[cid], meta=d.meta) for cid in old_docs[d.id]["chunks"]] if keep
                   else [replace(c, meta=d.meta) for c in by_doc.get(d.id, [])])
        doc_meta[d.id] = {"sha256": d.sha256, "title": d.title, "mtime": d.mtime, "meta": d.meta,
                          "chunks": [c.id for c in dchunks]}
        for c in dchunks:
            chunks.append(c)
            if c.indexed:
                rows.append(old_row[c.id] if keep else -1)
                tokens.append(old.tokens[old_row[c.id]] if keep else next(new_tokens))
    stats.chunks = len(rows)
    stats.embedded_chunks = len(work.tokens)
    new_vecs = work.vectors
    if len(new_vecs) != stats.embedded_chunks:
        raise ValueError(f"{len(new_vecs)} vectors for {stats.embedded_chunks} fresh chunks")
    dim = new_vecs.shape[1]
    vectors = np.zeros((len(rows), dim), dtype=np.float32)
    it = iter(new_vecs)
    for i, r in enumerate(rows):
        vectors[i] = old.vectors[r] if r >= 0 else next(it)
    ids = [c.id for c in chunks if c.indexed]
    dense = DenseIndex(ids, vectors, faiss_kind)
    manifest = {**plan.settings, "docs_dir": str(Path(docs_dir).resolve()),
                "built": time.strftime("%Y-%m-%dT%H:%M:%S"), "embedding_dim": dim, "n_chunks": len(ids),
                "documents": doc_meta}
    path = write_version(index_dir, manifest, chunks, tokens, vectors, dense)
    stats.seconds, stats.wrote = time.perf_counter() - plan.t0, True
    return Index(path, manifest, chunks, tokens, vectors, dense), stats
