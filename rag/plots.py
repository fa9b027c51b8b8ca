"""Pictures from the JSON the runs write: the abstention precision/recall-vs-threshold plot of ``rag eval --json``,
and the figure helpers ``bench/charts.py`` draws its benchmark charts with.

Every picture is drawn from a saved report, never from a live run, so it can be redrawn from the JSON alone:

    python -m rag.plots .openbook/reports/rag-eval.json docs/abstention-pr.png

Matplotlib's Agg canvas, no pyplot: no global backend state, no display needed. Left out on purpose: the ROC
curves themselves (the report already gives each signal's ROC AUC) and interactive output.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from rag.abstain import SIGNALS, parse_rule

LABELS = {"rerank": "re-ranker score (best passage)", "bm25": "BM25 score (best passage)",
          "dense": "cosine similarity (best passage)", "judge": "reader's yes/no log-odds"}


def figure(width: float, height: float):
    """A Matplotlib figure on the Agg canvas (PNG without a display or pyplot's global state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save(fig, path: str | Path, dpi: int = 110) -> Path:
    """Write ``fig`` as a PNG (creating its folder) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=dpi)
    return path


def threshold_curve(scores: list[float], unanswerable: list[bool]) -> list[tuple[float, float | None, float]]:
    """Precision and recall of abstaining (unanswerable = positive) when a question abstains with ``score < t``,
    for ``t`` just above each observed score: ``(score, precision, recall)``, lowest score first.

    >>> threshold_curve([0.9, 0.2, 0.5, 0.1], [False, True, False, True])
    [(0.1, 1.0, 0.5), (0.2, 1.0, 1.0), (0.5, 0.6666666666666666, 1.0), (0.9, 0.5, 1.0)]
    """
    pairs = sorted(zip(scores, unanswerable, strict=True))
    total = sum(unanswerable)
    out, abstained, caught = [], 0, 0
    for i, (s, u) in enumerate(pairs):
        abstained, caught = abstained + 1, caught + u
        if i + 1 == len(pairs) or pairs[i + 1][0] != s:  # tied scores abstain together
            out.append((s, caught / abstained, caught / total if total else math.nan))
    return out


def _rule(settings: dict) -> list:
    """The abstention rule the run used: the calibrated one, or the one given with --abstain."""
    cal = settings.get("calibration") or {}
    if cal.get("rule"):
        return [tuple(r) for r in cal["rule"]]
    given = settings.get("abstain", "none")
    return parse_rule(given) if given not in ("none", "calibrated") else []


def abstention_plot(result: dict, path: str | Path) -> Path | None:
    """One panel per abstention signal: precision and recall of abstaining against the signal's threshold, on the
    evaluated split, with the run's rule marked. None (nothing written) when the report has no answers or not
    both answerable and unanswerable questions."""
    rows = [r for r in result.get("per_question", []) if "signals" in r]
    truth = [r["expected_answer"] is None for r in rows]
    if not rows or all(truth) or not any(truth):
        return None
    names = [n for n in SIGNALS if any(n in r["signals"] for r in rows)]
    if not names:
        return None
    rule, s = _rule(result["settings"]), result["settings"]
    nrows = math.ceil(len(names) / 2)
    fig = figure(10, 2.9 * nrows + 1.2)
    for i, name in enumerate(names):
        ax = fig.add_subplot(nrows, 2, i + 1)
        # a question without this score (BM25 when no query word occurs) never abstains on it, as in the pipeline
        scores = [r["signals"].get(name, math.inf) for r in rows]
        have = [(v, u) for v, u in zip(scores, truth, strict=True) if v != math.inf]
        curve = [c for c in threshold_curve(scores, truth) if c[0] != math.inf]
        xs = [c[0] for c in curve]
        ax.step(xs, [c[1] for c in curve], where="post", color="#4c72b0",
                label="precision: share of abstentions that were unanswerable")
        ax.step(xs, [c[2] for c in curve], where="post", color="#dd8452",
                label="recall: share of unanswerable questions that abstained")
        # the questions themselves, as ticks along the bottom: where each kind sits on this signal's scale
        for kind, y, colour in ((True, -0.07, "#c44e52"), (False, -0.14, "#777777")):
            ax.plot([v for v, u in have if u == kind], [y] * sum(u == kind for _, u in have), "|", color=colour,
                    markersize=7, label="each unanswerable question" if kind else "each answerable question")
        for n, t in rule:
            if n == name:
                ax.axvline(t, color="black", linestyle="--", linewidth=1, label="the run's rule threshold")
                ax.annotate(f"{n} < {t:.3g}", (t, 1.0), xytext=(4, -2), textcoords="offset points", fontsize=8,
                            va="top")
        auc = result.get("signal_auc", {}).get(name)
        ax.set(xlabel=f"{LABELS.get(name, name)}: abstain when below", ylim=(-0.2, 1.05),
               title=f"{name}" + (f" — ROC AUC {auc:.2f}" if auc is not None else "") + f", n={len(have)}"
               + (f" ({len(rows) - len(have)} without a score)" if len(have) < len(rows) else ""))
        ax.set_yticks([0, 0.25, 0.5, 0.75, 1.0])
        ax.grid(alpha=0.3)
    handles = {}
    for ax in fig.axes:  # one legend for every panel, below them, so it hides no curve
        for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, h)
    fig.legend(handles.values(), handles.keys(), loc="outside lower center", ncols=3, fontsize=8, frameon=False)
    a = result.get("answers", {})
    p, r = a.get("abstain_precision"), a.get("abstain_recall")
    rule_text = " or ".join(f"{n} < {t:.3g}" for n, t in rule) or "none"
    fig.suptitle(f"Abstention on the {s.get('split', '?')} split: {len(rows)} questions, {sum(truth)} unanswerable; "
                 f"reader {s.get('model', '?')}\nthe run's rule: abstain when {rule_text}"
                 + (f" → precision {p:.2f}, recall {r:.2f}" if p is not None and r is not None else ""), fontsize=10)
    return save(fig, path)


def beside(json_path: str | Path) -> Path:
    """Where the abstention plot of a report goes: ``rag-eval.json`` → ``rag-eval-abstention.png``."""
    p = Path(json_path)
    return p.with_name(p.stem + "-abstention.png")


def plot_beside(result: dict, json_path: str | Path) -> Path | None:
    """The abstention plot of a report just written to ``json_path``, beside it (said, like the report)."""
    out = abstention_plot(result, beside(json_path))
    if out is not None:
        print(f"wrote {out}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rag.plots", description=__doc__.splitlines()[0])
    ap.add_argument("report", help="a JSON report written by `rag eval --json` (or `rag demo`)")
    ap.add_argument("out", nargs="?", help="the PNG to write (default: beside the report, *-abstention.png)")
    a = ap.parse_args(argv)
    try:
        result = json.loads(Path(a.report).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        print(f"error: {a.report}: {e}", file=sys.stderr)
        return 2
    out = abstention_plot(result, a.out or beside(a.report))
    if out is None:
        print(f"error: {a.report}: no answers with both answerable and unanswerable questions to plot",
              file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
