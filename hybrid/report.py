"""The comparison as a terminal table, a Markdown report and a self-contained HTML page with charts.

Renders what ``hybrid.compare`` measured and what ``hybrid.decision`` concludes from it (the decision matrix and
the break-even of training against RAG's longer prompts); this module computes nothing new. The HTML is the
report's own Markdown turned into a page with its PNG charts inlined, so it opens from disk with no server and
no network. Left out on purpose: a Markdown library (the report's Markdown is a small known subset) and
interactive charts.
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
from pathlib import Path

from hybrid.decision import TRAIN_COST_FACTOR, break_even, decision_matrix
from hybrid.systems import METRICS
from rag.config import stamped
from rag.metrics import spread


def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, dict) and "mean" in v:
        lo, hi = v["ci"]
        return f"{v['mean']:.{digits}f} [{lo:.2f}, {hi:.2f}]"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _digits(factor: str) -> int:
    """Decimals for a decision-matrix row: dollars per query are tiny, milliseconds and seconds need none."""
    return 6 if "USD" in factor else 0 if " ms " in factor or " s " in factor else 3


def markdown(result: dict, charts: list[str] = ()) -> str:
    """The report as Markdown (``charts`` are image file names placed beside it)."""
    st, sys_ = result["settings"], result["systems"]
    names = list(sys_)
    lines = [f"# openbook comparison — {st['docs']}", "",
             f"{st['n']} questions ({st['n_answerable']} answerable) from the {st['questions']}; generator "
             f"{st['model']}. Means with 95% bootstrap intervals over questions. Faithfulness: {st['faithfulness']}.",
             "", "| metric | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    if st.get("answers_reused"):  # hybrid/resume.py: same questions, settings, index, adapter and code
        lines[4:4] = ["Answers re-used from an earlier run with the same inputs and code: " + ", ".join(
            f"{label} (answered {when})" for label, when in st["answers_reused"].items()) + ".", ""]
    for k in (*METRICS, "abstain_precision", "abstain_recall", "prompt_tokens", "new_tokens"):
        lines.append(f"| {k.replace('_', ' ')} | " + " | ".join(_fmt(sys_[s].get(k)) for s in names) + " |")
    lines.append("| latency p50 / p95 ms | " + " | ".join(
        f"{sys_[s]['latency_ms'].get('total', {}).get('p50', 0):.0f} / "
        f"{sys_[s]['latency_ms'].get('total', {}).get('p95', 0):.0f}" for s in names) + " |")
    ref = result["differences_vs"]
    lines += ["", f"Differences from {ref} (paired bootstrap, 95%; * = interval excludes zero):", ""]
    for s, d in result["differences"].items():
        lines.append(f"- {s}: " + "; ".join(f"{m} {v['diff']:+.3f} [{v['ci'][0]:+.3f}, {v['ci'][1]:+.3f}]"
                                             f"{' *' if v['significant'] else ''}" for m, v in d.items()))
    if result.get("pairwise"):
        lines += ["", "Every pair (later minus earlier system; contains, paired bootstrap 95%; * = excludes zero):", ""]
        for pair, v in result["pairwise"].items():
            c = v["contains"]
            lines.append(f"- {pair}: {c['diff']:+.3f} [{c['ci'][0]:+.3f}, {c['ci'][1]:+.3f}]"
                         f"{' *' if c['significant'] else ''}")
    if result.get("seeds"):
        n = next(iter(result["seeds"].values()))["n"]
        lines += ["", f"## Over {n} training seeds", "",
                  "The adapter systems re-trained with other seeds on the same data: mean ± sd [min, max] over "
                  f"seeds, and in how many of the {n} seeds the difference from {ref} was significant.", "",
                  "| system | contains | hallucination rate | citation accuracy | significant vs "
                  f"{ref} (contains / halluc.) |", "|---|---|---|---|---|"]
        for s, v in result["seeds"].items():
            cell = [spread(v[m]) if m in v else "–" for m in ("contains", "hallucination_rate", "citation_accuracy")]
            sig = v.get("significant_vs_ref", {})
            lines.append(f"| {s} | " + " | ".join(cell) + f" | {sig.get('contains', '–')}/{n} / "
                         f"{sig.get('hallucination_rate', '–')}/{n} |")
        vs = result["seeds"].get("finetuned+rag", {}).get("vs_finetuned")
        if vs:
            each = "; ".join(f"seed {i} {d['diff']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}]"
                             for i, d in enumerate(vs))
            above = sum(d["significant"] and d["diff"] > 0 for d in vs)
            lines += ["", f"finetuned+rag − finetuned with the same seed's adapter, contains (paired, 95%): {each} — "
                      f"above it in {above} of {n}."]
    if result.get("context_probes"):
        lines += ["", "## Where did the answer come from?", "",
                  "Questions whose retrieved passages hold the answer, re-asked with no context, with another "
                  "question's passages, and with the answer value edited in the passages (counterfactual).", "",
                  "| system | n | no context: correct | unrelated context: correct | counterfactual: follows "
                  "passage | counterfactual: says original |", "|---|---|---|---|---|---|"]
        for s, p in result["context_probes"].items():
            lines.append(f"| {s} | {p['n']} | {p['none_contains']:.3f} | {p['unrelated_contains']:.3f} | "
                         f"{p['follows_context']:.3f} | {p['follows_weights']:.3f} |")
    if result.get("freshness"):
        f = result["freshness"]
        lines += ["", "## Freshness", "", f"{f['edits']} edits applied to a copy; incremental re-index "
                  f"{f['reindex_s']:.1f} s ({f['reembedded_chunks']} chunks re-embedded); {f['questions']} "
                  f"questions about the changed facts; the new value was in the passages retrieval gave the "
                  f"generator for {f['retrieved_new']:.0%} of them.", "",
                  "| system | new value | old value (stale) | update |", "|---|---|---|---|"]
        for s, v in f["systems"].items():
            upd = "–" if v["update_s"] is None else f"{v['update']} {v['update_s']:.1f} s"
            lines.append(f"| {s} | {v['fresh']:.3f} | {v['stale']:.3f} | {upd} |")
        over = {s: v["seeds"] for s, v in f["systems"].items() if v.get("seeds")}
        if over:
            n = len(next(iter(over.values()))["fresh"]["per_seed"])
            lines += ["", f"Over {n} training seeds (the table above is seed 0's adapters), mean ± sd [min, max]:",
                      "", "| system | new value | old value (stale) |", "|---|---|---|"]
            lines += [f"| {s} | {spread(v['fresh'])} | {spread(v['stale'])} |" for s, v in over.items()]
    setup = result["setup"]
    size = setup["index"]["size_mb"]
    lines += ["", "## Set-up cost", "", f"- index: fresh build {setup['index']['build_s']:.1f} s, "
              + ("size on the Milvus server" if size is None else f"{size} MB")]
    for k in ("finetuned", "raft"):
        if k in setup:
            data = "not recorded" if setup[k].get("data_s") is None else f"{setup[k]['data_s']:.0f} s"
            lines.append(f"- {k} adapter: data {data}, training {setup[k]['train_s']:.0f} s "
                         f"({setup[k]['train_tokens']} tokens), {setup[k]['adapter_mb']} MB")
    lines += ["", "## Decision matrix (measured on this corpus)", "", *decision_lines(result)]
    if result.get("seconds"):
        took = result["seconds"]
        lines += ["", f"Time: {sum(took.values()) / 60:.1f} min — " + ", ".join(
            f"{stage} {s / 60:.1f}" for stage, s in took.items()) + " (min)."]
    lines += [""] + [f"![{c}]({c})" for c in charts]
    return "\n".join(lines) + "\n"


def decision_lines(result: dict, labels: dict | None = None) -> list[str]:
    """The decision matrix as Markdown table rows, then the break-even sentence (the README renders it too)."""
    names, labels = list(result["systems"]), labels or {}
    lines = ["| factor | " + " | ".join(labels.get(s, s) for s in names) + " | wins here |",
             "|---" * (len(names) + 2) + "|"]

    def named(wins: str) -> str:  # "tie: finetuned, hybrid" in the columns' own names
        return re.sub(r"[\w+]+", lambda m: labels.get(m.group(), m.group()), wins)

    for r in decision_matrix(result):
        lines.append(f"| {r['factor']} | " + " | ".join(
            _fmt(r["values"].get(s), _digits(r["factor"])) for s in names) + f" | {named(r['wins'])} |")
    be = break_even(result)
    if be:
        q = "never (fine-tuned prompts are not shorter)" if be["queries"] is None else f"{be['queries']:,} queries"
        lines += ["", f"Break-even: fine-tuning costs about {be['one_time_usd']:.4f} USD of training compute "
                  f"(training tokens × {TRAIN_COST_FACTOR} at {be['price_per_mtok']} USD per million tokens) and "
                  f"saves {be['saving_per_query_usd']:.6f} USD per query against RAG's longer prompts: repaid "
                  f"after {q}. Accuracy is not part of this sum — see the table above."]
    return lines


def charts(result: dict) -> dict[str, bytes]:
    """PNG bar charts: accuracy and hallucination with intervals, and latency per stage."""
    from matplotlib.figure import Figure

    sys_ = result["systems"]
    names = list(sys_)
    out = {}
    fig = Figure(figsize=(7, 3.4))
    for i, key in enumerate(("contains", "hallucination_rate")):
        ax = fig.add_subplot(1, 2, i + 1)
        vals = [sys_[s][key] for s in names]
        means = [v["mean"] if v else 0 for v in vals]
        err = [[m - (v["ci"][0] if v else 0) for m, v in zip(means, vals, strict=True)],
               [(v["ci"][1] if v else 0) - m for m, v in zip(means, vals, strict=True)]]
        ax.bar(names, means, yerr=err, capsize=3, color="#4c72b0" if i == 0 else "#c44e52")
        ax.set(title=key.replace("_", " "), ylim=(0, 1))
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    fig.tight_layout()
    out["accuracy.png"] = _png(fig)
    fig = Figure(figsize=(7, 3.4))
    ax = fig.add_subplot()
    bottom = [0.0] * len(names)
    for stage in ("retrieve", "rerank", "generate"):
        vals = [sys_[s]["latency_ms"].get(stage, {}).get("p50", 0) for s in names]
        ax.bar(names, vals, bottom=bottom, label=stage)
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    ax.set(title="latency p50 per stage (ms, one query at a time)")
    ax.legend()
    ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    fig.tight_layout()
    out["latency.png"] = _png(fig)
    return out


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def write(result: dict, out_dir: str | Path) -> dict[str, Path]:
    """compare.json, report.md (+ PNGs) and a self-contained report.html (images inlined) in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pngs = charts(result)
    for name, data in pngs.items():
        (out / name).write_bytes(data)
    md = markdown(result, list(pngs))
    (out / "report.md").write_text(md, encoding="utf-8")
    (out / "compare.json").write_text(json.dumps(stamped(result), indent=1, ensure_ascii=False), encoding="utf-8")
    (out / "report.html").write_text(_html(md, pngs), encoding="utf-8")
    return {"json": out / "compare.json", "markdown": out / "report.md", "html": out / "report.html"}


def _html(md: str, pngs: dict[str, bytes]) -> str:
    """A minimal Markdown → HTML for this report's own Markdown (headings, tables, lists, images)."""
    body, table, listing = [], False, False
    for line in md.splitlines():
        if listing and not line.startswith("- "):
            body.append("</ul>")
            listing = False
        if line.startswith("|"):
            cells = [html.escape(c.strip()) for c in line.strip("|").split("|")]
            if set("".join(cells)) <= set("-"):
                continue
            tag = "th" if not table else "td"
            body.append(("<table>" if not table else "") + "<tr>" + "".join(f"<{tag}>{c}</{tag}>" for c in cells)
                        + "</tr>")
            table = True
            continue
        if table:
            body.append("</table>")
            table = False
        if line.startswith("!["):
            name = line[line.index("(") + 1:-1]
            body.append(f'<img alt="{html.escape(name)}" src="data:image/png;base64,'
                        f'{base64.b64encode(pngs[name]).decode()}">')
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{html.escape(line.lstrip('# '))}</h{level}>")
        elif line.startswith("- "):
            body.append(("" if listing else "<ul>") + f"<li>{html.escape(line[2:])}</li>")
            listing = True
        elif line.strip():
            body.append(f"<p>{html.escape(line)}</p>")
    body.append("</table>" if table else "</ul>" if listing else "")
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.3em .6em;"
             "font-size:.9em;text-align:right}td:first-child,th:first-child{text-align:left}img{max-width:100%}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>openbook comparison</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n")


def print_terminal(result: dict) -> None:
    """The main table and the decision matrix, in the terminal."""
    from rich.console import Console
    from rich.table import Table

    con, sys_ = Console(), result["systems"]
    t = Table(title=f"{result['settings']['n']} questions — {result['settings']['questions']}")
    t.add_column("metric")
    for s in sys_:
        t.add_column(s, justify="right")
    for k in (*METRICS, "abstain_precision", "abstain_recall", "prompt_tokens", "new_tokens"):
        t.add_row(k.replace("_", " "), *(_fmt(sys_[s].get(k)) for s in sys_))
    t.add_row("latency p50 ms", *(_fmt(sys_[s]["latency_ms"].get("total", {}).get("p50"), 0) for s in sys_))
    con.print(t)
    if result.get("seeds"):
        sd = Table(title="over training seeds: mean ± sd [min, max]")
        fresh = {s: v["seeds"]["fresh"] for s, v in result.get("freshness", {}).get("systems", {}).items()
                 if v.get("seeds")}
        for c in ("system", "contains", "hallucination rate", *(["new value after edits"] if fresh else [])):
            sd.add_column(c, justify="left" if c == "system" else "right")
        for s, v in result["seeds"].items():
            sd.add_row(s, *(spread(v[k]) if k in v else "–" for k in ("contains", "hallucination_rate")),
                       *([spread(fresh[s]) if s in fresh else "–"] if fresh else []))
        con.print(sd)
    m = Table(title="decision matrix (measured here)")
    m.add_column("factor")
    for s in sys_:
        m.add_column(s, justify="right")
    m.add_column("wins here")
    for r in decision_matrix(result):
        m.add_row(r["factor"], *(_fmt(r["values"].get(s), _digits(r["factor"])) for s in sys_),
                  r["wins"])
    con.print(m)
