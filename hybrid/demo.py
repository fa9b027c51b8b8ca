"""What the side-by-side demo shows, without the web: one question answered by every system, the retrieval
inspector, the corpus and its freshness demo. ``hybrid/ui.py`` serves it as a page and a JSON API.

Systems: base model closed-book, RAG, fine-tuned closed-book, fine-tuned + RAG and hybrid (the RAFT adapter inside
RAG), the systems ``hybrid.compare`` measures; a system whose adapter is missing says which make target creates
it. Each answer carries its latency, token counts and the passages it cites. Models load lazily, once per
adapter: base and RAG share one generator, fine-tuned and fine-tuned + RAG another. Systems answer one after
another, one question at a time (a lock): on a 2-core CPU parallel generations would each run slower, not finish
sooner. A question may follow earlier ones: the plain reader first makes it standalone (``rag/rewrite.py``), and
every system answers that. Left out on purpose: several questions at once, and stopping a generation half-way (a
closed page stops the systems not yet asked).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from finetune.data import closed_book_messages, parse_answer
from hybrid.freshness import freshness
from hybrid.systems import ADAPTER, CLOSED_BOOK, RETRIEVAL, SYSTEMS, CompareConfig, with_generator
from rag.config import load_jsonl, option
from rag.evaluate import load_golden
from rag.filters import HELP as WHERE_HELP
from rag.generate import is_abstention
from rag.ingest import SUPPORTED
from rag.metadata import tags
from rag.models import DEFAULT_READER
from rag.pipeline import RagConfig, RagPipeline
from rag.ranking import Hit
from rag.rewrite import Rewrite, standalone

log = logging.getLogger(__name__)
LOCAL = ("127.0.0.1", "localhost", "::1")
LABELS = {"base": ("base", "closed-book: the plain model, no documents"),
          "finetuned": ("fine-tuned", "closed-book: LoRA trained on the corpus (`make finetune`)"),
          "rag": ("RAG", "retrieved passages + the plain model"),
          "finetuned+rag": ("fine-tuned + RAG", "retrieved passages + the closed-book LoRA"),
          "hybrid": ("hybrid (RAFT)", "retrieved passages + the RAFT LoRA (`make hybrid`)")}
MAKE = {"finetuned": "make finetune", "raft": "make hybrid"}


@dataclass
class UiConfig:
    """What the demo serves; every field is a ``python -m hybrid ui`` flag."""

    docs: str = option("data/demo", "documents folder")
    index_dir: str = option("", "the RAG index (default .openbook/index/<folder>)")
    model: str = option(DEFAULT_READER, "base generator (the adapters must have been trained on it)")
    finetuned: str = option("", "closed-book LoRA from `make finetune` (default .openbook/finetune/<folder>/<model>)")
    raft: str = option("", "RAFT LoRA from `make hybrid` (default .openbook/hybrid/<folder>/<model>)")
    report: str = option("", "the `make compare` report folder (default: the one `make compare` writes "
                         "for this folder and model)")
    max_new_tokens: int = option(RagConfig.max_new_tokens, "generated tokens per answer at most")
    where: list[str] = option((), WHERE_HELP)
    host: str = option("127.0.0.1", "address to listen on; anything but localhost needs --allow-remote")
    port: int = option(7860, "port to listen on")
    allow_remote: bool = option(False, "allow --host to be reachable from other machines (no login: anyone who "
                                "can reach it can ask and re-index)")

    def __post_init__(self):
        if self.host not in LOCAL and not self.allow_remote:
            raise ValueError(f"--host {self.host} would serve the demo to other machines; pass --allow-remote too "
                             "if you mean it (there is no login)")
        if not 0 < self.port < 65536:
            raise ValueError(f"--port must be in 1..65535, not {self.port}")

    def compare_config(self, systems: str = ",".join(SYSTEMS)) -> CompareConfig:
        """The comparison's config for the same folder: default adapter and report paths come from it."""
        return CompareConfig(docs=self.docs, index_dir=self.index_dir, model=self.model, finetuned=self.finetuned,
                             raft=self.raft, systems=systems, out=self.report)


def meta_json(meta: dict) -> dict:
    """What the page shows of a document's metadata (``rag/metadata.py``): its date and front matter tags."""
    return {"date": meta.get("date"), "tags": tags(meta)}


def hit_json(h: Hit) -> dict:
    return {"chunk_id": h.chunk_id, "doc": h.doc_id, "section": h.section, "text": h.text, "score": h.score,
            "rerank": h.rerank} | meta_json(h.meta)


def rewrite_json(rw: Rewrite) -> dict:
    return {"question": rw.question, "query": rw.query, "rewritten": rw.rewritten, "reason": rw.reason,
            "seconds": rw.seconds}


class Demo:
    """The state behind the page: one index, generators by adapter (loaded on first use), one lock for compute."""

    def __init__(self, cfg: UiConfig, progress: bool = False):
        self.cfg, self.compare = cfg, cfg.compare_config()
        self.rag = RagPipeline(RagConfig(docs=cfg.docs, index_dir=cfg.index_dir, model=cfg.model,
                                         max_new_tokens=cfg.max_new_tokens, where=cfg.where))
        self.last_update = self.rag.update_index(progress=progress)
        self.pipes: dict[str, RagPipeline] = {}  # system → pipeline (its generator loads on first use)
        self.lock = threading.Lock()

    def missing(self, system: str) -> str:
        """'' when the system can run, else what to do about it."""
        try:
            self.compare.adapter(system)
            return ""
        except FileNotFoundError:
            kind = ADAPTER[system]
            where = self.compare.finetuned if kind == "finetuned" else self.compare.raft
            return f"needs the {kind} LoRA adapter (none in {where}): run `{MAKE[kind]} DOCS={self.cfg.docs}`"

    def pipe(self, system: str) -> RagPipeline:
        if system not in self.pipes:  # the base model judges for every system (the calibrated rule is its)
            self.pipes[system] = with_generator(self.rag, self.compare, system)
        return self.pipes[system]

    def standalone(self, messages: list[dict]) -> Rewrite:
        """The last of ``messages`` (``{role, content}``) as a standalone question, rewritten by the plain reader
        when earlier turns exist (``rag/rewrite.py``); the caller holds the lock."""
        return standalone(self.rag.generator, messages)

    def status(self) -> dict:
        systems = [{"name": s, "label": LABELS[s][0], "about": LABELS[s][1], "missing": self.missing(s)}
                   for s in SYSTEMS]
        report = Path(self.compare.out) / "report.html"
        return {"docs": self.cfg.docs, "model": self.cfg.model, "systems": systems, "corpus": self.corpus(),
                "report": {"path": str(report), "exists": report.exists(),
                           "modified": time.strftime("%Y-%m-%d %H:%M", time.localtime(report.stat().st_mtime))
                           if report.exists() else None,
                           "make": f"make compare DOCS={self.cfg.docs}"},
                "examples": self.examples()}

    def corpus(self) -> dict:
        m, docs = self.rag.index.manifest, Path(self.cfg.docs)
        built = time.mktime(time.strptime(m["built"], "%Y-%m-%dT%H:%M:%S"))  # written in local time
        # a cheap staleness hint by modification time; re-index compares content hashes
        newer = sum(p.stat().st_mtime > built + 1 for p in docs.rglob("*") if p.suffix.lower() in SUPPORTED
                    and p.is_file() and not any(part.startswith(".") for part in p.relative_to(docs).parts))
        edits = docs / "changes" / "edits.jsonl"
        edits = [{"path": e["path"], "why": e.get("why", "")} for e in load_jsonl(edits)] if edits.exists() else None
        return {"folder": str(docs.resolve()), "index_dir": self.rag.cfg.index_dir, "documents":
                len(m["documents"]), "chunks": m["n_chunks"], "built": m["built"], "age_s": time.time() - built,
                "modified_since": newer, "last_update": asdict(self.last_update), "edits": edits}

    def examples(self) -> list[str]:
        """A few golden test questions (answerable first, then one unanswerable) to click."""
        if not self.compare.golden:
            return []
        test = [q for q in load_golden(self.compare.golden) if q["split"] == "test"]
        return [q["question"] for q in test if q["answer"] is not None][:3] + \
            [q["question"] for q in test if q["answer"] is None][:1]

    def answer(self, system: str, question: str, ranked, emit) -> dict:
        """One system's answer, its pieces passed to ``emit('token', …)`` as they are generated."""
        pipe, t0, first = self.pipe(system), time.perf_counter(), []

        def on_token(piece: str) -> None:
            if not first:
                first.append(time.perf_counter() - t0)
            emit("token", {"system": system, "text": piece})

        if system in CLOSED_BOOK:
            gen = pipe.generator.chat(closed_book_messages(question), on_token=on_token)
            parsed, abstained = parse_answer(gen.text), is_abstention(gen.text)
            out = {"text": gen.text, "abstained": abstained, "reason": "model" if abstained else "", "sources": [],
                   "cited": [], "claimed_source": parsed[1] if parsed else None, "confidence": None,
                   "timings": {"generate": gen.seconds}, "prompt_tokens": gen.prompt_tokens,
                   "new_tokens": gen.new_tokens}
        else:
            a = pipe.answer(question, on_token=on_token, ranked=ranked)
            out = {"text": a.text, "abstained": a.abstained, "reason": a.reason,
                   "sources": [hit_json(h) for h in a.sources], "cited": [a.sources.index(h) + 1 for h in a.cited],
                   "explicit_citation": a.explicit_citation, "confidence": a.confidence, "timings": a.timings,
                   "prompt_tokens": a.prompt_tokens, "new_tokens": a.new_tokens, "rule": pipe.rule(),
                   "signals": a.signals}
        return out | {"system": system, "seconds": time.perf_counter() - t0,
                      "first_token_s": first[0] if first else None}

    def ask(self, question: str, systems: list[str], emit, stopped: threading.Event, history: list[dict] = ()
            ) -> None:
        """Every system's answer to ``question``, a follow-up of the ``history`` turns (``{role, content}``)."""
        with self.lock:
            rw = self.standalone([*history, {"role": "user", "content": question}])
            if history:  # a first question's events are as they were: start, token, done
                emit("rewritten", rewrite_json(rw))
            question, ranked = rw.query, None
            if set(systems) & set(RETRIEVAL):  # one ranking shared by every retrieval system, as in compare
                ranked = self.rag.ranked(question)
                emit("ranked", {"timings": ranked.timings, "signals": ranked.signals})
            for s in systems:
                if stopped.is_set():
                    log.info("page closed: %s not asked", ", ".join(systems[systems.index(s):]))
                    return
                emit("start", {"system": s})
                try:
                    emit("done", self.answer(s, question, ranked, emit))
                except Exception as e:  # one system failing must not blank the others
                    log.exception("system %s failed", s)
                    emit("error", {"system": s, "message": f"{type(e).__name__}: {e}"})

    def inspect(self, question: str, show: int = 10, history: list[dict] = ()) -> dict:
        """Each retrieval stage's best-first list (``RagPipeline.ranked``'s trace) and what the generator got, for
        ``question`` made standalone from the ``history`` turns as ``ask`` makes it."""
        c, ix, lists = self.rag.cfg, self.rag.index, {}
        with self.lock:
            rw = self.standalone([*history, {"role": "user", "content": question}])
            hits, timings, signals = self.rag.ranked(rw.query, trace=lists)
        ranks = {name: {cid: i for i, (cid, _) in enumerate(lst, 1)} for name, lst in lists.items()}
        chosen = {h.chunk_id for h in hits}

        def row(cid: str, score: float) -> dict:
            ch = ix.chunks[cid]
            return {"chunk_id": cid, "doc": ch.doc_id, "section": ch.section, "score": score, "text": ch.text,
                    "chosen": cid in chosen, "ranks": {k: ranks[k].get(cid) for k in ("bm25", "dense", "rerank")}
                    } | meta_json(ch.meta)

        return {**rewrite_json(rw), "mode": self.rag.mode, "k": c.k, "rrf_k": c.rrf_k, "rerank_n": c.rerank_n,
                "fusion": c.rerank_fusion, "timings": timings, "signals": signals, "rule": self.rag.rule(),
                "lists": {name: [row(cid, s) for cid, s in lst[:show]] for name, lst in lists.items()},
                "generator": [hit_json(h) for h in hits]}

    def reindex(self) -> dict:
        with self.lock:
            self.last_update = self.rag.update_index(progress=False)
            for p in self.pipes.values():
                p.index = self.rag.index
        return self.corpus()

    def freshness(self) -> dict:
        """``hybrid.freshness.freshness`` for RAG: the edits applied to a copy, re-indexed, the changed facts asked."""
        with self.lock:
            out = freshness(self.cfg.compare_config(systems="rag"), self.rag, progress=False)
        rag = out["systems"]["rag"]
        out["items"] = [q | {"answer": a, "fresh": f, "stale": st} for q, a, f, st in
                        zip(out["asked"], rag["answers"], rag["is_fresh"], rag["is_stale"], strict=True)]
        return out
