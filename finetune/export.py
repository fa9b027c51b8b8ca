"""Export a fine-tuned model as one GGUF file that any llama.cpp-based tool runs (llama.cpp, Ollama, LM Studio).

Merges the LoRA adapter into its base model (``finetune.lora.merge``: W₀ + (α/r)·BA, saved as a plain Hugging
Face folder), converts that folder with llama.cpp's own ``convert_hf_to_gguf.py`` (the converter scripts
``rag.gguf_lora`` keeps), and checks that llama.cpp loads the result before it replaces any earlier file. Q8_0 by
default: a quarter of fp32 and, unlike a 4-bit re-quantisation, it keeps what a small LoRA changed. Left out on
purpose: 4-bit output (llama.cpp's ``llama-quantize`` does it from this file) and uploading anywhere.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from finetune.lora import adapter_dir, merge
from rag.gguf_lora import run_converter

OUTTYPES = ("q8_0", "f16", "bf16", "f32")


def export(adapter: str | Path, out: str | Path, outtype: str = "q8_0") -> str:
    """Write ``out`` (a .gguf file): the adapter merged into its base, converted, and loaded once to check it."""
    if outtype not in OUTTYPES:
        raise ValueError(f"--outtype must be one of {', '.join(OUTTYPES)}, not '{outtype}'")
    out = Path(out)
    if out.suffix.lower() != ".gguf":
        raise ValueError(f"--out {out}: name the file .gguf")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        merged = merge(adapter_dir(adapter), Path(tmp) / "merged")
        staged = Path(tmp) / out.name
        run_converter("convert_hf_to_gguf.py", merged, staged, ["--outtype", outtype], what="the merged model")
        _check_loads(staged)
        staged.replace(out)
    return str(out)


def _check_loads(path: Path) -> None:
    """llama.cpp must load the file and decode a token (only when llama-cpp-python is installed)."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return
    llm = Llama(model_path=str(path), n_ctx=64, verbose=False)
    llm.create_completion("Hello", max_tokens=1)
