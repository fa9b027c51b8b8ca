"""Training rows for the LoRA trainer: ``messages`` examples loaded from disk, and one conversation turned into
token ids whose labels cover the answer only.

The loss falls on the assistant's last turn: the prompt (system, user and earlier turns, rendered by the model's
own chat template with the generation prompt) is labelled -100. ``AnswerCollator`` pads a batch and has the
model compute logits at the labelled positions only. Left out on purpose: building the examples from the corpus
(finetune/data.py, hybrid/raft.py), packing several examples per row, and the training itself (finetune/train.py).
"""

from __future__ import annotations

import json
from pathlib import Path

from rag.config import UserError


class DataError(UserError, ValueError):
    """The training data is missing or has the wrong shape."""


def tokenize_example(tokenizer, messages: list[dict], max_length: int) -> dict[str, list[int]]:
    """Chat-template one conversation; labels are -100 on the prompt so the loss falls on the answer only.

    The prompt is every message but the last, rendered with the generation prompt (``<|im_start|>assistant``);
    the answer is what the full rendering adds after it, end-of-turn token included.
    """
    if not messages or messages[-1].get("role") != "assistant":
        raise DataError("the last message of each example must be the assistant's answer")

    def ids(text: str) -> list[int]:  # the rendered template already carries its special tokens
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    prompt = ids(tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False))
    full = ids(tokenizer.apply_chat_template(messages, tokenize=False))
    if len(full) > len(prompt) and full[: len(prompt)] == prompt:
        answer = full[len(prompt):]
    else:  # the template rewrites earlier turns once an answer follows (not prefix-stable): build it by hand
        answer = ids(messages[-1]["content"]) + [t for t in [tokenizer.eos_token_id] if t is not None]
    # Too long: keep at least half the window for the prompt's end (the question sits last), the rest for the
    # answer's start; the prompt loses its left side (system text, early context) first.
    keep = min(len(prompt), max(max_length - len(answer), max_length // 2))
    prompt, answer = prompt[len(prompt) - keep:], answer[: max_length - keep]
    return {"input_ids": prompt + answer, "attention_mask": [1] * (len(prompt) + len(answer)),
            "labels": [-100] * len(prompt) + answer}


class AnswerCollator:
    """Pads a batch of rows and, where the model can, projects onto the vocabulary only where a label is.

    A causal LM's output layer maps every position to the whole vocabulary (151,936 logits a token for Qwen2.5,
    upcast to fp32 for the loss), yet with the prompt labelled -100 only the answer's positions reach the loss.
    transformers' ``logits_to_keep`` (a boolean mask) and ``shift_labels`` (the labels already shifted, here
    flattened like the kept positions) compute the same loss over those positions alone. Models whose ``forward``
    takes no ``logits_to_keep`` (remote code) get the plain padded batch.
    """

    def __init__(self, tokenizer, model=None):
        import inspect

        from transformers import DataCollatorForSeq2Seq

        self.pad = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.answer_only = base is not None and "logits_to_keep" in inspect.signature(base.forward).parameters

    def __call__(self, features: list[dict]) -> dict:
        import torch

        batch = self.pad(features)
        if self.answer_only:
            # position t predicts token t+1: the label a position's logits meet is the next one
            shifted = torch.nn.functional.pad(batch["labels"][:, 1:], (0, 1), value=-100)
            keep = shifted != -100
            batch["logits_to_keep"], batch["shift_labels"] = keep, shifted[keep]
        return batch


def load_data(path: str):
    """A ``Dataset`` from a ``save_to_disk`` folder (its 'train' split if a DatasetDict) or a .jsonl file."""
    from datasets import Dataset, DatasetDict, load_from_disk

    p = Path(path)
    if p.is_dir():
        ds = load_from_disk(str(p))
        ds = ds["train"] if isinstance(ds, DatasetDict) else ds
    elif p.suffix == ".jsonl" and p.is_file():
        lines = [x for x in p.read_text(encoding="utf-8").splitlines() if x.strip()]
        try:
            ds = Dataset.from_list([{"messages": json.loads(x)["messages"]} for x in lines])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise DataError(f"{p}: every line must be a JSON object with a 'messages' list ({e!r})") from None
    else:
        raise DataError(f"--data {path}: expected a folder from Dataset.save_to_disk or a .jsonl file")
    if "messages" not in ds.column_names or len(ds) == 0:
        raise DataError(f"--data {path}: needs at least one row with a 'messages' column")
    return ds
