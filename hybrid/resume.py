"""A comparison's answers kept per system and training seed, so an interrupted or extended ``compare`` does not ask
them again.

One system's answers to the demo test split take 1-12 minutes on two cores, a whole ``make compare`` 30-50 and
``SEEDS=3`` twice that; a laptop that sleeps, a Ctrl-C, or a second run with ``--seeds 3`` after the first would
otherwise start from zero. Each system's scored rows are saved in ``<report folder>/answers/<system>-seed<s>.json``
when it finishes, under a key of everything its answers depend on: the questions, the system's settings (model,
backend, answer budget, retrieval settings, the abstention rule in force and the re-ranker weights it was calibrated
with, the reader's weights file), the index's contents (``rag.store.fingerprint``), the adapter's config and
weights, and the source code of ``rag``, ``finetune`` and ``hybrid`` (any edit, a comment too, asks again: a cached
answer must be one today's code would give). A run re-uses the rows whose key matches and says so; anything else is
answered and saved again. Latency figures in re-used rows are those measured when they were answered. Left out on
purpose: the context probes and the freshness demo (minutes, and they edit a copy of the folder), and partial
systems (a system's rows are saved whole).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from finetune.lora import adapter_dir
from hybrid.systems import CLOSED_BOOK, CompareConfig, run_closed_book, run_retrieval, with_generator
from rag.gguf_lora import adapter_stamp
from rag.gguf_q8 import model_variant
from rag.pipeline import RagPipeline
from rag.ranking import Ranking
from rag.store import fingerprint

log = logging.getLogger(__name__)
PACKAGES = ("rag", "finetune", "hybrid")


@functools.cache
def code_stamp() -> str:
    """A digest of every Python source file of the three packages, as they are on disk now."""
    root, h = Path(__file__).resolve().parent.parent, hashlib.sha256()
    for pkg in PACKAGES:
        for f in sorted((root / pkg).rglob("*.py")):
            h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def answered(out: str | Path, label: str, key: dict, run: Callable[[], list[dict]]) -> tuple[list[dict], str | None]:
    """``label``'s rows and when they were answered: the saved ones when their key equals ``key`` (made
    JSON-comparable), else ``run()``'s (None), saved (atomically: an interrupted save leaves the old file or none)."""
    path = Path(out) / "answers" / f"{label}.json"
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        if saved.get("key") == digest and isinstance(saved.get("rows"), list):
            log.info("%s: re-using the %d answers saved in %s (same questions, settings, index, adapter and "
                     "code)", label, len(saved["rows"]), path)
            return saved["rows"], saved.get("answered", "?")
    except (OSError, ValueError, AttributeError):
        pass  # none saved, or damaged: answer again
    rows = run()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        when = time.strftime("%Y-%m-%d %H:%M")
        tmp.write_text(json.dumps({"key": digest, "answered": when, "rows": rows}, ensure_ascii=False),
                       encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:  # the comparison goes on; only a later resume loses these answers
        log.warning("could not save %s's answers to %s (%s); a re-run will answer them again", label, path,
                    e.strerror or e)
    return rows, None


def system_rows(cfg: CompareConfig, system: str, base: RagPipeline, qs: list[dict], rankeds: list[Ranking],
                seed: int = 0, reused: dict | None = None) -> tuple[list[dict], RagPipeline | None]:
    """One system's scored rows for ``compare`` (``seed``: the training seed of its adapter) — saved ones when
    nothing they depend on changed, noted in ``reused`` as {label: when answered} — and, for a retrieval system,
    its pipeline."""
    adapter = cfg.adapter(system)
    # the adapter's weights, not its training folder: a seed trained into <folder>/seeds/ must not void seed 0's
    key = {"system": system, "questions": [[q["id"], q["question"], q["answer"], q.get("aliases", [])] for q in qs],
           "model": cfg.model, "weights": model_variant(cfg.model), "backend": cfg.backend,
           "latency_sample": cfg.latency_sample, "adapter": adapter_stamp(adapter_dir(adapter)) if adapter else "",
           "code": code_stamp()}
    if system in CLOSED_BOOK:
        pipe, run = None, lambda: run_closed_book(cfg, system, qs)
    else:
        pipe = with_generator(base, cfg, system)
        # what the shared ranking and gate are made of: the index's contents, the retrieval settings, the rule
        key |= {"rag": asdict(pipe.cfg), "gate": [pipe.calibration_key(), pipe.mode, pipe.rule()],
                "index": fingerprint(pipe.index)}
        run = lambda: run_retrieval(cfg, system, pipe, qs, rankeds)  # noqa: E731
    if not cfg.resume:
        return run(), pipe
    label = f"{system}-seed{seed}"
    rows, when = answered(cfg.out, label, key, run)
    if when is not None and reused is not None:
        reused[label] = when
    return rows, pipe
