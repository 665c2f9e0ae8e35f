"""The device and the precision a model runs in: float32 on CPU, bf16 where the GPU has it, else fp16."""

from __future__ import annotations

import warnings

import torch

from ..errors import ModelError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def choose_precision(requested: str = "auto", device: str | None = None) -> tuple[torch.dtype, str]:
    """(dtype to load the weights in, training precision name) for a device.

    auto: float32 on CPU/MPS (bfloat16 matmuls are hundreds of times slower on most CPUs);
    bfloat16 on a CUDA GPU that supports it; float16 on older GPUs (T4, V100). float16 training
    keeps float32 master weights: the weights load in float32 and the Trainer's fp16 autocast plus
    loss scaling does the rest, so the returned dtype is float32 with the name "float16".

    An explicit request is honored where it can run: bfloat16 on a CPU works (with a warning that
    it is slow); float16 needs CUDA (the Trainer's fp16 mode is GPU-only) and bfloat16 needs a GPU
    that supports it, otherwise ModelError with the fix.
    """
    device = (device or default_device()).split(":")[0]
    cuda = device == "cuda"
    bf16_ok = cuda and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if requested == "auto":
        if not cuda:
            return torch.float32, "float32"
        return (torch.bfloat16, "bfloat16") if bf16_ok else (torch.float32, "float16")
    if requested == "float32":
        return torch.float32, "float32"
    if requested == "bfloat16":
        if cuda and not bf16_ok:
            raise ModelError(
                "model.precision: bfloat16 was requested but this GPU does not support it.",
                hint="set model.precision=float16 (or auto, which picks float16 here)",
            )
        if not cuda:
            warnings.warn(
                f"model.precision=bfloat16 on {device}: this is usually far slower than float32 there; "
                "set model.precision=auto to use float32.",
                stacklevel=2,
            )
        return torch.bfloat16, "bfloat16"
    if requested == "float16":
        if not cuda:
            raise ModelError(
                f"model.precision: float16 training needs a CUDA GPU (mixed precision with loss scaling), but the device is {device}.",
                hint="set model.precision=auto (float32 on CPU)",
            )
        return torch.float32, "float16"
    raise ModelError(f"model.precision: unknown value '{requested}'.", hint="use auto, float32, bfloat16 or float16")
