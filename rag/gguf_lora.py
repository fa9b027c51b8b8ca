"""LoRA adapters for llama.cpp: a peft adapter folder converted once to a GGUF LoRA file, cached beside it.

Uses llama.cpp's own converter (``convert_lora_to_gguf.py``, with the ``conversion/`` and ``gguf-py/`` packages it
imports), taken from the llama-cpp-python source distribution that ``make setup`` builds and kept under
``~/.cache/openbook/llama.cpp-convert/<version>``. The converter reads the base model's config from its Hugging
Face folder (the de-quantised copy ``rag.models.generator_path`` keeps) and writes the adapter's A and B matrices
as f32; llama.cpp then adds (alpha/r)·BA to the 4-bit base weights at run time, or ``rag.gguf_merge`` merges it
into a Q8_0 base once. The cached file is named by a hash of the adapter's weights and config, so a re-trained
adapter is converted again. Left out on purpose: merging into a 4-bit base (``python -m finetune export`` writes a
merged GGUF from the full-precision model for other tools).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from rag.models import ModelNotFound, cache_dir, config_dir, model_name

log = logging.getLogger(__name__)
VERSION = "0.3.36"  # the llama-cpp-python release `make setup` builds; its converter matches its runtime
KEEP = ("convert_lora_to_gguf.py", "convert_hf_to_gguf.py", "conversion/", "gguf-py/")


class AdapterError(ModelNotFound):
    """An adapter that cannot run on llama.cpp; the message says why and what to do."""


class WrongBase(AdapterError):
    """An adapter trained on another base model: it runs on no backend with this one."""


def converter_dir() -> Path:
    """The folder holding llama.cpp's converter scripts, unpacked from the source distribution once."""
    out = cache_dir() / "llama.cpp-convert" / VERSION
    if (out / "convert_lora_to_gguf.py").exists():
        return out
    with tempfile.TemporaryDirectory() as tmp:
        log.info("fetching llama.cpp's converter scripts (llama-cpp-python %s source distribution, once)", VERSION)
        got = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                              f"llama-cpp-python=={VERSION}", "-d", tmp], capture_output=True, text=True)
        archives = list(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if got.returncode or not archives:
            raise AdapterError(f"could not get the llama-cpp-python {VERSION} source distribution for its LoRA "
                               f"converter ({(got.stderr or 'no archive').strip().splitlines()[-1]}); run `make setup`")
        staging = out.with_name(out.name + f".tmp-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        with tarfile.open(archives[0]) as tar:
            prefix = tar.getnames()[0].split("/")[0] + "/vendor/llama.cpp/"
            members = [m for m in tar.getmembers() if m.name.startswith(prefix)
                       and any(m.name[len(prefix):].startswith(k) for k in KEEP) and (m.isfile() or m.isdir())]
            for m in members:
                m.name = m.name[len(prefix):]
            tar.extractall(staging, members=members, filter="data")
        staging.rename(out)
    return out


def run_converter(script: str, source: str | Path, outfile: Path, args: list[str], what: str = "") -> None:
    """Run one of llama.cpp's converter scripts (``convert_lora_to_gguf.py``, ``convert_hf_to_gguf.py``) on its
    own packages, offline, writing ``outfile``; a failure becomes one ``AdapterError`` line naming ``what`` (default
    ``source``) and the converter's last words."""
    conv = converter_dir()
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(conv), str(conv / "gguf-py")]), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, str(conv / script), str(source), "--outfile", str(outfile), *args],
                         capture_output=True, text=True, env=env)
    if run.returncode or not outfile.exists():
        last = (run.stderr or run.stdout).strip().splitlines()[-1:] or ["no output"]
        raise AdapterError(f"llama.cpp's converter failed on {what or source} ({last[0][:200]})")


def adapter_stamp(adapter: str | Path) -> str:
    """A digest of a peft adapter folder's config and weights: what its answers depend on (the folder's other
    files, logs and the GGUF made from it, do not count)."""
    h = hashlib.sha256()
    for name in ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"):
        if (Path(adapter) / name).exists():
            h.update((Path(adapter) / name).read_bytes())
    return h.hexdigest()[:16]


def gguf_adapter(adapter: str | Path, base: str) -> str:
    """The GGUF LoRA file for a peft adapter folder trained on ``base`` (converted once, cached beside it)."""
    adapter = Path(adapter)
    if not (adapter / "adapter_model.safetensors").exists():
        raise AdapterError(f"{adapter}: no adapter_model.safetensors (llama.cpp needs the safetensors format)")
    base_dir = Path(config_dir(base))
    check_base(adapter, base_dir)  # every time: the cached file says nothing about which base it is used with
    out = adapter / f"adapter-{adapter_stamp(adapter)}.gguf"
    if out.exists():
        return str(out)
    tmp = out.with_suffix(f".tmp-{os.getpid()}")
    log.info("converting the LoRA adapter %s to GGUF for llama.cpp (once)", adapter)
    try:
        run_converter("convert_lora_to_gguf.py", adapter, tmp, ["--base", str(base_dir), "--outtype", "f32"])
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return str(out)


def check_base(adapter: str | Path, base_dir: str | Path) -> None:
    """Refuse an adapter trained on another base model, in one line: its matrices must fit the base's widths
    and layer count (checked from the safetensors header; no weights are read)."""
    import re

    from safetensors import safe_open

    adapter, base_dir = Path(adapter), Path(base_dir)
    if not (adapter / "adapter_model.safetensors").exists() or not (base_dir / "config.json").exists():
        return  # an old .bin adapter or a hub id: peft or llama.cpp will say what does not fit
    base = json.loads((base_dir / "config.json").read_text())
    widths = {base.get("hidden_size"), base.get("intermediate_size")}
    with safe_open(str(adapter / "adapter_model.safetensors"), "np") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    layers = {int(m.group(1)) for k in shapes if (m := re.search(r"\.layers\.(\d+)\.", k))}
    misfit = [k for k, shape in shapes.items() if "lora_A" in k and shape[-1] not in widths]
    if misfit or (layers and max(layers) >= base.get("num_hidden_layers", 10**6)):
        meta = json.loads((adapter / "adapter_config.json").read_text())
        recorded = model_name(meta.get("base_model_name_or_path") or "?")  # old adapters recorded a cache path
        raise WrongBase(f"{adapter} was trained on another base model ({recorded}), not on {base_dir.name}; "
                           "pass the --model it was trained on, or train it again for this one")
