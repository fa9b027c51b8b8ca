"""Pictures from the runs' JSON: bench charts beside RESULTS.md and linked from it, the eval's abstention plot."""

from __future__ import annotations

import copy
import json
import math
import re
import shutil
import struct
from pathlib import Path

import pytest

from bench.charts import write_charts
from bench.report import render
from rag.plots import abstention_plot, threshold_curve
from rag.plots import main as plots_main

RESULTS = Path("bench/results")
EVAL_DEMO = Path("docs/results/eval-demo.json")
PNG = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    """Width and height of a valid PNG (signature, then the IHDR chunk), or an AssertionError."""
    data = path.read_bytes()
    assert data[:8] == PNG, f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def drawn(path: Path) -> bool:
    """Whether a PNG has real content: many distinct colours, not a blank canvas."""
    from matplotlib.image import imread

    img = imread(path)
    return len({tuple(p) for p in img.reshape(-1, img.shape[-1])[::7].round(2).tolist()}) > 20


def links(md: Path) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md.read_text(encoding="utf-8"))


def test_bench_report_draws_and_links_a_chart_per_section(tmp_path):
    from bench.__main__ import main

    shutil.copytree(RESULTS, tmp_path / "results")  # the real results, as `make bench` leaves them
    md = tmp_path / "RESULTS.md"
    assert main(["--report", str(tmp_path / "results"), "--markdown", str(md)]) == 0
    found = links(md)
    assert found == ["RESULTS-scale.png", "RESULTS-generation.png", "RESULTS-training.png"]  # in section order
    for name in found:
        w, h = png_size(md.parent / name)  # the link resolves, beside the markdown
        assert w >= 800 and h >= 300, (name, w, h)
        assert (md.parent / name).stat().st_size > 20_000 and drawn(md.parent / name), name
    # each chart sits under its own section's table
    text = md.read_text(encoding="utf-8")
    assert text.index("## 2. Scale") < text.index("RESULTS-scale.png") < text.index("## 3. Backends")


def test_a_failed_section_gets_no_chart_and_no_link(tmp_path):
    res = json.loads((RESULTS / "2026-11-26-vm.json").read_text(encoding="utf-8"))
    res = copy.deepcopy(res)
    res["sections"]["training"] = {"error": "RuntimeError: out of memory"}
    res["sections"]["scale"]["sizes"]["100000"] = {"error": "MemoryError: "}  # the smaller sizes still plot
    res["sections"]["generation"]["variants"] = {"fp32": {"error": "boom"}}
    charts = write_charts(res, tmp_path / "R.md")
    assert charts == {"scale": "R-scale.png"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["R-scale.png"]
    md = tmp_path / "R.md"
    md.write_text(render(res, "x.json", charts), encoding="utf-8")
    assert links(md) == ["R-scale.png"] and "Failed: `RuntimeError: out of memory`" in md.read_text()


def test_threshold_curve_counts_ties_together():
    # abstain when score < t; t just above 0.2 catches q3 only, just above 0.5 the tied q1 and q2 as well
    curve = threshold_curve([0.5, 0.5, 0.2, 0.9], [True, False, True, False])
    assert curve == [(0.2, 1.0, 0.5), (0.5, pytest.approx(2 / 3), 1.0), (0.9, 0.5, 1.0)]
    # the plot scores a question without the signal as infinite: it never abstains, so recall stops at 1 of 2
    assert threshold_curve([math.inf, 0.3, 0.6], [True, True, False])[:2] == [(0.3, 1.0, 0.5), (0.6, 0.5, 0.5)]


def test_abstention_plot_from_the_demo_eval(tmp_path, capsys):
    assert plots_main([str(EVAL_DEMO), str(tmp_path / "pr.png")]) == 0
    assert png_size(tmp_path / "pr.png")[0] >= 800 and drawn(tmp_path / "pr.png")
    assert "wrote" in capsys.readouterr().out
    # nothing to plot without both kinds of question: no file, and the command says why
    d = json.loads(EVAL_DEMO.read_text(encoding="utf-8"))
    d["per_question"] = [r for r in d["per_question"] if r["expected_answer"] is not None]
    assert abstention_plot(d, tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()
    (tmp_path / "answerable.json").write_text(json.dumps(d))
    assert plots_main([str(tmp_path / "answerable.json")]) == 1
    assert "both answerable and unanswerable" in capsys.readouterr().err


GOLDEN = [
    {"id": "t1", "question": "Within how many days can a device be returned?", "answer": "45 days",
     "aliases": ["45"], "sources": ["returns.md"], "split": "train"},
    {"id": "t2", "question": "What is the boiling point of lead?", "answer": None, "split": "train"},
    {"id": "t3", "question": "How long is the return window for a device?", "answer": "45 days",
     "aliases": ["45"], "sources": ["returns.md"], "split": "test"},
    {"id": "t4", "question": "When does the Ghent office open?", "answer": "08:30", "sources": ["office.html"],
     "split": "test"},
    {"id": "t5", "question": "Who won the 1998 football world cup?", "answer": None, "split": "test"},
]


def test_rag_eval_json_writes_the_abstention_plot_beside_it(corpus, tmp_path):
    from rag.cli import main

    out = tmp_path / "reports" / "eval.json"
    (tmp_path / "golden.jsonl").write_text("\n".join(json.dumps(q) for q in GOLDEN) + "\n")
    assert main(["eval", "--docs", str(corpus), "--index-dir", str(tmp_path / "ix"), "--chunk-size", "40",
                 "--overlap", "5", "--model", "smollm2-135m", "--golden", str(tmp_path / "golden.jsonl"),
                 "--json", str(out)]) == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["eval-abstention.png", "eval.json"]
    assert png_size(out.parent / "eval-abstention.png")[0] >= 800 and drawn(out.parent / "eval-abstention.png")
    # the plot reads what the report records: every test question's signals and whether it was answerable
    rows = json.loads(out.read_text())["per_question"]
    assert [(r["id"], r["expected_answer"] is None) for r in rows] == [("t3", False), ("t4", False), ("t5", True)]
    assert all({"rerank", "dense"} <= set(r["signals"]) for r in rows)  # BM25 is absent when no query word occurs
