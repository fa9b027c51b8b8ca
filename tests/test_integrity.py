"""Index integrity: concurrent writers serialise, cleanup spares what CURRENT names and what a reader is
loading, crashed runs' debris goes on the next run, and a flipped byte is caught by the manifest's checksums.

The racing tests start real `python -m rag index` processes on one index folder (a few seconds each).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from rag.chunk import ChunkConfig
from rag.index import FILES, Index, IndexDamaged, sweep_debris, update_index
from tests.conftest import SMALL_CHUNKS, TINY, copy_index, write_corpus

CHUNKS = ChunkConfig(**SMALL_CHUNKS)
FLAGS = ["--chunk-size", str(CHUNKS.size), "--overlap", str(CHUNKS.overlap)]


@pytest.fixture
def index(small_index, tmp_path) -> tuple[Path, Path]:
    return copy_index(small_index, tmp_path)


def live(index: Path) -> Path:
    return index / (index / "CURRENT").read_text().strip()


def versions(index: Path) -> list[str]:
    return sorted(p.name for p in index.iterdir() if p.name.startswith(("v-", ".tmp-")))


def warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


# --- checksums -----------------------------------------------------------------------------------------------------

def test_manifest_lists_each_files_size_and_sha256(index):
    _, index = index
    manifest = json.loads((live(index) / "manifest.json").read_text())
    assert sorted(manifest["files"]) == sorted(FILES)
    for name, meta in manifest["files"].items():
        data = (live(index) / name).read_bytes()
        assert meta == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


@pytest.mark.parametrize("name", FILES)
def test_a_flipped_byte_is_detected_and_rebuilt_with_a_warning(index, caplog, name):
    docs, index = index
    path = live(index) / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size; in chunks.jsonl and tokens.json a letter becomes another letter
    path.write_bytes(bytes(data))
    with pytest.raises(IndexDamaged, match=f"{name}: sha256 differs from the manifest's"):
        Index.load(index)
    _, stats = update_index(docs, index, CHUNKS, "minilm", progress=False)
    assert stats.wrote and stats.added == len(TINY)
    assert [m for m in warnings(caplog) if f"{name}: sha256 differs" in m and "rebuilding it" in m]
    assert Index.load(index).search_bm25("45 days", 1)[0][0].startswith("returns.md")


def test_a_manifest_naming_a_file_outside_the_version_is_damage(index):
    _, index = index
    path = live(index) / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["files"]["../../secret"] = {"bytes": 1, "sha256": "0"}
    path.write_text(json.dumps(manifest))
    with pytest.raises(IndexDamaged, match="unknown file '../../secret'"):
        Index.load(index)


def test_an_index_written_before_checksums_still_loads(index):
    _, index = index
    path = live(index) / "manifest.json"
    manifest = json.loads(path.read_text())
    del manifest["files"]
    path.write_text(json.dumps(manifest))
    assert Index.load(index).search_bm25("45 days", 1)[0][0].startswith("returns.md")


# --- cleanup -------------------------------------------------------------------------------------------------------

def test_cleanup_keeps_the_version_current_names(index):
    _, index = index
    name = live(index).name
    (index / "v-older").mkdir()
    (index / ".tmp-v-crashed").mkdir()
    (index / ".CURRENT.tmp").write_text("v-older\n")
    sweep_debris(index)
    assert versions(index) == [name]
    # another writer switched CURRENT to a newer version after this one wrote its own: that one is kept
    shutil.copytree(index / name, index / "v-newer")
    (index / "CURRENT").write_text("v-newer\n")
    sweep_debris(index)
    assert versions(index) == ["v-newer"] and Index.load(index).path.name == "v-newer"


def test_debris_of_crashed_runs_goes_on_the_next_run_even_with_nothing_to_write(index):
    docs, index = index
    name = live(index).name
    (index / ".tmp-v-killed").mkdir()
    (index / ".tmp-v-killed" / "vectors.npy").write_bytes(b"0" * 1000)
    shutil.copytree(index / name, index / "v-orphan")  # renamed into place, killed before CURRENT switched
    _, stats = update_index(docs, index, CHUNKS, "minilm", progress=False)
    assert not stats.wrote and versions(index) == [name]


def test_old_version_stays_while_a_reader_is_loading(index):
    from rag.atomic import readers_lock

    docs, index = index
    old = live(index).name
    (docs / "returns.md").write_text("# Returns\n\nReturns within 90 days.\n")
    with readers_lock(index):  # another process is between reading CURRENT and opening the version's files
        update_index(docs, index, CHUNKS, "minilm", progress=False)
        assert old in versions(index) and live(index).name != old
    (docs / "new.md").write_text("# New\n\nRain gauges.\n")
    update_index(docs, index, CHUNKS, "minilm", progress=False)
    assert versions(index) == [live(index).name]


# --- concurrent writers --------------------------------------------------------------------------------------------

# each racer imports everything, says it is ready, waits for the go file, then runs the real CLI; the pause between
# switching CURRENT and cleaning up is the window in which the unlocked version deleted the live index
RACER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import rag.index as ix
    from rag.cli import main
    sweep = ix.sweep_debris
    def slow_sweep(root):
        time.sleep({pause})
        sweep(root)
    ix.sweep_debris, ix.LOCK_TIMEOUT = slow_sweep, {timeout}
    ready, go = Path(sys.argv[1]), Path(sys.argv[2])
    ready.touch()
    while not go.exists():
        time.sleep(0.01)
    sys.exit(main(sys.argv[3:]))
""")


def race(tmp_path: Path, runs: list[list[str]], pause: float = 1.0, timeout: float = 60) -> list[tuple[int, str]]:
    """(exit code, stderr) of each racer, started together."""
    script = RACER.format(pause=pause, timeout=timeout)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path.cwd())}
    procs = []
    for i, argv in enumerate(runs):
        procs.append(subprocess.Popen([sys.executable, "-c", script, str(tmp_path / f"ready{i}"), str(tmp_path / "go"),
                                       *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready{i}").exists() for i in range(len(runs))) and time.monotonic() < deadline:
        time.sleep(0.05)
    (tmp_path / "go").touch()
    return [(p.wait(timeout=90), p.communicate()[1]) for p in procs]


def test_concurrent_writers_serialise_and_the_live_version_survives(tmp_path):
    folders = [write_corpus(tmp_path / name, {f"{name}.md": f"# {name}\n\nThe {name} fact is {i}.\n"})
               for i, name in enumerate(("alpha", "beta", "gamma"))]
    index = tmp_path / "index"
    results = race(tmp_path, [["index", "--docs", str(d), "--index-dir", str(index), *FLAGS] for d in folders])
    for rc, err in results:
        assert rc == 0 and "Traceback" not in err, err
    waited = [err for _, err in results if f"waiting for another openbook writer on {index}" in err]
    assert len(waited) >= 1  # started together: at least one found the lock taken
    loaded = Index.load(index)  # CURRENT names a complete version, the only one left
    assert versions(index) == [loaded.path.name]
    assert list(loaded.manifest["documents"]) == [Path(loaded.manifest["docs_dir"]).name + ".md"]


def test_a_writer_that_waits_too_long_gives_one_line(index, tmp_path):
    from rag.atomic import writer_lock

    docs, index = index
    with writer_lock(index, timeout=1):  # this test process is the other writer
        (rc, err), = race(tmp_path, [["index", "--docs", str(docs), "--index-dir", str(index), *FLAGS]], timeout=1)
    lines = err.strip().splitlines()
    assert rc == 2 and "Traceback" not in err, err
    assert lines[0] == f"WARNING: waiting for another openbook writer on {index} (up to 1 s)"
    assert lines[-1] == (f"error: another openbook writer has held {index} for over 1 s; wait for it to finish, "
                         "or pass another --index-dir")


# --- kill -9 in the middle of a write ------------------------------------------------------------------------------

# a writer that stalls at one step of write_version (marking that it got there) so the test can SIGKILL it there
KILLEE = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    import numpy as np
    import rag.index as ix
    from rag.cli import main
    point, marker = sys.argv[1], Path(sys.argv[2])
    def stall():
        marker.touch()
        time.sleep(120)
    save, replace, sweep, calls = np.save, os.replace, ix.sweep_debris, []
    def half_save(path, arr, *a, **k):  # half the vectors on disk, then stop
        with open(path, "wb") as f:
            f.write(b"\\x93NUMPY" + b"\\0" * 64)
            f.flush()
        stall()
    if point == "vectors":
        np.save = half_save
    elif point == "fsync":
        ix.os.fsync = lambda fd: stall()
    elif point == "current":
        ix.os.replace = lambda src, dst: stall() if Path(dst).name == "CURRENT" else replace(src, dst)
    elif point == "sweep":  # the first sweep clears debris before writing; the second follows the switch
        ix.sweep_debris = lambda root: stall() if calls.append(root) or len(calls) > 1 else sweep(root)
    sys.exit(main(sys.argv[3:]))
""")


@pytest.mark.parametrize("point,published", [("vectors", False), ("fsync", False), ("current", False),
                                             ("sweep", True)])
def test_kill_9_mid_write_leaves_a_loadable_index_and_the_next_run_mends_it(index, tmp_path, point, published):
    docs, index = index
    before = live(index)
    (docs / "kill.md").write_text("# Zoo\n\nThe kill-test fact is 77 zebras.\n", encoding="utf-8")
    marker = tmp_path / "stalled"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path.cwd())}
    proc = subprocess.Popen([sys.executable, "-c", KILLEE, point, str(marker), "index", "--docs", str(docs),
                             "--index-dir", str(index), *FLAGS], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    deadline = time.monotonic() + 120
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists(), proc.communicate()[1] if proc.poll() is not None else "the writer never got there"
    proc.kill()  # SIGKILL: no handler, no finally, no cleanup; the kernel drops its lock
    proc.wait()
    loaded = Index.load(index)  # CURRENT names a complete version, old or new: never a torn one
    zebras = any("zebras" in c.text for c in loaded.chunks.values())
    assert zebras == published and (loaded.path == before) != published
    _, stats = update_index(docs, index, CHUNKS, "minilm", progress=False)  # clears the debris, finishes the job
    final = Index.load(index)
    assert any("zebras" in c.text for c in final.chunks.values())
    assert versions(index) == [final.path.name]
