"""Closed-book evaluation, base vs LoRA-tuned: golden QA, hallucination, format, refusals, general skills, perplexity.

The model gets the question and nothing else (no retrieval): whatever it answers comes from its weights. Scored
with rag's answer metrics (contains / exact / token F1 on the answer line, abstention precision/recall) plus:

- *hallucination rate*: a non-abstaining answer that is wrong (any answer to an unanswerable question is wrong);
- *format consistency*: replies that follow the trained format exactly (answer line + ``Source:`` line, or
  exactly "I don't know.");
- *constraint adherence*: unanswerable questions refused, and answered ones citing a document that exists;
- *capability regression*: general-skill probes (``data/probes/probes.jsonl``) and perplexity on general text
  (``data/probes/general.txt``), so forgetting shows as a drop from base to tuned (``--strict`` fails on it).

Training questions are scored too (memorisation), and the held-out synthetic questions are split by whether the
base model already knew the answer. Left out on purpose: LLM-as-judge scoring (no judge runs offline).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from finetune.data import HELDOUT, closed_book_messages, parse_answer
from finetune.lora import adapter_dir, frozen_bf16, load_base, load_tuned
from rag import metrics as M
from rag.atomic import write_text
from rag.config import folder_name, load_jsonl, option
from rag.evaluate import golden_for, load_golden
from rag.generate import Generator, is_abstention
from rag.gguf_q8 import model_variant as weights_variant
from rag.models import DEFAULT_READER
from rag.runtime import load_generator

log = logging.getLogger(__name__)


@dataclass
class EvalConfig:
    """What ``python -m finetune eval`` compares; every field is a flag."""

    docs: str = option("data/demo", "documents folder (answers must cite a document in it)")
    golden: str = option("", "golden JSONL (default <docs>/golden.jsonl); its test split is the main score")
    data: str = option("", "dataset folder from `finetune data` (its held-out synthetic questions are scored)")
    model: str = option(DEFAULT_READER, "base model")
    adapter: str = option("", "LoRA output dir or adapter folder to compare against the base ('' = base only)")
    train_sample: int = option(200, "training questions scored for memorisation, evenly spaced (0 = none)")
    probes: str = option("data/probes/probes.jsonl", "general-skill probes")
    general_text: str = option("data/probes/general.txt", "general text for perplexity")
    max_new_tokens: int = option(32, "tokens per closed-book answer")
    max_probe_drop: float = option(0.10, "--strict fails when probe accuracy drops more than this (absolute)")

    def __post_init__(self):
        self.golden = golden_for(self.docs, self.golden)
        if self.train_sample < 0 or self.max_new_tokens < 1 or not 0 <= self.max_probe_drop <= 1:
            raise ValueError("--train-sample must be >= 0, --max-new-tokens >= 1, --max-probe-drop in [0, 1]")
        if not Path(self.docs).is_dir():
            raise ValueError(f"--docs {self.docs}: no such folder")
        if self.adapter and not Path(self.adapter).exists():
            raise ValueError(f"--adapter {self.adapter}: not found; train one first (`make finetune`)")
        if self.data and not Path(self.data).exists():
            raise ValueError(f"--data {self.data}: not found; build it with `python -m finetune data`")


# part of the cached base scores' key: raised when scoring changes what a score means (2: perplexity in bf16
# where training holds the base in bf16)
SCORING = 2


def score_qa(replies: list[str], items: list[dict], docs: str) -> tuple[dict, list[dict]]:
    """Summary metrics and per-question rows for closed-book replies to golden-format ``items``."""
    rows = []
    for text, q in zip(replies, items, strict=True):
        parsed = parse_answer(text)
        answer = parsed[0] if parsed else text
        abstained = is_abstention(text)
        refs = [q["answer"], *q.get("aliases", [])] if q["answer"] is not None else []
        grade = M.graded(answer, refs, abstained)
        correct = bool(grade["contains"])
        cited_ok = bool(parsed) and (Path(docs) / parsed[1]).is_file()
        rows.append({"id": q["id"], "question": q["question"], "expected": q["answer"], "reply": text,
                     "abstained": abstained, "correct": correct, "hallucinated": not abstained and not correct,
                     "format_ok": bool(parsed) or text.strip() == "I don't know.",
                     "source_ok": bool(parsed) and parsed[1] in q.get("sources", []),
                     "adheres": abstained if not refs else (abstained or cited_ok),
                     "exact": grade["exact"], "f1": grade["f1"]})
    ans = [r for r, q in zip(rows, items, strict=True) if q["answer"] is not None]
    unans = [r for r, q in zip(rows, items, strict=True) if q["answer"] is None]
    summary = {"n": len(rows), "contains": M.mean([float(r["correct"]) for r in ans]),
               "exact": M.mean([r["exact"] for r in ans]), "f1": M.mean([r["f1"] for r in ans]),
               "source_accuracy": M.mean([float(r["source_ok"]) for r in ans if not r["abstained"]]),
               "hallucination_rate": M.mean([float(r["hallucinated"]) for r in rows]),
               "format_consistency": M.mean([float(r["format_ok"]) for r in rows]),
               "constraint_adherence": M.mean([float(r["adheres"]) for r in rows]),
               "refused_unanswerable": M.mean([float(r["abstained"]) for r in unans])}
    summary |= {k: None if v is None else round(v, 4) for k, v in
                M.abstention([r["abstained"] for r in rows], [q["answer"] is None for q in items]).items()}
    return summary, rows


def probe_passes(reply: str, probe: dict) -> bool:
    """A probe passes by 'contains' (answer or alias, normalised) or by a regex on the raw reply."""
    if probe.get("check") == "regex":
        return re.search(probe["answer"], reply.strip(), re.I | re.M) is not None
    return bool(M.contains(reply, [probe["answer"], *probe.get("aliases", [])]))


def model_to_score(model: str, max_new_tokens: int, adapter: str | None = None, backend: str = "auto") -> Generator:
    """The base or tuned model as fine-tuning scores its replies: llama.cpp for packaged GGUF models on a CPU (the
    peft adapter converted to a GGUF LoRA; ~1 s a closed-book answer from the 1.5B, where transformers on 2 cores
    takes ~15 s), transformers otherwise (``rag.runtime.load_generator``)."""
    return load_generator(model, max_new_tokens, adapter=adapter, backend=backend)


def perplexity(gen: Generator, text: str, window: int = 256) -> float:
    """Token-level perplexity of ``text`` in non-overlapping windows (same windows for every model). It reads the
    torch model's loss, so a generator on another runtime is re-loaded on transformers for it (``on_torch``)."""
    import torch

    model, tok, device = (gen.model, gen.tokenizer, gen.device) if hasattr(gen, "model") else (*on_torch(gen), "cpu")
    ids = tok(text, return_tensors="pt")["input_ids"][0]
    nll, n = 0.0, 0
    with torch.inference_mode():
        for i in range(0, len(ids) - 1, window):
            chunk = ids[i:i + window].unsqueeze(0).to(device)
            if chunk.shape[1] < 2:
                break
            loss = model(chunk, labels=chunk).loss.item()
            nll, n = nll + loss * (chunk.shape[1] - 1), n + chunk.shape[1] - 1
    return round(math.exp(nll / n), 3)


def on_torch(gen: Generator):
    """(model, tokenizer): a CPU generator's base model (with its adapter) on transformers, loaded in bf16 where
    training holds that base in bf16 (``frozen_bf16``); the adapter stays fp32, as it was trained. The 1.5B's 2,664
    tokens of general text on a 2-core AMD EPYC (2026-12-05): 12.409 in 54 s in fp32; this way 12.419 in 32 s,
    loading included (the make finetune adapter: 16.951 in 39 s)."""
    bf16 = frozen_bf16("auto", "cpu", gen.name)
    model, tok = load_tuned(gen.adapter, "cpu", bf16=bf16) if gen.adapter else load_base(gen.name, "cpu", bf16=bf16)
    return model.eval(), tok


def report_path(docs: str | Path, model: str) -> Path:
    """Where ``make finetune`` writes its base-vs-tuned result for a docs folder and base model (``hybrid compare``
    reads it; one file per model, so fine-tuning another base model does not overwrite the report of the first)."""
    return Path(".openbook") / "reports" / f"finetune-eval-{folder_name(docs)}-{Path(model).name}.json"


def question_sets(cfg: EvalConfig) -> dict[str, list[dict]]:
    """golden test, a fixed sample of golden train; held-out and trained synthetic questions (given a dataset)."""
    sets: dict[str, list[dict]] = {}
    if cfg.golden:
        golden = load_golden(cfg.golden, cfg.docs)
        sets["golden_test"] = [q for q in golden if q["split"] == "test"]
        train = [q for q in golden if q["split"] == "train"]
        step = max(len(train) // cfg.train_sample, 1) if cfg.train_sample else 0
        sets["golden_train"] = train[::step][:cfg.train_sample] if step else []
    if cfg.data and (Path(cfg.data) / HELDOUT).exists():
        from datasets import load_from_disk

        sets["synthetic_test"] = load_jsonl(str(Path(cfg.data) / HELDOUT))
        # the synthetic questions trained on, as first written (memorisation, as golden_train is for golden)
        rows = [r for r in load_from_disk(cfg.data) if r["kind"] == "synthetic" and r["original"]]
        rows = sorted(rows, key=lambda r: r["fact"])[:cfg.train_sample]
        sets["synthetic_train"] = [{"id": r["fact"], "question": r["question"], "answer": r["answer"], "aliases": [],
                                    "sources": [r["source"]], "type": "synthetic", "split": "train"} for r in rows]
    return {k: v for k, v in sets.items() if v}


def closed_book_replies(gen: Generator, items: list[dict], max_new_tokens: int, desc: str = "") -> list[str]:
    """The model's closed-book reply to each golden-format item's question."""
    return [g.text for g in gen.chat_batch([closed_book_messages(q["question"]) for q in items], max_new_tokens,
                                           desc=desc)]


def evaluate_model(gen: Generator, cfg: EvalConfig, sets: dict[str, list[dict]], progress: bool = True) -> dict:
    """Every score for one model (base or tuned)."""
    from tqdm import tqdm

    out: dict = {"qa": {}, "per_question": {}}
    for name, items in tqdm(sets.items(), desc=f"closed-book ({'tuned' if cfg.adapter else 'base'})",
                            disable=not progress):
        replies = closed_book_replies(gen, items, cfg.max_new_tokens, name if progress else "")
        out["qa"][name], out["per_question"][name] = score_qa(replies, items, cfg.docs)
    if cfg.probes and Path(cfg.probes).exists():
        probes = load_jsonl(cfg.probes)
        replies = [g.text for g in gen.chat_batch([[{"role": "user", "content": p["prompt"]}] for p in probes],
                                                  cfg.max_new_tokens, desc="general probes" if progress else "")]
        passed = [probe_passes(r, p) for r, p in zip(replies, probes, strict=True)]
        by_skill: dict[str, list[bool]] = {}
        for p, ok in zip(probes, passed, strict=True):
            by_skill.setdefault(p.get("skill", "all"), []).append(ok)
        out["probes"] = {"accuracy": M.mean([float(x) for x in passed]),
                         **{s: M.mean([float(x) for x in v]) for s, v in sorted(by_skill.items())}}
        out["per_question"]["probes"] = [{"id": p["id"], "reply": r, "passed": ok}
                                         for p, r, ok in zip(probes, replies, passed, strict=True)]
    if cfg.general_text and Path(cfg.general_text).exists():
        out["perplexity_general"] = perplexity(gen, Path(cfg.general_text).read_text(encoding="utf-8"))
    return out


def split_by_base(base: dict, tuned: dict, name: str = "synthetic_test") -> dict | None:
    """Tuned accuracy on held-out questions the base model already answered closed-book vs those it did not."""
    if name not in base["per_question"]:
        return None
    groups: dict[str, list[float]] = {"base_knew": [], "base_did_not": []}
    for b, t in zip(base["per_question"][name], tuned["per_question"][name], strict=True):
        groups["base_knew" if b["correct"] else "base_did_not"].append(float(t["correct"]))
    return {k: {"n": len(v), "tuned_contains": M.mean(v)} for k, v in groups.items()}


def correct_flags(result: dict, name: str) -> list[float]:
    """1.0/0.0 per answerable question of set ``name`` in one model's result (what "contains" averages)."""
    return [float(r["correct"]) for r in result["per_question"][name] if r["expected"] is not None]


def intervals(base: dict, tuned: dict, n_boot: int = 2000) -> dict:
    """Per question set: base and tuned "contains" with 95% bootstrap intervals, and tuned − base paired."""
    out = {}
    for name in tuned["qa"]:
        b, t = correct_flags(base, name), correct_flags(tuned, name)
        if t:
            out[name] = {"n": len(t), **{k: [round(x, 4) for x in v] for k, v in (
                ("base", M.bootstrap_ci(b, n_boot)), ("tuned", M.bootstrap_ci(t, n_boot)),
                ("tuned_minus_base", M.paired_bootstrap(t, b, n_boot)))}}
    return out


def learning_curve(cfg: EvalConfig, sets: dict[str, list[dict]], snapshots: dict[int, Path], base: dict,
                   tuned: dict, final_step: int, progress: bool = True) -> list[dict]:
    """Closed-book "contains" per question set at step 0 (the base model), each snapshot, and the end.

    Only the answerable questions are asked at the snapshots (no refusals, probes or perplexity): the curve
    shows when the facts were learned, and its end points are the full evaluations already made.
    """
    sets = {k: [q for q in v if q["answer"] is not None] for k, v in sets.items()}
    rows = [{"step": 0, **{k: v["contains"] for k, v in base["qa"].items()}}]
    for step, folder in snapshots.items():
        if step >= final_step:
            continue
        gen = model_to_score(cfg.model, cfg.max_new_tokens, str(folder))
        row: dict = {"step": step}
        for name, items in sets.items():
            replies = closed_book_replies(gen, items, cfg.max_new_tokens, f"step {step}: {name}" if progress else "")
            row[name] = score_qa(replies, items, cfg.docs)[0]["contains"]
        rows.append(row)
        del gen
    rows.append({"step": final_step, **{k: v["contains"] for k, v in tuned["qa"].items()}})
    return rows


def plot_curve(rows: list[dict], path: str | Path, title: str) -> None:
    """One line per question set: closed-book "contains" against optimiser steps."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5))
    ax = fig.add_subplot()
    for name in [k for k in rows[0] if k != "step"]:
        pts = [(r["step"], r[name]) for r in rows if r.get(name) is not None]
        ax.plot(*zip(*pts, strict=True), marker="o", label=name)
    ax.set(xlabel="optimiser step", ylabel="closed-book 'contains'", ylim=(-0.02, 1.02), title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def base_scores(cfg: EvalConfig, sets: dict[str, list[dict]], progress: bool = True) -> dict:
    """``evaluate_model`` for the base model, re-used while the model, questions, probes, text and prompt are the
    same: greedy decoding gives the same replies, and on the 1.5B they take ~6 minutes of every `make finetune`.
    Kept in ``.openbook/cache/finetune-base/``; delete it to measure again."""
    local = Path(cfg.model).expanduser()  # a packaged name is sha-pinned; a re-saved local model is another model
    model, mtime = (str(local.resolve()), local.stat().st_mtime) if local.exists() else (cfg.model, 0)
    texts = [Path(f).read_text(encoding="utf-8") if f and Path(f).exists() else "" for f in (cfg.probes,
                                                                                            cfg.general_text)]
    key = hashlib.sha256(json.dumps([SCORING, str(model), mtime, weights_variant(cfg.model), cfg.max_new_tokens,
                                     sets, texts, closed_book_messages("?")], sort_keys=True,
                                    default=str).encode()).hexdigest()
    path = Path(".openbook") / "cache" / "finetune-base" / f"{Path(cfg.model).name}-{key[:16]}.json"
    if path.exists():
        with contextlib.suppress(OSError, ValueError):
            cached = json.loads(path.read_text(encoding="utf-8"))
            log.info("base model scores re-used from %s (same model, questions and probes)", path)
            return cached
    base_cfg = EvalConfig(**{**asdict(cfg), "adapter": ""})
    scores = evaluate_model(model_to_score(cfg.model, cfg.max_new_tokens), base_cfg, sets, progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(scores, ensure_ascii=False))
    return scores


def compare(cfg: EvalConfig, progress: bool = True, sets: dict | None = None) -> dict:
    """Base and (when ``cfg.adapter`` is set) tuned model on the same questions, probes and text."""
    sets = sets or question_sets(cfg)
    result = {"settings": asdict(cfg) | {"questions": {k: len(v) for k, v in sets.items()}},
              "base": base_scores(cfg, sets, progress)}
    if cfg.adapter:
        adapter = str(adapter_dir(cfg.adapter))
        result["tuned"] = evaluate_model(model_to_score(cfg.model, cfg.max_new_tokens, adapter), cfg, sets,
                                         progress)
        result["synthetic_by_base"] = split_by_base(result["base"], result["tuned"])
        result["intervals"] = intervals(result["base"], result["tuned"])
        base_p, tuned_p = result["base"].get("probes", {}), result["tuned"].get("probes", {})
        drops = {k: round((base_p[k] or 0) - (tuned_p[k] or 0), 4) for k in base_p}
        result["probe_drop"] = drops.get("accuracy", 0.0)
        # A gain in one skill can hide the loss of another (format training lifts instruction following), so a
        # single skill losing twice the allowed drop counts too; 18 items per skill, one item is 0.056.
        result["regressed_skills"] = [k for k, d in drops.items() if k != "accuracy" and d > 2 * cfg.max_probe_drop]
        result["regression"] = result["probe_drop"] > cfg.max_probe_drop or bool(result["regressed_skills"])
    return result
