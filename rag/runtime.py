"""Which runtime answers for a model: ``load_generator`` picks llama.cpp or transformers and returns a
``rag.generate.Generator``.

Apart from ``rag/generate.py`` (the interface both runtimes implement) so that the backends can import the
interface and this module can import the backends without a loop. Left out on purpose: any other runtime (an
``openai:`` model goes to whatever serves it).
"""

from __future__ import annotations

import logging

from rag.generate import BackendUnavailable, Generator

log = logging.getLogger(__name__)
BACKENDS = ("auto", "llamacpp", "transformers")


def load_generator(name: str, max_new_tokens: int = 64, device: str | None = None, adapter: str | None = None,
                   backend: str = "auto") -> Generator:
    """The generator for a model name (registry name, GGUF file, HF folder, hub id, or ``openai:MODEL@URL``: a
    chat server, rag/backend_openai.py, where ``adapter`` is the name the server serves a LoRA under) on the best
    backend.

    ``auto``: llama.cpp when the model is a GGUF file (packaged models are), llama-cpp-python is installed and
    the device is the CPU, a peft adapter converted to a GGUF LoRA (rag/gguf_lora.py); transformers otherwise.
    An explicit ``llamacpp`` that cannot run raises ``BackendUnavailable``; ``auto`` falls back to transformers
    with a warning instead (but an adapter trained on another base model is refused on either).
    """
    if backend not in BACKENDS:
        raise ValueError(f"--backend must be one of {', '.join(BACKENDS)}, not '{backend}'")
    from rag.backend_openai import OpenAIGenerator, is_served

    if is_served(name):  # openai:MODEL@URL runs where it is served: no local runtime to choose
        if backend != "auto":
            raise BackendUnavailable(f"--model {name} is served over HTTP; drop --backend {backend}")
        return OpenAIGenerator(name, max_new_tokens, adapter=adapter)
    if backend in ("auto", "llamacpp"):
        from rag.backend_llamacpp import LlamaCppGenerator, why_not

        reason = why_not(name, device)
        # a broken runtime or adapter is worth a warning; a model that is not GGUF, or a GPU, is just routing
        broken = reason if reason and reason.startswith("llama-cpp-python") else None
        if reason is None:
            from rag.gguf_lora import AdapterError, WrongBase

            try:
                return LlamaCppGenerator(name, max_new_tokens, adapter=adapter)
            except WrongBase:
                raise
            except AdapterError as e:
                reason = broken = str(e)
        if backend == "llamacpp":
            raise BackendUnavailable(f"the llama.cpp backend cannot run '{name}': {reason}")
        if broken:
            log.warning("%s; falling back to transformers (slower on a CPU)", broken)
    from rag.backend_hf import TransformersGenerator

    return TransformersGenerator(name, max_new_tokens, device=device, adapter=adapter)
