"""On CPUs with AMX, a Q8_0 copy of a K-quant GGUF file, from which llama.cpp reads prompts ~1.3x faster.

ggml's AMX kernels load Q8_0 blocks into the tiles as they are, while 4-bit blocks are unpacked on the way and
K-quant blocks (the packaged readers are Q4_K_M) are also rescaled group by group. Measured on this project's
2-core VM (a Xeon with AMX, 2026-12-04, the 1.5B reader, an 800-token demo RAG prompt): as packaged (Q4_K_M)
llama.cpp read 150 prompt tokens/s and decoded a token in 82 ms; from a Q8_0 copy 203 tokens/s and 71 ms (Q4_0:
205 and 55 ms, but its grid is coarser than Q4_K's; bf16: 65 and 156 ms). In ``chat_batch``'s groups of 16 RAG
prompts the copy read 182 prompt tokens/s against 140. A RAG answer is mostly prompt reading (~570 prompt tokens
not shared with the previous prompt, ~20 answer tokens), so it comes ~1.2-1.3x sooner. Re-quantising Q4_K to Q8_0
rounds each weight again to 1/127 of its block's largest one, a small fraction of a Q4_K step, so the copy is
nearly the same model, not the same: 26 of 32 demo RAG answers came out word for word identical (near-ties: "for
up to 60 days" / "for 60 days"; one "2.0 kg" became "2.0 m"), and over the demo test split the 71 questions both
answered got 34 and 33 right. Calibrated judgement thresholds and cached base-model scores are measured on the file
that runs (``variant`` is part of their keys where they are cached).

The copy is made once (~10 s for the 1.5B; 1.9 GB on disk beside the 1.1 GB file) in ``~/.cache/openbook/gguf``,
named by the source file's name, size and modification time. CPUs without AMX keep the file as it is: on a 2-core
AMD EPYC with AVX-512 (2026-12-05) the copy was slower, an 1,104-token prompt and 32 answer tokens 17.5 s against
12.5 s, 32 closed-book questions in ``chat_batch`` 38.3 s against 29.3 s; copies in Q4_0 or IQ4_NL read no faster
there either (an 800-token prompt at 89-92 tokens/s against 94-100 as packaged, nor with other batch sizes or flash
attention; 2026-12-06). ``OPENBOOK_GGUF_Q8=0`` keeps the file on
every CPU; ``=1`` makes the copy on any.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

from rag.config import UserError
from rag.models import cache_dir, file_stamp, gguf_path

log = logging.getLogger(__name__)
ENV = "OPENBOOK_GGUF_Q8"
# general.file_type values of K-quant files (llama.h's LLAMA_FTYPE_MOSTLY_*): Q2_K .. Q6_K
K_QUANTS = {10: "Q2_K", 11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S",
            17: "Q5_K_M", 18: "Q6_K"}


@functools.cache
def _amx() -> bool:
    """Whether this llama.cpp build runs AMX kernels (built for a CPU that has them; see the Makefile)."""
    try:
        import llama_cpp
    except (ImportError, OSError):  # no llama.cpp here: nothing loads a GGUF file, so nothing to copy
        return False
    return b"AMX_INT8 = 1" in llama_cpp.llama_print_system_info()


def wanted() -> bool:
    """Make Q8_0 copies here: ``OPENBOOK_GGUF_Q8`` = 1 / 0, or auto (unset): on a llama.cpp build with AMX."""
    value = os.environ.get(ENV, "auto").strip().lower()
    if value in ("1", "on", "yes", "true"):
        return True
    if value in ("0", "off", "no", "false"):
        return False
    if value != "auto":
        raise UserError(f"{ENV}={value!r}: use 1 (a Q8_0 copy of K-quant GGUF files), 0 (the files as they are) "
                        "or leave it unset (auto: a copy on CPUs with AMX)")
    return _amx()


def file_type(path: str | Path) -> int | None:
    """The GGUF's ``general.file_type`` (None when the header does not say), read by llama.cpp loading only the
    vocabulary (~0.2 s for the 1.5B; the ``gguf`` package's reader parses every tensor and took ~6 s)."""
    stat = Path(path).stat()
    return _file_type(str(path), stat.st_size, stat.st_mtime_ns)


@functools.cache
def _file_type(path: str, size: int, mtime: int) -> int | None:
    import ctypes

    import llama_cpp
    from llama_cpp._utils import suppress_stdout_stderr

    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    with suppress_stdout_stderr(disable=False):  # llama.cpp reports the load on stderr
        model = llama_cpp.llama_model_load_from_file(path.encode(), params)
    if not model:
        return None  # not loadable: the real load that follows says why
    try:
        buf = ctypes.create_string_buffer(32)
        n = llama_cpp.llama_model_meta_val_str(model, b"general.file_type", buf, len(buf))
        return int(buf.value) if n > 0 and buf.value.isdigit() else None
    finally:
        llama_cpp.llama_model_free(model)


def variant(path: str | Path) -> str:
    """What llama.cpp runs for ``path``: 'q8_0' (a copy) or '' (the file itself)."""
    return "q8_0" if wanted() and file_type(path) in K_QUANTS else ""


def model_variant(name: str) -> str:
    """``variant`` of the GGUF file a model name runs from ('' for models llama.cpp does not run)."""
    path = gguf_path(name) if wanted() else None
    return variant(path) if path else ""


def runnable(path: str, threads: int | None = None) -> str:
    """The file llama.cpp loads for ``path``: its Q8_0 copy (made on first use, on ``threads`` threads; default all
    CPUs) where ``variant`` says so, else ``path``. Written to a temporary name and renamed, so a run killed mid-copy
    leaves no half file."""
    if not variant(path):
        return path
    import llama_cpp

    src = Path(path)
    out = cache_dir() / "gguf" / f"{src.stem}.q8_0-{file_stamp(src)}.gguf"
    if out.exists():
        return str(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.part-{os.getpid()}")
    log.warning("making a Q8_0 copy of %s for this CPU's AMX kernels (once, ~10 s for the 1.5B; %s=0 skips it): %s",
                src.name, ENV, out)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.allow_requantize = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, True
    params.nthread = threads or os.cpu_count()
    try:
        from llama_cpp._utils import suppress_stdout_stderr

        with suppress_stdout_stderr(disable=False):  # llama.cpp prints a line per tensor
            failed = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
        if failed:
            raise UserError(f"llama.cpp could not re-quantise {src} to Q8_0 (code {failed}); run with {ENV}=0 "
                            "to use the file as it is")
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return str(out)
