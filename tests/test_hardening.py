"""Hardening (issue 17): hostile or broken input gives one clear line or one warning, never a traceback or a hang.

One case per test, each on a tiny folder under tmp_path; the index cases build a tiny index with the packaged
embedder (seconds).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pytest

from rag import ingest
from rag.ingest import IngestError, load_folder


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
    deep = tmp_path
    for _ in range(1100):  # mkdir(parents=True) recurses once per level itself
        deep = deep / "d"
        deep.mkdir()
    (deep / "bottom.md").write_text(GOOD)
    assert [d.id for d in load_folder(tmp_path, progress=False)] == ["d/" * 1100 + "bottom.md"]


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
    assert text.split("\n")[0].count("| x") == ingest.MAX_SPAN
    assert [m for m in warnings(caplog) if m.startswith("t.html: a table cell spans over 1000 columns")]


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
