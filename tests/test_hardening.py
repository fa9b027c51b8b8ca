"""Hardening: hostile or broken input gives one clear line or one warning, never a traceback or a hang.

One case per test, each on a tiny folder under tmp_path; the index cases build a tiny index with the packaged
embedder (seconds).
"""

from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path

import pytest

from rag import formats, ingest
from rag.chunk import ChunkConfig
from rag.ingest import IngestError, load_folder
from tests.conftest import SMALL_CHUNKS, copy_index


def write(root: Path, rel: str, data: str | bytes) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return path


def loaded(root: Path) -> dict:
    return {d.id: d for d in load_folder(root, progress=False)}


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


GOOD = "# Pump\n\nThe pump runs at 40 litres per minute.\n"


# --- ingest: tracebacks --------------------------------------------------------------------------------------------

def test_deeply_nested_html_is_read(tmp_path):
    write(tmp_path, "deep.html", "<html><body>" + "<div>" * 3000 + "<p>Deep fact.</p>" + "</div>" * 3000)
    assert loaded(tmp_path)["deep.html"].text == "Deep fact."


def test_html_lists_still_nest_after_the_walk_became_a_loop(tmp_path):
    write(tmp_path, "list.html", "<body><p>Intro <b>bold</b></p><ul><li>One<ul><li>One a</li></ul></li>"
          "<li><p>Two</p></li></ul>Tail</body>")
    assert loaded(tmp_path)["list.html"].text == "Intro bold\n\n- One\n\n- One a\n\n- Two\n\nTail"


def test_deeply_nested_folders_are_walked(tmp_path):
    levels = [tmp_path / "/".join(["d"] * n) for n in range(1, 1101)]
    for level in levels:  # mkdir(parents=True) and shutil.rmtree recurse once per level: not for this tree
        level.mkdir()
    (levels[-1] / "bottom.md").write_text(GOOD)
    try:
        assert [d.id for d in load_folder(tmp_path, progress=False)] == ["d/" * 1100 + "bottom.md"]
    finally:  # pytest's own clean-up of old temp folders would hit the recursion limit in a later run
        (levels[-1] / "bottom.md").unlink()
        for level in reversed(levels):
            level.rmdir()


def test_file_name_not_utf8_skipped_with_a_warning_naming_it(tmp_path, caplog):
    write(tmp_path, "good.md", GOOD)
    with open(os.fsencode(tmp_path) + b"/caf\xe9.md", "wb") as f:
        f.write(b"# Cafe\n\nMenu.\n")
    assert list(loaded(tmp_path)) == ["good.md"]
    assert [m for m in warnings(caplog) if "'caf\\udce9.md'" in m and "not valid UTF-8" in m]


def test_empty_docs_path_is_not_the_current_folder():
    with pytest.raises(IngestError, match="docs folder is empty"):
        load_folder("")


# --- ingest: hangs -------------------------------------------------------------------------------------------------

def test_huge_colspan_is_clamped_with_a_warning(tmp_path, caplog):
    write(tmp_path, "t.html", '<table><tr><td colspan="2000000">x</td></tr><tr><td colspan="9' + "9" * 5000
          + '">y</td><td colspan="\u00b2">z</td></tr></table>')
    t0 = time.perf_counter()
    text = loaded(tmp_path)["t.html"].text
    assert time.perf_counter() - t0 < 5
    assert text.split("\n")[0].count("| x") == formats.MAX_SPAN
    assert [m for m in warnings(caplog) if m.startswith("t.html: a table cell spans over 1000 columns")]


def test_many_spanned_cells_stay_linear_with_a_warning(tmp_path, caplog):
    write(tmp_path, "wide.html", "<table><tr>" + "<td colspan='999'>c</td>" * 300 + "</tr></table>")  # fuzz found it
    write(tmp_path, "pad.html", "<table><tr>" + "<td>c</td>" * 1000 + "</tr>" + "<tr><td>x</td></tr>" * 1000
          + "</table>")
    docs = loaded(tmp_path)
    assert docs["wide.html"].text.split("\n")[0].count("| c") == 300  # each cell once, not 299,700 times
    assert len(docs["pad.html"].text) < 20_000  # 1000 one-cell rows are not padded to 1000 columns each
    assert "wide.html: a table's column spans would make it over 4000 cells; each cell is kept once" in warnings(caplog)


def test_deeply_nested_inline_elements_are_read_in_linear_time(tmp_path):
    write(tmp_path, "inline.html", "<body>" + "<span><b><i><ul><li>" * 3000 + "text")  # was 14 s: fuzz found it
    t0 = time.perf_counter()
    assert loaded(tmp_path)["inline.html"].text == "- text"
    assert time.perf_counter() - t0 < 5


def test_heading_with_many_spaces_is_fast(tmp_path):
    write(tmp_path, "spaces.md", "# a" + " " * 150_000 + "b ##\n\nBody.\n")
    t0 = time.perf_counter()
    doc = loaded(tmp_path)["spaces.md"]
    assert time.perf_counter() - t0 < 5
    assert doc.title.startswith("a ") and doc.title.endswith(" b")
    write(tmp_path, "closed.md", "# Title ##\n\nBody.\n")
    assert loaded(tmp_path)["closed.md"].title == "Title"


def test_large_file_warned_and_oversized_file_skipped(tmp_path, caplog, monkeypatch):
    write(tmp_path, "good.md", GOOD)
    write(tmp_path, "big.txt", "word " * 300)  # 1500 bytes
    with open(tmp_path / "huge.txt", "wb") as f:  # sparse: 21 MB of size, no data written
        f.truncate(21 << 20)
    monkeypatch.setattr(ingest, "WARN_BYTES", 1000)
    assert sorted(loaded(tmp_path)) == ["big.txt", "good.md"]
    messages = warnings(caplog)
    assert [m for m in messages if m.startswith("skipping huge.txt: it is 21 MB, over the 20 MB limit")]
    assert [m for m in messages if m.startswith("big.txt: it is 0 MB; chunking and embedding it may take minutes")]


# --- ingest: wrong results -----------------------------------------------------------------------------------------

def test_binary_after_the_first_8_kib_is_not_indexed(tmp_path, caplog):
    write(tmp_path, "good.md", GOOD)
    write(tmp_path, "fake.txt", b"plain text header\n" * 1000 + b"\x00\x01\x02\xff" * 100)
    assert list(loaded(tmp_path)) == ["good.md"]
    assert [m for m in warnings(caplog) if m.startswith("skipping fake.txt: binary content")]


@pytest.mark.parametrize("name", ["evil\nINFO: all good.md", "red\x1b[31m.md"])
def test_control_characters_in_names_are_escaped_in_the_log(tmp_path, caplog, name):
    write(tmp_path, "good.md", GOOD)
    write(tmp_path, name, b"")  # empty: skipped with a warning that names it
    assert list(loaded(tmp_path)) == ["good.md"]
    (message,) = warnings(caplog)
    assert message.startswith(f"skipping {name!r}: empty file") and "\n" not in message and "\x1b" not in message


def test_hard_link_to_a_file_outside_is_skipped_unless_opted_in(tmp_path, caplog):
    docs = tmp_path / "docs"
    write(docs, "good.md", GOOD)
    secret = write(tmp_path, "secret.md", "# Secret\n\nThe vault code is 4711.\n")
    os.link(secret, docs / "linked.md")
    assert list(loaded(docs)) == ["good.md"]
    assert warnings(caplog) == ["skipping linked.md: it has 2 hard links and 1 of them in the docs folder, so it may "
                                "be a file from outside; copy it in instead (cp), or pass --hard-links to index it"]
    assert [d.id for d in load_folder(docs, progress=False, hard_links=True)] == ["good.md", "linked.md"]


def test_hard_links_wholly_inside_the_folder_are_indexed(tmp_path, caplog):
    (tmp_path / "sub").mkdir()
    os.link(write(tmp_path, "good.md", GOOD), tmp_path / "sub" / "same.md")
    assert sorted(loaded(tmp_path)) == ["good.md", "sub/same.md"] and not warnings(caplog)


def test_hard_links_flag_reaches_the_index(tmp_path):
    from rag.cli import main
    from rag.index import Index

    docs = tmp_path / "docs"
    write(docs, "good.md", GOOD)
    os.link(write(tmp_path, "outside.md", "# Outside\n\nKept on purpose.\n"), docs / "linked.md")
    flags = ["index", "--docs", str(docs), "--index-dir", str(tmp_path / "ix"), "--chunk-size", "40", "--overlap", "5"]
    assert main(flags) == 0 and list(Index.load(tmp_path / "ix").manifest["documents"]) == ["good.md"]
    assert main([*flags, "--hard-links"]) == 0
    assert list(Index.load(tmp_path / "ix").manifest["documents"]) == ["good.md", "linked.md"]


# --- index: write failures and damage ------------------------------------------------------------------------------

CHUNKS = ChunkConfig(**SMALL_CHUNKS)


def test_full_disk_gives_one_line_cleans_up_and_keeps_the_old_version(small_index, tmp_path, monkeypatch):
    import errno

    import rag.index as ix
    from rag.index import Index, IndexWriteError, update_index

    docs, index = copy_index(small_index, tmp_path)
    live = Index.load(index).path.name
    (index / ".tmp-v-crashed").mkdir()  # what an earlier failed write left behind
    (index / ".tmp-v-crashed" / "vectors.npy").write_bytes(b"0" * 1000)
    (docs / "returns.md").write_text("# Returns\n\nReturns within 90 days.\n")

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ix.DenseIndex, "save", full)
    with pytest.raises(IndexWriteError, match=f"cannot write the index in {index} .No space left on device.; "
                                              "free disk space"):
        update_index(docs, index, CHUNKS, "minilm", progress=False)
    assert sorted(p.name for p in index.iterdir() if not p.name.startswith(".lock")) == ["CURRENT", live]  # debris gone
    assert Index.load(index).search_bm25("45 days", 1)[0][0].startswith("returns.md")
    monkeypatch.undo()
    update_index(docs, index, CHUNKS, "minilm", progress=False)
    assert Index.load(index).search_bm25("90 days", 1)[0][0].startswith("returns.md")


def test_unwritable_index_folder_is_one_error_line(small_index, tmp_path, monkeypatch, capsys):
    import errno

    import rag.index as ix
    from rag.cli import main

    docs, index = copy_index(small_index, tmp_path)
    (docs / "new.md").write_text("# New\n\nRain gauges.\n")

    def denied(*_a, **_k):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(ix.np, "save", denied)
    assert main(["index", "--docs", str(docs), "--index-dir", str(index), "--chunk-size", "40",
                 "--overlap", "5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"error: cannot write the index in {index} (Permission denied); free disk space or make "
                       "the folder writable, or pass --index-dir elsewhere")
    assert not [p for p in index.iterdir() if p.name.startswith(".tmp")]


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _drop_last_line(path: Path) -> None:
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:-1]))


@pytest.mark.parametrize("damage", [
    lambda v: _truncate(v / "chunks.jsonl"),
    lambda v: _drop_last_line(v / "chunks.jsonl"),  # still valid JSON lines: only the counts tell
    lambda v: (v / "faiss.index").unlink(),
    lambda v: (v / "tokens.json").write_text(""),
    lambda v: _truncate(v / "vectors.npy"),
    lambda v: (v.parent / "CURRENT").write_text("../../etc\n"),
], ids=["truncated-chunks", "chunks-line-missing", "no-faiss", "empty-tokens", "truncated-vectors", "bad-current"])
def test_damaged_index_is_rebuilt_with_a_warning(small_index, tmp_path, caplog, damage):
    from rag.index import Index, IndexDamaged, update_index

    docs, index = copy_index(small_index, tmp_path)
    damage(index / (index / "CURRENT").read_text().strip())
    with pytest.raises(IndexDamaged, match=f"index at {index} is damaged .*python -m rag index"):
        Index.load(index)
    fixed, stats = update_index(docs, index, CHUNKS, "minilm", progress=False)
    assert stats.wrote and stats.added == 5
    assert [m for m in warnings(caplog) if m.startswith(f"index at {index} is damaged (") and "rebuilding" in m]
    assert Index.load(index).search_bm25("45 days", 1)[0][0].startswith("returns.md")


def test_damaged_calibration_file_is_ignored_with_a_warning(tmp_path, caplog):
    from rag import calibration

    (tmp_path / calibration.FILE).write_text('{"hybrid|minilm": {"rule": [["bm25", 4')
    assert calibration.load(tmp_path) == {}
    assert [m for m in warnings(caplog) if m.startswith(f"ignoring {tmp_path / calibration.FILE}: unreadable")]
    calibration.save(tmp_path, "k", {"rule": []})  # the next evaluation rewrites it
    assert calibration.load(tmp_path) == {"k": {"rule": []}}


def test_calibration_that_cannot_be_written_is_one_line_and_keeps_the_old_file(tmp_path):
    from rag import calibration

    calibration.save(tmp_path, "old", {"rule": [["bm25", 4.0]]})
    (tmp_path / "calibration.tmp").mkdir()  # a real write failure: the temp file's name is taken by a folder
    with pytest.raises(calibration.CalibrationWriteError, match=f"^cannot save the calibration to "
                       f"{re.escape(str(tmp_path / calibration.FILE))} .Is a directory.; the old file is kept; free "
                       "disk space or make .* writable$"):
        calibration.save(tmp_path, "new", {"rule": []})
    assert calibration.load(tmp_path) == {"old": {"rule": [["bm25", 4.0]]}}


# --- small bugs the first pass noted -------------------------------------------------------------------------------

def chunk_sections(text: str) -> list[str]:
    from rag.chunk import ChunkConfig, chunk_document
    from rag.ingest import Document

    return [c.section for c in chunk_document(Document("a.md", "/a.md", "A", text, "0", 0.0),
                                              ChunkConfig(size=10, overlap=0))]


def test_a_lone_hash_line_does_not_make_the_next_paragraph_a_heading():
    assert chunk_sections("# A\n\nIntro.\n\n#\n\nfoo bar\n\n## B\n\nMore.") == ["A", "A › B"]


def test_a_heading_ending_in_hash_keeps_it_and_a_closing_sequence_goes(tmp_path):
    assert chunk_sections("# C#\n\nA language.\n\n## Uses ##\n\nMany.") == ["C#", "C# › Uses"]
    write(tmp_path, "c.md", "# C#\n\nA language.\n")
    write(tmp_path, "f.md", "# F #\n\nAnother.\n")
    assert {d.id: d.title for d in loaded(tmp_path).values()} == {"c.md": "C#", "f.md": "F"}


def test_heading_line_of_spaces_chunks_fast():
    t0 = time.perf_counter()
    assert chunk_sections("#" + " " * 100_000 + "\u00a0\n\nBody.") == [""]  # no heading text: not a heading
    assert chunk_sections("# a" + " " * 100_000 + "b\n\nBody.")[0].startswith("a ")
    assert time.perf_counter() - t0 < 5


@pytest.mark.parametrize("model, needle", [("", "--model is empty"),
                                           ("/no/such/base", "--model /no/such/base: no such file or folder"),
                                           ("no such", "--model 'no such' is not a known model name")])
def test_finetune_model_is_checked_like_rags(model, needle):
    from finetune.train import TrainConfig

    with pytest.raises(ValueError, match=re.escape(needle)):
        TrainConfig(model=model)


# --- golden files --------------------------------------------------------------------------------------------------

GOLDEN_OK = ('{"id": "a", "question": "How fast is the pump?", "answer": "40 litres", "sources": ["pump.md"], '
             '"split": "train"}')


@pytest.mark.parametrize("line, needle", [
    ('{"id": "b", "question": "Pump speed?", "sources": ["pump.md"]}', "'answer' is missing"),
    ('{"id": "b", "question": "Pump speed?", "answer": 40, "sources": ["pump.md"]}', "'answer' must be a non-empty "
     "string, or null"),
    ('{"id": ["b"], "question": "Pump speed?", "answer": "40", "sources": ["pump.md"]}', "'id' must be a string"),
    ('{"id": "b", "question": {"en": "Pump?"}, "answer": "40", "sources": ["pump.md"]}', "'question' must be"),
    ('{"id": "b", "question": "Pump speed?", "answer": "40", "sources": [3]}', "'sources' must be a list of paths"),
    ('{"id": "b", "question": "Pump speed?", "answer": "40", "sources": "pump.md"}', "'sources' must be a list"),
    ('{"id": "b", "question": "Pump speed?", "answer": "40", "sources": ["../pump.md"]}', "'sources' must be"),
    ('{"id": "b", "question": "Pump speed?", "answer": "40", "sources": ["pump.md"], "split": "dev"}',
     "'split' must be 'train' or 'test', not \"dev\""),
    ('{"id": "b", "question": "Pump speed?", "answer": "40", "aliases": "forty", "sources": ["pump.md"]}',
     "'aliases' must be a list of strings"),
    (b'{"id": "b", "question": "Caf\xe9?", "answer": null}', "not valid UTF-8 (byte 0xe9 at column 29)"),
])
def test_malformed_golden_line_names_file_line_and_field(tmp_path, line, needle):
    from rag.evaluate import GoldenError, load_golden

    path = tmp_path / "golden.jsonl"
    line = line if isinstance(line, bytes) else line.encode()
    path.write_bytes(GOLDEN_OK.encode() + b"\n\n" + line + b"\n")
    with pytest.raises(GoldenError, match=f"^{re.escape(str(path))}:3: .*{re.escape(needle)}"):
        load_golden(path)


def test_well_formed_golden_lines_still_load(tmp_path):
    from rag.evaluate import load_golden

    path = tmp_path / "golden.jsonl"
    path.write_text(GOLDEN_OK + '\n{"id": 7, "question": "CEO shoe size?", "answer": null, "note": "kept"}\n')
    a, b = load_golden(path)
    assert a["type"] == "lookup" and a["split"] == "train" and a["aliases"] == []
    assert b["type"] == "unanswerable" and b["sources"] == [] and b["split"] == "test" and b["note"] == "kept"
    assert len(load_golden("data/demo/golden.jsonl")) == 186  # the shipped files keep loading
    assert len(load_golden("bench/rustbook-golden.jsonl")) == 20


# --- flags ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, needle", [
    ({"parent_size": 0}, "--parent-size must be at least 10 words, not 0"),
    ({"embedder": "nosuch"}, "--embedder 'nosuch' is not a known model name; pass a packaged model (minilm)"),
    ({"reranker": "nosuch"}, "--reranker 'nosuch' is not a known model name"),
    ({"model": "nosuch"}, "--model 'nosuch' is not a known model name; pass a packaged model (smollm2-135m"),
    ({"embedder": "./models/missing"}, "--embedder ./models/missing: no such file or folder"),
    ({"model": "/no/such/reader.gguf"}, "--model /no/such/reader.gguf: no such file or folder"),
    ({"reranker": "a/b/c"}, "--reranker a/b/c: no such file or folder"),
    ({"embedder": ""}, "--embedder is empty"),
    ({"docs": ""}, "--docs is empty"),
    ({"abstain": "bm25<nan"}, "--abstain 'bm25<nan': write SIGNAL<NUMBER"),
    ({"abstain": "bm25<inf"}, "--abstain"),
])
def test_bad_flag_is_a_value_error_naming_it(flags, needle):
    from rag.pipeline import RagConfig

    with pytest.raises(ValueError, match=re.escape(needle)):
        RagConfig(**{"index_dir": "unused", **flags})


def test_packaged_names_paths_and_hub_ids_are_accepted(tmp_path):
    from rag.pipeline import RagConfig

    RagConfig(index_dir=str(tmp_path / "ix"), embedder="sentence-transformers/all-MiniLM-L6-v2",
              reranker="cross-encoder/ms-marco-MiniLM-L-6-v2", model="Qwen/Qwen2.5-0.5B-Instruct")
    (tmp_path / "emb").mkdir()
    (tmp_path / "emb" / "modules.json").write_text("[]")  # a sentence-transformers folder's marker
    RagConfig(index_dir=str(tmp_path / "ix"), embedder=str(tmp_path / "emb"), model="smollm2-135m")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="the folder holds no model"):
        RagConfig(index_dir=str(tmp_path / "ix"), embedder=str(tmp_path / "empty"), model="smollm2-135m")


def test_index_dir_that_is_a_file_is_one_line(tmp_path):
    from rag.pipeline import RagConfig

    (tmp_path / "ix").write_text("not a folder")
    with pytest.raises(ValueError, match=f"--index-dir {re.escape(str(tmp_path / 'ix'))} is a file"):
        RagConfig(index_dir=str(tmp_path / "ix"))


def test_hub_id_not_downloaded_says_how_to_get_it_not_check_your_internet(monkeypatch):
    from rag.dense import load_embedder
    from rag.models import ModelNotFound

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFound, match="--embedder 'openbook-test/no-such-model': it is not downloaded and "
                                            "the hub is off .HF_HUB_OFFLINE=1.; run with HF_HUB_OFFLINE=0"):
        load_embedder("openbook-test/no-such-model")


def test_empty_question_is_one_error_line(corpus, tmp_path, capsys):
    from rag.cli import main

    assert main(["ask", "--docs", str(corpus), "--index-dir", str(tmp_path / "ix"), " "]) == 2
    assert capsys.readouterr().err.strip() == ("error: ask: a question is empty; e.g. python -m rag ask "
                                               "'How long is the warranty?'")
    assert not (tmp_path / "ix").exists()  # refused before any indexing


# --- web page ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["OUTSIDE", "../outside.md", "sub/../../outside.md", "", "."])
def test_freshness_edit_outside_the_copy_is_refused(corpus, tmp_path, path):
    from hybrid.freshness import apply_edits

    outside = tmp_path / "outside.md"
    outside.write_text("# Outside\n\nwithin 45 days\n")
    edit = {"id": "e-x", "path": str(outside) if path == "OUTSIDE" else path, "find": "within 45 days",
            "replace": "overwritten"}
    (tmp_path / "work").mkdir()
    with pytest.raises(ValueError, match="edit e-x: path .* is not a file inside the documents folder"):
        apply_edits(corpus, tmp_path / "work" / "copy", [edit])
    assert outside.read_text() == "# Outside\n\nwithin 45 days\n"


def test_freshness_edit_inside_still_applies(corpus, tmp_path):
    from hybrid.freshness import apply_edits

    edit = {"id": "e-1", "path": "returns.md", "find": "within 45 days", "replace": "within 60 days"}
    assert apply_edits(corpus, tmp_path / "copy", [edit]) == ["returns.md"]
    assert "within 60 days" in (tmp_path / "copy" / "returns.md").read_text()
    assert "within 45 days" in (corpus / "returns.md").read_text()


def test_cross_site_posts_are_refused(corpus, tmp_path):
    from fastapi.testclient import TestClient

    from hybrid.ui import Demo, UiConfig, create_app

    demo = Demo(UiConfig(model="smollm2-135m",
                         docs=str(corpus), index_dir=str(tmp_path / "ix"), finetuned=str(tmp_path / "none"),
                         raft=str(tmp_path / "none"), report=str(tmp_path / "report"), port=7860))
    client = TestClient(create_app(demo), base_url="http://127.0.0.1:7860")
    for route in ("/api/reindex", "/api/freshness"):
        for origin in ("http://evil.example", "null", "http://localhost:9999"):
            r = client.post(route, headers={"Origin": origin})
            assert r.status_code == 403 and "cross-site request" in r.json()["detail"], (route, origin)
    assert client.post("/api/reindex").status_code == 200  # curl sends no Origin
    assert client.post("/api/reindex", headers={"Origin": "http://127.0.0.1:7860"}).status_code == 200
    assert client.post("/api/reindex", headers={"Origin": "http://localhost:7860"}).status_code == 200
