"""``--config FILE`` and ``--print-config``: precedence (defaults < file < flags), tables, one-line errors, and the
example config, all through the real ``main`` functions with ``--print-config`` so nothing heavy runs."""

from __future__ import annotations

from pathlib import Path

import tomllib

from finetune.cli import main as finetune_main
from hybrid.cli import main as hybrid_main
from rag.cli import main as rag_main

EXAMPLE = Path(__file__).resolve().parent.parent / "openbook.example.toml"
MAINS = {"rag": rag_main, "finetune": finetune_main, "hybrid": hybrid_main}


def printed(capsys, *argv: str) -> str:
    """What ``python -m <argv> --print-config`` prints (exit 0)."""
    assert MAINS[argv[0]]([*argv[1:], "--print-config"]) == 0
    return capsys.readouterr().out


def resolved(capsys, *argv: str) -> dict:
    """The settings ``python -m <argv>`` would run with, read back from its ``--print-config`` TOML."""
    return tomllib.loads(printed(capsys, *argv))


def error(capsys, *argv: str) -> str:
    """The one error line a command prints (exit 2, no traceback)."""
    assert MAINS[argv[0]](list(argv[1:])) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err


def toml(tmp_path: Path, text: str, name: str = "openbook.toml") -> str:
    (tmp_path / name).write_text(text)
    return str(tmp_path / name)


def test_file_sets_values_and_flags_override_it(tmp_path, capsys):
    f = toml(tmp_path, 'k = 5\nchunk-size = 200\ncontextual = false\nsplit = "train"\n')
    s = resolved(capsys, "rag", "eval", "--config", f)
    assert (s["k"], s["chunk_size"], s["contextual"], s["split"]) == (5, 200, False, "train")
    assert s["overlap"] == 20 and s["model"] == "qwen-1.5b"  # untouched keys keep the dataclass defaults
    s = resolved(capsys, "rag", "eval", "--config", f, "--k", "7", "--contextual", "--split=all")
    assert (s["k"], s["chunk_size"], s["contextual"], s["split"]) == (7, 200, True, "all")
    assert resolved(capsys, "rag", "eval")["k"] == 3  # and no file, no change


def test_tables_override_top_level_keys_per_group_and_command(tmp_path, capsys):
    f = toml(tmp_path, 'k = 4\nmodel = "smollm2-135m"\n[rag]\nk = 5\n[rag.eval]\nk = 6\n'
                       '[finetune]\nepochs = 2.5\n[finetune.run]\nepochs = 3\n[finetune.train]\ndata = "rows.jsonl"\n')
    assert resolved(capsys, "rag", "eval", "--config", f)["k"] == 6
    assert resolved(capsys, "rag", "index", "--config", f)["k"] == 5
    assert resolved(capsys, "hybrid", "data", "--config", f)["k"] == 4  # RaftConfig's k: only the top level applies
    assert resolved(capsys, "finetune", "run", "--config", f)["epochs"] == 3.0  # an integer is a fine float
    train = resolved(capsys, "finetune", "train", "--config", f)  # train's required --data comes from the file
    assert (train["epochs"], train["data"], train["model"]) == (2.5, "rows.jsonl", "smollm2-135m")


def test_print_config_is_the_resolved_settings_and_reads_back(tmp_path, capsys):
    from rag.cli import parser
    from rag.config import subcommands
    from rag.config_file import parse_args, settings

    argv = ["eval", "--config", toml(tmp_path, '[rag]\nk = 5\nmodel = "smollm2-135m"\n'), "--mode", "bm25"]
    p = parser()
    args = parse_args(p, argv, "rag")
    text = printed(capsys, "rag", *argv)
    assert tomllib.loads(text) == {key: getattr(args, key) for key in settings(subcommands(p).choices["eval"])}
    assert (args.k, args.mode, args.model, args.docs) == (5, "bm25", "smollm2-135m", "data/demo")
    # the printed TOML is itself a config file that gives the same settings
    assert resolved(capsys, "rag", "eval", "--config", toml(tmp_path, text, "back.toml")) == tomllib.loads(text)


def test_unknown_key_names_file_key_and_nearest_fields(tmp_path, capsys):
    f = toml(tmp_path, "chunk_sise = 200\n")
    err = error(capsys, "rag", "eval", "--config", f)
    assert f in err and "'chunk_sise'" in err and "chunk_size" in err
    err = error(capsys, "finetune", "run", "--config", toml(tmp_path, "[finetune.run]\nepoch = 2\n"))
    assert "'epoch' in [finetune.run]" in err and "epochs" in err
    err = error(capsys, "rag", "ask", "--config", toml(tmp_path, "[finetun]\nepochs = 2\n"), "Why?")
    assert "'finetun'" in err and "finetune" in err
    # a key some other command takes is no typo: a top-level `epochs` is for finetune, and rag ignores it
    assert resolved(capsys, "rag", "eval", "--config", toml(tmp_path, "epochs = 2\n"))["k"] == 3


def test_wrong_types_and_bad_files_are_one_line(tmp_path, capsys):
    f = toml(tmp_path, 'k = "three"\n')
    err = error(capsys, "rag", "eval", "--config", f)
    assert f in err and "'k'" in err and "an integer" in err and '"three"' in err
    assert "true or false" in error(capsys, "rag", "eval", "--config", toml(tmp_path, "contextual = 1\n"))
    assert "train, test, all" in error(capsys, "rag", "eval", "--config", toml(tmp_path, '[rag.eval]\nsplit = "x"\n'))
    missing = str(tmp_path / "nope.toml")
    err = error(capsys, "rag", "eval", "--config", missing)
    assert missing in err and "no such file" in err
    err = error(capsys, "finetune", "run", "--config", toml(tmp_path, "[rag]\nk = \n"))
    assert "not valid TOML" in err and "line 2" in err
    # values the file sets are still checked by the config dataclass, as flags are
    assert "--k" in error(capsys, "rag", "eval", "--config", toml(tmp_path, "k = 0\n"))


def test_yaml_files_work_too(tmp_path, capsys):
    f = toml(tmp_path, "rag:\n  k: 5\nfinetune:\n  train:\n    lora_r: 8\n", "openbook.yaml")
    assert resolved(capsys, "rag", "ask", "--config", f, "Why?")["k"] == 5
    assert resolved(capsys, "finetune", "train", "--config", f, "--data", "x")["lora_r"] == 8


def test_the_example_config_loads_for_rag_and_finetune(capsys):
    example = tomllib.loads(EXAMPLE.read_text())
    for verb in (["ask", "What is the warranty?"], ["eval"]):
        s = resolved(capsys, "rag", *verb, "--config", str(EXAMPLE))
        assert s["docs"] == example["docs"] and all(s[k] == v for k, v in example["rag"].items())
    s = resolved(capsys, "finetune", "run", "--config", str(EXAMPLE))
    assert s["docs"] == example["docs"]
    assert all(s[k] == v for k, v in example["finetune"].items() if not isinstance(v, dict))
