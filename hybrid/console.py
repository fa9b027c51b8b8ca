"""The ``openbook`` command: ``openbook {rag,finetune,hybrid} VERB [flags]``, the verbs of ``python -m rag``,
``python -m finetune`` and ``python -m hybrid`` under one installed name; ``openbook serve`` is short for
``openbook hybrid serve`` (the OpenAI-compatible API).

It only dispatches: each package's own ``cli.main`` parses its flags. It lives in ``hybrid`` because that is the
one package allowed to import the other two. ``openbook --help`` lists every verb with its one-line help.
"""

from __future__ import annotations

import importlib
import sys

from rag.config import subcommands

PACKAGES = {"rag": "retrieval-augmented answers with citations", "finetune": "LoRA fine-tuning, closed-book "
            "evaluation", "hybrid": "RAFT inside RAG, the five-way comparison and the web page"}
ALIASES = {"serve": ("hybrid", "serve")}  # a verb common enough to skip the package name


def verbs(package: str) -> list[tuple[str, str]]:
    """``(verb, help)`` for every sub-command of ``<package>.cli.parser()``."""
    p = importlib.import_module(f"{package}.cli").parser()
    return [(c.dest, c.help or "") for c in subcommands(p)._choices_actions]


def usage() -> str:
    lines = ["usage: openbook {rag,finetune,hybrid} VERB [flags]   (`openbook PACKAGE VERB --help` for its flags)",
             "", "RAG, LoRA fine-tuning and both, on one folder of documents, measured side by side.", ""]
    lines += [f"openbook {alias} is short for `openbook {' '.join(target)}`" for alias, target in ALIASES.items()]
    lines.append("")
    for package, about in PACKAGES.items():
        lines.append(f"{package}: {about}")
        lines += [f"  {package + ' ' + verb:<24} {h}" for verb, h in verbs(package)]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] in ALIASES:
        argv = [*ALIASES[argv[0]], *argv[1:]]
    if argv[0] not in PACKAGES:
        print(f"error: unknown package {argv[0]!r}: use one of {', '.join([*PACKAGES, *ALIASES])} "
              "(`openbook --help`)", file=sys.stderr)
        return 2
    return importlib.import_module(f"{argv[0]}.cli").main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
