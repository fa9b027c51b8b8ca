"""The model side of LoRA: load a base model (fp32, frozen bf16 on CPUs, or 4-bit for QLoRA), attach fresh LoRA
layers, load a trained adapter back onto its base, and merge it into a standalone model.

A saved adapter names its base model as the user gave it (a registry name such as ``smollm2-135m``, a hub id, a
path), never a folder in openbook's cache, so the adapter folder can be copied or shared; a merged model needs
nothing but its own folder. ``finetune/train.py`` runs the training loop around these; ``finetune/export.py`` and
the comparison load the results. Left out on purpose: anything that changes weights (that is training's job).
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
from pathlib import Path

from rag.atomic import replace_dir
from rag.models import generator_path, model_name, pick_device

# Attention projections per architecture; other model types get peft's own per-architecture table.
TARGET_MODULES = {"llama": "q_proj,k_proj,v_proj,o_proj", "qwen2": "q_proj,k_proj,v_proj,o_proj",
                  "mistral": "q_proj,k_proj,v_proj,o_proj", "gpt2": "c_attn"}


def use_qlora(setting: str, device: str) -> bool:
    """QLoRA when asked (``yes``), or by default (``auto``) on CUDA with bitsandbytes installed."""
    available = device == "cuda" and importlib.util.find_spec("bitsandbytes") is not None
    if setting == "yes" and not available:
        raise ValueError("--qlora yes needs a CUDA GPU and the bitsandbytes package")
    return setting == "yes" or (setting == "auto" and available)


def parameters(model: str) -> int:
    """The base model's parameter count, from its safetensors headers (no weights are read)."""
    from safetensors import safe_open

    n = 0
    for f in Path(generator_path(model)).glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            n += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())  # noqa: SIM118 (not a dict)
    return n


def frozen_bf16(precision: str, device: str, model: str) -> bool:
    """Whether the frozen base weights are held in bf16 (the adapters stay fp32): asked for with 'bf16' on a CPU,
    or 'auto' on a CPU that multiplies bf16 natively, for a model of 1B parameters or more. Measured on this
    project's 2-core AMX VM, 4 rows of 80 tokens a step: Qwen2.5-1.5B 8.2 s fp32 vs 3.7 s; SmolLM2-135M 1.0 vs
    0.8 s, whose published numbers were taken in fp32, so small models keep it. (On CUDA 'bf16' is mixed
    precision instead, the Trainer's ``bf16``.)"""
    if device != "cpu" or precision == "fp32":
        return False
    from rag.rerank import rerank_precision

    native = rerank_precision("auto") == "bf16"
    return precision == "bf16" or (native and parameters(model) >= 1_000_000_000)


def load_base(model: str, device: str, qlora: bool = False, bf16: bool = False):
    """The base causal LM (fp32, bf16 when ``bf16``, or 4-bit NF4 for QLoRA) on ``device``, and its tokenizer
    with a pad token."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = generator_path(model)
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:  # padding is masked out of attention and loss, so any token will do
        tok.pad_token = tok.eos_token
    if not qlora:
        dtype = torch.bfloat16 if bf16 else torch.float32
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device), tok
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.bfloat16)
    # the current GPU: under accelerate launch each process's own (a 4-bit model cannot be moved after loading)
    base = AutoModelForCausalLM.from_pretrained(path, quantization_config=q,
                                                device_map={"": torch.cuda.current_device()})
    return prepare_model_for_kbit_training(base, use_gradient_checkpointing=False), tok


def add_lora(model, cfg):
    """Wrap ``model`` with fresh LoRA layers (B = 0, so its outputs are unchanged until the first step); ``cfg``
    gives lora_r, lora_alpha, lora_dropout, target_modules and lora_layers (a ``TrainConfig``). On a CPU the
    dropout draws its masks four at a time (``cheap_dropout``)."""
    from peft import LoraConfig, get_peft_model

    spec = TARGET_MODULES.get(model.config.model_type) if cfg.target_modules == "auto" else cfg.target_modules
    targets = spec if spec in (None, "all-linear") else spec.replace(" ", "").split(",")
    top = lora_blocks(cfg.lora_layers, model.num_parameters(), model.config.num_hidden_layers)
    if top and (targets is not None or cfg.lora_layers > 0):  # auto with peft's own target guess: every block
        targets = top_layers(model, targets, top)
    peft = get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, target_modules=targets,
                                            lora_dropout=cfg.lora_dropout, task_type="CAUSAL_LM"))
    if next(peft.parameters()).device.type == "cpu":
        cheap_dropout(peft)
    return peft


def lora_blocks(setting: int, params: int, blocks: int) -> int:
    """How many of the last transformer blocks get adapters (0: every one) for ``--lora-layers setting`` on a
    model of ``params`` parameters and ``blocks`` blocks: -1 (auto) halves a model of 1B parameters or more,
    where the backward pass through the lower half was ~30% of a step on 2 cores, and keeps every block of a
    smaller one, whose steps are cheap and whose published numbers adapted every block."""
    if setting >= 0:
        return setting
    return blocks // 2 if params >= 1_000_000_000 else 0


def top_layers(model, targets: str | list[str] | None, top: int) -> list[str]:
    """The full names of the linear modules ``targets`` names (or every one, for 'all-linear') in the last ``top``
    transformer blocks: no trainable weight below them, so autograd neither keeps their activations nor runs
    their backward pass. (peft's ``layers_to_transform`` refuses 'all-linear'.)"""
    import re

    import torch

    n = model.config.num_hidden_layers
    if targets is None:
        raise ValueError("--lora-layers needs --target-modules 'all-linear' or module names")
    if not 0 < top <= n:
        raise ValueError(f"--lora-layers {top}: the model has {n} layers")
    names = []
    for name, module in model.named_modules():
        block = re.search(r"\.(\d+)\.", name)  # the blocks' ModuleList index, the first number in the name
        if (isinstance(module, torch.nn.Linear) and block and int(block[1]) >= n - top
                and (targets == "all-linear" or name.rsplit(".", 1)[-1] in targets)):
            names.append(name)
    if not names:
        raise ValueError(f"--lora-layers {top}: no linear module named {targets!r} in the last {top} blocks")
    return names


def cheap_dropout(model) -> None:
    """Swap each LoRA input's ``nn.Dropout`` for one that cuts its mask from 64-bit random words, four 16-bit
    draws a word. The same dropout (drop probability p rounded to 1/65,536, kept
    values scaled by 1/(1-p)), another random stream. torch's CPU generator makes one draw per element: on a
    2-core AMD EPYC (2026-12-05) the masks took 1.0 of the 1.5B's 8.1 s a closed-book step (profiler), and one
    mask of 380 × 8,960 took 23 ms where this takes 7; forward and backward of one 1,024-token row 46.7 → 39.3 s.
    CPU only: a GPU's generator is fast."""
    import torch

    class Dropout(torch.nn.Module):
        def __init__(self, p: float):
            super().__init__()
            self.p, self.cut = p, -32768 + round(p * 65536)  # an int16 below cut is dropped: P = round(p·2¹⁶)/2¹⁶

        def forward(self, x):
            if not self.training:
                return x
            n = x.numel()
            words = torch.randint(-2**63, 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=x.device)
            draws = words.view(torch.int16)[:n].view(x.shape)
            # where() keeps a 1-byte mask for the backward pass; x times a float mask kept 4 bytes an element.
            # Activations after the forward pass of one 1,024-token row (RAFT's length) through the 1.5B: 5.7 GB
            # this way, 7.3 GB with the float mask, 9.0 GB with torch's dropout (AMD VM, 2026-12-05)
            return torch.where(draws >= self.cut, x * (1 / (1 - self.p)), 0.0)

        def extra_repr(self) -> str:
            return f"p={self.p}"

    for module in model.modules():
        for name, drop in getattr(module, "lora_dropout", {}).items():
            if isinstance(drop, torch.nn.Dropout) and drop.p > 0:
                module.lora_dropout[name] = Dropout(drop.p)


def save_atomically(dest: Path, *objects, base: str = "") -> None:
    """``save_pretrained`` each object into a temp folder renamed to ``dest``: never half a model on disk. With
    ``base`` (the ``--model`` trained from), a saved adapter records it by that name (``record_base``)."""
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for obj in objects:
        obj.save_pretrained(str(tmp))
    if base:
        record_base(tmp, base)
    replace_dir(tmp, dest)


def record_base(folder: Path, model: str) -> None:
    """Make a saved adapter name its base model as ``model_name`` does (``smollm2-135m``, a hub id, the user's own
    path), not by the cache folder peft loaded it from, so the folder works when copied or shared. Rewritten after
    saving rather than set on the model: peft checks the recorded name for a config.json at every save and warns
    when a registry name has none."""
    cfg, card, name = folder / "adapter_config.json", folder / "README.md", model_name(model)
    meta = json.loads(cfg.read_text())
    local = meta["base_model_name_or_path"]
    cfg.write_text(json.dumps(meta | {"base_model_name_or_path": name}, indent=2, sort_keys=True) + "\n")
    if card.exists() and local:  # peft's model card names it too: `base_model:` and a tag
        card.write_text(card.read_text().replace(local, name))


def adapter_dir(path: str | Path) -> Path:
    """The adapter folder inside a training output dir (``<dir>/adapter``), or ``path`` itself if it is one."""
    p = Path(path)
    p = p / "adapter" if (p / "adapter" / "adapter_config.json").exists() else p
    if not (p / "adapter_config.json").exists():
        raise FileNotFoundError(f"no LoRA adapter in {path} (adapter_config.json missing)")
    return p


def load_tuned(path: str | Path, device: str | None = None, bf16: bool = False):
    """(model, tokenizer): the base model (fp32, or bf16 when ``bf16``) with the adapter in ``path`` (a training
    output_dir or the adapter folder itself) applied, on ``device`` (default cuda › mps › cpu), in eval mode."""
    import torch
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = adapter_dir(path)
    recorded = PeftConfig.from_pretrained(str(d)).base_model_name_or_path  # a registry name, or an old cache path
    base = AutoModelForCausalLM.from_pretrained(generator_path(model_name(recorded)),
                                                dtype=torch.bfloat16 if bf16 else torch.float32)
    model = PeftModel.from_pretrained(base, str(d)).to(device or pick_device()).eval()
    return model, AutoTokenizer.from_pretrained(str(d))


def merge(adapter_dir: str | Path, out_dir: str | Path) -> str:
    """Fold B·A·(alpha/r) into W₀ and save a standalone model that plain ``AutoModelForCausalLM`` loads."""
    model, tok = load_tuned(adapter_dir, device="cpu")
    Path(out_dir).parent.mkdir(parents=True, exist_ok=True)
    save_atomically(Path(out_dir), model.merge_and_unload(), tok)
    return str(out_dir)
