"""Command line for fine-tuning: ``python -m finetune {data,train,eval,merge,run,sweep}``.

Thin like ``rag.cli``: one function per verb, one ``--flag`` per config field (DataConfig, TrainConfig,
EvalConfig), settable from ``--config FILE``, user mistakes as one ``error:`` line and exit 2. ``run`` is what
``make finetune`` calls: data → train → eval with settings shared by the three steps; ``sweep`` runs
``finetune.sweep``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from finetune import distributed as D
from finetune import train as T
from finetune.data import DataConfig, build, load_built
from finetune.evaluate import EvalConfig, compare, learning_curve, plot_curve, question_sets, report_path
from finetune.export import OUTTYPES, export
from finetune.lora import merge
from finetune.rows import load_data
from finetune.sweep import sweep, sweep_lines
from rag.config import (
    add_config_flags,
    add_field_flags,
    add_file_flags,
    artefacts,
    config_from,
    run_command,
    run_dir,
    setup_logging,
    subcommands,
    write_report,
)
from rag.config_file import parse_args, print_config
from rag.models import DEFAULT_READER

log = logging.getLogger("finetune")
QA_COLS = ("contains", "exact", "f1", "source_accuracy", "hallucination_rate", "format_consistency",
           "constraint_adherence", "abstain_precision", "abstain_recall")


def print_compare(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    models = [m for m in ("base", "tuned") if m in result]
    t = Table(title="closed-book, base vs tuned (no retrieval)")
    t.add_column("questions")
    t.add_column("metric")
    for m in models:
        t.add_column(m, justify="right")
    fmt = lambda v: "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    for name in result["base"]["qa"]:
        for col in QA_COLS:
            t.add_row(f"{name} (n={result['base']['qa'][name]['n']})" if col == QA_COLS[0] else "", col,
                      *(fmt(result[m]["qa"][name][col]) for m in models))
        t.add_section()
    if "probes" in result["base"]:
        for k in result["base"]["probes"]:
            t.add_row("general probes" if k == "accuracy" else "", k, *(fmt(result[m]["probes"][k]) for m in models))
    if "perplexity_general" in result["base"]:
        t.add_row("general text", "perplexity", *(fmt(result[m]["perplexity_general"]) for m in models))
    Console().print(t)
    for name, iv in result.get("intervals", {}).items():
        ci = lambda v: f"{v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]"  # noqa: E731
        print(f"{name} contains (n={iv['n']}, 95% bootstrap): base {ci(iv['base'])}, tuned {ci(iv['tuned'])}, "
              f"tuned - base {ci(iv['tuned_minus_base'])}")
    if result.get("synthetic_by_base"):
        print("held-out synthetic questions, tuned accuracy by what the base model knew: " +
              ", ".join(f"{k} {fmt(v['tuned_contains'])} (n={v['n']})" for k, v in result["synthetic_by_base"].items()))
    if "regression" in result:
        lost = ", ".join(result["regressed_skills"])
        print(f"general-probe accuracy change: {-result['probe_drop']:+.3f}"
              + (f"; skills that lost more than twice --max-probe-drop: {lost}" if lost else "")
              + (" — REGRESSION" if result["regression"] else ""))


def cmd_data(args) -> int:
    cfg = config_from(args, DataConfig)
    train, heldout, stats = build(cfg)
    print(f"dataset in {cfg.out}: {len(train)} training rows, {len(heldout)} held-out questions; {stats}")
    return 0


def cmd_train(args) -> int:
    cfg = config_from(args, T.TrainConfig)
    m = T.train(cfg, load_data(args.data), resume=args.resume).metrics  # under accelerate launch: every process
    if not D.is_main():
        return 0
    ev = "-" if m["final_eval_loss"] is None else f"{m['final_eval_loss']:.4f}"
    print(f"adapter in {Path(cfg.output_dir) / 'adapter'}: {m['steps']} steps, last train loss "
          f"{m['final_train_loss']:.4f}, eval loss {ev}, {m['seconds']:.0f} s")
    return 0


def cmd_merge(args) -> int:
    print(f"merged model in {merge(args.adapter, args.out)}")
    return 0


def cmd_export(args) -> int:
    print(f"wrote {export(args.adapter, args.out, args.outtype)}")
    return 0


def cmd_eval(args) -> int:
    cfg = config_from(args, EvalConfig)
    result = compare(cfg)
    print_compare(result)
    if args.json:
        write_report(result, args.json)
    return 3 if args.strict and result.get("regression") else 0


def cmd_run(args) -> int:
    """data → train → eval, for ``make finetune``."""
    root = artefacts("finetune", args.docs)
    dcfg = DataConfig(docs=args.docs, model=args.model, paraphrases=args.paraphrases,
                      synthetic_chunks=args.synthetic_chunks, general_rows=args.general_rows, out=str(root / "data"),
                      store=args.store, store_url=args.store_url)
    # with one wording per question the eval slice would hold whole facts out of training (each of its rows is the
    # only one asking its fact), so there is none; re-wordings make its rows other phrasings of trained facts
    tcfg = T.TrainConfig(model=args.model, output_dir=str(run_dir("finetune", args.docs, args.model)),
                         epochs=args.epochs, max_steps=args.steps, snapshots=args.snapshots,
                         lora_layers=args.lora_layers,
                         eval_fraction=T.TrainConfig.eval_fraction if args.paraphrases else 0.0)
    built = load_built(dcfg) if args.resume else None
    if args.resume and built is None:
        log.warning("--resume: no saved data built with these settings in %s; building it", dcfg.out)
    # under accelerate launch process 0 builds (LM calls, one saved folder) and the others load what it saved
    train, heldout, stats = built or D.once(lambda: build(dcfg), lambda: load_built(dcfg))
    if D.is_main():
        print(f"dataset: {len(train)} training rows, {len(heldout)} held-out questions; {stats}"
              + (" (saved, re-used)" if built else ""))
    run = T.train(tcfg, train, resume=args.resume)
    m = run.metrics
    if not D.is_main():  # evaluation and the report are process 0's
        return 0
    print(f"trained {m['steps']} steps in {m['seconds']:.0f} s at {m['tokens_per_second']:.0f} tokens/s; "
          f"loss curve {Path(tcfg.output_dir) / 'loss.png'}")
    del run
    ecfg = EvalConfig(docs=args.docs, model=args.model, adapter=tcfg.output_dir, data=dcfg.out)
    sets = question_sets(ecfg)
    result = compare(ecfg, sets=sets)
    result["training"], result["data"] = m, stats
    curve = learning_curve(ecfg, sets, T.snapshot_dirs(tcfg.output_dir), result["base"], result["tuned"],
                           m["adapter_step"])
    result["contains_by_step"] = curve
    png = Path(tcfg.output_dir) / "contains.png"
    plot_curve(curve, png, f"{Path(args.model).name} LoRA, closed-book")
    print_compare(result)
    print("closed-book contains by step: " + "; ".join(
        f"{r['step']}: " + ", ".join(f"{k} {v:.2f}" for k, v in r.items() if k != "step" and v is not None)
        for r in curve) + f" (plot: {png})")
    write_report(result, report_path(args.docs, args.model))
    return 0


def cmd_sweep(args) -> int:
    """Closed-book accuracy against paraphrase count (``finetune.sweep.sweep``)."""
    counts = sorted({int(x) for x in args.paraphrases.split(",")})
    rows, root = sweep(args.docs, args.model, counts, args.epochs, args.steps, args.synthetic_chunks)
    for line in sweep_lines(rows):
        print(line)
    print(f"wrote {root / 'sweep.json'} and {root / 'sweep.png'}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m finetune", description="LoRA fine-tuning on the documents RAG "
                                "indexes, evaluated closed-book against the base model.")
    sub = p.add_subparsers(dest="command", required=True)
    sp = sub.add_parser("data", help="build the training set (golden train + synthetic QA + paraphrases)")
    add_config_flags(sp, DataConfig)
    h = "LoRA-train on a dataset of chat rows (what `run` does after `data`)"
    sp = sub.add_parser("train", help=h, description=h)
    sp.add_argument("--data", required=True, help="Dataset.save_to_disk folder or .jsonl with 'messages' rows")
    sp.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output-dir")
    add_config_flags(sp, T.TrainConfig)
    h = "merge an adapter into its base model and save a standalone Hugging Face folder"
    sp = sub.add_parser("merge", help=h, description=h)
    sp.add_argument("--adapter", required=True, help="training output dir or adapter folder")
    sp.add_argument("--out", required=True, help="folder for the merged model")
    h = "write the tuned model as one GGUF file for llama.cpp, Ollama or LM Studio"
    sp = sub.add_parser("export", help=h, description=h)
    sp.add_argument("--adapter", required=True, help="training output dir or adapter folder")
    sp.add_argument("--out", required=True, help="the .gguf file to write")
    sp.add_argument("--outtype", default="q8_0", choices=OUTTYPES, help="weight type (default: q8_0)")
    sp = sub.add_parser("eval", help="closed-book base vs tuned: QA, hallucination, format, probes, perplexity")
    add_config_flags(sp, EvalConfig)
    sp.add_argument("--json", default="", help="write the full result here")
    sp.add_argument("--strict", action="store_true", help="exit 3 when general-probe accuracy drops more than "
                    "--max-probe-drop")
    sp = sub.add_parser("run", help="data → train → eval (what `make finetune` runs)")
    sp.add_argument("--docs", default="data/demo", help="documents folder (default: data/demo)")
    sp.add_argument("--model", default=DEFAULT_READER, help=f"base model (default: {DEFAULT_READER})")
    sp.add_argument("--epochs", type=float, default=T.TrainConfig.epochs,
                    help="training epochs (default: %(default)s, what memorising the demo's facts took)")
    sp.add_argument("--steps", type=int, default=-1, help="optimiser steps (-1: use --epochs)")
    sp.add_argument("--lora-layers", type=int, default=T.TrainConfig.lora_layers,
                    help="LoRA on the last N transformer blocks only, a cheaper backward pass; 0: every block "
                    "(default: %(default)s, auto: the top half for models of 1B parameters or more, the 1.5B's 14 "
                    "of 28; README, 'LoRA on the top half of the layers')")
    sp.add_argument("--paraphrases", type=int, default=DataConfig.paraphrases, help="wordings per question")
    sp.add_argument("--synthetic-chunks", type=int, default=DataConfig.synthetic_chunks,
                    help="chunks to write synthetic QA from (-1: 40 with a golden file, 160 without)")
    sp.add_argument("--general-rows", type=int, default=DataConfig.general_rows,
                    help="general prompts answered by the base model, mixed in against forgetting (default: "
                    "%(default)s)")
    sp.add_argument("--snapshots", type=int, default=T.TrainConfig.snapshots,
                    help="adapters saved during training and scored for the contains-by-step curve (default: "
                    "%(default)s; each costs one closed-book pass over the golden questions, ~3 min on the 1.5B)")
    sp.add_argument("--resume", action="store_true", help="continue an interrupted run: re-use its saved data "
                    "(when built with the same settings) and train on from the last checkpoint")
    add_field_flags(sp, DataConfig, ("store", "store_url"))  # where the data step's round trips retrieve from
    add_file_flags(sp)  # a config file's keys for `run` are the flag names above (epochs, steps, paraphrases …)
    sp = sub.add_parser("sweep", help="closed-book accuracy vs paraphrase count (one training run per count)")
    sp.add_argument("--docs", default="data/demo", help="documents folder (default: data/demo)")
    sp.add_argument("--model", default=DEFAULT_READER, help=f"base model (default: {DEFAULT_READER})")
    sp.add_argument("--paraphrases", default="0,2,4,8", help="comma-separated counts (default: 0,2,4,8)")
    sp.add_argument("--epochs", type=float, default=T.TrainConfig.epochs, help="epochs per run (same for all)")
    sp.add_argument("--steps", type=int, default=-1, help="optimiser steps per run instead of --epochs: the same "
                    "number of updates for every count, so fewer wordings means more repetitions of each (the "
                    "comparison the 'facts need many phrasings' finding makes)")
    sp.add_argument("--synthetic-chunks", type=int, default=0, help="chunks to write synthetic QA from")
    return p


COMMANDS = {"data": cmd_data, "train": cmd_train, "merge": cmd_merge, "export": cmd_export, "eval": cmd_eval,
            "run": cmd_run, "sweep": cmd_sweep}


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    D.quiet_replicas()
    p = parser()

    def go(argv: list[str] | None) -> int:
        args = parse_args(p, argv, "finetune")  # --config FILE's settings, then the flags given
        if getattr(args, "print_config", False):
            return print_config(args, subcommands(p).choices[args.command])
        return COMMANDS[args.command](args)

    return run_command(go, argv)
