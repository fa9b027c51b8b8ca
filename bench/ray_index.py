"""Indexing on Ray Data: chunks/s with 1 and 2 workers against in process, and a 10M-chunk sizing estimate from it.

The corpus is fitz-gov's documents written as Markdown (bench/scale.py ``write_corpus``) until it holds ~2,000
chunks at the default chunker (``--smoke``: 100). Every run does the work of a full build of it through the real
code: ``rag.index.plan_update`` (every document is new), then the work step — in process (``embed_fresh``:
sentence-transformers on ``threads`` torch threads, what ``rag index`` does in bulk; and the ONNX copy on every
core, what each Ray actor runs on one), or ``rag.ray_index.run_pipeline`` on a fresh local cluster with 1 and 2
workers. Cluster start is timed apart; the pipeline time includes the actors' start (~1-2 s, as a real run pays).
Each Ray result is checked against the in-process one (chunk ids and tokens equal, largest vector difference).

The sizing table for 10M chunks is arithmetic on the measured per-worker rate and the measured 2-worker scaling,
labelled an estimate: it assumes that scaling holds at W workers, one core each like here, and a price per
core-hour stated in ``PRICE``. Left out: the driver's share (reading/hashing files, the merge, the FAISS build
and write) — at 10M chunks the 15 GB of vectors want the store engine, not one driver.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.measure import cores, set_threads

log = logging.getLogger(__name__)
TARGET = 10_000_000  # chunks in the sizing table
PRICE = (0.045, "USD per vCPU-hour: AWS c7i on-demand, us-east-1 list price (c7i.large $0.0893/h for 2 vCPU), 2025; "
                "an assumption, check today's price")
WORKERS = (1, 8, 32, 128, 512)


def _rate(n: int, seconds: float) -> float:
    return round(n / seconds, 2)


def sizing(per_worker: float, efficiency: float, workers: tuple[int, ...] = WORKERS) -> list[dict]:
    """Hours and cost of embedding ``TARGET`` chunks on W one-core workers at ``per_worker`` chunks/s each, with
    the measured 2-worker ``efficiency`` (rate(2) / 2·rate(1), capped at 1) assumed to hold for every W > 1.

    >>> [r["hours"] for r in sizing(10.0, 0.5, (1, 100))]
    [277.78, 5.56]
    """
    rows = []
    for w in workers:
        hours = TARGET / (w * per_worker * (1.0 if w == 1 else min(efficiency, 1.0))) / 3600
        rows.append({"workers": w, "hours": round(hours, 2), "core_hours": round(w * hours, 1),
                     "cost_usd": round(w * hours * PRICE[0], 2)})
    return rows


def run(smoke: bool = False, threads: int = 2, chunks: int | None = None) -> dict:
    import ray

    from bench.scale import source_docs, write_corpus
    from rag.chunk import ChunkConfig
    from rag.dense import _onnx_dir, export_onnx, load_embedder, onnx_embed
    from rag.index import embed_fresh, index_settings, plan_update
    from rag.ray_index import connect, run_pipeline

    t0 = time.perf_counter()
    set_threads(threads)
    n_target, cfg, embedder = chunks or (100 if smoke else 2_000), ChunkConfig(), "minilm"
    # on a shared machine the load average says how much of the cores the runs had
    out = {"threads": threads, "cores": cores(), "embedder": embedder, "load_avg_before": os.getloadavg(), "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        docs = Path(tmp) / "docs"
        out["files"] = write_corpus(docs, n_target, source_docs())
        plan = plan_update(docs, Path(tmp) / "index", index_settings(cfg, embedder, "exact"), False, False)
        load_embedder(embedder)  # warm: the in-process clock starts with the model loaded
        export_onnx(embedder)  # what `rag index --ray` does before the actors start
        start = time.perf_counter()
        ref = embed_fresh(plan, cfg, embedder, progress=False)
        n, seconds = len(ref.tokens), time.perf_counter() - start
        out["chunks"] = n
        out["runs"]["in_process"] = {"runtime": f"rag.dense.embed ({'ONNX' if n <= 256 else 'sentence-transformers'}, "
                                                f"{threads} torch threads)",
                                     "seconds": round(seconds, 1), "chunks_per_second": _rate(n, seconds)}
        texts = [c.index_text for c in ref.chunks if c.indexed]
        onnx_embed(_onnx_dir(embedder), texts[:8])  # the session loads outside the clock
        start = time.perf_counter()
        onnx_embed(_onnx_dir(embedder), texts)
        seconds = time.perf_counter() - start
        out["runs"]["in_process_onnx"] = {"runtime": "ONNX Runtime, every core (embedding only)",
                                          "seconds": round(seconds, 1), "chunks_per_second": _rate(n, seconds)}
        for w in (1, 2):
            log.info("ray_index: %d chunks on %d worker(s)", n, w)
            start = time.perf_counter()
            connect(None, w)
            up = time.perf_counter() - start
            try:
                start = time.perf_counter()
                got = run_pipeline(plan.fresh, cfg, embedder, w)
                seconds = time.perf_counter() - start
            finally:
                ray.shutdown()
            assert [c.id for c in got.chunks] == [c.id for c in ref.chunks] and got.tokens == ref.tokens
            out["runs"][f"ray_{w}"] = {"runtime": f"Ray Data, {w} actor(s) x ONNX Runtime on 1 thread",
                                       "workers": w, "cluster_start_seconds": round(up, 1),
                                       "seconds": round(seconds, 1), "chunks_per_second": _rate(n, seconds),
                                       "max_abs_vector_diff": float(np.abs(got.vectors - ref.vectors).max())}
    r1, r2 = out["runs"]["ray_1"]["chunks_per_second"], out["runs"]["ray_2"]["chunks_per_second"]
    eff = round(r2 / (2 * r1), 2)
    out["sizing_10m"] = {"estimate": True, "per_worker_chunks_per_second": r1, "scaling_2_workers": eff,
                         "price_per_core_hour": PRICE[0], "price_source": PRICE[1],
                         "assumes": "the measured per-worker rate (one core of this machine, MiniLM, ~120-word "
                                    "chunks) and 2-worker scaling hold at W workers; driver work not included",
                         "rows": sizing(r1, eff)}
    out["seconds"], out["load_avg_after"] = round(time.perf_counter() - t0, 1), os.getloadavg()
    return out


def report(s: dict) -> str:
    """Markdown for RESULTS.md: the measured rates, then the 10M-chunk sizing estimate."""
    from bench.report import table

    runs = [[name, r["runtime"], r["seconds"], f"{r['chunks_per_second']:.1f}", r.get("cluster_start_seconds", "–"),
             f"{r['max_abs_vector_diff']:.1e}" if "max_abs_vector_diff" in r else "–"] for name, r in s["runs"].items()]
    z = s["sizing_10m"]
    load = f", load average {s['load_avg_before'][0]:.1f} before / {s['load_avg_after'][0]:.1f} after" if (
        "load_avg_before" in s) else ""
    out = (f"{s['chunks']:,} chunks ({s['files']} fitz-gov files), {s['cores']} cores{load}.\n\n"
           + table(["run", "runtime", "seconds", "chunks/s", "cluster start s", "max |Δ vector|"], runs)
           + f"\n\n**Estimate, not a measurement** — 10M chunks at {z['per_worker_chunks_per_second']} chunks/s per "
           f"one-core worker, 2-worker scaling {z['scaling_2_workers']} assumed to hold, "
           f"${z['price_per_core_hour']} per core-hour ({z['price_source']}); {z['assumes']}.\n\n")
    return out + table(["workers", "hours", "core-hours", "cost USD"], [[r["workers"], f"{r['hours']:.1f}",
                       f"{r['core_hours']:,.0f}", f"{r['cost_usd']:,.0f}"] for r in z["rows"]])


if __name__ == "__main__":  # one measurement at another size: python -m bench.ray_index [chunks]
    import json
    import sys

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    print(json.dumps(run(chunks=int(sys.argv[1]) if len(sys.argv) > 1 else None), indent=1))
