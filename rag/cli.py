"""Command line for the RAG pipeline: ``python -m rag {index,ask,chat,eval,demo,train-reranker}``.

Thin by design (litgpt style): one function per verb in ``COMMANDS``, and one ``--flag`` per ``RagConfig``
field, generated from the dataclass so help text and defaults live in one place (``--config FILE`` sets them
from a TOML file, ``--print-config`` shows the result). User mistakes (a wrong folder, a missing model, a bad
golden file) print one ``error:`` line and exit 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from rag.choose import calibrate, choose_mode
from rag.config import UserError, add_config_flags, config_from, run_command, setup_logging, subcommands, write_report
from rag.config_file import parse_args, print_config
from rag.evaluate import GoldenError, evaluate, golden_for, load_golden
from rag.filters import summary
from rag.metadata import describe
from rag.pipeline import RagConfig, RagPipeline
from rag.ranking import Answer
from rag.rewrite import standalone

log = logging.getLogger("rag")


def _config(args) -> RagConfig:
    return config_from(args, RagConfig)


def _pipeline(args, progress: bool = True, update=RagPipeline.update_index) -> RagPipeline:
    pipe = RagPipeline(_config(args))
    s = update(pipe, progress=progress)
    what = (f"{s.added} added, {s.changed} changed, {s.removed} removed, {s.unchanged} unchanged; "
            f"{s.embedded_chunks} chunks embedded" + (f", {s.metadata} with new metadata only" if s.metadata else "")
            if s.wrote else "up to date")
    print(f"index {pipe.cfg.index_dir}: {s.documents} documents, {s.chunks} chunks ({what}) in {s.seconds:.1f} s")
    if pipe.cfg.where:
        print(summary(pipe.index, pipe.cfg.where))
    return pipe


def _print_answer(a: Answer, streamed: bool) -> None:
    if not streamed:
        print(a.text)
    else:
        print()
    if a.abstained:
        signals = ", ".join(f"{k} {v:.3f}" for k, v in a.signals.items())
        why = ("no passage was retrieved (none matched the question and --where, if given)" if not a.sources
               else "the passages did not pass the abstention rule, so nothing was generated"
               if a.reason == "low-confidence" else "the model said the passages do not hold the answer")
        print(f"  (abstained: {why}; signals: {signals or 'none'})")
        return
    for h in a.cited:
        n = a.sources.index(h) + 1
        about = f"  ({describe(h.meta)})" if describe(h.meta) else ""
        print(f"  [{n}] {h.label}{about}" + ("" if a.explicit_citation else "  (top source; the model cited none)"))
    t = a.timings
    print(f"  ({' · '.join(f'{k} {v * 1000:.0f} ms' for k, v in t.items())}; {a.prompt_tokens} prompt tokens)")


def _stream_answer(pipe: RagPipeline, question: str, head: str = "A: ") -> Answer:
    """Answer ``question``, printing its tokens as they come and then its sources; ``head`` goes out with the first
    token, so an error raised before generation (a missing model, say) is not printed after an empty "A: "."""
    started = False

    def show(token: str) -> None:
        nonlocal started
        print(token if started else head + token, end="", flush=True)
        started = True

    a = pipe.answer(question, on_token=show)
    if not started:
        print(head, end="")
    _print_answer(a, streamed=started)
    return a


def cmd_index(args) -> int:
    if getattr(args, "ray", None):  # chunk and embed on Ray Data (rag/ray_index.py); the same plan, write and summary
        from rag.ray_index import update_pipeline

        _pipeline(args, update=lambda pipe, progress: update_pipeline(pipe, args.ray, args.ray_workers, progress))
        return 0
    _pipeline(args)
    return 0


def cmd_ask(args) -> int:
    if not all(q.strip() for q in args.question):
        raise UserError("ask: a question is empty; e.g. python -m rag ask 'How long is the warranty?'")
    pipe = _pipeline(args, progress=False)
    for q in args.question:
        print(f"\nQ: {q}", flush=True)
        _stream_answer(pipe, q)
    return 0


def cmd_chat(args) -> int:
    pipe = _pipeline(args, progress=False)
    print("Ask about the documents; an empty line or Ctrl-D quits." + (" A follow-up ('and for the TW-300?') is "
          "rewritten into a standalone question first." if args.rewrite else ""))
    history: list[dict] = []  # earlier turns, for rewriting follow-ups (rag/rewrite.py)
    while True:
        try:
            q = input("\n> ").strip()
        except (EOFError, KeyboardInterrupt):
            break
        if not q:
            break
        if args.rewrite:
            rw = standalone(pipe.generator, [*history, {"role": "user", "content": q}])
            if rw.rewritten:
                print(f"  (searching for: {rw.query})")
            elif rw.reason not in ("first turn", "unchanged"):
                print(f"  (the rewrite was not used: {rw.reason}; searching for the question as asked)")
            q = rw.query
        a = _stream_answer(pipe, q, head="")
        # the standalone form goes into the history, so a chain of follow-ups keeps its subject
        history += [{"role": "user", "content": q}, {"role": "assistant", "content": a.text}]
    return 0


def _golden_path(args) -> Path | None:
    path = golden_for(args.docs, args.golden)
    return Path(path) if path else None


def print_eval(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console()
    s = result["settings"]
    t = Table(title=f"retrieval, {s['split']} split ({s['n_answerable']} answerable questions)")
    cols = ["recall@1", "recall@5", "recall@10", "mrr", "ndcg@10"]
    for c in ["mode", *cols]:
        t.add_column(c, justify="right")
    for mode, row in result["retrieval"].items():
        t.add_row(mode, *("-" if row[c] is None else f"{row[c]:.3f}" for c in cols))
    con.print(t)
    if "answers" in result:
        a = result["answers"]
        t = Table(title=f"answers ({s.get('mode_used', s['mode'])}, model {s['model']}, {s['n_questions']} questions)")
        t.add_column("metric")
        t.add_column("value", justify="right")
        for c, v in a.items():
            t.add_row(c.replace("_", " "), "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v))
        con.print(t)
        con.print("latency ms: " + ", ".join(f"{k} p50 {v['p50']:.0f} / p95 {v['p95']:.0f}"
                                             for k, v in result["latency_ms"].items()))


def cmd_eval(args) -> int:
    golden_file = _golden_path(args)
    if golden_file is None:
        raise GoldenError(f"no golden file: pass --golden FILE or put golden.jsonl in {args.docs}")
    golden = load_golden(golden_file, args.docs)
    pipe = _pipeline(args)
    result = evaluate(pipe, golden, split=args.split, answers=not args.retrieval_only)
    result["settings"]["golden"] = str(golden_file)
    print_eval(result)
    if args.json:
        from rag.plots import plot_beside

        write_report(result, args.json)
        plot_beside(result, args.json)
    return 0


def cmd_demo(args) -> int:
    """Index, answer three example questions, and (with a golden file) print the eval table."""
    pipe = _pipeline(args)
    golden_file = _golden_path(args)
    golden = load_golden(golden_file, args.docs) if golden_file else []
    if golden:
        # calibrate first, so the example answers already retrieve and abstain as the evaluation will (cached for it)
        if pipe.cfg.abstain == "calibrated":
            calibrate(pipe, golden)  # chooses the retrieval mode first
        else:
            choose_mode(pipe, golden)
        test = [q for q in golden if q["split"] == "test"] or golden
        picks = [q for q in test if q["answer"] is not None][:2] + [q for q in test if q["answer"] is None][:1]
        questions = [q["question"] for q in picks]
    else:
        titles = [c.title for c in pipe.index.chunks.values() if c.title]
        questions = [f"What is '{t}' about?" for t in list(dict.fromkeys(titles))[:3]]
    for q in questions:
        print(f"\nQ: {q}", flush=True)
        _stream_answer(pipe, q)
    if golden:
        print(f"\nevaluating on {golden_file} ...")
        result = evaluate(pipe, golden, split="test")
        print_eval(result)
        from rag.plots import plot_beside

        report = Path(".openbook") / "reports" / f"rag-eval-{Path(pipe.cfg.index_dir).name}.json"
        write_report(result, report)
        plot_beside(result, report)
    return 0


def reranker_flags(p: argparse.ArgumentParser) -> None:
    from rag.models import DEFAULT_RERANKER, cache_dir
    from rag.train_reranker import LOSSES, RerankerConfig

    p.epilog = (f"Trains into {cache_dir() / 'rerankers' / DEFAULT_RERANKER} (skipped when a model with the same "
                "config and data is there), then prints nDCG@10/recall@10/MRR on the fitz-gov test split. About 10 "
                "minutes on 2 free CPU cores; the first run also mines negatives (~3 min, cached).")
    p.add_argument("--force", action="store_true", help="retrain even if a model with the same config exists")
    p.add_argument("--steps", type=int, help=f"optimiser steps (default {RerankerConfig.max_steps})")
    p.add_argument("--loss", choices=LOSSES, help=f"training loss (default {RerankerConfig.loss})")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (1 if the CPU is busy)")
    p.add_argument("--eval", action="store_true",
                   help="only evaluate the trained (or --model) re-ranker on the fitz-gov test split")
    p.add_argument("--model", default=DEFAULT_RERANKER, help="re-ranker for --eval (path or hub id)")
    p.add_argument("--no-eval", action="store_true", help="skip the fitz-gov evaluation after training (~8 min on "
                   "2 cores; `make setup` skips it, `make bench` measures the re-ranker)")


def cmd_train_reranker(args) -> int:
    from rag import train_reranker as R

    if args.eval:
        print(R.format_table(R.evaluate(args.model, threads=args.threads)))
        return 0
    over = {k: v for k, v in (("max_steps", args.steps), ("loss", args.loss), ("threads", args.threads)) if v}
    out = R.train(R.RerankerConfig(**over), force=args.force, evaluate_after=not args.no_eval)
    meta = json.loads((out / "openbook.json").read_text())
    if "eval" in meta:
        print(R.format_table(meta["eval"]))
    return 0


COMMANDS = {"index": cmd_index, "ask": cmd_ask, "chat": cmd_chat, "eval": cmd_eval, "demo": cmd_demo,
            "train-reranker": cmd_train_reranker}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rag", description="Retrieval-augmented answers from a folder "
                                "of documents, with citations, or 'I don't know'.")
    sub = p.add_subparsers(dest="command", required=True)
    helps = {"index": "build or incrementally update the index of --docs",
             "ask": "answer questions with cited sources", "chat": "interactive question loop",
             "eval": "evaluate on a golden file (retrieval per mode, answers, abstention, latency)",
             "demo": "index, answer three example questions, and evaluate when a golden file exists",
             "train-reranker": "train the default cross-encoder on fitz-gov (`make setup` runs it; ~10 min)"}
    for name, h in helps.items():
        sp = sub.add_parser(name, help=h, description=h)
        if name == "train-reranker":
            reranker_flags(sp)
            continue
        add_config_flags(sp, RagConfig)
        if name == "index":
            sp.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                            help="chunk and embed on Ray Data: a local cluster, or the one at ADDRESS (the head's "
                            "host:6379, or auto); needs pip install 'ray[data]'")
            sp.add_argument("--ray-workers", type=int, default=2, metavar="N",
                            help="embedding actors on Ray, and CPUs of the local cluster (default 2)")
        if name == "ask":
            sp.add_argument("question", nargs="+", help="one or more questions")
        if name == "chat":
            sp.add_argument("--rewrite", action=argparse.BooleanOptionalAction, default=True, help="rewrite a "
                            "follow-up into a standalone question with the generator before retrieval (default: on)")
        if name in ("eval", "demo"):
            sp.add_argument("--golden", default="", help="golden JSONL file (default: <docs>/golden.jsonl)")
        if name == "eval":
            sp.add_argument("--split", default="test", choices=["train", "test", "all"], help="questions to score")
            sp.add_argument("--json", default="", help="write the full result (public JSON shape) here")
            sp.add_argument("--retrieval-only", action="store_true", help="score retrieval modes only (fast)")
    return p


def verb_parser(p: argparse.ArgumentParser, verb: str) -> argparse.ArgumentParser:
    """The sub-parser of one verb (for callers that change its defaults, like ``python -m hybrid ask``)."""
    return subcommands(p).choices[verb]


def run(args) -> int:
    """Run parsed ``python -m rag`` arguments: flags validated before any slow work, user errors in one line."""
    setup_logging()
    # transformers reads this when first imported; importing it here just to call disable_progress_bar() would
    # add ~1.2 s to every cold command (HF_HUB_DISABLE_PROGRESS_BARS=0 brings the bars back)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

    def go(a) -> int:
        if a.command != "train-reranker":
            _config(a)
        if getattr(a, "print_config", False):
            return print_config(a, verb_parser(parser(), a.command))
        return COMMANDS[a.command](a)

    return run_command(go, args)


def main(argv: list[str] | None = None) -> int:
    # parse_args reads --config FILE; a bad file is a user mistake like a bad flag: one error line, exit 2
    return run_command(lambda a: run(parse_args(parser(), a, "rag")), argv)


if __name__ == "__main__":
    sys.exit(main())
