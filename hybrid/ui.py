"""The side-by-side web demo (``make ui``): one question, every system's answer streamed in its own column.

The page also has a retrieval inspector (BM25, dense, fused and re-ranked lists with scores), the corpus
(re-index, and the freshness demo of ``hybrid.freshness.freshness``), and the latest ``make compare`` report.
What it shows, and the models behind it, are ``hybrid/demo.py``'s; this module is the web: routes, streaming and
who may call them.

Built on FastAPI + uvicorn: one vanilla-JS page (``hybrid/ui.html``) and a JSON API; answers stream as
server-sent events. Not Gradio, because everything must work offline (Gradio's themes fetch web fonts and it sends
usage analytics unless told not to; its wheel is tens of MB), the page should be small enough to read, every
document string must reach the DOM as text (``textContent``, never ``innerHTML``; a nonce-only script policy backs
that up), and the API should be scriptable: ``curl -N 'http://127.0.0.1:7860/api/ask?q=How+long+is+the+warranty%3F'``.
Left out on purpose: logins.

    GET  /api/status            systems (or how to create them), corpus, report, example questions
    GET  /api/ask?q=&systems=&history=
                                events: rewritten (a follow-up), ranked, start, token, done (answer, sources,
                                latency, tokens), end
    GET  /api/inspect?q=&history=
                                the query searched for, the retrieval lists with scores, and the passages given
                                to the generator

``history`` is the conversation so far as JSON, ``[{"role": "user"|"assistant", "content": ...}]``: a follow-up
("and for the TW-300?") is rewritten into a standalone question before retrieval (``rag/rewrite.py``), and the
``rewritten`` event and the inspector say what was searched for.
    POST /api/reindex           incremental re-index of --docs
    POST /api/freshness         edits applied to a copy, re-indexed, changed facts re-asked (hybrid.freshness)
    GET  /report                the latest `make compare` report.html

The POST routes refuse (403) a request whose ``Origin`` is another site: a page anywhere on the web can send
a form POST to 127.0.0.1 without a CORS pre-flight, and each of these starts minutes of work. That guard, the
port check and the thread-to-stream bridge are ``hybrid/web.py``'s, shared with the OpenAI-compatible API
(``hybrid/serve.py``).
"""

from __future__ import annotations

import html
import json
import logging
import secrets
from collections.abc import Iterator
from pathlib import Path

from hybrid import web
from hybrid.demo import Demo, UiConfig
from hybrid.systems import SYSTEMS

log = logging.getLogger(__name__)
PAGE = Path(__file__).with_name("ui.html")


def sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


def events(job) -> Iterator[str]:
    """Server-sent events from ``job(emit, stopped)`` run in a thread; a closed page sets ``stopped``."""
    return web.threaded(lambda put, stopped: job(lambda event, data: put(sse(event, data)), stopped),
                        error=lambda e: sse("error", {"message": f"{type(e).__name__}: {e}"}), last=sse("end", {}))


def create_app(demo: Demo):
    from fastapi import Depends, FastAPI, HTTPException
    from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, StreamingResponse

    app = FastAPI(title="openbook demo", docs_url=None, redoc_url=None)  # the Swagger page needs a CDN
    same_origin = web.guard(app, demo.cfg)

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

    def turns(history: str) -> list[dict]:
        """The earlier turns the page sends, or a 400."""
        try:
            out = json.loads(history or "[]")
        except json.JSONDecodeError:
            raise HTTPException(400, "history is not JSON") from None
        if not isinstance(out, list) or not all(isinstance(t, dict) and t.get("role") in ("user", "assistant")
                                                and isinstance(t.get("content"), str) for t in out):
            raise HTTPException(400, 'history must be a list of {"role": "user" or "assistant", "content": text}')
        return [{"role": t["role"], "content": t["content"]} for t in out]

    @app.get("/api/ask")
    def ask(q: str, systems: str = "", history: str = ""):
        wanted = [s for s in systems.split(",") if s] if systems else [s for s in SYSTEMS if not demo.missing(s)]
        bad = [s for s in wanted if s not in SYSTEMS or demo.missing(s)]
        if not q.strip() or bad:
            raise HTTPException(400, f"unknown or unavailable systems: {', '.join(bad)}" if bad else "empty question")
        before = turns(history)
        return StreamingResponse(events(lambda emit, stopped: demo.ask(q.strip(), wanted, emit, stopped, before)),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-store"})

    @app.get("/api/inspect")
    def inspect(q: str, history: str = ""):
        if not q.strip():
            raise HTTPException(400, "empty question")
        return demo.inspect(q.strip(), history=turns(history))

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
    demo = web.start(cfg)
    print(f"openbook demo on {web.url(cfg)} (Ctrl-C stops it)")
    web.run(create_app(demo), cfg)
