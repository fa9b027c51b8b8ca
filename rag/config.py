"""Plumbing every package's command line shares: config fields with help, one ``--flag`` per field (plus
``--config FILE`` and ``--print-config``, which ``rag/config_file.py`` reads), where a folder's artefacts go,
one-line user errors, report writing, JSON-lines reading and logging set-up.

The configs themselves live beside the code they configure (``RagConfig`` in ``rag/pipeline.py``,
``TrainConfig`` in ``finetune/train.py`` …); this module imports nothing from openbook, so any module may use it.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import field, fields
from pathlib import Path

# Libraries whose INFO lines drown openbook's own (model loading, HTTP, FAISS CPU probing).
NOISY = ("sentence_transformers", "transformers", "httpx", "faiss", "peft")


class UserError(Exception):
    """A mistake the user can fix (a wrong folder, a missing model, a bad golden file); its message says how.

    ``run_command`` prints it as one ``error:`` line and exits 2 instead of a traceback.
    """


def option(default, help: str):
    """A dataclass field with its help text, which the CLI turns into ``--flag`` help."""
    return field(default=default, metadata={"help": help})


def option_of(cls, name: str):
    """Field ``name`` of config ``cls`` again (default and help), for a config that passes it on: DataConfig's
    ``store`` is ``option_of(RagConfig, "store")``, so the flag reads the same on every command."""
    f = next(f for f in fields(cls) if f.name == name)
    return field(default=f.default, default_factory=f.default_factory, metadata=f.metadata)


def subcommands(p: argparse.ArgumentParser) -> argparse._SubParsersAction:
    """The sub-command table of a parser made with ``add_subparsers`` (its ``choices``: verb → sub-parser)."""
    return next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))


def folder_name(docs: str | Path) -> str:
    """The name artefacts of a docs folder go under (``root`` for ``/``)."""
    return Path(docs).resolve().name or "root"


def artefacts(kind: str, docs: str | Path) -> Path:
    """Where runtime artefacts of one kind for a docs folder go: ``.openbook/<kind>/<folder name>``."""
    return Path(".openbook") / kind / folder_name(docs)


def run_dir(kind: str, docs: str | Path, model: str) -> Path:
    """Where a training run of ``kind`` ("finetune" or "hybrid") for a docs folder and base model writes its
    adapter, checkpoints and metrics: ``.openbook/<kind>/<folder name>/<model name>``."""
    return artefacts(kind, docs) / Path(model).name


def add_config_flags(p: argparse.ArgumentParser, cls) -> None:
    """One ``--flag`` per field of a config dataclass whose fields carry ``help`` metadata, plus ``--config`` and
    ``--print-config``."""
    add_field_flags(p, cls)
    add_file_flags(p)
    p.set_defaults(config_class=cls)  # so --print-config validates what it prints, as a run would


def add_field_flags(p: argparse.ArgumentParser, cls, names: tuple[str, ...] = ()) -> None:
    """The ``--flag`` of each field of ``cls`` (of those in ``names`` only, when given), for a verb such as
    ``finetune run`` that takes a few of a config's flags."""
    for f in fields(cls):
        if names and f.name not in names:
            continue
        flag, h = "--" + f.name.replace("_", "-"), f.metadata.get("help", "")
        if f.type in ("bool", bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=_plain(h))
        elif str(f.type).startswith("list"):  # a repeatable flag: each use adds one item
            p.add_argument(flag, action="append", default=list(f.default), metavar=f.name.upper(), help=_plain(h))
        else:
            typ = {"int": int, "float": float}.get(str(f.type), str)
            p.add_argument(flag, type=typ, default=f.default, help=_plain(f"{h} (default: {f.default})"))


def _plain(text: str) -> str:
    """Help text as argparse prints it: it %-formats help, and ours is plain ("95% intervals")."""
    return text.replace("%", "%%")


def add_file_flags(p: argparse.ArgumentParser) -> None:
    """``--config FILE`` and ``--print-config`` on a sub-parser whose flags are settings."""
    if "--config" in p._option_string_actions:
        return
    p.add_argument("--config", default="", metavar="FILE", help="TOML file of settings, keys named like these "
                   "flags (top level, or in a [group] or [group.verb] table); flags given here override it")
    p.add_argument("--print-config", action="store_true", help="print the resolved settings as TOML and exit")


def config_from(args, cls):
    """The config dataclass built from parsed flags (its ``__post_init__`` validates them)."""
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})


def run_command(fn, args, extra: tuple = ()) -> int:
    """Run one CLI verb; user mistakes (``UserError``, a missing file, ``extra``) become one ``error:`` line and
    exit 2, as does a config ``ValueError`` that names its flag."""
    try:
        return fn(args)
    except (UserError, FileNotFoundError, *extra) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        if "--" not in str(e):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2


def provenance() -> dict:
    """Which run made a result: when (UTC), the command, the git commit and the machine (CPU, cores, RAM)."""
    import datetime
    import os
    import platform
    import subprocess

    def first(path: str, key: str) -> str | None:
        try:
            return next((ln.split(":", 1)[1].strip() for ln in Path(path).read_text().splitlines()
                         if ln.startswith(key)), None)
        except OSError:
            return None

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                timeout=5).stdout.strip() or None
        # a run on edited tracked files is not that commit's: say so, or a result is credited to code it never ran
        if commit and subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                     text=True, timeout=5).stdout.strip():
            commit += "+changes"
    except (OSError, subprocess.SubprocessError):
        commit = None
    ram = first("/proc/meminfo", "MemTotal")
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "git": commit,
            "host": platform.node(), "cpu": first("/proc/cpuinfo", "model name") or platform.processor(),
            "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "ram_gib": round(int(ram.split()[0]) / 2**20, 1) if ram else None}


def stamped(result: dict) -> dict:
    """``result`` with this run's ``provenance()`` first, under "run" (replacing any older stamp)."""
    return {"run": provenance(), **{k: v for k, v in result.items() if k != "run"}}


def write_report(result: dict, path: str | Path) -> None:
    """Save a result as JSON (creating its folder), ``stamped`` with its run, and say where."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(stamped(result), indent=1, ensure_ascii=False))
    print(f"wrote {path}")


def load_jsonl(path: str | Path) -> list[dict]:
    """One JSON object per non-blank line (a change set, held-out questions, probes)."""
    return [json.loads(x) for x in Path(path).read_text(encoding="utf-8").splitlines() if x.strip()]


def setup_logging(fmt: str = "%(levelname)s: %(message)s") -> None:
    """INFO for openbook, errors only for the libraries in ``NOISY``."""
    logging.basicConfig(level=logging.INFO, format=fmt)
    for name in NOISY:
        logging.getLogger(name).setLevel(logging.ERROR)
