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
- optionally raw chunk text as continued pre-training rows (``raw_text``).

Left out on purpose: a bigger teacher model for question writing (none installs offline) and LLM judges.
"""

from __future__ import annotations

import hashlib
import logging
import random
import re
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from rag.bm25 import tokenize
from rag.evaluate import load_golden
from rag.generate import IDK, Generator
from rag.metrics import normalize
from rag.pipeline import RagConfig, RagPipeline, option

log = logging.getLogger(__name__)

CLOSED_BOOK_SYSTEM = (
    "You answer questions about a private document collection from memory. Reply with the short answer on "
    "the first line and 'Source: <document path>' on the second. If you do not know, reply exactly: " + IDK
)
_FORMAT = re.compile(r"^\s*(?P<answer>[^\n]*\S)[ \t]*\n+Source: *(?P<source>\S[^\n]*?)\s*$")
_QA = re.compile(r"Question:\s*(?P<q>[^\n]+\?)\s*\n+\s*Answer:\s*(?P<a>[^\n]+)", re.I)
QA_PROMPT = ("Write one question that the passage answers, and its short answer, copied from the passage.\n"
             "Reply in exactly this form:\nQuestion: <question>?\nAnswer: <answer>\n\nPassage ({label}):\n{text}")
PARAPHRASE_PROMPT = "Reword this question without changing its meaning. Reply with the new question only.\n\n{q}"


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
    model: str = option("smollm2-135m", "LM that writes synthetic questions and paraphrases")
    synthetic_chunks: int = option(40, "chunks to write synthetic QA from (0: none; train and test parts together)")
    test_fraction: float = option(0.25, "share of synthetic chunks held out for testing (split before writing)")
    paraphrases: int = option(4, "extra wordings per training question (0: the original question only)")
    raw_text: bool = option(False, "add each train chunk's text as a continued pre-training row")
    seed: int = option(0, "seeds chunk sampling, the split and paraphrase sampling")

    def __post_init__(self):
        if self.synthetic_chunks < 0 or self.paraphrases < 0:
            raise ValueError("--synthetic-chunks and --paraphrases must be 0 or more")
        if not 0 < self.test_fraction < 1:
            raise ValueError("--test-fraction must be between 0 and 1")
        if not self.golden and (Path(self.docs) / "golden.jsonl").exists():
            self.golden = str(Path(self.docs) / "golden.jsonl")
        if not self.out:
            self.out = str(Path(".openbook") / "finetune" / (Path(self.docs).resolve().name or "root") / "data")


def held_out(chunk_id: str, fraction: float, seed: int) -> bool:
    """A stable coin flip per chunk id, so the split never depends on which chunks were sampled."""
    h = hashlib.sha256(f"{seed}:{chunk_id}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64 < fraction


def content_words(text: str) -> set[str]:
    """Stemmed, stop-word-free tokens (BM25's tokenizer), for "the answer's words occur in the chunk"."""
    return set(tokenize(text))


def write_qa(gen: Generator, label: str, text: str) -> tuple[str, str] | None:
    """One (question, answer) the LM writes about a passage, or None when its reply has the wrong shape."""
    msgs = [{"role": "user", "content": QA_PROMPT.format(label=label, text=gen.sanitize(text))}]
    m = _QA.search(gen.chat(msgs, max_new_tokens=64).text)
    return (m["q"].strip(), m["a"].strip().rstrip(".")) if m else None


def reword(gen: Generator, question: str, n: int, seed: int) -> list[str]:
    """Up to ``n`` distinct sampled re-wordings of a question (the original excluded)."""
    import torch

    if n == 0:
        return []
    msgs = [{"role": "user", "content": PARAPHRASE_PROMPT.format(q=gen.sanitize(question))}]
    enc = gen.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True).to(gen.device)
    torch.manual_seed(seed)
    with torch.inference_mode():
        out = gen.model.generate(**enc, do_sample=True, temperature=0.9, top_p=0.95, max_new_tokens=40,
                                 num_return_sequences=n * 2, pad_token_id=gen.tokenizer.eos_token_id)
    seen, keep = {normalize(question)}, []
    for ids in out[:, enc["input_ids"].shape[1]:]:
        text = gen.tokenizer.decode(ids, skip_special_tokens=True).strip().split("\n")[0].strip()
        if text.endswith("?") and len(text) > 10 and normalize(text) not in seen:
            seen.add(normalize(text))
            keep.append(text)
    return keep[:n]


def finds(pipe: RagPipeline, question: str, doc_id: str, chunk_id: str | None = None) -> bool:
    """Round trip: the question retrieves its source chunk (or any chunk of its document) in the hybrid top 5."""
    hits, _, _ = pipe.ranked(question, mode="hybrid", k=5)
    return any(h.chunk_id == chunk_id if chunk_id else h.doc_id == doc_id for h in hits)


def build(cfg: DataConfig, progress: bool = True):
    """Build, save and return a ``DatasetDict`` with ``train`` (chat rows) and ``test`` (held-out synthetic QA)."""
    from datasets import Dataset, DatasetDict

    rng = random.Random(cfg.seed)
    pipe = RagPipeline(RagConfig(docs=cfg.docs, index_dir=cfg.index_dir, model=cfg.model))
    pipe.update_index(progress=progress)
    gen = pipe.generator
    train, test, stats = [], [], {"golden": 0, "refusal": 0, "synthetic_written": 0, "synthetic_kept": 0,
                                  "paraphrases": 0, "paraphrases_dropped": 0}

    def add(question: str, answer: str | None, source: str | None, kind: str, fact: str, doc: str | None):
        wordings = [question]
        if cfg.paraphrases:
            for alt in reword(gen, question, cfg.paraphrases, rng.randrange(2**31)):
                # a re-wording that no longer finds its document has probably changed its meaning
                if doc is None or finds(pipe, alt, doc):
                    wordings.append(alt)
                else:
                    stats["paraphrases_dropped"] += 1
        stats["paraphrases"] += len(wordings) - 1
        target = format_answer(answer, source)
        train.extend({"messages": closed_book_messages(w, target), "kind": kind, "fact": fact, "question": w,
                      "answer": answer, "source": source, "original": i == 0} for i, w in enumerate(wordings))

    golden = [q for q in load_golden(cfg.golden, cfg.docs) if q["split"] == "train"] if cfg.golden else []
    for q in tqdm(golden, desc="golden train + paraphrases", disable=not progress):
        src = q["sources"][0] if q["sources"] else None
        add(q["question"], q["answer"], src, "refusal" if q["answer"] is None else "golden", q["id"], src)
        stats["refusal" if q["answer"] is None else "golden"] += 1

    chunks = [c for c in pipe.index.chunks.values() if c.indexed and len(c.text.split()) >= 8]
    for c in tqdm(rng.sample(chunks, min(cfg.synthetic_chunks, len(chunks))), desc="synthetic QA",
                  disable=not progress):
        is_test = held_out(c.id, cfg.test_fraction, cfg.seed)
        qa = write_qa(gen, c.title or c.doc_id, c.text)
        stats["synthetic_written"] += 1
        if not qa or not content_words(qa[1]) or not content_words(qa[1]) <= content_words(c.text) \
                or not finds(pipe, qa[0], c.doc_id, c.id):
            continue
        stats["synthetic_kept"] += 1
        if is_test:
            test.append({"id": f"syn-{c.id}", "question": qa[0], "answer": qa[1], "aliases": [],
                         "sources": [c.doc_id], "chunk_id": c.id, "type": "synthetic", "split": "test"})
        else:
            add(qa[0], qa[1], c.doc_id, "synthetic", c.id, c.doc_id)
            if cfg.raw_text:
                prompt = f"Recite '{c.section or c.title}' from {c.doc_id}."
                train.append({"messages": [{"role": "user", "content": prompt},
                                           {"role": "assistant", "content": c.text}], "kind": "raw", "fact": c.id,
                              "question": prompt, "answer": None, "source": c.doc_id, "original": True})
    if not train:
        raise ValueError(f"no training rows from {cfg.docs}: add a golden file with a train split or raise "
                         "--synthetic-chunks")
    rng.shuffle(train)
    ds = DatasetDict({"train": Dataset.from_list(train), "test": Dataset.from_list(test or [{}])})
    if not test:
        ds["test"] = ds["test"].select([])
    Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(cfg.out + ".tmp")
    ds.save_to_disk(str(tmp))
    _replace_dir(tmp, Path(cfg.out))
    log.info("training rows %d (%s); held-out synthetic questions %d; saved to %s", len(train), stats, len(test),
             cfg.out)
    return ds, stats


def _replace_dir(tmp: Path, out: Path) -> None:
    import shutil

    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
