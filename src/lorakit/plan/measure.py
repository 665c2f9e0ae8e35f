"""Measuring what a LoRA training step really holds: the peak of live tensor bytes.

On the CPU there is no allocator statistic like `torch.cuda.max_memory_allocated`, and RSS mixes
tensors with code, caches and allocator slack. `TensorMemoryTracker` counts exactly the tensor
storage alive at each moment, which is the quantity `lorakit.memory` predicts (and what a CUDA
allocator reports), so prediction and measurement compare like with like.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..config import LoraConfig, TrainConfig
from ..config import default_of as config_default


class TensorMemoryTracker:
    """A dispatch mode that tracks live tensor storage bytes and their peak, on any device.

    Every tensor an operation returns is counted once per storage (views share it); a weakref
    callback subtracts the storage when it is freed. `track()` adds tensors that existed before
    (the model's weights). Deterministic, and the same quantity a GPU allocator counts.
    """

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils.weak import WeakIdKeyDictionary

        tracker = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                tracker.track(out)
                return out

        self._mode = _Mode()
        self._storages = WeakIdKeyDictionary()
        self.current = 0
        self.peak = 0

    def track(self, obj) -> None:
        import torch
        from torch.utils._pytree import tree_flatten

        for t in tree_flatten(obj)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            if storage in self._storages:
                continue
            nbytes = storage.nbytes()
            self._storages[storage] = weakref.ref(storage, lambda _ref, n=nbytes: self._freed(n))
            self.current += nbytes
            self.peak = max(self.peak, self.current)

    def _freed(self, nbytes: int) -> None:
        self.current -= nbytes

    def reset_peak(self) -> None:
        self.peak = self.current

    def __enter__(self):
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)


@dataclass
class StepMeasurement:
    peak_bytes: int  # peak live tensor bytes over the measured steps (weights included)
    seconds_per_step: float  # wall time of an untracked step, after a warm-up step


def measure_lora_step(
    hf_config,
    *,
    micro_batch: int,
    seq_len: int,
    lora_r: int = config_default(LoraConfig, "r"),
    lora_dropout: float = config_default(LoraConfig, "dropout"),
    target_modules=config_default(LoraConfig, "target_modules"),
    gradient_checkpointing: bool = config_default(TrainConfig, "gradient_checkpointing"),
    attn: str = "sdpa",
    steps: int = 2,
    timed_steps: int = 1,
    dtype=None,
    labelled: int | None = None,
    loss_fn: Callable[[Any, dict[str, Any]], Any] | None = None,
    batch: dict[str, Any] | None = None,
    quantization: str = "none",
    optimizer: str = "adamw_torch",
) -> StepMeasurement:
    """Run real LoRA training steps on a random-init causal LM built from `hf_config` (on the CPU, in
    `dtype`, default float32) the way the Trainer does (loss only is kept, then backward, AdamW step, zero grads) and measure
    the peak tensor memory and the time per step. No weights are downloaded.

    The batch is `micro_batch` x `seq_len` random ids with labels everywhere, or only on the last
    `labelled` positions of each row (an answer after its prompt), given as `shift_labels` too;
    `batch` replaces it (e.g. a collator's packed rows). The loss is the model's own, or
    `loss_fn(model, batch)` (train.loss.causal_loss, which plan cannot import).

    `quantization` 4bit/8bit loads the random model through bitsandbytes as training does (saved to
    a temporary folder first); `optimizer` names a transformers optimizer: adamw_torch, or one of
    bitsandbytes' 8-bit AdamW variants (adamw_8bit, paged_adamw_8bit, ...)."""
    import torch
    from transformers import AutoModelForCausalLM

    from ..models.lora import apply_lora

    hf_config._attn_implementation = attn
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype or torch.float32)
    if quantization != "none":
        model = _quantized_copy(model, quantization, dtype or torch.float32)
    lora = LoraConfig(r=lora_r, alpha=2 * lora_r, dropout=lora_dropout, target_modules=target_modules)
    model = apply_lora(model, lora, "causal", gradient_checkpointing=gradient_checkpointing)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    if "8bit" in optimizer:
        import bitsandbytes as bnb

        opt = bnb.optim.AdamW(params, lr=1e-4, optim_bits=8, is_paged="paged" in optimizer)
    else:
        opt = torch.optim.AdamW(params, lr=1e-4)
    if batch is None:
        ids = torch.randint(0, hf_config.vocab_size, (micro_batch, seq_len))
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
        if labelled is not None:
            shift = torch.full_like(ids, -100)
            shift[:, seq_len - labelled - 1 : -1] = ids[:, seq_len - labelled :]
            batch["labels"] = batch["shift_labels"] = shift

    def step():
        # the output (logits) is dropped before backward, as in Trainer
        loss = loss_fn(model, batch) if loss_fn is not None else model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    tracker = TensorMemoryTracker()
    tracker.track([list(model.parameters()), list(model.buffers()), batch, _quant_state_tensors(model)])
    with tracker:
        for _ in range(steps):
            step()
    started = time.perf_counter()
    for _ in range(timed_steps):
        step()
    seconds = (time.perf_counter() - started) / timed_steps if timed_steps else float("nan")
    return StepMeasurement(peak_bytes=tracker.peak, seconds_per_step=seconds)


def _quantized_copy(model, quantization: str, dtype):
    """`model` saved and loaded back through bitsandbytes (lorakit's k-bit loading, for training)."""
    import tempfile

    from ..config import ModelConfig
    from ..models.loading import load_base_model

    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        config = ModelConfig(name_or_path=folder, quantization=quantization, task_type="causal")
        return load_base_model(config, "causal", dtype=dtype, training=True)


def _quant_state_tensors(model) -> list:
    """The tensors a k-bit layer keeps beside its weight: 4-bit absmax, codes, nested state; 8-bit SCB."""
    import torch

    found: list = []

    def collect(obj, depth=0) -> None:
        if depth > 2 or obj is None:
            return
        for value in vars(obj).values():
            if isinstance(value, torch.Tensor):
                found.append(value)
            elif type(value).__name__ == "QuantState":
                collect(value, depth + 1)

    for module in model.modules():
        weight = getattr(module, "weight", None)
        if weight is None:
            continue
        if getattr(weight, "quant_state", None) is not None:
            collect(weight.quant_state)
        if isinstance(getattr(weight, "SCB", None), torch.Tensor):
            found.append(weight.SCB)
    return found
