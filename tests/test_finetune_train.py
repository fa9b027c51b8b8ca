"""LoRA training on the packaged SmolLM2-135M: label masking, B = 0 at step 0, real optimiser steps, save →
load and merged vs unmerged logit parity, resume from a checkpoint, and flag-naming config errors."""

from __future__ import annotations

import json

import pytest
import torch
from datasets import Dataset

from finetune.lora import add_lora, load_base, load_tuned, merge
from finetune.rows import AnswerCollator, DataError, tokenize_example
from finetune.train import TrainConfig, snapshot_dirs
from finetune.train import train as train_lora

torch.set_num_threads(1)  # the suite shares two cores with other jobs

FACTS = [
    ("What colour is the door of the Ghent office?", "The door of the Ghent office is green."),
    ("How many meeting rooms does the Ghent office have?", "It has 12 meeting rooms."),
    ("When was the company founded?", "It was founded in 2014."),
    ("How long is the return window?", "Devices can be returned within 45 days."),
    ("What does the Plus plan cost?", "The Plus plan costs EUR 23 per month."),
    ("How much water does a lawn need?", "About 25 millimetres per week."),
    ("Who founded the company?", "Two engineers in a garage in Ghent."),
    ("When does the Ghent office open?", "It opens at 08:30."),
]
MESSAGES = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in FACTS]
PROBE = "<|im_start|>user\nWhen was the company founded?<|im_end|>\n<|im_start|>assistant\n"


def tiny_config(out, **kw) -> TrainConfig:
    # r=8 on the attention projections: the mechanics under test do not need the larger default, and it is faster
    base = dict(model="smollm2-135m",
                output_dir=str(out), max_steps=8, batch_size=2, learning_rate=1e-3, max_length=64, warmup=0.1,
                logging_steps=1, eval_steps=4, threads=1, early_stopping_patience=3, seed=0, lora_r=8, lora_alpha=16,
                snapshots=3,
                target_modules="auto")
    return TrainConfig(**{**base, **kw})


def answer_loss(model, tok) -> float:
    """Mean cross-entropy on the answer tokens of all FACTS, in one padded batch."""
    from transformers import DataCollatorForSeq2Seq

    rows = [tokenize_example(tok, m, 64) for m in MESSAGES]
    batch = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)(rows)
    with torch.no_grad():
        return model(**batch).loss.item()


@pytest.fixture(scope="session")
def base():
    """(model, tokenizer): the plain base model, loaded once; tests must not wrap or train it."""
    return load_base("smollm2-135m", "cpu")


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """One real 8-step run on 16 rows (FACTS twice; 1 held out for eval loss), shared by the tests below."""
    out = tmp_path_factory.mktemp("lora")
    return out, train_lora(tiny_config(out), Dataset.from_dict({"messages": MESSAGES * 2}))


def logits(model, tok) -> torch.Tensor:
    with torch.no_grad():
        return model(**tok(PROBE, return_tensors="pt", add_special_tokens=False)).logits


def test_labels_mask_the_prompt_and_keep_the_answer(base):
    _, tok = base
    msgs = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "Four."}]
    ex = tokenize_example(tok, msgs, 256)
    prompt = tok(tok.apply_chat_template(msgs[:1], add_generation_prompt=True, tokenize=False),
                 add_special_tokens=False)["input_ids"]
    n = len(prompt)
    assert ex["input_ids"][:n] == prompt and ex["labels"][:n] == [-100] * n
    assert ex["labels"][n:] == ex["input_ids"][n:] and ex["attention_mask"] == [1] * len(ex["input_ids"])
    assert tok.decode(ex["input_ids"][n:]) == "Four.<|im_end|>\n"

    # Too long: the prompt loses its left side (the system text), the answer survives whole.
    long = [{"role": "user", "content": "word " * 100 + "What is 2+2?"}, msgs[1]]
    cut = tokenize_example(tok, long, 32)
    answer = [t for t in cut["labels"] if t != -100]
    assert len(cut["input_ids"]) == 32 and tok.decode(answer) == "Four.<|im_end|>\n"
    assert tok.decode(cut["input_ids"][:len(cut["input_ids"]) - len(answer)]).endswith("2+2?<|im_end|>\n"
                                                                                      "<|im_start|>assistant\n")
    with pytest.raises(DataError, match="assistant"):
        tokenize_example(tok, msgs[:1], 256)


def test_lora_at_step_0_is_the_base_model():
    model, tok = load_base("smollm2-135m", "cpu")  # its own copy: add_lora rewrites the modules in place
    before = logits(model, tok)
    lora = add_lora(model, TrainConfig(output_dir="unused"))
    # the default, r=16 on every linear layer of 30 blocks: r·(in+out) for q, o (576→576), k, v (576→192),
    # gate, up (576→1536) and down (1536→576) is 162,816 per block
    assert lora.get_nb_trainable_parameters()[0] == 30 * 162_816
    assert torch.allclose(logits(lora.eval(), tok), before, atol=1e-6)


def test_lora_on_the_top_layers_alone_keeps_the_backward_pass_out_of_the_layers_below(base):
    """--lora-layers N: every linear module of the last N blocks gets an adapter and nothing below does, so the
    hidden states below carry no gradient (autograd neither keeps their activations nor runs their backward)."""
    import re

    from finetune.lora import lora_blocks, parameters, top_layers

    model, _ = load_base("smollm2-135m", "cpu")
    lora = add_lora(model, TrainConfig(output_dir="unused", lora_layers=4))
    assert lora.get_nb_trainable_parameters()[0] == 4 * 162_816  # as the whole model's, 4 blocks of 30
    assert {int(re.search(r"layers\.(\d+)\.", n)[1]) for n, p in lora.named_parameters() if p.requires_grad} \
        == {26, 27, 28, 29}
    states = lora(input_ids=torch.tensor([[1, 2, 3, 4]]), output_hidden_states=True).hidden_states
    assert not states[26].requires_grad and states[27].requires_grad  # block 25's output, block 26's
    # the default (-1): the top half of a model of 1B parameters or more (the 1.5B), every block below (this one)
    assert (lora_blocks(-1, parameters("qwen-1.5b"), 28), lora_blocks(-1, model.num_parameters(), 30),
            lora_blocks(4, 1_500_000_000, 28)) == (14, 0, 4)
    with pytest.raises(ValueError, match="--lora-layers 31: the model has 30 layers"):
        top_layers(base[0], "all-linear", 31)
    with pytest.raises(ValueError, match="no linear module named"):
        top_layers(base[0], ["c_attn"], 4)  # GPT-2's name, not this model's


def test_lora_dropout_on_a_cpu_drops_p_of_the_inputs_and_rescales_the_rest():
    model, _ = load_base("smollm2-135m", "cpu")
    lora = add_lora(model, TrainConfig(output_dir="unused", lora_dropout=0.1))
    drops = [d for m in lora.modules() for d in getattr(m, "lora_dropout", {}).values()]
    assert len(drops) == 30 * 7 and not any(isinstance(d, torch.nn.Dropout) for d in drops)
    drop = drops[0].train()
    x = torch.full((200, 1000), 2.0, requires_grad=True)
    torch.manual_seed(0)
    y = drop(x)
    assert abs((y == 0).float().mean().item() - 0.1) < 0.005  # 200,000 draws: one standard deviation is 0.0007
    assert torch.allclose(y[y != 0], torch.tensor(2.0 / 0.9))  # kept inputs scaled so the expectation is x
    for k in range(4):  # each 16-bit quarter of a random word is a draw of its own
        assert abs((y.view(-1, 4)[:, k] == 0).float().mean().item() - 0.1) < 0.01
    y.sum().backward()
    assert torch.equal(x.grad == 0, y == 0)
    torch.manual_seed(0)
    assert torch.equal(drop(x), y)  # seeded like torch's own (a resumed run draws the same masks)
    assert drop(x.detach().bfloat16()).dtype == torch.bfloat16
    assert torch.equal(drop.eval()(x), x)


def test_logits_at_the_answer_positions_alone_give_the_same_loss_and_gradients():
    model, tok = load_base("smollm2-135m", "cpu")
    lora = add_lora(model, TrainConfig(output_dir="unused", lora_r=4, lora_dropout=0.0, target_modules="auto"))
    with torch.no_grad():  # B = 0 would leave every A without a gradient to compare
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.02)
    rows = [tokenize_example(tok, m, 64) for m in MESSAGES[:4]]
    collate = AnswerCollator(tok, lora)
    assert collate.answer_only
    runs = []
    for batch in (collate.pad(rows), collate(rows)):  # the plain padded batch, then with logits_to_keep
        lora.zero_grad()
        out = lora(**batch)
        out.loss.backward()
        runs.append((out, {n: p.grad.clone() for n, p in lora.named_parameters() if p.requires_grad}))
    (full, full_grads), (answer, answer_grads) = runs
    n_labels = sum(t != -100 for r in rows for t in r["labels"])
    assert full.logits.shape[:2] == (4, max(len(r["input_ids"]) for r in rows))
    assert answer.logits.shape[0] == n_labels  # one row of logits per labelled token, nothing for the prompts
    assert torch.allclose(answer.loss, full.loss, atol=1e-5)
    assert any(g.abs().sum() > 0 for g in full_grads.values())
    for name, grad in full_grads.items():
        assert torch.allclose(answer_grads[name], grad, atol=1e-6, rtol=1e-4), name


def test_training_lowers_the_loss_and_writes_its_outputs(trained, base):
    out, run = trained
    m = run.metrics
    assert m["steps"] == 8 and m["resumed_from_step"] == 0 and m["trainable_params"] == 921_600
    assert [s for s, _ in m["train_loss_history"]] == list(range(1, 9))  # one per step
    assert [s for s, _ in m["eval_loss_history"]] == [4, 8] and m["final_eval_loss"] is not None
    assert m["tokens_per_second"] > 0 and m["device"] == "cpu"
    assert answer_loss(run.model, run.tokenizer) < answer_loss(*base) - 0.3  # learned: 2.5 → 1.8

    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= {
        f.name for f in (out / "adapter").iterdir()}
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["lora_r"] == 8 and cfg["dataset_rows"] == 16 and cfg["eval_rows"] == 1
    assert json.loads((out / "metrics.json").read_text())["steps"] == 8
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "checkpoints" / "checkpoint-8").is_dir()
    assert list(snapshot_dirs(out)) == [2, 4, 6]  # --snapshots 3: evenly spaced before the last step


def test_learning_curve_scores_each_snapshot_between_base_and_end(trained, tmp_path):
    from finetune.evaluate import EvalConfig, learning_curve, plot_curve

    out, run = trained
    items = [{"id": f"q{i}", "question": q, "answer": a.split()[-1].rstrip("."), "sources": ["x.md"]}
             for i, (q, a) in enumerate(FACTS[:2])]
    ends = [{"qa": {"facts": {"contains": v}}} for v in (0.0, 1.0)]  # what the full base and tuned evals gave
    rows = learning_curve(EvalConfig(model="smollm2-135m",
                                     max_new_tokens=8), {"facts": items}, snapshot_dirs(out), *ends, 8,
                          progress=False)
    assert [r["step"] for r in rows] == [0, 2, 4, 6, 8] and [rows[0]["facts"], rows[-1]["facts"]] == [0.0, 1.0]
    assert all(r["facts"] in (0.0, 0.5, 1.0) for r in rows)  # scored on the two questions at each snapshot
    plot_curve(rows, tmp_path / "c.png", "test")
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


def test_intervals_pair_tuned_with_base_on_the_answerable_questions():
    from finetune.evaluate import intervals

    def result(correct):  # four answerable questions and one unanswerable, which "contains" leaves out
        rows = [{"expected": "a", "correct": c} for c in correct] + [{"expected": None, "correct": False}]
        return {"qa": {"s": {}}, "per_question": {"s": rows}}

    iv = intervals(result([False, False, True, False]), result([True, True, True, False]), 500)["s"]
    assert iv["n"] == 4 and iv["base"][0] == 0.25 and iv["tuned"][0] == 0.75
    diff, lo, hi = iv["tuned_minus_base"]
    assert diff == 0.5 and 0 <= lo < diff < hi <= 1  # paired: no question lost, so never below 0


def test_min_steps_lengthens_a_run_over_a_small_data_set(tmp_path):
    # 8 rows, batch 2, 1 epoch = 4 steps; at least 6 were asked for
    cfg = tiny_config(tmp_path, max_steps=-1, epochs=1.0, min_steps=6, eval_steps=100, snapshots=0)
    m = train_lora(cfg, Dataset.from_dict({"messages": MESSAGES})).metrics
    assert m["steps"] == 6 and not snapshot_dirs(tmp_path)


def test_saved_adapter_and_merged_model_give_the_same_logits(trained, base, tmp_path):
    from transformers import AutoModelForCausalLM

    out, run = trained
    tok = run.tokenizer
    expected = logits(run.model, tok)
    assert not torch.allclose(expected, logits(*base), atol=1e-3)  # the adapter changed something

    loaded, loaded_tok = load_tuned(out, device="cpu")
    assert loaded_tok("x")["input_ids"] == tok("x")["input_ids"]
    assert torch.allclose(logits(loaded, tok), expected, atol=1e-5)

    merged_dir = merge(out / "adapter", tmp_path / "merged")
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    assert torch.allclose(logits(merged, tok), expected, atol=1e-4)


def test_resume_after_an_interruption_reproduces_the_uninterrupted_run(tmp_path):
    import shutil

    data = Dataset.from_dict({"messages": MESSAGES})  # 8 rows: too few for an eval slice
    cfg = tiny_config(tmp_path, max_steps=4, eval_steps=2)
    full = train_lora(cfg, data).metrics
    shutil.rmtree(tmp_path / "checkpoints" / "checkpoint-4")  # as if the run died after saving step 2
    resumed = train_lora(cfg, data, resume=True).metrics
    assert resumed["resumed_from_step"] == 2 and resumed["steps"] == 4
    assert [s for s, _ in resumed["train_loss_history"]] == [1, 2, 3, 4]  # steps 1-2 come from the checkpoint
    # Same optimiser, schedule, RNG and data position: steps 3-4 repeat the uninterrupted run.
    losses = [loss for _, loss in resumed["train_loss_history"]]
    assert losses == pytest.approx([loss for _, loss in full["train_loss_history"]], rel=1e-4)
    again = train_lora(cfg, data, resume=True).metrics
    assert again == resumed  # a finished run is loaded, not trained a 5th step (which Trainer alone would do)


def test_config_errors_name_the_flag(tmp_path, capsys):
    for kw, flag in [({"lora_r": 0}, "--lora-r"), ({"warmup": 1.5}, "--warmup"), ({"qlora": "x"}, "--qlora"),
                     ({"max_steps": 0}, "--max-steps"), ({"model": "nonsense"}, "--model")]:
        with pytest.raises(ValueError, match=flag):
            TrainConfig(**kw)
    from finetune.cli import main

    assert main(["train", "--data", str(tmp_path / "none.jsonl")]) == 2
    assert main(["train", "--data", str(tmp_path), "--lora-r", "0"]) == 2
    (tmp_path / "bad.jsonl").write_text('{"text": "no messages"}\n')
    assert main(["train", "--data", str(tmp_path / "bad.jsonl"), "--output-dir", str(tmp_path / "o")]) == 2
    assert main(["export", "--adapter", str(tmp_path), "--out", str(tmp_path / "x.txt")]) == 2  # not a .gguf
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 4 and all(line.startswith("error: ") for line in err) and "--lora-r" in err[1]
    assert "--out" in err[3]


needs_llamacpp = pytest.mark.skipif(__import__("importlib").util.find_spec("llama_cpp") is None,
                                    reason="llama-cpp-python is not installed (`make setup`)")


@needs_llamacpp
def test_llamacpp_runs_the_adapter_like_peft(trained):
    """The adapter converted to a GGUF LoRA and run by llama.cpp on the quantised base answers like peft on the
    fp32 base. Tolerance: the runtimes' logits differ (quantised kernels vs fp32; the adapter's change to them
    correlates 0.997 between the two, MODELS.md), so near ties break differently even without an adapter: on a
    2-core Xeon with AMX (2026-12-07) the two bases answered 4 of the 8 questions word for word alike, the tuned
    pair 5, llama.cpp's untuned base against the tuned peft model 0. So the bar: the adapter adds at most one
    disagreement to the bases' own, and it moves llama.cpp's answers to peft's."""
    from rag.runtime import load_generator

    out, _ = trained
    cpp = load_generator("smollm2-135m", 16, adapter=str(out / "adapter"), backend="llamacpp")
    assert cpp.backend == "llamacpp" and list((out / "adapter").glob("adapter-*.gguf"))  # converted, cached
    asks = [[{"role": "user", "content": q}] for q, _ in FACTS]

    def answers(backend, adapter=None, gen=None):
        gen = gen or load_generator("smollm2-135m", 16, adapter=adapter, backend=backend)
        return [g.text for g in gen.chat_batch(asks, **({"batch_size": 1} if backend == "transformers" else {}))]

    a, plain = answers("llamacpp", gen=cpp), answers("llamacpp")
    hf, hf_plain = answers("transformers", str(out / "adapter")), answers("transformers")
    same = lambda x, y: sum(map(str.__eq__, x, y))  # noqa: E731
    assert same(a, hf) >= same(plain, hf_plain) - 1, list(zip(a, hf, strict=True))
    assert same(a, hf) > same(plain, hf), (a, plain)
    # chat_batch decodes in a second llama.cpp context: the adapter applies there as in chat()'s
    assert sum(x == cpp.chat(m).text for x, m in zip(a, asks, strict=True)) >= 7


@needs_llamacpp
def test_an_adapter_merged_into_a_q8_0_base_matches_it_applied_at_run_time(trained, tmp_path, monkeypatch):
    """rag.gguf_merge: W₀ + (α/r)·BA re-quantised to Q8_0 gives the logits llama.cpp gets applying the LoRA to the
    same Q8_0 base (merged vs unmerged parity), and the generator runs the merged file without a runtime LoRA."""
    import os
    from pathlib import Path

    import llama_cpp
    import numpy as np

    from rag import backend_llamacpp, gguf_merge
    from rag.config import UserError
    from rag.gguf_lora import gguf_adapter
    from rag.models import gguf_path

    out, _ = trained
    base = tmp_path / "smollm2-q8_0.gguf"  # the packaged file is Q4_1: a Q8_0 base made from it
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.allow_requantize = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, True
    assert llama_cpp.llama_model_quantize(gguf_path("smollm2-135m").encode(), str(base).encode(), params) == 0
    lora = gguf_adapter(out / "adapter", "smollm2-135m")
    assert gguf_merge.merged_path(gguf_path("smollm2-135m"), lora) is None  # a 4-bit base: applied at run time
    merged = gguf_merge.merged_path(str(base), lora)
    assert merged and os.path.dirname(merged) == os.path.dirname(lora)
    made = os.stat(merged).st_mtime_ns
    assert gguf_merge.merged_path(str(base), lora) == merged and os.stat(merged).st_mtime_ns == made  # once

    def last_logits(path, lora=None, scale=1.0):
        llm = llama_cpp.Llama(model_path=path, lora_path=lora, lora_scale=scale, n_ctx=256, verbose=False)
        llm.eval(llm.tokenize(PROBE.encode(), add_bos=False, special=True))
        got = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),)).copy()
        llm.close()
        return got

    # 8 steps move each weight by a small part of a Q8_0 step, where rounding (W₀ + ΔW) again adds noise of ~0.3
    # step: the maths is checked on the same adapter at 16x (what llama.cpp's lora_scale does), the 1x file as run
    plain = last_logits(str(base))
    big = tmp_path / "x16.gguf"
    assert gguf_merge.merge(base, Path(lora), big, scale=16.0)
    applied, folded = last_logits(str(base), lora, 16.0) - plain, last_logits(str(big)) - plain
    assert np.abs(applied).max() > 2 and np.corrcoef(applied, folded)[0, 1] > 0.99, np.corrcoef(applied, folded)
    applied, folded = last_logits(str(base), lora) - plain, last_logits(merged) - plain
    assert np.abs(applied).max() > 0.3 and np.corrcoef(applied, folded)[0, 1] > 0.5
    assert (plain + applied).argmax() == (plain + folded).argmax()

    monkeypatch.setattr(backend_llamacpp, "gguf_path", lambda name: str(base))
    gen = backend_llamacpp.LlamaCppGenerator("smollm2-135m", 16, adapter=str(out / "adapter"))
    assert gen.weights == os.path.basename(merged) and gen.llm._lora_adapter is None
    asks = [[{"role": "user", "content": q}] for q, _ in FACTS]
    assert sum(g.text == gen.chat(m).text for g, m in zip(gen.chat_batch(asks), asks, strict=True)) >= 7

    def disk_full(base, lora, out, scale=1.0):
        out.write_bytes(b"GGUF")  # a part written, then no space left
        raise OSError(28, "No space left on device")

    Path(merged).unlink()
    with monkeypatch.context() as m:
        m.setattr(gguf_merge, "merge", disk_full)
        assert gguf_merge.merged_path(str(base), lora) is None  # run-time LoRA instead, and no part file left
    assert not [f for f in os.listdir(os.path.dirname(lora)) if ".part-" in f or ".merged-" in f]
    monkeypatch.setenv(gguf_merge.ENV, "0")
    assert gguf_merge.merged_path(str(base), lora) is None
    gen = backend_llamacpp.LlamaCppGenerator("smollm2-135m", 16, adapter=str(out / "adapter"))
    llm = gen.llm
    assert llm._lora_adapter
    del gen  # freed when dropped, not when the cyclic GC runs (llama-cpp-python's Llama with a LoRA is a cycle)
    assert llm._lora_adapter is None and llm not in backend_llamacpp._OPEN
    monkeypatch.setenv(gguf_merge.ENV, "later")
    with pytest.raises(UserError, match="OPENBOOK_LORA_MERGE='later'"):
        gguf_merge.wanted()


@needs_llamacpp
def test_adapter_for_another_base_model_is_refused_in_one_line(trained):
    from rag.gguf_lora import WrongBase
    from rag.runtime import load_generator

    out, _ = trained
    with pytest.raises(WrongBase, match="trained on another base model"):
        load_generator("qwen-1.5b", 8, adapter=str(out / "adapter"))  # a SmolLM2 adapter on the Qwen reader


@needs_llamacpp
def test_export_writes_a_gguf_that_llamacpp_runs_like_the_merged_model(trained, tmp_path):
    from finetune.export import export
    from rag.runtime import load_generator

    out, _ = trained
    gguf = export(out, tmp_path / "tuned.gguf", outtype="f32")
    merged = load_generator(gguf, 16, backend="llamacpp")
    hf = load_generator("smollm2-135m", 16, adapter=str(out / "adapter"), backend="transformers")
    q = [{"role": "user", "content": FACTS[2][0]}]
    assert merged.chat(q).text == hf.chat(q).text  # f32 merge: the same weights, the same greedy answer


def test_a_bf16_base_trains_fp32_adapters_and_small_models_keep_fp32(base, tmp_path):
    from safetensors import safe_open

    from finetune.lora import frozen_bf16, parameters

    assert 130e6 < parameters("smollm2-135m") < 140e6  # from the safetensors headers
    assert not frozen_bf16("auto", "cpu", "smollm2-135m")  # under 1B parameters: fp32, as its numbers were taken
    assert frozen_bf16("bf16", "cpu", "smollm2-135m") and not frozen_bf16("fp32", "cpu", "smollm2-135m")
    assert not frozen_bf16("bf16", "cuda", "smollm2-135m")  # mixed precision over fp32 weights there instead
    run = train_lora(tiny_config(tmp_path, precision="bf16"),
                     Dataset.from_dict({"messages": MESSAGES * 2}))
    assert json.loads((tmp_path / "config.json").read_text())["bf16_base"] is True
    assert next(run.model.parameters()).dtype == torch.bfloat16  # the frozen base
    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), "pt") as st:
        assert {st.get_tensor(k).dtype for k in st.keys()} == {torch.float32}  # noqa: SIM118
    assert answer_loss(run.model, run.tokenizer) < answer_loss(*base) - 0.3  # it learns as the fp32 run does


def test_perplexity_of_a_llamacpp_generator_is_read_on_transformers():
    from finetune.evaluate import perplexity
    from rag.runtime import load_generator

    text = "The river rose after three days of rain, and the town moved its market to the hill. " * 6
    cpp = load_generator("smollm2-135m", 8, backend="llamacpp")
    hf = load_generator("smollm2-135m", 8, backend="transformers")
    assert cpp.backend == "llamacpp" and perplexity(cpp, text) == perplexity(hf, text)


def test_perplexity_is_read_in_bf16_where_training_holds_the_base_in_bf16(monkeypatch):
    import finetune.evaluate as E
    from rag.runtime import load_generator

    text = "The river rose after three days of rain, and the town moved its market to the hill. " * 6
    cpp = load_generator("smollm2-135m", 8, backend="llamacpp")
    fp32 = E.perplexity(cpp, text)
    monkeypatch.setattr(E, "frozen_bf16", lambda *a: True)  # as for the 1.5B on a CPU with native bf16
    model, _ = E.on_torch(cpp)
    assert next(model.parameters()).dtype == torch.bfloat16
    assert E.perplexity(cpp, text) != fp32 and abs(E.perplexity(cpp, text) / fp32 - 1) < 0.02


def test_base_scores_are_reused_until_the_questions_change(tmp_path, monkeypatch):
    import json

    from finetune.evaluate import EvalConfig, base_scores

    monkeypatch.chdir(tmp_path)  # the cache lives under ./.openbook
    (tmp_path / "docs").mkdir()
    cfg = EvalConfig(docs="docs", model="smollm2-135m", max_new_tokens=8, probes="", general_text="")
    sets = {"facts": [{"id": "q0", "question": FACTS[0][0], "answer": FACTS[0][1].split()[-1].rstrip("."),
                       "aliases": [], "sources": ["x.md"]}]}
    first = base_scores(cfg, sets)
    (cached,) = (tmp_path / ".openbook" / "cache" / "finetune-base").glob("smollm2-135m-*.json")
    assert json.loads(cached.read_text()) == first and first["qa"]["facts"]["n"] == 1
    cached.write_text(json.dumps(first | {"marker": 1}))
    assert base_scores(cfg, sets)["marker"] == 1  # read back, not recomputed
    sets["facts"][0]["question"] += "?"
    assert "marker" not in base_scores(cfg, sets)  # other questions: scored again


# Portable adapters: an adapter names its base model by registry name, so a copied folder loads anywhere openbook
# is installed, and a merged folder loads in plain transformers with nothing else.
PLAIN_TRANSFORMERS = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
torch.set_num_threads(1)
tok, model = AutoTokenizer.from_pretrained(sys.argv[1]), AutoModelForCausalLM.from_pretrained(sys.argv[1])
enc = tok.apply_chat_template([{"role": "user", "content": sys.argv[2]}], add_generation_prompt=True,
                              return_tensors="pt", return_dict=True)
ids = model.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=tok.eos_token_id)
assert not {"rag", "finetune", "hybrid"} & {m.split(".")[0] for m in sys.modules}
print(json.dumps([ids[0, enc["input_ids"].shape[1]:].tolist(), tok.decode(ids[0, enc["input_ids"].shape[1]:],
                                                                          skip_special_tokens=True)]))
"""


def greedy(model, tok, question: str) -> list[int]:
    """12 greedy tokens, as PLAIN_TRANSFORMERS generates them."""
    enc = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    with torch.no_grad():
        ids = model.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=tok.eos_token_id)
    return ids[0, enc["input_ids"].shape[1]:].tolist()


def no_cache_path(folder) -> bool:
    from rag.models import cache_dir

    return not any(str(cache_dir()) in f.read_text() for f in folder.iterdir() if f.suffix in (".json", ".md"))


def test_a_saved_adapter_names_its_base_by_registry_name(trained):
    out, _ = trained
    for folder in [out / "adapter", *snapshot_dirs(out).values()]:
        assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == "smollm2-135m"
        assert no_cache_path(folder), folder  # nor in peft's model card (README.md)
    assert "base_model: smollm2-135m" in (out / "adapter" / "README.md").read_text()


def test_a_copied_adapter_loads_and_answers_like_the_original_old_cache_paths_too(trained, tmp_path):
    import shutil

    from rag.gguf_lora import WrongBase, check_base
    from rag.models import generator_path

    out, run = trained
    copy = shutil.copytree(out / "adapter", tmp_path / "shared" / "adapter", ignore=shutil.ignore_patterns("*.gguf"))
    expected = greedy(run.model, run.tokenizer, FACTS[2][0])
    other = tmp_path / "qwen"  # the widths of Qwen2.5-1.5B: a SmolLM2 adapter does not fit it
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"hidden_size": 1536, "intermediate_size": 8960,
                                                   "num_hidden_layers": 28}))
    config = json.loads((copy / "adapter_config.json").read_text())
    # then as adapters saved before registry names recorded it: this machine's cache folder, or another machine's
    elsewhere = "/home/someone/.cache/openbook/models/smollm2-135m"
    for recorded in ("smollm2-135m", generator_path("smollm2-135m"), elsewhere):
        (copy / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": recorded}))
        model, tok = load_tuned(copy, device="cpu")
        assert greedy(model, tok, FACTS[2][0]) == expected, recorded
        with pytest.raises(WrongBase, match=r"another base model \(smollm2-135m\), not on qwen"):
            check_base(copy, other)


@needs_llamacpp
def test_llamacpp_runs_a_copied_adapter_like_the_original(trained, tmp_path):
    import shutil

    from rag.runtime import load_generator

    out, _ = trained
    copy = shutil.copytree(out / "adapter", tmp_path / "adapter", ignore=shutil.ignore_patterns("*.gguf"))
    q = [{"role": "user", "content": FACTS[2][0]}]
    there, here = (load_generator("smollm2-135m", 16, adapter=str(a), backend="llamacpp")
                   for a in (copy, out / "adapter"))
    assert there.chat(q).text == here.chat(q).text and list(copy.glob("adapter-*.gguf"))  # converted from the copy


def test_a_merged_model_loads_in_plain_transformers_from_its_folder_alone(trained, tmp_path):
    import os
    import subprocess
    import sys

    from rag.runtime import load_generator

    out, run = trained
    merged = tmp_path / "merged"
    merge(out / "adapter", merged)
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "chat_template.jinja"} <= {f.name for f in merged.iterdir()} and no_cache_path(merged)
    (tmp_path / "empty-hf-home").mkdir()  # nothing to fall back on: only the folder
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty-hf-home"), "OMP_NUM_THREADS": "1"}
    got = subprocess.run([sys.executable, "-c", PLAIN_TRANSFORMERS, str(merged), FACTS[2][0]], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert got.returncode == 0, got.stderr[-2000:]
    ids, text = json.loads(got.stdout.strip().splitlines()[-1])
    assert ids == greedy(run.model, run.tokenizer, FACTS[2][0])  # merged in plain transformers = adapter in peft
    assert text == load_generator(str(merged), 12, backend="transformers").chat([{"role": "user",
                                                                                    "content": FACTS[2][0]}]).text
