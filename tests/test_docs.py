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
