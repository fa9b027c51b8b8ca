"""An OpenAI-compatible HTTP API over the comparison's systems (``openbook serve``): any OpenAI client can ask the
documents a question and get a cited answer, streamed or whole.

    GET  /v1/models              the systems that can run for this folder (base, rag, finetuned, finetuned+rag,
                                 hybrid; one whose adapter is missing is left out)
    GET  /v1/models/{id}         one of them
    POST /v1/chat/completions    {"model": "rag", "messages": [...], "stream": false}

Follows OpenAI's chat-completions wire format: a ``chat.completion`` object, or with ``"stream": true``
server-sent ``chat.completion.chunk`` events (a role chunk, content deltas, a last chunk with ``finish_reason``,
then ``data: [DONE]``; ``stream_options.include_usage`` adds a usage chunk), and errors as ``{"error":
{"message", "type", "param", "code"}}`` (unknown model: 404 ``model_not_found`` naming the models served; a bad
request: 400). The last user message is the question; earlier turns make a follow-up standalone
(``rag/rewrite.py``) before retrieval; system messages are ignored: the grounded prompt is fixed, and document
text reaches the reader only as quoted, redacted data (``rag/generate.py``). Usage counts the rewrite's tokens too.

Every answer carries its sources twice: as ``[n]`` in the text (when the reader cited none, the top passage is
cited as ``[1]``, as ``rag ask`` does, and ``explicit_citation`` is false) and in an extra field on the response,
or on the stream's last chunk::

    "openbook": {"system", "query" (what was searched for), "rewritten", "rewrite_reason", "abstained", "reason",
                 "explicit_citation", "cited" ([n, ...]), "claimed_source", "timings",
                 "sources": [{"n", "doc", "section", "chunk_id", "text", "score", "rerank", "cited", ...}]}

The answers are ``hybrid/demo.py``'s (the web page's), the listening rules ``hybrid/web.py``'s: 127.0.0.1 unless
``--host`` with ``--allow-remote``, one generation at a time (a lock; other requests queue). Left out on purpose:
tools, ``n`` > 1, logprobs, sampling (answers are greedy: ``temperature``, ``top_p``, ``max_tokens`` are accepted
and ignored; ``--max-new-tokens`` caps an answer), embeddings, API keys (the ``Authorization`` header is ignored).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from hybrid import web
from hybrid.demo import LABELS, Demo, UiConfig
from hybrid.systems import RETRIEVAL, SYSTEMS
from rag.config import option

log = logging.getLogger(__name__)
MAX_QUESTION = 4000  # characters: a question, not a document (the reader's context holds the passages too)
ROLES = ("system", "developer", "user", "assistant", "tool")


@dataclass
class ServeConfig(UiConfig):
    """What ``openbook serve`` serves; every field is a flag (the web page's, on another port)."""

    port: int = option(8000, "port to listen on")


class ApiError(Exception):
    """A request the API refuses; becomes OpenAI's error JSON with this status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code

    def body(self) -> dict:
        kind = "permission_error" if self.status == 403 else "invalid_request_error" if self.status < 500 \
            else "server_error"
        return {"error": {"message": str(self), "type": kind, "param": self.param, "code": self.code}}


def available(demo: Demo) -> list[str]:
    """The systems that can run now (an adapter trained after start-up shows up without a restart)."""
    return [s for s in SYSTEMS if not demo.missing(s)]


def text_of(content) -> str:
    """A message's text: a string, or OpenAI's list of parts (text parts joined; other parts refused)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise ApiError(400, "messages: content must be a string or a list of text parts", "messages")


def parse(body, demo: Demo) -> tuple[str, list[dict], bool, bool]:
    """(system, [{role, content}] as text, stream, include_usage) from a request body, or an ``ApiError``."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "model is required: one of " + ", ".join(available(demo)), "model")
    if model not in SYSTEMS or demo.missing(model):
        why = f": {demo.missing(model)}" if model in SYSTEMS else ""
        raise ApiError(404, f"model '{model[:100]}' is not available{why}; this server has: "
                       f"{', '.join(available(demo)) or 'none'}", "model", "model_not_found")
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(400, "messages must be a non-empty list of {role, content} objects", "messages")
    if any(not isinstance(m, dict) or m.get("role") not in ROLES for m in msgs):
        raise ApiError(400, f"messages: each needs a role ({', '.join(ROLES)})", "messages")
    messages = [{"role": m["role"], "content": text_of(m.get("content") or "")} for m in msgs]
    question = messages[-1]["content"].strip()
    if messages[-1]["role"] != "user" or not question:
        raise ApiError(400, "the last message must be the user's question, and not empty", "messages")
    if len(question) > MAX_QUESTION:
        raise ApiError(400, f"the question has {len(question)} characters; at most {MAX_QUESTION}", "messages")
    if body.get("stream") is not None and not isinstance(body["stream"], bool):
        raise ApiError(400, "stream must be true or false", "stream")
    if body.get("n") not in (None, 1):
        raise ApiError(400, "n must be 1 (answers are greedy)", "n")
    if body.get("tools"):
        raise ApiError(400, "tools are not supported", "tools")
    opts = body.get("stream_options") or {}
    return model, messages, bool(body.get("stream")), bool(isinstance(opts, dict) and opts.get("include_usage"))


def cite(out: dict) -> str:
    """The text the API returns after the answer streamed: the top source as ``[1]`` when the reader cited none."""
    if out["abstained"] or out.get("explicit_citation", True) or not out["cited"]:
        return ""
    return "".join(f" [{n}]" for n in out["cited"])


def extra(system: str, out: dict, rw) -> dict:
    """The ``openbook`` field: what the answer rests on."""
    sources = [h | {"n": i, "cited": i in out["cited"]} for i, h in enumerate(out["sources"], 1)]
    return {"system": system, "query": rw.query, "rewritten": rw.rewritten, "rewrite_reason": rw.reason,
            "abstained": out["abstained"], "reason": out["reason"], "explicit_citation": out.get("explicit_citation"),
            "cited": out["cited"], "claimed_source": out.get("claimed_source"), "sources": sources,
            "timings": out["timings"]}


def usage(out: dict, rw) -> dict:
    p, c = out["prompt_tokens"] + rw.prompt_tokens, out["new_tokens"] + rw.new_tokens
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def reply(demo: Demo, system: str, messages: list[dict], piece: Callable[[str], None], stopped=None):
    """(answer dict, rewrite) for one request, one at a time: requests queue on the demo's lock; a client that
    left while queued (``stopped``) costs nothing."""
    with demo.lock:
        if stopped is not None and stopped.is_set():
            return None, None
        rw = demo.standalone(messages)
        out = demo.answer(system, rw.query, None, lambda event, d: piece(d["text"]))
    if suffix := cite(out):
        piece(suffix)
        out["text"] += suffix
    return out, rw


def data(obj: dict) -> str:
    """One server-sent event as OpenAI streams them: a ``data:`` line, no event name."""
    return f"data: {json.dumps(obj)}\n\n"


def create_app(demo: Demo):
    from fastapi import Depends, FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException

    app = FastAPI(title="openbook API", docs_url=None, redoc_url=None, openapi_url=None)
    same_origin = web.guard(app, demo.cfg)
    started = int(time.time())

    @app.exception_handler(ApiError)
    def api_error(request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)  # unknown routes, wrong methods, cross-site requests: OpenAI's shape too
    def http_error(request, e: HTTPException):
        return JSONResponse(ApiError(e.status_code, str(e.detail)).body(), status_code=e.status_code)

    def model_json(system: str) -> dict:
        return {"id": system, "object": "model", "created": started, "owned_by": "openbook",
                "openbook": {"label": LABELS[system][0], "about": LABELS[system][1], "generator": demo.cfg.model,
                             "adapter": demo.compare.adapter(system), "retrieval": system in RETRIEVAL,
                             "docs": demo.cfg.docs}}

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [model_json(s) for s in available(demo)]}

    @app.get("/v1/models/{name:path}")
    def model(name: str):
        if name not in available(demo):
            raise ApiError(404, f"model '{name[:100]}' is not available; this server has: "
                           f"{', '.join(available(demo)) or 'none'}", "model", "model_not_found")
        return model_json(name)

    async def completions(request):
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ApiError(400, "the request body is not JSON") from None
        system, messages, stream, include_usage = parse(body, demo)
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": cid, "created": created, "model": system}

        def finish(out: dict) -> str:
            return "length" if out["new_tokens"] >= demo.cfg.max_new_tokens else "stop"

        if not stream:
            try:
                out, rw = await run_in_threadpool(reply, demo, system, messages, lambda piece: None)
            except Exception as e:
                log.exception("request failed")
                raise ApiError(500, f"{type(e).__name__}: {e}") from None
            return {**head, "object": "chat.completion", "usage": usage(out, rw), "openbook": extra(system, out, rw),
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": out["text"]},
                                 "logprobs": None, "finish_reason": finish(out)}]}

        def chunk(delta: dict | None, finish_reason: str | None = None, **more) -> str:
            choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None,
                                                 "finish_reason": finish_reason}]
            return data({**head, "object": "chat.completion.chunk", "choices": choices, **more})

        def job(put, stopped) -> None:
            put(chunk({"role": "assistant", "content": ""}))
            out, rw = reply(demo, system, messages, lambda piece: put(chunk({"content": piece})), stopped)
            if out is None:
                return
            put(chunk({}, finish(out), openbook=extra(system, out, rw)))
            if include_usage:  # OpenAI's usage chunk: no choices
                put(chunk(None, usage=usage(out, rw)))

        def error(e: Exception) -> str:  # the openai client raises APIError on a chunk with an "error" key
            return data(ApiError(500, f"{type(e).__name__}: {e}").body())

        return StreamingResponse(web.threaded(job, error, last="data: [DONE]\n\n"), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store"})

    # the hint is set here: with postponed annotations FastAPI would look "Request" up in this module's globals, and
    # it is imported in this function so that commands which do not serve skip the web stack
    completions.__annotations__["request"] = Request
    app.post("/v1/chat/completions", dependencies=[Depends(same_origin)])(completions)

    return app


def serve(cfg: ServeConfig) -> None:
    """Build or update the index, then serve the API until Ctrl-C."""
    demo = web.start(cfg)
    base = web.url(cfg)
    print(f"openbook API on {base}/v1 (Ctrl-C stops it); models: {', '.join(available(demo))}\n"
          f"  curl {base}/v1/chat/completions -H 'Content-Type: application/json' -d '{{\"model\": \"rag\", "
          f"\"messages\": [{{\"role\": \"user\", \"content\": \"How long is the warranty?\"}}]}}'")
    web.run(create_app(demo), cfg)
