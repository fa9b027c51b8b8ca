"""LoRA fine-tuning of a chat model on `messages` examples: train, save adapter, snapshots, metrics and plot.

LoRA (Hu et al., 2021) in peft's words: each target weight W₀ stays frozen and gains a low-rank update,
    h = W₀·x + (lora_alpha / r) · B·A·x,   A: r × d_in (random), B: d_out × r (zeros),
so at step 0 B·A = 0 and the tuned model *is* the base model; only A and B train (~0.7 % of SmolLM2-135M).
Follows the HF `Trainer` + peft recipe (loss on the answer tokens only, and logits computed there only: 10% less
time a step for the 1.5B on closed-book rows, 6% on RAFT's, the same loss; cosine schedule with warm-up,
held-out eval loss with early stopping, resumable checkpoints) and QLoRA (Dettmers et al., 2023: 4-bit base,
bf16 compute) when CUDA and bitsandbytes are there. Left out on purpose: packing several examples per row and
generation-based evaluation (finetune/evaluate.py).
Under ``accelerate launch`` (data-parallel, finetune/distributed.py) every process trains and process 0 alone
writes and logs. Loading and tokenising the examples (loss on the answer tokens only) is finetune/rows.py.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from finetune import distributed as D
from finetune.lora import (
    add_lora,
    frozen_bf16,
    load_base,
    load_tuned,
    lora_blocks,
    record_base,
    save_atomically,
    use_qlora,
)
from finetune.rows import AnswerCollator, DataError, tokenize_example
from rag.config import option
from rag.models import DEFAULT_READER, GENERATORS, check_name, generator_path, pick_device

log = logging.getLogger(__name__)
SNAPSHOTS = "snapshots"  # <output_dir>/snapshots/step-N: adapters saved during training (TrainConfig.snapshots)
MIN_EVAL_ROWS = 10  # below this a held-out slice is too noisy to stop on; train on everything instead


@dataclass
class TrainConfig:
    """Every knob of LoRA training; the CLI makes one ``--flag`` per field."""

    model: str = option(DEFAULT_READER, f"base model: {', '.join(GENERATORS)}, a path or a hub id")
    output_dir: str = option("", "where adapter, checkpoints and metrics go (default .openbook/finetune/<model>)")
    lora_r: int = option(16, "LoRA rank r of the update B·A")
    lora_alpha: int = option(32, "LoRA scale numerator: the update is multiplied by lora_alpha / r")
    lora_dropout: float = option(0.05, "dropout on the LoRA input path during training")
    # all-linear at 1e-3 (r=16) made SmolLM2-135M answer 0.84 of its 73 golden train questions closed-book after
    # 300 steps and 0.89 after 400 (4 epochs); the attention projections at 2e-4 (r=8), the earlier default,
    # answered none of them
    target_modules: str = option("all-linear", "comma-separated module names, 'all-linear' (attention and MLP), "
                                 "or 'auto' (attention projections per architecture)")
    # the 1.5B on its top 14 of 28 blocks, three runs of `make finetune`'s recipe on a 2-core AMD EPYC: golden
    # train 0.918-0.959 closed-book, test 0.521-0.575 (every block: 0.931; 0.534-0.575 over three seeds), probes
    # 0.639-0.806 (0.708), training 750-839 s against 1,125-1,188 (README, "LoRA on the top half of the layers")
    lora_layers: int = option(-1, "LoRA on the last N transformer blocks only, so the backward pass stops at the "
                              "lowest of them and a step costs less; 0: every block; -1 (auto): the top half for "
                              "models of 1B parameters or more, every block for smaller ones")
    # the 1.5B answered 0.986 of its golden train questions closed-book after 8 epochs (224 steps), 0.685 after 4;
    # after 6 (168 steps) 0.931, with less forgetting (general probes 0.81 -> 0.71, 0.53 after 8), and `make
    # finetune` took 28.6 min on a 2-core AMD EPYC without AMX instead of 33.0 (README, fine-tuning)
    epochs: float = option(6.0, "passes over the training rows (ignored when --max-steps is set)")
    max_steps: int = option(-1, "optimiser steps in all; -1 means use --epochs")
    # a small folder's few rows gave 20 updates at 2 epochs, too few to learn even the answer format
    min_steps: int = option(100, "with --epochs, train at least this many optimiser steps (more passes over a "
                            "small data set); 0: no minimum")
    batch_size: int = option(4, "examples per micro-batch (per process under accelerate launch)")
    grad_accum: int = option(1, "micro-batches per optimiser step (effective batch = batch_size × processes × "
                             "grad_accum)")
    learning_rate: float = option(1e-3, "peak AdamW learning rate (cosine decay after warm-up)")
    warmup: float = option(0.1, "linear warm-up as a fraction of all optimiser steps")
    max_length: int = option(256, "tokens per example at most (the prompt's left side is cut first)")
    eval_fraction: float = option(0.1, f"share of rows held out for eval loss (none below {MIN_EVAL_ROWS} rows)")
    early_stopping_patience: int = option(3, "stop after this many evals without a better eval loss; 0 = never")
    eval_steps: int = option(100, "evaluate (when there is an eval slice) and save a checkpoint every N steps")
    save_total_limit: int = option(2, "checkpoints kept in <output-dir>/checkpoints (plus the best one)")
    # random batches of the demo's rows were 12% padding, computed like real tokens
    group_by_length: bool = option(True, "batch rows of similar token length together (less padding)")
    logging_steps: int = option(10, "log one progress line every N optimiser steps")
    # each snapshot is scored on both golden splits after training: ~3 min apiece for the 1.5B on 2 cores
    snapshots: int = option(0, "adapters saved at evenly spaced steps before the end, in <output-dir>/snapshots, "
                            "for the accuracy-against-steps curve (0: none)")
    # RAFT's ~600-token rows through the 1.5B with every linear layer adapted grew past 24 GiB without it
    gradient_checkpointing: bool = option(False, "recompute activations in the backward pass instead of keeping "
                                          "them: far less memory for long rows, 26% more time a step on an AMX CPU, "
                                          "1.4-1.8x on an AMD EPYC")
    seed: int = option(0, "seeds the LoRA init, the eval split and the data order")
    threads: int = option(2, "torch CPU threads (CPU only), shared among the processes accelerate launch starts "
                          "on one machine")
    qlora: str = option("auto", "4-bit base model: 'auto' (only with CUDA and bitsandbytes), 'yes' or 'no'")
    precision: str = option("auto", "'auto': bf16 mixed precision on a CUDA GPU that supports it; on a CPU that "
                            "multiplies bf16 natively, frozen bf16 base weights with fp32 adapters for models of 1B "
                            "parameters or more (2.2x faster a step on the 1.5B); else fp32. 'bf16' forces that on "
                            "any device, 'fp32' turns it off")

    def __post_init__(self):
        at_least_1 = ("lora_r", "batch_size", "grad_accum", "eval_steps", "save_total_limit", "logging_steps",
                      "threads")
        rules = [(n, getattr(self, n) >= 1, "at least 1") for n in at_least_1] + [
            (n, getattr(self, n) > 0, "positive") for n in ("lora_alpha", "learning_rate", "epochs")] + [
            (n, lo <= getattr(self, n) < hi, f"in [{lo}, {hi})")
            for n, lo, hi in (("lora_dropout", 0, 1), ("warmup", 0, 1), ("eval_fraction", 0, 0.5))] + [
            ("max_steps", self.max_steps == -1 or self.max_steps >= 1, "-1 (use --epochs) or at least 1"),
            ("max_length", self.max_length >= 16, "at least 16"),
            ("early_stopping_patience", self.early_stopping_patience >= 0, "0 (off) or more"),
            ("snapshots", self.snapshots >= 0, "0 (none) or more"),
            ("min_steps", self.min_steps >= 0, "0 (no minimum) or more"),
            ("lora_layers", self.lora_layers >= -1, "-1 (auto), 0 (every block) or more"),
            ("qlora", self.qlora in ("auto", "yes", "no"), "one of auto, yes, no"),
            ("precision", self.precision in ("auto", "bf16", "fp32"), "one of auto, bf16, fp32"),
            ("target_modules", bool(self.target_modules.strip(" ,")), "'auto', 'all-linear' or module names")]
        for name, ok, why in rules:
            if not ok:
                raise ValueError(f"--{name.replace('_', '-')} must be {why}, not {getattr(self, name)!r}")
        check_name("--model", self.model, GENERATORS)  # the same words as `python -m rag --model`
        if not self.output_dir:
            self.output_dir = str(Path(".openbook") / "finetune" / Path(self.model).name)


def _callbacks():
    """(tqdm bar, throughput log), defined here so that importing this module does not import torch (~6 s)."""
    from transformers import ProgressCallback, TrainerCallback

    class QuietBar(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            pass  # no dict per log: ThroughputLog writes one fixed-format line instead

    class ThroughputLog(TrainerCallback):
        """One line per logging interval: step, loss, lr, tokens/s (non-padding input tokens) and ETA."""

        def on_train_begin(self, args, state, control, **kwargs):
            self.start_step, self.start_tokens = state.global_step, state.num_input_tokens_seen
            self.start = time.perf_counter()
            self.last = (self.start, self.start_tokens)

        def on_log(self, args, state, control, logs=None, **kwargs):
            now, logs = time.perf_counter(), logs or {}
            if not state.is_world_process_zero:
                return
            if "loss" in logs:
                tps = (state.num_input_tokens_seen - self.last[1]) / max(now - self.last[0], 1e-9)
                self.last = (now, state.num_input_tokens_seen)
                per_step = (now - self.start) / max(state.global_step - self.start_step, 1)
                eta = time.strftime("%H:%M:%S", time.gmtime(per_step * (state.max_steps - state.global_step)))
                log.info("step %5d/%d | loss %.4f | lr %.2e | %7.1f tok/s | eta %s", state.global_step,
                         state.max_steps, logs["loss"], logs.get("learning_rate", 0.0), tps, eta)
            elif "eval_loss" in logs:
                log.info("step %5d/%d | eval loss %.4f", state.global_step, state.max_steps,
                         logs["eval_loss"])

    class Snapshots(TrainerCallback):
        """The adapter alone (no optimiser state, a few MB) at ``n`` evenly spaced steps before the last, so
        evaluation can score the model as it learned; checkpoints are rotated away and much larger."""

        def __init__(self, folder: Path, n: int, base: str):
            self.folder, self.n, self.base = folder, n, base

        def on_step_end(self, args, state, control, model=None, **kwargs):
            every = state.max_steps / (self.n + 1)
            if self.n and state.is_world_process_zero and state.global_step < state.max_steps and \
                    int(state.global_step / every) > int((state.global_step - 1) / every):
                snapshot = self.folder / f"step-{state.global_step}"
                model.save_pretrained(str(snapshot))
                record_base(snapshot, self.base)

    class TrimHeap(TrainerCallback):
        """Hands the C heap's free pages back to the system at the end of a step, at most once a minute: rows of
        different lengths free activations of ever new sizes, which glibc may keep rather than return. A RAFT run
        of the 1.5B without gradient checkpointing, trim or answer-only logits grew past 24 GiB; with both, 17.1 GB
        at most. Not every step: the next step faults the handed-back pages in again (~3 GB a closed-book step of
        the 1.5B, a tenth of its CPU time in the kernel), and a RAFT step takes over a minute anyway."""

        def __init__(self, every_s: float = 60.0):
            import ctypes
            import ctypes.util

            try:
                self.trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
            except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim this way
                self.trim = None
            self.every_s, self.last = every_s, time.monotonic()

        def on_step_end(self, args, state, control, **kwargs):
            if self.trim and time.monotonic() - self.last >= self.every_s:
                self.trim(0)
                self.last = time.monotonic()

    return QuietBar(), ThroughputLog(), Snapshots, TrimHeap


@dataclass
class TrainRun:
    model: object  # the trained PeftModel (best checkpoint when there was an eval slice)
    tokenizer: object
    metrics: dict


def _save_plot(path: Path, train_hist: list, eval_hist: list) -> None:
    from matplotlib.figure import Figure  # no pyplot: no global backend, no GUI, works headless

    fig = Figure(figsize=(6, 3.5))
    ax = fig.add_subplot()
    for hist, label in ((train_hist, "train"), (eval_hist, "eval")):
        if hist:
            ax.plot(*zip(*hist, strict=True), marker="." if len(hist) < 30 else None, label=f"{label} loss")
    ax.set(xlabel="optimiser step", ylabel="cross-entropy (answer tokens)", title="LoRA training loss")
    if ax.lines:  # a run shorter than --logging-steps logged no loss
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _finished(checkpoint: str, cfg: TrainConfig) -> bool:
    st = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    return st["global_step"] >= st["max_steps"] and cfg.max_steps in (-1, st["max_steps"])


def train(cfg: TrainConfig, dataset, resume: bool = False) -> TrainRun:
    """Train a LoRA adapter on ``dataset`` (a ``datasets.Dataset`` with a ``messages`` column) into
    ``cfg.output_dir``; with ``resume`` continue from the last checkpoint there."""
    import torch
    import transformers as hf
    from datasets import Dataset
    from transformers.trainer_utils import get_last_checkpoint

    if "messages" not in dataset.column_names:
        raise DataError(f"the training data needs a 'messages' column, it has {dataset.column_names}")
    out, device = Path(cfg.output_dir), pick_device()
    ckpt_dir, main, world = out / "checkpoints", D.is_main(), D.world_size()
    D.quiet_replicas()
    if not resume and main:  # a fresh run: stale checkpoints would be rotated, or resumed, as if they were its own
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        shutil.rmtree(out / SNAPSHOTS, ignore_errors=True)
    D.barrier()  # with several processes: also starts the process group, and with it each one's own GPU
    last = get_last_checkpoint(str(ckpt_dir)) if resume and ckpt_dir.is_dir() else None
    if resume and last is None:
        log.warning("--resume: no checkpoint in %s, starting from step 0", ckpt_dir)
    if last and _finished(last, cfg) and (out / "metrics.json").exists():
        # Trainer would run one extra step past max_steps here; the outputs of the finished run are final.
        log.info("--resume: %s is the end of a finished run; loading its adapter", last)
        return TrainRun(*load_tuned(out, device), json.loads((out / "metrics.json").read_text()))
    if device == "cpu":
        torch.set_num_threads(D.cpu_threads(cfg.threads))
    hf.set_seed(cfg.seed)  # before add_lora: the A matrices are drawn at random
    qlora = use_qlora(cfg.qlora, device)
    bf16_base = not qlora and frozen_bf16(cfg.precision, device, cfg.model)
    model, tok = load_base(cfg.model, device, qlora, bf16=bf16_base)
    tok.padding_side = "right"  # positions come from the sequence index, so pads must trail the tokens
    blocks = lora_blocks(cfg.lora_layers, model.num_parameters(), model.config.num_hidden_layers)
    model = add_lora(model, cfg)
    if main:
        model.print_trainable_parameters()
    trainable, total = model.get_nb_trainable_parameters()

    rows = Dataset.from_list([tokenize_example(tok, m, cfg.max_length) for m in dataset["messages"]])
    n_eval = int(len(rows) * cfg.eval_fraction) if len(rows) >= MIN_EVAL_ROWS else 0
    split = rows.train_test_split(test_size=n_eval, seed=cfg.seed) if n_eval else None
    train_rows, eval_rows = (split["train"], split["test"]) if split else (rows, None)
    # mixed precision (autocast over fp32 weights) on CUDA; on a CPU a bf16 base is faster without autocast
    bf16 = device != "cpu" and (cfg.precision == "bf16" or (cfg.precision == "auto" and device == "cuda"
                                                            and torch.cuda.is_bf16_supported()))
    max_steps = cfg.max_steps
    effective_batch = cfg.batch_size * world * cfg.grad_accum  # rows per optimiser step
    by_epochs = math.ceil(math.ceil(len(train_rows) / (cfg.batch_size * world)) / cfg.grad_accum * cfg.epochs)
    if max_steps == -1 and by_epochs < cfg.min_steps:
        log.info("%g epochs over %d rows are %d steps; training --min-steps %d instead", cfg.epochs,
                 len(train_rows), by_epochs, cfg.min_steps)
        max_steps = cfg.min_steps
    resolved = {**asdict(cfg), "base_model_path": generator_path(cfg.model), "dataset_rows": len(rows),
                "lora_blocks": blocks or "all",
                "train_rows": len(train_rows), "eval_rows": n_eval, "device": device, "qlora_used": qlora,
                "bf16": bf16, "bf16_base": bf16_base, "processes": world, "effective_batch": effective_batch,
                "threads_per_process": torch.get_num_threads() if device == "cpu" else None}
    log.info("config %s", json.dumps(resolved))
    log.info("effective batch %d = %d rows per micro-batch × %d processes × %d accumulation steps",
             effective_batch, cfg.batch_size, world, cfg.grad_accum)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(resolved, indent=1))  # up front: a crashed run keeps it too
    args = hf.TrainingArguments(
        output_dir=str(ckpt_dir), num_train_epochs=cfg.epochs, max_steps=max_steps, seed=cfg.seed,
        per_device_train_batch_size=cfg.batch_size, per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, learning_rate=cfg.learning_rate,
        lr_scheduler_type="cosine", warmup_steps=cfg.warmup,  # transformers 5: a float < 1 is a fraction
        logging_steps=cfg.logging_steps, eval_strategy="steps" if n_eval else "no", eval_steps=cfg.eval_steps,
        save_strategy="steps", save_steps=cfg.eval_steps, save_total_limit=cfg.save_total_limit,
        # Early stopping needs the best checkpoint reloaded at the end, judged by eval loss.
        load_best_model_at_end=bool(n_eval), metric_for_best_model="eval_loss" if n_eval else None,
        greater_is_better=False, use_cpu=device == "cpu", bf16=bf16, report_to="none",
        prediction_loss_only=True,  # eval wants the loss; gathering each eval row's logits cost memory for nothing
        remove_unused_columns=False, include_num_input_tokens_seen="non_padding",
        ddp_find_unused_parameters=False,  # every LoRA weight gets a gradient each step: skip DDP's graph search
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        gradient_checkpointing=cfg.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},  # the frozen base's inputs need no grad then
    )
    bar, throughput, snapshots, trim_heap = _callbacks()
    callbacks = [throughput, snapshots(out / SNAPSHOTS, cfg.snapshots, cfg.model), trim_heap()]
    if n_eval and cfg.early_stopping_patience:
        callbacks.append(hf.EarlyStoppingCallback(early_stopping_patience=cfg.early_stopping_patience))
    trainer = hf.Trainer(model=model, args=args, train_dataset=train_rows, eval_dataset=eval_rows,
                         data_collator=AnswerCollator(tok, model),
                         processing_class=tok, callbacks=callbacks)
    for cb in (hf.ProgressCallback, hf.PrinterCallback):
        trainer.remove_callback(cb)
    if not args.disable_tqdm:
        trainer.add_callback(bar)

    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=last)
    seconds = time.perf_counter() - start
    state = trainer.state
    session_tokens = state.num_input_tokens_seen - throughput.start_tokens

    if main:
        save_atomically(out / "adapter", model, tok, base=cfg.model)  # named as given, not by its cache folder

    train_hist = [[h["step"], h["loss"]] for h in state.log_history if "loss" in h]
    eval_hist = [[h["step"], h["eval_loss"]] for h in state.log_history if "eval_loss" in h]
    metrics = {
        "train_loss_history": train_hist, "eval_loss_history": eval_hist,
        "final_train_loss": train_hist[-1][1] if train_hist else result.training_loss,
        "mean_train_loss": result.training_loss,
        "final_eval_loss": state.best_metric if n_eval else None,  # of the saved (best) adapter
        "steps": state.global_step, "max_steps": state.max_steps, "resumed_from_step": throughput.start_step,
        # the step whose weights were saved: the best eval loss's checkpoint when there was an eval slice
        "adapter_step": int(state.best_model_checkpoint.rsplit("-", 1)[1]) if n_eval and state.best_model_checkpoint
        else state.global_step,
        "stopped_early": state.global_step < state.max_steps, "seconds": round(seconds, 2),
        "tokens_seen": state.num_input_tokens_seen,  # non-padding input tokens, all sessions
        "tokens_per_second": round(session_tokens / seconds, 1),  # this session, wall clock incl. evals
        "trainable_params": trainable, "total_params": total,
        "trainable_percent": round(100 * trainable / total, 4), "device": device,
    }
    if main:
        (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
        _save_plot(out / "loss.png", train_hist, eval_hist)
    D.barrier()  # every process returns once the adapter is on disk
    if device == "cpu" and main:  # the others exit now: what follows (evaluation) has all of --threads
        torch.set_num_threads(cfg.threads)
    log.info("trained %d steps in %.0f s; adapter, config.json, metrics.json, loss.png in %s",
             state.global_step, seconds, out)
    return TrainRun(model.eval(), tok, metrics)


def snapshot_dirs(output_dir: str | Path) -> dict[int, Path]:
    """``{step: adapter folder}`` of the snapshots a run saved, in step order."""
    found = Path(output_dir, SNAPSHOTS).glob("step-*/adapter_config.json")
    return dict(sorted((int(p.parent.name.removeprefix("step-")), p.parent) for p in found))
