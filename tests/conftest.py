"""Shared fixtures: a tiny real corpus written per test, and an index over it built once per session."""

from __future__ import annotations

import shutil
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

TINY = {
    "pricing.md": "# Pricing\n\n## Plans\n\n| plan | price |\n|---|---|\n| Basic | EUR 7 per month |\n"
    "| Plus | EUR 23 per month |\n\nAnnual billing saves two months.\n",
    "returns.md": "# Returns policy\n\n## Window\n\nCustomers may return a device within 45 days of delivery.\n\n"
    "## Exceptions\n\nOpened moisture probes can only be returned within 14 days.\n",
    "garden/watering.txt": "Watering guide\n==============\n\nLawns need about 25 millimetres of water per week.\n"
    "Water early in the morning to reduce evaporation.\n",
    "office.html": "<html><head><title>Offices</title><script>track()</script></head><body><nav>Home | Jobs</nav>"
    "<main><h1>Offices</h1><p>The Ghent office opens at 08:30 and has 12 meeting rooms.</p></main>"
    "<footer>Cookie settings</footer></body></html>",
    "history.md": "# Company history\n\nThe company was founded in 2014 by two engineers in a garage in Ghent.\n",
}


def write_corpus(root: Path, files: dict[str, str] = TINY) -> Path:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text, encoding="utf-8")
    return root


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    return write_corpus(tmp_path / "docs")


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory):
    """A RagPipeline over TINY with its index built once; tests must not mutate it."""
    from rag.pipeline import RagConfig, RagPipeline

    root = tmp_path_factory.mktemp("tiny")
    docs = write_corpus(root / "docs")
    pipe = RagPipeline(RagConfig(docs=str(docs), index_dir=str(root / "index"), chunk_size=40, overlap=5,
                                 model="smollm2-135m"))  # the fast tests' model; test_cli runs the default reader
    pipe.update_index(progress=False)
    return pipe


@pytest.fixture
def copy_corpus(tmp_path: Path):
    def _copy(src: Path) -> Path:
        dst = tmp_path / "copy"
        shutil.copytree(src, dst)
        return dst

    return _copy


SMALL_CHUNKS = dict(size=40, overlap=5)  # ChunkConfig of small_index: several chunks per tiny document


@pytest.fixture(scope="session")
def small_index(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny docs folder and an index over it (SMALL_CHUNKS), built once; tests change copies (copy_index)."""
    from rag.chunk import ChunkConfig
    from rag.index import update_index

    root = tmp_path_factory.mktemp("small-index")
    docs = write_corpus(root / "docs")
    update_index(docs, root / "index", ChunkConfig(**SMALL_CHUNKS), "minilm", progress=False)
    return docs, root / "index"


def free_port() -> int:
    """A local TCP port nothing listens on now (a server started next may take it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(app):
    """``app`` served for real by uvicorn on a free local port, in a thread; yields its base URL."""
    import uvicorn

    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(10)


def copy_index(built: tuple[Path, Path], dest: Path) -> tuple[Path, Path]:
    """Copies of a (docs, index) pair under dest, for a test that writes to them."""
    docs, index = built
    shutil.copytree(docs, dest / "docs")
    shutil.copytree(index, dest / "index")
    return dest / "docs", dest / "index"
