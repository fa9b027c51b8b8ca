"""Document metadata: YAML front matter, the folder and the file's times, kept on every Document and Chunk.

A Markdown or text file may open with front matter, a YAML mapping between two ``---`` lines (Jekyll, Hugo and
Obsidian write it); ``split_front_matter`` takes it off the text, so it is never chunked or embedded, and keeps it
as data. It is parsed with ``yaml.safe_load`` and treated as untrusted: only plain values survive (strings,
numbers, booleans, lists, mappings; dates become ISO strings), with at most ``MAX_NODES`` of them, so an alias
bomb or a huge block costs nothing. A block that is not valid YAML, is not a mapping or is too large gets one
warning naming the file and stays in the text: the document is indexed as plain text, without front matter.

Every document's metadata is one JSON-ready dict, ``{"folder", "modified", "date", "front"}``:

    >>> doc_meta("policies/leave.md", 1717243200.0, {"date": "2024-03-01", "tags": ["hr"]})["date"]
    '2024-03-01'
    >>> doc_meta("notes.md", 1717243200.0, {})
    {'folder': '', 'modified': '2024-06-01T12:00:00Z', 'date': '2024-06-01', 'front': {}}

``date`` is the front matter's ``date:`` when it is one, else the file's modification day (UTC, so every machine
agrees). Left out on purpose: TOML (``+++``) front matter, metadata of HTML ``<meta>`` tags and PDF properties.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import posixpath
import re

log = logging.getLogger("rag.ingest")  # one logger for everything said about a file (as rag.formats)

SUFFIXES = (".md", ".markdown", ".txt")  # the text formats whose files may open with front matter
MAX_BYTES = 64 << 10  # a larger block is no front matter anyone wrote by hand
MAX_NODES = 1000  # values kept per file; YAML aliases can make a small block expand without end
# '---' line, the block (empty tried first), a '---' or '...' line; CRLF and a UTF-8 byte order mark allowed
_FRONT = re.compile(rb"\A(?:\xef\xbb\xbf)?---[ \t]*\r?\n(?:(.*?)\r?\n)??(?:---|\.\.\.)[ \t]*(?:\r?\n|\Z)", re.S)
_ISO_DAY = re.compile(r"\d{4}-\d{2}-\d{2}")
SUPERSEDED = "superseded"  # a document's ``status`` when it says another version replaces it (rag/versions.py)


class Untrusted(ValueError):
    """Front matter that is not a plain mapping of at most ``MAX_NODES`` values."""


def _plain(value, budget: list[int], depth: int = 0):
    """``value`` as JSON data (str, int, float, bool, None, list, dict with str keys), or ``Untrusted``."""
    budget[0] -= 1
    if budget[0] < 0 or depth > 20:
        raise Untrusted(f"more than {MAX_NODES} values or deeper than 20 levels")
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):  # .inf and .nan are no JSON numbers
        return value if math.isfinite(value) else str(value)
    if isinstance(value, (dt.date, dt.datetime)):
        return value.isoformat()
    if isinstance(value, dict):
        return {str(_plain(k, budget, depth + 1)): _plain(v, budget, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        items = sorted(value, key=str) if isinstance(value, set) else value
        return [_plain(v, budget, depth + 1) for v in items]
    raise Untrusted(f"a value of type {type(value).__name__} (only text, numbers, dates, lists and mappings)")


def parse_front_matter(block: bytes) -> dict:
    """The front matter block's mapping as plain data; ``Untrusted`` when it is not one."""
    import yaml  # imported on first use: most folders have no front matter

    if len(block) > MAX_BYTES:
        raise Untrusted(f"{len(block) >> 10} KiB, over the {MAX_BYTES >> 10} KiB limit")
    try:
        data = yaml.safe_load(block.decode("utf-8-sig", errors="replace"))
    except (yaml.YAMLError, RecursionError) as e:
        # PyYAML quotes the offending line: escape what could forge a log line (a U+2028, a terminal escape)
        why = "".join(c if c.isprintable() else f"\\u{ord(c):04x}" for c in " ".join(str(e).split())[:160])
        raise Untrusted(f"not valid YAML: {why}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise Untrusted(f"YAML {type(data).__name__}, not a 'key: value' mapping")
    return _plain(data, [MAX_NODES])


def split_front_matter(raw: bytes, name: str) -> tuple[dict, bytes]:
    """(front matter, the bytes after it) of a file; ``({}, raw)`` when it has none, or when its block is not
    usable front matter (then after one warning naming ``name``: the file is indexed as it is)."""
    m = _FRONT.match(raw)
    if m is None or b"\x00" in raw[: m.end()]:  # NUL: binary data, which the reader skips with its own warning
        return {}, raw
    try:
        front = parse_front_matter(m[1] or b"")
    except Untrusted as e:
        log.warning("%s: front matter ignored (%s); the file is indexed as plain text, its '---' block included. "
                    "Fix the block between the '---' lines to filter on it", name, e)
        return {}, raw
    return front, raw[m.end():]


def day(value) -> str | None:
    """``YYYY-MM-DD`` of a front matter date (a YAML date, which ``_plain`` made ISO text, or text starting with
    one); None when it is none."""
    if not isinstance(value, str) or not _ISO_DAY.match(value):
        return None
    try:
        return dt.date.fromisoformat(value[:10]).isoformat()
    except ValueError:  # 2024-02-30
        return None


def doc_meta(doc_id: str, mtime: float, front: dict, name: str | None = None) -> dict:
    """A document's metadata; ``name``: how a warning names the file (none is given when it is None)."""
    modified = dt.datetime.fromtimestamp(mtime, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    date = day(front.get("date"))
    if date is None and "date" in front and name is not None:
        log.warning("%s: front matter date %.40r is not a date (YYYY-MM-DD); its date is the file's time, %s",
                    name, front["date"], modified[:10])
    return {"folder": posixpath.dirname(doc_id), "modified": modified, "date": date or modified[:10],
            "front": front}


def legacy_meta(doc_id: str, entry: dict) -> dict:
    """The metadata of a document in an index written before metadata was kept: its folder and file time."""
    meta = entry.get("meta")
    return meta if isinstance(meta, dict) and meta else doc_meta(doc_id, float(entry.get("mtime") or 0.0), {})


def tags(meta: dict) -> list[str]:
    """The front matter's ``tags:`` (or ``tag:``): a list, or one string of comma-separated tags.

    >>> tags({"front": {"tags": "hr, policy"}}), tags({"front": {"tags": ["hr", 2024]}})
    (['hr', 'policy'], ['hr', '2024'])
    """
    front = meta.get("front") or {}
    raw = front.get("tags", front.get("tag"))
    items = raw if isinstance(raw, list) else str(raw).split(",") if raw is not None else []
    return [t for t in (text(x).strip() for x in items) if t]


def text(value) -> str:
    """A front matter value as a filter compares it: YAML's spelling of booleans and null, str() otherwise."""
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    return str(value)


def describe(meta: dict) -> str:
    """A short line for a source: its date and tags, and 'superseded' when the document says so (rag/versions.py);
    front matter text shown as repr() when it could forge terminal output (escape sequences, newlines)."""
    parts = [SUPERSEDED] if meta.get("status") == SUPERSEDED else []
    parts += [f"date {meta['date']}"] if meta.get("date") else []
    if found := tags(meta):
        parts.append("tags " + ", ".join(t if t.isprintable() else repr(t) for t in found))
    return " · ".join(parts)
