"""rag.ingest on tiny real corpora written into tmp_path: one format or one bad-file case per test."""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
from pathlib import Path

import pytest
from fpdf import FPDF
from fpdf.enums import EncryptionMethod

from rag.ingest import IngestError, load_file, load_folder

REPO = Path(__file__).resolve().parents[1]


def write(root: Path, rel: str, data: str | bytes) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode("utf-8")
    path.write_bytes(data)
    return path


def by_id(root: Path) -> dict:
    return {d.id: d for d in load_folder(root, progress=False)}


def skipped(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "rag.ingest" and r.levelno == logging.WARNING]


def test_markdown_kept_with_crlf_and_bom_normalised(tmp_path):
    path = write(tmp_path, "policies/returns-v2.md", "\ufeff# Returns\r\n\r\nWithin **30 days**.\r\n")
    doc = by_id(tmp_path)["policies/returns-v2.md"]
    assert doc.title == "Returns"
    assert doc.text == "# Returns\n\nWithin **30 days**."
    assert doc.path == str(path.absolute())
    assert doc.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert doc.mtime == path.stat().st_mtime


def test_plain_text_setext_headings_become_atx(tmp_path):
    write(tmp_path, "guide.txt", "Install Guide\n=============\n\nPlug it in.\n\nSafety\n------\nKeep dry.\n")
    doc = by_id(tmp_path)["guide.txt"]
    assert doc.title == "Install Guide"
    assert doc.text == "# Install Guide\n\nPlug it in.\n\n## Safety\n\nKeep dry."


def test_title_falls_back_to_first_line(tmp_path):
    write(tmp_path, "notes.txt", "Quarterly notes\nNothing else.\n")
    assert by_id(tmp_path)["notes.txt"].title == "Quarterly notes"


HTML = """<!doctype html><html><head><title>Fees | Acme</title><script>var tracking = 1;</script>
<style>p { color: red }</style></head><body>
<header><a href="/">Acme home</a></header>
<nav><a href="/a">Site menu link</a></nav>
<div role="navigation">Breadcrumb trail</div>
<main><article>
  <header><h1>Shipping fees</h1></header>
  <p>Orders ship from <b>Rotterdam</b> within <a href="#">two days</a>.</p>
  <h2>Rates</h2>
  <ul><li>Free over 50 EUR</li><li>Express on request</li></ul>
  <table><tr><th>Zone</th><th>Fee</th><th>Days</th></tr>
         <tr><td>EU</td><td>4.90 EUR</td><td>2</td></tr>
         <tr><td>World</td><td>19 EUR</td><td>7</td></tr></table>
</article></main>
<aside>Related: careers</aside>
<footer>Copyright Acme 2024</footer>
<script>console.log("late script")</script>
</body></html>"""


def test_html_boilerplate_removed_headings_lists_and_table_rows_kept(tmp_path):
    write(tmp_path, "web/fees.html", HTML)
    doc = by_id(tmp_path)["web/fees.html"]
    assert doc.title == "Fees | Acme"
    chrome = ("tracking", "color", "Acme home", "Site menu", "Breadcrumb", "careers", "Copyright", "late")
    assert [text for text in chrome if text in doc.text] == []
    assert doc.text.startswith("# Shipping fees\n\n")  # an article's own <header> is content
    assert "Orders ship from Rotterdam within two days." in doc.text
    assert "\n## Rates\n" in doc.text
    assert "- Free over 50 EUR\n\n- Express on request" in doc.text
    lines = doc.text.split("\n")
    assert "| Zone | Fee | Days |" in lines
    assert "| EU | 4.90 EUR | 2 |" in lines  # a fact stays on one row, under its column headers
    assert lines.index("| Zone | Fee | Days |") + 2 == lines.index("| EU | 4.90 EUR | 2 |")


def test_html_page_header_kept_when_it_holds_the_only_h1(tmp_path):
    write(tmp_path, "p.html", "<body><header><nav>Menu</nav><h1>Travel policy</h1><p>Owner: Finance, v4.1</p>"
          "</header><main><h2>Trains</h2><p>Second class.</p></main><footer>Imprint</footer></body>")
    doc = by_id(tmp_path)["p.html"]
    assert doc.text == "# Travel policy\n\nOwner: Finance, v4.1\n\n## Trains\n\nSecond class."


def test_html_title_from_h1_when_no_title_tag(tmp_path):
    write(tmp_path, "a.htm", "<body><h1>Leave policy</h1><p>Twenty days.</p></body>")
    doc = by_id(tmp_path)["a.htm"]
    assert (doc.title, doc.text) == ("Leave policy", "# Leave policy\n\nTwenty days.")


def tiny_pdf(path: Path, title: str | None = None) -> None:
    pdf = FPDF()
    if title:
        pdf.set_title(title)
    pdf.add_page()
    for style, size, text in [("B", 20, "Warranty Terms"), ("", 11, "The warranty lasts 24 months. " * 6),
                              ("B", 15, "Claims"), ("", 11, "Send the serial number to support.")]:
        pdf.set_font("Helvetica", style, size)
        pdf.multi_cell(0, size * 0.55, text, new_x="LMARGIN", new_y="NEXT")
        pdf.ln(4)
    path.parent.mkdir(parents=True, exist_ok=True)
    pdf.output(str(path))


def test_pdf_headings_from_font_size_and_body_text(tmp_path):
    tiny_pdf(tmp_path / "legal/warranty.pdf")
    doc = by_id(tmp_path)["legal/warranty.pdf"]
    assert doc.title == "Warranty Terms"  # no metadata title: the first heading
    blocks = doc.text.split("\n\n")
    assert blocks[0] == "# Warranty Terms"
    assert blocks[1] == ("The warranty lasts 24 months. " * 6).strip()  # wrapped lines joined back
    assert blocks[2:] == ["## Claims", "Send the serial number to support."]


def test_pdf_title_from_metadata(tmp_path):
    tiny_pdf(tmp_path / "w.pdf", title="Warranty (2024 edition)")
    assert by_id(tmp_path)["w.pdf"].title == "Warranty (2024 edition)"


def test_password_protected_pdf_skipped_but_permission_only_encryption_read(tmp_path, caplog):
    for name, user_password in (("locked.pdf", "secret"), ("open.pdf", None)):
        pdf = FPDF()
        pdf.set_encryption(owner_password="owner", user_password=user_password,
                           encryption_method=EncryptionMethod.RC4)
        pdf.add_page()
        pdf.set_font("Helvetica", size=11)
        pdf.cell(0, 5, f"Text of {name}")
        pdf.output(str(tmp_path / name))
    assert by_id(tmp_path)["open.pdf"].text == "Text of open.pdf"
    assert "locked.pdf" not in by_id(tmp_path)
    assert any(m.startswith("skipping locked.pdf: encrypted PDF") for m in skipped(caplog))


def test_broken_pdf_skipped_with_warning(tmp_path, caplog):
    write(tmp_path, "ok.md", "# Fine\n\nText.")
    write(tmp_path, "broken.pdf", b"%PDF-1.4\nthis is not really a pdf\n")
    assert list(by_id(tmp_path)) == ["ok.md"]
    assert [m for m in skipped(caplog) if m.startswith("skipping broken.pdf: ")]


def test_binary_and_empty_files_skipped_with_one_warning_each(tmp_path, caplog):
    write(tmp_path, "ok.md", "# Fine\n\nText.")
    write(tmp_path, "image.txt", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    write(tmp_path, "empty.md", " \n\t\n")
    assert list(by_id(tmp_path)) == ["ok.md"]
    messages = skipped(caplog)
    assert len(messages) == 2
    assert any(m.startswith("skipping image.txt: binary") for m in messages)
    assert any(m.startswith("skipping empty.md: empty") for m in messages)


def test_unsupported_extension_skipped_silently(tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger="rag.ingest")
    write(tmp_path, "ok.md", "Text.")
    write(tmp_path, "sheet.xlsx", b"PK\x03\x04")
    assert list(by_id(tmp_path)) == ["ok.md"]
    assert skipped(caplog) == []
    assert load_file(tmp_path / "sheet.xlsx", tmp_path) is None


def test_latin1_file_decoded_with_a_warning(tmp_path, caplog):
    write(tmp_path, "menu.txt", "Caf\u00e9 cr\u00e8me br\u00fbl\u00e9e \u2013 5 \u20ac\n".encode("cp1252"))
    doc = by_id(tmp_path)["menu.txt"]
    assert doc.text == "Caf\u00e9 cr\u00e8me br\u00fbl\u00e9e \u2013 5 \u20ac"
    assert any("menu.txt" in m and "UTF-8" in m for m in skipped(caplog))


def test_symlinks_outside_refused_inside_followed_once(tmp_path, caplog):
    root, outside = tmp_path / "docs", tmp_path / "outside"
    write(outside, "secret.md", "# Secret\n\nDo not index.")
    write(root, "real.md", "# Real\n\nIndexed once.")
    write(root, "sub/a.md", "# A\n\nIn a folder.")
    write(root, ".shared/linked.md", "# Linked\n\nOnly reachable through a link.")
    os.symlink(outside / "secret.md", root / "leak.md")
    os.symlink(outside, root / "leakdir")
    os.symlink(root / "real.md", root / "alias.md")
    os.symlink(root / "sub", root / "sub-alias")
    os.symlink(root, root / "sub" / "loop")  # a cycle back to the root
    os.symlink(root / ".shared" / "linked.md", root / "linked.md")
    docs = by_id(root)
    assert sorted(docs) == ["linked.md", "real.md", "sub/a.md"]  # each file once, under its real path if seen
    assert all("Secret" not in d.text for d in docs.values())
    messages = skipped(caplog)
    assert any(m.startswith("skipping leak.md: symlink to ") and "outside" in m for m in messages)
    assert any(m.startswith("skipping leakdir: symlink to ") for m in messages)


def test_hidden_files_folders_and_pycache_skipped(tmp_path):
    write(tmp_path, "visible.md", "Shown.")
    write(tmp_path, ".draft.md", "Hidden file.")
    write(tmp_path, ".git/notes.md", "Hidden folder.")
    write(tmp_path, "pkg/__pycache__/cache.txt", "Cache.")
    assert list(by_id(tmp_path)) == ["visible.md"]


def test_folder_without_readable_files_raises(tmp_path):
    write(tmp_path, "empty.txt", "")
    write(tmp_path, "data.bin", b"\x00\x01")
    with pytest.raises(IngestError, match=r"no readable \.md/\.txt/\.html/\.pdf files in "):
        load_folder(tmp_path, progress=False)


def test_missing_folder_and_file_root_raise_naming_the_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(IngestError) as err:
        load_folder(missing)
    assert str(missing) in str(err.value) and "DOCS=" in str(err.value)
    with pytest.raises(IngestError, match="not a folder"):
        load_folder(write(tmp_path, "file.md", "x"))


def test_ids_sorted_and_stable_across_loads(tmp_path):
    write(tmp_path, "b/z.md", "# Z\n\nzed")
    write(tmp_path, "a.txt", "a")
    write(tmp_path, "b/c.html", "<p>see</p>")
    first, second = load_folder(tmp_path, progress=False), load_folder(str(tmp_path), progress=False)
    assert [d.id for d in first] == ["a.txt", "b/c.html", "b/z.md"]
    assert first == second


def test_make_pdfs_is_reproducible_and_round_trips_through_ingest(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "data"))  # a script folder, not a package
    make_pdfs = importlib.import_module("make_pdfs")
    src = write(tmp_path / "src", "hw/guide.md", "# Rack Guide\n\nUse **four** screws.\n\n## Torque\n\n"
                "- Rails: hand tight\n- Cover: 1 Nm\n\n| Part | Torque |\n|---|---|\n| Rail | 4 Nm |\n\n"
                "### Steps\n\n1. Mount the rails\n2. Slide it in\n")
    assert make_pdfs.main(["--src", str(tmp_path / "src"), "--out", str(tmp_path / "out")]) == 0
    assert make_pdfs.main(["--check", "--src", str(tmp_path / "src"), "--out", str(tmp_path / "out")]) == 0
    assert make_pdfs.build(src) == make_pdfs.build(src)
    doc = by_id(tmp_path / "out")["hw/guide.pdf"]
    assert doc.title == "Rack Guide"
    assert doc.text.split("\n\n") == ["# Rack Guide", "Use four screws.", "## Torque", "- Rails: hand tight",
                                      "- Cover: 1 Nm", "Part Torque", "Rail 4 Nm",  # a paragraph per row
                                      "### Steps", "1. Mount the rails", "2. Slide it in"]
    write(tmp_path / "src", "bad.md", "# Bad\n\nAn em dash \u2014 here.\n")
    with pytest.raises(ValueError, match=r"bad\.md:3: .*U\+2014"):
        make_pdfs.build(tmp_path / "src" / "bad.md")
