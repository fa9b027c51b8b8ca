"""Training text the generator LM writes: a question per chunk, re-wordings of questions, general replay rows.

- ``write_qa``: the answer is a span taken from the chunk (``answer_span``: an amount, a `code` term or a name
  inside a prose sentence), and the LM, shown two worked examples, writes a question for it;
- ``reword``: sampled re-wordings of a question (facts stick only when seen in many phrasings: Ovadia et al.
  2024, Allen-Zhu & Li 2023);
- ``general_replay``: the base model's own greedy replies to general prompts (self-distillation against
  forgetting: Yang et al. 2024).

Left out on purpose: checking what the LM wrote (the round trips through retrieval are ``finetune.data.build``'s
job), a bigger teacher model (none installs offline) and LLM judges.
"""

from __future__ import annotations

import re

from rag.generate import Generator
from rag.metrics import SENTENCE_BREAK, normalize

_QUESTION = re.compile(r"(?:Question:\s*)?(?P<q>[^\n?]{12,}\?)", re.I)
# Candidate answers, most checkable first: an amount or quantity ("EUR 49", "30 days", "99.9%"), then a
# `code` span, then a capitalised name inside a sentence. The answer is taken from the text, never written by the
# LM: asked to write question *and* answer, SmolLM2-135M invented answers (0 of 40 pairs round-tripped).
_NOT_UNIT = r"(?!(?:per|and|or|to|in|of|for|the|an?|on|at|by|with|is|are|was|if|from)\b)"
_AMOUNT = r"(?:\b(?:EUR|USD|GBP|CHF)\s?|[$€£])?\b\d[\d,.:]*(?:\s?(?:%|" + _NOT_UNIT + r"[A-Za-z]{1,12}\b))?"
_SPANS = (re.compile(_AMOUNT),
          re.compile(r"`([^`\n]{2,40})`"),
          re.compile(r"(?<=[a-z,;] )(?:[A-Z][\w-]+ ){0,3}[A-Z][\w-]+"))
# Worked example turns, not instructions: asked plainly, SmolLM2-135M answered "I'm ready to help" or wrote an
# answer instead of a question; shown examples it mostly follows.
QA_ASK = "Passage ({label}):\n{text}\n\nWrite a question about the passage whose answer is: {answer}"
QA_DEMO = [{"role": "user", "content": QA_ASK.format(label="Lid care guide", text="Every lid carries a 7-year "
                                                     "warranty against cracks.", answer="7-year")},
           {"role": "assistant", "content": "Question: How long is the warranty on a lid?"},
           {"role": "user", "content": QA_ASK.format(label="Team page", text="Support tickets are handled by "
                                                     "Mara Lind, who leads the Oslo office.", answer="Mara Lind")},
           {"role": "assistant", "content": "Question: Who handles support tickets?"}]
REWORD_ASK = "Reword this question: {q}"
REWORD_DEMO = [{"role": "user", "content": REWORD_ASK.format(q="How long is the warranty on a lid?")},
               {"role": "assistant", "content": "For how many years is a lid guaranteed?"},
               {"role": "user", "content": REWORD_ASK.format(q="Which colours do lids come in?")},
               {"role": "assistant", "content": "In what colours can I buy a lid?"}]


def answer_span(text: str) -> tuple[str, str] | None:
    """``(answer, sentence)``: a short checkable fact in ``text`` and the prose sentence it sits in, or None.

    >>> answer_span("# Plans\\nThe Pro plan costs EUR 49 per month. It has no limits.")
    ('EUR 49', 'The Pro plan costs EUR 49 per month.')
    """
    sentences = [s.strip() for s in SENTENCE_BREAK.split(text)]
    # prose only: headings, table rows and list stubs lack the words a question needs
    sentences = [s for s in sentences if len(s.split()) >= 6 and not s.startswith(("#", "|"))]
    for pattern in _SPANS:
        for sent in sentences:
            for m in pattern.finditer(sent):
                span = (m.group(1) if m.groups() else m.group(0)).strip(" ,.;:")
                if len(span) >= 2 and len(span.split()) <= 6:
                    return span, sent
    return None


def write_qa(gen: Generator, chunks: list) -> list[tuple[str, str] | None]:
    """One (question, answer) per chunk: the answer is a span of the chunk, the LM writes the question for it.

    None where the chunk has no candidate answer or the reply is not a question that leaves the answer out.
    """
    spans = [answer_span(c.text) for c in chunks]
    todo = [(c, sp) for c, sp in zip(chunks, spans, strict=True) if sp]
    convs = [[*QA_DEMO, {"role": "user", "content": QA_ASK.format(label=c.title or c.doc_id, text=gen.sanitize(
        sent), answer=gen.sanitize(ans))}] for c, (ans, sent) in todo]
    replies = iter(gen.chat_batch(convs, max_new_tokens=40, batch_size=8, desc="synthetic questions"))
    out = []
    for sp in spans:
        if sp is None:
            out.append(None)
            continue
        m = _QUESTION.search(next(replies).text)
        # a question that contains its own answer teaches nothing and would pass any closed-book test
        ok = m and normalize(sp[0]) not in normalize(m["q"])
        out.append((m["q"].strip(), sp[0]) if ok else None)
    return out


def reword(gen: Generator, questions: list[str], n: int, seed: int) -> list[list[str]]:
    """Up to ``n`` distinct sampled re-wordings per question (the original excluded); n + 2 are drawn."""
    if n == 0 or not questions:
        return [[] for _ in questions]
    convs = [[*REWORD_DEMO, {"role": "user", "content": REWORD_ASK.format(q=gen.sanitize(q))}] for q in questions]
    draws = n + 2  # headroom for duplicates and malformed replies
    gens = gen.chat_batch(convs, max_new_tokens=40, batch_size=16, samples=draws, seed=seed, desc="re-wording",
                          stop=("\n",))  # only the first line is kept
    out = []
    for i, q in enumerate(questions):
        seen, keep = {normalize(q)}, []
        for g in gens[i * draws:(i + 1) * draws]:
            text = g.text.split("\n")[0].strip()
            if text.endswith("?") and len(text) > 10 and normalize(text) not in seen:
                seen.add(normalize(text))
                keep.append(text)
        out.append(keep[:n])
    return out


def general_replay(gen: Generator, prompts: list[str], max_new_tokens: int = 96) -> list[dict]:
    """Training rows whose targets are the base model's own greedy replies to general ``prompts``; a reply
    cut off by the token limit is dropped (training on it would teach stopping mid-sentence)."""
    convs = [[{"role": "user", "content": p}] for p in prompts]
    replies = gen.chat_batch(convs, max_new_tokens=max_new_tokens, batch_size=16, desc="general replay")
    return [{"messages": [*c, {"role": "assistant", "content": g.text.strip()}], "kind": "general",
             "fact": f"general-{i}", "question": c[0]["content"], "answer": None, "source": None, "original": True}
            for i, (c, g) in enumerate(zip(convs, replies, strict=True))
            if g.text.strip() and g.new_tokens < max_new_tokens]
