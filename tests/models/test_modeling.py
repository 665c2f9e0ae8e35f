from __future__ import annotations

from unittest import mock

import pytest
import torch

from lorakit.config import LoraConfig, ModelConfig
from lorakit.errors import ModelError
from lorakit.models import identity as base_identity
from lorakit.models import loading as modeling
from lorakit.models import lora, precision


def test_detect_task_type_from_config_and_override(tiny_llama_dir, tiny_t5_dir):
    assert modeling.detect_task_type(ModelConfig(name_or_path=str(tiny_llama_dir))) == "causal"
    assert modeling.detect_task_type(ModelConfig(name_or_path=str(tiny_t5_dir))) == "seq2seq"
    forced = ModelConfig(name_or_path=str(tiny_llama_dir), task_type="seq2seq")
    assert modeling.detect_task_type(forced) == "seq2seq"


def test_choose_precision_per_device():
    assert precision.choose_precision("auto", "cpu") == (torch.float32, "float32")
    assert precision.choose_precision("float32", "cpu") == (torch.float32, "float32")
    with pytest.warns(UserWarning, match="slower"):
        assert precision.choose_precision("bfloat16", "cpu") == (torch.bfloat16, "bfloat16")
    with pytest.raises(ModelError, match="float16 training needs a CUDA GPU"):
        precision.choose_precision("float16", "cpu")
    # a T4-like GPU without bf16: float16 mixed precision over float32 master weights
    with (
        mock.patch.object(torch.cuda, "is_available", return_value=True),
        mock.patch.object(torch.cuda, "is_bf16_supported", return_value=False),
    ):
        assert precision.choose_precision("auto", "cuda") == (torch.float32, "float16")
        with pytest.raises(ModelError, match="does not support"):
            precision.choose_precision("bfloat16", "cuda")
    with (
        mock.patch.object(torch.cuda, "is_available", return_value=True),
        mock.patch.object(torch.cuda, "is_bf16_supported", return_value=True),
    ):
        assert precision.choose_precision("auto", "cuda:0") == (torch.bfloat16, "bfloat16")


def test_load_tokenizer_uses_eos_as_pad_when_missing(tmp_path, tiny_llama_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tok.pad_token = None
    tok.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text((tiny_llama_dir / "config.json").read_text())
    loaded = modeling.load_tokenizer(ModelConfig(name_or_path=str(tmp_path)))
    assert loaded.pad_token == loaded.eos_token == "<|im_end|>"


def test_missing_and_non_model_paths_raise_model_error(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        modeling.load_tokenizer(ModelConfig(name_or_path=str(tmp_path / "nope")))
    with pytest.raises(ModelError, match="no config.json"):
        modeling.load_base_model(ModelConfig(name_or_path=str(tmp_path)), "causal")
    with pytest.raises(ModelError, match="GGUF file"):
        modeling.load_base_model(ModelConfig(name_or_path=str(tmp_path / "m.gguf")), "causal")


def test_quantization_where_bitsandbytes_cannot_run_fails_before_loading(tiny_llama_dir, monkeypatch):
    from lorakit.models import kbit

    monkeypatch.setattr(kbit, "probe", lambda part, device: f"bitsandbytes 0.45.5 has no {device} backend")
    config = ModelConfig(name_or_path=str(tiny_llama_dir), quantization="4bit")
    with mock.patch("transformers.AutoModelForCausalLM.from_pretrained") as loader:
        with pytest.raises(ModelError, match=r"has no cpu backend.*pip install 'bitsandbytes>=0\.46'"):
            modeling.load_base_model(config, "causal", device="cpu")
        loader.assert_not_called()


@pytest.mark.parametrize("quantization, layer", [("4bit", "Linear4bit"), ("8bit", "Linear8bitLt")])
def test_kbit_loading_on_this_device(tiny_llama_dir, quantization, layer):
    from lorakit.models import kbit

    model = modeling.load_base_model(ModelConfig(name_or_path=str(tiny_llama_dir), quantization=quantization), "causal")
    q_proj = model.model.layers[0].self_attn.q_proj
    assert type(q_proj).__name__ == layer
    if quantization == "4bit":  # NF4, double-quantized, computing in float32 on the CPU
        state = q_proj.weight.quant_state
        assert state.quant_type == "nf4" and state.nested
        assert q_proj.compute_dtype == kbit.compute_dtype(torch.float32, None)
    assert model.lm_head.weight.dtype == torch.float32  # the head stays unquantized
    full = modeling.load_base_model(ModelConfig(name_or_path=str(tiny_llama_dir)), "causal")
    total = sum(p.numel() for p in full.parameters())  # a 4-bit weight packs two per byte, counted as two
    assert lora.trainable_summary(model) == f"trainable 0 of {lora._count(total)} parameters (0.00%)"
    assert kbit.probe("quantization", "nowhere") is not None  # an unknown device is never "supported"


def test_apply_lora_auto_targets_per_family(tiny_llama_dir, tiny_t5_dir):
    llama = modeling.load_base_model(ModelConfig(name_or_path=str(tiny_llama_dir)), "causal")
    peft_model = lora.apply_lora(llama, LoraConfig(r=4, alpha=8, target_modules="auto"), "causal")
    assert sorted(peft_model.peft_config["default"].target_modules) == ["q_proj", "v_proj"]
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert lora.trainable_summary(peft_model).startswith("trainable ")

    t5 = modeling.load_base_model(ModelConfig(name_or_path=str(tiny_t5_dir)), "seq2seq")
    peft_t5 = lora.apply_lora(t5, LoraConfig(r=4, target_modules="auto"), "seq2seq")
    assert sorted(peft_t5.peft_config["default"].target_modules) == ["q", "v"]


def test_default_targets_are_every_linear_layer_of_the_blocks(tiny_llama_dir, tiny_t5_dir):
    # docs/recipes.md: all-linear beat attention-only on held-out SQuAD articles
    llama = modeling.load_base_model(ModelConfig(name_or_path=str(tiny_llama_dir)), "causal")
    wrapped = lora.apply_lora(llama, LoraConfig(r=4), "causal")
    adapted = {n.split(".")[-4] for n, _ in wrapped.named_parameters() if "lora_A" in n}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert not any("lm_head" in n and "lora_" in n for n, _ in wrapped.named_parameters())
    t5 = modeling.load_base_model(ModelConfig(name_or_path=str(tiny_t5_dir)), "seq2seq")
    adapted_t5 = {
        n.split(".")[-4] for n, _ in lora.apply_lora(t5, LoraConfig(r=4), "seq2seq").named_parameters() if "lora_A" in n
    }
    assert {"q", "k", "v", "o"} <= adapted_t5 and adapted_t5 & {"wi", "wi_0", "wi_1", "wo"}


def test_apply_lora_explicit_list_and_unknown_names(tiny_llama_dir):
    model = modeling.load_base_model(ModelConfig(name_or_path=str(tiny_llama_dir)), "causal")
    with pytest.raises(ModelError, match="query_proj not found.*q_proj"):
        lora.apply_lora(model, LoraConfig(target_modules=["query_proj"]), "causal")
    peft_model = lora.apply_lora(model, LoraConfig(r=2, target_modules=["o_proj", "up_proj"]), "causal")
    assert sorted(peft_model.peft_config["default"].target_modules) == ["o_proj", "up_proj"]


@pytest.mark.integration  # a tiny training
def test_gradient_checkpointing_still_trains_adapters(tiny_llama_dir):
    model = modeling.load_base_model(ModelConfig(name_or_path=str(tiny_llama_dir)), "causal")
    peft_model = lora.apply_lora(model, LoraConfig(r=4, dropout=0.0), "causal", gradient_checkpointing=True)
    peft_model.train()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    peft_model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_base_model_identity_hashes_local_weights(tiny_llama_dir):
    import hashlib

    identity = base_identity.base_model_identity(ModelConfig(name_or_path=str(tiny_llama_dir)))
    expected = hashlib.sha256((tiny_llama_dir / "model.safetensors").read_bytes()).hexdigest()
    assert identity["sha256"] == expected
    assert identity["name_or_path"] == str(tiny_llama_dir.resolve())
    hub = base_identity.base_model_identity(ModelConfig(name_or_path="org/model", revision="abc123"))
    assert hub == {"name_or_path": "org/model", "gguf_file": None, "revision": "abc123", "sha256": None}


def test_truncated_weights_name_the_file_before_loading(tmp_path, tiny_llama_dir):
    import shutil

    from lorakit.models.loading import check_safetensors

    check_safetensors(tiny_llama_dir)  # a complete file passes
    folder = tmp_path / "cut"
    shutil.copytree(tiny_llama_dir, folder)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    for cut in (len(data) - 1, len(data) // 2, 4, 0):
        weights.write_bytes(data[:cut])
        with pytest.raises(ModelError, match="model.safetensors' is truncated or damaged") as err:
            modeling.load_base_model(ModelConfig(name_or_path=str(folder)), "causal")
        assert "again" in err.value.hint
