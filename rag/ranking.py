"""What retrieval and answering hand back: the retrieval modes, a passage (``Hit``), one question's ranking, its
passage through the abstention gate, and the answer.

Kept apart from ``rag.pipeline`` (which produces them) so that evaluation, the comparison and the UI can name
these types without reading the pipeline. Left out: how any of them is computed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple


@dataclass(frozen=True)
class Mode:
    """Which retrievers a retrieval mode runs: the lists it fuses, and whether the cross-encoder re-ranks them."""

    bm25: bool
    dense: bool
    rerank: bool = False


MODES = {"bm25": Mode(bm25=True, dense=False), "dense": Mode(bm25=False, dense=True),
         "hybrid": Mode(bm25=True, dense=True), "hybrid+rerank": Mode(bm25=True, dense=True, rerank=True)}
# --mode auto: the mode rag.choose.choose_mode picked on the folder's golden train split (saved beside the index),
# else this one; fusion with re-ranking is the safe choice where nothing was measured
AUTO, DEFAULT_MODE = "auto", "hybrid+rerank"


@dataclass
class Hit:
    chunk_id: str  # the indexed chunk that matched
    doc_id: str
    section: str
    text: str  # what the generator sees (the parent section for hierarchical chunks)
    score: float  # final ranking score (mode-dependent scale)
    rerank: float | None = None  # cross-encoder probability, when re-ranked
    meta: dict = field(default_factory=dict)  # the document's metadata (rag/metadata.py): date, tags, folder

    @property
    def label(self) -> str:
        return f"{self.doc_id} › {self.section}" if self.section else self.doc_id


def sources(hits: list[Hit]) -> list[tuple[str, str]]:
    """The ``(label, text)`` pairs the generator numbers as sources."""
    return [(h.label, h.text) for h in hits]


class Ranking(NamedTuple):
    """What ``RagPipeline.ranked`` returns for one question."""

    hits: list[Hit]  # best-first distinct passages (parents for hierarchical chunks)
    timings: dict[str, float]  # seconds per stage: retrieve, rerank
    signals: dict[str, float]  # abstention signals (``SIGNALS``) this mode computed


class Gate(NamedTuple):
    """A question after the abstention rule: its passages, timings and signals so far, and the abstaining
    ``Answer`` when a signal was below its threshold (``early``; None when the question goes to the reader)."""

    hits: list[Hit]
    timings: dict[str, float]
    signals: dict[str, float]
    early: Answer | None


@dataclass
class Answer:
    question: str
    text: str
    abstained: bool
    reason: str  # "", "low-confidence" or "model"
    sources: list[Hit]  # the passages shown to the generator, numbered from 1
    cited: list[Hit]  # the sources the answer cites (or the top source when it cites none)
    explicit_citation: bool
    confidence: float | None  # the value of the rule's first signal
    timings: dict = field(default_factory=dict)  # seconds per stage
    signals: dict = field(default_factory=dict)  # every abstention signal computed for this question
    prompt_tokens: int = 0
    new_tokens: int = 0
