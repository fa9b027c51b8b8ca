"""Load a folder of .md/.txt/.html/.pdf files into `Document`s whose text is normalised Markdown.

Each file's bytes become Markdown in `rag/formats.py` (one reader per extension); this module decides which
files are read: the walk, names, sizes, links. YAML front matter of Markdown and text files is taken off before
the reader sees them and kept, with the folder and file time, as the document's ``meta`` (``rag/metadata.py``).

A bad file never stops a run: it is skipped with one warning that names it and says what to do.

Nothing outside the folder is read. A symlink leaving it is refused. A hard link cannot be told from the file it
links (both are the same file), and finding its other names would mean searching the whole disk, so the rule is a
count: a file with more hard links (``st_nlink``) than the walk found inside the folder may have a name outside
it, and is skipped with a warning unless ``hard_links=True`` (``--hard-links``). Hard links wholly inside the
folder are indexed as usual.

Left out on purpose: following links out of the docs folder, archives, and formats without a reader.

    >>> docs = load_folder("data/demo")
    >>> docs[0].id, docs[0].title, docs[0].text[:12]
    ('cloud/api-reference.md', 'Tidewell Cloud REST API Reference (v2)', '# Tidewell C')
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from rag.config import UserError
from rag.formats import READERS, Skip, tidy
from rag.metadata import SUFFIXES, doc_meta, split_front_matter
from rag.versions import status

log = logging.getLogger(__name__)

SUPPORTED = (".md", ".markdown", ".txt", ".html", ".htm", ".pdf")
WARN_BYTES = 5 << 20  # text this large takes minutes to chunk and embed on a CPU: say so
MAX_BYTES = 20 << 20  # text larger than this is skipped: split it (a PDF's limit applies to its extracted text)


@dataclass(frozen=True)
class Document:
    id: str       # POSIX path relative to the docs root, e.g. "policies/returns-v2.md" (stable id)
    path: str     # absolute path of the file
    title: str    # <title>/<h1>, first '# ' heading, setext title, PDF metadata title, first line; or stem
    text: str     # normalised Markdown: '#'-prefixed heading lines, paragraphs separated by blank lines
    sha256: str   # hex sha256 of the raw file bytes
    mtime: float
    # folder, file time, date and YAML front matter (rag/metadata.py); not compared, so a Document stays hashable
    meta: dict = field(default_factory=dict, compare=False)


class IngestError(UserError, ValueError):
    """A one-line, user-facing error (names the path and what to do)."""


def shown(name: str) -> str:
    """A file name fit for a log line: as it is, or its repr() when it holds a newline, an escape sequence or a
    byte that is not UTF-8 (a name like 'a.md\\nINFO: ...' must not forge a line of the log)."""
    return name if name.isprintable() else repr(name)


def _utf8(name: str) -> bool:
    """False for a name holding bytes that are not UTF-8 (Python keeps them as lone surrogates)."""
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _check_size(n: int, name: str, what: str = "it") -> None:
    if n > MAX_BYTES:
        raise Skip(f"{what} is {n / 2**20:.0f} MB, over the {MAX_BYTES >> 20} MB limit (rag.ingest.MAX_BYTES); "
                    "split it into smaller files")
    if n > WARN_BYTES:
        log.warning("%s: %s is %.0f MB; chunking and embedding it may take minutes", name, what, n / 2**20)


def load_file(path: Path, root: Path) -> Document | None:
    """One file as a Document, or None (after one logged warning) when it is skipped."""
    path, root = Path(path), Path(root)
    rel = path.absolute().relative_to(root.absolute()).as_posix()
    name, pdf = shown(rel), path.suffix.lower() == ".pdf"
    if path.suffix.lower() not in SUPPORTED:
        log.debug("skipping %s: unsupported extension", name)
        return None
    try:
        if not _utf8(rel):  # the index stores ids as UTF-8 JSON
            raise Skip("its name is not valid UTF-8; rename it")
        st = path.stat()
        if not pdf:  # before reading: a huge file is not read at all
            _check_size(st.st_size, name)
        raw = path.read_bytes()
        if not raw.strip():
            raise Skip("empty file; add text to it or delete it")
        front, body = split_front_matter(raw, name) if path.suffix.lower() in SUFFIXES else ({}, raw)
        text, title = READERS[path.suffix.lower()](body, name)
        if pdf:
            _check_size(len(text.encode()), name, "its text")
        if not (text := tidy(text)):
            raise Skip("no text left after parsing; check the file has content")
        mtime = st.st_mtime
    except Skip as e:
        log.warning("skipping %s: %s", name, e)
        return None
    except OSError as e:
        log.warning("skipping %s: cannot read it (%s); check its permissions", name, e.strerror or e)
        return None
    first_line = next(ln for ln in text.split("\n") if ln.strip()).lstrip("#").strip()[:120]
    meta = doc_meta(rel, mtime, front, name)
    if mark := status(front, text):  # only then: other documents' metadata stays as indexes already hold it
        meta["status"] = mark
    return Document(id=rel, path=str(path.absolute()), title=title or first_line or path.stem, text=text,
                    sha256=hashlib.sha256(raw).hexdigest(), mtime=mtime, meta=meta)


def _entries(folder: Path, root: Path) -> list[Path]:
    try:
        return sorted(folder.iterdir())
    except OSError as e:
        log.warning("skipping %s/: cannot list it (%s)", shown(folder.relative_to(root).as_posix()), e.strerror)
        return []


def _walk(root: Path, hard_links: bool = False) -> list[Path]:
    """Every visible file under root once, in sorted order; links that leave root are refused (hard links too,
    unless ``hard_links``: see the module docstring).

    Depth first over a stack of open folders, not recursion: 1100 nested folders must not hit the recursion limit.
    """
    real_root = root.resolve()
    found: dict[Path, Path] = {}  # resolved target -> the path it is loaded under
    stack = [(iter(_entries(root, root)), real_root)]  # per open folder: entries still to visit, its target
    ancestors = {real_root}  # the targets on the stack: a link back up the tree would loop forever
    while stack:
        entry = next(stack[-1][0], None)
        if entry is None:
            ancestors.discard(stack.pop()[1])
            continue
        if entry.name.startswith(".") or entry.name == "__pycache__":
            continue
        rel = shown(entry.relative_to(root).as_posix())
        try:  # resolve() costs a system call per folder level: only links need it
            target = entry.resolve() if entry.is_symlink() else stack[-1][1] / entry.name
        except (OSError, RuntimeError):  # RuntimeError: a link that points at itself
            target = None
        if not _utf8(entry.name):  # the index stores ids as UTF-8 JSON
            log.warning("skipping %s: its name is not valid UTF-8; rename it", rel)
        elif target is None or not (entry.is_dir() or entry.is_file()):
            log.warning("skipping %s: broken symlink or not a regular file", rel)
        elif entry.is_symlink() and not target.is_relative_to(real_root):
            log.warning("skipping %s: symlink to %s, outside the docs folder; copy it in instead",
                        rel, shown(str(target)))
        elif entry.is_dir():
            if target not in ancestors:
                stack.append((iter(_entries(entry, root)), target))
                ancestors.add(target)
        elif target not in found or entry == root / target.relative_to(real_root):
            found[target] = entry  # a file reached twice is loaded once, under its real path if seen
    if not hard_links:
        _drop_outside_links(found, root)
    return sorted(found.values())


def _drop_outside_links(found: dict[Path, Path], root: Path) -> None:
    """Remove from ``found`` the documents with hard links the walk did not reach: their other names may be
    outside the folder (or in a hidden folder inside it)."""
    names: dict[tuple[int, int], list[Path]] = {}  # (device, inode) -> the folder's names for it
    for target in found:
        if target.suffix.lower() not in SUPPORTED:
            continue
        try:
            st = os.stat(target)
        except OSError:
            continue  # load_file says why
        if st.st_nlink > 1:
            names.setdefault((st.st_dev, st.st_ino), []).append(target)
    for targets in names.values():
        n = os.stat(targets[0]).st_nlink
        if len(targets) < n:
            for target in targets:
                log.warning("skipping %s: it has %d hard links and %d of them in the docs folder, so it may be a file "
                            "from outside; copy it in instead (cp), or pass --hard-links to index it",
                            shown(found.pop(target).relative_to(root).as_posix()), n, len(targets))


def load_folder(root: str | Path, progress: bool = True, hard_links: bool = False) -> list[Document]:
    """Every readable document under root, sorted by id; bad files are skipped with a warning. ``hard_links``:
    also files whose other hard links may be outside root."""
    if not str(root).strip():  # Path("") is the current folder
        raise IngestError("docs folder is empty (''); pass DOCS=/path/to/folder")
    root = Path(root).expanduser()
    if not _utf8(str(root.resolve())):
        raise IngestError(f"docs folder {shown(str(root))}: its path is not valid UTF-8; rename it")
    if not root.exists():
        raise IngestError(f"docs folder not found: {root}; pass DOCS=/path/to/folder")
    if not root.is_dir():
        raise IngestError(f"docs path is not a folder: {root}; pass DOCS=/path/to/folder")
    files = _walk(root, hard_links)
    bar = tqdm(files, desc="ingest", unit="file", disable=not progress or len(files) <= 20)
    docs = [doc for path in bar if (doc := load_file(path, root)) is not None]
    if not docs:
        raise IngestError(f"no readable .md/.txt/.html/.pdf files in {root}; pass DOCS=/path/to/folder")
    log.info("loaded %d documents from %s (%d files skipped)", len(docs), root, len(files) - len(docs))
    return sorted(docs, key=lambda d: d.id)
