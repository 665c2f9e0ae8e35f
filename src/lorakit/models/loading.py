"""Load a base model and its tokenizer (hub id, local folder or GGUF), pick the precision for the
device, quantize when asked (QLoRA, wherever bitsandbytes runs: models/kbit.py), and wrap the model with a peft LoRA adapter.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..config import ModelConfig
from ..errors import ModelError, require

if TYPE_CHECKING:  # annotations only, no import cost
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)


# --- where the weights come from ------------------------------------------------------------


def _looks_local(name: str) -> bool:
    """A path rather than a hub id: absolute, relative with ./, ~, a .gguf file, or deeper than org/name."""
    return (
        name.startswith((".", "/", "~", "\\"))
        or name.endswith(".gguf")
        or name.count("/") > 1
        or (len(name) > 1 and name[1] == ":")
    )


def resolve_source(model_config: ModelConfig) -> tuple[str, str | None, bool]:
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
            raise ModelError(
                f"model.name_or_path: folder '{path}' has no config.json, so it is not a model.", hint=hint
            )
        else:
            check_safetensors(path)  # a cut copy fails here, before anything else loads
        return str(path.resolve()), gguf, True
    if _looks_local(name):
        raise ModelError(
            f"model.name_or_path: local path '{name}' does not exist.",
            hint="check the path (relative paths are from the current folder), or give a hub id like org/model",
        )
    return name, gguf, False


def _pretrained_kwargs(model_config: ModelConfig, gguf: str | None) -> dict:
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
    """ "causal" or "seq2seq": model.task_type when set, else the config's is_encoder_decoder."""
    if model_config.task_type != "auto":
        return model_config.task_type
    config = load_model_config(model_config)
    return "seq2seq" if getattr(config, "is_encoder_decoder", False) else "causal"


# --- tokenizer and model --------------------------------------------------------------------


def load_tokenizer(model_config: ModelConfig) -> PreTrainedTokenizerBase:
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


def check_quantization(model_config: ModelConfig, device: str | None = None) -> None:
    """Fail before loading any weights when k-bit quantization cannot run on `device` (default:
    the best available): bitsandbytes is missing, or the installed one cannot run there.

    Raises:
        MissingExtraError: bitsandbytes is not installed.
        ModelError: the installed bitsandbytes has no working k-bit layers on the device (the
            message names the version that has).
    """
    if model_config.quantization == "none":
        return
    from . import kbit

    kbit.ensure_runs("quantization", f"model.quantization={model_config.quantization}", device, ModelError)


def load_base_model(
    model_config: ModelConfig,
    task_type: str,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | None = None,
    compute_dtype: torch.dtype | None = None,
    training: bool = False,
) -> PreTrainedModel:
    """AutoModelForCausalLM / AutoModelForSeq2SeqLM from a hub id, folder or GGUF file.

    With model.quantization 4bit/8bit (wherever the installed bitsandbytes runs them): NF4 +
    double quantization (or LLM.int8), on `device` (default: the best available), computing in
    `compute_dtype` (default: float32 on the CPU; elsewhere dtype, or float16 when dtype is
    float32), then peft's prepare_model_for_kbit_training. `training` keeps 4-bit layers on
    bitsandbytes' differentiable kernels (kbit.keep_autograd_kernels).

    Raises:
        ModelError: missing path, not a model, unsupported quantization device, load failure.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    check_quantization(model_config, device)  # before touching any weights
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

        from .kbit import compute_dtype as kbit_compute_dtype
        from .kbit import device_type

        compute = compute_dtype or kbit_compute_dtype(dtype, device)
        if model_config.quantization == "4bit":
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=compute,
            )
        else:
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        kind = device_type(device)
        where = device if device and ":" in device else (torch.cuda.current_device() if kind == "cuda" else kind)
        kwargs.setdefault("device_map", {"": where})
    auto = AutoModelForSeq2SeqLM if task_type == "seq2seq" else AutoModelForCausalLM
    from safetensors import SafetensorError

    try:
        model = auto.from_pretrained(source, **kwargs)
    except (OSError, ValueError, KeyError, SafetensorError) as exc:
        raise _load_error(f"{task_type} model", source, exc, is_local) from exc
    if quantized:
        # gradient checkpointing is switched on (or not) by apply_lora
        import warnings

        from peft import prepare_model_for_kbit_training

        with warnings.catch_warnings():  # peft calls an API transformers 5 deprecates; not the user's concern
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        if training:
            from .kbit import keep_autograd_kernels

            keep_autograd_kernels(model)
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


# --- identity for lorakit.json --------------------------------------------------------------
