"""The side-by-side web demo (``make ui``): one question, every system's answer streamed in its own column.

Columns: base model closed-book, RAG, fine-tuned closed-book, fine-tuned + RAG and hybrid (the RAFT adapter
inside RAG), the systems ``hybrid.compare`` measures; a system whose adapter is missing says which make target
creates it. Each answer shows its latency, token counts and citations that open the exact passage. Also: a
retrieval inspector (BM25, dense, fused and re-ranked lists with scores), the corpus (re-index, and the
freshness demo of ``hybrid.freshness.freshness``), and the latest ``make compare`` report.

Built on FastAPI + uvicorn: one vanilla-JS page (``hybrid/ui.html``) and a JSON API; answers stream as
server-sent events. Not Gradio, because everything must work offline (Gradio's themes fetch web fonts and it sends
usage analytics unless told not to; its wheel is tens of MB), the page should be small enough to read, every
document string must reach the DOM as text (``textContent``, never ``innerHTML``; a nonce-only script policy backs
that up), and the API should be scriptable: ``curl -N 'http://127.0.0.1:7860/api/ask?q=How+long+is+the+warranty%3F'``.

Models load lazily, once per adapter: base and RAG share one generator, fine-tuned and fine-tuned + RAG another.
Systems answer one after another, one question at a time (a lock): on a 2-core CPU parallel generations would
each run slower, not finish sooner. Left out on purpose: logins, several questions at once, and stopping a
generation half-way (a closed page stops the systems not yet asked).

    GET  /api/status            systems (or how to create them), corpus, report, example questions
    GET  /api/ask?q=&systems=   events: ranked, start, token, done (answer, sources, latency, tokens), end
    GET  /api/inspect?q=        the retrieval lists with scores, and the passages given to the generator
    POST /api/reindex           incremental re-index of --docs
    POST /api/freshness         edits applied to a copy, re-indexed, changed facts re-asked (hybrid.freshness)
    GET  /report                the latest `make compare` report.html

The POST routes refuse (403) a request whose ``Origin`` is another site: a page anywhere on the web can send
a form POST to 127.0.0.1 without a CORS pre-flight, and each of these starts minutes of work.
"""

from __future__ import annotations

import html
import json
import logging
import os
import queue
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from finetune.data import closed_book_messages, parse_answer
from finetune.evaluate import load_jsonl
from hybrid.freshness import freshness
from hybrid.systems import ADAPTER, CLOSED_BOOK, RETRIEVAL, SYSTEMS, CompareConfig
from rag.config import option
from rag.evaluate import load_golden
from rag.generate import is_abstention
from rag.ingest import SUPPORTED
from rag.models import DEFAULT_GENERATOR
from rag.pipeline import Hit, RagConfig, RagPipeline

log = logging.getLogger(__name__)
LOCAL = ("127.0.0.1", "localhost", "::1")
PAGE = Path(__file__).with_name("ui.html")
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
    model: str = option(DEFAULT_GENERATOR, "base generator (the adapters must have been trained on it)")
    finetuned: str = option("", "closed-book LoRA from `make finetune` (default .openbook/finetune/<folder>/<model>)")
    raft: str = option("", "RAFT LoRA from `make hybrid` (default .openbook/hybrid/<folder>/<model>)")
    report: str = option("", "the `make compare` report folder (default .openbook/reports/compare-<folder>)")
    max_new_tokens: int = option(RagConfig.max_new_tokens, "generated tokens per answer at most")
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


def hit_json(h: Hit) -> dict:
    return {"chunk_id": h.chunk_id, "doc": h.doc_id, "section": h.section, "text": h.text, "score": h.score,
            "rerank": h.rerank}


class Demo:
    """The state behind the page: one index, generators by adapter (loaded on first use), one lock for compute."""

    def __init__(self, cfg: UiConfig, progress: bool = False):
        self.cfg, self.compare = cfg, cfg.compare_config()
        self.rag = RagPipeline(RagConfig(docs=cfg.docs, index_dir=cfg.index_dir, model=cfg.model,
                                         max_new_tokens=cfg.max_new_tokens))
        self.last_update = self.rag.update_index(progress=progress)
        self.pipes = {"": self.rag}  # adapter folder → pipeline (its generator loads on first use)
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
        adapter = self.compare.adapter(system) or ""
        if adapter not in self.pipes:
            self.pipes[adapter] = RagPipeline(RagConfig(**{**asdict(self.rag.cfg), "adapter": adapter}),
                                              index=self.rag.index)
        return self.pipes[adapter]

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

    def ask(self, question: str, systems: list[str], emit, stopped: threading.Event) -> None:
        with self.lock:
            ranked = None
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

    def inspect(self, question: str, show: int = 10) -> dict:
        """Each retrieval stage's best-first list (``RagPipeline.ranked``'s trace) and what the generator got."""
        c, ix, lists = self.rag.cfg, self.rag.index, {}
        with self.lock:
            hits, timings, signals = self.rag.ranked(question, trace=lists)
        ranks = {name: {cid: i for i, (cid, _) in enumerate(lst, 1)} for name, lst in lists.items()}
        chosen = {h.chunk_id for h in hits}

        def row(cid: str, score: float) -> dict:
            ch = ix.chunks[cid]
            return {"chunk_id": cid, "doc": ch.doc_id, "section": ch.section, "score": score, "text": ch.text,
                    "chosen": cid in chosen, "ranks": {k: ranks[k].get(cid) for k in ("bm25", "dense", "rerank")}}

        return {"mode": c.mode, "k": c.k, "rrf_k": c.rrf_k, "rerank_n": c.rerank_n, "fusion": c.rerank_fusion,
                "timings": timings, "signals": signals, "rule": self.rag.rule(),
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


def events(job) -> Iterator[str]:
    """Server-sent events from ``job(emit, stopped)`` run in a thread; a closed page sets ``stopped``."""
    q: queue.Queue = queue.Queue()
    stopped = threading.Event()

    def run():
        try:
            job(lambda event, data: q.put(f"event: {event}\ndata: {json.dumps(data)}\n\n"), stopped)
        except Exception as e:
            log.exception("request failed")
            q.put(f"event: error\ndata: {json.dumps({'message': f'{type(e).__name__}: {e}'})}\n\n")
        q.put("event: end\ndata: {}\n\n")
        q.put(None)

    threading.Thread(target=run, daemon=True).start()
    try:
        while (item := q.get()) is not None:
            yield item
    finally:
        stopped.set()


def create_app(demo: Demo):
    from fastapi import Depends, FastAPI, Header, HTTPException
    from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, StreamingResponse
    from starlette.middleware.trustedhost import TrustedHostMiddleware

    app = FastAPI(title="openbook demo", docs_url=None, redoc_url=None)  # the Swagger page needs a CDN
    if not demo.cfg.allow_remote:  # a web page elsewhere cannot reach this server by DNS rebinding
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=["127.0.0.1", "localhost", "[::1]"])
    own = {f"http://{host}:{demo.cfg.port}" for host in ("127.0.0.1", "localhost", "[::1]")}

    def same_origin(origin: str | None = Header(None), host: str | None = Header(None)) -> None:
        """No Origin (curl, scripts) or this page's own; anything else is a cross-site request."""
        if origin is not None and origin not in own | {f"http://{host}"}:
            raise HTTPException(403, f"cross-site request from {origin[:100]} refused")

    @app.get("/", response_class=HTMLResponse)
    def page():
        nonce = secrets.token_urlsafe(16)
        csp = (f"default-src 'self'; script-src 'nonce-{nonce}'; style-src 'self' 'unsafe-inline'; "
               "img-src 'self' data:; frame-src 'self'; object-src 'none'; base-uri 'none'")
        return HTMLResponse(PAGE.read_text(encoding="utf-8").replace("{{nonce}}", nonce),
                            headers={"Content-Security-Policy": csp})

    @app.get("/api/status")
    def status():
        return demo.status()

    @app.get("/api/ask")
    def ask(q: str, systems: str = ""):
        wanted = [s for s in systems.split(",") if s] if systems else [s for s in SYSTEMS if not demo.missing(s)]
        bad = [s for s in wanted if s not in SYSTEMS or demo.missing(s)]
        if not q.strip() or bad:
            raise HTTPException(400, f"unknown or unavailable systems: {', '.join(bad)}" if bad else "empty question")
        return StreamingResponse(events(lambda emit, stopped: demo.ask(q.strip(), wanted, emit, stopped)),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-store"})

    @app.get("/api/inspect")
    def inspect(q: str):
        if not q.strip():
            raise HTTPException(400, "empty question")
        return demo.inspect(q.strip())

    @app.post("/api/reindex", dependencies=[Depends(same_origin)])
    def reindex():
        return demo.reindex()

    @app.post("/api/freshness", dependencies=[Depends(same_origin)])
    def fresh():
        try:
            return demo.freshness()
        except (FileNotFoundError, ValueError) as e:  # no change set, or an edit that no longer applies
            return JSONResponse({"detail": str(e)}, status_code=400)

    @app.get("/report")
    def report():
        path = Path(demo.compare.out) / "report.html"
        if not path.exists():
            return HTMLResponse(f"<p>No comparison report yet: run <code>make compare DOCS="
                                f"{html.escape(demo.cfg.docs)}</code></p>", status_code=404)
        return FileResponse(path, headers={"Content-Security-Policy": "script-src 'none'"})

    return app


def serve(cfg: UiConfig) -> None:
    """Build or update the index, then serve the page until Ctrl-C."""
    import uvicorn

    with socket.socket(socket.AF_INET6 if ":" in cfg.host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: a closed port may linger
        try:  # one clear line instead of uvicorn's log lines when the port is taken
            s.bind((cfg.host, cfg.port))
        except OSError as e:
            raise ValueError(f"--port {cfg.port}: cannot listen on {cfg.host} ({e.strerror}); pick another "
                             "port") from None
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # as `python -m rag`: no bar per model load
    print("config: " + json.dumps(asdict(cfg)))
    demo = Demo(cfg, progress=True)  # a first run builds the index (about 30 s for the demo corpus)
    c = demo.corpus()
    print(f"index {demo.rag.cfg.index_dir}: {c['documents']} documents, {c['chunks']} chunks")
    for s in SYSTEMS:
        print(f"  {s:14s} {demo.missing(s) or 'ready'}")
    print(f"openbook demo on http://{cfg.host if ':' not in cfg.host else f'[{cfg.host}]'}:{cfg.port} "
          "(Ctrl-C stops it)")
    uvicorn.run(create_app(demo), host=cfg.host, port=cfg.port, log_level="warning")
