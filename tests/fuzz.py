"""Fuzz the indexer with hostile folders: the real `python -m rag index` must finish in time, print no traceback,
index the one good document beside the bad input, and copy no byte of a file outside the folder into the index.

Each case is a folder holding ``good.md`` and three kinds of bad input from ``KINDS`` (two in turn, so the
first 12 cases hold all 22 kinds, and one drawn from a seeded ``random.Random``): encodings, hostile names, deep
nesting, big, empty and binary files, FIFOs, symlinks in and out, hard links, archives named ``.md``, malformed
HTML/PDF/Markdown, NULs, BOMs, CRLF. Next to the folder, never inside it, sits ``outside/secret.md`` holding a
random sentinel that links point at. The bad input follows the hardening list (README, Reliability) and what an
adversary tries first; left out: coverage-guided mutation (AFL-style).

`make fuzz` runs 120 cases and the web page's load test (``tests/load.py``) and writes
``.openbook/reports/fuzz.json``; ``tests/test_fuzz.py`` runs the first 12 of the same cases in `make test`::

    python -m tests.fuzz --cases 120 --seed 17 --json .openbook/reports/fuzz.json
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import random
import socket
import subprocess
import sys
import tarfile
import time
import zipfile
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PDF = REPO / "data" / "demo" / "handbook" / "benefits-summary.pdf"
TIMEOUT = 60.0  # seconds one `rag index` may take: ~2 s on a tiny folder, minutes would be a hang


def put(docs: Path, name: str | bytes, data: str | bytes = b"") -> bytes:
    """Write ``data`` at ``docs/name`` (a bytes name may hold bytes that are not UTF-8); returns the path."""
    path = os.fsencode(docs) + b"/" + (name if isinstance(name, bytes) else os.fsencode(name))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    return path


def _encodings(d, r, out):
    put(d, "latin1.md", "# Caf\u00e9\n\nPr\u00e9cis, na\u00efve.\n".encode("latin-1"))
    put(d, "cp1252-holes.txt", b"Quote \x93this\x94 and the five holes \x81\x8d\x8f\x90\x9d.\n")
    put(d, "utf16.md", "# Hello\n\nWorld.\n".encode("utf-16"))
    put(d, "surrogate.md", b"# CESU\n\nA lone surrogate \xed\xa0\x80 here.\n")


def _bom_crlf(d, r, out):
    put(d, "bom.md", b"\xef\xbb\xbf# Title\r\n\r\nLine one.\r\nLine two.\r\r\nmixed\n\rend\r")
    put(d, "only-bom.md", b"\xef\xbb\xbf")
    put(d, "cr.txt", b"Old Mac\rline endings\r\rparagraph two\r")


def _nul(d, r, out):
    put(d, "nul.md", b"# Nul\n\nbefore\x00after\n")
    put(d, "late-binary.txt", b"plain text header\n" * r.randint(500, 2000) + b"\x00\x01\xff" * 50)


def _binary(d, r, out):
    for ext in (".md", ".txt", ".html", ".pdf"):
        put(d, f"random{ext}", r.randbytes(r.randint(1, 30000)))


def _empty(d, r, out):
    put(d, "empty.md")
    put(d, "blank.txt", "   \n\t\n\r\n")
    put(d, "empty.pdf")
    put(d, "empty.html", "<html></html>")
    for i in range(r.randint(50, 400)):
        put(d, f"many/e{i}.md")


def _names_control(d, r, out):
    put(d, "evil\nINFO: indexed 0 documents.md", "# Newline\n\nname.\n")
    put(d, "red\x1b[31mX\x1b[0m.md", "# Ansi\n\nname.\n")
    put(d, "\x1b]0;pwned\x07.txt", "osc title\n")
    put(d, "tab\tand\rcr.md", "")


def _names_bytes(d, r, out):
    put(d, b"caf\xe9.md", b"# Cafe\n\nname not UTF-8.\n")
    put(d, b"\xff\xfe.txt", b"text\n")
    put(d, b"dir\x80/inner.md", b"# Inner\n\nin a folder whose name is not UTF-8.\n")


def _names_odd(d, r, out):
    put(d, "a" * 250 + ".md", "# Long\n\nname.\n")
    put(d, "\u6570\u636e.md", "# \u6570\u636e\n\nCJK name.\n")
    put(d, "\u202egnp.md", "# RTL\n\noverride in the name.\n")
    put(d, "-rf.md", "# Dash\n\nname starts with a dash.\n")
    put(d, " spaced .md", "# Spaces\n\naround.\n")
    put(d, "UPPER.MD", "# Upper\n\nextension.\n")
    put(d, "x.md.", "trailing dot\n")
    put(d, ".hidden.md", "# Hidden\n\nskipped.\n")
    os.mkdir(d / "folder.md")


def _deep(d, r, out):
    path = d
    for _ in range(r.randint(100, 600)):  # 1100 levels are in tests/test_hardening.py
        path = path / "d"
        path.mkdir()
    (path / "bottom.md").write_text("# Bottom\n\nDeep down.\n")


def _big(d, r, out):
    with open(d / "huge.txt", "wb") as f:  # sparse: 21 MB of size, no data written
        f.truncate(21 << 20)
    with open(d / "huge.pdf", "wb") as f:
        f.write(b"%PDF-1.4\n")
        f.truncate(25 << 20)
    put(d, "one-word.txt", "x" * r.randint(100_000, 3_000_000))


def _special(d, r, out):
    os.mkfifo(d / "pipe.md")  # opening it would block forever
    path = str(d / "s.md")
    if len(path) < 100:  # AF_UNIX paths are at most 107 bytes
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(path)
    os.symlink("/dev/zero", d / "zero.md")
    os.symlink("/dev/urandom", d / "random.txt")


def _links_out(d, r, out):
    os.symlink(out / "secret.md", d / "leak.md")
    os.symlink(out, d / "leakdir")
    os.symlink(os.path.relpath(out / "secret.md", d), d / "relative-leak.md")
    os.symlink("/", d / "root")
    os.link(out / "secret.md", d / "hardlink.md")  # the same file: st_nlink 2, one name outside


def _links_in(d, r, out):
    os.symlink("good.md", d / "alias.md")
    (d / "sub").mkdir()
    os.symlink("../good.md", d / "sub" / "alias2.md")
    os.link(d / "good.md", d / "sub" / "hard-again.md")


def _links_bad(d, r, out):
    os.symlink("b.md", d / "a.md")
    os.symlink("a.md", d / "b.md")
    os.symlink("self.md", d / "self.md")
    os.symlink("..", d / "up")
    os.symlink(".", d / "here")
    os.symlink("/nonexistent/x.md", d / "dangling.md")


def _archives(d, r, out):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("inner.md", "# Zipped\n\nin a zip.\n")
        z.writestr("../../escape.md", "# Escape\n\nzip slip.\n")
    put(d, "bundle.md", buf.getvalue())
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        data = b"# Tarred\n\nin a tar.\n"
        info = tarfile.TarInfo("inner.md")
        info.size = len(data)
        t.addfile(info, io.BytesIO(data))
    put(d, "docs.tar.md", buf.getvalue())
    put(d, "gz.txt", gzip.compress(b"# Gzipped\n\ntext.\n" * 100))
    put(d, "real.zip", buf.getvalue())


def _html_nesting(d, r, out):
    n = r.randint(1000, 5000)
    put(d, "divs.html", "<html><body>" + "<div>" * n + "<p>Deep.</p>" + "</div>" * n)
    put(d, "unclosed.html", "<body>" + "<span><b><i><ul><li>" * r.randint(200, 1500) + "text")
    put(d, "tables.html", "<table><tr><td>" * r.randint(100, 800) + "cell")


def _html_bombs(d, r, out):
    put(d, "colspan.html", f'<table><tr><td colspan="{r.choice(["2000000", "1e9", "-5", "0x10", "9" * 400])}">x'
                           '</td><td rowspan="999999">y</td></tr></table>')
    put(d, "wide.html", "<table><tr>" + "<td colspan='999'>c</td>" * r.randint(50, 300) + "</tr></table>")
    put(d, "entities.html", "<p>" + "&amp;&#xFFFFFFFF;&#0;&#xD800;&bogus;" * r.randint(1000, 20000) + "</p>")


def _html_malformed(d, r, out):
    put(d, "comment.html", "<p>before</p><!-- never closed " + "x " * 5000)
    put(d, "script.html", "<p>visible</p><script>" + "var a = '<p>';" * 2000)
    put(d, "cdata.html", "<![CDATA[ <p> ]]><p>after</p><?php echo 1 ?><!DOCTYPE x [<!ENTITY a 'b'>]>")
    put(d, "attr.html", '<p title="' + "a" * r.randint(10_000, 1_000_000) + '">text</p>')
    put(d, "charset.html", b'<meta charset="utf-16"><p>caf\xe9</p>')
    put(d, "nohtml.htm", "just text, no tags at all\n")


def _pdf_broken(d, r, out):
    raw = PDF.read_bytes()
    put(d, "truncated.pdf", raw[:r.randint(10, len(raw) - 1)])
    flipped = bytearray(raw)
    for _ in range(r.randint(5, 200)):
        flipped[r.randrange(len(flipped))] = r.randrange(256)
    put(d, "flipped.pdf", bytes(flipped))
    put(d, "header-only.pdf", b"%PDF-1.7\n")
    put(d, "fake.pdf", b"%PDF-1.4\n" + r.randbytes(r.randint(100, 5000)))


def _pdf_crafted(d, r, out):
    # a page tree whose Kids points at itself, and a huge /Count
    put(d, "loop.pdf", b"%PDF-1.4\n1 0 obj<</Type/Catalog/Pages 2 0 R>>endobj\n2 0 obj<</Type/Pages/Kids[2 0 R]"
                       b"/Count 999999999>>endobj\ntrailer<</Root 1 0 R>>\n%%EOF\n")
    put(d, "noxref.pdf", b"%PDF-1.4\n1 0 obj<</Type/Catalog>>endobj\n%%EOF\n")
    put(d, "not-pdf.PDF", "# Markdown\n\nnamed .PDF.\n")


def _markdown(d, r, out):
    put(d, "spaces.md", "# a" + " " * r.randint(10_000, 150_000) + "b ##\n\nBody.\n")
    put(d, "hashes.md", "#" * 10_000 + "\n\n#\n\nnot a heading\n\n# C#\n\n## \n")
    put(d, "quotes.md", ">" * r.randint(1000, 20_000) + " deep quote\n")
    put(d, "fence.md", "```\nnever closed\n" + "code\n" * 1000)
    put(d, "front.md", "---\ntitle: x\n" + "key: value\n" * 1000)
    put(d, "setext.md", "Title\n===\n" * r.randint(100, 5000))
    put(d, "lists.md", "".join("  " * i + "- item\n" for i in range(r.randint(100, 2000))))
    put(d, "pipes.md", "|" * r.randint(1000, 100_000) + "\n|---|\n")
    put(d, "brackets.md", "[" * 50_000 + "link" + "]" * 50_000 + "(" * 10_000)


def _control_text(d, r, out):
    put(d, "control.md", "# Clear\x1b[2J\x1b[H screen\n\nline\u2028sep\u0085nel\u200bzero\ufeffbom inside\x07\x08\n")
    put(d, "rtl.txt", "\u202eevil text\u202c and \u2066isolate\u2069\n")
    put(d, "mixed.txt", b"utf8 \xc3\xa9 then latin1 \xe9 then \xf0\x9f\x98\x80 emoji\r\n")


KINDS = {f.__name__[1:]: f for f in (
    _links_out, _names_bytes, _special, _html_nesting, _pdf_broken, _encodings, _links_bad, _archives, _deep,
    _html_bombs, _markdown, _big, _nul, _names_control, _binary, _html_malformed, _bom_crlf, _empty, _links_in,
    _names_odd, _pdf_crafted, _control_text)}


def make_case(root: Path, n: int, seed: int) -> dict:
    """Case ``n``'s folder under ``root``: docs/ (good.md + three kinds) and outside/ (the sentinel)."""
    r = random.Random(f"{seed}-{n}")
    names = list(KINDS)
    pair = [names[n % len(names)], names[(n + 12) % len(names)]]  # the first 12 cases hold every kind once or more
    kinds = pair + r.sample([k for k in names if k not in pair], 1)
    case = {"n": n, "kinds": kinds, "dir": root / f"case-{n:03d}", "good": f"goodtoken{r.getrandbits(48):012x}",
            "sentinel": f"obleak{r.getrandbits(64):016x}"}
    docs, out = case["dir"] / "docs", case["dir"] / "outside"
    (out / "sub").mkdir(parents=True)
    (out / "secret.md").write_text(f"# Secret\n\nThe sentinel is {case['sentinel']}.\n")
    (out / "sub" / "secret2.md").write_text(f"# Secret two\n\n{case['sentinel']}\n")
    docs.mkdir()
    (docs / "good.md").write_text(f"# Good\n\nThe pump runs at 40 litres per minute; its code is {case['good']}.\n")
    for k in kinds:
        KINDS[k](docs, r, out)
    return case


def remove(path: Path) -> None:
    """Delete a case folder, however deep (shutil.rmtree recurses once per level) and whatever its modes."""
    stack = [os.fsencode(path)]
    while stack:
        top = stack[-1]
        os.chmod(top, 0o700)
        subdirs = []
        for e in os.scandir(top):
            if e.is_dir(follow_symlinks=False):
                subdirs.append(e.path)
            else:
                os.unlink(e.path)
        if subdirs:
            stack += subdirs
        else:
            os.rmdir(stack.pop())


def run_case(case: dict, timeout: float = TIMEOUT) -> dict:
    """Index the case's docs with the real CLI; what went wrong, if anything."""
    docs, index = case["dir"] / "docs", case["dir"] / "index"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    t0 = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, "-m", "rag", "index", "--docs", str(docs), "--index-dir", str(index)],
                           cwd=REPO, env=env, capture_output=True, timeout=timeout)
        rc, out, err = p.returncode, p.stdout.decode(errors="replace"), p.stderr.decode(errors="replace")
    except subprocess.TimeoutExpired as e:
        rc, out, err = None, (e.stdout or b"").decode(errors="replace"), (e.stderr or b"").decode(errors="replace")
    seconds = time.perf_counter() - t0
    stored = b"".join(f.read_bytes() for f in index.rglob("*") if f.is_file()) if index.is_dir() else b""
    problems = []
    if rc is None:
        problems.append("hang")
    elif rc != 0:
        problems.append("error")
    if "Traceback" in err:
        problems.append("traceback")
    if case["sentinel"].encode() in stored or case["sentinel"] in out + err:
        problems.append("leak")
    if rc is not None and case["good"].encode() not in stored:
        problems.append("good_missing")
    return {"n": case["n"], "kinds": case["kinds"], "seconds": round(seconds, 2), "problems": problems,
            "stderr_tail": err[-1500:] if problems else ""}


def run(root: Path, cases: int, seed: int = 17, timeout: float = TIMEOUT, start: int = 0, log=print) -> dict:
    """Make, index and remove ``cases`` cases (numbers ``start``...) under ``root``; the summary."""
    t0, results = time.perf_counter(), []
    for n in range(start, start + cases):
        case = make_case(root, n, seed)
        try:
            results.append(res := run_case(case, timeout))
        finally:
            remove(case["dir"])
        log(f"case {n:03d} {','.join(case['kinds']):52s} {res['seconds']:5.1f} s "
            f"{' '.join(res['problems']) or 'ok'}")
    count = Counter(p for r in results for p in r["problems"])
    secs = [r["seconds"] for r in results]
    return {"cases": len(results), "seed": seed, "timeout_s": timeout,
            "passed": sum(not r["problems"] for r in results),
            "tracebacks": count["traceback"], "hangs": count["hang"], "leaks": count["leak"],
            "errors": count["error"], "good_missing": count["good_missing"],
            "kinds": dict(Counter(k for r in results for k in r["kinds"])),
            "case_seconds": {"median": sorted(secs)[len(secs) // 2] if secs else None, "max": max(secs, default=None)},
            "seconds": round(time.perf_counter() - t0, 1), "failures": [r for r in results if r["problems"]]}


def main(argv: list[str] | None = None) -> int:
    import tempfile

    p = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__.split("\n")[0])
    p.add_argument("--cases", type=int, default=120, help="hostile folders to index (default: 120)")
    p.add_argument("--seed", type=int, default=17, help="seed of the folders' contents (default: 17)")
    p.add_argument("--timeout", type=float, default=TIMEOUT, help=f"seconds per case (default: {TIMEOUT:.0f})")
    p.add_argument("--load", type=int, default=50, help="concurrent questions to the web page; 0 skips it")
    p.add_argument("--port", type=int, default=7871, help="loopback port for the load test (default: 7871)")
    p.add_argument("--json", default=".openbook/reports/fuzz.json", help="where the summary goes")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="openbook-fuzz-") as tmp:
        summary = run(Path(tmp), args.cases, args.seed, args.timeout)
    print(f"fuzz: {summary['cases']} cases, {summary['passed']} passed; tracebacks {summary['tracebacks']}, hangs "
          f"{summary['hangs']}, leaks {summary['leaks']}, errors {summary['errors']}, good document missing "
          f"{summary['good_missing']}; {summary['seconds']:.0f} s")
    if args.load:
        from tests.load import load_test

        summary["load"] = load_test(args.load, args.port)
        print("load: " + json.dumps({k: v for k, v in summary["load"].items() if k != "errors_seen"}))
    from rag.config import write_report

    write_report(summary, args.json)
    bad = any(summary[k] for k in ("tracebacks", "hangs", "leaks", "errors", "good_missing"))
    return 1 if bad or (args.load and summary["load"]["errors"]) else 0


if __name__ == "__main__":
    sys.exit(main())
