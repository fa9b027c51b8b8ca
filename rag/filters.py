"""``--where`` filters: clauses on a document's path, tags, date and front matter, applied inside retrieval.

One clause is ``KEY OP VALUE``; several (``--where`` repeated) must all hold:

    path=GLOB             the document's path in the folder, shell-style: ``policies/*`` (``*`` crosses ``/``)
    tag=TAG               one of the front matter's ``tags:`` (a list, or "a, b"); case does not matter
    date>=YYYY-MM-DD      also > < <= =; the front matter's ``date:``, else the file's modification day (UTC)
    status=superseded     a document that says another version replaces it (``rag/versions.py``: front matter, or a
                          status line such as "SUPERSEDED - do not use" at its top); ``status!=superseded`` leaves
                          every such document out; other values compare with the front matter's ``status:``
    KEY=VALUE             any other front matter key, as text (``draft=false``); a list matches any of its items
    KEY!=VALUE            the negation of KEY=VALUE (also ``path!=GLOB``, ``tag!=TAG``, ``date!=DAY``)

    >>> [str(c) for c in parse_where(["path=policies/*", "date>=2024-01-01"])]
    ['path=policies/*', 'date>=2024-01-01']
    >>> meta = {"folder": "policies", "date": "2024-03-01", "front": {"tags": ["hr"], "draft": False}}
    >>> all(c.holds("policies/leave.md", meta) for c in parse_where(["tag=HR", "draft=false", "date<2025-01-01"]))
    True
    >>> [c.holds("old.md", {"status": "superseded", "front": {"status": "archived"}}) for c in parse_where(
    ...     ["status=superseded", "status=archived", "status!=superseded"])]
    [True, True, False]

The filter is applied before fusion, not after: it becomes a mask over the indexed chunks, BM25 scores every
other chunk 0 and FAISS searches only the allowed vectors (``rag/bm25.py``, ``rag/dense.py``), so each retriever
returns its best *allowed* candidates and k passages come back whenever k allowed chunks match the query. A
filter after fusion would cut k to whatever allowed chunks happened to rank high. Left out on purpose: OR, and
comparing other keys than ``date`` by order.
"""

from __future__ import annotations

import datetime as dt
import re
import weakref
from dataclasses import dataclass
from fnmatch import fnmatchcase
from functools import lru_cache

import numpy as np

from rag.metadata import legacy_meta, tags, text

HELP = ("only retrieve from documents matching KEY OP VALUE; repeat to require several: path=GLOB (e.g. policies/*), "
        "tag=TAG (front matter tags), date>=YYYY-MM-DD (also > < <= =; front matter date, else the file's day), "
        "status=superseded (front matter, or a status line at the document's top), any front matter key=value; != "
        "negates. E.g. --where tag=hr --where 'date>=2024-01-01' --where status!=superseded")
_CLAUSE = re.compile(r"\s*([A-Za-z_][\w.-]*)\s*(>=|<=|!=|=|<|>)\s*(.*?)\s*", re.S)
_ORDER = {">=": lambda a, b: a >= b, "<=": lambda a, b: a <= b, ">": lambda a, b: a > b, "<": lambda a, b: a < b}
_MASKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # index → {clauses: mask}; dies with the index


@dataclass(frozen=True)
class Clause:
    key: str
    op: str
    value: str

    def __str__(self) -> str:
        return f"{self.key}{self.op}{self.value}"

    def holds(self, doc_id: str, meta: dict) -> bool:
        """Whether a document (its id, the path in the folder, and its ``rag.metadata`` dict) passes."""
        if self.key == "date":
            got = meta.get("date") or ""
            return got == self.value if self.op == "=" else got != self.value if self.op == "!=" \
                else bool(got) and _ORDER[self.op](got, self.value)
        if self.key == "path":
            hit = fnmatchcase(doc_id, self.value)
        elif self.key == "tag":
            hit = self.value.casefold() in {t.casefold() for t in tags(meta)}
        else:
            front = meta.get("front") or {}
            got = front.get(self.key)
            hit = self.key in front and self.value in ([text(v) for v in got] if isinstance(got, list) else [text(got)])
            # the detected status too: a status line in the text marks a document as surely as its front matter
            hit = hit or (self.key == "status" and self.value.casefold() == (meta.get("status") or "").casefold())
        return hit if self.op == "=" else not hit


def parse_clause(clause: str) -> Clause:
    """One ``--where`` clause, or a ValueError that names the flag, the clause and the syntax."""
    m = _CLAUSE.fullmatch(clause)
    syntax = "write KEY=VALUE, KEY!=VALUE, path=GLOB, tag=TAG or date>=YYYY-MM-DD (date also takes > < <= =)"
    if m is None or not m[3]:
        raise ValueError(f"--where {clause!r}: not a clause; {syntax}")
    key, op, value = m.groups()
    if op in _ORDER and key != "date":
        raise ValueError(f"--where {clause!r}: only date compares with {op}; {syntax}")
    if key == "date":
        try:
            value = dt.date.fromisoformat(value).isoformat()
        except ValueError:
            raise ValueError(f"--where {clause!r}: {value!r} is not a date; write it as YYYY-MM-DD, e.g. "
                             "date>=2024-01-01") from None
    return Clause(key, op, value)


@lru_cache(maxsize=64)
def _parsed(where: tuple[str, ...]) -> tuple[Clause, ...]:
    return tuple(parse_clause(c) for c in where)


def parse_where(where) -> list[Clause]:
    """Every clause of ``--where`` (a list of strings; None or [] for no filter), checked."""
    return list(_parsed(tuple(where or ())))


def matching(index, where) -> list[str]:
    """Ids of the index's documents that pass every clause of ``where``."""
    clauses = parse_where(where)
    docs = index.manifest["documents"]
    return [d for d, entry in docs.items() if all(c.holds(d, legacy_meta(d, entry)) for c in clauses)]


def allowed(index, where) -> np.ndarray | None:
    """A boolean mask over ``index.ids``: the indexed chunks of matching documents; None for no filter. Computed
    once per index version and filter (a few ms at 10k chunks, then free)."""
    if not where:
        return None
    key = tuple(where)
    masks = _MASKS.setdefault(index, {})
    if key not in masks:
        docs = index.manifest["documents"]
        ok = {cid for d in matching(index, where) for cid in docs[d]["chunks"]}
        masks[key] = np.fromiter((cid in ok for cid in index.ids), dtype=bool, count=len(index.ids))
    return masks[key]


def summary(index, where) -> str:
    """One line for the console: how much of the index a filter lets through."""
    docs, mask = matching(index, where), allowed(index, where)
    line = (f"--where {' '.join(where)}: {len(docs)} of {len(index.manifest['documents'])} documents, "
            f"{int(mask.sum())} of {len(mask)} chunks")
    return line + ("; nothing to retrieve from, so every answer is I don't know" if not docs else "")
