"""Merging: the merged model equals base + adapter, reproduces its generations, keeps the training
template as its chat template, and never overwrites a folder silently."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny import SYSTEM, make_run

from lorakit.config import TemplateConfig
from lorakit.errors import ConfigError, ModelError, RunError
from lorakit.export.merge import hf_chat_template, merge_run
from lorakit.inference.decoding import generate_batched
from lorakit.prompting.builtin_templates import BUILTINS
from lorakit.prompting.templates import render_prompt, resolve_template
from lorakit.run_metadata import read_run

CONVERSATIONS = [
    ([{"role": "user", "content": "What is the capital of France?"}], None),
    ([{"role": "user", "content": "Who wrote the book?"}], "The book was written by Ann in 1999."),
    (
        [
            {"role": "system", "content": "Own system text."},
            {"role": "user", "content": "پایتخت ایران کجاست؟"},
            {"role": "assistant", "content": "تهران"},
            {"role": "user", "content": "And France?"},
        ],
        "A passage.",
    ),
]


@pytest.fixture(scope="module")
def run_dir(tiny_llama_dir, tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("runs") / "qa-run", tiny_llama_dir, extractive=True)


@pytest.fixture(scope="module")
def merged(run_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("merged") / "qa-merged"
    return out, merge_run(run_dir, out)


def _peft_and_merged(run_dir, out):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    info = read_run(run_dir)
    base = AutoModelForCausalLM.from_pretrained(info.base["name_or_path"], dtype=torch.float32)
    plain = AutoModelForCausalLM.from_pretrained(info.base["name_or_path"], dtype=torch.float32)
    with_adapter = PeftModel.from_pretrained(base, str(info.adapter_dir)).eval()
    merged_model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    return info, plain.eval(), with_adapter, merged_model, AutoTokenizer.from_pretrained(out)


def test_merged_logits_equal_base_plus_adapter(run_dir, merged):
    out, report = merged
    assert report.passed and report.dtype == "float32"
    assert report.max_abs_diff < 1e-4 and report.top1_agreement == 1.0
    info, plain, with_adapter, merged_model, tokenizer = _peft_and_merged(run_dir, out)
    ids = tokenizer("The quick brown fox jumps over the lazy dog", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = with_adapter(input_ids=ids).logits
        got = merged_model(input_ids=ids).logits
        untouched = plain(input_ids=ids).logits
    assert (expected - untouched).abs().max() > 1e-2, "the adapter must matter, or the test proves nothing"
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    # no LoRA layers remain: a plain transformers model
    assert not any("lora" in name for name, _ in merged_model.named_parameters())


def test_verification_is_written_next_to_the_model(merged):
    out, report = merged
    saved = json.loads((out / "merge_verification.json").read_text(encoding="utf-8"))
    assert saved["passed"] is True and saved["max_abs_diff"] == report.max_abs_diff
    assert saved["atol"] == 1e-4 and len(saved["prompts"]) == report.inputs >= 3
    assert "### Question:" in saved["prompts"][0]  # rendered with the run's own template
    assert (out / "model.safetensors").is_file()
    assert not any(p.name.startswith(".") for p in out.parent.iterdir()), "temporary folders left behind"


def test_merged_folder_reproduces_greedy_generations(run_dir, merged):
    out, _ = merged
    info, _, with_adapter, merged_model, tokenizer = _peft_and_merged(run_dir, out)
    prompts = [render_prompt(info.template, m, c, SYSTEM) for m, c in CONVERSATIONS]
    expected = generate_batched(with_adapter, tokenizer, prompts, max_new_tokens=12, batch_size=2)
    got = generate_batched(merged_model, tokenizer, prompts, max_new_tokens=12, batch_size=2)
    assert [g.raw_text for g in got] == [g.raw_text for g in expected]
    assert any(g.completion_tokens > 0 for g in got)


def test_merged_folder_describes_itself(run_dir, merged):
    out, _ = merged
    info = read_run(out)
    assert info.is_merged and info.root == out
    assert info.template == read_run(run_dir).template
    assert info.system_prompt == SYSTEM and info.precision == "float32"
    assert info.metadata["merged_from"]["run"] == str(Path(run_dir).resolve())
    assert info.extractive and info.no_answer == read_run(run_dir).no_answer == "unanswerable"


def test_merged_chat_template_renders_the_training_prompt(merged):
    from transformers import AutoTokenizer

    out, _ = merged
    info = read_run(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    for messages, context in CONVERSATIONS:
        extra = {"context": context} if context else {}
        hf = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **extra)
        assert hf == render_prompt(info.template, messages, context, info.system_prompt)


@pytest.mark.parametrize("name", [*BUILTINS, "chat"])
def test_chat_template_translation_for_every_template(tiny_llama_dir, name):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    for system in (None, SYSTEM):
        template = resolve_template(TemplateConfig(name=name, system_prompt=system), tokenizer, "causal")
        tokenizer.chat_template = hf_chat_template(template)
        for messages, context in CONVERSATIONS:
            extra = {"context": context} if context else {}
            for gen in (True, False):
                hf = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen, **extra)
                assert hf == template.render(messages, context, system, add_generation_prompt=gen), (name, system)


def test_refuses_to_overwrite(run_dir, merged, tmp_path):
    out, _ = merged
    with pytest.raises(RunError, match="not empty"):
        merge_run(run_dir, out)
    other = tmp_path / "holds-a-file"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(RunError, match="--overwrite"):
        merge_run(run_dir, other)
    assert (other / "notes.txt").read_text() == "keep me"
    with pytest.raises(RunError, match="the run"):
        merge_run(run_dir, run_dir, overwrite=True)


def test_overwrite_replaces_and_empty_folder_is_fine(run_dir, tmp_path):
    out = tmp_path / "m"
    out.mkdir()  # an empty folder is not "existing work"
    first = merge_run(run_dir, out, verify_inputs=["Question: hello"])
    assert first.passed and first.inputs == 1
    (out / "stale.txt").write_text("old")
    merge_run(run_dir, out, overwrite=True, verify_inputs=["Question: hello"])
    assert not (out / "stale.txt").exists() and (out / "lorakit.json").is_file()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_merge_is_verified_with_looser_tolerance(run_dir, tmp_path, dtype):
    report = merge_run(run_dir, tmp_path / dtype, dtype=dtype, verify_inputs=["Question: hello there"])
    assert report.passed and report.atol > 1e-4
    assert 0 < report.max_abs_diff <= report.atol + report.rtol * 50
    from transformers import AutoConfig

    assert str(AutoConfig.from_pretrained(tmp_path / dtype).dtype).endswith(dtype)


def test_refuses_kbit_dtype_and_merged_input(run_dir, merged, tmp_path):
    with pytest.raises(ConfigError, match="4-bit or 8-bit"):
        merge_run(run_dir, tmp_path / "q", dtype="4bit")
    with pytest.raises(ConfigError, match="float32, float16 or bfloat16"):
        merge_run(run_dir, tmp_path / "q", dtype="float64")
    with pytest.raises(RunError, match="already a merged model"):
        merge_run(merged[0], tmp_path / "again")


def test_quantized_run_merges_into_unquantized_base(tiny_llama_dir, tmp_path):
    run = make_run(tmp_path / "qlora-run", tiny_llama_dir, quantization="4bit")
    report = merge_run(run, tmp_path / "out", verify_inputs=["Question: hi"])
    assert report.passed
    assert any("4bit" in note and "unquantized" in note for note in report.notes)
    assert "unquantized" in report.summary()


def test_failed_verification_publishes_nothing(run_dir, tmp_path, monkeypatch):
    import lorakit.export.merge as export

    monkeypatch.setitem(export.TOLERANCES, "float32", (0.0, 0.0))
    monkeypatch.setattr(
        export,
        "compare_logits",
        lambda *a: {"passed": False, "max_abs_diff": 1.0, "mean_abs_diff": 0.5, "top1_agreement": 0.0},
    )
    with pytest.raises(ModelError, match="verification failed"):
        merge_run(run_dir, tmp_path / "bad", verify_inputs=["Question: hi"])
    assert not (tmp_path / "bad").exists()
    assert list(tmp_path.iterdir()) == []


def test_lorakit_generate_works_on_the_merged_folder(run_dir, merged):
    from lorakit.cli_commands import generate_command

    for question, context in [("What is the capital of France?", None), ("Who wrote it?", "Ann wrote it.")]:
        from_run = generate_command(str(run_dir), question, context, max_new_tokens=10)
        assert generate_command(str(merged[0]), question, context, max_new_tokens=10) == from_run
        if context:  # the merged folder keeps the run's extractive decoding
            assert from_run.strip() and (from_run.strip() in context or from_run.strip() == "unanswerable")


@pytest.mark.integration  # a live server
def test_merged_folder_can_be_served(merged):
    from fastapi.testclient import TestClient

    from lorakit.cli_commands import generate_command
    from lorakit.serve.app import create_app

    out = merged[0]
    body = {
        "model": out.name,
        "max_tokens": 10,
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
    }
    with TestClient(create_app([str(out)])) as http:
        reply = http.post("/v1/chat/completions", json=body)
    assert reply.status_code == 200
    expected = generate_command(str(out), "What is the capital of France?", max_new_tokens=10)
    assert reply.json()["choices"][0]["message"]["content"] == expected


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_seq2seq_merge(tiny_t5_dir, tmp_path, dtype):
    from lorakit.cli_commands import generate_command

    run = make_run(tmp_path / "t5-run", tiny_t5_dir, task_type="seq2seq")
    report = merge_run(run, tmp_path / "t5-merged", dtype=dtype)
    assert report.passed
    if dtype == "float32":
        assert report.dtype_noise_floor is None
        question = "What is the capital of France?"
        assert generate_command(str(tmp_path / "t5-merged"), question, max_new_tokens=8) == generate_command(
            str(run), question, max_new_tokens=8
        )
    else:  # half precision is judged against what the precision alone costs, and says so
        assert report.dtype_noise_floor > 0 and "unmerged in bfloat16" in report.summary()
