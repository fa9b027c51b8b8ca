"""Older versions of a passage: a retrieved passage gives its place to its retrieved near-twin from a newer document.

Real folders keep old versions beside new ones (``returns-policy-v1.md`` and ``-v2.md``, a handbook and its
revision), and the two share most of their text, so both rank high for a question and a small reader may quote
the stale one. ``--versions newest`` (the default) shows only the newest of two near-identical passages; ``all``
shows both. Two passages are twins when the sets of their words overlap by at least ``TWIN`` (Jaccard); on the demo
17 passage pairs of its two returns policies score 0.86-1.0 (two rewritten sections 0.52 and 0.66: both shown), and
passages of unrelated documents at most 0.57. Which one is newer is what the documents declare, never a file time
(a copy or a checkout resets those):

- a document that says it is superseded is older than one that does not: front matter ``status: superseded``
  (also obsolete, archived, deprecated, outdated, retired, withdrawn, replaced) or a ``superseded_by:`` key, or one
  of its first lines opening with superseded, obsolete, archived, outdated or withdrawn as a status ("SUPERSEDED -
  do not use", "Obsolete.", "Superseded by v2", "(archived)"); a title such as "Obsolete features" is no status,
  nor is a mention further down;
- else the later front matter ``date:``; no dates or equal ones keep both.

    >>> status({}, "> **SUPERSEDED - DO NOT USE.** Version 1 of the policy.")
    'superseded'
    >>> status({}, "# Obsolete features\\n\\nThe TW-100 is no longer sold."), status({"status": "current"}, "")
    ('', '')

A document marked so only ever moves itself down, and only where its newer twin is retrieved: text cannot push
another file's passages out. Left out on purpose: telling versions apart by file name or time, and keeping the old
passage for a question about the old version (``--versions all`` does).
"""

from __future__ import annotations

import re

from rag.metadata import SUPERSEDED, day

CHOICES = ("newest", "all")
HELP = ("near-identical passages from two versions of a document: 'newest' shows only the one from the document "
        "that is not marked superseded (front matter status, or a status line at its top), else from the later "
        "front matter date; 'all' shows both")
TWIN = 0.7  # word-set Jaccard from which two passages are the same text in two versions
OPENING_LINES = 6  # non-empty lines at a document's top where a status line counts
_WORDS = ("superseded", "obsolete", "archived", "deprecated", "outdated", "retired", "withdrawn", "replaced")
# in the text only these: a line opening "Deprecated:" or "Replaced:" at the top of a current page is about a feature
_WORD = "|".join(("superseded", "obsolete", "archived", "outdated", "withdrawn"))
# a status line: the word first (after Markdown marks), then a break — not a title like "Obsolete features"
_LINE = re.compile(rf"^[\W_]*(?:status\s*[:=-]\s*)?(?:{_WORD})(?:\s*(?:[.:!*)\]—–-]|$)|\s+by\b)", re.I)
_TAG = re.compile(rf"[(\[]\s*(?:{_WORD})\s*[)\]]", re.I)  # "Returns policy (superseded)", "[OBSOLETE]"
_TOKEN = re.compile(r"\w+")


def status(front: dict, text: str) -> str:
    """'superseded' when the document says so in its front matter or in a status line at its top, else ''."""
    declared = str(front.get("status", "")).strip().lower()
    if declared in _WORDS or any(front.get(k) for k in ("superseded_by", "superseded-by", "replaced_by")):
        return SUPERSEDED
    lines = [ln.strip() for ln in text.split("\n", 64)[:64] if ln.strip()][:OPENING_LINES]
    return SUPERSEDED if any(_LINE.match(ln) or _TAG.search(ln) for ln in lines) else ""


def newer(a: dict, b: dict) -> bool:
    """Whether the document with metadata ``a`` replaces the one with ``b`` (see the module's rules)."""
    old_a, old_b = a.get("status") == SUPERSEDED, b.get("status") == SUPERSEDED
    if old_a != old_b:
        return old_b
    da, db = (day((m.get("front") or {}).get("date")) for m in (a, b))
    return bool(da and db and da > db)


class Twins:
    """Finds, for a ranked list of passages, the ones whose twin from a newer document is in the same list."""

    def __init__(self, candidates: list[tuple[str, str, dict]]):
        """``candidates``: best-first ``(doc_id, text, meta)`` of every passage retrieval kept."""
        self.candidates = candidates
        self._words: dict[int, frozenset[str]] = {}

    def _set(self, i: int) -> frozenset[str]:
        if i not in self._words:
            self._words[i] = frozenset(_TOKEN.findall(self.candidates[i][1].lower()))
        return self._words[i]

    def newer_twin(self, i: int) -> int | None:
        """The position of a passage from another, newer document that is ``i``'s twin, or None."""
        doc, _, meta = self.candidates[i]
        for j, (other, _, other_meta) in enumerate(self.candidates):
            if other == doc or not newer(other_meta, meta):
                continue
            a, b = self._set(i), self._set(j)
            if len(a & b) >= TWIN * len(a | b) > 0:
                return j
        return None
