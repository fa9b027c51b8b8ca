"""The Milvus store against the embedded index: the real engine (Milvus Lite's C++ core, a child process per file).

Tolerances: both BM25s score with Lucene's idf, k1=1.5, b=0.75 over the same tokens, so the same chunks come
back in the same order with scores equal to float32 precision (1e-4 relative); dense search is exact inner product
on the same vectors in both (1e-5). Exact ties are ordered by chunk position in both.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.conftest import SMALL_CHUNKS, write_corpus

pytest.importorskip("milvus_lite")

QUERIES = ["return a device", "Ghent office meeting rooms", "watering lawns in the morning", "price of the plus plan",
           "when was the company founded", "moisture probes"]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def stores(small_index, tmp_path_factory):
    """The session's embedded index and a Milvus index over the same docs folder and chunking."""
    from rag.chunk import ChunkConfig
    from rag.index import Index
    from rag.store_milvus import close, update_milvus

    docs, index = small_index
    root = tmp_path_factory.mktemp("milvus") / "index"
    store, stats = update_milvus(docs, root, ChunkConfig(**SMALL_CHUNKS), "minilm", progress=False)
    assert stats.wrote and stats.embedded_chunks == stats.chunks == len(store.ids)
    yield Index.load(index), store
    close(root)


def _close(a: list, b: list, rel: float) -> bool:
    return [c for c, _ in a] == [c for c, _ in b] and all(abs(x - y) <= rel * max(1.0, abs(x))
                                                          for (_, x), (_, y) in zip(a, b, strict=True))


def test_same_results_as_embedded(stores):
    emb, mil = stores
    assert mil.ids == emb.ids and mil.manifest["documents"] == emb.manifest["documents"]
    for q in QUERIES:
        for k in (1, 3, 10):
            assert _close(mil.search_bm25(q, k), emb.search_bm25(q, k), 1e-4), q
            assert _close(mil.search_dense(q, k), emb.search_dense(q, k), 1e-5), q
    assert mil.search_bm25("zzz qqq", 5) == [] and mil.search_bm25("the of", 5) == []  # no tokens: nothing
    cid = emb.ids[3]
    assert mil.chunks[cid] == emb.chunks[cid] and mil.chunks[cid].meta == emb.chunks[cid].meta
    assert [c.id for c in mil.chunks.values()] == list(emb.chunks)


def test_where_filter_keeps_k(stores):
    from rag.filters import allowed

    emb, mil = stores
    for where in (["path=*.md"], ["path!=returns.md"], ["path=garden/*"], ["path=nothing/*"]):
        for q in QUERIES:
            got, want = mil.search_dense(q, 4, allowed(mil, where)), emb.search_dense(q, 4, allowed(emb, where))
            assert _close(got, want, 1e-5), (where, q)
            assert _close(mil.search_bm25(q, 4, allowed(mil, where)), emb.search_bm25(q, 4, allowed(emb, where)),
                          1e-4)
    md = [c for c in emb.ids if c.endswith(".md") or ".md#" in c]
    hits = mil.search_dense("anything at all", 4, allowed(mil, ["path=*.md"]))
    assert len(hits) == min(4, len(md)) and all(".md#" in c for c, _ in hits)  # filtered before the top k


def test_incremental_update_and_delete(tmp_path):
    from rag.chunk import ChunkConfig
    from rag.index import embed_fresh
    from rag.store_milvus import close, update_milvus

    docs, root, cfg = write_corpus(tmp_path / "docs"), tmp_path / "index", ChunkConfig(**SMALL_CHUNKS)
    handed = []

    def work(plan, *args):  # the seam rag.ray_index plugs into: who chunks and embeds the fresh documents
        handed.extend(d.id for d in plan.fresh)
        return embed_fresh(plan, *args)

    first, _ = update_milvus(docs, root, cfg, "minilm", progress=False)
    kept = first.chunks[first.ids[0]]  # read now: the first version is dropped once the next one is live
    gone = {d: len(first.manifest["documents"][d]["chunks"]) for d in ("history.md", "office.html")}
    (docs / "history.md").write_text("# Company history\n\nThe company was founded in 2016 in Antwerp.\n")
    (docs / "office.html").unlink()
    store, stats = update_milvus(docs, root, cfg, "minilm", progress=False, work=work)
    assert handed == ["history.md"]
    history = store.manifest["documents"]["history.md"]["chunks"]
    assert (stats.changed, stats.removed, stats.unchanged) == (1, 1, 3)
    assert stats.embedded_chunks == len(history)  # only the edited document was embedded
    assert stats.chunks == len(store.ids) == len(first.ids) - sum(gone.values()) + len(history)
    assert not any(c.startswith("office.html") for c in store.ids) and "office.html" not in store.manifest["documents"]
    assert store.search_bm25("Ghent meeting rooms", 5) == []  # its only mentions were deleted or edited away
    assert store.search_bm25("founded Antwerp", 1)[0][0] in history
    assert store.chunks[kept.id] == kept  # a kept chunk, copied from the old version
    again, stats = update_milvus(docs, root, cfg, "minilm", progress=False)
    assert not stats.wrote and again.name == store.name
    names = store.client.list_collections()
    assert sorted(names) == sorted([f"{store.base}_live", store.name, f"{store.name}_meta"])  # old versions dropped
    close(root)


def test_pipeline_ranked_via_store_flag(tiny_pipeline, tmp_path):
    from rag.pipeline import RagConfig, RagPipeline
    from rag.store_milvus import close

    c = tiny_pipeline.cfg
    with pytest.raises(ValueError, match="--store"):
        RagConfig(docs=c.docs, store="qdrant")
    with pytest.raises(ValueError, match="--store-url"):
        RagConfig(docs=c.docs, store_url="http://localhost:19530")
    cfg = RagConfig(docs=c.docs, index_dir=str(tmp_path / "index"), chunk_size=c.chunk_size, overlap=c.overlap,
                    model=c.model, store="milvus", mode="hybrid")
    pipe = RagPipeline(cfg)
    stats = pipe.update_index(progress=False)
    assert stats.wrote and type(pipe.index).__name__ == "MilvusStore"
    for q in QUERIES:
        got, want = pipe.ranked(q, k=3), tiny_pipeline.ranked(q, mode="hybrid", k=3)
        assert [h.chunk_id for h in got.hits] == [h.chunk_id for h in want.hits], q
        assert [h.text for h in got.hits] == [h.text for h in want.hits]
    close(Path(cfg.index_dir))


KILLED = """
import logging, sys
from pathlib import Path
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s %(message)s")
from rag.chunk import ChunkConfig
from rag.store_milvus import update_milvus
update_milvus(sys.argv[1], Path(sys.argv[2]), ChunkConfig(size=40, overlap=5), "minilm", progress=False)
print("done", flush=True)
"""


@pytest.mark.parametrize("victim", ["indexer", "engine"])
def test_kill_mid_index_keeps_previous_version(tmp_path, victim):
    """SIGKILL a real indexing process, or the Milvus engine under it, while a new version is being written; the
    previous version answers, and a re-run completes and drops what the killed write left."""
    import psutil

    from rag.chunk import ChunkConfig
    from rag.store_milvus import MilvusStore, close, update_milvus

    docs, root = write_corpus(tmp_path / "docs"), tmp_path / "index"
    before, _ = update_milvus(docs, root, ChunkConfig(**SMALL_CHUNKS), "minilm", progress=False)
    want = before.search_bm25("Ghent office", 3)
    close(root)  # Milvus Lite: one process per file
    shutil.rmtree(docs / "garden")
    for i in range(24):  # new chunks to write when the kill comes
        (docs / f"notes/n{i:02d}.md").parent.mkdir(exist_ok=True)
        (docs / f"notes/n{i:02d}.md").write_text(f"# Note {i}\n\n" + textwrap.fill(
            " ".join(f"item {i}-{j} concerns sprinkler valve {j} in zone {i % 7}." for j in range(12))))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-c", KILLED, str(docs), str(root)], stderr=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if "writing Milvus version" in line:
            engine = [p for p in psutil.Process(proc.pid).children(recursive=True) if p.name() == "milvus"]
            os.kill(proc.pid if victim == "indexer" else engine[0].pid, signal.SIGKILL)
            break
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "done" not in out, "".join(seen[-20:]) + err[-2000:]
    if victim == "indexer":
        assert proc.returncode == -signal.SIGKILL
    time.sleep(0.5)  # the engine's child process stops when the killed one's file lock goes
    store = MilvusStore.open(root)
    assert store.name == before.name and store.search_bm25("Ghent office", 3) == want
    assert "garden/watering.txt" in store.manifest["documents"]
    debris = [n for n in store.client.list_collections() if n.startswith(store.base + "_v") and store.name not in n]
    assert debris, "the kill came after the write: nothing was left half-written"
    after, stats = update_milvus(docs, root, ChunkConfig(**SMALL_CHUNKS), "minilm", progress=False)
    assert stats.wrote and stats.added == 24 and stats.removed == 1
    assert after.search_bm25("sprinkler valve 7 zone 3", 1) and "garden/watering.txt" not in after.manifest["documents"]
    assert sorted(after.client.list_collections()) == sorted([f"{after.base}_live", after.name, f"{after.name}_meta"])
    close(root)


# ---- --store beyond `rag`: finetune data, hybrid data/train, hybrid compare (and its freshness demo)
def _golden(root: Path, rows: list[dict]) -> str:
    import json

    (root / "golden.jsonl").write_text("\n".join(json.dumps(q) for q in rows))
    return str(root / "golden.jsonl")


def _on_milvus(index_dir: str, emb_docs: dict) -> None:
    """``index_dir`` holds a live Milvus Lite index of the same documents as the embedded one; then let it go."""
    from rag.store_milvus import LITE_FILE, MilvusStore, close

    assert (Path(index_dir) / LITE_FILE).exists() and not (Path(index_dir) / "CURRENT").exists()  # no embedded one
    assert MilvusStore.open(Path(index_dir)).manifest["documents"] == emb_docs
    close(Path(index_dir))


def test_finetune_data_round_trips_the_same_rows_on_milvus(tmp_path):
    """Synthetic QA kept by round-trip retrieval through Milvus: the same rows as through the embedded index."""
    from finetune.data import DataConfig, build
    from rag.index import Index
    from tests.conftest import write_corpus
    from tests.test_finetune_data import GOLDEN

    docs, golden = write_corpus(tmp_path / "docs"), _golden(tmp_path, GOLDEN)
    built = {}
    for store in ("embedded", "milvus"):
        cfg = DataConfig(model="smollm2-135m", docs=str(docs), golden=golden, out=str(tmp_path / store / "data"),
                         index_dir=str(tmp_path / store / "index"), store=store, synthetic_chunks=4, paraphrases=0,
                         general_rows=0, test_fraction=0.4)
        train, heldout, stats = build(cfg, progress=False)
        built[store] = train.to_list(), heldout, {k: v for k, v in stats.items() if k != "seconds"}
    assert built["milvus"] == built["embedded"]  # training rows, held-out questions and counts
    _on_milvus(str(tmp_path / "milvus" / "index"), Index.load(tmp_path / "embedded" / "index").manifest["documents"])


def test_raft_rows_have_the_same_distractors_on_milvus(tmp_path):
    from hybrid.raft import RaftConfig, build_raft
    from rag.index import Index
    from tests.conftest import write_corpus
    from tests.test_hybrid_raft import GOLDEN

    docs, golden = write_corpus(tmp_path / "docs"), _golden(tmp_path, GOLDEN)
    rows = {}
    for store in ("embedded", "milvus"):
        cfg = RaftConfig(model="smollm2-135m", docs=str(docs), golden=golden, out=str(tmp_path / store / "data"),
                         index_dir=str(tmp_path / store / "index"), store=store, k=3, p_no_oracle=0.5,
                         paraphrases=0, synthetic_chunks=0, refusals=True, targets="quote")
        ds, stats = build_raft(cfg, progress=False)
        rows[store] = ds.to_list()
    assert rows["milvus"] == rows["embedded"]  # the prompts hold the passages: same distractors, same order
    assert len(rows["milvus"]) == 5 and not stats["skipped"]
    _on_milvus(str(tmp_path / "milvus" / "index"), Index.load(tmp_path / "embedded" / "index").manifest["documents"])


def test_compare_on_milvus_reindexes_a_separate_copy_for_freshness(tmp_path):
    """`hybrid compare --store milvus --freshness`: the edit reaches retrieval through an incremental update of a
    copy in its own Milvus Lite file; the live store keeps the old text, and no engine outlives its copy."""
    import json

    from hybrid.compare import compare
    from hybrid.report import markdown
    from hybrid.systems import CompareConfig
    from rag.store_milvus import _CLIENTS, MilvusStore, close
    from tests.conftest import write_corpus
    from tests.test_hybrid_compare import CHANGED, EDITS

    docs, index = write_corpus(tmp_path / "docs"), tmp_path / "index"
    (docs / "changes").mkdir()
    (docs / "changes" / "edits.jsonl").write_text("\n".join(json.dumps(e) for e in EDITS))
    (docs / "changes" / "golden.jsonl").write_text("\n".join(json.dumps(q) for q in CHANGED))
    (tmp_path / "ft" / "data").mkdir(parents=True)  # no golden file: the questions are held-out synthetic ones
    held = {"id": "syn-returns.md#s1", "question": "Within how many days may a device be returned?",
            "answer": "45 days", "aliases": [], "sources": ["returns.md"], "type": "synthetic", "split": "test"}
    (tmp_path / "ft" / "data" / "heldout.jsonl").write_text(json.dumps(held) + "\n")
    cfg = CompareConfig(model="smollm2-135m", docs=str(docs), index_dir=str(index), store="milvus",
                        finetuned=str(tmp_path / "ft" / "m"), systems="rag", latency_sample=1, bootstrap=50, probes=0,
                        out=str(tmp_path / "report"))
    res = compare(cfg, with_freshness=True, progress=False)
    f = res["freshness"]
    live = MilvusStore.open(index)
    assert res["settings"]["store"] == "milvus"
    assert 0 < f["reembedded_chunks"] < len(live.ids)  # incremental: only the edited document
    assert f["retrieved_new"] == 1.0  # the edited passage is what RAG read from the copy
    texts = " ".join(c.text for c in live.chunks.values())
    assert "within 45 days" in texts and "60 days" not in texts  # the live store was never touched
    assert res["setup"]["index"]["size_mb"] is not None  # the timed fresh build: a Milvus Lite file, measured
    assert all(Path(k).exists() for k in _CLIENTS)  # the copy's and the timed build's engines were let go
    assert "MB" in markdown(res)
    assert "size on the Milvus server" in markdown(res | {"setup": {"index": {"build_s": 1.0, "size_mb": None}}})
    close(index)


def test_store_flags_on_every_command_that_indexes(tmp_path, capsys):
    """--store / --store-url reach `finetune data|run` and `hybrid data|train|compare`: help, file, checks."""
    from tests.test_config_file import error, resolved, toml

    commands = (("finetune", "data"), ("finetune", "run"), ("hybrid", "data"), ("hybrid", "train"),
                ("hybrid", "compare"))
    f = toml(tmp_path, 'store = "milvus"\n[hybrid.compare]\nstore_url = "http://localhost:19530"\n')
    for group, verb in commands:
        s = resolved(capsys, group, verb, "--config", f)
        want = "http://localhost:19530" if verb == "compare" else ""
        assert (s["store"], s["store_url"]) == ("milvus", want), (group, verb)
        assert resolved(capsys, group, verb)["store"] == "embedded"
    for group, verb in commands:
        if verb != "run":  # run's --print-config checks nothing (no config class); its DataConfig does, below
            assert "--store must be one of embedded, milvus" in error(capsys, group, verb, "--store", "qdrant",
                                                                     "--print-config")
    from finetune.data import DataConfig

    with pytest.raises(ValueError, match="--store-url is for an engine"):
        DataConfig(store_url="http://localhost:19530")
