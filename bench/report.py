"""Render a results JSON from ``python -m bench`` as RESULTS.md: one table per section (and its chart, drawn by
bench/charts.py), published anchors beside.

Nothing here measures; every number comes from the JSON, so RESULTS.md is never edited by hand. Anchors are the
figures MODELS.md records (published numbers, or earlier openbook measurements, labelled which) — comparisons,
not targets: most were taken on other data or another machine.
"""

from __future__ import annotations

from bench.backends import verdict
from bench.ray_index import report as ray_report

ANCHORS = {
    "quality": [("BEIR SciFact nDCG@10, BM25 (Pyserini flat / rank-bm25)", "67.9 / 68.5", "published"),
                ("BEIR SciFact nDCG@10, all-MiniLM-L6-v2", "64.5", "published"),
                ("BEIR SciFact nDCG@10, BM25 top-100 → ms-marco-MiniLM-L6 CE", "68.8", "published"),
                ("BEIR SciFact nDCG@10, BM25 + bge-base RRF", "74.2", "published"),
                ("fitz-gov test nDCG@10, document level: bm25 / dense / rrf / rrf+CE as 3rd list",
                 "0.768 / 0.767 / 0.777 / 0.794", "earlier openbook run (rag/train_reranker.py)")],
    "scale": [("MiniLM embedding, 256 tokens, 2 cores", "~29 passages/s", "MODELS.md, measured earlier here"),
              ("FAISS exact, 384-d, 1 thread", "~0.5 ms at 10k, ~10 ms at 100k", "MODELS.md"),
              ("FAISS, 2 OpenMP threads, single query", "~20x slower than 1", "MODELS.md"),
              ("re-rank 30 pairs, 2 cores", "≈ 0.55 s", "MODELS.md")],
    "backends": [("bm25s vs rank-bm25 on BEIR", "20–68x queries/s, same nDCG ±0.5", "published (bm25s)")],
    "generation": [("SmolLM2-135M decode, fp32, 2 cores", "29.8 tok/s (bound ≈ 37)", "MODELS.md, measured earlier")],
    "training": [("LoRA r=8 q/k/v/o on SmolLM2-135M", "921,600 trainable; 1.1–1.9 s/step at seq 256, batch 1",
                  "MODELS.md, measured earlier")],
    "governance": [("fitz-gov tier 0 passing threshold", "0.95 accuracy", "fitz-gov")],
}


def _f(x, nd=3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.1f}" if abs(x) >= 10 else f"{x:.{nd}f}"
    if isinstance(x, int) and not isinstance(x, bool):
        return f"{x:,}"
    return str(x)


def table(head: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(_f(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def anchors(name: str) -> str:
    rows = ANCHORS.get(name)
    return "\n\n*Anchors (not reproduced here):*\n\n" + table(["what", "figure", "source"], rows) if rows else ""


def _ci(row: dict, key: str) -> str:
    d = row.get(key)
    return f"{d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}]" if d else "–"


def quality(s: dict) -> str:
    rows = []
    for variant, v in s["variants"].items():
        for mode, m in v["systems"].items():
            rows.append([variant, mode, m["ndcg@10"], m["recall@10"], m["recall@100"], m["mrr"],
                         _ci(m, "ndcg@10 vs hybrid")])
    out = f"Dataset: **{s['dataset']}**; {s['note']}\n\n"
    out += table(["variant", "mode", "nDCG@10", "R@10", "R@100", "MRR", "ΔnDCG@10 vs hybrid [95% CI]"], rows)
    for variant, v in s["variants"].items():
        m = v["systems"].get("hybrid+rerank", {})
        if "ndcg@10 vs bm25" in m:
            wins = all(m[f"ndcg@10 vs {x}"][1] > 0 for x in ("bm25", "dense"))
            out += (f"\n\n{variant}: hybrid+rerank vs bm25 {_ci(m, 'ndcg@10 vs bm25')}, vs dense "
                    f"{_ci(m, 'ndcg@10 vs dense')} (ΔnDCG@10, 95% paired bootstrap): **"
                    + ("beats both, each interval above zero" if wins else "does not beat both beyond the interval")
                    + "**")
    extra = [(k, v) for k, v in s["variants"].items() if "chunks" in v]
    out += "\n\n" + "; ".join(f"{k}: {v['chunks']} chunks, {v['queries']} queries" + (
        f", re-rank p50 {v['rerank_seconds_per_query_p50']} s/query" if "rerank_seconds_per_query_p50" in v else "")
        for k, v in extra)
    return out


def governance(s: dict) -> str:
    out = f"{s['sample']}. {s['note']}\n\n"
    cats = ["abstention", "dispute", "grounding", "relevance", "trustworthy_direct", "trustworthy_hedged"]
    rows = []
    for model, m in s["models"].items():
        if "skipped" in m:
            out += f"- **{model}**: skipped — {m['skipped']}\n"
            continue
        if "error" in m:
            out += f"- **{model}**: failed — {m['error']}\n"
            continue
        for tier in ("tier0", "tier1"):
            for row in ("model abstains", "model abstains + re-ranker gate"):
                r = m[tier][row]
                rows.append([model, tier, row, f"{r['accuracy']:.3f} (n={r['n']})",
                             *[r["per_category"].get(c, {}).get("accuracy") for c in cats],
                             "/".join(str(r["modes_chosen"][k]) for k in ("trustworthy", "abstain", "disputed"))])
        g = m["gate"]
        out += (f"- **{model}**: gate threshold {g['threshold']} (calibrated on {g['calibration_cases']} "
                f"{g.get('calibrated_on', 'other tier-1 cases')}, F1 {g['calibration_f1']}); "
                f"generation {m['tier1']['new_tokens_per_second']} new tok/s batched\n")
    return out + "\n" + table(["model", "tier", "abstention logic", "accuracy", *cats, "trust/abstain/dispute"], rows)


def scale(s: dict) -> str:
    e = s["embedding"]
    out = (f"Embedding (bulk path, batch 32, {e['threads']} threads, n={e['n']} chunks of {e['mean_words']} words): "
           f"**{e['passages_per_second']} passages/s**. {s['vectors']}. Threads: {s['threads']['note']}.\n\n")
    rr = s["rerank_30_pairs_ms"]
    out += "Re-rank 30 pairs: " + ", ".join(f"{k.replace('_', ' ')} p50 {v['p50_ms']:.0f} ms / p95 {v['p95_ms']:.0f} ms"
                                            for k, v in rr.items()) + "\n\n"
    rows = []
    for size, r in s["sizes"].items():
        if "error" in r:
            rows.append([size, "failed: " + r["error"]])
            continue
        cps, q = r["chunks_per_second"], r["query_ms"]
        rows.append([r["chunks"], r["replicated_vectors"], cps["tokenize"], cps["bm25_build"], cps["faiss_add"],
                     r["disk_mb"]["total"], r.get("peak_rss_mb"), r["seconds"]["load"],
                     *[f"{q[m]['p50_ms']:.1f} / {q[m]['p95_ms']:.1f}" for m in ("bm25", "dense", "hybrid",
                                                                                 "hybrid+rerank")],
                     r["rerank_30_ms"]["p50_ms"], r["incremental_update"]["seconds"]])
    return out + table(["chunks", "replicated vectors", "tokenize ch/s", "BM25 build ch/s", "FAISS add ch/s",
                        "disk MB", "peak RSS MB", "load s", "bm25 p50/p95 ms", "dense", "hybrid", "hybrid+rerank",
                        "of which re-rank p50 ms", "update 1 doc s"], rows)


def backends(s: dict) -> str:
    b = s["bm25"]
    big = next(k for k in b["backends"]["bm25s"] if k.startswith("query_ms_"))
    n_big = big.split("_")[-1]
    rows = [[name, r["ndcg@10"], r["recall@10"], r["build_s"], r["query_ms"]["p50_ms"], r[big]["p50_ms"],
             r.get(f"score_only_ms_{n_big}", {}).get("p50_ms")] for name, r in b["backends"].items()]
    out = (f"BM25 on {b['chunks']} fitz-gov chunks, {b['queries']} test queries (same tokens); large index = token "
           f"lists repeated to {big.split('_')[-1]} rows.\n\n")
    out += table(["backend", "nDCG@10", "R@10", "build s", f"search p50 ms ({b['chunks']})",
                  f"search p50 ms ({n_big})", f"scoring only p50 ms ({n_big})"], rows)
    out += (f"\n\nnDCG@10 difference {b['ndcg_diff_points']:+.2f} points; same top 10 for {b['same_top10_share']:.1%} "
            f"of queries; speed-up {b['speedup']}. **{verdict(b['meets_bar'])}**.\n\n")
    f = s["faiss"]
    out += f"FAISS: {f['vectors']}; {f['queries']} queries; {f['threads']}; {f['rule']}.\n\n"
    rows = []
    for size, r in f["sizes"].items():
        for name, v in r.items():
            if name != "recommended":
                rows.append([size, name, v["recall@10_vs_exact"], v["build_s"], v["query_ms"]["p50_ms"],
                             v["query_ms"]["p95_ms"], "**yes**" if name == r["recommended"] else ""])
    return out + table(["vectors", "index", "recall@10 vs exact", "build s", "p50 ms", "p95 ms", "recommended"], rows) \
        + ("\n\nopenbook's default stays `exact` at every measured size: even at 100k vectors it costs well under the "
           "re-ranker's time per query (section 2), and the approximate indexes give up recall@10 to save it.")


def generation(s: dict) -> str:
    out = (f"{s['model']} ({s['parameters']:,} parameters, {s['base_weight_mb']} MB fp32); memory bandwidth "
           f"**{s['memory_bandwidth_gbs']} GB/s** ({s['bandwidth_method']}); {s['new_tokens']} new tokens, median of "
           f"{s['repeats']}. {s['note']}.\n\n")
    rows = []
    for name, v in s["variants"].items():
        if "error" in v:
            rows.append([name, v["threads"], "failed: " + v["error"], "", "", "", "", "", "", ""])
            continue
        rows.append([name, v["threads"], v["prefill_tok_s"], v["decode_tok_s"], v["bandwidth_bound_tok_s"],
                     v["ratio_to_bound"], v["same_tokens"], v["weight_mb"], v.get("prepare_s"), v.get("first_run_s")])
    out += table(["variant", "threads", "prefill tok/s", "decode tok/s", "bound tok/s", "decode/bound",
                  "same tokens", "weights MB", "prepare s", "first run s (compile)"], rows)
    if "llamacpp" not in s:
        return out
    rows = [[name, "skipped: " + v["skipped"], "", "", "", "", ""] if "skipped" in v else
            [name, v["threads"], v["prompt_tokens"], v["prefill_tok_s"], v["decode_tok_s"], v["bandwidth_bound_tok_s"],
             v["ratio_to_bound"]] for name, v in s["llamacpp"].items()]
    return (out + "\n\n**llama.cpp** (the CPU default; 4-bit GGUF files as packaged; bound = bandwidth ÷ file "
            "bytes; the rows on 1 thread show whether decoding is limited by memory bandwidth, which one thread "
            "would nearly saturate, or by compute, which halves with the threads):\n\n"
            + table(["model", "threads", "prompt tokens", "prefill tok/s", "decode tok/s", "bound tok/s",
                     "decode/bound"], rows))


def training(s: dict) -> str:
    out = (f"finetune.train default LoRA config, {s['threads']} threads; fp32 matmul rate {s['matmul_gflops_fp32']} "
           f"GFLOP/s; {s['flop_formula']}.\n\n")
    rows = [[name, c["rows"], c["steps"], c["mean_row_tokens"], c["padded_tokens_per_step"],
             c["seconds_per_step_median"], c["steady_tokens_per_second"], c["trainer_tokens_per_second"],
             c["achieved_gflops"], c["ratio_to_matmul_peak"]] for name, c in s["configs"].items()]
    return out + table(["rows", "n", "steps", "tokens/row", "padded tokens/step", "s/step (median)",
                        "tokens/s (padded)", "tokens/s (trainer, non-pad)", "GFLOP/s", "÷ matmul rate"], rows)


def store(s: dict) -> str:
    """bench/store.py: the embedded index vs Milvus Lite, one row per size and store."""
    out = f"{s['engine']}. {s['vectors']}. k={s['k']}, {s['queries']} fitz-gov queries, one at a time.\n\n"
    if "fitzgov" in s:
        a = s["fitzgov"]
        out += (f"Same answers: fitz-gov test split, {a['queries']} queries over {a['chunks']:,} real chunks, by "
                "document (Milvus − embedded, 95% paired bootstrap):\n\n")
        out += table(["mode", "nDCG@10 embedded", "nDCG@10 Milvus", "difference", "recall@5 embedded",
                      "recall@5 Milvus", "difference"],
                     [[m, a[m]["ndcg@10"]["embedded"], a[m]["ndcg@10"]["milvus"],
                       _ci(a[m]["ndcg@10"], "milvus_minus_embedded"), a[m]["recall@5"]["embedded"],
                       a[m]["recall@5"]["milvus"], _ci(a[m]["recall@5"], "milvus_minus_embedded")]
                      for m in ("bm25", "dense", "hybrid")]) + "\n\n"
    rows = []
    for size, by in s["sizes"].items():
        if "skipped" in by:
            rows.append([size, "skipped: " + by["skipped"]])
            continue
        for name, r in by.items():
            if "error" in r:
                rows.append([size, name, "failed: " + r["error"]])
                continue
            b, v, q = r["build"], r["serve"], r["serve"]["query_ms"]
            engine = v.get("engine", {}).get("peak_mb")
            rows.append([b["chunks"], name, b["chunks_per_second"], b["seconds"], v["load_seconds"],
                         f"{q['bm25']['p50_ms']:.1f} / {q['bm25']['p95_ms']:.1f}",
                         f"{q['dense']['p50_ms']:.1f} / {q['dense']['p95_ms']:.1f}", v["dense_recall@10_vs_exact"],
                         v.get("bm25_top10_scores_match", "(reference)"), b["disk_mb"], b["client_rss_mb"]["peak"],
                         v["client_rss_mb"]["peak"], engine if engine is not None else "–"])
    return out + table(["chunks", "store", "build ch/s", "build s", "open s", "bm25 p50/p95 ms", "dense p50/p95 ms",
                        "dense recall@10 vs exact", "BM25 top-10 scores = embedded", "disk MB", "build peak RSS MB",
                        "serve peak RSS MB", "+ engine peak RSS MB"], rows)


TITLES = {"quality": ("1a. Retrieval quality — fitz-gov test split", quality),
          "governance": ("1b. Governance — fitz-gov tier 0 + tier 1 sample", governance),
          "beir": ("1c. Retrieval quality — BEIR-format folder", quality),
          "scale": ("2. Scale and speed", scale), "store": ("2b. Stores — embedded vs Milvus", store),
          "backends": ("3. Backends", backends),
          "generation": ("4. Generation", generation), "training": ("5. Fine-tuning", training),
          "ray_index": ("6. Indexing on Ray Data", ray_report)}


def render(res: dict, source: str = "", charts: dict[str, str] | None = None) -> str:
    """The markdown of ``res``; ``charts`` (section → PNG path relative to the markdown, from bench/charts.py) are
    linked under their sections' tables."""
    charts = charts or {}
    h = res["host"]
    parts = ["# openbook benchmark results", "",
             f"Generated by `python -m bench` from `{source}` — do not edit by hand; re-run `make bench` (or "
             f"`python -m bench --report <json or folder>`, which redraws the charts too). "
             f"{'**SMOKE RUN: tiny sizes, not results.** ' if res['smoke'] else ''}"
             f"{res['date']}, host `{h['host']}`, {h['cpu']}, {h['cores']} cores, load average before "
             f"{h['load_avg_1_5_15']} / after {h.get('load_avg_after')}; total {res.get('total_seconds')} s.", ""]
    for name, s in res["sections"].items():
        title, fn = TITLES.get(name, (name, None))
        parts.append(f"## {title}\n")
        if "error" in s:
            parts.append(f"Failed: `{s['error']}`\n")
            continue
        when = f"{s['run_date'][:10]}, host `{s.get('run_host')}`, " if "run_date" in s else ""
        meta = f"*{when}{s.get('wall_seconds')} s wall, peak RSS {s.get('peak_rss_mb')} MB.*"
        try:
            body = fn(s) if fn else "```\n" + str(s)[:2000] + "\n```"
        except (KeyError, TypeError, StopIteration) as e:  # an older JSON: show the raw section, not a crash
            body = f"(could not render: {e!r})\n```\n{str(s)[:2000]}\n```"
        pic = f"\n\n![{title} chart]({charts[name]})" if name in charts else ""
        parts.append(body + pic + anchors(name) + "\n\n" + meta + "\n")
    return "\n".join(parts)
