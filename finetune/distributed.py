"""Data-parallel training under ``accelerate launch``: which process this is, one writer, barriers, CPU threads.

``accelerate launch --multi_gpu --num_processes N -m finetune train ...`` starts N copies of the same command
(through torchrun; on a machine without CUDA the same flag gives N CPU processes on gloo, while ``--cpu`` alone
starts one). The HF Trainer then wraps the LoRA model in DDP, hands each process its own micro-batches and
averages the gradients, so one optimiser step sees batch_size × N × grad_accum rows. Everything around the
Trainer follows one rule here: process 0 builds the data, writes every file (adapter, config.json, metrics.json,
loss.png, snapshots, reports) and logs; the others train, wait at a barrier and read what it wrote. Rank and
world size come from the launcher's environment, so a plain ``python -m finetune train`` (one process) never
starts a process group. Left out on purpose: FSDP/DeepSpeed sharding (the trainable LoRA part is a few MB; a
copy of the frozen base per device is what DDP needs) and multi-node flags (``accelerate launch`` has them).
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta

# the launchers' variables, as accelerate reads them: torchrun's first, then MPI's (accelerate's mpirun path)
RANK = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")
WORLD = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
LOCAL_WORLD = ("LOCAL_WORLD_SIZE", "MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "MV2_COMM_WORLD_LOCAL_SIZE")
# process 0 may build the training data (LM-written questions, minutes) while the others wait at a barrier;
# the Trainer's own default (ddp_timeout, 30 min) is too short for that on a CPU
TIMEOUT = timedelta(hours=2)


def _env(names: tuple[str, ...], default: int) -> int:
    return next((int(os.environ[n]) for n in names if os.environ.get(n, "").isdigit()), default)


def rank() -> int:
    """This process's index among all of the run's processes (0 when there is one)."""
    return _env(RANK, 0)


def world_size() -> int:
    """How many processes train together (1 without a launcher)."""
    return _env(WORLD, 1)


def is_main() -> bool:
    """True in the one process that writes files and logs (process 0)."""
    return rank() == 0


def barrier() -> None:
    """Wait until every process gets here; a no-op in one process. Starts the process group on first use with
    the backend the Trainer would pick (NCCL on CUDA, gloo on a CPU), so the Trainer re-uses it."""
    if world_size() == 1:
        return
    from accelerate import PartialState

    from rag.models import pick_device

    PartialState(cpu=pick_device() == "cpu", timeout=TIMEOUT).wait_for_everyone()


def once(build, load):
    """``build()`` in process 0; the others wait for it and then ``load()`` what it saved. For data whose
    building writes shared folders (the index, the saved rows) or calls the LM: N processes building at once
    would race on the same folders and do the work N times."""
    if world_size() == 1:
        return build()
    result = build() if is_main() else None
    barrier()
    return result if is_main() else load()


def quiet_replicas() -> None:
    """Warnings and errors only in processes other than 0, so each progress line is printed once."""
    if not is_main():
        logging.getLogger().setLevel(logging.WARNING)


def cpu_threads(threads: int) -> int:
    """Torch threads for this process: ``threads`` shared among the processes on this machine (at least 1), so
    ``--threads 2`` with 2 processes on 2 cores runs 1 thread each rather than 4 on 2 cores."""
    return max(1, threads // _env(LOCAL_WORLD, world_size()))
