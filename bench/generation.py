"""Generation speed of the default generator: prompt tokens/s, decode tokens/s, and the memory-bandwidth bound.

Decoding one token reads every weight once, so on a CPU its ceiling is bandwidth / weight bytes; the
bandwidth is measured here (a large numpy copy, read + write bytes), not looked up. Prompt processing is
compute-bound (one forward over the whole prompt). Timings: one ``generate`` of 64 forced greedy tokens, its
clock stamped at every step (prefill = start to first step; decode = the steps after); medians of ``repeats``
after a warm-up run. Variants tried: threads,
bf16 weights, torch int8 dynamic quantisation of the Linear layers, torch.compile, KV cache off / dynamic /
static, and a LoRA adapter unmerged vs merged. "same tokens" counts greedy tokens equal to the fp32 default's —
a cheap drift check, *not* the golden-set quality test a new default would need; no rag default is changed here.
A second table runs every installed packaged GGUF model on llama.cpp (openbook's CPU default): the same grounded
prompt, prefill and decode tokens/s, and decode against its own bound (bandwidth ÷ the GGUF file's bytes, all of
which a decoded token reads, the tied embedding table included), on all cores and again on one: a decode rate
that halves with the threads is limited by compute (dequantising the 4-bit blocks), not by memory bandwidth.
"""

from __future__ import annotations

import copy
import logging
import statistics
import time

from bench.measure import cores, memory_bandwidth_gbs, set_threads, timed

log = logging.getLogger(__name__)
NEW = 64


def weight_bytes(model) -> int:
    """Bytes of parameters and buffers read per decoded token (tied embeddings counted once; packed int8 too)."""
    import torch

    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    for m in model.modules():  # dynamically quantised Linear layers keep packed int8 weights outside parameters()
        if hasattr(m, "_packed_params") and hasattr(m, "weight"):
            w = m.weight()
            total += w.numel() * w.element_size() + (m.bias().numel() * 4 if m.bias() is not None else 0)
    return total if total else sum(p.numel() for p in model.parameters()) * torch.float32.itemsize


def speed(model, enc, repeats: int, new: int = NEW, **gen_kwargs) -> dict:
    """Prefill and decode rates of ``model.generate`` on one prompt (greedy, one sequence), medians of ``repeats``.

    A logits processor stamps the clock at every step: the first stamp ends the prefill, the rest are decoding.
    """
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    class Stamp(LogitsProcessor):
        def __init__(self):
            self.times = []

        def __call__(self, input_ids, scores):
            self.times.append(time.perf_counter())
            return scores

    n_prompt = enc["input_ids"].shape[1]
    prefill, decode, out, first = [], [], None, 0.0
    for i in range(repeats + 1):  # the first run is a warm-up (allocations, lazy init, torch.compile's compile)
        stamp = Stamp()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0,
                                 logits_processor=LogitsProcessorList([stamp]), **gen_kwargs)
        if not i:
            first = time.perf_counter() - t0
        else:
            prefill.append(stamp.times[0] - t0)
            decode.append((len(stamp.times) - 1) / (stamp.times[-1] - stamp.times[0]))
    t1 = statistics.median(prefill)
    return {"prompt_tokens": n_prompt, "prefill_s": round(t1, 3), "prefill_tok_s": round(n_prompt / t1, 1),
            "decode_tok_s": round(statistics.median(decode), 2), "first_run_s": round(first, 2),
            "ids": out[0, n_prompt:].tolist()}


def variants(smoke: bool, n: int):
    """(name, how to get the model from the fp32 base, extra generate kwargs, threads); ``n`` threads by default."""
    import torch

    def bf16(m):
        return copy.deepcopy(m).to(torch.bfloat16)

    def int8(m):
        from torch.ao.quantization import quantize_dynamic

        return quantize_dynamic(copy.deepcopy(m), {torch.nn.Linear}, dtype=torch.qint8)

    def compiled(m):
        m = copy.deepcopy(m)
        m.forward = torch.compile(m.forward, dynamic=False)
        return m

    def lora(m, merged: bool):
        from finetune.lora import add_lora
        from finetune.train import TrainConfig

        peft = add_lora(copy.deepcopy(m), TrainConfig())
        for name, p in peft.named_parameters():  # B starts at zero; give it values so the adapter does something
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=1e-3)
        peft.eval()
        return peft.merge_and_unload() if merged else peft

    if smoke:
        return [("fp32 (default)", None, {}, n)]
    out = [("fp32 (default)", None, {}, n), ("fp32, 1 thread", None, {}, 1), ("bf16", bf16, {}, n),
           ("int8 dynamic (Linear)", int8, {}, n), ("KV cache off", None, {"use_cache": False}, n),
           ("static KV cache", None, {"cache_implementation": "static"}, n),
           ("LoRA r=8 unmerged", lambda m: lora(m, False), {}, n),
           ("LoRA r=8 merged", lambda m: lora(m, True), {}, n)]
    out.append(("torch.compile + static KV cache", compiled, {"cache_implementation": "static"}, n))
    return out


def run(smoke: bool = False, repeats: int = 3, threads: int | None = None) -> dict:
    import torch

    from bench.governance import contexts
    from rag.models import SMALL_GENERATOR
    from rag.runtime import load_generator

    t0 = time.perf_counter()
    threads = threads or cores()
    set_threads(threads)
    bw = memory_bandwidth_gbs(64 if smoke else 512)
    gen = load_generator(SMALL_GENERATOR, backend="transformers")  # the torch variants below need its model
    from fitz_gov import Tier, load_tier

    case = next(c for c in load_tier(Tier.CORE) if c.category.value == "trustworthy_direct")
    enc = gen.tokenizer.apply_chat_template(gen.prompt(case.query, contexts(case)), add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)
    base = gen.model
    base_bytes = weight_bytes(base)
    out = {"model": SMALL_GENERATOR, "parameters": sum(p.numel() for p in base.parameters()),
           "memory_bandwidth_gbs": bw,
           "bandwidth_method": "numpy copy of a large array, (read + write) / time, best of 5",
           "variants": {}}
    reference = None
    new = 8 if smoke else NEW
    out.update(new_tokens=new, repeats=1 if smoke else repeats)
    for name, make, kwargs, n in variants(smoke, threads):
        set_threads(n)
        row: dict = {"threads": n}
        try:
            model, build = timed(make, base) if make else (base, 0.0)
            row["prepare_s"] = round(build, 2)
            reps = 1 if smoke else repeats
            n_new = min(new, 16) if kwargs.get("use_cache") is False else new
            res = speed(model, enc, reps, n_new, **kwargs)
            ids = res.pop("ids")
            reference = reference or ids
            row.update(res, same_tokens=f"{sum(a == b for a, b in zip(ids, reference, strict=False))}/{len(ids)}")
            wb = weight_bytes(model)
            row["weight_mb"] = round(wb / 2**20, 1)
            row["bandwidth_bound_tok_s"] = round(bw * 1e9 / wb, 1)
            row["ratio_to_bound"] = round(row["decode_tok_s"] / row["bandwidth_bound_tok_s"], 3)
            if kwargs.get("use_cache") is False:
                row["note"] = f"{n_new} new tokens: each step re-runs the whole prompt, so it is not bandwidth-bound"
        except Exception as e:  # noqa: BLE001 -- a variant the stack cannot run is a result, not a crash
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        out["variants"][name] = row
        log.info("generation %s: %s", name, row)
    out["base_weight_mb"] = round(base_bytes / 2**20, 1)
    out["note"] = ("decode ratio_to_bound = measured decode tok/s ÷ (bandwidth ÷ weight bytes); same_tokens compares "
                   "greedy output with the fp32 default (drift check only; answer quality on the golden set was not "
                   "re-measured, so no default changes)")
    out["torch"] = torch.__version__
    out["llamacpp"] = llamacpp_rows(gen.prompt(case.query, contexts(case)), bw, threads, 8 if smoke else NEW,
                                    1 if smoke else repeats, models=("smollm2-135m",) if smoke else None, smoke=smoke)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def _llama_speed(llm, prompt: list[int], new: int, repeats: int) -> tuple[float, float]:
    """Median prefill and decode tokens/s of ``new`` greedy tokens after ``prompt``, after a warm-up run."""
    prefill, decode = [], []
    for _ in range(repeats + 1):  # the first is a warm-up
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        t1 = time.perf_counter()
        n = 0
        for _tok in llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0):  # prompt cached: decode only
            n += 1
            if n == new:
                break
        prefill.append(len(prompt) / (t1 - t0))
        decode.append(n / (time.perf_counter() - t1))
    return statistics.median(prefill[1:]), statistics.median(decode[1:])


def llamacpp_rows(messages: list[dict], bw: float, threads: int, new: int, repeats: int,
                  models: tuple[str, ...] | None = None, smoke: bool = False) -> dict:
    """Prefill and decode tokens/s of each installed packaged GGUF on llama.cpp, against its bandwidth bound."""
    import os

    from rag.backend_llamacpp import LlamaCppGenerator, why_not
    from rag.models import GENERATORS, ModelNotFound, gguf_path

    rows = {}
    for name in models or GENERATORS:
        try:
            reason = why_not(name, "cpu")
        except ModelNotFound as e:
            reason = str(e)
        if reason:
            rows[name] = {"skipped": reason[:160]}
            continue
        gen = LlamaCppGenerator(name, max_new_tokens=new)
        llm, prompt = gen.llm, gen.tokens(messages)
        size = os.path.getsize(gguf_path(name))
        bound = bw * 1e9 / size
        # one thread as well: if decoding were bandwidth-bound, halving the threads would barely slow it
        for n in sorted({threads, 1}, reverse=True) if not smoke else (threads,):
            llm._ctx.set_n_threads(n, n)
            prefill, decode = _llama_speed(llm, prompt, new, repeats)
            key = name if n == threads else f"{name}, {n} thread"
            rows[key] = {
                "threads": n, "prompt_tokens": len(prompt), "prefill_tok_s": round(prefill, 1),
                "decode_tok_s": round(decode, 2), "gguf_mb": round(size / 2**20, 1),
                "bandwidth_bound_tok_s": round(bound, 1), "ratio_to_bound": round(decode / bound, 3)}
            log.info("generation llama.cpp %s: %s", key, rows[key])
        llm.close()
    return rows
