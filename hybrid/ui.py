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
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

from hybrid.demo import Demo, UiConfig
from hybrid.systems import SYSTEMS

log = logging.getLogger(__name__)
PAGE = Path(__file__).with_name("ui.html")


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
