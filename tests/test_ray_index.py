"""Indexing on Ray Data (rag/ray_index.py): the same index as in process, incremental, and safe to kill.

One local 2-CPU Ray cluster serves the module (started here, shut down at the end, checked gone); the CLI runs
connect to it by address. The kill tests start their own local clusters in a subprocess and kill them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from rag.chunk import ChunkConfig
from rag.index import Index, update_index
from rag.ray_index import OBJECT_STORE, update_index_ray
from tests.conftest import SMALL_CHUNKS, write_corpus

ray = pytest.importorskip("ray")  # an optional extra (pyproject `scale`): skip without it



def env(**extra: str) -> dict:
    """This process's environment now: after ray.init it holds the cluster's RAY_AUTH_MODE (token auth)."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **extra}

QUERIES = ["How long can I return a device?", "price of the Plus plan", "when does the Ghent office open"]


def ray_pids(root: int | None = None, everything: bool = False) -> set[int]:
    """Pids of live raylet / gcs_server processes; with ``root``, only its descendants (``everything``: all of
    them, Ray's workers too, which run in sessions of their own)."""
    parent, names = {}, {}
    for p in Path("/proc").iterdir():
        try:
            stat = (p / "stat").read_text()
            if p.name.isdigit() and stat.rsplit(")", 1)[1].split()[0] != "Z":
                parent[int(p.name)] = int(stat.rsplit(")", 1)[1].split()[1])
                names[int(p.name)] = (p / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except (OSError, IndexError):
            continue

    def under(pid: int) -> bool:
        while pid > 1:
            pid = parent.get(pid, 0)
            if pid == root:
                return True
        return False

    return {p for p, n in names.items() if (everything or n.endswith(("/raylet", "/gcs_server")))
            and (root is None or under(p))}


def zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def wait_gone(pids: set[int], timeout: float = 30) -> set[int]:
    deadline = time.monotonic() + timeout
    while (left := {p for p in pids if Path(f"/proc/{p}").exists() and not zombie(p)}) and time.monotonic() < deadline:
        time.sleep(0.3)
    return left


@pytest.fixture(scope="module")
def cluster():
    """A local 2-CPU cluster; yields its address. Shut down at the end, and its raylet and GCS must be gone."""
    before, auth = ray_pids(), os.environ.get("RAY_AUTH_MODE")
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=OBJECT_STORE, logging_level=logging.WARNING)
    ours = ray_pids() - before
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
        if auth is None:  # ray.init set it for this process; later test modules start no cluster
            os.environ.pop("RAY_AUTH_MODE", None)
        assert not wait_gone(ours), "the test cluster's raylet / gcs_server outlived ray.shutdown()"


def same_index(a: Index, b: Index) -> None:
    assert list(a.chunks) == list(b.chunks) and a.ids == b.ids  # the same chunk ids, in the same order
    assert [a.chunks[c] for c in a.chunks] == [b.chunks[c] for c in b.chunks]  # texts, spans, headers, parents
    assert a.tokens == b.tokens
    np.testing.assert_allclose(a.vectors, b.vectors, atol=1e-5)
    assert a.manifest["documents"] == b.manifest["documents"]
    for q in QUERIES:
        assert [c for c, _ in a.search_bm25(q, 5)] == [c for c, _ in b.search_bm25(q, 5)]
        assert [c for c, _ in a.search_dense(q, 5)] == [c for c, _ in b.search_dense(q, 5)]


def rag_index(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rag", "index", *args], capture_output=True, text=True, env=env(),
                          timeout=300, **kw)


def test_cli_on_a_cluster_equals_in_process(cluster, tmp_path):
    """`rag index --ray ADDRESS` (hierarchical chunks: parents are stored, not embedded) gives the in-process index,
    and prints the same summary line."""
    docs = write_corpus(tmp_path / "docs")
    flags = ["--docs", str(docs), "--chunker", "hierarchical", "--chunk-size", "30", "--overlap", "5",
             "--parent-size", "60"]
    local = rag_index(*flags, "--index-dir", str(tmp_path / "local"))
    out = rag_index(*flags, "--index-dir", str(tmp_path / "ray"), "--ray", cluster, "--ray-workers", "2")
    assert out.returncode == 0, out.stderr[-2000:]
    summary = [ln for ln in out.stdout.splitlines() if ln.startswith("index ")]
    assert summary and summary[0].split(" in ")[0] == local.stdout.splitlines()[-1].split(" in ")[0].replace(
        str(tmp_path / "local"), str(tmp_path / "ray")), (summary, local.stdout)
    a, b = Index.load(tmp_path / "local"), Index.load(tmp_path / "ray")
    assert any(not c.indexed for c in b.chunks.values())  # parents were there to get wrong
    same_index(a, b)


def test_incremental_equals_in_process(cluster, tmp_path):
    """Edit one file: only its chunks go through Ray, and the result is the in-process incremental index."""
    docs = write_corpus(tmp_path / "docs")
    cfg = ChunkConfig(**SMALL_CHUNKS)
    update_index(docs, tmp_path / "local", cfg, "minilm", progress=False)
    first, s0 = update_index_ray(docs, tmp_path / "ray", cfg, "minilm", progress=False)  # the fixture's cluster
    same_index(Index.load(tmp_path / "local"), first)
    assert s0.embedded_chunks == s0.chunks and s0.added == 5
    (docs / "returns.md").write_text("# Returns policy\n\n## Window\n\nCustomers may return a device within 60 "
                                     "days of delivery, or 90 days for members.\n", encoding="utf-8")
    a, sa = update_index(docs, tmp_path / "local", cfg, "minilm", progress=False)
    b, sb = update_index_ray(docs, tmp_path / "ray", cfg, "minilm", progress=False)
    edited = [c for c in b.ids if c.startswith("returns.md#")]
    assert (sb.changed, sb.added, sb.unchanged, sb.embedded_chunks) == (1, 0, 4, len(edited)) == (
        sa.changed, sa.added, sa.unchanged, sa.embedded_chunks)
    kept = [i for i, c in enumerate(b.ids) if not c.startswith("returns.md#")]
    np.testing.assert_array_equal(b.vectors[kept], first.vectors[[first.ids.index(b.ids[i]) for i in kept]])
    same_index(a, b)
    assert "60 days" in b.chunks[b.search_bm25("how many days to return a device", 1)[0][0]].text
    os.utime(docs / "history.md", (1e9, 1e9))  # a new file time only: a version is written, nothing embedded
    c, sc = update_index_ray(docs, tmp_path / "ray", cfg, "minilm", progress=False)
    assert (sc.wrote, sc.metadata, sc.embedded_chunks) == (True, 1, 0) and c.ids == b.ids


def test_user_mistakes_are_one_line(tmp_path, monkeypatch):
    docs = write_corpus(tmp_path / "docs")
    out = rag_index("--docs", str(docs), "--index-dir", str(tmp_path / "i"), "--ray", "--ray-workers", "0")
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0 and "--ray-workers" in out.stderr
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as when it is not installed
    with pytest.raises(Exception, match=r'pip install "ray\[data\]"'):
        update_index_ray(docs, tmp_path / "i", ChunkConfig(**SMALL_CHUNKS), "minilm", progress=False, address="x")


def generated(root: Path, n: int) -> Path:
    """``n`` Markdown files of ~500 words (about 7 chunks each at the default size)."""
    words = ("water lawn garden pump valve sensor zone schedule warranty return refund plan price office ghent "
             "engineer garage moisture probe delivery month annual").split()
    rng = np.random.default_rng(0)
    for i in range(n):
        paras = ["## Part\n\n" + " ".join(rng.choice(words, 60)) + "." for _ in range(8)]
        p = root / f"gen{i // 50}" / f"doc{i}.md"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(f"# Document {i}\n\n" + "\n\n".join(paras) + "\n", encoding="utf-8")
    return root


def start_and_kill(docs: Path, index_dir: Path, kill_cluster_only: bool) -> subprocess.Popen:
    """Start `rag index --ray` (its own local cluster) in a new session; once the pipeline runs, SIGKILL either
    the whole process group or only the Ray cluster it started (the driver then has to fail on its own)."""
    p = subprocess.Popen([sys.executable, "-m", "rag", "index", "--docs", str(docs), "--index-dir", str(index_dir),
                          "--ray", "--ray-workers", "2"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, start_new_session=True,
                         env=env(RAY_gcs_rpc_server_reconnect_timeout_s="5"))  # the default waits 60 s for a dead GCS
    try:
        for line in p.stdout:
            if "Running Dataset" in line:  # Ray Data's first progress report: the work has started
                break
        time.sleep(1)
        assert p.poll() is None, "the run finished before it could be killed; make the corpus bigger"
        started, tree = ray_pids(p.pid), ray_pids(p.pid, everything=True)
        assert started, "the run started no raylet / gcs_server of its own"
        if kill_cluster_only:  # all of the cluster: its raylet and GCS would leave their agents behind for minutes
            for pid in tree:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            p.communicate(timeout=120)
            assert p.returncode != 0
        else:  # the group holds the driver, GCS and raylet; Ray's workers run in sessions of their own
            os.killpg(p.pid, signal.SIGKILL)
            for pid in tree:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            p.wait(timeout=30)
        assert not wait_gone(tree), "Ray processes (raylet, gcs_server, workers) left running after the kill"
        return p
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)


def test_killed_midway_keeps_the_previous_index(cluster, tmp_path):
    """Kill the Ray cluster under a run, then the whole run: the previous index still loads and searches, no
    partial version is published, and a re-run completes."""
    docs = write_corpus(tmp_path / "docs")
    cfg = ChunkConfig()
    before, _ = update_index(docs, tmp_path / "index", cfg, "minilm", progress=False)
    live = (tmp_path / "index" / "CURRENT").read_text()
    generated(docs / "more", 20)
    for kill_cluster_only in (True, False):
        start_and_kill(docs, tmp_path / "index", kill_cluster_only)
        assert (tmp_path / "index" / "CURRENT").read_text() == live
        old = Index.load(tmp_path / "index")
        assert old.ids == before.ids and old.search_dense("return a device", 1)
    after, stats = update_index_ray(docs, tmp_path / "index", cfg, "minilm", progress=False)
    assert stats.wrote and (stats.added, stats.unchanged) == (20, 5)
    assert len(after.manifest["documents"]) == 25 and after.search_bm25("moisture probe", 1)
    assert sorted(p.name for p in (tmp_path / "index").iterdir() if p.name.startswith(("v-", ".tmp-"))) == [
        (tmp_path / "index" / "CURRENT").read_text().strip()]  # nothing left of the killed runs
