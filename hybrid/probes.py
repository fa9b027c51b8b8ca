"""Where did the answer come from? Re-ask questions with no, unrelated and counterfactual context.

For each retrieval system (RAG, fine-tuned + RAG, hybrid) and a seeded sample of questions whose retrieved
passages hold the answer: (a) the retrieved context is what ``compare`` already scored; (b) no context; (c) the
passages of another question, minus any that hold this answer; (d) the retrieved passages with the answer value
edited (numbers shifted, else another question's answer). An answer that repeats the edited value follows the
passage; one that still gives the original follows the weights. This is what tells a user whether a fine-tuned
model reads its sources. Left out on purpose: shuffling the passage order (RAG's prompt numbers them, so order
is part of the question asked).
"""

from __future__ import annotations

import random
import re

from rag import metrics as M
from rag.generate import ANSWER_STOP
from rag.ranking import Ranking


def counterfactual(answer: str, others: list[str], rng: random.Random) -> str | None:
    """A different value of the same kind: numbers shifted (45 days → 52 days), else another question's answer."""
    if re.search(r"\d", answer):
        return re.sub(r"\d+", lambda m: str(int(m.group()) + rng.choice((3, 7, 11))), answer, count=1)
    pool = [o for o in others if M.normalize(o) != M.normalize(answer) and not re.search(r"\d", o)]
    return rng.choice(pool) if pool else None


def context_probes(pipes: dict, qs: list[dict], rankeds: list[Ranking], n: int, seed: int = 0) -> dict:
    """Per retrieval system: accuracy with retrieved / no / unrelated context, and whether a counterfactual
    passage (answer value edited) is followed. Only questions whose retrieved passages hold the answer; a seeded
    sample of ``n`` of them; ``pipes``: system name → ``RagPipeline`` (its generator is what is probed)."""
    rng = random.Random(seed)
    picked = []
    for q, r in zip(qs, rankeds, strict=True):
        hits = r.hits[: next(iter(pipes.values())).cfg.k]
        # the answer's exact wording must be in a passage, or the counterfactual edit would miss it
        if q["answer"] is None or not any(re.search(re.escape(q["answer"]), h.text, re.I) for h in hits):
            continue
        fake = counterfactual(q["answer"], [x["answer"] for x in qs if x["answer"]], rng)
        if fake:
            picked.append((q, hits, fake))
    if not picked:
        return {}
    picked = rng.sample(picked, min(n, len(picked)))
    variants = {"none": lambda i, q, hits, fake: [],
                "unrelated": lambda i, q, hits, fake: [h for h in picked[(i + 1) % len(picked)][1]
                                                       if not M.contains(h.text, [q["answer"]])],
                "counterfactual": lambda i, q, hits, fake: [
                    (h.label, re.sub(re.escape(q["answer"]), lambda _: fake, h.text, flags=re.I)) for h in hits]}
    out = {}
    for system, pipe in pipes.items():
        res = {"n": len(picked)}
        for name, make in variants.items():
            convs = []
            for i, (q, hits, fake) in enumerate(picked):
                ctx = make(i, q, hits, fake)
                sources = [c if isinstance(c, tuple) else (c.label, c.text) for c in ctx]
                convs.append(pipe.generator.prompt(q["question"], sources))
            replies = [g.text for g in pipe.generator.chat_batch(convs, batch_size=8, desc=f"{system} {name}",
                                                                  stop=ANSWER_STOP)]  # as RAG answers
            replies = [M.said(t) for t in replies]  # the answer, not the hybrid's quote of a passage
            says_true = [bool(M.contains(t, [q["answer"]])) for t, (q, _, _) in zip(replies, picked, strict=True)]
            res[f"{name}_contains"] = round(sum(says_true) / len(picked), 4)
            if name == "counterfactual":
                says_fake = [bool(M.contains(t, [f])) for t, (_, _, f) in zip(replies, picked, strict=True)]
                res["follows_context"] = round(sum(says_fake) / len(picked), 4)
                res["follows_weights"] = res.pop("counterfactual_contains")
        out[system] = res
    return out
