"""The transformers backend of ``Generator``: GPUs, hub ids, local HF folders, peft adapters, and training.

Loads the model with transformers (bf16 on CUDA, fp32 elsewhere), renders prompts with the tokenizer's chat
template and decodes greedily. Batches are left-padded and sorted by length; ``samples=n`` reads each prompt once
and repeats its KV cache n times. Left out on purpose: quantised loading for inference (llama.cpp does that on a
CPU; finetune/lora.py uses bitsandbytes for QLoRA on a GPU).
"""

from __future__ import annotations

import inspect
import threading
import time
from collections.abc import Callable

from tqdm import tqdm

from rag.generate import (
    NO,
    SAMPLING,
    YES,
    Generation,
    Generator,
    StreamCut,
    yes_no_logodds,
)
from rag.models import generator_path, pick_device

GREEDY = dict(do_sample=False)  # reproducible answers; no repetition penalty, which would punish copying a source


class TransformersGenerator(Generator):
    """``Generator`` on transformers (+ peft for an adapter)."""

    backend = "transformers"

    def __init__(self, name: str, max_new_tokens: int = 64, device: str | None = None, adapter: str | None = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.name, self.max_new_tokens, self.adapter = name, max_new_tokens, adapter
        self.device = device or pick_device()
        path = generator_path(name)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(self.device).eval()
        if adapter:  # a LoRA adapter from finetune/ or hybrid/ (peft imports only when used)
            from peft import PeftModel

            from rag.gguf_lora import check_base

            check_base(adapter, path)
            self.model = PeftModel.from_pretrained(self.model, adapter).eval()
        self.control_tokens = sorted({t for t in self.tokenizer.all_special_tokens if len(t) > 1}, key=len,
                                     reverse=True)
        self.yes_no_ids = {s: self.tokenizer.encode(s, add_special_tokens=False)[0] for s in (*YES, *NO)}

    @property
    def pad_id(self) -> int:
        """The pad token, or end-of-sequence for tokenizers without one (``is None``: id 0 is a real token)."""
        tok = self.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def chat(self, messages: list[dict], on_token: Callable[[str], None] | None = None,
             max_new_tokens: int | None = None, stop: tuple[str, ...] = ()) -> Generation:
        import torch
        from transformers import TextIteratorStreamer

        enc = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                 return_dict=True).to(self.device)
        n_prompt = enc["input_ids"].shape[1]
        kwargs = dict(**enc, max_new_tokens=max_new_tokens or self.max_new_tokens, pad_token_id=self.pad_id,
                      **GREEDY, **self._stop_options(stop))
        t0 = time.perf_counter()
        if on_token is None:
            with torch.inference_mode():
                out = self.model.generate(**kwargs)[0, n_prompt:]
            text = _cut(self.tokenizer.decode(out, skip_special_tokens=True), stop)
        else:
            streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
            result: dict = {}

            def run():
                with torch.inference_mode():
                    result["ids"] = self.model.generate(**kwargs, streamer=streamer)[0, n_prompt:]

            worker = threading.Thread(target=run)
            worker.start()
            cut = StreamCut(stop, on_token)
            for piece in streamer:  # generate() ends by itself at a stop string; pieces after it are dropped
                cut.feed(piece)
            worker.join()
            out = result["ids"]
            text = cut.text
        return Generation(text, n_prompt, int(out.shape[0]), time.perf_counter() - t0)

    def chat_batch(self, conversations: list[list[dict]], max_new_tokens: int | None = None,
                   batch_size: int = 16, samples: int = 0, seed: int = 0, desc: str = "",
                   stop: tuple[str, ...] = ()) -> list[Generation]:
        """Left-padded batches of similar lengths (several times faster on a CPU than one by one). Padding can
        change the last bits of the logits, so a rare greedy answer may differ from ``chat``'s."""
        import torch

        tok, out = self.tokenizer, []
        side, tok.padding_side = tok.padding_side, "left"  # the new tokens must line up at the right edge
        pad, n = self.pad_id, max(samples, 1)
        options = dict(do_sample=True, **SAMPLING) if samples else dict(GREEDY)
        options |= self._stop_options(stop)
        torch.manual_seed(seed)
        rendered = [tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in conversations]
        order = sorted(range(len(rendered)), key=lambda j: len(rendered[j]))
        try:
            for i in tqdm(range(0, len(order), batch_size), desc=desc, disable=not desc, unit="batch"):
                texts = [rendered[j] for j in order[i:i + batch_size]]
                enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
                t0 = time.perf_counter()
                with torch.inference_mode():
                    ids = self.model.generate(**self._shared_prefill(enc, n),
                                              max_new_tokens=max_new_tokens or self.max_new_tokens,
                                              pad_token_id=pad, **options)
                secs = (time.perf_counter() - t0) / len(ids)
                n_prompt = enc["input_ids"].shape[1]
                masks = enc["attention_mask"].repeat_interleave(n, dim=0)
                for row, mask in zip(ids[:, n_prompt:], masks, strict=True):
                    stop_at = ((row == pad) | (row == tok.eos_token_id)).nonzero()
                    n_new = int(stop_at[0, 0]) + 1 if len(stop_at) else len(row)
                    text = _cut(tok.decode(row[:n_new], skip_special_tokens=True), stop)
                    out.append(Generation(text, int(mask.sum()), n_new, secs))
        finally:
            tok.padding_side = side
        restored: list[Generation] = [None] * len(out)  # type: ignore[list-item]
        for pos, j in enumerate(order):
            restored[j * n:(j + 1) * n] = out[pos * n:(pos + 1) * n]
        return restored

    def _yes_logodds(self, messages: list[dict]) -> float:
        import torch

        enc = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                 return_dict=True).to(self.device)
        with torch.inference_mode():
            logits = self.model(**enc).logits[0, -1].float().cpu().numpy()
        return yes_no_logodds(logits, self.yes_no_ids)

    def _stop_options(self, stop: tuple[str, ...]) -> dict:
        """generate() options that end a reply at any of ``stop`` (none for an empty tuple)."""
        return dict(stop_strings=list(stop), tokenizer=self.tokenizer) if stop else {}

    def _shared_prefill(self, enc, n: int) -> dict:
        """generate() inputs for ``n`` replies per prompt. For n > 1 each prompt is read once and its KV cache
        repeated n times; ``num_return_sequences`` would read it n times (a third of the time of 6 short sampled
        re-wordings went there). Same tokens as the plain path, greedy or with the same seed."""
        if n == 1:
            return dict(enc)
        from transformers import DynamicCache

        ids, mask = enc["input_ids"], enc["attention_mask"]
        cache = DynamicCache(config=self.model.config)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: positions start at each prompt's first token
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        # transformers 5 renamed past_key_values to cache (the old name warns, and goes in 5.40)
        name = "cache" if "cache" in inspect.signature(type(base).forward).parameters else "past_key_values"
        # all but the last token: generate() needs one uncached token to start from
        self.model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=positions[:, :-1],
                   use_cache=True, **{name: cache})
        cache.batch_repeat_interleave(n)
        return {"input_ids": ids.repeat_interleave(n, 0), "attention_mask": mask.repeat_interleave(n, 0), name: cache}


def _cut(text: str, stop: tuple[str, ...]) -> str:
    """``text`` before its first stop string, stripped (generate() stops after the token that completes one)."""
    cut = StreamCut(stop)
    cut.feed(text)
    return cut.text
