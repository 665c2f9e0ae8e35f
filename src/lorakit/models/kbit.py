"""What the installed bitsandbytes can do on a device: k-bit (4-bit NF4, 8-bit) layers and its
8-bit / paged optimizers. Decided by capability, not by device name: bitsandbytes lists the devices
it has backends for (`supported_torch_devices`), and a tiny probe (a 64x64 quantized layer's
forward, one optimizer step on 4,096 values) shows that the installed build really runs there.
CUDA has run both for years; the CPU runs 4-bit and 8-bit layers since bitsandbytes 0.46 and its
optimizers since 0.50.
"""

from __future__ import annotations

import functools

import torch

from ..errors import LorakitError, require

# The oldest bitsandbytes that runs each part on a device (what an error asks for).
MIN_VERSION = {
    "cpu": {"quantization": "0.46", "optimizer": "0.50"},
    "cuda": {"quantization": "0.45", "optimizer": "0.45"},
}
WHAT = {"quantization": "4-bit and 8-bit layers", "optimizer": "8-bit and paged optimizers"}


def import_bnb():
    """bitsandbytes, imported with its noisy notes filtered (models/__init__.py); None when not installed."""
    try:
        import bitsandbytes
    except ImportError:
        return None
    return bitsandbytes


def device_type(device: str | None) -> str:
    from .precision import default_device

    return (device or default_device()).split(":")[0]


@functools.cache
def probe(part: str, device: str) -> str | None:
    """None when the installed bitsandbytes runs `part` ("quantization" or "optimizer") on `device`
    (a device type: cpu, cuda, mps, ...), else why not. Cached: each probe runs once per process."""
    bnb = import_bnb()
    if bnb is None:
        return "bitsandbytes is not installed"
    listed = getattr(bnb, "supported_torch_devices", {"cuda"})
    if device not in listed:
        return f"bitsandbytes {bnb.__version__} has no {device} backend (it lists {', '.join(sorted(listed))})"
    try:
        with torch.random.fork_rng(devices=[]):  # the probe must not move the caller's random stream
            torch.manual_seed(0)
            if part == "quantization":
                x = torch.randn(2, 64, device=device)
                for layer in (
                    bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4"),
                    bnb.nn.Linear8bitLt(64, 64, bias=False, has_fp16_weights=False),
                ):
                    out = layer.to(device)(x)
                    if out.shape != (2, 64) or not bool(torch.isfinite(out).all()):
                        return f"bitsandbytes {bnb.__version__} computed a wrong result on {device}"
            else:
                param = torch.nn.Parameter(torch.randn(4096, device=device))
                before = param.detach().clone()
                param.grad = torch.ones_like(param)
                bnb.optim.AdamW8bit([param], lr=1e-3).step()
                if torch.equal(before, param.detach()):
                    return f"bitsandbytes {bnb.__version__}'s optimizer step changed nothing on {device}"
    except Exception as exc:  # any failure of the library on this device means "cannot run here"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"bitsandbytes {bnb.__version__} failed on {device}: {first[:200]}"
    return None


def supports(part: str, device: str | None = None) -> bool:
    return probe(part, device_type(device)) is None


def ensure_runs(part: str, setting: str, device: str | None, error: type[LorakitError]) -> None:
    """Return when bitsandbytes is installed and `part` runs on `device`, else raise.

    `setting` is the config value that needs it (e.g. "train.optimizer=paged_adamw_8bit");
    `error` is the class its owner raises (ModelError for quantization, ConfigError for the
    optimizer). The message names the bitsandbytes version that can run it.

    Raises:
        MissingExtraError: bitsandbytes is not installed.
        LorakitError: `error`, when the installed bitsandbytes cannot run `part` on the device.
    """
    require("bitsandbytes", "quant", setting)
    kind = device_type(device)
    reason = probe(part, kind)
    if reason is None:
        return
    needed = MIN_VERSION.get(kind, {}).get(part)
    version = f"bitsandbytes>={needed}" if needed else f"a bitsandbytes release with {kind} support"
    message = f"{setting} needs bitsandbytes' {WHAT[part]} on {kind}, which cannot run here: {reason}."
    alternative = "model.quantization=none" if part == "quantization" else "train.optimizer=adamw_torch"
    raise error(message, hint=f"pip install '{version}' (lorakit[quant] installs it), or set {alternative}")


def compute_dtype(dtype: torch.dtype, device: str | None = None) -> torch.dtype:
    """The dtype k-bit layers compute in: float32 on the CPU (its 16-bit matmuls are slow, and
    float16 training there has no loss scaling), else the model's 16-bit dtype (float16 when the
    weights load in float32 for fp16 mixed precision)."""
    if device_type(device) == "cpu":
        return torch.float32
    return dtype if dtype != torch.float32 else torch.float16


def keep_autograd_kernels(model: torch.nn.Module) -> int:
    """Keep every 4-bit layer on bitsandbytes' differentiable path; returns how many layers.

    On a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit layer's weights for a fast bfloat16
    inference kernel the first time the layer runs in eval mode without gradients (an evaluation
    during training, a generation), and from then on uses that kernel in training too, where it
    has no backward: gradients stop flowing through the layer without an error. A model that
    trains must never take it."""
    layers = 0
    for module in model.modules():
        if type(module).__name__ == "Linear4bit" and hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False  # type: ignore[assignment]  # a plain bool attribute of bitsandbytes
            layers += 1
    return layers
