"""Web plumbing the page (``hybrid/ui.py``) and the OpenAI-compatible API (``hybrid/serve.py``) share: who may
call them, the port check and start-up lines, and a worker thread's output turned into a response stream.

Both serve one ``hybrid.demo.Demo`` (one index, generators by adapter, one lock: llama.cpp models are not
thread-safe, and on a 2-core CPU parallel generations would each run slower, not finish sooner). A request waits
for the lock in its own thread, so concurrent requests queue instead of failing. Both listen on 127.0.0.1 unless
``--host`` and ``--allow-remote`` say otherwise, answer only requests addressed to localhost (a web page elsewhere
cannot reach them by DNS rebinding), and refuse a POST whose ``Origin`` is another site. Left out on purpose:
logins, TLS, rate limits (put a reverse proxy in front for those).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import asdict

from hybrid.demo import Demo, UiConfig
from hybrid.systems import SYSTEMS

log = logging.getLogger(__name__)
LOCAL_HOSTS = ("127.0.0.1", "localhost", "[::1]")


def threaded(job: Callable, error: Callable[[Exception], str], last: str) -> Iterator[str]:
    """The strings ``job(put, stopped)`` puts, yielded as a thread produces them, then ``last``; an exception
    becomes ``error(e)``. A client that goes away closes this generator, which sets ``stopped``."""
    q: queue.Queue = queue.Queue()
    stopped = threading.Event()

    def run():
        try:
            job(q.put, stopped)
        except Exception as e:
            log.exception("request failed")
            q.put(error(e))
        q.put(last)
        q.put(None)

    threading.Thread(target=run, daemon=True).start()
    try:
        while (item := q.get()) is not None:
            yield item
    finally:
        stopped.set()


def guard(app, cfg: UiConfig):
    """Answer only requests addressed to localhost (unless ``--allow-remote``); returns a FastAPI dependency that
    refuses (403) a request whose ``Origin`` is another site: a page anywhere on the web can send a form POST to
    127.0.0.1 without a CORS pre-flight."""
    from fastapi import Header, HTTPException
    from starlette.middleware.trustedhost import TrustedHostMiddleware

    if not cfg.allow_remote:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(LOCAL_HOSTS))
    own = {f"http://{host}:{cfg.port}" for host in LOCAL_HOSTS}

    def same_origin(origin: str | None = Header(None), host: str | None = Header(None)) -> None:
        """No Origin (curl, scripts, API clients) or this server's own; anything else is a cross-site request."""
        if origin is not None and origin not in own | {f"http://{host}"}:
            raise HTTPException(403, f"cross-site request from {origin[:100]} refused")

    return same_origin


def check_port(host: str, port: int) -> None:
    """One clear error line instead of uvicorn's log lines when the port is taken."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: a closed port may linger
        try:
            s.bind((host, port))
        except OSError as e:
            raise ValueError(f"--port {port}: cannot listen on {host} ({e.strerror}); pick another port") from None


def start(cfg: UiConfig) -> Demo:
    """Check the port, print the config, build or update the index and say which systems can run."""
    check_port(cfg.host, cfg.port)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # as `python -m rag`: no bar per model load
    print("config: " + json.dumps(asdict(cfg)))
    demo = Demo(cfg, progress=True)  # a first run builds the index (about 30 s for the demo corpus)
    c = demo.corpus()
    print(f"index {demo.rag.cfg.index_dir}: {c['documents']} documents, {c['chunks']} chunks")
    for s in SYSTEMS:
        print(f"  {s:14s} {demo.missing(s) or 'ready'}")
    return demo


def url(cfg: UiConfig) -> str:
    return f"http://{cfg.host if ':' not in cfg.host else f'[{cfg.host}]'}:{cfg.port}"


def run(app, cfg: UiConfig) -> None:
    """Serve ``app`` until Ctrl-C."""
    import uvicorn

    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning")
