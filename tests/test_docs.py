"""README tables come from the runs' JSON: they match it, and a number edited by hand is caught."""

from __future__ import annotations

from pathlib import Path

from bench.readme import MARKER, TABLES, main


def test_readme_tables_match_their_json():
    names = [m["name"] for m in MARKER.finditer(Path("README.md").read_text(encoding="utf-8"))]
    assert names and set(names) <= set(TABLES)
    assert main(["--check"]) == 0


def test_a_number_edited_by_hand_fails_the_check(tmp_path, capsys):
    text = Path("README.md").read_text(encoding="utf-8")
    body = next(MARKER.finditer(text))["body"]
    i = body.index("0.")  # the first number of the first rendered table
    edited = body[:i] + ("1" if body[i] != "1" else "2") + body[i + 1:]
    (tmp_path / "README.md").write_text(text.replace(body, edited), encoding="utf-8")
    assert main(["--readme", str(tmp_path / "README.md"), "--check"]) == 1
    assert "make docs" in capsys.readouterr().err
    assert main(["--readme", str(tmp_path / "README.md")]) == 0  # make docs puts the JSON's number back
    assert (tmp_path / "README.md").read_text(encoding="utf-8") == text


def test_the_seeds_table_renders_what_compare_seeds_computes():
    import json

    from bench.readme import seeds
    from hybrid.seeds import spread

    d = json.loads(Path("docs/results/compare-demo-qwen-1.5b.json").read_text(encoding="utf-8"))
    sy, diff = d["systems"], d["differences"]
    # two real summaries standing in for two seeds of one system: the table must show both and their spread
    v = spread([sy["finetuned"], sy["hybrid"]], [diff["finetuned"], diff["hybrid"]])
    table = seeds(d | {"seeds": {"finetuned": v}, "_path": "x.json"})
    row = next(line for line in table.splitlines() if line.startswith("| fine-tuned |"))
    a, b = sy["finetuned"]["contains"]["mean"], sy["hybrid"]["contains"]["mean"]
    assert f"{(a + b) / 2:.3f} ± {v['contains']['sd']:.3f} [{min(a, b):.3f}, {max(a, b):.3f}]" in row
    assert f"{a:.3f}, {b:.3f}" in row and v["contains"]["sd"] > 0
    assert f"{diff['finetuned']['contains']['diff']:+.3f}, {diff['hybrid']['contains']['diff']:+.3f}" in row
    sig = diff["finetuned"]["contains"]["significant"] + diff["hybrid"]["contains"]["significant"]
    assert f"| {sig} of 2 |" in row
    h = [diff[s]["hallucination_rate"]["significant"] for s in ("finetuned", "hybrid")]
    assert row.endswith(f" ({sum(h)} of 2) |")
