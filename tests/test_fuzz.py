"""The fast fuzz variant: 12 hostile folders from ``tests/fuzz.py`` indexed by the real CLI (~40 s);
`make fuzz` runs 120 and the web page's load test."""

from __future__ import annotations

import json
import os
import shutil

from tests.fuzz import KINDS, make_case, remove, run, run_case

CHECKS = ("tracebacks", "hangs", "leaks", "errors", "good_missing")


def tree(root) -> dict:
    """Every entry under root: relative byte path -> file bytes, link target or a kind."""
    out = {}
    for top, dirs, files in os.walk(os.fsencode(root)):
        for name in dirs + files:
            path = os.path.join(top, name)
            rel = os.path.relpath(path, os.fsencode(root))
            if os.path.islink(path):
                out[rel] = b"-> " + os.readlink(path)
            elif os.path.isdir(path):
                out[rel] = "dir"
            elif os.path.isfile(path):
                with open(path, "rb") as f:
                    out[rel] = f.read()
            else:
                out[rel] = "special"  # a FIFO or a socket: opening a FIFO would block
    return out


def test_twelve_hostile_folders_index_cleanly(tmp_path):
    summary = run(tmp_path, cases=12, seed=17, log=lambda line: None)
    assert summary["cases"] == 12 and sorted(summary["kinds"]) == sorted(KINDS)
    assert {k: summary[k] for k in CHECKS} == dict.fromkeys(CHECKS, 0), json.dumps(summary["failures"], indent=1)
    assert summary["passed"] == 12


def test_the_leak_check_can_fail(tmp_path):
    case = make_case(tmp_path, 0, seed=17)
    shutil.copy(case["dir"] / "outside" / "secret.md", case["dir"] / "docs" / "copied-in.md")
    try:
        assert "leak" in run_case(case)["problems"]
    finally:
        remove(case["dir"])
    assert not case["dir"].exists()


def test_a_seed_makes_the_same_folders(tmp_path):
    n = list(KINDS).index("names_bytes")
    a, b = make_case(tmp_path / "a", n, seed=5), make_case(tmp_path / "b", n, seed=5)
    assert a["kinds"] == b["kinds"] and a["good"] == b["good"] and tree(a["dir"]) == tree(b["dir"])
    assert make_case(tmp_path / "c", n, seed=6)["good"] != a["good"]
