"""LoRA training speed: tokens/s, seconds per step and achieved FLOP/s of finetune.train's default config.

Runs the real ``finetune.train.train`` (HF Trainer + peft, default TrainConfig: r=8 on q/k/v/o, batch 4, max
length 256) for a handful of steps on two kinds of rows: closed-book QA (what ``make finetune`` trains on; short)
and RAFT-shaped rows (question + two fitz-gov contexts → a cited answer; near the 256-token cap). Seconds per
step are the median gap between the trainer's per-step log lines (the first step, with its set-up, excluded).
FLOP estimate for LoRA, stated once: a step costs ≈ 4·N·T (forward 2·N·T, backward through the frozen weights
2·N·T) + 6·N_lora·T for the adapter's own weights, with N all parameters, N_lora the trainable ones and T the
tokens processed (padding included, since it is computed); full fine-tuning would be 6·N·T. Attention-score FLOPs
(~4·layers·seq·d per token) are left out. The ratio is against a measured fp32 matmul rate on the same threads.
"""

from __future__ import annotations

import logging
import statistics
import tempfile
import time

from bench.measure import cores, matmul_gflops, set_threads


class StepClock(logging.Handler):
    """Wall-clock time of every per-step progress line that finetune.train logs."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.times: list[float] = []

    def emit(self, record):
        if str(record.msg).startswith("step") and "loss" in str(record.msg) and "eval" not in str(record.msg):
            self.times.append(record.created)


def closed_book_rows(n: int) -> list[list[dict]]:
    from finetune.data import closed_book_messages, format_answer
    from rag.evaluate import load_golden

    golden = [q for q in load_golden("data/demo/golden.jsonl") if q["split"] == "train" and q["answer"]]
    return [closed_book_messages(q["question"], format_answer(q["answer"], q["sources"][0])) for q in golden[:n]]


def raft_rows(n: int) -> list[list[dict]]:
    from fitz_gov import Tier, load_tier

    from rag.generate import SYSTEM

    cases = [c for c in load_tier(Tier.CORE) if c.category.value == "trustworthy_direct" and c.contexts][:n]
    rows = []
    for c in cases:
        sources = "\n\n".join(f"Source {i}:\n{t}" for i, t in enumerate(c.contexts[:2], 1))
        answer = c.contexts[0].split(". ")[0].strip().rstrip(".") + " [1]."
        rows.append([{"role": "system", "content": SYSTEM},
                     {"role": "user", "content": f"Question: {c.query}\n\n{sources}\n\nQuestion: {c.query}"},
                     {"role": "assistant", "content": answer}])
    return rows


def train_once(rows: list[list[dict]], steps: int, threads: int) -> dict:
    from datasets import Dataset

    from finetune.rows import tokenize_example
    from finetune.train import TrainConfig, train
    from rag.backend_hf import TransformersGenerator  # noqa: F401  (imports torch/transformers before the clock starts)
    from rag.models import generator_path

    clock = StepClock()
    logging.getLogger("finetune.train").addHandler(clock)
    logging.getLogger("finetune.train").setLevel(logging.INFO)
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(output_dir=out, max_steps=steps, logging_steps=1, threads=threads, eval_fraction=0.0)
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(generator_path(cfg.model))
        lengths = [len(tokenize_example(tok, m, cfg.max_length)["input_ids"]) for m in rows]
        run = train(cfg, Dataset.from_list([{"messages": m} for m in rows]))
    logging.getLogger("finetune.train").removeHandler(clock)
    m = run.metrics
    gaps = [b - a for a, b in zip(clock.times, clock.times[1:], strict=False)]
    step_s = statistics.median(gaps) if gaps else m["seconds"] / max(m["steps"], 1)
    # padded tokens per step: the collator pads each micro-batch to its longest row
    per_step = [max(lengths[i:i + cfg.batch_size]) * len(lengths[i:i + cfg.batch_size])
                for i in range(0, len(lengths), cfg.batch_size)]
    padded = statistics.mean(per_step)
    n, n_lora = m["total_params"], m["trainable_params"]
    flops = (4 * n + 6 * n_lora) * padded
    return {"rows": len(rows), "steps": m["steps"], "batch_size": cfg.batch_size, "max_length": cfg.max_length,
            "mean_row_tokens": round(statistics.mean(lengths), 1), "padded_tokens_per_step": round(padded, 1),
            "seconds_per_step_median": round(step_s, 3), "seconds_total": m["seconds"],
            "trainer_tokens_per_second": m["tokens_per_second"],
            "steady_tokens_per_second": round(padded / step_s, 1),
            "trainable_params": n_lora, "total_params": n, "flops_per_step": f"{flops:.3e}",
            "achieved_gflops": round(flops / step_s / 1e9, 2)}


def run(smoke: bool = False, threads: int | None = None) -> dict:
    t0 = time.perf_counter()
    threads = threads or cores()
    set_threads(threads)
    peak = matmul_gflops(512 if smoke else 1024, threads=threads)
    steps, n_rows = (2, 4) if smoke else (10, 12)
    out = {"threads": threads, "matmul_gflops_fp32": peak,
           "flop_formula": "LoRA step ≈ 4·N·T + 6·N_lora·T (T = padded tokens; full fine-tuning 6·N·T; attention "
                           "scores left out)", "configs": {}}
    kinds = {"closed-book QA rows (make finetune)": closed_book_rows, "RAFT-shaped rows (fitz-gov contexts)": raft_rows}
    for name, make in kinds.items():
        res = train_once(make(n_rows), steps, threads)
        res["ratio_to_matmul_peak"] = round(res["achieved_gflops"] / peak, 3)
        out["configs"][name] = res
        if smoke:
            break
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out
