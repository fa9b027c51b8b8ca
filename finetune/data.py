"""Fine-tuning data from the corpus RAG uses: golden train QA, synthetic QA from chunks, paraphrases, refusals.

What the model learns to say is one format for every target (``format_answer``): a short answer line, then
``Source: <document path>``, or exactly "I don't know." for a question the documents do not answer. Sources:

- the golden file's ``train`` split when one exists (never ``test``: that is what evaluation asks);
- synthetic QA for any folder: the generator LM writes a question and answer per chunk, and a pair is kept
  only if it round-trips (hybrid retrieval finds the source chunk in its top 5, and the answer's content words
  occur in the chunk). Chunks are split into train/test *before* any question is written, so no held-out
  fact was ever in a training target (Ovadia et al. 2024 and Allen-Zhu & Li 2023 found facts stick only when
  seen in many phrasings, hence ``paraphrases``: each kept question is re-worded N times by the same LM, and a
  re-wording is kept only if it still retrieves its source);
- refusals: the golden train split's unanswerable questions (and their paraphrases) answered "I don't know.";
- optionally raw chunk text as continued pre-training rows (``raw_text``);
- optionally general prompts answered by the base model itself (``general_rows``, a self-distillation replay
  against forgetting: Yang et al. 2024, "Self-Distillation Bridges Distribution Gap in Language Model
  Fine-Tuning"): rows that ask nothing about the documents and whose targets are what the untuned model
  already says, so training on them pulls general behaviour back towards the base model, and teaches that the
  closed-book answer format belongs to the closed-book system prompt only. The prompts
  (``data/probes/replay.txt``) are not the general-skill probes evaluation asks.

The LM writes its text (questions, re-wordings, replay replies) in finetune/synthetic.py; this module decides
what is kept, splits it and saves it. Left out on purpose: a bigger teacher model (none installs offline) and LLM
judges.
"""

from __future__ import annotations

import hashlib
import logging
import random
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from finetune.synthetic import general_replay, reword, write_qa
from rag.atomic import replace_dir
from rag.bm25 import tokenize
from rag.config import artefacts, load_jsonl, option, option_of
from rag.evaluate import golden_for, load_golden
from rag.generate import IDK
from rag.models import DEFAULT_READER
from rag.pipeline import RagConfig, RagPipeline
from rag.store import check_store

log = logging.getLogger(__name__)

# Short on purpose: every training row repeats it, and at 47 tokens it was half of an average row's tokens (the
# training time); the tuned model learns the format from the targets, the untuned one followed neither wording.
CLOSED_BOOK_SYSTEM = ("Answer from memory: the short answer, then 'Source: <document path>' on the next line; or "
                      "exactly: " + IDK)
HELDOUT = "heldout.jsonl"  # held-out synthetic questions in the golden format, beside the training rows
_FORMAT = re.compile(r"^\s*(?P<answer>[^\n]*\S)[ \t]*\n+Source: *(?P<source>\S[^\n]*?)\s*$")


def format_answer(answer: str | None, source: str | None) -> str:
    """The one target format. ``format_answer("45 days", "returns.md")`` → ``"45 days\\nSource: returns.md"``."""
    return IDK if answer is None else f"{answer.strip()}\nSource: {source}"


def parse_answer(text: str) -> tuple[str, str] | None:
    """``(answer, source)`` when ``text`` follows the trained format exactly, else None.

    >>> parse_answer("45 days\\nSource: returns.md"), parse_answer("It is 45 days.")
    (('45 days', 'returns.md'), None)
    """
    m = _FORMAT.match(text)
    return (m["answer"].strip(), m["source"]) if m else None


def closed_book_messages(question: str, answer: str | None = None) -> list[dict]:
    """Chat messages for a closed-book question; with ``answer`` the assistant target is appended."""
    msgs = [{"role": "system", "content": CLOSED_BOOK_SYSTEM}, {"role": "user", "content": question.strip()}]
    return msgs + ([{"role": "assistant", "content": answer}] if answer is not None else [])


@dataclass
class DataConfig:
    """How the training set is built; every field is a ``python -m finetune data`` flag."""

    docs: str = option("data/demo", "documents folder (the same one RAG indexes)")
    golden: str = option("", "golden JSONL (default <docs>/golden.jsonl when present; only its train split is used)")
    out: str = option("", "dataset folder (default .openbook/finetune/<folder>/data)")
    index_dir: str = option("", "the RAG index used for round trips (default .openbook/index/<folder>)")
    store: str = option_of(RagConfig, "store")
    store_url: str = option_of(RagConfig, "store_url")
    model: str = option(DEFAULT_READER, "LM that writes synthetic questions and paraphrases")
    synthetic_chunks: int = option(-1, "chunks to write synthetic QA from, train and test parts together (0: none; "
                                   "-1: 40 beside a golden train split, 160 without one)")
    test_fraction: float = option(0.25, "share of synthetic chunks held out for testing (split before writing)")
    # at equal steps, one wording repeated memorised best and generalised as well as 2, 4 or 8 (README, the sweep)
    paraphrases: int = option(0, "extra wordings per training question (0: the original question only)")
    raw_text: bool = option(False, "add each train chunk's text as a continued pre-training row")
    # 64 lifted SmolLM2-135M's general probes after tuning from 0.07 to 0.22 (base 0.33) and the 1.5B's from 0.54
    # to 0.63 (base 0.81) at no closed-book cost, but the 1.5B's training took 28 min instead of 17: off by default
    general_rows: int = option(0, "general prompts from --general-prompts, answered by the base model itself, "
                               "mixed into training against forgetting (0: none)")
    general_prompts: str = option("data/probes/replay.txt", "one general prompt per line, for --general-rows")
    seed: int = option(0, "seeds chunk sampling, the split and paraphrase sampling")

    def __post_init__(self):
        if self.synthetic_chunks < -1 or self.paraphrases < 0 or self.general_rows < 0:
            raise ValueError("--synthetic-chunks must be -1 (auto) or more, --paraphrases and --general-rows 0 or "
                             "more")
        if not 0 < self.test_fraction < 1:
            raise ValueError("--test-fraction must be between 0 and 1")
        check_store(self.store, self.store_url)
        self.golden = golden_for(self.docs, self.golden)
        if self.synthetic_chunks == -1:
            # without a golden file synthetic pairs are all there is; about a third survive the round trip
            self.synthetic_chunks = 40 if self.golden else 160
        if not self.out:
            self.out = str(artefacts("finetune", self.docs) / "data")


def held_out(chunk_id: str, fraction: float, seed: int) -> bool:
    """A stable coin flip per chunk id, so the split never depends on which chunks were sampled."""
    h = hashlib.sha256(f"{seed}:{chunk_id}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64 < fraction


def content_words(text: str) -> set[str]:
    """Stemmed, stop-word-free tokens (BM25's tokenizer), for "the answer's words occur in the chunk"."""
    return set(tokenize(text))


def cut_paraphrases(rows: list[dict], n: int) -> list[dict]:
    """Each fact's original question(s) plus its first ``n`` re-wordings, from ``build``'s rows in their order;
    cutting one build gives nested sets (n=2 ⊂ n=4), so a sweep compares counts, not different wordings.

    >>> rows = [{"fact": "f", "original": i == 0, "q": i} for i in range(4)]
    >>> [r["q"] for r in cut_paraphrases(rows, 1)]
    [0, 1]
    """
    seen: dict[str, int] = {}
    out = []
    for r in rows:
        if not r["original"]:
            seen[r["fact"]] = seen.get(r["fact"], 0) + 1
            if seen[r["fact"]] > n:
                continue
        out.append(r)
    return out


def finds(pipe: RagPipeline, question: str, doc_id: str, chunk_id: str | None = None) -> bool:
    """Round trip: the question retrieves its source chunk (or any chunk of its document) in the hybrid top 5."""
    hits, _, _ = pipe.ranked(question, mode="hybrid", k=5)
    return any(h.chunk_id == chunk_id if chunk_id else h.doc_id == doc_id for h in hits)


def build(cfg: DataConfig, progress: bool = True, pipe: RagPipeline | None = None):
    """Build and save the training rows (a ``Dataset``) and the held-out synthetic questions (golden format).

    Saved as one folder: the ``datasets`` files of the training rows plus ``heldout.jsonl``, which any golden
    reader (``python -m rag eval --golden``) accepts. ``pipe``: an up-to-date pipeline over ``cfg.docs`` to
    re-use (its index and generator), else one is built. Returns ``(train, heldout, stats)``.
    """
    import json

    from datasets import Dataset

    t0 = time.perf_counter()
    if cfg.general_rows and not Path(cfg.general_prompts).is_file():  # checked here, not in the config: the
        # default is relative to the repository, and a config that builds nothing should not depend on the cwd
        raise ValueError(f"--general-prompts {cfg.general_prompts}: no such file (one prompt per line; "
                         "--general-rows 0 trains without general replay)")
    rng = random.Random(cfg.seed)
    if pipe is None:
        pipe = RagPipeline(RagConfig(docs=cfg.docs, index_dir=cfg.index_dir, model=cfg.model, store=cfg.store,
                                     store_url=cfg.store_url))  # llama.cpp if it can
        pipe.update_index(progress=progress)
    gen = pipe.generator
    train, test = [], []
    stats = dict.fromkeys(("golden", "refusal", "synthetic_written", "synthetic_kept", "paraphrases",
                           "paraphrases_dropped"), 0)

    def add(items: list[dict], kind: str) -> None:
        """Training rows for golden-format items, each with its kept re-wordings."""
        log.info("re-wording %d %s questions x %d", len(items), kind, cfg.paraphrases)
        alts = reword(gen, [q["question"] for q in items], cfg.paraphrases, cfg.seed)
        for q, alt in zip(items, alts, strict=True):
            src = q["sources"][0] if q["sources"] else None
            # a re-wording that no longer finds its document has probably changed its meaning
            kept = [a for a in alt if src is None or finds(pipe, a, src)]
            stats["paraphrases"] += len(kept)
            stats["paraphrases_dropped"] += len(alt) - len(kept)
            target, row_kind = format_answer(q["answer"], src), kind if q["answer"] is not None else "refusal"
            train.extend({"messages": closed_book_messages(w, target), "kind": row_kind,
                          "fact": q["id"], "question": w, "answer": q["answer"], "source": src,
                          "original": i == 0} for i, w in enumerate([q["question"], *kept]))

    golden = [q for q in load_golden(cfg.golden, cfg.docs) if q["split"] == "train"] if cfg.golden else []
    stats["golden"] = sum(q["answer"] is not None for q in golden)
    stats["refusal"] = len(golden) - stats["golden"]
    add(golden, "golden")

    chunks = [c for c in pipe.index.chunks.values() if c.indexed and len(c.text.split()) >= 8]
    picked = rng.sample(chunks, min(cfg.synthetic_chunks, len(chunks)))
    synthetic = []
    for c, qa in zip(picked, write_qa(gen, picked), strict=True):
        stats["synthetic_written"] += 1
        words = content_words(qa[1]) if qa else set()
        if not words or len(qa[1].split()) > 12 or not words <= content_words(c.text) \
                or not finds(pipe, qa[0], c.doc_id, c.id):
            continue  # no round trip: a question that does not find its chunk, or an answer not from it
        stats["synthetic_kept"] += 1
        item = {"id": f"syn-{c.id}", "question": qa[0], "answer": qa[1], "aliases": [], "sources": [c.doc_id],
                "chunk_id": c.id, "type": "synthetic", "split": "test"}
        if held_out(c.id, cfg.test_fraction, cfg.seed):
            test.append(item)
        else:
            synthetic.append(item)
            if cfg.raw_text:
                prompt = f"Recite '{c.section or c.title}' from {c.doc_id}."
                train.append({"messages": [{"role": "user", "content": prompt},
                                           {"role": "assistant", "content": c.text}], "kind": "raw", "fact": c.id,
                              "question": prompt, "answer": None, "source": c.doc_id, "original": True})
    add(synthetic, "synthetic")
    if not train:
        raise ValueError(f"no training rows from {cfg.docs}: add a golden file with a train split or raise "
                         "--synthetic-chunks")
    if cfg.general_rows:
        lines = [x.strip() for x in Path(cfg.general_prompts).read_text(encoding="utf-8").splitlines()]
        general = general_replay(gen, [x for x in lines if x][:cfg.general_rows])
        stats["general"] = len(general)
        train.extend(general)
    rng.shuffle(train)
    ds = Dataset.from_list(train)
    Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(cfg.out + ".tmp")
    ds.save_to_disk(str(tmp))
    stats["seconds"] = round(time.perf_counter() - t0, 1)
    (tmp / "build.json").write_text(json.dumps({"config": asdict(cfg), "stats": stats}, indent=1))
    (tmp / HELDOUT).write_text("".join(json.dumps(q, ensure_ascii=False) + "\n" for q in test), encoding="utf-8")
    replace_dir(tmp, Path(cfg.out))
    log.info("training rows %d (%s); held-out synthetic questions %d; saved to %s", len(train), stats, len(test),
             cfg.out)
    return ds, test, stats


def load_built(cfg: DataConfig):
    """The saved ``build(cfg)`` result in ``cfg.out`` when it was built with exactly ``cfg`` (any store), else None.

    For resuming an interrupted ``finetune run``: the data step re-generates questions with the LM (minutes),
    and training can only resume on the very rows it started with. Documents edited since are not noticed.
    """
    import json

    from datasets import load_from_disk

    meta = Path(cfg.out) / "build.json"
    if not meta.is_file():
        return None
    saved = json.loads(meta.read_text())
    # the store is where round trips are retrieved, not what they find (tests/test_store.py): rows built before
    # --store existed, or on another store, are the same rows
    settings = lambda c: {k: v for k, v in c.items() if k not in ("store", "store_url")}  # noqa: E731
    if settings(saved["config"]) != settings(json.loads(json.dumps(asdict(cfg)))):
        return None
    heldout = load_jsonl(Path(cfg.out) / HELDOUT)
    return load_from_disk(cfg.out), heldout, saved["stats"]

