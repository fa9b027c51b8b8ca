"""The llama.cpp backend of ``Generator``: GGUF models on a CPU at several times transformers' speed.

Runs the packaged 4-bit GGUF files through llama-cpp-python (built from source by ``make setup``): on this
project's 2-core VM the 1.5B reader as packaged (Q4_K_M) reads ~150-176 prompt tokens/s with ggml's AMX kernels
(~57 without; the Makefile says why the build needs -fno-dse for them) and decodes ~12-15 tokens/s, where
transformers manages ~22-48 and ~1.3; on CPUs with AMX it runs from a Q8_0 copy, ~200 and ~14 (``rag.gguf_q8``).
Prompts are rendered with the chat template stored in the GGUF file (the same Jinja template
transformers uses), tokenized with special tokens parsed (document text was defused first, see
``Generator.sanitize``), and decoded greedily token by token, so stop strings, streaming and token counts behave
as on transformers. llama.cpp keeps the KV cache of the previous prompt and re-reads only what differs, which
makes the answer after the judgement nearly free: both share the system prompt, example, question and sources.
``chat_batch`` decodes up to ``PARALLEL`` replies together in a second context with one KV stream per sequence:
decoding one token at a time is compute-bound on a CPU (the 4-bit weights are unpacked for every token), and a step
for 16 sequences unpacks them once, so closed-book replies of the 1.5B came 2.2x (8 together) to 2.9x (32) faster
here; greedy, so the replies are chat()'s but for near-ties the batched kernels break the other way (14 of 16 and
29 of 32 identical). The prompts' common start is read once a batch and copied to every sequence. A model that
judges its own passages does so there too (``judge_answer_batch``): each sequence reads its judgement prompt, and
those that pass go on to the answer turn and decode together. Left out on purpose: GPU offload (transformers or a
served model cover GPUs).
A peft adapter is converted to a GGUF LoRA (rag/gguf_lora.py); on a Q8_0 base it is merged into a copy of the
weights (rag/gguf_merge.py), else llama.cpp applies it at run time.
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from tqdm import tqdm

from rag.generate import ANSWER_STOP, NO, SAMPLING, YES, Generation, Generator, StreamCut, yes_no_logodds
from rag.gguf_q8 import runnable
from rag.models import SMALL_GENERATOR, ModelNotFound, gguf_path

log = logging.getLogger(__name__)
N_CTX = 4096  # prompt + answer tokens; k=3 demo prompts are ~500-900 tokens, and the KV cache costs ~0.1 GB
# on the 2-core AMD EPYC (no AMX) 32 gained nothing: 64 closed-book questions 55.3 s at 16, 55.5 s at 32
PARALLEL = 16  # replies chat_batch decodes together (8: 2.2x, 16: 2.5x, 32: 2.9x one at a time, 1.5B, 2 cores)
SEQ_CTX = 1024  # tokens each of them may hold (prompt + reply; ~0.5 GB of KV cache for 16 on the 1.5B); longer
# prompts go one at a time through the main context (1 of 16 demo RAG prompts, 680-975 tokens, with 64 reply tokens)


def why_not(name: str, device: str | None) -> str | None:
    """Why llama.cpp cannot run this model here (None when it can)."""
    try:
        import llama_cpp  # noqa: F401
    except (ImportError, OSError):  # not installed, or its shared library does not load
        return "llama-cpp-python is not installed (`make setup` builds it; it needs cmake and a C++ compiler)"
    if device not in (None, "cpu"):
        return f"device '{device}' is served by transformers"
    if device is None:
        import torch

        if torch.cuda.is_available():
            return "a CUDA GPU is present: transformers uses it"
    if gguf_path(name) is None:
        return "not a GGUF model (a Hugging Face folder or hub id)"
    return None


def threads() -> int:
    """Every core this process may use: llama-cpp-python's default is half of them for decoding."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def weights(name: str, adapter: str | None = None) -> tuple[str, str | None]:
    """(model file, GGUF LoRA to apply at load or None) llama.cpp runs for ``name`` with ``adapter``: on AMX CPUs a
    Q8_0 copy of a K-quant file (rag.gguf_q8), and on a Q8_0 base the adapter merged into a copy of it, ~1.25x faster
    than applied at run time (rag.gguf_merge); each made on first use. ``make hybrid`` calls it after training so
    that the first answer does not wait for them."""
    path = runnable(gguf_path(name), threads())
    if not adapter:
        return path, None
    from rag.gguf_lora import gguf_adapter
    from rag.gguf_merge import merged_path

    lora = gguf_adapter(adapter, name)
    merged = merged_path(path, lora)
    return (merged, None) if merged else (path, lora)


_OPEN: weakref.WeakSet = weakref.WeakSet()  # every Llama still alive, closed at exit


@atexit.register
def _close_open_models() -> None:
    """Free the models still alive before interpreter shutdown: llama-cpp-python's own __del__ would find its C
    library already unloaded and print a TypeError on every exit. A weak set, not one atexit entry per model: an
    entry would keep every model (and its KV caches) alive for the whole process."""
    for llm in list(_OPEN):
        llm.close()


@functools.cache
def _llama_thread() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(1, thread_name_prefix="openbook-llamacpp")


def on_llama_thread(fn: Callable):
    """Run ``fn`` on the one thread that computes with llama.cpp. Its AMX kernels configure the tile registers
    once per thread, and oneDNN's bf16 kernels (torch: a bf16 re-ranker, LoRA training on a frozen bf16 base)
    release them after every call; a thread that did both died with SIGILL on llama.cpp's next tile load."""
    if threading.current_thread().name.startswith("openbook-llamacpp"):
        return fn()
    return _llama_thread().submit(fn).result()


@functools.cache  # once per process; the cache also keeps the ctypes callback alive while llama.cpp may call it
def _quiet_lora_fallbacks():
    """Print llama.cpp's errors as llama-cpp-python does without ``verbose``, except one per LoRA tensor that
    cannot live in the AMX buffer: llama.cpp reports each as an error (196 lines for the 1.5B's adapter) and then
    runs it from plain CPU memory, which is not one."""
    import ctypes

    import llama_cpp

    @llama_cpp.llama_log_callback
    def callback(level: int, text: bytes, user_data) -> None:
        msg = text.decode("utf-8", "replace")
        if level == 3 and "fallback to CPU" not in msg:  # 3: GGML_LOG_LEVEL_ERROR
            print(msg, end="", file=sys.stderr, flush=True)

    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
    return callback


class LlamaCppGenerator(Generator):
    """``Generator`` on llama.cpp, for GGUF files on a CPU."""

    backend = "llamacpp"

    def __init__(self, name: str, max_new_tokens: int = 64, adapter: str | None = None, n_ctx: int = N_CTX):
        from llama_cpp import Llama
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        self.name, self.max_new_tokens, self.device, self.adapter = name, max_new_tokens, "cpu", adapter
        self._together = None  # chat_batch's context, made on first use
        path, lora = weights(name, adapter)
        if lora:
            _quiet_lora_fallbacks()
        try:
            # use_mmap=False: on AMX CPUs the weights are repacked into buffers of their own, and a mapping kept the
            # file's pages resident too (the 1.5B's Q8_0 copy: 3.5 GB RSS a model mapped, 2.2 GB read). Loaded on the
            # thread that computes, as everything llama.cpp does here. Flash attention stays off: it read the 1.5B's
            # RAG prompts ~10% faster on this VM, but a reply then depended on what the KV cache held (the 135M
            # asked one prompt twice answered 12:30, then 12:15), and a reference run must not.
            self.llm = on_llama_thread(lambda: Llama(
                model_path=path, n_ctx=n_ctx, n_threads=threads(), n_threads_batch=threads(), lora_path=lora,
                verbose=False, use_mmap=False))
        except (ValueError, RuntimeError) as e:  # llama.cpp reports a damaged file only as "failed to load"
            if lora:
                from rag.gguf_lora import AdapterError

                raise AdapterError(f"llama.cpp could not apply the adapter {lora} to {path} ({e})") from None
            raise ModelNotFound(f"llama.cpp could not load {path} ({e}); if it is a packaged model, delete that "
                                "file and run `make setup` to join its parts again") from None
        _OPEN.add(self.llm)
        self.weights = os.path.basename(path)
        meta = self.llm.metadata
        template = meta.get("tokenizer.chat_template")
        if not template:
            raise ModelNotFound(f"{path} has no chat template in its metadata; openbook needs an instruct model")
        vocab = self.llm._model
        self.eos = vocab.token_eos()

        def piece(i: int) -> str:
            return vocab.token_get_text(i) if i >= 0 else ""

        self._format = Jinja2ChatFormatter(template, eos_token=piece(self.eos), bos_token=piece(vocab.token_bos()))
        from llama_cpp import LLAMA_TOKEN_ATTR_CONTROL, LLAMA_TOKEN_ATTR_USER_DEFINED

        special = LLAMA_TOKEN_ATTR_CONTROL | LLAMA_TOKEN_ATTR_USER_DEFINED  # what tokenize(special=True) matches
        texts = {vocab.token_get_text(i) for i in range(self.llm.n_vocab()) if vocab.token_get_attr(i) & special}
        self.control_tokens = sorted((t for t in texts if len(t) > 1), key=len, reverse=True)
        self.yes_no_ids = {s: self.llm.tokenize(s.encode(), add_bos=False)[0] for s in (*YES, *NO)}

    def close(self) -> None:
        """Free the model, its contexts and adapter now (again: nothing)."""
        llm = getattr(self, "llm", None)  # absent when loading failed
        if llm is not None:
            llm.close()
            _OPEN.discard(llm)

    def __del__(self) -> None:
        # llama-cpp-python's Llama with a LoRA is in a reference cycle (its exit stack's callback holds it), so a
        # dropped adapter generator kept its memory (1.3-1.8 GB for the 1.5B) until the cyclic GC ran; compare
        # --seeds 3 --freshness makes one per adapter system and seed (max RSS 22 GB on the demo before this)
        try:
            self.close()
        except (AttributeError, TypeError):  # at interpreter exit, after atexit closed it and globals went
            pass

    def tokens(self, messages: list[dict]) -> list[int]:
        """Prompt token ids: the GGUF's chat template, special tokens parsed (documents were defused before)."""
        text = self._format(messages=messages).prompt
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def _generate(self, prompt: list[int], max_new: int, stop: tuple[str, ...], on_token, **sampling) -> Generation:
        return on_llama_thread(lambda: self._decode(prompt, max_new, stop, on_token, **sampling))

    def _decode(self, prompt: list[int], max_new: int, stop: tuple[str, ...], on_token, **sampling) -> Generation:
        t0 = time.perf_counter()
        self._check_fits(prompt, max_new)
        cut, ids, greedy = StreamCut(stop, on_token), [], not sampling
        for tok in self.llm.generate(prompt, temp=0.0 if greedy else sampling["temperature"],
                                     top_k=1 if greedy else sampling["top_k"],
                                     top_p=1.0 if greedy else sampling["top_p"], min_p=0.0, repeat_penalty=1.0):
            if not self._take(tok, ids, cut, max_new):
                break
        return Generation(cut.text, len(prompt), len(ids), time.perf_counter() - t0)

    def _take(self, tok: int, ids: list[int], cut: StreamCut, max_new: int) -> bool:
        """Add the sampled ``tok`` to a reply (``ids``, ``cut``); False once the reply has ended."""
        import llama_cpp

        if llama_cpp.llama_vocab_is_eog(self.llm._model.vocab, tok):
            return False
        ids.append(tok)
        # the whole reply decoded again (≤ a few dozen tokens): a character split across tokens shows only once its
        # last byte has arrived, so the text only ever grows
        text = self.llm.detokenize(ids).decode("utf-8", errors="ignore")
        return not cut.feed(text[len(cut.raw):]) and len(ids) < max_new

    def _check_fits(self, prompt: list[int], max_new: int) -> None:
        if len(prompt) + max_new > self.llm.n_ctx():
            raise ValueError(f"the prompt has {len(prompt)} tokens and the context holds {self.llm.n_ctx()}; "
                             "use a smaller --k or --chunk-size")

    def chat(self, messages: list[dict], on_token: Callable[[str], None] | None = None,
             max_new_tokens: int | None = None, stop: tuple[str, ...] = ()) -> Generation:
        return self._generate(self.tokens(messages), max_new_tokens or self.max_new_tokens, stop, on_token)

    def chat_batch(self, conversations: list[list[dict]], max_new_tokens: int | None = None,
                   batch_size: int = 16, samples: int = 0, seed: int = 0, desc: str = "",
                   stop: tuple[str, ...] = ()) -> list[Generation]:
        """Greedy replies ``PARALLEL`` at a time (``batch_size`` is transformers' setting; each reply's
        ``seconds`` is then its group's time divided by the group's size: throughput, not one user's latency);
        n samples go one conversation after another and re-use their prompt's cache."""
        max_new = max_new_tokens or self.max_new_tokens
        prompts = [self.tokens(m) for m in conversations]
        if samples:
            out = []
            for j, prompt in enumerate(tqdm(prompts, desc=desc, disable=not desc, unit="prompt")):
                for i in range(samples):
                    self.llm.set_seed(seed * 1_000_003 + j * 1009 + i)  # reproducible, different per draw
                    out.append(self._generate(prompt, max_new, stop, None, **SAMPLING))
            return out
        return on_llama_thread(lambda: self._parallel(prompts, max_new, stop, desc))

    def _parallel(self, prompts: list[list[int]], max_new: int, stop: tuple[str, ...], desc: str) -> list:
        out: list[Generation | None] = [None] * len(prompts)
        fits = [i for i, p in enumerate(prompts) if len(p) + max_new <= SEQ_CTX]
        with tqdm(total=len(prompts), desc=desc, disable=not desc, unit="prompt") as bar:
            for i in sorted(set(range(len(prompts))) - set(fits)):
                out[i] = self._decode(prompts[i], max_new, stop, None)
                bar.update()
            for start in range(0, len(fits), PARALLEL):
                group = fits[start:start + PARALLEL]
                for i, g in zip(group, self._decode_together([prompts[i] for i in group], max_new, stop),
                                strict=True):
                    out[i] = g
                bar.update(len(group))
        return out

    def _parallel_context(self):
        """The second context: ``PARALLEL`` KV streams of ``SEQ_CTX`` tokens, the adapter applied, made once."""
        if self._together is None:
            import ctypes

            import llama_cpp
            from llama_cpp import _internals

            cp = self.llm.context_params
            params = type(cp).from_buffer_copy(cp)  # the main context's settings (threads, batch size, ...)
            params.n_ctx, params.n_seq_max, params.kv_unified = PARALLEL * SEQ_CTX, PARALLEL, False
            ctx = _internals.LlamaContext(model=self.llm._model, params=params, verbose=False)
            if self.llm._lora_adapter is not None:
                adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(self.llm._lora_adapter)
                if llama_cpp.llama_set_adapters_lora(ctx.ctx, adapters, 1, (ctypes.c_float * 1)(self.llm.lora_scale)):
                    raise RuntimeError(f"llama.cpp could not apply the adapter {self.adapter} to a second context")
            batch = _internals.LlamaBatch(n_tokens=self.llm.n_batch, embd=0, n_seq_max=1, verbose=False)
            # freed with the model: LlamaContext put its close on the model's exit stack, which runs it first
            self.llm._stack.callback(batch.close)
            self._together = (ctx, batch)
        return self._together

    def judge_answer_batch(self, asks: list[tuple[str, list[tuple[str, str]]]], passes: Callable[[int, float], bool],
                           desc: str = "") -> list[tuple[float, float, Generation | None]]:
        """``Generator.judge_answer_batch`` ``PARALLEL`` questions at a time: each sequence reads its judgement
        prompt, and those that pass read on to the answer turn (a few dozen tokens: the judgement's KV stays) and
        reply together; the seconds are then each group's judging time divided by its size. A prompt too long for
        a sequence (``SEQ_CTX``) goes one at a time through the main context."""
        judge_prompts = [self.tokens(self.judge_prompt(q, srcs)) for q, srcs in asks]
        prompts = [self.tokens(self.prompt(q, srcs)) for q, srcs in asks]
        fits = [i for i, p in enumerate(prompts) if len(p) + self.max_new_tokens <= SEQ_CTX]
        alone = sorted(set(range(len(asks))) - set(fits))
        out: list = [None] * len(asks)
        with tqdm(total=len(asks), desc=desc, disable=not desc, unit="question") as bar:
            for i, row in zip(alone, super().judge_answer_batch([asks[i] for i in alone],
                                                                lambda j, odds: passes(alone[j], odds)), strict=True):
                out[i] = row
                bar.update()

            def groups() -> None:
                for start in range(0, len(fits), PARALLEL):
                    group = fits[start:start + PARALLEL]
                    gens, odds, seconds = self._decode_together(
                        [prompts[i] for i in group], self.max_new_tokens, ANSWER_STOP,
                        judge=([judge_prompts[i] for i in group], lambda s, v, group=group: passes(group[s], v)))
                    for s, i in enumerate(group):
                        out[i] = (odds[s], seconds, gens[s])
                    bar.update(len(group))

            on_llama_thread(groups)
        return out

    def _decode_together(self, prompts: list[list[int]], max_new: int, stop: tuple[str, ...],
                         judge: tuple[list[list[int]], Callable[[int, float], bool]] | None = None):
        """Greedy replies to ``prompts`` (≤ ``PARALLEL``, each fitting ``SEQ_CTX``), one sequence per prompt.

        ``judge``: (judgement prompts, ``passes``): each sequence first reads its judgement prompt, and only those
        whose yes/no log-odds ``passes(sequence, log_odds)`` go on from the tokens both prompts share to the rest of
        their answer prompt; then (replies, None for one that did not pass; the log-odds; judging seconds a
        sequence)."""
        import llama_cpp
        import numpy as np

        t0 = time.perf_counter()
        ctx, batch = self._parallel_context()
        mem = llama_cpp.llama_get_memory(ctx.ctx)
        llama_cpp.llama_memory_clear(mem, True)
        b, n_vocab = batch.batch, self.llm.n_vocab()
        nxt: list[int] = [0] * len(prompts)
        odds: list[float] = [0.0] * len(prompts)
        wants: list[tuple[int, int]] = []  # (sequence, its row in the batch) whose next token the batch gives
        judging = judge is not None

        def add(token: int, pos: int, seq: int, last: bool) -> None:
            n = b.n_tokens
            b.token[n], b.pos[n], b.n_seq_id[n], b.seq_id[n][0], b.logits[n] = token, pos, 1, seq, last
            b.n_tokens = n + 1
            if last:
                wants.append((seq, n))

        def run() -> None:
            if not b.n_tokens:
                return
            ctx.decode(batch)
            for seq, row in wants:
                logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx.ctx, row), shape=(n_vocab,))
                if judging:
                    odds[seq] = yes_no_logodds(logits, self.yes_no_ids)
                else:
                    nxt[seq] = int(np.argmax(logits))
            wants.clear()
            b.n_tokens = 0

        def read(seq: int, prompt: list[int], start: int, end: int) -> None:  # in batches of up to n_batch tokens
            for pos in range(start, end):
                if b.n_tokens == self.llm.n_batch:
                    run()
                add(prompt[pos], pos, seq, pos == len(prompt) - 1)

        # the start every prompt shares (system prompt, worked example: 200 of ~800 demo RAG tokens) is read once, as
        # sequence 0, and its KV stream copied to the others; each then reads the rest of its own prompt (at least
        # its last token, whose logits give the first reply token)
        first = judge[0] if judge else prompts
        shared = min(len(os.path.commonprefix(first)), min(map(len, first)) - 1) if len(first) > 1 else 0
        b.n_tokens = 0
        if shared:
            read(0, first[0], 0, shared)
            run()
            for seq in range(1, len(first)):
                llama_cpp.llama_memory_seq_cp(mem, 0, seq, -1, -1)  # one stream per sequence: a whole-stream copy
        for seq, prompt in enumerate(first):
            read(seq, prompt, shared, len(prompt))
            # each sequence's rest in batches of its own: with one KV stream per sequence llama.cpp cuts a batch of
            # several into equal-length pieces (one group of 16 demo prompts: 170 vs 177 prompt tokens/s; a whole
            # RAG arm of make compare: 307 vs 311 s, no measurable gain)
            run()
        active, judged_s, t1 = list(range(len(prompts))), 0.0, t0
        if judge:
            t1 = time.perf_counter()
            judging, judged_s = False, (t1 - t0) / len(prompts)
            active = [seq for seq in active if judge[1](seq, odds[seq])]
            for seq in active:  # the judgement's tokens stay; its answer turn is read from where the prompts part
                keep = min(len(os.path.commonprefix([first[seq], prompts[seq]])), len(prompts[seq]) - 1)
                llama_cpp.llama_memory_seq_rm(mem, seq, keep, -1)
                read(seq, prompts[seq], keep, len(prompts[seq]))
                run()
        cuts, ids = [StreamCut(stop) for _ in prompts], [[] for _ in prompts]
        answering = list(active)
        while active:
            active = [seq for seq in active if self._take(nxt[seq], ids[seq], cuts[seq], max_new)]
            for seq in active:
                add(nxt[seq], len(prompts[seq]) + len(ids[seq]) - 1, seq, True)
            if active:
                run()
        # replies' seconds: the group's time divided by its size (with a judgement first, the answering ones')
        share = (time.perf_counter() - t1) / max(len(answering), 1)
        gens = [Generation(c.text, len(p), len(i), share) if seq in answering else None
                for seq, (c, p, i) in enumerate(zip(cuts, prompts, ids, strict=True))]
        return (gens, odds, judged_s) if judge else gens

    def _yes_logodds(self, messages: list[dict]) -> float:
        import numpy as np

        prompt, llm = self.tokens(messages), self.llm
        self._check_fits(prompt, 1)

        def read() -> float:
            # re-read only what differs from the cached tokens (at least one token, for fresh logits of the last)
            keep = min(llm.longest_token_prefix(llm._input_ids.tolist(), prompt), len(prompt) - 1)
            llm._ctx.kv_cache_seq_rm(-1, keep, -1)
            llm.n_tokens = keep
            llm.eval(prompt[keep:])
            return yes_no_logodds(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),)),
                                  self.yes_no_ids)

        return on_llama_thread(read)


def self_check(model: str = SMALL_GENERATOR) -> str:
    """Load a packaged GGUF and decode a few tokens: `make setup` runs this in a child process after building,
    because a build for the wrong instruction set fails only when it runs (SIGILL), not when it compiles."""
    gen = LlamaCppGenerator(model, max_new_tokens=4)
    # a prompt of ~100 tokens: llama.cpp reads short ones with other kernels than real prompts (AMX tiles on Intel)
    words = " ".join(f"item{i}" for i in range(40))
    return gen.chat([{"role": "user", "content": f"Here is a list: {words}. Say OK."}]).text


if __name__ == "__main__":
    print("llama.cpp self-check:", repr(self_check()))
