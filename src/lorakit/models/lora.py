"""LoRA adapters on a base model (peft): target modules, wrapping, the trainable summary."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..config import LoraConfig
from ..errors import ModelError

if TYPE_CHECKING:  # annotations only, no import cost
    from peft import PeftModel
    from transformers import PreTrainedModel

# Attention projections LoRA targets by default, per model family (first match wins).
AUTO_TARGETS = [
    ("q_proj", "v_proj"),  # llama, qwen, mistral, smollm, gemma, phi-3 style
    ("q", "v"),  # t5 / flan-t5
    ("query_key_value",),  # falcon, gpt-neox, bloom
    ("c_attn",),  # gpt2
    ("qkv_proj",),  # phi-3 fused
    ("Wqkv",),  # mpt
    ("query", "value"),  # bert-style
]


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """Leaf names of the linear layers LoRA can wrap (lm_head excluded), sorted."""
    from transformers.pytorch_utils import Conv1D

    kinds = (torch.nn.Linear, Conv1D)
    names = set()
    for full_name, module in model.named_modules():
        leaf = full_name.rsplit(".", 1)[-1]
        is_linear = isinstance(module, kinds) or type(module).__name__ in ("Linear4bit", "Linear8bitLt")
        if is_linear and leaf not in ("lm_head", "embed_out", "output"):
            names.add(leaf)
    return sorted(names)


def resolve_target_modules(model: torch.nn.Module, target_modules) -> list[str] | str:
    """ "auto" -> the family's attention projections; "all-linear" passes to peft; a list is checked.

    Raises:
        ModelError: a listed module does not exist, or "auto" knows no projections of this model.
    """
    available = linear_module_names(model)
    if target_modules == "all-linear":
        return "all-linear"
    if target_modules == "auto":
        for family in AUTO_TARGETS:
            if all(name in available for name in family):
                return list(family)
        raise ModelError(
            f"lora.target_modules=auto does not know this model's attention layers ({type(model).__name__}).",
            hint=f"set lora.target_modules to a list of these linear modules: {', '.join(available)}; or use all-linear",
        )
    unknown = [name for name in target_modules if name.rsplit(".", 1)[-1] not in available]
    if unknown:
        raise ModelError(
            f"lora.target_modules: {', '.join(unknown)} not found in {type(model).__name__}.",
            hint=f"choose from its linear modules: {', '.join(available)} (or auto / all-linear)",
        )
    return list(target_modules)


def apply_lora(
    model: PreTrainedModel, lora_config: LoraConfig, task_type: str, *, gradient_checkpointing: bool = False
) -> PeftModel:
    """Wrap `model` with a fresh LoRA adapter; only the adapter (and biases if asked) train.

    Gradient checkpointing uses the non-reentrant implementation and makes the input embeddings
    require grad, so gradients still reach the adapters while the base weights stay frozen.
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import TaskType, get_peft_model

    targets = resolve_target_modules(model, lora_config.target_modules)
    if gradient_checkpointing:
        # transformers >= 5.x names it activation checkpointing; older 5.x only has the alias
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
        model.config.use_cache = False  # the cache is useless (and warned about) when recomputing
    peft_config = PeftLoraConfig(
        task_type=TaskType.SEQ_2_SEQ_LM if task_type == "seq2seq" else TaskType.CAUSAL_LM,
        r=lora_config.r,
        lora_alpha=lora_config.alpha,  # type: ignore[arg-type]  # peft hints int; it only divides by r, a float works
        lora_dropout=lora_config.dropout,
        target_modules=targets,
        use_dora=lora_config.use_dora,
        use_rslora=lora_config.use_rslora,
        bias=lora_config.bias,
    )
    return get_peft_model(model, peft_config)


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _weights(param: torch.Tensor) -> int:
    """How many weights a parameter holds: a 4-bit one packs two in each byte (its quant_state knows)."""
    state = getattr(param, "quant_state", None)
    shape = getattr(state, "shape", None)
    return int(torch.Size(shape).numel()) if shape is not None else param.numel()


def trainable_summary(model: torch.nn.Module) -> str:
    """A one-line count such as 'trainable 0.12M of 4.30M parameters (2.79%)'."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(_weights(p) for p in model.parameters())
    share = 100.0 * trainable / total if total else 0.0
    return f"trainable {_count(trainable)} of {_count(total)} parameters ({share:.2f}%)"
