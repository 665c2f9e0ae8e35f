"""lorakit plan with issue 11's training: logits only at labelled positions, and packed micro-batches
(several examples per row; with passages, the questions on one passage share it once)."""

from __future__ import annotations

import dataclasses
import random

import pytest
from transformers import LlamaConfig

from lorakit.config_loading import validate_config
from lorakit.errors import ConfigError
from lorakit.plan.estimate import DataLengths, packing_mode, plan_batches
from lorakit.plan.measure import measure_lora_step
from lorakit.plan.memory import LOGIT_CHUNK_BYTES, chunk_rows, estimate_step_memory
from lorakit.plan.planner import plan_run
from lorakit.plan.shape import read_model_shape

IGNORE = -100


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))  # the CPU benchmark's cache


def config(model="unused", **train):
    template = {"max_length": train.pop("max_length", 64)}
    return validate_config(
        {
            "data": {"path": "unused.json"},
            "model": {"name_or_path": str(model)},
            "lora": {"r": 8, "target_modules": "all-linear"},
            "template": template,
            "train": {"micro_batch_size": 4, **train},
        }
    )


# --- logits only where labelled ---------------------------------------------------------------


def test_labelled_logits_term_is_the_chunk_formula_and_far_smaller():
    # SmolLM2-135M's vocabulary and width (2 layers: the logits term does not depend on depth)
    shape = read_model_shape(
        LlamaConfig(
            vocab_size=49152,
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=2,
            num_attention_heads=9,
            num_key_value_heads=3,
            tie_word_embeddings=True,
        )
    )
    batch = dict(micro_batch=8, seq_len=512, lora_r=16, target_modules="all-linear")
    from lorakit.train import loss

    assert LOGIT_CHUNK_BYTES == loss.LOGIT_CHUNK_BYTES  # the plan's copy of the loss's chunk size
    assert chunk_rows(49152) == 341  # 64 MiB of float32 logits over 49,152 tokens
    everywhere = estimate_step_memory(shape, labelled_logits_only=False, **batch).parts["logits + loss"]
    assert everywhere == 8 * 512 * 49152 * 12  # fp32 logits, log-softmax, their gradient
    # 80 answer tokens: one chunk of 80 rows, plus the gathered hidden states and their gradient
    few = estimate_step_memory(shape, labelled_tokens=80, **batch).parts["logits + loss"]
    assert few == 80 * 49152 * 12 + 2 * 80 * 576 * 4
    assert few < everywhere / 50
    # more labelled positions than a chunk holds: only one chunk's logits live at a time
    many = estimate_step_memory(shape, labelled_tokens=2000, **batch).parts["logits + loss"]
    assert many == 341 * 49152 * 12 + 2 * 2000 * 576 * 4
    # bfloat16 compute: the logits come out in bfloat16 before the float32 upcast
    half = estimate_step_memory(shape, labelled_tokens=80, act_bytes=2, weight_bytes_per_param=2, **batch)
    assert half.parts["logits + loss"] == 80 * 49152 * 14 + 2 * 80 * 576 * 2
    # a model that post-processes its logits keeps its own loss: logits everywhere
    capped = dataclasses.replace(shape, plain_logits=False)
    assert estimate_step_memory(capped, labelled_tokens=80, **batch).parts["logits + loss"] == everywhere


def test_seq2seq_and_softcapped_models_keep_the_full_logits_term(tiny_t5_dir):
    t5 = read_model_shape(str(tiny_t5_dir))
    kw = dict(micro_batch=2, seq_len=64, target_len=16, lora_r=8, target_modules="all-linear")
    on = estimate_step_memory(t5, labelled_tokens=4, **kw).parts["logits + loss"]
    assert (
        on
        == estimate_step_memory(t5, labelled_logits_only=False, **kw).parts["logits + loss"]
        == 2 * 16 * t5.vocab_size * 12
    )
    capped = LlamaConfig(
        vocab_size=600,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    capped.final_logit_softcapping = 30.0
    assert not read_model_shape(capped).plain_logits


# --- packed micro-batches: the shape training will build ---------------------------------------


def _feature(prompt: list[int], answer: list[int]) -> dict[str, list[int]]:
    return {"input_ids": prompt + answer, "labels": [IGNORE] * len(prompt) + answer}


def _hand_fixture() -> DataLengths:
    """Three questions on one 20-token passage and one question on a passage of its own."""
    passage = list(range(100, 120))
    features = [
        _feature(passage + [200, 201, 202, 203, 204], [300, 301, 302]),  # 20 + 5 + 3 = 28 tokens
        _feature(passage + [210, 211, 212, 213], [310, 311]),  # 26
        _feature(passage + [220, 221, 222, 223, 224, 225], [320, 321, 322, 323]),  # 30
        _feature(list(range(400, 425)) + [230, 231, 232, 233, 234], [330, 331, 332]),  # 33
    ]
    lengths = [len(f["input_ids"]) for f in features]
    return DataLengths(lengths, [], 10, 4, "hand fixture", features)


def test_packed_token_count_with_shared_passages_equals_a_hand_count():
    lengths = _hand_fixture()
    # passages: the passage once (20) + the three questions' own tokens (8 + 6 + 10) = 44 in one row;
    # the lone question (33) does not fit beside it in 64, so 2 rows of 44 (padding included) = 88;
    # labelled: the positions that predict an answer token, 3 + 2 + 4 + 3 = 12
    shared = plan_batches(config(packing="passages"), lengths, "causal")
    assert (shared.mode, shared.shapes, shared.computed_tokens, shared.micro_batches) == (
        "passages",
        [(2, 44, 12)],
        88,
        1,
    )
    # examples: first-fit decreasing puts 33 + 30 = 63 in one row and 28 + 26 = 54 in the other
    apart = plan_batches(config(packing="examples"), lengths, "causal")
    assert (apart.shapes, apart.computed_tokens) == ([(2, 63, 12)], 126)
    # off: 4 rows padded to the longest, 33; the 4 most-labelled examples hold 12 labelled positions
    padded = plan_batches(config(packing="off"), lengths, "causal")
    assert padded.shapes == [(4, 33, 12)] and padded.mode == "off"


def test_the_plan_counts_the_packed_rows_and_their_attention_mask(tiny_llama_dir):
    lengths = _hand_fixture()
    plan = plan_run(config(tiny_llama_dir), "cpu", shape=read_model_shape(str(tiny_llama_dir)), lengths=lengths)
    assert (plan.packing, plan.rows, plan.seq_len, plan.computed_tokens) == ("passages", 2, 44, 88)
    assert plan.memory.parts["attention mask"] == 2 * 44 * 44 * (1 + 4)  # bool + float32 additive copy
    # padded one example per row: 4 rows of the longest, 33
    assert any("88 tokens per epoch to compute (row padding included) against 132 padded" in n for n in plan.notes)
    assert any("(1.50x) and 117 in the examples; the peak micro-batch is 2 row(s) x 44" in n for n in plan.notes)
    off = plan_run(config(tiny_llama_dir, packing="off"), "cpu", shape=plan.shape, lengths=lengths)
    assert "attention mask" not in off.memory.parts and (off.rows, off.seq_len) == (4, 33)


def test_packing_mode_follows_training_and_names_the_fix():
    assert packing_mode(config(), "causal") == "passages"
    assert packing_mode(config(), "seq2seq") == "off"
    assert packing_mode(config(packing="examples"), "causal") == "examples"
    flash = config()
    flash.model.attn_implementation = "flash_attention_2"
    assert packing_mode(flash, "causal") == "off"
    with pytest.raises(ConfigError, match="train.packing=passages cannot run here: a seq2seq"):
        packing_mode(config(packing="passages"), "seq2seq")


def _llama(vocab=8000) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
    )


@pytest.mark.parametrize("mode", ["passages", "examples"])
def test_packed_peak_within_20_percent_of_measured(mode):
    from lorakit.prompting.packing import PackedCollator
    from lorakit.train.loss import causal_loss

    rng = random.Random(0)
    features = []
    for _ in range(2):  # two passages, four questions each
        passage = [rng.randrange(3, 8000) for _ in range(150)]
        for _ in range(4):
            question = [rng.randrange(3, 8000) for _ in range(rng.randrange(10, 30))]
            features.append(_feature(passage + question, [rng.randrange(3, 8000) for _ in range(6)]))
    lengths = DataLengths([len(f["input_ids"]) for f in features], [], 10, 8, "random", features)
    batches = plan_batches(config(packing=mode, micro_batch_size=8, max_length=512), lengths, "causal")
    batch = PackedCollator(0, 512, mode == "passages")(features)
    rows, width = batch["input_ids"].shape
    labelled = int((batch["shift_labels"] != IGNORE).sum())
    assert batches.shapes == [(rows, width, labelled)]  # the plan's micro-batch is the one training builds
    step = dict(micro_batch=rows, seq_len=width, lora_r=8, target_modules="all-linear")
    shape = read_model_shape(_llama())
    predicted = estimate_step_memory(shape, labelled_tokens=labelled, packed=True, **step).tensor_peak
    measured = measure_lora_step(
        _llama(), timed_steps=0, batch=batch, loss_fn=lambda m, b: causal_loss(m, b)[0], **step
    ).peak_bytes
    assert abs(predicted - measured) / measured < 0.20, (predicted, measured)


def test_time_counts_the_output_head_only_at_labelled_positions():
    from lorakit.plan.devices import GpuSpec, step_time
    from lorakit.plan.memory import flops_per_token

    shape = read_model_shape(_llama(vocab=32000))
    cpu = GpuSpec("cpu", 0, 100e9, False, "a CPU", 5e-6)
    kw = dict(n_lora=1000, n_adapters=7, tokens=1000, seq_len=100)
    everywhere = step_time(shape, cpu, **kw)
    labelled = step_time(shape, cpu, labelled_tokens=10, **kw)
    body, _ = flops_per_token(shape, 1000, 100, False, head=False)
    # forward, its recomputation and the input gradient (6*V*d) at 10 of the 1000 positions
    assert labelled.flops_per_token == pytest.approx(body + 6 * 32000 * 64 * 10 / 1000)
    assert everywhere.flops_per_token == pytest.approx(body + 4 * 32000 * 64)
    assert labelled.seconds_per_step < everywhere.seconds_per_step / 3  # the head dominates this narrow model


def test_fitting_plans_the_packed_micro_batches(tiny_llama_dir):
    from lorakit.plan.devices import gpu_spec
    from lorakit.plan.fitting import fit_config

    lengths = _hand_fixture()
    shape = read_model_shape(str(tiny_llama_dir))
    asked = config(tiny_llama_dir, max_length=32, micro_batch_size=4, gradient_accumulation=1)
    need = {}
    for micro in (4, 2):
        trial = asked.model_copy(deep=True)
        trial.train.micro_batch_size, trial.train.gradient_accumulation = micro, 4 // micro
        need[micro] = plan_run(trial, "cpu", shape=shape, lengths=lengths, advise=False).memory.total
    assert need[2] < need[4]
    budget_gb = (need[2] + need[4]) / 2 / 2**30
    fitted, choices = fit_config(asked, "cpu", budget_gb, shape=shape, lengths=lengths)
    assert (fitted.train.micro_batch_size, fitted.train.gradient_accumulation) == (2, 2)
    assert plan_run(fitted, "cpu", budget_gb, shape=shape, lengths=lengths).fits
    assert gpu_spec("cpu", budget_gb).memory_bytes < need[4]
