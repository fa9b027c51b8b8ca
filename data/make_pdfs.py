"""Build the demo PDFs: each data/pdf_src/<rel>.md becomes data/demo/<rel>.pdf, the same bytes every run.

The sources are a small Markdown subset: '#'/'##'/'###' headings (bold, larger), paragraphs, '- ' and
'1.' list items, and pipe tables (fpdf2's `table()`, first row as headings). The PDF title comes from
the first '#' heading. Creation date and producer are fixed, so a build is reproducible and `--check`
can compare bytes. fpdf2's core font Helvetica only covers Latin-1; a source with any other character
fails with its file and line, rather than being silently mangled.

Left out on purpose: inline Markdown (**bold**, `code`, [links](...) are rendered as plain text), nested
lists, images, and page headers/footers (their text would leak into what rag.ingest extracts).

    python data/make_pdfs.py           # build every PDF, print its page count and sha256
    python data/make_pdfs.py --check   # exit 1 if a committed PDF differs from a fresh build
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from fpdf import FPDF

HERE = Path(__file__).resolve().parent
FIXED_DATE = datetime(2025, 1, 1, tzinfo=timezone.utc)  # a real date would change the bytes on every build
FONT = "Helvetica"
HEADING_SIZE = {1: 18, 2: 14, 3: 13}  # all >= 1.15 x body, rag.ingest's heading cue
BODY_SIZE, LINE_H = 11, 6  # pt, mm: rag.ingest tells paragraphs apart by gaps larger than one line
TABLE_SEPARATOR = re.compile(r"\|?(\s*:?-{3,}:?\s*\|)+\s*:?-*:?\s*")


@dataclass
class Block:
    kind: str  # "h" heading, "p" paragraph, "li" list item, "table"
    text: str = ""
    level: int = 0  # heading level
    marker: str = ""  # list item marker: "-" or "1."
    rows: list[list[str]] = field(default_factory=list)


def plain(text: str) -> str:
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)  # [label](url) -> label
    return re.sub(r"\*\*|__|`", "", text).strip()


def parse(src: Path) -> list[Block]:
    """Blocks of a Markdown source; a non-Latin-1 character raises ValueError naming file and line."""
    blocks: list[Block] = []
    open_block = False  # whether the next non-blank line continues the last block
    for n, line in enumerate(src.read_text(encoding="utf-8").splitlines(), 1):
        if bad := next((c for c in line if ord(c) > 0xFF), None):
            raise ValueError(f"{src}:{n}: {bad!r} (U+{ord(bad):04X}) is not Latin-1, which the PDF core font"
                             " Helvetica needs; replace it (e.g. '-' for a dash, straight quotes, 'EUR')")
        s = line.strip()
        if not s:
            open_block = False
        elif m := re.match(r"(#{1,6})\s+(.*)", s):
            blocks.append(Block("h", plain(m[2]), level=min(len(m[1]), 3)))
            open_block = False
        elif s.startswith("|"):
            if not TABLE_SEPARATOR.fullmatch(s):
                cells = [plain(c).replace("\\|", "|") for c in re.split(r"(?<!\\)\|", s.strip("|"))]
                if not (open_block and blocks[-1].kind == "table"):
                    blocks.append(Block("table"))
                blocks[-1].rows.append(cells)
            open_block = True
        elif m := re.match(r"([-*]|\d+[.)])\s+(.*)", s):
            blocks.append(Block("li", plain(m[2]), marker="-" if m[1] in "-*" else m[1]))
            open_block = True
        elif open_block and blocks[-1].kind in ("p", "li"):
            blocks[-1].text += " " + plain(s)
        else:
            blocks.append(Block("p", plain(s)))
            open_block = True
    return blocks


def render(blocks: list[Block], title: str) -> tuple[bytes, int]:
    """(PDF bytes, page count) for the blocks, A4 with 20 mm margins."""
    pdf = FPDF(format="A4")
    pdf.set_creation_date(FIXED_DATE)
    pdf.set_producer("openbook data/make_pdfs.py")  # instead of the fpdf2 version string
    pdf.set_title(title)
    pdf.set_margins(20, 20)
    pdf.set_auto_page_break(True, margin=20)
    pdf.add_page()
    prev = ""
    for block in blocks:
        if block.kind == "h":
            size = HEADING_SIZE[block.level]
            pdf.ln(0 if pdf.get_y() <= pdf.t_margin else 5)
            pdf.set_font(FONT, "B", size)
            pdf.multi_cell(0, size * 0.5, block.text, new_x="LMARGIN", new_y="NEXT")
            pdf.ln(1)
        elif block.kind == "table":
            pdf.ln(3)
            pdf.set_font(FONT, "", BODY_SIZE - 1)
            ncols = max(len(row) for row in block.rows)
            rows = [cells + [""] * (ncols - len(cells)) for cells in block.rows]
            # columns as wide as their longest cell, so few cells wrap; the vertical padding puts rows
            # further apart than wrapped lines, which is how rag.ingest keeps each row on its own
            widths = [max(6, *(len(row[i]) for row in rows)) for i in range(ncols)]
            with pdf.table(col_widths=widths, text_align="LEFT", line_height=5, padding=(1.5, 1.5)) as table:
                for cells in rows:
                    row = table.row()
                    for cell in cells:
                        row.cell(cell)
        else:
            pdf.ln(1 if block.kind == "li" and prev == "li" else 3)
            pdf.set_font(FONT, "", BODY_SIZE)
            if block.kind == "li":
                pdf.set_x(pdf.l_margin + 4)
            text = f"{block.marker} {block.text}" if block.kind == "li" else block.text
            pdf.multi_cell(0, LINE_H, text, new_x="LMARGIN", new_y="NEXT")
        prev = block.kind
    return bytes(pdf.output()), pdf.page_no()


def build(src: Path) -> tuple[bytes, int]:
    blocks = parse(src)
    title = next((b.text for b in blocks if b.kind == "h" and b.level == 1), src.stem)
    return render(blocks, title)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if a committed PDF differs from a new build")
    ap.add_argument("--src", type=Path, default=HERE / "pdf_src", help="folder of .md sources")
    ap.add_argument("--out", type=Path, default=HERE / "demo", help="folder the PDFs go to")
    args = ap.parse_args(argv)
    sources = sorted(p for p in args.src.rglob("*.md") if not p.name.startswith("."))
    if not sources:
        print(f"no .md sources in {args.src}", file=sys.stderr)
        return 1
    stale = []
    for src in sources:
        dest = args.out / src.relative_to(args.src).with_suffix(".pdf")
        try:
            data, pages = build(src)
        except ValueError as e:
            print(e, file=sys.stderr)
            return 1
        shown = os.path.relpath(dest)
        if args.check:
            same = dest.exists() and dest.read_bytes() == data
            stale += [] if same else [dest]
            print(f"{'ok' if same else 'DIFFERS'}  {shown}")
        else:
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(data)
            digest = hashlib.sha256(data).hexdigest()[:16]
            print(f"{shown}  {pages} page{'s' * (pages != 1)}  sha256 {digest}")
    if stale:
        print(f"{len(stale)} PDF(s) differ from a fresh build; run python data/make_pdfs.py", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
