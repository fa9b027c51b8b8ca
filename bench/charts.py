"""PNG charts of a ``python -m bench`` results JSON, written beside RESULTS.md and linked from it.

Three pictures, each from one section of the JSON (nothing here measures): ``scale`` — query latency, memory and
index times against the number of chunks (1k/10k/100k); ``generation`` — decode tokens/s of every variant and
packaged model against its memory-bandwidth bound; ``training`` — LoRA training tokens/s and the matmul rate
achieved. Axes are logarithmic where the numbers span decades. The figure helpers are rag/plots.py's, shared with
the abstention plot of ``rag eval``. Left out on purpose: retrieval quality and governance, whose tables carry
confidence intervals a bar chart would hide.
"""

from __future__ import annotations

import logging
from pathlib import Path

from rag.plots import figure, save

log = logging.getLogger(__name__)

MODES = ("bm25", "dense", "hybrid", "hybrid+rerank")
COLOURS = {"bm25": "#4c72b0", "dense": "#55a868", "hybrid": "#8172b3", "hybrid+rerank": "#c44e52"}


def _log_axis(ax, axis: str = "y") -> None:
    """A log axis labelled in plain numbers (1, 10, 100 ms), not powers of ten."""
    from matplotlib.ticker import FuncFormatter

    getattr(ax, f"set_{axis}scale")("log")
    getattr(ax, f"{axis}axis").set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.10g}"))


def _labels(ax, xs: list, ys: list, colour: str, dy: int = 3) -> None:
    """Each point's value beside it, so the chart can be read without the table."""
    for x, v in zip(xs, ys, strict=True):
        if v is not None:
            ax.annotate(f"{v:,.0f}" if v >= 100 else f"{v:.1f}" if v >= 1 else f"{v:.2f}", (x, v), xytext=(4, dy),
                        textcoords="offset points", fontsize=7, color=colour)


def _line(ax, xs: list, ys: list, dy: int = -11, **kw) -> None:  # below right: these lines rise
    (line,) = ax.plot(xs, ys, **kw)
    _labels(ax, xs, ys, line.get_color(), dy)


def scale(s: dict):
    """Three panels against chunks: query p50 per mode (p95 as the bar's top), memory and disk, index times."""
    sizes = [r for r in s["sizes"].values() if "error" not in r]
    if not sizes:
        return None
    n = [r["chunks"] for r in sizes]
    fig = figure(13, 4.2)
    ax = fig.add_subplot(1, 3, 1)
    for m in MODES:
        p50 = [r["query_ms"][m]["p50_ms"] for r in sizes]
        p95 = [r["query_ms"][m]["p95_ms"] for r in sizes]
        ax.errorbar(n, p50, yerr=[[0] * len(n), [b - a for a, b in zip(p50, p95, strict=True)]], marker="o",
                    capsize=3, color=COLOURS[m], label=m)
        _labels(ax, n, p50, COLOURS[m], -8 if m == "dense" else 3)  # dense runs close under hybrid
    ax.set(title="query latency, one query at a time", xlabel="chunks in the index",
           ylabel="ms per query (p50; bar up to p95)")
    ax.legend(fontsize=8, loc="center left")
    ax = fig.add_subplot(1, 3, 2)
    _line(ax, n, [r.get("peak_rss_mb") for r in sizes], marker="o", label="peak RSS (build, queries, models)")
    _line(ax, n, [r["disk_mb"]["total"] for r in sizes], marker="s", label="index on disk")
    _line(ax, n, [r["disk_mb"].get("faiss.index") for r in sizes], marker=".", linestyle=":",
          label="of which the FAISS index")
    ax.set(title="memory and disk", xlabel="chunks in the index", ylabel="MB")
    ax.legend(fontsize=8, loc="lower right")
    ax = fig.add_subplot(1, 3, 3)
    build = [sum(r["seconds"].get(k, 0) for k in ("ingest", "chunk", "tokenize", "bm25_build", "faiss_build", "write"))
             for r in sizes]
    _line(ax, n, build, marker="o", label="build, embedding excluded (ingest → write)")
    _line(ax, n, [r["incremental_update"]["seconds"] for r in sizes], marker="s", label="update after 1 changed file")
    _line(ax, n, [r["seconds"]["load"] for r in sizes], marker="^", label="load from disk")
    ax.set(title="index times", xlabel="chunks in the index", ylabel="seconds")
    ax.legend(fontsize=8, loc="upper left")
    for ax in fig.axes:
        _log_axis(ax, "x")
        _log_axis(ax, "y")
        ax.set_xticks(n, [f"{r['chunks']:,}" for r in sizes])
        ax.margins(x=0.12)
        ax.grid(alpha=0.35, which="major")
        ax.grid(alpha=0.1, which="minor", axis="y")
    fig.suptitle(f"Scale: {s['vectors'].split(';')[0]}; larger indexes repeat them (query and memory costs are "
                 "real, build rates exclude embedding)", fontsize=9)
    return fig


def generation(s: dict):
    """Horizontal bars, one per variant and packaged model: decode tok/s, with its bandwidth bound as a tick."""
    rows = [(f"transformers · {name}", v) for name, v in s["variants"].items() if "error" not in v]
    llama = s.get("llamacpp", {})
    rows += [(f"llama.cpp · {name} ({v['gguf_mb']:.0f} MB GGUF)", v)
             for name, v in llama.items() if "skipped" not in v and "error" not in v]
    if not rows:
        return None
    fig = figure(10, 0.42 * len(rows) + 1.9)
    ax = fig.add_subplot()
    y = list(range(len(rows)))[::-1]  # the first variant on top
    colours = ["#dd8452" if name.startswith("llama.cpp") else "#4c72b0" for name, _ in rows]
    ax.barh(y, [v["decode_tok_s"] for _, v in rows], color=colours, height=0.6)
    ax.plot([v["bandwidth_bound_tok_s"] for _, v in rows], y, "|", color="black", markersize=16, markeredgewidth=2,
            label="bandwidth bound = bandwidth ÷ weight bytes")
    for yi, (_, v) in zip(y, rows, strict=True):
        ax.annotate(f"{v['decode_tok_s']:.1f} tok/s = {v['ratio_to_bound']:.0%} of {v['bandwidth_bound_tok_s']:.0f}",
                    (max(v["decode_tok_s"], v["bandwidth_bound_tok_s"]), yi), xytext=(8, 0),
                    textcoords="offset points", va="center", fontsize=7)
    ax.set_yticks(y, [name for name, _ in rows], fontsize=8)
    _log_axis(ax, "x")
    lo = min(v["decode_tok_s"] for _, v in rows)
    ax.set_xlim(lo / 2, max(v["bandwidth_bound_tok_s"] for _, v in rows) * 6)  # room for the labels on the right
    skipped = [f"llama.cpp · {name} skipped (reason in the table below)" for name, v in llama.items() if "skipped" in v]
    ax.set_xlabel("decode tokens/s, log scale" + ("\n" + "; ".join(skipped) if skipped else ""), fontsize=9)
    fig.suptitle(f"Generation: decode speed against the memory-bandwidth bound ({s['memory_bandwidth_gbs']} GB/s)\n"
                 f"transformers: {s['model']}, {s['base_weight_mb']:.0f} MB fp32; llama.cpp: 4-bit GGUF files; "
                 f"{s['new_tokens']} new tokens, median of {s['repeats']}", fontsize=10)
    ax.grid(alpha=0.3, axis="x", which="both")
    ax.legend(fontsize=8, loc="lower right")
    return fig


def training(s: dict):
    """Two panels per training config: tokens/s (padded and non-pad), and GFLOP/s against the matmul rate."""
    names = list(s["configs"])
    if not names:
        return None
    c = [s["configs"][k] for k in names]
    fig = figure(11, 3.8)
    ax = fig.add_subplot(1, 2, 1)
    x = range(len(names))
    for off, key, label in ((-0.2, "steady_tokens_per_second", "tokens/s, padded (steady steps)"),
                            (0.2, "trainer_tokens_per_second", "tokens/s, non-pad (trainer's count)")):
        bars = ax.bar([i + off for i in x], [r[key] for r in c], width=0.4, label=label)
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_xticks(list(x), [f"{k}\n{r['seconds_per_step_median']:.1f} s/step, {r['padded_tokens_per_step']:.0f} "
                            f"tokens/step" for k, r in zip(names, c, strict=True)], fontsize=8)
    ax.set(ylabel="tokens per second", title=f"training throughput ({s['threads']} threads)",
           ylim=(0, max(max(r["steady_tokens_per_second"], r["trainer_tokens_per_second"]) for r in c) * 1.3))
    ax.legend(fontsize=8, loc="upper center", ncols=2)
    ax = fig.add_subplot(1, 2, 2)
    bars = ax.bar(list(x), [r["achieved_gflops"] for r in c], width=0.5, color="#55a868")
    ax.bar_label(bars, labels=[f"{r['achieved_gflops']:.1f} ({r['ratio_to_matmul_peak']:.0%})" for r in c],
                 fontsize=8)
    ax.axhline(s["matmul_gflops_fp32"], color="black", linestyle="--", linewidth=1,
               label=f"fp32 matmul rate {s['matmul_gflops_fp32']} GFLOP/s")
    ax.set_xticks(list(x), names, fontsize=8)
    ax.set(ylabel="GFLOP/s", ylim=(0, s["matmul_gflops_fp32"] * 1.15),
           title="achieved FLOP rate (share of the matmul rate)")
    ax.legend(fontsize=8, loc="upper right")
    fig.suptitle(f"Fine-tuning: LoRA, {c[0]['trainable_params']:,} of {c[0]['total_params']:,} parameters trainable "
                 f"({c[0]['trainable_params'] / c[0]['total_params']:.2%}); batch {c[0]['batch_size']}, at most "
                 f"{c[0]['max_length']} tokens a row", fontsize=10)
    return fig


# section -> its chart: a Figure, or None when every size or variant of the section failed
CHARTS = {"scale": scale, "generation": generation, "training": training}


def chart_name(markdown: str | Path, section: str) -> str:
    """The file name of a section's chart beside ``markdown``: RESULTS.md → RESULTS-scale.png."""
    return f"{Path(markdown).stem}-{section}.png"


def write_charts(res: dict, markdown: str | Path) -> dict[str, str]:
    """Draw every section of ``res`` that has a chart and something measured, beside ``markdown``; section → file
    name (relative to the markdown's folder, as RESULTS.md links it)."""
    out = {}
    for name, fn in CHARTS.items():
        s = res.get("sections", {}).get(name)
        if not s or "error" in s:
            continue
        try:
            fig = fn(s)
        except (KeyError, TypeError, ValueError) as e:  # an older JSON shape: the tables still render, no chart
            log.warning("no %s chart: %r", name, e)
            continue
        if fig is None:  # every size or variant of the section failed: nothing to draw
            continue
        save(fig, Path(markdown).parent / chart_name(markdown, name))
        out[name] = chart_name(markdown, name)
    return out
