"""Data-parallel LoRA under ``accelerate launch``: two CPU processes (DDP on gloo) train what one process trains.

One process with micro-batches of 2 and two processes with micro-batches of 1 see the same 2 rows per optimiser
step, in the same order (same seed, no LoRA dropout), so their loss curves and adapters must agree. They do not
agree bit for bit: one process reduces the token losses of a padded batch of 2 in one pass, two processes reduce
one row each and DDP all-reduces their gradients, so the same float32 numbers are added in another order
(~1e-7 relative per sum), and Adam's first steps (divided by √v) pass that on. Measured here: at most 2.5e-6
on losses of 0.8 to 3.8 over 6 steps (1.7e-6 with one thread in the single process). LOSS_TOL is 40× that and
far below what a wrong split gives: each process training on the whole batch, or the two rows' mean losses
averaged instead of one mean over both rows' answer tokens (the first step's rows have 13 and 11 answer
tokens: 3.8457 instead of 3.8073).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from finetune import distributed as D
from tests.conftest import free_port
from tests.test_finetune_train import FACTS  # the same eight facts

ROOT = Path(__file__).resolve().parents[1]
# 6 steps of 2 rows over 8 rows (a multiple of the global batch: no process is topped up with repeated rows); a
# checkpoint every 3 steps for the resume test; one snapshot (step 3)
FLAGS = ["--model", "smollm2-135m", "--max-steps", "6", "--max-length", "48", "--lora-r", "8", "--lora-alpha", "16",
         "--target-modules", "auto", "--lora-dropout", "0", "--warmup", "0", "--logging-steps", "1",
         "--eval-fraction", "0", "--eval-steps", "3", "--snapshots", "1", "--seed", "0"]
LOSS_TOL = 1e-4
LOGIT_TOL = 1e-3  # the same float32 reorderings, through 6 updates of 30 layers' adapters


def train(data: Path, out: Path, processes: int, *extra: str) -> tuple[subprocess.CompletedProcess, float]:
    """``python -m finetune train`` in one process, or under ``accelerate launch`` in ``processes`` processes:
    --multi_gpu starts them through torchrun, and without CUDA (hidden here) they train on the CPU over gloo
    (``--cpu`` would start one process only). Global batch 2 either way; one torch thread per process (the
    suite shares two cores: two threads in one process ran 3-10× slower here while other jobs were running)."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(free_port())] if processes > 1 else [sys.executable]
    cmd = [*launch, "-m", "finetune", "train", "--data", str(data), "--output-dir", str(out),
           "--batch-size", str(2 // processes), "--threads", str(processes), *FLAGS, *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done, time.perf_counter() - start


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same 6 steps in one process and in two: ``{1: (out, stdout+stderr), 2: ..., "data": rows.jsonl}``."""
    root = tmp_path_factory.mktemp("ddp")
    data = root / "rows.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                     {"role": "assistant", "content": a}]}) + "\n"
                            for q, a in FACTS))
    result = {"data": data}
    for n in (1, 2):
        done, seconds = train(data, root / f"p{n}", n)
        result[n] = root / f"p{n}", done.stdout + done.stderr
        print(f"{n} process(es): {seconds:.1f} s wall")  # for the README's numbers (pytest -s)
    return result


def metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def test_two_processes_follow_the_loss_curve_of_one(runs):
    one, two = metrics(runs[1][0]), metrics(runs[2][0])
    assert [s for s, _ in two["train_loss_history"]] == list(range(1, 7))
    gaps = [abs(a - b) for (_, a), (_, b) in zip(one["train_loss_history"], two["train_loss_history"], strict=True)]
    print(f"largest loss gap: {max(gaps):.2e}; losses {[round(x, 4) for _, x in one['train_loss_history']]}")
    assert max(gaps) < LOSS_TOL
    assert two["tokens_seen"] == one["tokens_seen"]  # counted over both processes
    cfg1, cfg2 = (json.loads((runs[n][0] / "config.json").read_text()) for n in (1, 2))
    assert (cfg1["processes"], cfg1["effective_batch"]) == (1, 2)
    assert (cfg2["processes"], cfg2["batch_size"], cfg2["effective_batch"]) == (2, 1, 2)
    assert (cfg2["threads"], cfg2["threads_per_process"]) == (2, 1)  # --threads shared by the machine's processes


def test_only_process_0_writes_and_logs(runs):
    (one, _), (two, log) = runs[1], runs[2]

    def files(out: Path) -> set[str]:  # each process saves its own RNG state into a checkpoint: the Trainer's rule
        return {str(p.relative_to(out)) for p in out.rglob("*") if "rng_state" not in p.name}

    assert files(two) == files(one)
    assert {"adapter/adapter_model.safetensors", "config.json", "metrics.json", "loss.png",
            "snapshots/step-3/adapter_model.safetensors", "checkpoints/checkpoint-6/trainer_state.json"} <= files(two)
    assert not list(two.rglob("*.tmp"))
    assert sorted(p.name for p in (two / "checkpoints" / "checkpoint-6").glob("rng_state*")) == [
        "rng_state_0.pth", "rng_state_1.pth"]
    for line in ("trainable params:", "INFO: config ", "step     6/6", "adapter in "):
        assert log.count(line) == 1, line


def test_the_adapters_agree_and_load(runs):
    from finetune.lora import load_tuned

    probe = "<|im_start|>user\nWhen was the company founded?<|im_end|>\n<|im_start|>assistant\n"
    logits = []
    for n in (1, 2):
        model, tok = load_tuned(runs[n][0], "cpu")
        with torch.no_grad():
            logits.append(model(**tok(probe, return_tensors="pt", add_special_tokens=False)).logits)
    gap = (logits[0] - logits[1]).abs().max().item()
    print(f"largest logit gap: {gap:.2e}")
    assert gap < LOGIT_TOL


def test_resume_under_two_processes_continues_the_same_curve(runs, tmp_path):
    full, _ = runs[2]
    out = tmp_path / "resumed"
    shutil.copytree(full, out)
    for lost in ("checkpoints/checkpoint-6", "adapter"):  # stopped after the step-3 checkpoint
        shutil.rmtree(out / lost)
    (out / "metrics.json").unlink()
    done, _ = train(runs["data"], out, 2, "--resume")
    m = metrics(out)
    assert (m["resumed_from_step"], m["steps"]) == (3, 6)
    gaps = [abs(a - b) for (_, a), (_, b) in zip(m["train_loss_history"], metrics(full)["train_loss_history"],
                                                 strict=True)]
    assert max(gaps) < LOSS_TOL  # steps 4-6 on the restored weights, optimiser state, schedule and data order
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_process_helpers_read_the_launchers_environment(monkeypatch):
    for name in (*D.RANK, *D.WORLD, *D.LOCAL_WORLD):
        monkeypatch.delenv(name, raising=False)
    assert (D.rank(), D.world_size(), D.is_main(), D.cpu_threads(2)) == (0, 1, True, 2)
    assert D.once(lambda: "built", lambda: "loaded") == "built"  # one process: no barrier, no process group
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert (D.rank(), D.world_size(), D.is_main()) == (1, 2, False)
    assert (D.cpu_threads(2), D.cpu_threads(1), D.cpu_threads(16)) == (1, 1, 8)  # --threads split per machine
