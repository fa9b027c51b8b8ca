"""Side by side on the same questions: base and fine-tuned closed-book, RAG, fine-tuned + RAG, hybrid (RAFT).

Every system answers every question of the golden ``test`` split (or, for a folder without a golden file, the
held-out synthetic questions ``finetune data`` wrote — labelled as such). All retrieval systems share one
ranking per question (same index, re-ranker and calibrated abstention threshold), so they differ only in the
generator. Scores are RAG's (``rag.metrics``), computed the same way for every system; each carries a 95%
bootstrap interval over questions, and differences from RAG a paired interval.

Also measured: where answers come from (``hybrid/probes.py``: no context, unrelated context, and a
*counterfactual* context whose answer value was edited — does the answer follow the passage or the weights?),
tokens and latency per query, set-up cost (a fresh index build vs data + training time, artefact sizes),
forgetting (general probes), the spread over training seeds (``hybrid/seeds.py``) and, with ``--freshness``,
what happens after the documents change (``hybrid/freshness.py``).
Latency comes from the first ``latency_sample`` questions answered one at a time; the rest are batched
(faster on a CPU, but batch time is throughput, not latency). Each system's answers are kept once it finishes
(``hybrid/resume.py``), so an interrupted run, or ``--seeds 3`` after a one-seed run, asks only what is missing.
Left out on purpose: LLM judges (none offline).
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

from finetune.evaluate import model_to_score, report_path
from finetune.lora import adapter_dir
from hybrid.freshness import freshness
from hybrid.probes import context_probes
from hybrid.resume import system_rows
from hybrid.seeds import seeded, spread
from hybrid.systems import (
    ADAPTER,
    RETRIEVAL,
    SYSTEMS,
    CompareConfig,
    judged,
    questions,
)
from rag import metrics as M
from rag.atomic import write_text
from rag.choose import calibrate
from rag.pipeline import RagConfig, RagPipeline
from rag.ranking import Ranking
from rag.store import drop_store, update_store

log = logging.getLogger(__name__)
def summarise(rows: list[dict], n_boot: int, seed: int) -> dict:
    """Means with 95% bootstrap intervals, abstention, tokens and latency for one system's rows."""
    ans = [r for r in rows if r["answerable"]]
    cols = {"contains": [r["contains"] for r in ans], "exact": [r["exact"] for r in ans],
            "f1": [r["f1"] for r in ans],
            "citation_accuracy": [float(r["citation_ok"]) for r in ans if r["citation_ok"] is not None],
            "hallucination_rate": [r["hallucinated"] for r in rows],
            "faithfulness": [r["faithfulness"] for r in rows if r["faithfulness"] is not None],
            "format_consistency": [float(r["format_ok"]) for r in rows]}
    out = {k: ({"mean": round(m, 4), "ci": [round(lo, 4), round(hi, 4)]} if v else None)
           for k, v in cols.items() for m, lo, hi in [M.bootstrap_ci(v, n_boot, seed) if v else (0, 0, 0)]}
    out |= {k: None if v is None else round(v, 4) for k, v in
            M.abstention([r["abstained"] for r in rows], [not r["answerable"] for r in rows]).items()}
    out["prompt_tokens"] = M.mean([r["prompt_tokens"] for r in rows])
    out["new_tokens"] = M.mean([r["new_tokens"] for r in rows])
    timed = [r["latency_s"] for r in rows if r["latency_s"]]
    stages = sorted({s for t in timed for s in t})
    out["latency_ms"] = {s: M.percentiles([t[s] for t in timed if s in t]) for s in stages}
    out["latency_ms"]["total"] = M.percentiles([sum(t.values()) for t in timed])
    out["latency_n"] = len(timed)
    return out


def paired(rows: list[dict], ref_rows: list[dict], n_boot: int, seed: int) -> dict:
    """``rows`` minus ``ref_rows`` on the same questions (contains over answerable ones, hallucination rate over
    all), with 95% paired bootstrap intervals; ``significant`` when the interval excludes zero."""
    d = {}
    for metric, key, only_answerable in (("contains", "contains", True), ("hallucination_rate", "hallucinated", False)):
        pairs = [(a[key], b[key]) for a, b in zip(rows, ref_rows, strict=True)
                 if a["answerable"] or not only_answerable]
        mean, lo, hi = M.paired_bootstrap([p[0] for p in pairs], [p[1] for p in pairs], n_boot, seed)
        d[metric] = {"diff": round(mean, 4), "ci": [round(lo, 4), round(hi, 4)], "significant": lo > 0 or hi < 0}
    return d


def differences(per_system: dict[str, list[dict]], ref: str, n_boot: int, seed: int) -> dict:
    """Every system minus ``ref`` (``paired``)."""
    return {name: paired(rows, per_system[ref], n_boot, seed) for name, rows in per_system.items() if name != ref}


def pairwise(per_system: dict[str, list[dict]], n_boot: int, seed: int) -> dict:
    """Every pair of systems, later minus earlier in ``SYSTEMS`` order (``"rag - base"``), ``paired``."""
    names = [s for s in SYSTEMS if s in per_system]
    return {f"{b} - {a}": paired(per_system[b], per_system[a], n_boot, seed)
            for i, a in enumerate(names) for b in names[i + 1:]}


def _size_mb(path: str | Path, skip: str = "") -> float:
    p = Path(path)
    files = [p] if p.is_file() else list(p.rglob("*")) if p.exists() else []
    return round(sum(f.stat().st_size for f in files if f.is_file() and not (skip and f.match(skip))) / 1e6, 1)


def setup_cost(cfg: CompareConfig, pipe: RagPipeline) -> dict:
    """What each approach costs before its first answer: a fresh index build vs data + training."""
    with tempfile.TemporaryDirectory() as tmp:
        build = replace(pipe.cfg, index_dir=str(Path(tmp) / "index"))  # the pipeline's store, built from nothing
        t0 = time.perf_counter()
        update_store(build, progress=False)
        index_s = time.perf_counter() - t0
        size = None if build.store_url else _size_mb(build.index_dir)  # a server's disk is not measured from here
        drop_store(build)  # a server keeps collections after the folder goes
    out = {"index": {"build_s": round(index_s, 1), "size_mb": size}}
    # an adapter's size as trained: the GGUF LoRA and merged model llama.cpp made from it are caches (1.9 GB merged)
    for kind, root in (("finetuned", cfg.finetuned), ("raft", cfg.raft)):
        m = Path(root) / "metrics.json"
        if m.exists():
            metrics = json.loads(m.read_text())
            data = Path(root).parent / "data" / ("build.json" if kind == "finetuned" else "raft_config.json")
            data_s = json.loads(data.read_text())["stats"].get("seconds") if data.exists() else None
            out[kind] = {"train_s": metrics.get("seconds"), "train_tokens": metrics.get("tokens_seen"),
                         "data_s": data_s, "adapter_mb": _size_mb(Path(root) / "adapter", skip="*.gguf")}
    return out


def compare(cfg: CompareConfig, with_freshness: bool = False, progress: bool = True) -> dict:
    """Run every system and return the JSON-ready comparison (``hybrid.report`` renders it)."""
    qs, golden, source = questions(cfg)
    if not qs:
        raise ValueError(f"--split {cfg.split}: no such questions in {cfg.golden}")
    systems = []
    for s in cfg.system_list:
        try:
            cfg.adapter(s)  # fail before any slow work when an adapter is missing
            systems.append(s)
        except FileNotFoundError as e:
            if cfg.systems != ",".join(SYSTEMS):
                raise  # the user asked for this system by name
            log.warning("leaving out %s", e)
    cfg.systems = ",".join(systems)
    # one runtime for every arm, so the adapters' arms and the plain ones differ only by the adapter
    base = RagPipeline(RagConfig(docs=cfg.docs, index_dir=cfg.index_dir, model=cfg.model, backend=cfg.backend,
                                 store=cfg.store, store_url=cfg.store_url))
    seconds, t0 = {}, time.perf_counter()  # wall time per stage, for the time budget

    def lap(stage: str) -> None:
        nonlocal t0
        seconds[stage] = round(time.perf_counter() - t0, 1)
        log.info("%s: %.0f s", stage, seconds[stage])
        t0 = time.perf_counter()

    base.update_index(progress=progress)
    lap("index")
    calibration = calibrate(base, golden, progress) if golden else None
    lap("mode and calibration")
    rankeds = [base.ranked(q["question"]) for q in qs] if set(systems) & set(RETRIEVAL) else []
    lap(f"ranking {len(rankeds)} questions")
    per_system, pipes, reused = {}, {}, {}
    for s in systems:
        per_system[s], pipe = system_rows(cfg, s, base, qs, rankeds, reused=reused)
        if pipe is not None:
            pipes[s], rankeds = pipe, judged(rankeds, per_system[s])
        lap(f"system {s}")
    ref = "rag" if "rag" in per_system else systems[0]
    result = {"settings": asdict(cfg) | {"questions": source, "n": len(qs),
                                         "n_answerable": sum(q["answer"] is not None for q in qs),
                                         "calibration": calibration, "faithfulness": "token overlap: a sentence "
                                         "counts as supported when >= 80% of its content words occur in the cited "
                                         "passages"},
              "systems": {s: summarise(rows, cfg.bootstrap, cfg.seed) for s, rows in per_system.items()},
              "differences_vs": ref, "differences": differences(per_system, ref, cfg.bootstrap, cfg.seed),
              "pairwise": pairwise(per_system, cfg.bootstrap, cfg.seed),
              "setup": setup_cost(cfg, base)}
    if "rag" in pipes:  # the file llama.cpp loaded (a Q8_0 copy on AMX CPUs, rag.gguf_q8)
        result["settings"]["reader_weights"] = pipes["rag"].generator.weights or None
    lap("set-up cost (a fresh index)")
    result["forgetting"] = forgetting(cfg, per_system)
    lap("forgetting")
    if cfg.seeds > 1:
        result["seeds"] = over_seeds(cfg, base, qs, rankeds, per_system, reused)
        lap("other seeds")
    if cfg.probes > 0 and pipes:
        result["context_probes"] = context_probes(pipes, qs, rankeds, cfg.probes, cfg.seed)
        lap("context probes")
    if with_freshness:
        result["freshness"] = freshness(cfg, base, progress)
        lap("freshness")
    result["seconds"] = seconds
    result["settings"]["answers_reused"] = reused  # their systems' seconds above are not answering times
    result["per_question"] = {s: rows for s, rows in per_system.items()}
    return result


def over_seeds(cfg: CompareConfig, base: RagPipeline, qs: list[dict], rankeds: list[Ranking], first: dict,
               reused: dict | None = None) -> dict:
    """``--seeds N``: the adapter systems again with adapters trained on seeds 1..N-1 (``hybrid.seeds``), all
    questions batched; per system the spread of each metric over the N seeds (``first`` holds seed 0's rows)."""
    trained = [s for s in first if ADAPTER[s]]
    kinds = {ADAPTER[s] for s in trained}
    runs = {s: [first[s]] for s in trained}
    for seed in range(1, cfg.seeds):
        scfg = replace(seeded(cfg, seed, kinds), latency_sample=0)
        for s in trained:
            log.info("system %s, training seed %d", s, seed)
            runs[s].append(system_rows(scfg, s, base, qs, rankeds, seed, reused)[0])
    ref = first.get("rag")
    out = {s: spread([summarise(rows, cfg.bootstrap, cfg.seed) for rows in rs],
                     [differences({s: rows, "rag": ref}, "rag", cfg.bootstrap, cfg.seed)[s] for rows in rs]
                     if ref else []) for s, rs in runs.items()}
    if {"finetuned", "finetuned+rag"} <= set(runs):  # claim 6 is "beats either alone": the same seed's adapter too
        out["finetuned+rag"]["vs_finetuned"] = [
            paired(a, b, cfg.bootstrap, cfg.seed)["contains"]
            for a, b in zip(runs["finetuned+rag"], runs["finetuned"], strict=True)]
    return out


def forgetting(cfg: CompareConfig, systems) -> dict:
    """General-probe accuracy change (tuned − base): the closed-book adapter's from ``make finetune``'s report,
    the RAFT adapter's from ``make hybrid`` (``raft_probes``, measured here if that left none); 0 for the
    untouched base model by construction."""
    out = {s: 0.0 for s in ("base", "rag") if s in systems}
    base_acc, tuned_acc = finetune_probes(cfg)
    if base_acc is not None:
        out |= {s: round(tuned_acc - base_acc, 4) for s in ("finetuned", "finetuned+rag") if s in systems}
    if "hybrid" in systems:
        measured = raft_probes(cfg)
        out["hybrid"] = measured["change"] if measured else None
    return out


def finetune_probes(cfg: CompareConfig) -> tuple[float | None, float | None]:
    """The base and closed-book adapter's general-probe accuracy from ``make finetune``'s report (None, None
    without one)."""
    report = report_path(cfg.docs, cfg.model)
    if report.exists():
        r = json.loads(report.read_text())
        if r.get("tuned", {}).get("probes"):
            return r["base"]["probes"]["accuracy"], r["tuned"]["probes"]["accuracy"]
    return None, None


def raft_probes(cfg: CompareConfig, progress: bool = False) -> dict | None:
    """The RAFT adapter's general-probe accuracy beside the base model's (the same probes ``finetune eval``
    asks; the base model's from ``make finetune``'s report when there is one): ``{"base", "tuned", "change"}``,
    cached in ``<raft>/probes.json`` for as long as the adapter's metrics.json is unchanged. ``make hybrid``
    measures it after training, as ``make finetune`` does for its adapter, so the comparison reads it (~40 s of
    the 1.5B's time)."""
    from finetune.evaluate import EvalConfig, evaluate_model

    root = Path(cfg.raft)
    if not (root / "metrics.json").exists() or not Path(EvalConfig.probes).exists():
        return None
    stamp, cache = (root / "metrics.json").read_text(), root / "probes.json"
    cached = json.loads(cache.read_text()) if cache.exists() else {}
    if cached.get("stamp") == stamp:
        return cached
    ecfg = EvalConfig(docs=cfg.docs, model=cfg.model, general_text="")

    def accuracy(adapter: str | None) -> float:
        gen = model_to_score(cfg.model, ecfg.max_new_tokens, adapter, backend=cfg.backend)  # as its RAG arms
        return evaluate_model(gen, ecfg, {}, progress=progress)["probes"]["accuracy"]

    base_acc = finetune_probes(cfg)[0]
    base = accuracy(None) if base_acc is None else base_acc
    tuned = accuracy(str(adapter_dir(root)))
    measured = {"stamp": stamp, "base": base, "tuned": tuned, "change": round(tuned - base, 4)}
    write_text(cache, json.dumps(measured))  # a torn file would stop every later compare
    return measured
