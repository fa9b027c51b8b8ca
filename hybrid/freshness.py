"""Freshness: apply a change set to a copy of the corpus, re-index incrementally, re-ask the changed facts.

``<docs>/changes/edits.jsonl`` holds exact find/replace edits (format: ``data/CHANGES.md``) and
``<docs>/changes/golden.jsonl`` golden-format questions about the changed facts, each with its ``old_answer``.
Retrieval systems answer from the updated index; closed-book systems still carry weights trained on the old
text. Reported per system: the share of answers with the new value (fresh) and with the old one (stale), and the
time an update takes (re-index seconds vs the training run's seconds). With ``compare --seeds N`` the adapter
systems answer again with the adapters of the other training seeds, and the shares are reported over seeds too.
The live corpus and index are never touched: both are copied to a temporary folder first (the index in its
``--store``: rag.store.copy_store), and an edit whose path leaves that copy is refused.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from hybrid.seeds import seeded, summary
from hybrid.systems import (
    ADAPTER,
    CLOSED_BOOK,
    RETRIEVAL,
    CompareConfig,
    judged,
    run_closed_book,
    with_generator,
)
from rag import metrics as M
from rag.config import load_jsonl
from rag.evaluate import load_golden
from rag.pipeline import RagConfig, RagPipeline
from rag.store import copy_store, drop_store


def _target(dest: Path, e: dict) -> Path:
    """The file an edit changes, which must lie inside the copy ``dest`` (an absolute path or '../..' would
    rewrite files anywhere the process may write)."""
    if not isinstance(e, dict) or not all(isinstance(e.get(k), str) for k in ("path", "find", "replace")):
        raise ValueError(f"edit {str(e)[:80]}: needs string 'path', 'find' and 'replace' (format: data/CHANGES.md)")
    p = (dest / e["path"]).resolve()
    if not e["path"] or Path(e["path"]).is_absolute() or not p.is_relative_to(dest.resolve()) or p == dest.resolve():
        raise ValueError(f"edit {e.get('id', '?')}: path {e['path']!r} is not a file inside the documents folder; "
                         "give it relative to the folder, e.g. policies/returns.md (format: data/CHANGES.md)")
    return p


def apply_edits(src: str | Path, dest: str | Path, edits: list[dict]) -> list[str]:
    """Copy the corpus at ``src`` to ``dest`` and apply ``edits`` (``find`` must occur once); the edited paths."""
    shutil.copytree(src, dest, dirs_exist_ok=True)
    targets = [_target(Path(dest), e) for e in edits]  # every path checked before any file is written
    changed = []
    for e, p in zip(edits, targets, strict=True):
        text = p.read_text(encoding="utf-8")
        if text.count(e["find"]) != 1:
            raise ValueError(f"edit {e['id']}: '{e['find']}' occurs {text.count(e['find'])} times in {e['path']}, "
                             "not once; fix data/demo/changes/edits.jsonl")
        p.write_text(text.replace(e["find"], e["replace"]), encoding="utf-8")
        changed.append(e["path"])
    return changed


def freshness(cfg: CompareConfig, base: RagPipeline, progress: bool = True) -> dict:
    """Apply ``<docs>/changes/edits.jsonl`` to a copy, re-index it incrementally, and re-ask the changed facts.

    Retrieval systems answer from the updated index; closed-book systems still have the weights trained on the
    old text. Reported per system: share of answers with the new value (fresh), with the old one (stale), and
    the time to update (re-index seconds vs the training run's seconds).
    """
    changes = Path(cfg.docs) / "changes"
    if not (changes / "edits.jsonl").exists():
        raise FileNotFoundError(f"no {changes / 'edits.jsonl'}: the freshness demo needs a change set there "
                                "(format: data/CHANGES.md)")
    edits = load_jsonl(changes / "edits.jsonl")
    qs = load_golden(changes / "golden.jsonl", cfg.docs)
    train_s = {kind: json.loads((Path(root) / "metrics.json").read_text()).get("seconds")
               for kind, root in (("finetuned", cfg.finetuned), ("raft", cfg.raft))
               if (Path(root) / "metrics.json").exists()}
    out = {"edits": len(edits), "questions": len(qs), "systems": {},
           "asked": [{"question": q["question"], "old": q["old_answer"], "new": q["answer"]} for q in qs]}
    with tempfile.TemporaryDirectory() as tmp:
        docs, index_dir = Path(tmp) / Path(cfg.docs).name, Path(tmp) / "index"
        apply_edits(cfg.docs, docs, edits)
        fresh = RagPipeline(RagConfig(**{**asdict(base.cfg), "docs": str(docs), "index_dir": str(index_dir)}))
        try:
            copy_store(base.cfg, index_dir)  # the live index, so the update is incremental
            t0 = time.perf_counter()
            stats = fresh.update_index(progress=False)  # rag.store.update_store: the copy in the same store
            out["reindex_s"], out["reembedded_chunks"] = round(time.perf_counter() - t0, 2), stats.embedded_chunks
            _ask(cfg, fresh, qs, train_s, out)
        finally:
            drop_store(fresh.cfg)  # Milvus: the copy's engine stops, and a server drops the copy's collections
    return out


def _ask(cfg: CompareConfig, fresh: RagPipeline, qs: list[dict], train_s: dict, out: dict) -> None:
    """Every system re-asks the changed facts; retrieval ones read the updated copy ``fresh``. With ``--seeds N``
    the adapter systems ask again with the adapters of seeds 1..N-1: how often one adapter gives the new value is
    one draw, as its accuracy is."""
    rankeds = [fresh.ranked(q["question"]) for q in qs]
    k = fresh.cfg.k
    out["retrieved_new"] = round(sum(any(M.contains(h.text, [q["answer"]]) for h in r.hits[:k])
                                     for q, r in zip(qs, rankeds, strict=True)) / len(qs), 4)
    for s in cfg.system_list:
        texts, rankeds = _answers(cfg, s, fresh, qs, rankeds)
        new, old = _scored(texts, qs)
        # retrieval systems see the edit once re-indexed; closed-book weights only learn it by retraining
        how = "re-index" if s in RETRIEVAL else "retrain" if s == "finetuned" else "none (base model)"
        update = out["reindex_s"] if s in RETRIEVAL else train_s.get("finetuned") if s == "finetuned" else None
        out["systems"][s] = {"fresh": _share(new), "stale": _share(old),
                             "update_s": update, "update": how, "answers": texts, "is_fresh": new,
                             "is_stale": old}
    trained = [s for s in cfg.system_list if ADAPTER[s]]
    if cfg.seeds < 2 or not trained:
        return
    runs = {s: [(out["systems"][s]["fresh"], out["systems"][s]["stale"])] for s in trained}
    for seed in range(1, cfg.seeds):
        scfg = seeded(cfg, seed, {ADAPTER[s] for s in trained})  # trained by compare's --seeds pass already
        for s in trained:
            texts, rankeds = _answers(scfg, s, fresh, qs, rankeds)
            new, old = _scored(texts, qs)
            runs[s].append((_share(new), _share(old)))
            out["systems"][s].setdefault("seed_answers", []).append(texts)  # seeds 1..N-1
    for s, rs in runs.items():
        out["systems"][s]["seeds"] = {"fresh": summary([f for f, _ in rs]), "stale": summary([o for _, o in rs])}


def _answers(cfg: CompareConfig, s: str, fresh: RagPipeline, qs: list[dict], rankeds: list) -> tuple[list, list]:
    """System ``s``'s replies to ``qs``, and the rankings with the base model's judgements added (the next system
    is gated by these judgements, not new ones)."""
    if s in CLOSED_BOOK:
        return [r["answer"] for r in run_closed_book(cfg, s, qs)], rankeds
    answers = with_generator(fresh, cfg, s).answer_batch([q["question"] for q in qs], rankeds, desc=f"{s} fresh")
    return [a.text for a in answers], judged(rankeds, [{"signals": a.signals} for a in answers])


def _share(flags: list[bool]) -> float:
    return round(sum(flags) / len(flags), 4)


def _scored(texts: list[str], qs: list[dict]) -> tuple[list[bool], list[bool]]:
    """Which replies give the new value, which the old one; what is scored is the answer, not the hybrid's quote
    of a passage."""
    said = [M.said(t) for t in texts]
    new = [bool(M.contains(t, [q["answer"], *q.get("aliases", [])])) for t, q in zip(said, qs, strict=True)]
    old = [bool(M.contains(t, [q["old_answer"]])) for t, q in zip(said, qs, strict=True)]
    return new, old
