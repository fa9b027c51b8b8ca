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
(faster on a CPU, but batch time is throughput, not latency). Left out on purpose: LLM judges (none offline).
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from finetune.data import HELDOUT, closed_book_messages, parse_answer
from finetune.evaluate import model_to_score, report_path
from finetune.lora import adapter_dir
from hybrid.probes import context_probes
from hybrid.seeds import seed_adapter, spread
from rag import metrics as M
from rag.bm25 import tokenize
from rag.config import folder_name, option, run_dir
from rag.evaluate import calibrate, golden_for, load_golden
from rag.generate import IDK, is_abstention
from rag.index import update_index
from rag.models import DEFAULT_GENERATOR
from rag.pipeline import RagConfig, RagPipeline, Ranking

log = logging.getLogger(__name__)
CLOSED_BOOK, RETRIEVAL = ("base", "finetuned"), ("rag", "finetuned+rag", "hybrid")
SYSTEMS = (*CLOSED_BOOK, *RETRIEVAL)
ADAPTER = {"base": "", "rag": "", "finetuned": "finetuned", "finetuned+rag": "finetuned", "hybrid": "raft"}
METRICS = ("contains", "exact", "f1", "citation_accuracy", "hallucination_rate", "faithfulness", "format_consistency")


@dataclass
class CompareConfig:
    """What to compare; every field is a ``python -m hybrid compare`` flag."""

    docs: str = option("data/demo", "documents folder")
    golden: str = option("", "golden JSONL (default <docs>/golden.jsonl; without one: held-out synthetic questions)")
    split: str = option("test", "golden split to answer")
    index_dir: str = option("", "the RAG index (default .openbook/index/<folder>)")
    model: str = option(DEFAULT_GENERATOR, "base generator (the adapters must have been trained on it)")
    finetuned: str = option("", "closed-book LoRA from `make finetune` (default .openbook/finetune/<folder>/<model>)")
    raft: str = option("", "RAFT LoRA from `make hybrid` (default .openbook/hybrid/<folder>/<model>)")
    systems: str = option(",".join(SYSTEMS), "comma-separated systems to run")
    latency_sample: int = option(12, "questions answered one at a time for latency (the rest in batches)")
    probes: int = option(16, "questions re-asked with no, unrelated and counterfactual context, per retrieval "
                         "system (0: no probes; a seeded sample of those whose passages hold the answer)")
    bootstrap: int = option(2000, "bootstrap resamples for the 95% intervals")
    price_per_mtok: float = option(0.50, "USD per million tokens processed, for per-query cost and break-even")
    seed: int = option(0, "seeds the bootstrap and the probes")
    seeds: int = option(1, "training seeds for the adapter systems: 1 = the adapters as trained; N > 1 also "
                        "trains N-1 more per adapter on the same data (minutes each) and reports the spread")
    out: str = option("", "report folder (default .openbook/reports/compare-<folder>)")

    def __post_init__(self):
        if self.seeds < 1:
            raise ValueError(f"--seeds must be at least 1, not {self.seeds}")
        unknown = set(self.system_list) - set(SYSTEMS)
        if unknown:
            raise ValueError(f"--systems: unknown {', '.join(sorted(unknown))}; choose from {', '.join(SYSTEMS)}")
        self.finetuned = self.finetuned or str(run_dir("finetune", self.docs, self.model))
        self.raft = self.raft or str(run_dir("hybrid", self.docs, self.model))
        self.out = self.out or str(Path(".openbook") / "reports" / f"compare-{folder_name(self.docs)}")
        self.golden = golden_for(self.docs, self.golden)

    @property
    def system_list(self) -> list[str]:
        return [s.strip() for s in self.systems.split(",") if s.strip()]

    def adapter(self, system: str) -> str | None:
        """The adapter folder a system runs with (None for the base model); a clear error when it is missing."""
        kind = ADAPTER[system]
        if not kind:
            return None
        root = self.finetuned if kind == "finetuned" else self.raft
        try:
            return str(adapter_dir(root))
        except FileNotFoundError:
            make = "make finetune" if kind == "finetuned" else "make hybrid"
            raise FileNotFoundError(f"system '{system}' needs a LoRA adapter in {root}; run `{make} DOCS="
                                    f"{self.docs}` first, or leave it out with --systems") from None


def questions(cfg: CompareConfig) -> tuple[list[dict], list[dict], str]:
    """(questions to answer, the whole golden file for calibration, a label saying where they came from)."""
    if cfg.golden:
        golden = load_golden(cfg.golden, cfg.docs)
        return [q for q in golden if q["split"] == cfg.split], golden, f"golden {cfg.split} split ({cfg.golden})"
    held = Path(cfg.finetuned).parent / "data" / HELDOUT
    if held.exists():
        qs = load_golden(held, cfg.docs)
        return qs, [], f"held-out synthetic questions, no golden file ({held})"
    raise FileNotFoundError(f"no questions for {cfg.docs}: add a golden.jsonl there, or run `make finetune "
                            f"DOCS={cfg.docs}` so its held-out synthetic questions can be used")


def score(q: dict, text: str, abstained: bool, cited: str | None, passages: list[str] | None) -> dict:
    """One system's answer to one question, scored like ``rag.evaluate`` does (same metrics for all systems)."""
    refs = [q["answer"], *q.get("aliases", [])] if q["answer"] is not None else []
    correct = bool(refs) and not abstained and bool(M.contains(text, refs))
    row = {"id": q["id"], "answer": text, "abstained": abstained, "answerable": bool(refs), "cited": cited,
           "contains": float(correct) if refs else None,
           "exact": M.exact_match(text, refs) if refs else None, "f1": M.token_f1(text, refs) if refs else None,
           "citation_ok": (cited in q["sources"]) if refs and not abstained else None,
           "hallucinated": float(not abstained and not correct), "format_ok": None}
    row["faithfulness"] = M.faithfulness(text, passages, tokenize) if passages and not abstained else None
    return row


def run_closed_book(cfg: CompareConfig, system: str, qs: list[dict]) -> list[dict]:
    gen = model_to_score(cfg.model, RagConfig.max_new_tokens, cfg.adapter(system))  # RAG's answer budget
    convs = [closed_book_messages(q["question"]) for q in qs]
    n = min(cfg.latency_sample, len(qs))
    gens = [gen.chat(c) for c in convs[:n]] + gen.chat_batch(convs[n:], batch_size=8, desc=system)
    rows = []
    for i, (q, g) in enumerate(zip(qs, gens, strict=True)):
        parsed = parse_answer(g.text)
        row = score(q, parsed[0] if parsed else g.text, is_abstention(g.text), parsed[1] if parsed else None, None)
        row["format_ok"] = bool(parsed) or g.text.strip() == IDK  # the trained closed-book format
        rows.append(row | {"raw": g.text, "prompt_tokens": g.prompt_tokens, "new_tokens": g.new_tokens,
                           "latency_s": {"generate": g.seconds} if i < n else None})
    return rows


def with_generator(base: RagPipeline, cfg: CompareConfig, system: str) -> RagPipeline:
    """``base``'s pipeline and index with the system's generator (its adapter, or the plain model)."""
    return RagPipeline(RagConfig(**{**asdict(base.cfg), "adapter": cfg.adapter(system) or ""}), index=base.index)


def run_retrieval(cfg: CompareConfig, system: str, base: RagPipeline, qs: list[dict], rankeds: list[Ranking]) -> tuple:
    """Rows for a retrieval system, and its pipeline (kept for the context probes)."""
    pipe = with_generator(base, cfg, system)
    n = min(cfg.latency_sample, len(qs))
    answers = [pipe.answer(q["question"], ranked=r) for q, r in zip(qs[:n], rankeds[:n], strict=True)]
    answers += pipe.answer_batch([q["question"] for q in qs[n:]], rankeds[n:], desc=system)
    rows = []
    for i, (q, a) in enumerate(zip(qs, answers, strict=True)):
        row = score(q, a.text, a.abstained, a.cited[0].doc_id if a.cited else None, [h.text for h in a.cited])
        row["format_ok"] = a.abstained or a.explicit_citation  # RAG's format: cite a source as [n], or abstain
        rows.append(row | {"prompt_tokens": a.prompt_tokens, "new_tokens": a.new_tokens,
                           "abstain_reason": a.reason, "latency_s": a.timings if i < n else None})
    return rows, pipe


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


def differences(per_system: dict[str, list[dict]], ref: str, n_boot: int, seed: int) -> dict:
    """Paired differences from ``ref`` (contains, hallucination rate) with 95% intervals; ``significant`` when
    the interval excludes zero."""
    out = {}
    for name, rows in per_system.items():
        if name == ref:
            continue
        d = {}
        for metric, key, only_answerable in (("contains", "contains", True),
                                             ("hallucination_rate", "hallucinated", False)):
            pairs = [(a[key], b[key]) for a, b in zip(rows, per_system[ref], strict=True)
                     if a["answerable"] or not only_answerable]
            mean, lo, hi = M.paired_bootstrap([p[0] for p in pairs], [p[1] for p in pairs], n_boot, seed)
            d[metric] = {"diff": round(mean, 4), "ci": [round(lo, 4), round(hi, 4)], "significant": lo > 0 or hi < 0}
        out[name] = d
    return out


def _size_mb(path: str | Path) -> float:
    p = Path(path)
    files = [p] if p.is_file() else list(p.rglob("*")) if p.exists() else []
    return round(sum(f.stat().st_size for f in files if f.is_file()) / 1e6, 1)


def setup_cost(cfg: CompareConfig, pipe: RagPipeline) -> dict:
    """What each approach costs before its first answer: a fresh index build vs data + training."""
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        update_index(cfg.docs, tmp, pipe.cfg.chunk_config(), pipe.cfg.embedder, pipe.cfg.faiss, progress=False)
        index_s = time.perf_counter() - t0
    out = {"index": {"build_s": round(index_s, 1), "size_mb": _size_mb(pipe.index.path)}}
    for kind, root in (("finetuned", cfg.finetuned), ("raft", cfg.raft)):
        m = Path(root) / "metrics.json"
        if m.exists():
            metrics = json.loads(m.read_text())
            data = Path(root).parent / "data" / ("build.json" if kind == "finetuned" else "raft_config.json")
            data_s = json.loads(data.read_text())["stats"].get("seconds") if data.exists() else None
            out[kind] = {"train_s": metrics.get("seconds"), "train_tokens": metrics.get("tokens_seen"),
                         "data_s": data_s, "adapter_mb": _size_mb(Path(root) / "adapter")}
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
    # transformers for every arm, so the adapters' arms and the plain ones differ only by the adapter
    base = RagPipeline(RagConfig(docs=cfg.docs, index_dir=cfg.index_dir, model=cfg.model, backend="transformers"))
    base.update_index(progress=progress)
    calibration = calibrate(base, golden, progress) if golden else None
    t0 = time.perf_counter()
    rankeds = [base.ranked(q["question"]) for q in qs] if set(systems) & set(RETRIEVAL) else []
    log.info("ranked %d questions in %.0f s", len(rankeds), time.perf_counter() - t0)
    per_system, pipes = {}, {}
    for s in systems:
        log.info("system %s", s)
        if s in CLOSED_BOOK:
            per_system[s] = run_closed_book(cfg, s, qs)
        else:
            per_system[s], pipes[s] = run_retrieval(cfg, s, base, qs, rankeds)
    ref = "rag" if "rag" in per_system else systems[0]
    result = {"settings": asdict(cfg) | {"questions": source, "n": len(qs),
                                         "n_answerable": sum(q["answer"] is not None for q in qs),
                                         "calibration": calibration, "faithfulness": "token overlap: a sentence "
                                         "counts as supported when >= 80% of its content words occur in the cited "
                                         "passages"},
              "systems": {s: summarise(rows, cfg.bootstrap, cfg.seed) for s, rows in per_system.items()},
              "differences_vs": ref, "differences": differences(per_system, ref, cfg.bootstrap, cfg.seed),
              "setup": setup_cost(cfg, base)}
    result["forgetting"] = forgetting(cfg, per_system)
    if cfg.seeds > 1:
        result["seeds"] = over_seeds(cfg, base, qs, rankeds, per_system)
    if cfg.probes > 0 and pipes:
        result["context_probes"] = context_probes(pipes, qs, rankeds, cfg.probes, cfg.seed)
    if with_freshness:
        from hybrid.freshness import freshness  # not at the top: it builds on this module's runners

        result["freshness"] = freshness(cfg, base, progress)
    result["per_question"] = {s: rows for s, rows in per_system.items()}
    return result


def over_seeds(cfg: CompareConfig, base: RagPipeline, qs: list[dict], rankeds: list[Ranking], first: dict) -> dict:
    """``--seeds N``: the adapter systems again with adapters trained on seeds 1..N-1 (``hybrid.seeds``), all
    questions batched; per system the spread of each metric over the N seeds (``first`` holds seed 0's rows)."""
    trained = [s for s in first if ADAPTER[s]]
    kinds = {ADAPTER[s] for s in trained}
    runs = {s: [first[s]] for s in trained}
    for seed in range(1, cfg.seeds):
        scfg = replace(cfg, latency_sample=0,
                       finetuned=str(seed_adapter(cfg.finetuned, seed)) if "finetuned" in kinds else cfg.finetuned,
                       raft=str(seed_adapter(cfg.raft, seed)) if "raft" in kinds else cfg.raft)
        for s in trained:
            log.info("system %s, training seed %d", s, seed)
            runs[s].append(run_closed_book(scfg, s, qs) if s in CLOSED_BOOK else
                           run_retrieval(scfg, s, base, qs, rankeds)[0])
    ref = first.get("rag")
    return {s: spread([summarise(rows, cfg.bootstrap, cfg.seed) for rows in rs],
                      [differences({s: rows, "rag": ref}, "rag", cfg.bootstrap, cfg.seed)[s] for rows in rs]
                      if ref else []) for s, rs in runs.items()}


def forgetting(cfg: CompareConfig, systems) -> dict:
    """General-probe accuracy change (tuned − base): the closed-book adapter's from ``make finetune``'s report,
    the RAFT adapter's measured here (``raft_probe_change``); 0 for the untouched base model by construction."""
    report = report_path(cfg.docs)
    out = {s: 0.0 for s in ("base", "rag") if s in systems}
    base_acc = None
    if report.exists():
        r = json.loads(report.read_text())
        if r.get("tuned", {}).get("probes"):
            base_acc = r["base"]["probes"]["accuracy"]
            drop = round(r["tuned"]["probes"]["accuracy"] - base_acc, 4)
            out |= {s: drop for s in ("finetuned", "finetuned+rag") if s in systems}
    if "hybrid" in systems:
        out["hybrid"] = raft_probe_change(cfg, base_acc)
    return out


def raft_probe_change(cfg: CompareConfig, base_acc: float | None) -> float | None:
    """The RAFT adapter's general-probe accuracy minus the base model's (the same probes ``finetune eval`` asks),
    cached in ``<raft>/probes.json`` for as long as the adapter's metrics.json is unchanged."""
    from finetune.evaluate import EvalConfig, evaluate_model

    root = Path(cfg.raft)
    if not (root / "metrics.json").exists() or not Path(EvalConfig.probes).exists():
        return None
    stamp, cache = (root / "metrics.json").read_text(), root / "probes.json"
    cached = json.loads(cache.read_text()) if cache.exists() else {}
    if cached.get("stamp") == stamp:
        return cached["change"]
    ecfg = EvalConfig(docs=cfg.docs, model=cfg.model, general_text="")

    def accuracy(adapter: str | None) -> float:
        gen = model_to_score(cfg.model, ecfg.max_new_tokens, adapter)
        return evaluate_model(gen, ecfg, {}, progress=False)["probes"]["accuracy"]

    base = accuracy(None) if base_acc is None else base_acc
    tuned = accuracy(str(adapter_dir(root)))
    change = round(tuned - base, 4)
    cache.write_text(json.dumps({"stamp": stamp, "base": base, "tuned": tuned, "change": change}))
    return change
