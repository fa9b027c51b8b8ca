"""The served backend of ``Generator``: any OpenAI-compatible chat server (vLLM, llama.cpp's server) answers.

``--model openai:MODEL@URL`` (e.g. ``openai:qwen@http://127.0.0.1:8000/v1``; without ``@URL``: ``OPENAI_BASE_URL``,
else that address) sends every prompt to ``URL/chat/completions``; the key comes from ``OPENAI_API_KEY`` (local
servers accept anything). A LoRA adapter is chosen by the name the server serves it under (vLLM:
``--lora-modules NAME=FOLDER``; llama-cpp-python: a config file whose model alias carries a ``lora_path``): that
name replaces MODEL in the requests. Follows the chat-completions protocol as vLLM and llama.cpp implement it:
temperature 0 (greedy), a fixed seed, llama.cpp's repetition penalty switched off (its server defaults to 1.1,
which would punish copying a source), stop strings sent to the server *and* cut here with ``StreamCut`` so the
reply ends where the in-process backends end it, tokens streamed (server-sent events) when someone listens.
The judgement is read from ``logprobs`` of the first reply token (the top 20, the protocol's maximum).
Talks HTTP with httpx rather than the ``openai`` client: the protocol needs one POST and a few lines of SSE, the
server-specific fields (``repeat_penalty``) go in the same JSON, an unreachable server is reported at once (the
client retries twice first), and openbook's dependencies install httpx (fitz-gov requires it) but not the client.
Left out on purpose: the server's tokenizer (token counts are what the server reports; llama.cpp's server reports
none in a stream, so a streamed answer counts its events and 0 prompt tokens), loading adapters at run time
(vLLM's ``/v1/load_lora_adapter``), and the official OpenAI API as a target (it promises no greedy decoding).
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from tqdm import tqdm

from rag.generate import NO, SAMPLING, YES, BackendUnavailable, Generation, Generator, JudgeUnavailable, StreamCut

log = logging.getLogger(__name__)
PREFIX = "openai:"
DEFAULT_URL = "http://127.0.0.1:8000/v1"  # where both `vllm serve` and `python -m llama_cpp.server` listen
TOP_LOGPROBS = 20  # OpenAI's and vLLM's (--max-logprobs) upper limit
WORKERS = 8  # concurrent requests of chat_batch: vLLM batches them on the GPU; llama.cpp's server queues them
# Only llama.cpp's servers know this field; vLLM ignores unknown fields with a warning. A server that rejects it
# (400 naming it) gets requests without it from then on.
GREEDY_EXTRA = {"repeat_penalty": 1.0}
# The server applies the chat template and parses special tokens in the rendered text (vLLM and llama.cpp both
# do), and the protocol does not say which strings are special for the served model; so documents are defused of
# the turn markers of the families a reader is likely to be: ChatML (Qwen, SmolLM2), Llama 3, Llama 2/Mistral,
# Gemma, Phi-3. Defusing a string that is not special to the model costs one space in the document text.
CONTROL_TOKENS = sorted({
    "<|im_start|>", "<|im_end|>", "<|endoftext|>",  # ChatML
    "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
    "<|eom_id|>", "<|python_tag|>",  # Llama 3
    "[INST]", "[/INST]", "<<SYS>>", "<</SYS>>", "<s>", "</s>", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",  # Mistral
    "<start_of_turn>", "<end_of_turn>", "<bos>", "<eos>",  # Gemma
    "<|system|>", "<|user|>", "<|assistant|>", "<|end|>",  # Phi-3
}, key=len, reverse=True)
_NAME = re.compile(r"openai:([^@\s]+)(?:@(https?://\S+))?")


class ServerError(BackendUnavailable):
    """The chat server cannot be reached, does not serve the model, or refused a request; one line says why."""


def is_served(name: str) -> bool:
    return name.startswith(PREFIX)


def parse_served(name: str) -> tuple[str, str]:
    """(served model name, base URL ending in the API root) of an ``openai:MODEL@URL`` model name.

    >>> parse_served("openai:qwen@http://127.0.0.1:8080/v1/"), parse_served("openai:ft@http://gpu:8000")
    (('qwen', 'http://127.0.0.1:8080/v1'), ('ft', 'http://gpu:8000/v1'))
    """
    m = _NAME.fullmatch(name.strip())
    if not m:
        raise ValueError(f"--model {name}: a served model is openai:MODEL@URL, e.g. "
                         f"openai:qwen@{DEFAULT_URL} (MODEL as the server lists it at URL/models)")
    url = (m[2] or os.environ.get("OPENAI_BASE_URL") or DEFAULT_URL).rstrip("/")
    if re.fullmatch(r"https?://[^/]+", url):  # a bare host:port: both servers put the API under /v1
        url += "/v1"
    return m[1], url


def _message(text: str) -> str:
    """The message of an error body: ``{"error": {"message": …}}`` (OpenAI, llama.cpp), ``{"message": …}`` (older
    vLLM), or the text itself, on one line."""
    try:
        body = json.loads(text)
        err = body.get("error", body) if isinstance(body, dict) else {}
        text = str(err.get("message") or text) if isinstance(err, dict) else str(err)
    except ValueError:
        pass
    return " ".join(text.split())[:300]


class OpenAIGenerator(Generator):
    """``Generator`` on an OpenAI-compatible chat server."""

    backend = "openai"

    def __init__(self, name: str, max_new_tokens: int = 64, adapter: str | None = None, timeout: float = 300.0):
        import httpx

        self.name, self.max_new_tokens, self.adapter, self.device = name, max_new_tokens, adapter, "server"
        self.model_id, self.url = parse_served(name)
        self.served = adapter or self.model_id  # a LoRA is asked for by its served name, in place of the base
        self.control_tokens, self._extra = CONTROL_TOKENS, dict(GREEDY_EXTRA)
        key = os.environ.get("OPENAI_API_KEY") or "not-needed"  # local servers take any key
        self.http = httpx.Client(base_url=self.url, timeout=timeout, headers={"Authorization": f"Bearer {key}"})
        # llama-cpp-python's server answers a model it does not serve with its first one, silently: check first
        served = self.models()
        for what, want in (("--model", self.model_id), ("--adapter", adapter)):
            if want and want not in served:
                raise ServerError(f"{what} '{want}': the server at {self.url} serves {', '.join(served) or 'nothing'}"
                                  f"; pass one of those")

    def models(self) -> list[str]:
        """The model (and adapter) names the server lists at ``/models``."""
        return [m["id"] for m in self._call("GET", "/models").json().get("data", [])]

    def _call(self, method: str, path: str, body: dict | None = None, stream: bool = False):
        """An HTTP request; an unreachable server or an error status becomes one ``ServerError`` line."""
        import httpx

        try:
            req = self.http.build_request(method, path, json=body)
            r = self.http.send(req, stream=stream)
        except httpx.TransportError as e:
            raise self._lost(e) from None
        if r.status_code >= 400:
            text = (r.read() if stream else r.content).decode("utf-8", "replace")
            r.close()
            if r.status_code == 400 and body and any(k in text for k in self._extra):
                log.warning("%s rejects %s; sending requests without it", self.url, ", ".join(self._extra))
                self._extra = {}
                return self._call(method, path, {k: v for k, v in body.items() if k not in GREEDY_EXTRA}, stream)
            raise ServerError(f"the server at {self.url} answered {r.status_code} to {path}: {_message(text)}")
        return r

    def _lost(self, e: Exception) -> ServerError:
        import httpx

        if isinstance(e, (httpx.ConnectError, httpx.ConnectTimeout)):
            return ServerError(f"no OpenAI-compatible server answers at {self.url} ({type(e).__name__}: {e}); "
                               "start one, e.g. `python -m llama_cpp.server --model FILE.gguf` or `vllm serve "
                               "MODEL`, or fix the URL in --model openai:MODEL@URL")
        return ServerError(f"the server at {self.url} stopped answering ({type(e).__name__}: {e or 'timed out'})")

    def _body(self, messages: list[dict], max_new: int, stop: tuple[str, ...], sampling: dict | None = None,
              seed: int = 0) -> dict:
        body = {"model": self.served, "messages": messages, "max_tokens": max_new, "seed": seed, **self._extra}
        if stop:
            body["stop"] = list(stop)[:4]  # the protocol allows 4; StreamCut applies them all anyway
        if sampling:  # re-wordings for fine-tuning data; top_k is not in the protocol, servers that know it use it
            body |= {"temperature": sampling["temperature"], "top_p": sampling["top_p"], "top_k": sampling["top_k"]}
        else:
            body |= {"temperature": 0.0, "top_p": 1.0}
        return body

    def _generate(self, messages: list[dict], max_new: int, stop: tuple[str, ...], on_token=None,
                  sampling: dict | None = None, seed: int = 0) -> Generation:
        import httpx

        t0, cut = time.perf_counter(), StreamCut(stop, on_token)
        body = self._body(messages, max_new, stop, sampling, seed)
        if on_token is None:  # one JSON answer: it carries the token counts, which llama.cpp's stream does not
            out = self._call("POST", "/chat/completions", body).json()
            cut.feed(out["choices"][0]["message"].get("content") or "")
            usage = out.get("usage") or {}
            return Generation(cut.text, usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0),
                              time.perf_counter() - t0)
        body |= {"stream": True, "stream_options": {"include_usage": True}}  # vLLM reports usage in the last event
        pieces, usage = 0, {}
        r = self._call("POST", "/chat/completions", body, stream=True)
        try:
            for line in r.iter_lines():
                if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                    continue  # blank separators, ": ping" comments, the end marker
                event = json.loads(line[5:])
                if "error" in event:
                    raise ServerError(f"the server at {self.url} failed mid-answer: {_message(json.dumps(event))}")
                usage = event.get("usage") or usage
                delta = (event.get("choices") or [{}])[0].get("delta") or {}
                if delta.get("content"):
                    pieces += 1  # one event per token on vLLM and llama.cpp: the count when usage is missing
                    if cut.feed(delta["content"]):
                        break  # closing the stream cancels the rest on the server
        except httpx.TransportError as e:  # the server went away mid-answer
            raise self._lost(e) from None
        finally:
            r.close()
        if on_token and len(cut.text) > len(cut.sent):  # a held-back possible stop start that never completed
            on_token(cut.text[len(cut.sent):])
        return Generation(cut.text, usage.get("prompt_tokens", 0), usage.get("completion_tokens", pieces),
                          time.perf_counter() - t0)

    def chat(self, messages: list[dict], on_token: Callable[[str], None] | None = None,
             max_new_tokens: int | None = None, stop: tuple[str, ...] = ()) -> Generation:
        return self._generate(messages, max_new_tokens or self.max_new_tokens, stop, on_token)

    def chat_batch(self, conversations: list[list[dict]], max_new_tokens: int | None = None,
                   batch_size: int = 16, samples: int = 0, seed: int = 0, desc: str = "",
                   stop: tuple[str, ...] = ()) -> list[Generation]:
        """Concurrent requests, at most ``min(batch_size, WORKERS)`` in flight (a server batches what arrives
        together); each sample is its own request with its own seed, as llama.cpp's in-process draws."""
        n, max_new = max(samples, 1), max_new_tokens or self.max_new_tokens
        jobs = [(messages, seed * 1_000_003 + j * 1009 + i) for j, messages in enumerate(conversations)
                for i in range(n)]
        with ThreadPoolExecutor(max(1, min(batch_size, WORKERS)), thread_name_prefix="openbook-openai") as pool:
            done = pool.map(lambda job: self._generate(job[0], max_new, stop, None,
                                                       SAMPLING if samples else None, job[1] if samples else 0), jobs)
            return list(tqdm(done, total=len(jobs), desc=desc, disable=not desc, unit="reply"))

    def _yes_logodds(self, messages: list[dict]) -> float:
        """``yes_no_logodds`` from the first reply token's top log-probs (the softmax normaliser cancels as it
        does for logits). A side none of whose spellings is in the top 20 counts at the 20th's log-prob: its own
        is at most that, so the sign is right and the size a bound."""
        body = self._body(messages, 1, ()) | {"logprobs": True, "top_logprobs": TOP_LOGPROBS}
        why = f"the server at {self.url} returned no logprobs for '{self.served}'"
        try:
            out = self._call("POST", "/chat/completions", body).json()
        except ServerError as e:  # refused rather than left out (llama.cpp without logits_all, vLLM's max-logprobs)
            if "logprob" not in str(e).lower():
                raise
            why = str(e)
            out = {"choices": [{}]}
        content = ((out["choices"][0].get("logprobs") or {}).get("content") or [{}])[0]
        top = {t["token"]: t["logprob"] for t in content.get("top_logprobs") or []}
        if not top:
            raise JudgeUnavailable(f"{why}: the judge signal needs them; use --abstain none or a rule without judge "
                              "(e.g. rerank<0)")
        floor = min(top.values())
        return max(top.get(s, floor) for s in YES) - max(top.get(s, floor) for s in NO)
