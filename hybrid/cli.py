"""Command line for the hybrid (RAFT) mode: ``python -m hybrid {data,train,compare,ui,serve,index,ask,chat,eval}``.

``data`` builds RAFT rows, ``train`` builds them and LoRA-trains the generator on them with the fine-tuning
trainer. ``index``, ``ask``, ``chat`` and ``eval`` are ``python -m rag``'s verbs with ``--adapter`` pointing at
the RAFT adapter for that folder, so retrieval, re-ranking, abstention and metrics are RAG's, unchanged.
``compare`` runs every system on the same questions and writes the report (``hybrid/compare.py``, ``report.py``);
``ui`` serves them side by side in a local web page (``hybrid/ui.py``, ``hybrid/demo.py``), ``serve`` behind an
OpenAI-compatible API (``hybrid/serve.py``; ``openbook serve`` for short).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from finetune import distributed as D
from finetune import train as T
from hybrid import report
from hybrid.compare import compare, raft_probes
from hybrid.demo import UiConfig
from hybrid.raft import ANSWER_TOKENS, RAFT_LORA, RaftConfig, build_raft
from hybrid.serve import ServeConfig
from hybrid.serve import serve as serve_api
from hybrid.systems import CompareConfig
from hybrid.ui import serve
from rag import cli as rag_cli
from rag.config import add_config_flags, config_from, run_command, run_dir, setup_logging, subcommands
from rag.config_file import parse_args, print_config
from rag.models import DEFAULT_READER

log = logging.getLogger(__name__)
RAG_VERBS = ("index", "ask", "chat", "eval")


def default_adapter(docs: str, model: str) -> Path:
    """The RAFT adapter ``make hybrid`` trains for a docs folder and model (``CompareConfig.raft`` + adapter)."""
    return run_dir("hybrid", docs, model) / "adapter"


def cmd_data(args) -> int:
    ds, stats = build_raft(config_from(args, RaftConfig))
    print(f"RAFT dataset: {len(ds)} rows; {stats}")
    return 0


def cmd_train(args) -> int:
    rcfg = config_from(args, RaftConfig)

    def load():  # the rows process 0 built and saved, for the other processes under accelerate launch
        from datasets import load_from_disk

        return load_from_disk(rcfg.out), json.loads((Path(rcfg.out) / "raft_config.json").read_text())["stats"]

    # built once: building updates the index and replaces the saved rows' folder, which N processes would race on
    ds, stats = D.once(lambda: build_raft(rcfg, progress=D.is_main()), load)
    if D.is_main():
        print(f"RAFT dataset: {len(ds)} rows; {stats}")
    tcfg = T.TrainConfig(model=rcfg.model, output_dir=str(default_adapter(rcfg.docs, rcfg.model).parent),
                         epochs=args.epochs, max_steps=args.steps, max_length=args.max_length,
                         batch_size=args.batch_size, grad_accum=args.grad_accum, **RAFT_LORA)
    m = T.train(tcfg, ds, resume=args.resume).metrics
    if not D.is_main():
        return 0
    print(f"trained {m['steps']} steps in {m['seconds']:.0f} s at {m['tokens_per_second']:.0f} tokens/s; adapter "
          f"{default_adapter(rcfg.docs, rcfg.model)}; loss curve {Path(tcfg.output_dir) / 'loss.png'}")
    from rag.backend_llamacpp import weights, why_not
    from rag.gguf_lora import AdapterError

    if why_not(rcfg.model, None) is None:  # llama.cpp answers with it: its GGUF files now, not at the first answer
        try:
            path, lora = weights(rcfg.model, str(default_adapter(rcfg.docs, rcfg.model)))
            print(f"llama.cpp will run {path}" + (f" with the LoRA {lora}" if lora else ""))
        except AdapterError as e:  # the adapter is trained and saved; transformers can still run it
            log.warning("%s", e)
    # forgetting, as `make finetune` reports its adapter's: the comparison then reads it from <raft>/probes.json
    ccfg = CompareConfig(docs=rcfg.docs, model=rcfg.model, store=rcfg.store, store_url=rcfg.store_url)
    probes = raft_probes(ccfg, progress=True)
    if probes:
        print(f"general probes (forgetting): base {probes['base']:.2f}, RAFT adapter {probes['tuned']:.2f} "
              f"({probes['change']:+.2f}); saved in {Path(ccfg.raft) / 'probes.json'}")
    return 0


def cmd_compare(args) -> int:
    cfg = config_from(args, CompareConfig)
    result = compare(cfg, with_freshness=args.freshness)
    report.print_terminal(result)
    paths = report.write(result, cfg.out)
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def cmd_ui(args) -> int:
    serve(config_from(args, UiConfig))
    return 0


def cmd_serve(args) -> int:
    serve_api(config_from(args, ServeConfig))
    return 0


COMMANDS = {"data": cmd_data, "train": cmd_train, "compare": cmd_compare, "ui": cmd_ui, "serve": cmd_serve}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m hybrid", description="RAFT: the generator fine-tuned to answer from "
                                "retrieved passages with distractors, run inside the RAG pipeline.")
    sub = p.add_subparsers(dest="command", required=True)
    sp = sub.add_parser("data", help="build RAFT rows (question + oracle + retrieved distractors → cited answer)")
    add_config_flags(sp, RaftConfig)
    sp = sub.add_parser("train", help="build RAFT rows and LoRA-train the generator on them (`make hybrid`)")
    add_config_flags(sp, RaftConfig)
    sp.add_argument("--epochs", type=float, default=1.0, help="training epochs (default: 1)")
    sp.add_argument("--steps", type=int, default=-1, help="optimiser steps (-1: use --epochs)")
    sp.add_argument("--resume", action="store_true", help="continue an interrupted training from its last "
                    "checkpoint (the RAFT rows are rebuilt: same settings, same rows)")
    sp.add_argument("--max-length", type=int, default=1024, help="tokens per example (default: 1024; prompts "
                    "hold k passages)")
    # one row per micro-batch: 4 rows of 1,024 tokens through the 1.5B took all 24 GiB here (OOM-killed)
    sp.add_argument("--batch-size", type=int, default=1, help="rows per micro-batch (default: 1; the optimiser "
                    "step sees --batch-size × --grad-accum rows)")
    sp.add_argument("--grad-accum", type=int, default=4, help="micro-batches per optimiser step (default: 4)")
    sp = sub.add_parser("compare", help="base / fine-tuned / RAG / fine-tuned+RAG / hybrid side by side (`make "
                        "compare`): table, context probes, report")
    add_config_flags(sp, CompareConfig)
    sp.add_argument("--freshness", action="store_true", help="also apply <docs>/changes/edits.jsonl to a copy, "
                    "re-index and re-ask the changed facts")
    sp = sub.add_parser("ui", help="side-by-side web demo on http://127.0.0.1:7860 (`make ui`): streamed answers, "
                        "sources, retrieval inspector, corpus, report")
    add_config_flags(sp, UiConfig)
    sp = sub.add_parser("serve", help="OpenAI-compatible API on http://127.0.0.1:8000/v1 (`make serve`, `openbook "
                        "serve`): the systems as models, cited answers, streamed or not")
    add_config_flags(sp, ServeConfig)
    rag_p = rag_cli.parser()
    for verb in RAG_VERBS:
        # rag's own flags (copied from its parser); only the defaults differ: the model RAFT trains, and its adapter
        sp = sub.add_parser(verb, parents=[rag_cli.verb_parser(rag_p, verb)], add_help=False,
                            help=f"`python -m rag {verb}` with the RAFT adapter (same flags)",
                            description=f"`python -m rag {verb}` with the RAFT adapter of `make hybrid` as the "
                            f"generator (default --model {DEFAULT_READER}, --max-new-tokens {ANSWER_TOKENS}, --adapter "
                            ".openbook/hybrid/<folder>/<model>/adapter)")
        sp.set_defaults(model=DEFAULT_READER, max_new_tokens=ANSWER_TOKENS)
        for a in sp._actions:  # rag's help states rag's default
            if a.dest == "max_new_tokens":
                a.help = f"generated tokens per answer at most (default: {ANSWER_TOKENS}, room for the RAFT quote)"
    return p


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    D.quiet_replicas()
    p = parser()

    def go(argv: list[str] | None) -> int:
        args = parse_args(p, argv, "hybrid")  # --config FILE's settings, then the flags given
        if args.command in RAG_VERBS:
            args.adapter = args.adapter or str(default_adapter(args.docs, args.model))
            return rag_cli.run(args)
        if getattr(args, "print_config", False):
            return print_config(args, subcommands(p).choices[args.command])
        return COMMANDS[args.command](args)

    return run_command(go, argv)


if __name__ == "__main__":
    sys.exit(main())
