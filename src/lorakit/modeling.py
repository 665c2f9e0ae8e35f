"""Load a base model and its tokenizer (hub id, local folder or GGUF), pick the precision for the
device, quantize when asked (QLoRA, CUDA only), and wrap the model with a peft LoRA adapter.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from pathlib import Path
from typing import Optional

import torch

from .config import LoraConfig, ModelConfig
from .errors import ModelError, require
from .runs import sha256_file

logger = logging.getLogger(__name__)

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
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# --- where the weights come from ------------------------------------------------------------


def _looks_local(name: str) -> bool:
    """A path rather than a hub id: absolute, relative with ./, ~, a .gguf file, or deeper than org/name."""
    return name.startswith((".", "/", "~", "\\")) or name.endswith(".gguf") or name.count("/") > 1 or (
        len(name) > 1 and name[1] == ":"
    )


def resolve_source(model_config: ModelConfig) -> tuple[str, Optional[str], bool]:
    """(folder or hub id, gguf file name or None, is_local) for from_pretrained.

    Raises:
        ModelError: a local path that does not exist or is not a model folder, or whose
            safetensors weights are truncated.
    """
    name = model_config.name_or_path
    gguf = model_config.gguf_file
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise ModelError(
                f"model.name_or_path: GGUF file '{path}' does not exist.",
                hint="check the path, or give a hub id or a model folder",
            )
        return str(path.parent.resolve()), path.name, True
    if path.exists():
        if not path.is_dir():
            raise ModelError(
                f"model.name_or_path: '{path}' is a file but not a .gguf model.",
                hint="give a model folder (with config.json), a .gguf file, or a hub id",
            )
        if gguf is not None:
            if not (path / gguf).is_file():
                raise ModelError(
                    f"model.gguf_file: '{path / gguf}' does not exist.",
                    hint=f"list the .gguf files in {path} and set model.gguf_file to one of them",
                )
        elif not (path / "config.json").is_file():
            ggufs = sorted(p.name for p in path.glob("*.gguf"))
            hint = (
                f"set model.gguf_file to one of {ggufs}"
                if ggufs
                else "point model.name_or_path at a folder saved with save_pretrained (it has config.json)"
            )
            raise ModelError(f"model.name_or_path: folder '{path}' has no config.json, so it is not a model.", hint=hint)
        else:
            check_safetensors(path)  # a cut copy fails here, before anything else loads
        return str(path.resolve()), gguf, True
    if _looks_local(name):
        raise ModelError(
            f"model.name_or_path: local path '{name}' does not exist.",
            hint="check the path (relative paths are from the current folder), or give a hub id like org/model",
        )
    return name, gguf, False


def _pretrained_kwargs(model_config: ModelConfig, gguf: Optional[str]) -> dict:
    kwargs: dict = {"trust_remote_code": model_config.trust_remote_code}
    if model_config.revision:
        kwargs["revision"] = model_config.revision
    if gguf:
        require("gguf", "gguf", "Reading a GGUF model file")
        kwargs["gguf_file"] = gguf
    return kwargs


def _load_error(what: str, source: str, exc: Exception, is_local: bool) -> ModelError:
    hint = (
        "check the folder holds a complete transformers checkpoint (config.json, weights, tokenizer files)"
        if is_local
        else "check the hub id and revision, your network and HF_TOKEN for gated models, or download it and give the local folder"
    )
    return ModelError(f"could not load the {what} from '{source}': {exc}", hint=hint)


# --- task type and precision ----------------------------------------------------------------


def load_model_config(model_config: ModelConfig):
    """The transformers config (AutoConfig), read without loading any weights."""
    from transformers import AutoConfig

    source, gguf, is_local = resolve_source(model_config)
    try:
        return AutoConfig.from_pretrained(source, **_pretrained_kwargs(model_config, gguf))
    except (OSError, ValueError, KeyError) as exc:
        raise _load_error("model config", source, exc, is_local) from exc


def detect_task_type(model_config: ModelConfig) -> str:
    """"causal" or "seq2seq": model.task_type when set, else the config's is_encoder_decoder."""
    if model_config.task_type != "auto":
        return model_config.task_type
    config = load_model_config(model_config)
    return "seq2seq" if getattr(config, "is_encoder_decoder", False) else "causal"


def default_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def choose_precision(requested: str = "auto", device: Optional[str] = None) -> tuple[torch.dtype, str]:
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


# --- tokenizer and model --------------------------------------------------------------------


def load_tokenizer(model_config: ModelConfig):
    """The model's tokenizer. Without a pad token, EOS doubles as pad: safe because the collator
    masks padding by position (attention mask / label -100), so real EOS tokens stay labelled.

    Raises:
        ModelError: the path is missing, not a model, or the tokenizer cannot be loaded.
    """
    from transformers import AutoTokenizer

    source, gguf, is_local = resolve_source(model_config)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **_pretrained_kwargs(model_config, gguf))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise _load_error("tokenizer", source, exc, is_local) from exc
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelError(
                f"the tokenizer of '{source}' has neither a pad nor an EOS token, so batches cannot be padded and answers cannot end.",
                hint="use a model whose tokenizer defines eos_token (instruction/chat models do)",
            )
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_quantization(model_config: ModelConfig) -> None:
    """Fail before loading any weights when k-bit quantization cannot run here.

    Raises:
        ModelError: 4bit/8bit without a CUDA GPU.
        MissingExtraError: bitsandbytes is not installed.
    """
    if model_config.quantization == "none":
        return
    if not torch.cuda.is_available():
        raise ModelError(
            f"model.quantization={model_config.quantization}: bitsandbytes k-bit quantization (QLoRA) needs a CUDA GPU, and none is available.",
            hint="set model.quantization=none to train in float32 on the CPU (use a small model)",
        )
    require("bitsandbytes", "quant", f"model.quantization={model_config.quantization}")


def load_base_model(
    model_config: ModelConfig,
    task_type: str,
    *,
    dtype: torch.dtype = torch.float32,
    device: Optional[str] = None,
    compute_dtype: Optional[torch.dtype] = None,
):
    """AutoModelForCausalLM / AutoModelForSeq2SeqLM from a hub id, folder or GGUF file.

    With model.quantization 4bit/8bit (CUDA only): NF4 + double quantization, computing in
    `compute_dtype` (default: dtype, or float16 when dtype is float32), then peft's
    prepare_model_for_kbit_training.

    Raises:
        ModelError: missing path, not a model, unsupported quantization device, load failure.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    check_quantization(model_config)  # before touching any weights
    source, gguf, is_local = resolve_source(model_config)
    kwargs = _pretrained_kwargs(model_config, gguf)
    kwargs["dtype"] = dtype
    if model_config.attn_implementation:
        kwargs["attn_implementation"] = model_config.attn_implementation
    if model_config.device_map:
        kwargs["device_map"] = model_config.device_map
    quantized = model_config.quantization != "none"
    if quantized:
        from transformers import BitsAndBytesConfig

        compute = compute_dtype or (dtype if dtype != torch.float32 else torch.float16)
        if model_config.quantization == "4bit":
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=compute,
            )
        else:
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        kwargs.setdefault("device_map", {"": torch.cuda.current_device()})
    auto = AutoModelForSeq2SeqLM if task_type == "seq2seq" else AutoModelForCausalLM
    from safetensors import SafetensorError

    try:
        model = auto.from_pretrained(source, **kwargs)
    except (OSError, ValueError, KeyError, SafetensorError) as exc:
        raise _load_error(f"{task_type} model", source, exc, is_local) from exc
    if quantized:
        from peft import prepare_model_for_kbit_training

        # gradient checkpointing is switched on (or not) by apply_lora
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    elif device is not None and "device_map" not in kwargs:
        model = model.to(device)
    return model


def check_safetensors(folder: Path) -> None:
    """Every .safetensors file in `folder` is complete: its header parses and the file is as long
    as the header says. safetensors itself reports a cut file without naming it.

    Raises:
        ModelError: a weights file is truncated or damaged (an interrupted copy or download).
    """
    for path in sorted(folder.glob("*.safetensors")):
        size = path.stat().st_size
        try:
            with path.open("rb") as handle:
                length = int.from_bytes(handle.read(8), "little")
                if size < 8 or 8 + length > size:
                    raise ValueError("the header is cut off")
                header = json.loads(handle.read(length))
            end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
            if 8 + length + end > size:
                raise ValueError(f"it holds {size:,} bytes but its header describes {8 + length + end:,}")
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
            raise ModelError(
                f"weights file '{path}' is truncated or damaged: {exc}.",
                hint="copy or download the model again (an interrupted transfer leaves a cut file)",
            ) from None


# --- LoRA -----------------------------------------------------------------------------------


def linear_module_names(model) -> list[str]:
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


def resolve_target_modules(model, target_modules) -> list[str] | str:
    """"auto" -> the family's attention projections; "all-linear" passes to peft; a list is checked.

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


def apply_lora(model, lora_config: LoraConfig, task_type: str, *, gradient_checkpointing: bool = False):
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
        lora_alpha=lora_config.alpha,
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


def trainable_summary(model) -> str:
    """A one-line count such as 'trainable 0.12M of 4.30M parameters (2.79%)'."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    share = 100.0 * trainable / total if total else 0.0
    return f"trainable {_count(trainable)} of {_count(total)} parameters ({share:.2f}%)"


# --- identity for lorakit.json --------------------------------------------------------------


def base_weight_files(source: str, gguf: Optional[str]) -> list[Path]:
    """The files whose bytes identify a local base model: the GGUF file, else the weights."""
    folder = Path(source)
    if gguf:
        return [folder / gguf]
    weights = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    return [w for w in weights if not w.name.startswith("training_args")]


def weights_sha256(files: list[Path], hash_file=sha256_file) -> Optional[str]:
    """One digest for the weights: a single file's sha256, or for several shards a digest of
    their names and hashes (None without files)."""
    if len(files) == 1:
        return hash_file(files[0])
    if not files:
        return None
    combined = hashlib.sha256()
    for weight in files:
        combined.update(f"{weight.name}:{hash_file(weight)}\n".encode())
    return combined.hexdigest()


def weight_file_stats(files: list[Path]) -> dict:
    """{file name: [size, mtime_ns]}: lets a load skip re-hashing weights nobody has touched."""
    stats = {}
    for f in files:
        st = f.stat()
        stats[f.name] = [st.st_size, st.st_mtime_ns]
    return stats


def base_model_identity(model_config: ModelConfig, *, commit_hash: Optional[str] = None) -> dict:
    """What exactly the adapter was trained on: for local files the sha256 of the GGUF or of the
    weights (several safetensors shards hash to one digest of their names and hashes) and each
    file's size and mtime; for hub ids the revision (the resolved commit when known)."""
    source, gguf, is_local = resolve_source(model_config)
    identity = {"name_or_path": source, "gguf_file": gguf, "revision": model_config.revision, "sha256": None}
    if not is_local:
        identity["revision"] = commit_hash or model_config.revision or "main"
        return identity
    files = base_weight_files(source, gguf)
    identity["files"] = weight_file_stats(files)  # taken before hashing: a write meanwhile shows later
    identity["sha256"] = weights_sha256(files)
    return identity
