"""Train openbook's cross-encoder re-ranker on fitz-gov and measure it against BM25, dense and RRF.

No pretrained cross-encoder installs offline, so we start from the packaged all-MiniLM-L6-v2 (a bi-encoder,
with a fresh 1-logit head) and fine-tune it with sentence-transformers' CrossEncoderTrainer on fitz-gov train
queries, with hard negatives mined by openbook's own BM25 + dense retrieval (the same pool the re-ranker sees
at query time). Follows the sentence-transformers CrossEncoder training recipe (Aarsen, "Training and
Finetuning Reranker Models", 2025) and its LambdaLoss (Wang et al., CIKM 2018). Left out on purpose:
distillation from a bigger teacher (none installs offline), synthetic queries, and multi-GPU training.

Measured here, nDCG@10 on the 548 fitz-gov *test* queries (split by normalised text, never trained on), default
config, 2 CPU cores: bm25 0.768, dense 0.767, rrf 0.777; re-ranker replacing the rrf order 0.778 (+0.001, 95% CI
[-0.017, +0.018]); fused with rrf 0.788 (+0.011 [+0.002, +0.020]); fused as a third list beside bm25 and dense
0.794 (+0.017 [+0.008, +0.025]), which is what the pipeline does (``rerank_fusion="rrf"``). Tuning (lr, loss,
steps) used 322 dev queries held out of train, never the test split. The re-ranker alone does not beat RRF here
(as the 1-epoch BCE run in MODELS.md did not); as a third voice it helps. The fitz-gov queries, split and cached
retrieval runs are rag/fitzgov.py.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from rag.atomic import replace_dir
from rag.fitzgov import Query, data_version, fitzgov_split, hybrid, load_corpus, retrieve_all
from rag.fuse import rrf
from rag.metrics import ndcg_at, paired_bootstrap, recall_at, reciprocal_rank
from rag.models import DEFAULT_RERANKER, cache_dir, embedder_path

log = logging.getLogger(__name__)
LOSSES = ("bce", "lambda", "mnrl")


@dataclass
class RerankerConfig:
    loss: str = "lambda"  # training loss: one of bce | lambda | mnrl
    negatives: int = 7  # hard negatives per query, mined from openbook's BM25 + dense hybrid
    neg_depth: int = 30  # negatives are drawn from the fused top-N (the pool the re-ranker will re-order)
    max_steps: int = 150  # optimiser steps (~0.26 epoch); ~1.8 s each on 2 free CPU cores (3 s on 1)
    batch_size: int = 4  # queries per step for lambda/mnrl (each with its whole list), pairs per step for bce
    learning_rate: float = 1.5e-4  # AdamW peak learning rate, linear decay; 5e-5 learns too slowly here
    warmup: float = 0.1  # warm-up as a fraction of max_steps
    max_length: int = 128  # tokens per (query, passage) pair; fitz-gov median passage is ~100 tokens
    seed: int = 0  # seeds the split, the negative sampling and the trainer
    base_model: str = "minilm"  # embedder registry name, local path or hub id to initialise from
    rerank_depth: int = 30  # fused candidates the cross-encoder re-orders at evaluation
    threads: int = 2  # torch CPU threads; 1 when another job shares a 2-core CPU (2 then stall each other)
    extra: dict = field(default_factory=dict)  # free-form notes saved with the model (not part of the key)

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"--loss must be one of {', '.join(LOSSES)}, not '{self.loss}'")
        for name in ("threads", "negatives", "neg_depth", "max_steps", "batch_size", "max_length",
                     "rerank_depth"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        if self.neg_depth <= self.negatives:
            raise ValueError("--neg-depth must be larger than --negatives")
        if not 0 < self.learning_rate < 1 or not 0 <= self.warmup < 1:
            raise ValueError("--learning-rate must be in (0, 1) and --warmup in [0, 1)")


# ---------------------------------------------------------------- training
def build_dataset(cfg: RerankerConfig, queries: list[Query], runs: dict):
    """Rows in the format the chosen loss wants; negatives sampled from the fused top-``neg_depth``.

    Sampling (rather than taking the top few) because fitz-gov's qrels miss equally relevant documents, and
    those false negatives crowd the very top of the ranking.
    """
    from datasets import Dataset

    corpus, rng = load_corpus(), random.Random(cfg.seed)
    rows = []
    for q in queries:
        pool = [d for d, _ in hybrid(runs, q.qid)[:cfg.neg_depth] if d not in q.relevant]
        negs = rng.sample(pool, min(cfg.negatives, len(pool)))
        pos = [corpus[d] for d in q.relevant]
        if cfg.loss == "lambda":
            rows.append({"query": q.text, "docs": pos + [corpus[d] for d in negs],
                         "labels": [1] * len(pos) + [0] * len(negs)})
        elif cfg.loss == "mnrl":
            if len(negs) == cfg.negatives:  # the loss needs the same number of columns on every row
                negs_cols = {f"neg_{j}": corpus[d] for j, d in enumerate(negs)}
                rows += [{"query": q.text, "positive": p, **negs_cols} for p in pos]
        else:
            rows += [{"query": q.text, "passage": p, "label": 1.0} for p in pos]
            rows += [{"query": q.text, "passage": corpus[d], "label": 0.0} for d in negs]
    rng.shuffle(rows)
    return Dataset.from_list(rows)


def fit(cfg: RerankerConfig, queries: list[Query], out_dir: Path):
    """Fine-tune a CrossEncoder on ``queries`` and save it to ``out_dir``; returns the model."""
    import torch
    from sentence_transformers.cross_encoder import (
        CrossEncoder,
        CrossEncoderTrainer,
        CrossEncoderTrainingArguments,
        losses,
    )

    torch.set_num_threads(cfg.threads)  # never more threads than cores: they only stall each other
    runs = retrieve_all()
    data = build_dataset(cfg, queries, runs)
    cuda = torch.cuda.is_available()
    model = CrossEncoder(embedder_path(cfg.base_model), num_labels=1, max_length=cfg.max_length,
                         device="cuda" if cuda else "cpu")
    if cfg.loss == "lambda":
        loss = losses.LambdaLoss(model)
        pairs = sum(len(d) for d in data["docs"])
    elif cfg.loss == "mnrl":
        # 4 in-batch negatives on top of the mined ones; scale/sigmoid are the library defaults
        loss = losses.MultipleNegativesRankingLoss(model, num_negatives=4)
        pairs = len(data) * (1 + cfg.negatives + 4)
    else:
        pos = sum(data["label"])
        loss = losses.BinaryCrossEntropyLoss(model, pos_weight=torch.tensor((len(data) - pos) / pos))
        pairs = len(data)
    per_step = pairs / len(data) * cfg.batch_size
    log.info("training %s: %d queries, %d rows, %d pairs; %d steps x %d rows (~%.0f pairs/step) = %.2f ep",
             cfg.loss, len(queries), len(data), pairs, cfg.max_steps, cfg.batch_size, per_step,
             cfg.max_steps * cfg.batch_size / len(data))
    args = CrossEncoderTrainingArguments(
        output_dir=str(out_dir / "_trainer"), max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate, warmup_steps=cfg.warmup, lr_scheduler_type="linear", seed=cfg.seed,
        logging_steps=max(cfg.max_steps // 10, 1), save_strategy="no", report_to="none", save_only_model=True,
        use_cpu=not cuda, dataloader_drop_last=True, disable_tqdm=False,
        batch_sampler="no_duplicates" if cfg.loss == "mnrl" else "batch_sampler")
    CrossEncoderTrainer(model=model, args=args, train_dataset=data, loss=loss).train()
    shutil.rmtree(out_dir / "_trainer", ignore_errors=True)
    model.save_pretrained(str(out_dir))
    return model


def config_key(cfg: RerankerConfig) -> str:
    d = {k: v for k, v in asdict(cfg).items() if k not in ("extra", "threads")}
    return hashlib.sha256(json.dumps([d, data_version()], sort_keys=True).encode()).hexdigest()[:16]


def train(cfg: RerankerConfig | None = None, force: bool = False, evaluate_after: bool = True) -> Path:
    """Train the default re-ranker into the cache (atomically) unless one with the same key is there."""
    cfg = cfg or RerankerConfig()
    out = cache_dir() / "rerankers" / DEFAULT_RERANKER
    key = config_key(cfg)
    meta_path = out / "openbook.json"
    if not force and meta_path.exists() and json.loads(meta_path.read_text()).get("key") == key:
        log.info("re-ranker %s is up to date (key %s); --force retrains", out, key)
        return out
    log.info("config %s", json.dumps(asdict(cfg)))
    train_q, _ = fitzgov_split(cfg.seed)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.time()
    model = fit(cfg, train_q, tmp)
    meta = {"config": asdict(cfg), "key": key, "data_version": data_version(), "train_queries": len(train_q),
            "train_seconds": round(time.time() - t0, 1)}
    if evaluate_after:
        meta["eval"] = evaluate(model, depth=cfg.rerank_depth, seed=cfg.seed)
    (tmp / "openbook.json").write_text(json.dumps(meta, indent=2))
    replace_dir(tmp, out)
    log.info("saved re-ranker to %s in %.0f s", out, time.time() - t0)
    return out


# ---------------------------------------------------------------- evaluation
def ce_scores(model, queries: list[Query], pools: list[list[str]], batch_size: int = 64) -> list[np.ndarray]:
    """Cross-encoder scores for every (query, candidate), batched by length so padding costs little."""
    corpus = load_corpus()
    pairs = [(q.text, corpus[d]) for q, pool in zip(queries, pools, strict=True) for d in pool]
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][1]))
    scores = np.empty(len(pairs), dtype=np.float32)
    scores[order] = model.predict([pairs[i] for i in order], batch_size=batch_size, show_progress_bar=True,
                                  convert_to_numpy=True)
    return np.split(scores, np.cumsum([len(p) for p in pools])[:-1])


def evaluate(model_name_or_path=DEFAULT_RERANKER, queries: list[Query] | None = None, depth: int = 30,
             seed: int = 0, threads: int = 2) -> dict:
    """nDCG@10 / recall@10 / MRR for bm25, dense, rrf and three ways to use the cross-encoder.

    ``ce`` re-orders the rrf top-``depth`` (replace); ``ce+rrf`` fuses that order with the rrf list;
    ``bm25+dense+ce`` fuses it as a third list beside the two retrievers (RRF, k=60, equal weights).

    ``model_name_or_path`` is a loaded CrossEncoder, a registry name, a path or a hub id. Differences vs rrf
    come with 95% paired bootstrap intervals. ``queries`` defaults to the fitz-gov test split.
    """
    if isinstance(model_name_or_path, str):
        import torch
        from sentence_transformers import CrossEncoder

        from rag.models import reranker_path

        torch.set_num_threads(threads)
        model = CrossEncoder(reranker_path(model_name_or_path), device="cuda" if torch.cuda.is_available()
                             else "cpu")
    else:
        model = model_name_or_path
    queries = queries if queries is not None else fitzgov_split(seed)[1]
    runs = retrieve_all()
    fused = [hybrid(runs, q.qid) for q in queries]
    pools = [[d for d, _ in f[:depth]] for f in fused]
    t0 = time.time()
    scores = ce_scores(model, queries, pools)
    secs = (time.time() - t0) / max(len(queries), 1)
    names = ("bm25", "dense", "rrf", "ce", "ce+rrf", "bm25+dense+ce")
    systems: dict[str, list[list[str]]] = {n: [] for n in names}
    for q, f, pool, s in zip(queries, fused, pools, scores, strict=True):
        ce = [pool[i] for i in np.argsort(-s, kind="stable")]
        tail = [d for d, _ in f[depth:]]  # below the re-ranked pool the fused order stands
        systems["bm25"].append([d for d, _ in runs[q.qid]["bm25"]])
        systems["dense"].append([d for d, _ in runs[q.qid]["dense"]])
        systems["rrf"].append([d for d, _ in f])
        systems["ce"].append(ce + tail)
        both = rrf([[(d, 0.0) for d in pool], [(d, 0.0) for d in ce]], k=60)
        systems["ce+rrf"].append([d for d, _ in both] + tail)
        three = rrf([runs[q.qid]["bm25"], runs[q.qid]["dense"], [(d, 0.0) for d in ce]], k=60)
        systems["bm25+dense+ce"].append([d for d, _ in three])
    metrics = {"ndcg@10": ndcg_at, "recall@10": recall_at, "mrr": reciprocal_rank}
    per = {name: {m: np.array([fn(r, set(q.relevant)) for r, q in zip(runs_, queries, strict=True)])
                  for m, fn in metrics.items()} for name, runs_ in systems.items()}
    out = {"queries": len(queries), "rerank_depth": depth, "ce_seconds_per_query": round(secs, 3),
           "systems": {}}
    for name, vals in per.items():
        row = {m: round(float(v.mean()), 4) for m, v in vals.items()}
        if name != "rrf":
            for m, v in vals.items():
                d, lo, hi = paired_bootstrap(v, per["rrf"][m], seed=seed)
                row[f"{m} vs rrf"] = [round(d, 4), round(lo, 4), round(hi, 4)]
        out["systems"][name] = row
    return out


def format_table(res: dict) -> str:
    lines = [f"fitz-gov, {res['queries']} queries; differences vs rrf with 95% paired bootstrap CI"]
    for name, row in res["systems"].items():
        cells = []
        for m in ("ndcg@10", "recall@10", "mrr"):
            d = row.get(f"{m} vs rrf")
            cells.append(f"{m} {row[m]:.3f}" + (f" ({d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}])" if d else ""))
        lines.append(f"  {name:13s} " + "  ".join(cells))
    return "\n".join(lines)
