"""Settings from a file: ``--config FILE`` (TOML; YAML by a ``.yaml``/``.yml`` suffix) and ``--print-config``,
for every command whose flags are settings (the ones ``add_config_flags`` or ``add_file_flags`` made).

A file's keys are flag names (``chunk_size`` or ``chunk-size``). Top-level keys go to every command that has that
flag, a ``[finetune]`` table to that group's commands, ``[finetune.train]`` to one command; each overrides the one
before, and flags on the command line override the file. The file only replaces argparse defaults, so checks stay
where they were: argparse's types and choices (repeated here for file values, which argparse does not check) and
the config dataclasses' ``__post_init__``. Example: ``python -m rag eval --config openbook.example.toml
--print-config``. Left out on purpose: environment variables and merging several files.
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
from pathlib import Path

from rag.config import UserError, config_from, subcommands

# The command groups one config file serves; its tables are named after them ([rag], [finetune.train] …).
GROUPS = ("rag", "finetune", "hybrid")
NOT_SETTINGS = ("help", "config", "print_config")
KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string in quotes"}


class ConfigFileError(UserError):
    """A ``--config`` file openbook cannot use: missing, not TOML, an unknown key or a value of the wrong type."""


def settings(p: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The settings a sub-parser takes, by key (its flags' names with underscores): what a config file may set."""
    return {a.dest: a for a in p._actions if a.option_strings and a.dest not in NOT_SETTINGS}


def read_config_file(path: str) -> dict:
    """A config file as nested dicts: TOML with the standard library, YAML (``.yaml``/``.yml``) with PyYAML."""
    fix = "pass an existing TOML file, e.g. --config openbook.example.toml"
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigFileError(f"--config {path}: no such file; {fix}") from None
    except (OSError, UnicodeError) as e:
        raise ConfigFileError(f"--config {path}: cannot read it ({getattr(e, 'strerror', None) or e}); {fix}") from None
    if Path(path).suffix in (".yaml", ".yml"):
        import yaml  # installed with transformers; TOML needs nothing outside the standard library

        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigFileError(f"--config {path}: not valid YAML ({' '.join(str(e).split())}); fix it") from None
        if not isinstance(data, dict):
            raise ConfigFileError(f"--config {path}: holds no 'key: value' settings; write one per line")
        return data
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10, which openbook still runs on, has it only as the tomli package
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            raise ConfigFileError(f"--config {path}: reading TOML needs Python 3.11+ or `pip install tomli`; "
                                  "or write the settings as YAML (a .yaml file)") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigFileError(f"--config {path}: not valid TOML ({e}); fix that line, e.g. docs = \"data/demo\""
                              ) from None


def file_settings(path: str, known: dict[str, dict[str, argparse.Action]], group: str, verb: str) -> dict:
    """The values ``--config path`` gives ``python -m <group> <verb>``, checked: top-level keys, then the
    ``[group]`` table, then ``[group.verb]``. ``known``: verb → settings for this group's commands.

    One file may serve all three command lines, and this one knows only its own flags (``rag`` imports nothing
    above it): a top-level key it does not take is another group's (``epochs`` is for ``finetune``) unless it is
    one letter or two from a flag of its own, which is a typo; other groups' tables are theirs to check.
    """
    canon = lambda table: {k.replace("-", "_"): v for k, v in table.items()}  # noqa: E731
    data = canon(read_config_file(path))

    def unknown(key: str, where: str, valid) -> ConfigFileError:
        near = difflib.get_close_matches(key, sorted(valid), n=3)
        hint = f"did you mean {' or '.join(near)}?" if near else "the keys are the flags' names (see --help)"
        return ConfigFileError(f"{path}: unknown key '{key}' {where}; {hint}")

    every = set().union(*known.values())  # the keys some command of this group takes
    for key, value in data.items():
        if isinstance(value, dict) and key not in GROUPS:
            raise unknown(key, "(a table)", GROUPS)
        if key == group:
            for k, v in canon(value).items():
                if isinstance(v, dict) and k in known:  # a [group.verb] table: that command's flags only
                    bad = sorted(set(canon(v)) - set(known[k]))
                    if bad:
                        raise unknown(bad[0], f"in [{key}.{k}]", known[k])
                elif k not in every:
                    raise unknown(k, f"in [{key}]", every | set(known))
        elif key not in GROUPS and key not in every and difflib.get_close_matches(key, every, n=1, cutoff=0.8):
            raise unknown(key, "at the top level", every)

    takes = known[verb]
    table = canon(data.get(group, {}))
    layers = [("at the top level", data), (f"in [{group}]", table),
              (f"in [{group}.{verb}]", canon(table.get(verb, {})))]
    out = {}
    for where, values in layers:
        for key, value in values.items():
            if key in takes and not isinstance(value, dict):
                out[key] = typed(value, takes[key], f"{path}: '{key}' {where}")
    return out


def typed(value, action: argparse.Action, what: str):
    """``value`` from a file as the type ``action``'s flag parses to, or a ``ConfigFileError`` saying which."""
    if isinstance(action, argparse._AppendAction):  # a repeatable flag (--where): a list of strings, or one string
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
            raise ConfigFileError(f"{what} must be a string or a list of strings, not {json.dumps(value, default=str)}")
        return items
    kind = bool if action.nargs == 0 else action.type if action.type in (int, float) else str
    if kind is float and type(value) is int:
        value = float(value)
    if type(value) is not kind:  # not isinstance: True is an int to Python, not to a config file
        raise ConfigFileError(f"{what} must be {KINDS[kind]}, not {json.dumps(value, default=str)}")
    if action.choices and value not in action.choices:
        raise ConfigFileError(f"{what} must be one of {', '.join(map(str, action.choices))}, not {json.dumps(value)}")
    return value


def parse_args(p: argparse.ArgumentParser, argv: list[str] | None, group: str) -> argparse.Namespace:
    """``p.parse_args(argv)`` with ``--config FILE``'s settings as the defaults: built-in defaults < the file <
    flags given. ``group`` names the command line (``rag`` …) the file's tables are matched against."""
    argv = sys.argv[1:] if argv is None else list(argv)
    sp = subcommands(p).choices.get(argv[0]) if argv else None
    if sp is not None and "--config" in sp._option_string_actions:
        # the file is read before the real parse, so that it only replaces defaults and flags given still win
        pre = argparse.ArgumentParser(prog=sp.prog, add_help=False)
        pre.add_argument("--config", default="")
        path = pre.parse_known_args(argv[1:])[0].config
        if path:
            known = {verb: settings(v) for verb, v in subcommands(p).choices.items()
                     if "--config" in v._option_string_actions}
            values = file_settings(path, known, group, argv[0])
            sp.set_defaults(**values)
            for a in sp._actions:
                if a.dest in values:
                    a.required = False  # a required flag (train's --data) may come from the file
    return p.parse_args(argv)


def toml_value(v) -> str:
    """One value in TOML: strings as JSON writes them (TOML's escapes are JSON's), numbers as Python does."""
    if isinstance(v, bool):
        return "true" if v else "false"
    return json.dumps(v, ensure_ascii=False) if isinstance(v, (str, list)) else repr(v)  # a list: of strings


def print_config(args: argparse.Namespace, p: argparse.ArgumentParser) -> int:
    """Print the settings sub-parser ``p`` resolved to as TOML (``--config`` takes it back) and return 0; the
    config dataclass validates them first, so what is printed is what a run would use."""
    if getattr(args, "config_class", None):
        config_from(args, args.config_class)
    lines = [f"# resolved settings: built-in defaults < {args.config or '(no --config file)'} < flags"]
    # TOML has no null: a flag left unset has nothing to say
    lines += [f"{key} = {toml_value(getattr(args, key))}" for key in settings(p) if getattr(args, key) is not None]
    print("\n".join(lines))
    return 0
