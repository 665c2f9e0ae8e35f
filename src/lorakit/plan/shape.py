"""The numbers of a model that decide its memory and compute, read without loading any weights:
from config.json (the model is built on the meta device, so parameter counts and linear layers
are exact) or from a GGUF file's header (tensors are memory-mapped, never read)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ModelShape:
    """The numbers that decide memory and compute, read without loading any weights."""

    model_type: str
    hidden_size: int
    num_layers: int  # decoder layers of a causal LM; encoder layers of a seq2seq model
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tied_embeddings: bool
    n_params: int
    # leaf name -> (in_features, out_features, how many layers have it); lm_head excluded
    linear_layers: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    gated_mlp: bool = True
    num_decoder_layers: int = 0  # seq2seq only
    source: str = ""
    plain_logits: bool = True  # logits = head(hidden), no softcap or scale (the labelled-logits loss needs it)

    @property
    def is_seq2seq(self) -> bool:
        return self.num_decoder_layers > 0

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size * (1 if self.tied_embeddings else 2)

    @property
    def linear_params(self) -> int:
        return sum(i * o * n for i, o, n in self.linear_layers.values())


# Config fields through which a model changes its logits after the projection (train/loss.py checks
# the same ones, and the logits themselves, before it projects only labelled positions).
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")

# --- reading the shape -----------------------------------------------------------------------

GGUF_NAMES = {  # GGUF tensor names -> transformers leaf names
    "attn_q": "q_proj",
    "attn_k": "k_proj",
    "attn_v": "v_proj",
    "attn_output": "o_proj",
    "attn_qkv": "qkv_proj",
    "ffn_gate": "gate_proj",
    "ffn_up": "up_proj",
    "ffn_down": "down_proj",
}


def read_model_shape(model_config) -> ModelShape:
    """The model's shape from a lorakit `ModelConfig`, a folder / hub id / .gguf path, or a
    transformers config. config.json models are built on the meta device (exact parameter count
    and linear layers, no memory); GGUF files are read from their header only.

    Raises:
        ModelError: the model or its config cannot be found or read.
    """
    from ..config import ModelConfig

    if isinstance(model_config, str):
        model_config = ModelConfig(name_or_path=model_config)
    if isinstance(model_config, ModelConfig):
        from ..models.loading import load_model_config, resolve_source

        folder, gguf, _ = resolve_source(model_config)
        if gguf:
            return _shape_from_gguf(f"{folder}/{gguf}")
        return _shape_from_hf_config(load_model_config(model_config), model_config.name_or_path)
    return _shape_from_hf_config(model_config, getattr(model_config, "name_or_path", "") or "config")


def _shape_from_hf_config(hf_config, source: str) -> ModelShape:
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from ..errors import ModelError

    seq2seq = bool(getattr(hf_config, "is_encoder_decoder", False))
    auto = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
    try:
        with torch.device("meta"):
            model = auto.from_config(hf_config)
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelError(
            f"cannot build the model described by {source}'s config to read its shape: {exc}",
            hint="check model.name_or_path points at a causal or seq2seq language model",
        ) from exc
    linear: dict[str, list[int]] = {}
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, torch.nn.Linear) and leaf not in ("lm_head", "embed_out", "output"):
            entry = linear.setdefault(leaf, [module.in_features, module.out_features, 0])
            entry[2] += 1
    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    h = text.hidden_size
    heads = text.num_attention_heads
    layers = text.num_hidden_layers
    inter = (
        getattr(text, "intermediate_size", None)
        or getattr(text, "d_ff", None)
        or getattr(text, "ffn_dim", None)
        or 4 * h
    )
    gated = any(n in linear for n in ("gate_proj", "wi_0", "w3", "gate_up_proj"))
    return ModelShape(
        model_type=getattr(hf_config, "model_type", "unknown"),
        hidden_size=h,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or getattr(text, "d_kv", None) or h // heads,
        intermediate_size=inter,
        vocab_size=text.vocab_size,
        tied_embeddings=bool(getattr(text, "tie_word_embeddings", False)),
        n_params=sum(p.numel() for p in model.parameters()),
        linear_layers={k: tuple(v) for k, v in linear.items()},
        gated_mlp=gated,
        num_decoder_layers=getattr(text, "num_decoder_layers", 0) or 0 if seq2seq else 0,
        source=source,
        plain_logits=all(getattr(text, name, None) in (None, 1) for name in LOGIT_TRANSFORMS),
    )


def _shape_from_gguf(path: str) -> ModelShape:
    from ..errors import ModelError, require

    gguf = require("gguf", "gguf", "Reading a GGUF model's shape")
    try:
        reader = gguf.GGUFReader(path)  # memory-maps the file: tensors are not read
    except (OSError, ValueError) as exc:
        raise ModelError(
            f"cannot read the GGUF header of '{path}': {exc}", hint="check the file is a complete .gguf model"
        ) from exc

    def field(key, default=None):
        f = reader.fields.get(key)
        return f.contents() if f is not None else default

    arch = field("general.architecture", "llama")
    h = int(field(f"{arch}.embedding_length"))
    heads = int(field(f"{arch}.attention.head_count"))
    tokens = field("tokenizer.ggml.tokens") or []
    linear: dict[str, list[int]] = {}
    names = set()
    n_params = 0
    for tensor in reader.tensors:
        names.add(tensor.name)
        n_params += int(tensor.n_elements)
        parts = tensor.name.split(".")  # blk.<i>.<kind>.weight
        if parts[0] == "blk" and parts[-1] == "weight" and parts[2] in GGUF_NAMES:
            shape = [int(x) for x in tensor.shape]  # GGUF lists in_features first
            entry = linear.setdefault(GGUF_NAMES[parts[2]], [shape[0], shape[1], 0])
            entry[2] += 1
    return ModelShape(
        model_type=str(arch),
        hidden_size=h,
        num_layers=int(field(f"{arch}.block_count")),
        num_heads=heads,
        num_kv_heads=int(field(f"{arch}.attention.head_count_kv", heads)),
        head_dim=int(field(f"{arch}.attention.key_length", h // heads)),
        intermediate_size=int(field(f"{arch}.feed_forward_length", 4 * h)),
        vocab_size=int(field(f"{arch}.vocab_size", len(tokens))),
        tied_embeddings="output.weight" not in names,
        n_params=n_params,
        linear_layers={k: tuple(v) for k, v in linear.items()},
        gated_mlp="gate_proj" in linear,
        source=path,
    )
