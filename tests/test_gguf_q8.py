"""The Q8_0 copy of K-quant GGUF files (rag.gguf_q8), on a real K-quant file made from the packaged SmolLM2."""

import os

import pytest

from rag.config import UserError
from rag.models import SMALL_GENERATOR, gguf_path

llama_cpp = pytest.importorskip("llama_cpp")
from rag import gguf_q8  # noqa: E402  (after the skip: it needs llama_cpp)


@pytest.fixture(scope="module")
def k_quant(tmp_path_factory):
    """SmolLM2-135M re-quantised from its packaged Q4_1 to Q4_K_M: a small K-quant file, as the 1.5B reader's."""
    out = tmp_path_factory.mktemp("kq") / "smollm2-q4_k_m.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.allow_requantize = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M, True
    assert llama_cpp.llama_model_quantize(gguf_path(SMALL_GENERATOR).encode(), str(out).encode(), params) == 0
    return out


def test_q8_copy_is_made_once_and_runs(k_quant, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENBOOK_CACHE", str(tmp_path))
    monkeypatch.setenv(gguf_q8.ENV, "1")
    assert gguf_q8.file_type(k_quant) == 15  # Q4_K_M
    copy = gguf_q8.runnable(str(k_quant))
    assert copy != str(k_quant) and copy.startswith(str(tmp_path / "gguf")) and gguf_q8.file_type(copy) == 7  # Q8_0
    made = os.stat(copy).st_mtime_ns
    assert gguf_q8.runnable(str(k_quant)) == copy and os.stat(copy).st_mtime_ns == made  # cached, not re-made
    assert not [p for p in (tmp_path / "gguf").iterdir() if ".part-" in p.name]  # no temporary file left

    from rag.backend_llamacpp import LlamaCppGenerator

    gen = LlamaCppGenerator(str(k_quant), max_new_tokens=8)  # loads the copy
    assert gen.llm.model_path == copy
    assert gen.chat([{"role": "user", "content": "Say hello."}]).new_tokens > 0

    os.utime(k_quant, ns=(made + 10**9, made + 10**9))  # a changed source file gets a new copy
    assert gguf_q8.runnable(str(k_quant)) != copy


def test_files_kept_as_they_are(k_quant, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENBOOK_CACHE", str(tmp_path))
    monkeypatch.setenv(gguf_q8.ENV, "0")
    assert gguf_q8.runnable(str(k_quant)) == str(k_quant) and gguf_q8.variant(k_quant) == ""
    monkeypatch.setenv(gguf_q8.ENV, "1")
    packaged = gguf_path(SMALL_GENERATOR)  # Q4_1, not a K-quant: not copied
    assert gguf_q8.file_type(packaged) == 3 and gguf_q8.runnable(packaged) == packaged
    assert not (tmp_path / "gguf").exists()
    monkeypatch.setenv(gguf_q8.ENV, "maybe")
    with pytest.raises(UserError, match="OPENBOOK_GGUF_Q8='maybe'"):
        gguf_q8.wanted()


def test_calibration_key_names_the_copy(k_quant, tmp_path, monkeypatch):
    """A rule calibrated on the copy's judgements is not used for the file's, nor the reverse."""
    from rag.pipeline import RagConfig, RagPipeline

    monkeypatch.setenv("OPENBOOK_CACHE", str(tmp_path))
    pipe = RagPipeline(RagConfig(docs=str(tmp_path), index_dir=str(tmp_path / "index"), model=str(k_quant),
                                 mode="bm25"))
    monkeypatch.setenv(gguf_q8.ENV, "1")
    on = pipe.calibration_key()
    monkeypatch.setenv(gguf_q8.ENV, "0")
    off = pipe.calibration_key()
    assert on == off.replace(f"|{k_quant}|", f"|{k_quant}@q8_0|") and on != off
