"""README tables rendered from the JSON results of the runs, so no number in them is typed by hand.

Each table sits in README.md between ``<!-- results:NAME -->`` and ``<!-- /results -->``; ``NAME`` picks a renderer
in ``TABLES`` and the JSON file in ``docs/results/`` it reads (a copy of what the run wrote, with the run's
provenance under "run"). ``python -m bench.readme`` (``make docs``) rewrites the marked sections;
``--check`` exits 1 when README and the JSON disagree (``tests/test_docs.py`` runs it). Tables without a marker
are older measurements whose JSON was not kept; the README says so beside them. A little over 300 lines on
purpose: one small renderer per table, beside the one registry the README's markers name.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from rag.abstain import parse_rule
from rag.metrics import spread

RESULTS = Path("docs/results")
MARKER = re.compile(r"(<!-- results:(?P<name>[\w.-]+) -->\n)(?P<body>.*?)(<!-- /results -->)", re.S)


def ci(v: list | None, digits: int = 3) -> str:
    """``mean [lo, hi]`` from ``[mean, lo, hi]``."""
    return "–" if v is None else f"{v[0]:.{digits}f} [{v[1]:.{digits}f}, {v[2]:.{digits}f}]"


def signed(v: list | None) -> str:
    return "–" if v is None else f"{v[0]:+.3f} [{v[1]:+.3f}, {v[2]:+.3f}]"


def num(v, digits: int = 3) -> str:
    return "–" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def source(d: dict) -> str:
    """The run a table comes from, in one line: date, command, commit, machine."""
    r = d.get("run", {})
    return (f"*{r.get('date', '?')[:10]}, `{r.get('command', '?')}` at {r.get('git') or '?'}, {r.get('cores', '?')} "
            f"cores ({r.get('cpu', '?')}); JSON: `{d['_path']}`*")


QA_SETS = {"golden_train": "golden **train**, {n} answerable", "golden_test": "golden **test**, {n} answerable "
           "(same facts, other words)", "synthetic_train": "synthetic, {n} trained on",
           "synthetic_test": "synthetic, {n} held out by chunk (facts never trained on)"}


def finetune_contains(d: dict) -> str:
    """Closed-book contains per question set: base, tuned, paired difference (95% bootstrap)."""
    rows = ["| closed-book, contains (95% bootstrap) | base | tuned | tuned − base (paired) |", "|---|---|---|---|"]
    for name, label in QA_SETS.items():
        iv = d["intervals"].get(name)
        if iv:
            rows.append(f"| {label.format(n=iv['n'])} | {ci(iv['base'])} | **{iv['tuned'][0]:.3f}** "
                        f"[{iv['tuned'][1]:.3f}, {iv['tuned'][2]:.3f}] | {signed(iv['tuned_minus_base'])} |")
    return "\n".join([*rows, "", source(d)])


def finetune_scores(d: dict) -> str:
    """The other closed-book scores on the golden test and train questions (answerable and not)."""
    b, t = d["base"]["qa"], d["tuned"]["qa"]
    head = (f"| closed-book, other scores | base test ({b['golden_test']['n']}) | tuned test | base train "
            f"({b['golden_train']['n']}) | tuned train |")
    rows = [head, "|---|---|---|---|---|"]
    for key, label in (("f1", "token F1"), ("hallucination_rate", "hallucination rate"),
                       ("format_consistency", "format consistency")):
        rows.append(f"| {label} | " + " | ".join(num(m[s][key]) for s in ("golden_test", "golden_train")
                                                  for m in (b, t)) + " |")
    rows.append("| abstain precision / recall | " + " | ".join(
        f"{num(m[s]['abstain_precision'], 2)} / {num(m[s]['abstain_recall'], 2)}"
        for s in ("golden_test", "golden_train") for m in (b, t)) + " |")
    pb, pt = d["base"].get("probes", {}), d["tuned"].get("probes", {})
    if pb:
        rows.append("| general probes (all / knowledge) | " + f"{num(pb['accuracy'])} / {num(pb['knowledge'], 2)} | "
                    f"{num(pt['accuracy'])} / {num(pt['knowledge'], 2)} | | |")
    if "perplexity_general" in d["base"]:
        rows.append(f"| perplexity on general text | {num(d['base']['perplexity_general'], 1)} | "
                    f"{num(d['tuned']['perplexity_general'], 1)} | | |")
    return "\n".join([*rows, "", source(d)])


def finetune_runs(ds: list[dict]) -> str:
    """One row per fine-tuning run of a model: its data and steps, closed-book contains, general skills."""
    rows = ["| run | training | train contains | test contains | probes | instruction | knowledge | "
            "perplexity |", "|---|---|---|---|---|---|---|---|"]
    first = ds[0]
    pb = first["base"]["probes"]
    rows.append(f"| base model | – | {ci(first['intervals']['golden_train']['base'])} | "
                f"{ci(first['intervals']['golden_test']['base'])} | {num(pb['accuracy'])} | "
                f"{num(pb['instruction'], 2)} | {num(pb['knowledge'], 2)} | "
                f"{num(first['base']['perplexity_general'], 1)} |")
    for d in ds:
        t, iv, m = d["tuned"], d["intervals"], d.get("training")
        q = d["settings"]["questions"]
        data = d.get("data") or {}
        # runs from before finetune run saved its data stats say so in their file name
        replay = data.get("general") if data else "-replay-" in Path(d["_path"]).name
        general = "with replay" if replay else "no replay"
        how = (f"{m['steps']} steps, {m['seconds'] / 60:.1f} min" if m else "see the text")
        if m and m.get("trainable_params"):  # every block's adapters or the top half's (--lora-layers)
            how += f", {m['trainable_params'] / 1e6:.1f}M LoRA weights"
        when = d.get("run", {}).get("date", "")[5:10]  # runs with the same settings differ by their date
        if sum(o.get("run", {}).get("date", "")[5:10] == when for o in ds) > 1:  # or, the same day, their time
            when += " " + d["run"]["date"][11:16]
        cpu = d.get("run", {}).get("cpu", "")
        if cpu and cpu != first.get("run", {}).get("cpu"):  # another machine: its speed is not comparable
            when += f", {cpu}"
        rows.append(f"| tuned {when}, {general} ({q.get('synthetic_train', 0)} synthetic trained) | {how} | "
                    f"**{ci(iv['golden_train']['tuned'])}** | **{ci(iv['golden_test']['tuned'])}** | "
                    f"{num(t['probes']['accuracy'])} | {num(t['probes']['instruction'], 2)} | "
                    f"{num(t['probes']['knowledge'], 2)} | {num(t['perplexity_general'], 1)} |")
    return "\n".join([*rows, "", *(source(d) for d in ds)])


def sweep(d: dict) -> str:
    """Closed-book contains against the number of re-wordings per question, at equal training steps."""
    rows = ["| re-wordings per question | training rows | steps (passes) | golden train contains | golden test "
            f"contains | test: minus {d['rows'][0]['paraphrases']} re-wordings (paired) |", "|---|---|---|---|---|---|"]
    for i, r in enumerate(d["rows"]):
        iv, diff = r["intervals"], r.get("minus_fewest", {})
        rows.append(f"| {r['paraphrases']} | {r['train_rows']} | {r['steps']} ({r['passes_over_data']}) | "
                    f"{ci(iv['golden_train']['tuned'])} | {ci(iv['golden_test']['tuned'])} | "
                    f"{signed(diff.get('golden_test')) if i else '–'} |")
    b = d["rows"][0]["intervals"]
    rows += ["", f"Base model: train {b['golden_train']['base'][0]:.3f}, test {b['golden_test']['base'][0]:.3f}. "
             + source(d)]
    return "\n".join(rows)


def chunking(d: dict) -> str:
    """Retrieval on the golden test split per chunking set-up (recall@5 and nDCG@10 per mode)."""
    modes = d["modes"]
    rows = ["| chunking | chunks | " + " | ".join(f"{m} R@5 / nDCG@10" for m in modes) + " |",
            "|---" * (len(modes) + 2) + "|"]
    for name, r in d["runs"].items():
        rows.append(f"| {name} | {r['chunks']} | " + " | ".join(
            f"{r['retrieval'][m]['recall@5']:.3f} / {r['retrieval'][m]['ndcg@10']:.3f}" for m in modes) + " |")
    return "\n".join([*rows, "", source(d)])


LABELS = {"base": "base", "finetuned": "fine-tuned", "rag": "RAG", "finetuned+rag": "fine-tuned + RAG",
          "hybrid": "hybrid (RAFT)"}


def compare(d: dict) -> str:
    """The five systems on the same questions (``make compare``): scores with intervals, tokens, latency."""
    sys_ = d["systems"]
    names, ref = list(sys_), d["differences_vs"]

    def mean_ci(v):
        return "–" if v is None else f"{v['mean']:.2f} [{v['ci'][0]:.2f}, {v['ci'][1]:.2f}]"

    def row(label, cells):
        return f"| {label} | " + " | ".join(cells) + " |"

    diff = d["differences"]
    rows = ["| | " + " | ".join(LABELS.get(s, s) for s in names) + " |", "|---" * (len(names) + 1) + "|",
            row("contains", [mean_ci(sys_[s]["contains"]) for s in names]),
            row(f"contains − {LABELS.get(ref, ref)} (paired)", [
                "–" if s == ref else f"{diff[s]['contains']['diff']:+.2f} [{diff[s]['contains']['ci'][0]:+.2f}, "
                f"{diff[s]['contains']['ci'][1]:+.2f}]" for s in names]),
            row("hallucination rate", [mean_ci(sys_[s]["hallucination_rate"]) for s in names]),
            row("citation accuracy", [mean_ci(sys_[s]["citation_accuracy"]) for s in names]),
            row("abstain precision / recall", [f"{num(sys_[s]['abstain_precision'], 2)} / "
                                               f"{num(sys_[s]['abstain_recall'], 2)}" for s in names]),
            row("format consistency", [mean_ci(sys_[s]["format_consistency"]) for s in names]),
            row("prompt / generated tokens", [f"{sys_[s]['prompt_tokens']:.0f} / {sys_[s]['new_tokens']:.0f}"
                                              for s in names]),
            row(f"latency p50 ms ({sys_[names[0]]['latency_n']} queries, one at a time)",
                [f"{sys_[s]['latency_ms']['total']['p50']:.0f}" for s in names]),
            row("general-probe change (forgetting)", [num(d.get("forgetting", {}).get(s), 2) for s in names])]
    fresh = d.get("freshness") or {}
    if fresh.get("systems"):  # claim 1: what each system says about a fact after its document changed
        n, got = fresh["questions"], fresh["systems"]
        rows.append(row(f"after {fresh['edits']} edits: new / old value ({n} changed facts)", [
            new_old(got[s]["fresh"], got[s]["stale"], n) if s in got else "–" for s in names]))
    if d.get("pairwise"):
        def pair(k, v):
            c = v["contains"]
            text = f"{k} {c['diff']:+.2f} [{c['ci'][0]:+.2f}, {c['ci'][1]:+.2f}]"
            return f"**{text}**" if c["significant"] else text

        rows += ["", "Every pair, contains (later − earlier, paired 95% bootstrap; **bold**: the interval excludes "
                 "zero): " + "; ".join(pair(k, v) for k, v in d["pairwise"].items()) + "."]
    return "\n".join([*rows, "", source(d)])


def new_old(fresh: float, stale: float, n: int) -> str:
    """Freshness shares of ``n`` changed facts as counts: new value / old value."""
    return f"{round(fresh * n)} / {round(stale * n)}"


def seeds(d: dict) -> str:
    """``make compare SEEDS=N``: each adapter system's spread over training seeds, and its difference from RAG; with
    ``--freshness``, each seed's count of new values after the edits too."""
    n = next(iter(d["seeds"].values()))["n"]
    fresh = d.get("freshness") or {}
    per_seed = {s: v["seeds"] for s, v in fresh.get("systems", {}).items() if v.get("seeds")}
    q = fresh.get("questions")
    rows = [f"| system, {n} training seeds | contains: mean ± sd [min, max] | contains per seed | contains − RAG per "
            "seed (paired) | seeds with the difference significant | hallucination rate: mean ± sd (seeds with "
            "its difference from RAG significant) |" + (f" after the edits: new / old value per seed (of {q}) |"
                                                         if per_seed else ""),
            "|---|---|---|---|---|---|" + ("---|" if per_seed else "")]
    for s, v in d["seeds"].items():
        c, h = v["contains"], v.get("hallucination_rate")
        f = per_seed.get(s)
        edits = (" " + ", ".join(new_old(a, b, q) for a, b in
                                 zip(f["fresh"]["per_seed"], f["stale"]["per_seed"], strict=True)) + " |"
                 if f else " – |" if per_seed else "")
        rows.append(f"| {LABELS.get(s, s)} | {spread(c)} | "
                    + ", ".join(f"{x:.3f}" for x in c["per_seed"]) + " | "
                    + ", ".join(f"{x:+.3f}" for x in v.get("diff_vs_ref", {}).get("contains", [])) + " | "
                    + f"{v.get('significant_vs_ref', {}).get('contains', '–')} of {n} | "
                    + (f"{h['mean']:.3f} ± {h['sd']:.3f} ("
                       f"{v.get('significant_vs_ref', {}).get('hallucination_rate', '–')} of {n})" if h else "–")
                    + " |" + edits)
    return "\n".join([*rows, "", source(d)])


def decision(d: dict) -> str:
    """The decision matrix ``make compare`` fills for the report (seed 0's systems), with its break-even sentence."""
    from hybrid.report import decision_lines  # the report's own rows, so README and report cannot disagree
    return "\n".join([*decision_lines(d, LABELS), "", source(d)])


def reliability(d: dict) -> str:
    """`make fuzz`: hostile folders through `rag index` (tests/fuzz.py) and the web page's load test (tests/load.py)."""
    cs, ld = d["case_seconds"], d.get("load") or {}
    rows = ["| check | result |", "|---|---|",
            f"| {d['cases']} hostile folders (seed {d['seed']}, {len(d['kinds'])} kinds, three a folder, each beside "
            f"a good document) through the real `rag index` | {d['passed']} passed: tracebacks {d['tracebacks']}, "
            f"hangs {d['hangs']} (over {d['timeout_s']:.0f} s), leaks {d['leaks']}, errors {d['errors']}, good "
            f"document missing {d['good_missing']}; {cs['median']:.1f} s a folder (median), {cs['max']:.1f} s at "
            f"most; {d['seconds'] / 60:.1f} min in all |"]
    if ld.get("started"):
        rows.append(f"| {ld['n']} questions at once to the web page's `/api/ask` ({ld['system']}, {ld['model']}, "
                    f"loopback) | errors {ld['errors']}; latency p50 {ld['p50_s']:.1f} s, p95 {ld['p95_s']:.1f} s, "
                    f"max {ld['max_s']:.1f} s (one answer at a time: mostly queueing; {ld['answers_per_s']:.2f} "
                    f"answers/s); `/api/status` answered in {ld['status_under_load_s']:.2f} s while they queued |")
    return "\n".join([*rows, "", source(d)])


def injection(d: dict) -> str:
    """`python -m bench.injection`: planted documents that try to steer the reader, redaction off and on."""
    kinds = ("instruction", "control", "correction", "leak", "all")
    rows = ["| set | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
    label = {"a": "a (the redaction patterns were fitted to it)", "b": "b (other wordings, written after)"}
    for which, by in d["summary"].items():
        cell = lambda s: (f"{s['plain']['attacked']} → **{s['guard']['attacked']}** of {s['retrieved']} "  # noqa: E731
                          f"(correct {s['plain']['correct']} → {s['guard']['correct']} of {s['cases']})")
        rows.append(f"| {label.get(which, which)} | " + " | ".join(cell(by[k]) for k in kinds) + " |")
    return "\n".join([*rows, "", f"Reader {d['model']}, k={d['k']}, abstention off. " + source(d)])


MODES = ("bm25", "dense", "hybrid", "hybrid+rerank")


def retrieval(d: dict) -> str:
    """Retrieval per mode on the golden test split (a hit is a passage from an expected document)."""
    keys = ("recall@1", "recall@5", "recall@10", "mrr", "ndcg@10")
    r = d["retrieval"]
    best = {k: max(r[m][k] for m in MODES if m in r) for k in keys}
    rows = ["| mode | recall@1 | recall@5 | recall@10 | MRR | nDCG@10 |", "|---|---|---|---|---|---|"]
    for m in (m for m in MODES if m in r):
        rows.append(f"| {m} | " + " | ".join(f"**{r[m][k]:.3f}**" if r[m][k] == best[k] else f"{r[m][k]:.3f}"
                                           for k in keys) + " |")
    s = d["settings"]
    return "\n".join([*rows, "", f"{s['n_questions']} questions ({s['n_answerable']} answerable). " + source(d)])


def by_type(d: dict) -> str:
    """Right answers per question type among the answerable questions, and why the others were missed."""
    counts: dict[str, dict[str, int]] = {}
    for q in d["per_question"]:
        if q["expected_answer"]:
            c = counts.setdefault(q["type"], {"n": 0, "right": 0, "retrieval": 0, "gate": 0, "generation": 0})
            c["n"] += 1
            c["right"] += q["contains"] == 1.0
            if q["miss"]:
                c[q["miss"]] += 1
    return "; ".join(f"{t} {c['right']} of {c['n']} (misses {c['retrieval']} / {c['gate']} / {c['generation']})"
                     for t, c in sorted(counts.items()))


def median(latencies: list[dict], stage: str) -> float:
    """The upper median of one stage's seconds over per-question latencies (0 when there are none)."""
    xs = sorted(x.get(stage, 0.0) for x in latencies)
    return xs[len(xs) // 2] if xs else 0.0


def run_rule(settings: dict) -> list:
    """The abstention rule an eval ran with: the calibrated one, else the one it names (``--abstain`` or, since
    2026-12-03, ``rule``: the judge<0 default of a folder without a golden train split)."""
    calibrated = (settings.get("calibration") or {}).get("rule")
    if calibrated:
        return calibrated
    text = settings.get("rule") or settings.get("abstain", "none")
    return [] if text in ("none", "calibrated") else parse_rule(text)


def answers(ds: list[dict]) -> str:
    """Answer quality and latency per generator (hybrid+rerank, the run's abstention rule), one row per eval JSON."""
    rows = ["| generator | contains | token F1 | citation acc. | abstain P | abstain R | misses: retrieval / gate / "
            "generation | latency p50 (p95) |", "|---|---|---|---|---|---|---|---|"]
    for d in ds:
        a, lat, s = d["answers"], d["latency_ms"], d["settings"]
        runtime = "" if s["backend"] == "auto" else f" ({s['backend']})"
        # refusals cost no generation, so the median over all questions moves with how many the gate refuses:
        # the stages are the answered questions' medians, the end to end is shown both ways
        done = [q["latency_s"] for q in d["per_question"] if not q["abstained"]]
        steps = " + ".join(f"{k} {median(done, k):.2f} s" for k in ("rerank", "judge", "generate") if k in lat)
        cal = s.get("calibration")  # rules calibrated before 2026-12-04 maximised F1 and do not say so
        label = f", calibrated for {cal.get('objective', 'F1')}" if cal else ", " + " or ".join(
            f"{n} < {t:g}" for n, t in run_rule(s)) + " (no calibrated rule)"
        when = d["run"]["date"][:10]
        if sum(o["run"]["date"][:10] == when for o in ds) > 1:  # two runs that day: which one
            when += " " + d["run"]["date"][11:16] + " UTC"
        weights = s.get("reader_weights") or ""
        runtime += ", Q8_0 copy" if ".q8_0-" in weights else ""
        rows.append(f"| {s['model']}{runtime}, {when}{label} | **{a['contains']:.3f}** | "
                    f"{a['f1']:.3f} | {a['citation_accuracy']:.3f} | {num(a['abstain_precision'])} | "
                    f"{num(a['abstain_recall'])} | {a['retrieval_misses']} / {a['gate_misses']} / "
                    f"{a['generation_misses']} | **all {len(d['per_question'])}: {lat['total']['p50'] / 1000:.1f} s** "
                    f"({lat['total']['p95'] / 1000:.1f} s); the {len(done)} answered: {steps}, "
                    f"{median(done, 'total'):.1f} s |")
    rows.append("")
    for d in ds:
        rule = run_rule(d["settings"])
        rows.append(f"{d['settings']['model']}: abstain when " + (" or ".join(f"{n} < {t:.3g}" for n, t in rule)
                                                                   or "never (no rule)")
                    + f"; by type: {by_type(d)}. " + source(d))
        rows.append("")
    return "\n".join(rows[:-1])


SIGNALS = {"judge": "the reader's judgement (log-odds of \"Yes\" vs \"No\": do the sources state the answer?)",
           "bm25": "best BM25 score", "dense": "best cosine", "rerank": "best re-ranker score"}


def signals(d: dict) -> str:
    """ROC AUC of each abstention signal for "unanswerable scores lower", on the train (calibration) and test split."""
    train = d["settings"].get("calibration", {}).get("train_auc", {})
    rows = ["| signal | train | test |", "|---|---|---|"]
    for n, label in SIGNALS.items():
        if n in d.get("signal_auc", {}):
            rows.append(f"| {label} | {num(train.get(n), 2)} | {num(d['signal_auc'][n], 2)} |")
    return "\n".join([*rows, "", source(d)])


LAYOUTS = {"shipped": "two turns: the sources and the question with the yes/no question, then the answer (shipped)",
           "appended": "the yes/no question appended to the answer prompt (before 2026-12-03)",
           "alone": "the yes/no question alone: no system prompt, no example (a second reading of the sources)"}


def judge(d: dict) -> str:
    """`python -m bench.judge`: the reader's judgement per prompt layout, ROC AUC on one golden split."""
    rows = [f"| judgement layout | ROC AUC, {d['split']} ({d['n']} questions, {d['n_unanswerable']} unanswerable) |",
            "|---|---|"]
    rows += [f"| {LAYOUTS.get(k, k)} | {num(v)} |" for k, v in d["auc"].items()]
    tail = (f"Answers with the shipped prompt, no gate: contains {d['contains']:.3f} on the answerable questions. "
            if d.get("contains") is not None else "")
    return "\n".join([*rows, "", tail + source(d)])


TABLES = {"finetune-contains": ("finetune-demo.json", finetune_contains),
          "finetune-scores": ("finetune-demo.json", finetune_scores),
          "finetune-1.5b-contains": ("finetune-1.5b-demo.json", finetune_contains),
          "finetune-1.5b-scores": ("finetune-1.5b-demo.json", finetune_scores),
          "finetune-1.5b-runs": ("finetune-1.5b*.json", finetune_runs),
          "finetune-1.5b-defaults-contains": ("finetune-1.5b-run-halfblocks-demo.json", finetune_contains),
          "finetune-1.5b-defaults-scores": ("finetune-1.5b-run-halfblocks-demo.json", finetune_scores),
          "sweep": ("sweep-demo.json", sweep),
          "chunking": ("chunking-demo.json", chunking),
          "compare": ("compare-demo.json", compare),
          "compare-1.5b": ("compare-demo-qwen-1.5b.json", compare),
          "compare-1.5b-amd": ("compare-demo-qwen-1.5b-seeds3-amd.json", compare),
          "compare-1.5b-defaults": ("compare-demo-qwen-1.5b-defaults-amd.json", compare),
          "compare-1.5b-versions": ("compare-demo-qwen-1.5b-versions-amd.json", compare),
          "compare-1.5b-seeds": ("compare-demo-qwen-1.5b-seeds3-amd.json", seeds),
          "compare-1.5b-self": ("compare-demo-qwen-1.5b-self-seeds3-amd.json", compare),
          "compare-1.5b-self-seeds": ("compare-demo-qwen-1.5b-self-seeds3-amd.json", seeds),
          "compare-1.5b-halfblocks": ("compare-demo-qwen-1.5b-halfblocks.json", compare),
          "compare-1.5b-halfblocks-rr2": ("compare-demo-qwen-1.5b-halfblocks-reranker2.json", compare),
          "compare-1.5b-chain": ("compare-demo-qwen-1.5b-chain.json", compare),
          "compare-1.5b-halfblocks-seeds3": ("compare-demo-qwen-1.5b-halfblocks-seeds3.json", seeds),
          "compare-1.5b-halfblocks-decision": ("compare-demo-qwen-1.5b-halfblocks-seeds3.json", decision),
          "reliability": ("fuzz.json", reliability),
          "injection": ("injection-demo.json", injection),
          "retrieval": ("eval-demo.json", retrieval),
          "answers": ("eval-demo*.json", answers),
          "signals": ("eval-demo.json", signals),
          "judge": ("judge-demo-train.json", judge)}


def render(name: str, root: Path = RESULTS) -> str:
    file, fn = TABLES[name]
    if "*" in file:  # one row per run: the default generator's file first, then the others by name
        paths = sorted(root.glob(file), key=lambda p: (p.name != file.replace("*", ""), p.name))
        return fn([json.loads(p.read_text(encoding="utf-8")) | {"_path": str(p)} for p in paths])
    path = root / file
    d = json.loads(path.read_text(encoding="utf-8")) | {"_path": str(path)}
    return fn(d)


def update(text: str, root: Path = RESULTS) -> str:
    """README text with every marked section re-rendered from its JSON."""
    def repl(m: re.Match) -> str:
        if m["name"] not in TABLES:
            raise KeyError(f"README marker results:{m['name']}: no such table (known: {', '.join(TABLES)})")
        return m.group(1) + render(m["name"], root) + "\n" + m.group(4)

    return MARKER.sub(repl, text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.readme", description=__doc__.splitlines()[0])
    p.add_argument("--readme", default="README.md")
    p.add_argument("--check", action="store_true", help="exit 1 if README differs from what the JSON renders")
    a = p.parse_args(argv)
    path = Path(a.readme)
    old = path.read_text(encoding="utf-8")
    new = update(old)
    if a.check:
        if new != old:
            print(f"{path}: tables differ from docs/results/*.json; run `make docs`", file=sys.stderr)
            return 1
        print(f"{path}: {len(MARKER.findall(old))} tables match their JSON")
        return 0
    path.write_text(new, encoding="utf-8")
    print(f"{path}: {len(MARKER.findall(new))} tables rendered")
    return 0


if __name__ == "__main__":
    sys.exit(main())
