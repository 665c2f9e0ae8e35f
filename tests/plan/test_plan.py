"""lorakit plan: model shape, memory prediction against measured peaks, fitting, OOM back-off, CLI text."""

from __future__ import annotations

import io
import json

import pytest
import torch
from transformers import LlamaConfig

from lorakit.cli_commands import plan_command
from lorakit.config_loading import validate_config
from lorakit.errors import ConfigError, ModelError
from lorakit.plan.devices import gpu_spec
from lorakit.plan.estimate import DataLengths, estimate_memory
from lorakit.plan.fitting import fit_config, run_with_oom_backoff
from lorakit.plan.measure import TensorMemoryTracker, measure_lora_step
from lorakit.plan.memory import estimate_step_memory, flops_per_token
from lorakit.plan.planner import plan_run
from lorakit.plan.shape import read_model_shape


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))  # the CPU benchmark's cache


def llama(h=64, layers=2, heads=4, kv=2, inter=128, vocab=600, tied=False) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=h,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        tie_word_embeddings=tied,
        max_position_embeddings=1024,
    )


def config_for(model_path: str, **train) -> object:
    return validate_config(
        {
            "data": {"path": "unused.json"},
            "model": {"name_or_path": str(model_path)},
            "lora": {"r": 8, "target_modules": "all-linear"},
            "train": {"micro_batch_size": 8, "gradient_accumulation": 2, **train},
        }
    )


# --- shape --------------------------------------------------------------------------------------


def test_shape_from_folder_matches_the_real_model(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    shape = read_model_shape(str(tiny_llama_dir))
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    assert shape.n_params == sum(p.numel() for p in model.parameters())
    assert (shape.hidden_size, shape.num_layers, shape.num_heads, shape.num_kv_heads) == (64, 2, 4, 2)
    assert shape.linear_layers["k_proj"] == (64, 32, 2)
    assert shape.linear_layers["down_proj"] == (128, 64, 2)
    assert shape.vocab_size == model.config.vocab_size and not shape.tied_embeddings and shape.gated_mlp


def test_shape_from_gguf_header(tmp_path):
    import numpy as np
    from gguf import GGUFWriter

    path = tmp_path / "m.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_embedding_length(32)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_feed_forward_length(48)
    writer.add_vocab_size(100)
    writer.add_tensor("token_embd.weight", np.zeros((100, 32), dtype=np.float32))
    for i in range(2):
        for name, (out_f, in_f) in {
            "attn_q": (32, 32),
            "attn_k": (16, 32),
            "attn_v": (16, 32),
            "attn_output": (32, 32),
            "ffn_gate": (48, 32),
            "ffn_up": (48, 32),
            "ffn_down": (32, 48),
        }.items():
            writer.add_tensor(f"blk.{i}.{name}.weight", np.zeros((out_f, in_f), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    shape = read_model_shape(str(path))
    assert (shape.hidden_size, shape.num_layers, shape.num_kv_heads, shape.intermediate_size, shape.vocab_size) == (
        32,
        2,
        2,
        48,
        100,
    )
    assert shape.tied_embeddings  # no output.weight tensor
    assert shape.linear_layers["k_proj"] == (32, 16, 2) and shape.linear_layers["down_proj"] == (48, 32, 2)
    assert shape.n_params == 100 * 32 + 2 * (32 * 32 * 2 + 16 * 32 * 2 + 48 * 32 * 3)


# --- measuring and predicting -------------------------------------------------------------------


def test_tracker_counts_live_storage_once_and_frees_it():
    tracker = TensorMemoryTracker()
    with tracker:
        a = torch.ones(1000)  # 4000 bytes
        view = a[:10]  # same storage: not counted again
        b = a * 2
        del b
        assert tracker.current == 4000 and tracker.peak == 8000
        del a, view
    assert tracker.current == 0


CASES = [  # (model, step): micro-batch, sequence length, rank, checkpointing, attention, dropout, vocabulary
    (dict(), dict(micro_batch=2, seq_len=64, lora_r=8, target_modules="all-linear")),
    (dict(), dict(micro_batch=4, seq_len=48, lora_r=8, target_modules="auto")),
    (dict(), dict(micro_batch=2, seq_len=96, lora_r=32, target_modules="all-linear", gradient_checkpointing=True)),
    (dict(), dict(micro_batch=1, seq_len=128, lora_r=16, target_modules="all-linear", attn="eager")),
    (
        dict(h=96, inter=192, heads=6, kv=3),
        dict(micro_batch=2, seq_len=64, lora_r=4, target_modules="all-linear", lora_dropout=0.0),
    ),
    (
        dict(vocab=4000, tied=True),
        dict(micro_batch=2, seq_len=32, lora_r=8, target_modules="auto", gradient_checkpointing=True),
    ),
]


@pytest.mark.parametrize("model_kw,step_kw", CASES)
def test_predicted_peak_memory_within_20_percent_of_measured(model_kw, step_kw):
    shape = read_model_shape(llama(**model_kw))
    predicted = estimate_step_memory(shape, labelled_logits_only=False, **step_kw).tensor_peak
    measured = measure_lora_step(llama(**model_kw), timed_steps=0, **step_kw).peak_bytes
    assert abs(predicted - measured) / measured < 0.20, (predicted, measured)


def _labelled_loss(model, batch):
    from lorakit.train.loss import causal_loss

    return causal_loss(model, batch)[0]


LABELLED_CASES = [  # (model, step, labelled positions per row): answers at the end of each row
    (dict(vocab=8000), dict(micro_batch=4, seq_len=128, lora_r=8, target_modules="all-linear"), 8),
    (dict(vocab=8000), dict(micro_batch=2, seq_len=96, lora_r=8, target_modules="auto", attn="eager"), 90),
    (
        dict(vocab=4000, tied=True),
        dict(micro_batch=2, seq_len=64, lora_r=8, target_modules="auto", gradient_checkpointing=True),
        5,
    ),
]


@pytest.mark.parametrize("model_kw,step_kw,labelled", LABELLED_CASES)
def test_labelled_logits_peak_within_20_percent_of_measured(model_kw, step_kw, labelled):
    # train.loss's path: only labelled positions are projected, in chunks (vocab 8000: 2097 rows per
    # chunk, so 90 x 2 labelled positions are one chunk; the gathered hidden states count too)
    shape = read_model_shape(llama(**model_kw))
    n = labelled * step_kw["micro_batch"]
    predicted = estimate_step_memory(shape, labelled_tokens=n, **step_kw).tensor_peak
    measured = measure_lora_step(
        llama(**model_kw), timed_steps=0, labelled=labelled, loss_fn=_labelled_loss, **step_kw
    ).peak_bytes
    assert abs(predicted - measured) / measured < 0.20, (predicted, measured)
    if labelled < step_kw["seq_len"] // 4:  # answers a small share of the row: the saving is beyond the tolerance
        everywhere = estimate_step_memory(shape, labelled_logits_only=False, **step_kw).tensor_peak
        assert measured < 0.6 * everywhere


def test_memory_parts_respond_to_their_knobs():
    shape = read_model_shape(llama(h=256, layers=4, inter=512, vocab=32000))
    base = dict(micro_batch=4, seq_len=512, lora_r=16, target_modules="all-linear", labelled_logits_only=False)
    plain = estimate_step_memory(shape, **base)
    assert (
        estimate_step_memory(shape, **{**base, "micro_batch": 8}).parts["activations"] == 2 * plain.parts["activations"]
    )
    assert (
        estimate_step_memory(shape, **base, gradient_checkpointing=True).parts["activations"]
        < plain.parts["activations"] / 5
    )
    # 4-bit stores linear weights in ~0.52 bytes, but keeps embeddings and head in fp32
    narrow = read_model_shape(llama(h=256, layers=4, inter=512, vocab=600))
    four_bit = estimate_step_memory(narrow, **base, quantization="4bit", act_bytes=2, device="cuda")
    half = estimate_step_memory(narrow, **base, weight_bytes_per_param=2, act_bytes=2, device="cuda")
    assert four_bit.parts["weights"] == pytest.approx(
        narrow.linear_params * 0.5159 + (narrow.n_params - narrow.linear_params) * 4, rel=1e-3
    )
    assert four_bit.parts["weights"] < half.parts["weights"] / 2
    assert (
        estimate_step_memory(shape, **base, optimizer="paged_adamw_8bit").parts["optimizer states"]
        == plain.parts["optimizer states"] // 4
    )
    # logits: tokens x vocab x 12 bytes in float32 (logits, log-softmax, its gradient)
    assert plain.parts["logits + loss"] == 4 * 512 * 32000 * 12


def test_flops_formula_counts_frozen_backward_and_recompute():
    shape = read_model_shape(llama())
    n = shape.linear_params + shape.vocab_size * shape.hidden_size
    plain, _ = flops_per_token(shape, 0, 1, False)
    again, formula = flops_per_token(shape, 0, 1, True)
    assert plain == pytest.approx(4 * n + 12 * 1 * 64 * 2)
    assert again - plain == pytest.approx(2 * n + 4 * 64 * 2) and "recompute" in formula


# --- fitting ------------------------------------------------------------------------------------


def _lengths(longest=200, n=100, safe=40):
    return DataLengths([longest] + [100] * (n - 1), [], safe, n, "test lengths")


def test_fit_picks_the_largest_micro_batch_and_keeps_the_effective_batch(tiny_llama_dir):
    config = config_for(tiny_llama_dir)
    shape, lengths = read_model_shape(config.model), _lengths()
    cpu = gpu_spec("cpu")
    need = {
        m: estimate_memory(
            config.model_copy(update={"train": config.train.model_copy(update={"micro_batch_size": m})}),
            shape,
            cpu,
            200,
        ).total
        for m in (4, 8)
    }
    budget_gb = (need[4] + need[8]) / 2 / 2**30  # micro-batch 4 fits, 8 does not
    fitted, choices = fit_config(config, "cpu", budget_gb, shape=shape, lengths=lengths)
    assert (fitted.train.micro_batch_size, fitted.train.gradient_accumulation) == (4, 4)
    assert "effective batch stays 16" in choices[0]
    assert config.train.micro_batch_size == 8  # the input config is left alone
    assert plan_run(fitted, "cpu", budget_gb, shape=shape, lengths=lengths).fits


def test_fit_escalates_to_checkpointing_then_4bit_then_safe_max_length(tiny_llama_dir):
    config = config_for(tiny_llama_dir)
    shape, lengths = read_model_shape(config.model), _lengths()
    t4 = gpu_spec("t4")
    one = config.model_copy(deep=True)
    one.train.micro_batch_size, one.train.gradient_checkpointing, one.model.quantization = 1, True, "4bit"
    at_safe = estimate_memory(one, shape, t4, 40).total
    at_full = estimate_memory(one, shape, t4, 200).total
    budget_gb = (at_safe + at_full) / 2 / 2**30  # only a shorter max_length can fit
    fitted, choices = fit_config(config, "t4", budget_gb, shape=shape, lengths=lengths)
    assert fitted.train.gradient_checkpointing and fitted.model.quantization == "4bit"
    assert 40 <= fitted.template.max_length < 200
    assert fitted.train.micro_batch_size * fitted.train.gradient_accumulation == 16
    assert [c.split("=")[0] for c in choices][-3:] == [
        "train.gradient_checkpointing",
        "model.quantization",
        "template.max_length",
    ]
    assert (
        estimate_memory(fitted, shape, gpu_spec("t4", budget_gb), fitted.template.max_length).total <= budget_gb * 2**30
    )
    # never below the longest question + answer: with less memory than that needs, say nothing fits
    _, hopeless = fit_config(config, "t4", at_safe * 0.9 / 2**30, shape=shape, lengths=lengths)
    assert hopeless[-1].startswith("nothing fits")


def test_plan_gives_advice_when_it_does_not_fit(tiny_llama_dir):
    config = config_for(tiny_llama_dir)
    plan = plan_run(config, "a10g", 0.52, shape=read_model_shape(config.model), lengths=_lengths())
    assert not plan.fits and any("micro_batch_size" in a or "checkpointing" in a for a in plan.advice)
    assert plan.steps == 21 and plan.epochs == 3.0  # ceil(100 / 16) steps per epoch x 3 epochs


# --- out of memory at run time --------------------------------------------------------------------


def test_oom_backoff_halves_micro_batch_and_keeps_effective_batch(tiny_llama_dir):
    config = config_for(tiny_llama_dir)  # micro-batch 8 x 2
    seen, logged = [], []

    def run(cfg):
        seen.append((cfg.train.micro_batch_size, cfg.train.gradient_accumulation))
        if cfg.train.micro_batch_size > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return "trained"

    assert run_with_oom_backoff(run, config, logged.append) == "trained"
    assert seen == [(8, 2), (4, 4), (2, 8)]
    assert len(logged) == 2 and "effective batch 16 unchanged" in logged[0]


def test_oom_backoff_gives_up_at_micro_batch_one_and_passes_other_errors(tiny_llama_dir):
    config = config_for(tiny_llama_dir, micro_batch_size=1)

    def oom(cfg):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate ... out of memory")

    with pytest.raises(ModelError, match="micro_batch_size=1"):
        run_with_oom_backoff(oom, config, lambda m: None)

    def broken(cfg):
        raise ValueError("not a memory problem")

    with pytest.raises(ValueError):
        run_with_oom_backoff(broken, config, lambda m: None)


# --- the command ------------------------------------------------------------------------------


def test_plan_command_uses_the_real_token_lengths(tiny_llama_dir, tmp_path):
    from lorakit.pipeline import prepare

    records = [
        {"question": f"What is {i} plus {i}?", "answer": str(2 * i), "context": "numbers go here " * (i % 5)}
        for i in range(30)
    ]
    (tmp_path / "qa.json").write_text(json.dumps(records), encoding="utf-8")
    (tmp_path / "c.yaml").write_text(
        f"data:\n  path: {tmp_path / 'qa.json'}\nmodel:\n  name_or_path: {tiny_llama_dir}\ntrain:\n  micro_batch_size: 4\n",
        encoding="utf-8",
    )
    from rich.console import Console

    def run(*overrides):
        console = Console(record=True, width=200, file=io.StringIO())
        return plan_command(tmp_path / "c.yaml", ["train.epochs=2", *overrides], "cpu", None, False, console=console)

    text = run("train.packing=off")
    config = validate_config(
        {"data": {"path": str(tmp_path / "qa.json")}, "model": {"name_or_path": str(tiny_llama_dir)}}
    )
    stats = prepare(config).train_stats  # encoded as training encodes them
    assert f"longest batch {max(stats.lengths)} tokens" in text
    assert "Predicted peak memory" in text and "fits in" in text and "2 epochs" in text
    packed = run()  # auto: passages for a causal model
    assert "packed (passages)" in packed and f"and {sum(stats.lengths)} in the examples" in packed


def test_cpu_plans_k_bit_weights_too(tiny_llama_dir):
    config = config_for(tiny_llama_dir)
    shape = read_model_shape(config.model)
    full = estimate_memory(config, shape, "cpu", 64).parts["weights"]
    for quantization, factor in (("4bit", 0.5158), ("8bit", 1.0)):  # bytes per linear weight, scales aside
        config.model.quantization = quantization
        weights = estimate_memory(config, shape, "cpu", 64).parts["weights"]
        rest = (shape.n_params - shape.linear_params) * 4
        assert weights < full and weights >= shape.linear_params * factor + rest


def test_plan_errors_name_the_fix(tiny_llama_dir):
    with pytest.raises(ConfigError, match="unknown device"):
        gpu_spec("tpu")
