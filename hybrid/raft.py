"""RAFT-style training rows: a question, its oracle chunk among retrieved distractors, and a cited answer.

RAFT (Zhang et al. 2024, "RAFT: Adapting Language Model to Domain Specific RAG") fine-tunes the generator on
the prompts it will see at answer time: the question plus k passages, one of which (the *oracle*) holds the
answer and the rest are *distractors*. Here the distractors are the passages openbook's own hybrid retriever
ranks highest for the question that do not contain the answer (hard negatives, not random chunks), and the
prompt is exactly ``rag.generate.Generator.prompt`` — the same system text, worked example and numbered
sources as RAG — so the adapter is trained on the inference-time format.

Questions come from ``finetune.data.build`` (the golden ``train`` split, synthetic QA for folders without one,
their paraphrases and refusals; never the ``test`` split) — re-used from ``make finetune``'s saved rows when they
were built for the same folder, model and seed, so both adapters learn the same questions. Targets:

- oracle present: the base reader's own answer to that very prompt when it states the expected value and cites
  the oracle first (``targets="self"``, the default since 2026-12-07: 38 of the demo's 81 rows), else
  ``<answer> [n]`` then ``Quote: "<the oracle sentence holding the answer>"`` (every row with ``"quote"``). A
  target in the model's own words moves it less (self-distillation: Yang et al. 2024, "Self-Distillation
  Bridges Distribution Gap in Language Model Fine-Tuning"); here it kept more of the base reader's reading of
  tables and changed passages. Asking the reader costs ~7 s a row on 2 cores (10 min for the demo);
- oracle removed (a share ``p_no_oracle`` of answerable rows, chosen by a seeded coin; 0 by default since
  2026-12-07, 0.2 before): the answer without a
  citation (``no_oracle="memorised"``, as the paper trains it, so the model also learns the facts), or "I don't
  know." (``"idk"``). Abstaining looks safer, but with it 37 of the demo's 103 rows ended in "I don't know." and
  the 1.5B learned to refuse nearly every question; the pipeline's gate decides when to abstain;
- oracle edited (a share ``p_counterfactual`` of the rows that keep it, off by default): the answer value in the
  oracle replaced as the context probes replace it (numbers shifted, else another training answer), target the
  edited value, cited and quoted, so the model learns that the passage wins over what its weights remember;
- golden unanswerable questions (``--refusals``, off by default since 2026-12-06): retrieved passages only, target
  "I don't know.". With them the 1.5B refused 20 answerable demo test questions past the gate (*contains* 0.342,
  hallucination 0.13, the new value after edits for 4 of 16 changed facts); without them, over two training seeds,
  it refused none itself, as RAG does, the gate deciding: *contains* 0.507 both times against RAG's 0.493,
  hallucination 0.31 against 0.32, freshness 7 and 10 of 16 (README, Hybrid section).
"""

from __future__ import annotations

import json
import logging
import random
import re
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from finetune.data import DataConfig, build, cut_paraphrases
from hybrid.probes import counterfactual
from rag.atomic import replace_dir
from rag.config import artefacts, option, option_of
from rag.evaluate import golden_for, load_golden
from rag.generate import ANSWER_STOP, IDK, citations, is_abstention
from rag.metrics import SENTENCE_BREAK, contains, said
from rag.models import DEFAULT_READER
from rag.pipeline import RagConfig, RagPipeline
from rag.ranking import sources
from rag.store import check_store

log = logging.getLogger(__name__)
NO_ORACLE = ("idk", "memorised")
TARGETS = ("quote", "self")
# the hybrid's answer budget: a RAFT answer is "<answer> [n]" then a quote of up to 30 words, and with RAG's 48
# tokens 12 of 93 demo test answers ended mid-quote; the longest of the 81 demo training targets is 68 tokens
ANSWER_TOKENS = 80
# LoRA settings RAFT trains with: r=16 on every linear layer as closed-book fine-tuning, at a lower learning rate
# (the prompts already hold the answer; one epoch is 24 steps of ~600-token rows on the demo, ~1 min each for the
# 1.5B on 2 cores, so no minimum step count). With r=8 on the attention projections at 2e-4 and "I don't know."
# targets for dropped oracles, the 1.5B learned mostly to refuse (README, hybrid).
# No gradient checkpointing: it cost 26% more time a step on the AMX VM, 1.4-1.8x on an AMD EPYC (first 3 steps of
# RAFT-like rows: 161/164/145 s with it, 117/89/90 s without). It was on because a run without it, with logits at
# every prompt position and no heap trim, grew past 24 GiB and was OOM-killed at step 20; with logits on the answer
# alone and the heap trimmed after each step (finetune/train.py) `make hybrid` trained all 23 steps at 77 s a step
# and peaked at 17.1 GB (AMD EPYC, 2 cores, 2026-12-05). Which of the two changes it needed was not measured.
# Every block (lora_layers=0): closed-book training's default adapts the 1.5B's top half, untried for RAFT.
RAFT_LORA = dict(lora_r=16, lora_alpha=32, target_modules="all-linear", lora_layers=0, learning_rate=5e-4,
                 min_steps=0, gradient_checkpointing=False)


@dataclass
class RaftConfig:
    """How RAFT rows are built; every field is a ``python -m hybrid data`` flag."""

    docs: str = option("data/demo", "documents folder (the one RAG indexes)")
    golden: str = option("", "golden JSONL (default <docs>/golden.jsonl; only its train split is used)")
    out: str = option("", "dataset folder (default .openbook/hybrid/<folder>/data)")
    index_dir: str = option("", "the RAG index distractors are retrieved from (default .openbook/index/<folder>)")
    store: str = option_of(RagConfig, "store")
    store_url: str = option_of(RagConfig, "store_url")
    model: str = option(DEFAULT_READER, "LM that writes paraphrases and synthetic questions (finetune data)")
    k: int = option(3, "passages per prompt, oracle included (RAG's --k)")
    # 0.2 (the RAFT paper's memorised rows) until 2026-12-07; see ``targets``
    p_no_oracle: float = option(0.0, "share of answerable rows whose oracle is replaced by another distractor")
    no_oracle: str = option("memorised", "target when the oracle is removed: 'memorised' (the answer, uncited, as "
                            "in the RAFT paper) or 'idk'")
    p_counterfactual: float = option(0.0, "share of answerable rows whose oracle keeps its place but states another "
                                     "value (the target follows the passage, not the weights)")
    # 'self' since 2026-12-07: with every row's oracle shown, the demo's hybrid went from contains 0.562 (quote) to
    # 0.603 and 0.575 over two training seeds (RAG 0.575), and from 9 to 10 of 16 changed facts in both (RAG 11;
    # the quote targets 6-10 in five runs of four adapters; README, hybrid)
    targets: str = option("self", "targets of the rows that show their oracle: 'quote' (<answer> [n] and the "
                          "supporting sentence) or 'self' (the base reader's own answer to the same prompt where it "
                          "states the answer and cites the oracle, else the quote target)")
    refusals: bool = option(False, "also train the golden unanswerable train questions to answer 'I don't know.' "
                            "from their retrieved passages (off: the gate alone refuses, as for RAG)")
    paraphrases: int = option(0, "extra wordings per training question (finetune data --paraphrases)")
    synthetic_chunks: int = option(-1, "finetune data --synthetic-chunks (-1: 40 with a golden file, 160 without)")
    seed: int = option(0, "seeds the oracle position, the no-oracle coin and finetune data")

    def __post_init__(self):
        if self.k < 2:
            raise ValueError("--k must be at least 2 (the oracle and one distractor)")
        if not 0 <= self.p_no_oracle < 1:
            raise ValueError("--p-no-oracle must be in [0, 1)")
        if not 0 <= self.p_counterfactual <= 1 - self.p_no_oracle:
            raise ValueError("--p-counterfactual must be in [0, 1 - --p-no-oracle]: it edits rows that keep their "
                             "oracle")
        if self.targets not in TARGETS:
            raise ValueError(f"--targets must be one of {', '.join(TARGETS)}, not '{self.targets}'")
        if self.no_oracle not in NO_ORACLE:
            raise ValueError(f"--no-oracle must be one of {', '.join(NO_ORACLE)}, not '{self.no_oracle}'")
        check_store(self.store, self.store_url)
        if not self.out:
            self.out = str(artefacts("hybrid", self.docs) / "data")


def quote(text: str, answers: list[str], max_words: int = 30) -> str | None:
    """The first sentence of ``text`` that contains one of ``answers`` (whole words), cut to ``max_words``.

    >>> quote("Returns are free. Labels cost EUR 5.95 each. Ask us.", ["EUR 5.95"])
    'Labels cost EUR 5.95 each.'
    """
    for sent in SENTENCE_BREAK.split(text):
        if contains(sent, answers):
            words = sent.strip().lstrip("#|-* ").split()
            return " ".join(words[:max_words]) + (" …" if len(words) > max_words else "")
    return None


def target(answer: str, n: int, supporting: str | None) -> str:
    """``'45 days [2]\\nQuote: "Returns are accepted for 45 days."'``; no quote line when none was found."""
    return f"{answer} [{n}]" + (f'\nQuote: "{supporting}"' if supporting else "")


def edit(text: str, answers: list[str], fake: str) -> str | None:
    """``text`` with each whole-word mention of ``answers[0]`` replaced by ``fake``; None when a mention of any of
    ``answers`` is left (an alias the edit would not reach) or none was replaced.

    >>> edit("Returns within 45 days; 145 days for members.", ["45 days"], "52 days")
    'Returns within 52 days; 145 days for members.'
    """
    edited, n = re.subn(rf"(?<!\w){re.escape(answers[0])}(?!\w)", lambda _: fake, text, flags=re.I)
    return edited if n and not contains(edited, answers) else None


def raft_row(pipe: RagPipeline, row: dict, aliases: list[str], k: int, drop_oracle: bool, no_oracle: str,
             rng: random.Random, fake: str | None = None) -> dict | None:
    """One RAFT example for a ``finetune.data`` row, or None when no passage of its source holds the answer;
    ``fake``: a value to put in the oracle in place of the answer (a counterfactual row; skipped if it can't be)."""
    hits, _, _ = pipe.ranked(row["question"], mode="hybrid", k=4 * k)
    answers = [row["answer"], *aliases] if row["answer"] is not None else []

    def holds(h) -> bool:
        return bool(contains(h.text, answers))

    shown = None  # the counterfactual value the oracle states, when it was edited
    if row["answer"] is None:  # unanswerable: what retrieval finds is all there is
        passages, text, oracle = hits[:k], IDK, None
    else:
        oracle = next((h for h in hits if h.doc_id == row["source"] and holds(h)), None)
        docs = pipe.index.manifest["documents"]
        if oracle is None and row["source"] in docs:  # the retriever missed it: the source's chunk holding it
            oracle = next((_as_hit(pipe, c) for cid in docs[row["source"]]["chunks"]
                           if (c := pipe.index.chunks[cid]).indexed and holds(c)), None)
        if oracle is None:
            return None
        distractors = [h for h in hits if not holds(h) and h.text != oracle.text]
        if len(distractors) < k - 1 + drop_oracle:
            return None
        if drop_oracle:
            passages = distractors[:k]
            text = IDK if no_oracle == "idk" else row["answer"]
        else:
            said, edited = row["answer"], fake and edit(oracle.text, answers, fake)
            if edited:
                oracle, said, answers, shown = replace(oracle, text=edited), fake, [fake], fake
            passages = distractors[: k - 1]
            passages.insert(rng.randrange(k), oracle)  # the oracle's position is random, never always [1]
            text = target(said, passages.index(oracle) + 1, quote(oracle.text, answers))
    messages = pipe.generator.prompt(row["question"], sources(passages))
    return {"messages": [*messages, {"role": "assistant", "content": text}], "question": row["question"],
            "answer": row["answer"], "source": row["source"], "fact": row["fact"], "kind": row["kind"],
            "oracle": oracle is not None and oracle in passages, "target": text,
            "counterfactual": shown, "cite": passages.index(oracle) + 1 if oracle in passages else 0}


def own_targets(pipe: RagPipeline, rows: list[dict], aliases: dict, k: int, progress: bool) -> int:
    """``--targets self``: each row that shows its oracle gets, as its target, the base reader's own answer to
    that prompt where the answer states the expected value (the edited one in a counterfactual row) and cites
    the oracle first; the other rows keep the quote target (why: the module's docstring). Returns how many rows
    took the reader's answer."""
    todo = [r for r in rows if r["oracle"]]
    gens = pipe.generator.chat_batch([r["messages"][:-1] for r in todo], stop=ANSWER_STOP,
                                     desc="reader's own targets" if progress else "")
    took = 0
    for r, g in zip(todo, gens, strict=True):
        reply = g.text.strip()
        want = [r["counterfactual"]] if r["counterfactual"] else [r["answer"], *aliases.get(r["fact"], [])]
        if (not is_abstention(reply) and contains(said(reply), want)
                and citations(reply, k)[:1] == [r["cite"]]):
            r["messages"][-1] = {"role": "assistant", "content": reply}
            r["target"], took = reply, took + 1
    log.info("--targets self: %d of %d rows with their oracle take the reader's own answer", took, len(todo))
    return took


def _as_hit(pipe: RagPipeline, chunk):
    from rag.ranking import Hit

    shown = pipe.index.chunks[chunk.parent_id] if chunk.parent_id else chunk
    return Hit(chunk.id, chunk.doc_id, chunk.section, shown.text, 0.0)


def finetune_questions(dcfg: DataConfig) -> tuple[list[dict], dict] | None:
    """The questions ``make finetune`` already wrote for this folder, model and seed, cut to ``dcfg.paraphrases``
    wordings per fact, with stats; None when there are none to re-use (RAFT then builds its own).

    Re-using them costs nothing (no LM calls) and means the closed-book and the RAFT adapter learn from the same
    questions, so their comparison differs in the prompt format, not in the training questions."""
    from datasets import load_from_disk

    src = artefacts("finetune", dcfg.docs) / "data"
    try:
        built = json.loads((src / "build.json").read_text())["config"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return None
    same = {k: built.get(k) == getattr(dcfg, k) for k in ("model", "golden", "synthetic_chunks", "test_fraction",
                                                          "seed", "index_dir")}
    same["docs"] = Path(built.get("docs", "")).resolve() == Path(dcfg.docs).resolve()
    if not all(same.values()) or built.get("paraphrases", 0) < dcfg.paraphrases:
        log.info("not re-using %s (built with other settings: %s)", src, [k for k, v in same.items() if not v])
        return None
    # general replay rows (finetune --general-rows) ask nothing about the documents: no passage can hold them
    rows = [r for r in cut_paraphrases(load_from_disk(str(src)).to_list(), dcfg.paraphrases) if r["kind"] != "general"]
    log.info("re-using %d questions from %s (built with %s re-wordings each; %d wordings per fact kept)",
             len(rows), src, built.get("paraphrases"), dcfg.paraphrases + 1)
    return rows, {"reused": str(src), "rows": len(rows)}


def build_raft(cfg: RaftConfig, progress: bool = True):
    """Build and save the RAFT rows (a ``Dataset``); returns ``(dataset, stats)``."""
    from datasets import Dataset
    from tqdm import tqdm

    t0 = time.perf_counter()
    pipe = RagPipeline(RagConfig(docs=cfg.docs, index_dir=cfg.index_dir, model=cfg.model, k=cfg.k, store=cfg.store,
                                 store_url=cfg.store_url))
    pipe.update_index(progress=progress)
    dcfg = DataConfig(docs=cfg.docs, golden=cfg.golden, out=str(Path(cfg.out).parent / "qa"),
                      index_dir=cfg.index_dir, store=cfg.store, store_url=cfg.store_url, model=cfg.model,
                      paraphrases=cfg.paraphrases, synthetic_chunks=cfg.synthetic_chunks, seed=cfg.seed, general_rows=0)
    reused = finetune_questions(dcfg)
    if reused:
        qa, qa_stats = reused
    else:
        qa, _, qa_stats = build(dcfg, progress, pipe)
    golden = golden_for(cfg.docs, cfg.golden)
    aliases = {q["id"]: q.get("aliases", []) for q in load_golden(golden, cfg.docs)} if golden else {}
    rng = random.Random(cfg.seed)
    qa = [r for r in qa if r["kind"] != "raw" and (cfg.refusals or r["answer"] is not None)]
    answerable = [i for i, r in enumerate(qa) if r["answer"] is not None]
    drop = set(rng.sample(answerable, round(cfg.p_no_oracle * len(answerable))))  # exactly P, not a coin per row
    # a generator of its own, so the other rows (oracle positions included) are the same with or without edits
    cf_rng = random.Random(f"counterfactual-{cfg.seed}")
    kept = [i for i in answerable if i not in drop]
    others = [r["answer"] for r in qa if r["answer"]]
    fakes = {i: counterfactual(qa[i]["answer"], others, cf_rng)
             for i in cf_rng.sample(kept, min(len(kept), round(cfg.p_counterfactual * len(answerable))))}
    rows, skipped = [], 0
    for i, r in enumerate(tqdm(qa, desc="RAFT rows", unit="row", disable=not progress)):
        row = raft_row(pipe, r, aliases.get(r["fact"], []), cfg.k, i in drop, cfg.no_oracle, rng, fakes.get(i))
        skipped += row is None
        rows += [row] if row else []
    if not rows:
        raise ValueError(f"no RAFT rows from {cfg.docs}: no training question had a passage holding its answer")
    own = own_targets(pipe, rows, aliases, cfg.k, progress) if cfg.targets == "self" else 0
    stats = {"self_targets": own, "rows": len(rows), "with_oracle": sum(r["oracle"] for r in rows),
             "no_oracle": sum(not r["oracle"] and r["answer"] is not None for r in rows),
             "counterfactual": sum(r["counterfactual"] is not None for r in rows),
             "unanswerable": sum(r["answer"] is None for r in rows), "skipped": skipped, "qa": qa_stats,
             "seconds": round(time.perf_counter() - t0, 1)}
    ds = Dataset.from_list(rows)
    tmp = Path(cfg.out + ".tmp")
    ds.save_to_disk(str(tmp))
    (tmp / "raft_config.json").write_text(json.dumps({**asdict(cfg), "stats": stats}, indent=1))
    replace_dir(tmp, Path(cfg.out))
    log.info("RAFT rows %s saved to %s", stats, cfg.out)
    return ds, stats
