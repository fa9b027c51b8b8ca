"""A LoRA merged into a Q8_0 base GGUF, so llama.cpp runs a fine-tuned model at the base model's speed.

llama.cpp applies a GGUF LoRA at run time as W₀x + (α/r)·B(Ax) in every adapted layer: two extra f32 matrix products
with an inner size of r (16) and an add, outside ggml's AMX kernels. Measured on this project's 2-core VM
(2026-12-05, the 1.5B reader's Q8_0 copy, 16 demo RAG prompts answered together by the RAFT adapter): 77.3 s applied
at run time (142 prompt tokens/s), 61.8 s merged (177), the same 16 answers; ``make compare``'s adapter arms took
~20% less time. Merged, the adapted weights are W₀ + (α/r)·BA, written as Q8_0 again: the base's blocks are
de-quantised, the product added, and each block of 32 rounded to 1/127 of its largest value (``gguf.quants``, the GGUF
package's reference code), so the merged model differs from the adapter applied at run time by about one Q8_0
rounding of each adapted weight, as any fine-tune exported to Q8_0 does.

The merged file is made once (~30 s for the 1.5B, 1.9 GB) beside the adapter's GGUF LoRA, named by that file and
the base file's name, size and modification time, written under a temporary name and renamed; a newer merge
replaces the older ones in that folder. Only bases whose adapted weights are all Q8_0 (the AMX copy of
``rag.gguf_q8``, or a Q8_0 file a user passes): merging into a 4-bit base would re-quantise the sum to 4 bits and
lose most of what a small LoRA changed. ``OPENBOOK_LORA_MERGE=0`` applies the adapter at run time instead.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from rag.config import UserError
from rag.models import file_stamp

log = logging.getLogger(__name__)
ENV = "OPENBOOK_LORA_MERGE"
Q8_0 = 7  # llama.h's LLAMA_FTYPE_MOSTLY_Q8_0, a file's general.file_type


def wanted() -> bool:
    """``OPENBOOK_LORA_MERGE``: 1 or unset merges adapters into Q8_0 bases, 0 applies them at run time."""
    value = os.environ.get(ENV, "1").strip().lower()
    if value not in ("1", "on", "yes", "true", "0", "off", "no", "false"):
        raise UserError(f"{ENV}={value!r}: use 1 (merge adapters into Q8_0 base models; the default) or 0 (apply "
                        "them at run time)")
    return value in ("1", "on", "yes", "true")


def merged_path(base: str, lora: str) -> str | None:
    """The merged file for the GGUF LoRA ``lora`` on the base file ``base`` (made on first use), or None when the
    base is not Q8_0 or merging is off: llama.cpp then applies the LoRA at run time."""
    from rag.gguf_q8 import file_type

    if not wanted() or file_type(base) != Q8_0:
        return None
    src, lora_p = Path(base), Path(lora)
    out = lora_p.with_name(f"{lora_p.stem}.merged-{file_stamp(src)}.gguf")
    if out.exists():
        return str(out)
    tmp = out.with_name(f"{out.name}.part-{os.getpid()}")
    try:
        if not merge(src, lora_p, tmp):
            return None
        tmp.replace(out)
    except OSError as e:  # a full disk or a read-only adapter folder: the run-time LoRA answers the same, slower
        log.warning("could not write the merged model %s (%s); llama.cpp applies the adapter at run time", out, e)
        return None
    finally:
        tmp.unlink(missing_ok=True)
    for old in lora_p.parent.glob("adapter-*.merged-*.gguf"):  # earlier adapters' or bases' merges: 1.9 GB each
        if old != out:
            old.unlink(missing_ok=True)
    return str(out)


def merge(base: Path, lora: Path, out: Path, scale: float = 1.0) -> bool:
    """Write ``base`` with ``lora`` merged into ``out`` (``scale``: llama.cpp's ``lora_scale``, 1 as the generator
    applies it); False, with nothing written, when an adapted weight is not Q8_0."""
    import gguf
    import numpy as np
    from gguf import GGMLQuantizationType as T
    from tqdm import tqdm

    ad = gguf.GGUFReader(lora)
    alpha = ad.get_field("adapter.lora.alpha")
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for t in ad.tensors:  # "blk.0.attn_q.weight.lora_a": A is (r, in), B is (out, r)
        name, _, part = t.name.rpartition(".")
        pairs.setdefault(name, {})[part] = t.data
    rd = gguf.GGUFReader(base)
    tensors = {t.name: t for t in rd.tensors}
    misfit = [n for n in pairs if n not in tensors or tensors[n].tensor_type != T.Q8_0]
    if misfit:
        log.info("not merging %s: %s is not a Q8_0 weight of %s; llama.cpp applies it at run time", lora.name,
                 misfit[0], base.name)
        return False
    log.warning("merging the adapter %s into %s for llama.cpp (once, ~30 s for the 1.5B; %s=0 skips it): %s",
                lora.name, base.name, ENV, out)
    logging.getLogger("gguf.gguf_writer").setLevel(logging.WARNING)  # it lists the files it writes at INFO
    writer = gguf.GGUFWriter(out, arch=str(rd.get_field(gguf.Keys.General.ARCHITECTURE).contents()))
    for field in rd.fields.values():  # every key as it was (the writer adds the architecture and GGUF.* itself)
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        kind = field.types[0]
        writer.add_key_value(field.name, field.contents(), kind,
                             sub_type=field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None)
    for t in rd.tensors:  # merged tensors keep their type and byte size, so the layout is the base's
        writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in tqdm(rd.tensors, desc="merge LoRA", unit="tensor", disable=None):
        data = t.data
        if t.name in pairs:
            a, b = pairs[t.name]["lora_a"], pairs[t.name]["lora_b"]
            times = scale * (float(alpha.contents()) / a.shape[0] if alpha else 1.0)  # llama.cpp's: α/r, 1 without α
            w = gguf.quants.dequantize(data, T.Q8_0) + times * (b.astype(np.float32) @ a.astype(np.float32))
            data = gguf.quants.quantize(w.astype(np.float32), T.Q8_0)
        writer.write_tensor_data(data, tensor_endianess=rd.endianess)
    writer.close()
    return True
