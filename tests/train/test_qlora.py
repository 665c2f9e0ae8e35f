"""The seeds' QLoRA recipe end to end on the tiny models, on whatever device runs the tests (the CPU
here): 4-bit NF4 with double quantization (and 8-bit) loading through bitsandbytes, k-bit
preparation, paged 8-bit AdamW, gradient checkpointing, packed rows with a 4D mask (causal),
resume, `eval --compare base`, merge into the unquantized base, and serve."""

from __future__ import annotations

import json

import pytest
import torch
from test_train import QA, SigintAt, Snapshot, StepLog, adapter_tensors, make_config
from transformers import TrainerCallback

from lorakit.cli import main
from lorakit.errors import ConfigError, ModelError
from lorakit.models import kbit
from lorakit.runs import RunPaths, run_dir_for
from lorakit.train.recipe import TrainingInterrupted, train

pytestmark = pytest.mark.integration  # tiny trainings end to end

QLORA = dict(optimizer="paged_adamw_8bit", gradient_checkpointing=True)
LAYERS = {"4bit": ("Linear4bit", torch.uint8), "8bit": ("Linear8bitLt", torch.int8)}


@pytest.fixture(scope="module")
def qa_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "qa.jsonl"
    path.write_text("\n".join(json.dumps({"question": q, "answer": a}) for q, a in QA), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def models(tiny_llama_dir, tiny_t5_dir):
    return {"llama": tiny_llama_dir, "t5": tiny_t5_dir}


def qlora_config(tmp_path, data, model_dir, quantization="4bit", **train_settings):
    config = make_config(tmp_path, data, model_dir, **{**QLORA, **train_settings})
    config.model.quantization = quantization
    return config


class Seen(TrainerCallback):
    """The model's layer types and the optimizer the Trainer built."""

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.layers = {type(m).__name__ for m in model.modules()}
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps it
        self.optimizer = (type(inner).__module__.split(".")[0], inner.args.optim_bits, inner.is_paged)


@pytest.mark.parametrize("family", ["llama", "t5"])
@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_kbit_training_changes_the_adapter_and_not_the_quantized_base(
    tmp_path, qa_file, models, family, quantization, caplog
):
    snap, seen = Snapshot(), Seen()
    with caplog.at_level("INFO", logger="lorakit.train"):
        train(qlora_config(tmp_path, qa_file, models[family], quantization, max_steps=3), callbacks=[snap, seen])
    layer, stored = LAYERS[quantization]
    assert layer in seen.layers and seen.optimizer == ("bitsandbytes", 8, True)  # paged 8-bit AdamW
    lora = [n for n in snap.before if "lora_" in n]
    base = [n for n in snap.before if "lora_" not in n]
    assert any(snap.before[n].dtype == stored for n in base), "the base was not quantized"
    # every adapter moved, the first layer's too: gradients flowed back through the k-bit layers
    assert lora and all(not torch.equal(snap.before[n], snap.after[n]) for n in lora if "lora_B" in n)
    assert all(torch.equal(snap.before[n], snap.after[n]) for n in base)
    if family == "llama":  # train.packing=auto packs causal rows with a 4D bool mask, quantized too
        assert any("packing: passages" in r.getMessage() for r in caplog.records)


def test_4bit_layers_keep_their_gradients_after_an_eval_pass(tiny_llama_dir):
    """bitsandbytes repacks a 4-bit layer for a bfloat16 inference kernel without a backward at its
    first eval-mode, no-grad forward (on CPUs with AVX512-BF16); a training model must not take it,
    or an evaluation during training silently stops the gradients."""
    from lorakit.config import LoraConfig, ModelConfig
    from lorakit.models.loading import load_base_model
    from lorakit.models.lora import apply_lora

    model = load_base_model(ModelConfig(name_or_path=str(tiny_llama_dir), quantization="4bit"), "causal", training=True)
    model = apply_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0), "causal")
    # the first layer's lora_B: its gradient comes back through every 4-bit layer above it
    first = next(p for n, p in model.named_parameters() if "layers.0" in n and "lora_B" in n)
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))

    def grad():
        model.train()
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        return first.grad.clone()

    before = grad()
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    after = grad()
    assert before.abs().max() > 0
    # the same float32 operations again: equal up to summation-order rounding at the gradient's scale
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6 * float(before.abs().max()))


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_qlora_resume_matches_an_uninterrupted_run(tmp_path, qa_file, models, family):
    settings = dict(max_steps=6, micro_batch_size=2, lora={"r": 4, "alpha": 8, "dropout": 0.1})
    if family == "t5":
        # T5 is never packed, so its batches come from transformers' LengthGroupedSampler, which draws
        # each epoch's order from the global RNG before a resumed run restores it: a length-grouped run
        # resumed mid-epoch sees other batches (quantized or not). Random order resumes exactly.
        settings["group_by_length"] = False
    straight = adapter_tensors(train(qlora_config(tmp_path / "a", qa_file, models[family], **settings)))
    config = qlora_config(tmp_path / "b", qa_file, models[family], **settings)
    with pytest.raises(TrainingInterrupted):
        train(config, callbacks=[SigintAt(2)])
    assert RunPaths(run_dir_for(config)).latest_checkpoint().name == "checkpoint-3"
    seen = StepLog()
    resumed = adapter_tensors(train(config, resume=True, callbacks=[seen]))
    assert seen.steps == [4, 5, 6]
    # the 8-bit optimizer states, RNG and data order are restored; the same CPU operations follow,
    # so the result is exact in principle and differs by float32 rounding at most
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=1e-5, atol=1e-6)
    # the tolerance means something: another seed (dropout masks, data order) ends elsewhere
    other = adapter_tensors(train(qlora_config(tmp_path / "c", qa_file, models[family], seed=7, **settings)))
    assert any(not torch.allclose(other[n], straight[n], rtol=1e-5, atol=1e-6) for n in straight)


# --- after training: eval --compare base, merge, serve -----------------------------------------------


@pytest.fixture(scope="module", params=["llama", "t5"])
def trained(request, tmp_path_factory, qa_file, models):
    tmp = tmp_path_factory.mktemp(f"qlora-{request.param}")
    steps = 40 if request.param == "llama" else 60
    config = qlora_config(tmp, qa_file, models[request.param], max_steps=steps, learning_rate=2e-2)
    config.eval.max_new_tokens = 16
    return request.param, train(config).root


def test_eval_compare_base_on_the_quantized_base(trained, qa_file, tmp_path):
    from lorakit.evaluate.runner import evaluate_path

    family, run = trained
    metrics = evaluate_path(run, data=str(qa_file), compare_base=True, out_dir=tmp_path / "eval", verbose=False)
    assert metrics["n"] == len(QA)
    if family == "llama":  # the tiny Llama learns its four answers (EM 100 measured); T5 does not in 60 steps
        assert metrics["adapter"]["exact_match"] >= 75.0
    assert metrics["adapter"]["f1"] > metrics["base"]["f1"]
    assert (tmp_path / "eval" / "predictions.jsonl").is_file()


def test_merge_into_the_unquantized_base_is_within_the_quantization_error(trained, tmp_path):
    from lorakit.export.merge import merge_run

    _, run = trained
    report = merge_run(run, tmp_path / "merged")
    assert report.passed and (tmp_path / "merged" / "model.safetensors").is_file()
    # exact against base + adapter on the unquantized base (float32 rounding only) ...
    assert report.max_abs_diff <= 1e-4
    # ... and against the model as it trained: off by about the base's own quantization error
    assert report.quantization_floor is not None and report.quantized_max_abs_diff is not None
    assert report.quantization_floor > 100 * report.max_abs_diff, "the 4-bit error must dominate float noise"
    assert report.quantized_max_abs_diff <= 1.5 * report.quantization_floor + report.atol
    stored = json.loads((tmp_path / "merged" / "merge_verification.json").read_text())
    assert stored["quantization_floor"] == report.quantization_floor
    assert "quantization alone" in report.summary()


def test_serve_answers_from_the_quantized_run(trained):
    from fastapi.testclient import TestClient

    from lorakit.cli_commands import generate_command
    from lorakit.serve.app import create_app

    family, run = trained
    question, answer = QA[0]
    expected = generate_command(str(run), question, max_new_tokens=16)
    if family == "llama":
        assert expected.strip() == answer
    body = {"model": run.name, "max_tokens": 16, "temperature": 0, "messages": [{"role": "user", "content": question}]}
    with TestClient(create_app([str(run)], max_tokens_limit=32)) as http:
        reply = http.post("/v1/chat/completions", json=body)
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["content"] == expected


# --- where bitsandbytes cannot run --------------------------------------------------------------------


@pytest.mark.parametrize(
    "part, setting, error, needs",
    [
        ("quantization", {"model.quantization": "4bit"}, ModelError, "bitsandbytes>=0.46"),
        ("optimizer", {"train.optimizer": "paged_adamw_8bit"}, ConfigError, "bitsandbytes>=0.50"),
    ],
)
def test_a_bitsandbytes_that_cannot_run_here_fails_in_setup_naming_the_version(
    tmp_path, qa_file, tiny_llama_dir, monkeypatch, part, setting, error, needs
):
    from lorakit.models import loading

    def probe(asked, device):
        return "bitsandbytes 0.45.5 failed on cpu: no kernel" if asked == part else None

    def must_not_run(*args, **kwargs):
        raise AssertionError("weights loaded for a config the device cannot run")

    monkeypatch.setattr(kbit, "probe", probe)
    monkeypatch.setattr(loading, "load_base_model", must_not_run)
    config = make_config(tmp_path, qa_file, tiny_llama_dir, max_steps=1)
    for key, value in setting.items():
        section, name = key.split(".")
        setattr(getattr(config, section), name, value)
    with pytest.raises(error, match=needs.replace(".", r"\.")) as info:
        train(config)
    assert "0.45.5" in str(info.value) and "lorakit[quant]" in (info.value.hint or "")
    assert not (tmp_path / "runs").exists()


def test_the_cli_says_it_in_one_line(tmp_path, qa_file, tiny_llama_dir, monkeypatch, capsys):
    monkeypatch.setattr(kbit, "probe", lambda part, device: "bitsandbytes 0.45.5 has no cpu backend")
    config = tmp_path / "config.yaml"
    config.write_text(
        f"data: {{path: {qa_file}, split: {{train: 1.0, validation: 0.0, test: 0.0}}}}\n"
        f"model: {{name_or_path: {tiny_llama_dir}, quantization: 4bit}}\n"
        f"train: {{output_dir: {tmp_path / 'runs'}, max_steps: 1}}\n",
        encoding="utf-8",
    )
    assert main(["train", str(config)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: model.quantization=4bit needs bitsandbytes")
    assert "Fix: pip install 'bitsandbytes>=0.46'" in lines[0]
    assert not (tmp_path / "runs").exists()
