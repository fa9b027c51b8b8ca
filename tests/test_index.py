"""The index: incremental by content hash, atomic on disk, and a save/load round trip."""

from __future__ import annotations

import numpy as np
import pytest

import rag.index as ix
from rag.chunk import ChunkConfig
from rag.index import Index, IndexMissing, update_index

CFG = ChunkConfig(size=40, overlap=5)


def test_round_trip_gives_same_results(corpus, tmp_path):
    built, stats = update_index(corpus, tmp_path / "ix", CFG, "minilm", progress=False)
    assert stats.wrote and stats.added == 5 and stats.embedded_chunks == stats.chunks
    loaded = Index.load(tmp_path / "ix")
    q = "return window for devices"
    assert loaded.search_bm25(q, 5) == built.search_bm25(q, 5)
    assert [i for i, _ in loaded.search_dense(q, 5)] == [i for i, _ in built.search_dense(q, 5)]
    assert np.array_equal(loaded.vectors, built.vectors)


def test_incremental_reembeds_only_the_changed_file(corpus, tmp_path):
    first, _ = update_index(corpus, tmp_path / "ix", CFG, "minilm", progress=False)
    again, stats = update_index(corpus, tmp_path / "ix", CFG, "minilm", progress=False)
    assert not stats.wrote and stats.unchanged == 5 and stats.embedded_chunks == 0

    (corpus / "returns.md").write_text("# Returns policy\n\nReturns are accepted within 60 days.\n")
    (corpus / "history.md").unlink()
    (corpus / "new.md").write_text("# New\n\nA brand new page about rain gauges.\n")
    updated, stats = update_index(corpus, tmp_path / "ix", CFG, "minilm", progress=False)
    changed = [c for c in updated.chunks.values() if c.doc_id in ("returns.md", "new.md")]
    assert (stats.changed, stats.added, stats.removed, stats.unchanged) == (1, 1, 1, 3)
    assert stats.embedded_chunks == len(changed)
    assert not any(c.doc_id == "history.md" for c in updated.chunks.values())
    row_old = {cid: first.vectors[i] for i, cid in enumerate(first.ids)}
    for i, cid in enumerate(updated.ids):  # unchanged documents keep their exact vectors
        if cid.startswith("pricing.md"):
            assert np.array_equal(updated.vectors[i], row_old[cid])
    assert updated.search_bm25("60 days returns", 1)[0][0].startswith("returns.md")


def test_settings_change_rebuilds(corpus, tmp_path):
    update_index(corpus, tmp_path / "ix", CFG, "minilm", progress=False)
    _, stats = update_index(corpus, tmp_path / "ix", ChunkConfig(size=30, overlap=5), "minilm", progress=False)
    assert stats.added == 5 and stats.unchanged == 0


def test_tables_as_rows_rebuild_and_an_old_grid_index_stays(corpus, tmp_path):
    update_index(corpus, tmp_path / "ix", CFG, "minilm", progress=False)
    assert "tables" not in Index.load(tmp_path / "ix").manifest["chunk"]  # written as before --tables: no rebuild
    rows, stats = update_index(corpus, tmp_path / "ix", ChunkConfig(size=40, overlap=5, tables="rows"), "minilm",
                               progress=False)
    assert stats.added == 5 and stats.unchanged == 0
    priced = [c.text for c in rows.chunks.values() if c.doc_id == "pricing.md"]
    assert any("- plan: Basic; price: EUR 7 per month" in t for t in priced) and not any("|" in t for t in priced)


def test_crash_mid_write_leaves_old_index_usable(corpus, tmp_path, monkeypatch):
    update_index(corpus, tmp_path / "ix", CFG, "minilm", progress=False)
    before = Index.load(tmp_path / "ix")
    (corpus / "returns.md").write_text("# Returns\n\nReturns within 90 days.\n")

    def crash(*_a, **_k):  # the process dies after some files of the new version are written
        raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(ix.DenseIndex, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        update_index(corpus, tmp_path / "ix", CFG, "minilm", progress=False)
    monkeypatch.undo()
    after = Index.load(tmp_path / "ix")
    assert after.path == before.path and set(after.chunks) == set(before.chunks)
    assert after.search_bm25("45 days", 1)[0][0].startswith("returns.md")
    # the next successful build publishes the change and clears the debris
    update_index(corpus, tmp_path / "ix", CFG, "minilm", progress=False)
    assert [p.name for p in (tmp_path / "ix").iterdir() if p.name.startswith(".tmp")] == []


def test_missing_index_says_what_to_run(tmp_path):
    with pytest.raises(IndexMissing, match="python -m rag index"):
        Index.load(tmp_path / "nothing")
