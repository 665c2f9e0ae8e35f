"""The spine: the setup every entry point shares, done in one place.

`prepare(config)` turns a config into what a run needs before any weights load: the task type,
the tokenizer, the data splits, the template and the encoded features. train, `lorakit data
inspect`, `lorakit plan`, the benchmarks and the tests all start here, so they see the data
exactly as training does.

`load_run(path)` is the other direction: a run folder (or its adapter folder, or a merged folder)
back into a model, its tokenizer and the stored template. The predictor (eval, generate, chat),
merge and serve all load runs through it; `run_model_config` and `run_tokenizer` are its two parts
that serve's shared-base loading also needs.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import LorakitConfig, ModelConfig
from .errors import ModelError
from .run_metadata import RunInfo, read_run

if TYPE_CHECKING:
    import torch

    from .data import DataSplits
    from .data.example import Example
    from .prompting.encoding import TokenizeStats
    from .prompting.templates import Template

logger = logging.getLogger("lorakit.evaluate")  # loading a run serves eval, generate, chat, merge and serve

# --- prepare: config -> tokenizer, splits, template, features ------------------------------------

# eval.extractive auto: on when at least this share of the training answers are spans of their passage
EXTRACTIVE_SHARE = 0.9


@dataclass
class Prepared:
    """Everything a run needs from its config before any weights load (see prepare).

    tokenizer and template are None only with prepare(..., require_tokenizer=False) when the
    tokenizer could not be loaded; tokenizer_error then says why.
    """

    config: LorakitConfig
    task_type: str
    splits: DataSplits
    tokenizer: Any
    template: Template | None
    has_context: bool
    train_features: list[dict] = field(default_factory=list)
    train_stats: TokenizeStats | None = None
    validation_features: list[dict] = field(default_factory=list)
    validation_stats: TokenizeStats | None = None
    tokenizer_error: str | None = None

    def encode(self, examples: list[Example]) -> tuple[list[dict], TokenizeStats]:
        """Encode examples exactly as training encodes them (max_length, loss mask, task type)."""
        from .prompting.encoding import encode_examples

        return encode_examples(examples, self.template, self.tokenizer, **self.encode_options)

    @property
    def extractive(self) -> tuple[bool, str]:
        """(whether answers are kept inside spans of their passage, why): eval.extractive, with
        auto on when at least EXTRACTIVE_SHARE of the training answers are spans of their passage."""
        from .data.example import extractive_share

        setting = self.config.eval.extractive
        if setting != "auto":
            return bool(setting), f"eval.extractive is {str(setting).lower()}"
        share = extractive_share(self.splits.train)
        if share is None:
            return False, "auto: the training data has no passages"
        on = share >= EXTRACTIVE_SHARE
        return on, f"auto: {100 * share:.0f}% of the training answers are spans of their passage"

    @property
    def encode_options(self) -> dict:
        """The keyword arguments of prompting.encoding.encode_example(s) this config implies."""
        t = self.config.template
        return dict(max_length=t.max_length, train_on_prompt=t.train_on_prompt, task_type=self.task_type)


def prepare(
    config: LorakitConfig,
    *,
    encode: bool = True,
    task_type: str | None = None,
    require_tokenizer: bool = True,
) -> Prepared:
    """The setup sequence every entry point shares: task type, data splits, tokenizer, template,
    and (with encode) the train and validation features. No model weights are loaded.

    Args:
        config: a validated config (config_loading.load_config).
        encode: encode the train and validation splits (skip it when only the template or the
            splits are needed, e.g. `lorakit data inspect` encodes its own subsets).
        task_type: "causal"/"seq2seq" when the caller already knows it (plan reads it from the
            model's shape); None detects it from the model's config.
        require_tokenizer: False lets a caller go on without a tokenizer (plan then assumes
            template.max_length for every example); the tokenizer's ModelError is kept in
            tokenizer_error, and template and features stay empty.

    Returns:
        Prepared.

    Raises:
        DataError: the data cannot be loaded or split.
        TemplateError: the template cannot render this data.
        ModelError: the model config or (with require_tokenizer) the tokenizer cannot be loaded.
    """
    from .data import load_splits
    from .models.loading import detect_task_type, load_tokenizer
    from .prompting.templates import resolve_template

    task_type = task_type or detect_task_type(config.model)
    splits = load_splits(config.data)  # first: a data error is the cheapest to find
    has_context = any(example.context for example in splits.train)
    try:
        tokenizer = load_tokenizer(config.model)
    except ModelError as exc:
        if require_tokenizer:
            raise
        return Prepared(config, task_type, splits, None, None, has_context, tokenizer_error=exc.message)
    template = resolve_template(config.template, tokenizer, task_type, has_context=has_context)
    prepared = Prepared(config, task_type, splits, tokenizer, template, has_context)
    if encode:
        prepared.train_features, prepared.train_stats = prepared.encode(splits.train)
        if splits.validation:
            prepared.validation_features, prepared.validation_stats = prepared.encode(splits.validation)
    return prepared


# --- load_run: run folder -> model, tokenizer, template -----------------------------------------


@dataclass
class LoadedRun:
    """A run loaded for use: its metadata (template, task type, max_length...), tokenizer and model."""

    info: RunInfo
    model: Any
    tokenizer: Any

    @property
    def template(self) -> Template:
        return self.info.template


def run_model_config(info: RunInfo, *, merged: bool = False, quantization: str = "none") -> ModelConfig:
    """The model section a run's base (or, with merged, a merged folder's own weights) loads with,
    rebuilt from lorakit.json; trust_remote_code comes from the run's config.yaml when present."""
    trust = bool(info.config.model.trust_remote_code) if info.config is not None else False
    return ModelConfig(
        name_or_path=str(info.root) if merged else info.base["name_or_path"],
        gguf_file=None if merged else info.base.get("gguf_file"),
        revision=None if merged else info.base.get("revision"),
        task_type=info.task_type,
        quantization=quantization,
        trust_remote_code=trust,
    )


def run_tokenizer(info: RunInfo, fallback: Any = None) -> Any:
    """The tokenizer saved beside the adapter (or in a merged folder): the one training used.
    Without one, `fallback` (serve passes the host model's), else the base model's.

    Raises:
        ModelError: no saved tokenizer and the base model's cannot be loaded.
    """
    saved = info.adapter_dir if info.adapter_dir is not None else info.root
    if (saved / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(saved))
        if tokenizer.pad_token is None and tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token  # padding is masked, so EOS can double as pad
        return tokenizer
    if fallback is not None:
        return fallback
    from .models.loading import load_tokenizer

    return load_tokenizer(run_model_config(info))


def load_run(
    run: str | os.PathLike | RunInfo,
    *,
    device: str | None = None,
    adapter: bool = True,
    dtype: torch.dtype | None = None,
    quantize: bool = True,
) -> LoadedRun:
    """Load a run folder (or its adapter folder, or a merged folder) for use.

    Args:
        run: the folder, or its RunInfo when the caller already read it (run_metadata.read_run).
        device: where the model goes (default: models.precision.default_device()).
        adapter: False loads the base alone (for a merged folder: the base it was merged from),
            so the same prompts can be compared without the fine-tuning.
        dtype: the weights' dtype (default: models.precision.choose_precision("auto", device)).
        quantize: load a QLoRA run's base quantized again, as it trained, where the installed
            bitsandbytes runs k-bit layers on `device` (else unquantized, with a warning); merge
            passes False, since merging needs real 16/32-bit weights.

    Returns:
        LoadedRun (model in eval mode; a peft model when the adapter is applied).

    Raises:
        RunError: not a lorakit run (see run_metadata.read_run).
        ModelError: the base model changed since training, or it or the tokenizer cannot be loaded.
    """
    from .models.identity import check_base_revision, check_base_weights
    from .models.loading import load_base_model
    from .models.precision import choose_precision, default_device

    device = device or default_device()
    info = run if isinstance(run, RunInfo) else read_run(Path(run))
    merged = info.is_merged and adapter  # the merged weights themselves, not the base they came from
    if not merged:
        check_base_weights(info)
    quantization = "none"
    if quantize and not merged and info.config is not None and info.config.model.quantization != "none":
        from .models import kbit

        quantization = info.config.model.quantization
        if not kbit.supports("quantization", device):
            reason = kbit.probe("quantization", kbit.device_type(device))
            logger.warning(f"the run trained on a {quantization} base; {reason}, so the base loads unquantized")
            quantization = "none"
    model_config = run_model_config(info, merged=merged, quantization=quantization)
    tokenizer = run_tokenizer(info)
    if dtype is None:
        dtype, _ = choose_precision("auto", device)
    model = load_base_model(model_config, info.task_type, dtype=dtype, device=device)
    if not merged:
        check_base_revision(info, model)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if info.adapter_dir is not None and adapter:
        import warnings

        from peft import PeftModel

        with warnings.catch_warnings():  # peft 0.21 calls an API transformers 5 deprecates; not the user's concern
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            model = PeftModel.from_pretrained(model, str(info.adapter_dir))
    model.eval()
    return LoadedRun(info, model, tokenizer)
