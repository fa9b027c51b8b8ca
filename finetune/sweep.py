"""The paraphrase sweep (``python -m finetune sweep``): closed-book accuracy against re-wordings per question.

One data build at the largest count is cut to nested sets (``finetune.data.cut_paraphrases``: the n=2 rows are
inside the n=4 rows), then one training run and one evaluation per count; the base model is evaluated once. With
``steps`` every count gets the same number of updates, so fewer wordings means more repetitions of each: the
comparison behind "facts stick only when seen in many phrasings". Writes ``sweep.json`` (each count's scores with
95% intervals, and its difference from the fewest wordings) and ``sweep.png``. Left out on purpose: sweeping any
other setting, and several seeds per count.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from finetune import train as T
from finetune.data import DataConfig, build, cut_paraphrases, load_built
from finetune.evaluate import EvalConfig, evaluate_model, intervals, model_to_score, question_sets
from finetune.lora import adapter_dir
from rag.config import artefacts, provenance

log = logging.getLogger(__name__)
SWEPT = ("contains", "f1", "hallucination_rate")  # per question set, in sweep.json; the plot shows contains


def versus(tuned: dict, other: dict) -> dict:
    """Per answerable question set: tuned − other "contains", paired over the same questions, 95% interval
    (``intervals`` with ``other`` in the base model's place)."""
    return {name: iv["tuned_minus_base"] for name, iv in intervals(other, tuned).items()}


def sweep_lines(rows: list[dict]) -> list[str]:
    """One line per paraphrase count: each set's tuned "contains" [95% CI], and the difference from the fewest."""
    def ci(v):
        return f"{v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]"

    return [f"{r['paraphrases']} re-wordings, {r['train_rows']} rows, {r['steps']} steps: " + "; ".join(
        f"{k} {ci(v['tuned'])}" + (f", minus {rows[0]['paraphrases']} re-wordings {ci(r['minus_fewest'][k])}"
                                   if i and k in r["minus_fewest"] else "")
        for k, v in r["intervals"].items()) for i, r in enumerate(rows)]


def sweep(docs: str, model: str, counts: list[int], epochs: float, steps: int, synthetic_chunks: int
          ) -> tuple[list[dict], Path]:
    """One training run and eval per paraphrase count in ``counts`` (ascending); the rows of ``sweep.json`` and
    the folder it and ``sweep.png`` were written to."""
    from datasets import Dataset
    from matplotlib.figure import Figure

    root = artefacts("finetune", docs) / "sweep"
    dcfg = DataConfig(docs=docs, model=model, paraphrases=counts[-1],
                      synthetic_chunks=synthetic_chunks, out=str(root / "data"))
    full = (load_built(dcfg) or build(dcfg))[0].to_list()  # the same rows again when a sweep is re-run
    rows, base, first = [], None, None
    for n in counts:
        train = Dataset.from_list(cut_paraphrases(full, n))
        # no eval slice: with one wording per question it would hold ~10% of the facts out of training (and not
        # out of the scored questions), a handicap the runs with more wordings would not share
        tcfg = T.TrainConfig(model=model, output_dir=str(root / f"p{n}"), epochs=epochs,
                             max_steps=steps, eval_fraction=0.0)
        m = T.train(tcfg, train).metrics
        ecfg = EvalConfig(docs=docs, model=model, adapter=tcfg.output_dir, data=dcfg.out, probes="",
                          general_text="")
        sets = question_sets(ecfg)
        base = base or evaluate_model(model_to_score(model, ecfg.max_new_tokens), ecfg, sets)
        tuned = evaluate_model(model_to_score(model, ecfg.max_new_tokens, str(adapter_dir(tcfg.output_dir))),
                               ecfg, sets)
        first = first or tuned
        rows.append({"paraphrases": n, "train_rows": len(train), "steps": m["steps"], "seconds": m["seconds"],
                     "passes_over_data": round(m["steps"] * tcfg.batch_size * tcfg.grad_accum / len(train), 2),
                     **{f"{k}_{metric}": v[metric] for k, v in tuned["qa"].items() for metric in SWEPT},
                     **{f"base_{k}_{metric}": v[metric] for k, v in base["qa"].items() for metric in SWEPT},
                     "intervals": intervals(base, tuned), "minus_fewest": versus(tuned, first)})
        log.info("sweep %s", rows[-1])
    fig = Figure(figsize=(6, 3.5))
    ax = fig.add_subplot()
    for key in [k for k in rows[0] if k.endswith("_contains") and not k.startswith("base_")]:
        name = key.removesuffix("_contains")
        cis = [r["intervals"].get(name, {}).get("tuned") for r in rows]
        if all(cis):  # error bars: the 95% bootstrap interval over that set's questions
            err = [[c[0] - c[1] for c in cis], [c[2] - c[0] for c in cis]]
            line = ax.errorbar(counts, [c[0] for c in cis], yerr=err, marker="o", capsize=3, label=name).lines[0]
        else:
            line = ax.plot(counts, [r[key] for r in rows], marker="o", label=name)[0]
        ax.axhline(rows[0][f"base_{key}"], ls=":", color=line.get_color())  # the untuned model on the same set
    ax.set(xlabel="paraphrases per question", ylabel="closed-book 'contains' accuracy",
           title=f"{model}, " + (f"{steps} steps each" if steps > 0 else f"{epochs:g} epochs")
           + " (dotted: base model)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(root / "sweep.png", dpi=120)
    (root / "sweep.json").write_text(json.dumps({"run": provenance(), "model": model, "rows": rows}, indent=1))
    return rows, root
