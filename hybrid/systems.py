"""The five systems the comparison runs, and how each answers and is scored: base and fine-tuned closed-book,
RAG, fine-tuned + RAG, hybrid (RAFT adapter inside RAG).

Shared by the comparison (``hybrid/compare.py``), the freshness demo (``hybrid/freshness.py``) and the web page
(``hybrid/demo.py``): the system names, which adapter each runs with, ``CompareConfig``, and the runners that turn a
question list into scored rows. Aggregation, intervals and the report are the comparison's.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from finetune.data import HELDOUT, closed_book_messages, parse_answer
from finetune.evaluate import model_to_score
from finetune.lora import adapter_dir
from hybrid.raft import ANSWER_TOKENS
from rag import metrics as M
from rag.bm25 import tokenize
from rag.config import folder_name, option, option_of, run_dir
from rag.evaluate import golden_for, load_golden
from rag.generate import IDK, is_abstention
from rag.models import DEFAULT_READER
from rag.pipeline import RagConfig, RagPipeline
from rag.ranking import Ranking
from rag.runtime import BACKENDS
from rag.store import check_store

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
    store: str = option_of(RagConfig, "store")
    store_url: str = option_of(RagConfig, "store_url")
    model: str = option(DEFAULT_READER, "base generator (the adapters must have been trained on it)")
    backend: str = option("auto", "generation runtime for every arm: 'auto' (llama.cpp for GGUF models on a CPU, "
                          "adapters as GGUF LoRAs; else transformers), 'llamacpp' or 'transformers'")
    finetuned: str = option("", "closed-book LoRA from `make finetune` (default .openbook/finetune/<folder>/<model>)")
    raft: str = option("", "RAFT LoRA from `make hybrid` (default .openbook/hybrid/<folder>/<model>)")
    systems: str = option(",".join(SYSTEMS), "comma-separated systems to run")
    latency_sample: int = option(12, "questions answered one at a time for latency (the rest in batches)")
    probes: int = option(12, "questions re-asked with no, unrelated and counterfactual context, per retrieval "
                         "system (0: no probes; a seeded sample of those whose passages hold the answer)")
    bootstrap: int = option(2000, "bootstrap resamples for the 95% intervals")
    price_per_mtok: float = option(0.50, "USD per million tokens processed, for per-query cost and break-even")
    seed: int = option(0, "seeds the bootstrap and the probes")
    seeds: int = option(1, "training seeds for the adapter systems: 1 = the adapters as trained; N > 1 also "
                        "trains N-1 more per adapter on the same data (minutes each) and reports the spread")
    out: str = option("", "report folder (default .openbook/reports/compare-<folder>, -<model> added for a "
                     "model other than the default)")
    resume: bool = option(True, "re-use a system's answers saved in <out>/answers by an earlier run when nothing "
                          "they depend on changed (questions, settings, index, adapter, code); --no-resume asks "
                          "every question again")

    def __post_init__(self):
        if self.seeds < 1:
            raise ValueError(f"--seeds must be at least 1, not {self.seeds}")
        if self.backend not in BACKENDS:
            raise ValueError(f"--backend must be one of {', '.join(BACKENDS)}, not '{self.backend}'")
        check_store(self.store, self.store_url)
        unknown = set(self.system_list) - set(SYSTEMS)
        if unknown:
            raise ValueError(f"--systems: unknown {', '.join(sorted(unknown))}; choose from {', '.join(SYSTEMS)}")
        self.finetuned = self.finetuned or str(run_dir("finetune", self.docs, self.model))
        self.raft = self.raft or str(run_dir("hybrid", self.docs, self.model))
        # one report per base model, so comparing on another model does not overwrite the default model's report
        suffix = "" if self.model == DEFAULT_READER else f"-{Path(self.model).name}"
        self.out = self.out or str(Path(".openbook") / "reports" / f"compare-{folder_name(self.docs)}{suffix}")
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
    grade = M.graded(text, refs, abstained)  # the RAFT hybrid's quote is evidence, not its answer
    row = {"id": q["id"], "answer": text, "abstained": abstained, "answerable": bool(refs), "cited": cited, **grade,
           "citation_ok": (cited in q["sources"]) if refs and not abstained else None,
           "hallucinated": float(not abstained and not grade["contains"]), "format_ok": None}
    row["faithfulness"] = M.faithfulness(text, passages, tokenize) if passages and not abstained else None
    return row


def run_closed_book(cfg: CompareConfig, system: str, qs: list[dict]) -> list[dict]:
    # RAG's answer budget and runtime, so closed-book and retrieval arms differ only by their prompts
    gen = model_to_score(cfg.model, RagConfig.max_new_tokens, cfg.adapter(system), backend=cfg.backend)
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
    """``base``'s pipeline and index with the system's generator (its adapter, or the plain model); the base
    model judges for every system, so all are gated alike (``RagPipeline.judge_generator``)."""
    adapter = cfg.adapter(system)
    if not adapter:
        return base  # the plain model: base's own pipeline, so one instance of it serves RAG and every judgement
    budget = max(base.cfg.max_new_tokens, ANSWER_TOKENS) if system == "hybrid" else base.cfg.max_new_tokens
    return RagPipeline(RagConfig(**{**asdict(base.cfg), "adapter": adapter, "max_new_tokens": budget}),
                       index=base.index, judge_by=base)


def run_retrieval(cfg: CompareConfig, system: str, pipe: RagPipeline, qs: list[dict],
                  rankeds: list[Ranking]) -> list[dict]:
    """Rows for a retrieval system answering through its pipeline ``pipe`` (``with_generator``)."""
    n = min(cfg.latency_sample, len(qs))
    answers = [pipe.answer(q["question"], ranked=r) for q, r in zip(qs[:n], rankeds[:n], strict=True)]
    answers += pipe.answer_batch([q["question"] for q in qs[n:]], rankeds[n:], desc=system)
    rows = []
    for i, (q, a) in enumerate(zip(qs, answers, strict=True)):
        row = score(q, a.text, a.abstained, a.cited[0].doc_id if a.cited else None, [h.text for h in a.cited])
        row["format_ok"] = a.abstained or a.explicit_citation  # RAG's format: cite a source as [n], or abstain
        rows.append(row | {"prompt_tokens": a.prompt_tokens, "new_tokens": a.new_tokens,
                           "abstain_reason": a.reason, "signals": a.signals,
                           "latency_s": a.timings if i < n else None})
    return rows


def judged(rankeds: list[Ranking], rows: list[dict]) -> list[Ranking]:
    """``rankeds`` with the judgements a retrieval system's ``rows`` asked for: the base model's, the same for
    every system, so the next system is gated without asking again (~4 s a question for the 1.5B)."""
    return [Ranking(r.hits, r.timings, r.signals | {"judge": row["signals"]["judge"]})
            if "judge" in row["signals"] else r for r, row in zip(rankeds, rows, strict=True)]
