"""Typed configuration: code defaults < YAML file < `--set key.sub=value` overrides.

The whole resolved config is validated at once; every problem is reported together, each naming
the key, the bad value and a fix. Unknown keys are errors with a "did you mean" suggestion.
"""

from __future__ import annotations

import difflib
import logging
import math
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

logger = logging.getLogger("lorakit.config")


class Section(BaseModel):
    # inf and nan are never meaningful settings (learning_rate: .inf trained a NaN adapter)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class SplitConfig(Section):
    """Fractions of the records that go to each split (they must sum to 1)."""

    train: float = Field(0.9, ge=0, le=1, description="Fraction of records for training.")
    validation: float = Field(0.05, ge=0, le=1, description="Fraction for validation (loss during training).")
    test: float = Field(0.05, ge=0, le=1, description="Fraction held out for `lorakit eval`.")

    @model_validator(mode="after")
    def _sum_to_one(self) -> SplitConfig:
        total = self.train + self.validation + self.test
        if abs(total - 1.0) > 1e-6:
            raise Problem(f"split fractions sum to {total:g}", "make data.split train + validation + test = 1")
        return self


class DataConfig(Section):
    path: str = Field(
        ..., description="Training data: a file (JSON, JSONL, CSV, TSV, Parquet), a save_to_disk folder, or a hub name."
    )
    format: Literal["auto", "squad", "squad_flat", "qa", "faq", "alpaca", "sharegpt", "messages", "columns"] = Field(
        "auto", description="Input format; auto detects it and says which it found."
    )
    column_map: dict[str, str] = Field(
        default_factory=dict,
        description="Canonical field -> column name, e.g. {question: Q, answer: A, context: passage}.",
    )
    validation_path: str | None = Field(
        None, description="An explicit validation file (replaces the ratio split for validation)."
    )
    test_path: str | None = Field(None, description="An explicit test file (replaces the ratio split for test).")
    split: SplitConfig = Field(default_factory=SplitConfig)
    split_by: Literal["auto", "context", "group", "record"] = Field(
        "auto",
        description="auto keeps records of one article (group) in one split when the data has them, or of one "
        "passage when whole articles miss a split's fraction by more than max(2 points, half the fraction); "
        "records that share a passage always share a split.",
    )
    seed: int = Field(42, description="Seed of the train/validation/test split.")
    max_records: int | None = Field(None, gt=0, description="Use at most this many records (after cleaning).")
    deduplicate: bool = Field(True, description="Drop exact duplicate records (reported).")
    no_answer: str = Field(
        "unanswerable", min_length=1, description="Target text for unanswerable questions (SQuAD 2.0)."
    )
    hub_split: str = Field("train", description="Split to read when data.path is a hub dataset name.")


class TemplateConfig(Section):
    name: str = Field(
        "auto", description="auto, chat (model's own), human_assistant, question_answer, alpaca, context_qa, or custom."
    )
    custom: str | None = Field(None, description="Jinja template text (used when name is custom).")
    system_prompt: str | None = Field(
        None, description="A system prompt rendered into every example (stored with the run)."
    )
    train_on_prompt: bool = Field(False, description="Also train on prompt tokens (default: completion only).")
    max_length: int = Field(
        1024, ge=16, description="Token limit per example; the context is shortened first, the answer never cut."
    )


class ModelConfig(Section):
    name_or_path: str = Field(..., description="Hub id, local folder, or local .gguf file.")
    gguf_file: str | None = Field(None, description="GGUF file name inside name_or_path (a folder).")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    task_type: Literal["auto", "causal", "seq2seq"] = Field(
        "auto", description="auto reads it from the model config (encoder-decoder -> seq2seq)."
    )
    precision: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="auto: float32 on CPU, bf16 on GPUs that have it, fp16 + float32 master weights otherwise (T4).",
    )
    quantization: Literal["none", "4bit", "8bit"] = Field(
        "none",
        description="4bit = QLoRA (NF4, double quantization), 8bit = LLM.int8, through bitsandbytes (lorakit[quant]) "
        "wherever it runs: CUDA, the CPU (float32 compute; bitsandbytes >= 0.46), ...",
    )
    trust_remote_code: bool = Field(False, description="Allow model code from the hub.")
    attn_implementation: str | None = Field(
        None, description="eager, sdpa or flash_attention_2 (None: transformers chooses)."
    )
    device_map: str | None = Field(
        None, description="auto spreads a model that does not fit one GPU over all visible GPUs."
    )


class LoraConfig(Section):
    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: float = Field(
        32, gt=0, description="LoRA scaling numerator (scale = alpha / r, or alpha / sqrt(r) with rsLoRA)."
    )
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: Literal["auto", "all-linear"] | list[str] = Field(
        "all-linear",
        description="all-linear: every linear layer of the blocks (the default: docs/recipes.md); auto: the "
        "family's attention projections only (q_proj/v_proj, q/v for T5); or a list of module names.",
    )
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA).")
    use_rslora: bool = Field(False, description="Rank-stabilised scaling alpha / sqrt(r).")
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases to train.")


class TrainConfig(Section):
    output_dir: str = Field("runs", description="Parent folder of run folders.")
    run_name: str | None = Field(None, description="Run folder name (default: derived from the config file and model).")
    epochs: float = Field(3.0, gt=0, description="Passes over the training split (ignored when max_steps > 0).")
    max_steps: int = Field(-1, description="Optimizer steps; -1 means use epochs.")
    micro_batch_size: int = Field(8, ge=1, description="Examples per forward pass.")
    gradient_accumulation: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    learning_rate: float | Literal["auto"] = Field(
        "auto",
        description="Peak learning rate. auto: 2e-4 at hidden size 4096 (7B models), times 4096 / hidden size "
        "for other widths (1.4e-3 for a 135M model), within [5e-5, 2e-3]; the run log says what it chose.",
    )
    lr_scheduler: str = Field("cosine", description="transformers scheduler name: cosine, linear, constant, ...")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Share of steps spent warming up.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    optimizer: str = Field(
        "adamw_torch", description="transformers optimizer name: adamw_torch, adamw_8bit, paged_adamw_8bit, ..."
    )
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    seed: int = Field(42, description="Training seed (initialisation, shuffling, dropout).")
    logging_steps: int = Field(10, ge=1, description="Log loss, learning rate and tokens/s every N steps.")
    eval_every: int | None = Field(None, ge=1, description="Validation loss every N steps (None: once per epoch).")
    save_every: int | None = Field(None, ge=1, description="Checkpoint every N steps (None: once per epoch).")
    save_total_limit: int = Field(3, ge=1, description="Checkpoints kept (the best one is always kept).")
    best_metric: str | None = Field(
        "eval_loss", description="Metric that picks the best checkpoint (eval_loss, eval_f1, ...)."
    )
    early_stopping_patience: int | None = Field(
        None, ge=1, description="Stop after N evaluations without improvement of best_metric."
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in backward: less memory, ~30% slower."
    )
    group_by_length: bool = Field(True, description="Batch examples of similar length together (less padding).")
    packing: Literal["auto", "passages", "examples", "off"] = Field(
        "auto",
        description="How a micro-batch's examples share rows: passages (questions on one passage share it once, "
        "each seeing the passage and itself only), examples (several examples per row, each seeing itself only), "
        "off (one example per row, padded). auto: passages for causal models that accept position ids, else off.",
    )
    batch_tokens: int | None = Field(
        None,
        ge=1,
        description="Token budget of a packed micro-batch (None: micro_batch_size x template.max_length, "
        "what lorakit plan assumes); a micro-batch holds at most micro_batch_size examples.",
    )
    labelled_logits_only: bool = Field(
        True,
        description="Run the output projection and the loss only at labelled positions, in chunks "
        "(same loss and gradients, far less memory); causal models whose logits are a plain projection.",
    )
    report_to: list[str] = Field(default_factory=list, description="tensorboard, wandb, mlflow.")
    generation_eval_every: int | None = Field(
        None,
        ge=1,
        description="Every N steps, evaluate by generating answers for a validation subset: logs eval_exact_match and eval_f1 (usable as best_metric and for early stopping); sets the evaluation interval.",
    )
    generation_eval_examples: int = Field(32, ge=1, description="Validation examples used by generation_eval_every.")
    auto_fit: bool = Field(
        False, description="Pick micro-batch, accumulation, checkpointing to fit the device (see lorakit plan --fit)."
    )
    overwrite: bool = Field(
        False, description="Allow training into a run folder that already holds a finished adapter."
    )

    @field_validator("optimizer", "lr_scheduler")
    @classmethod
    def _known_to_transformers(cls, value: str, info: ValidationInfo) -> str:
        return _check_transformers_name(str(info.field_name), value)  # set in every field validator

    @field_validator("learning_rate", mode="before")
    @classmethod
    def _positive_rate(cls, value: Any) -> Any:
        # before the union is tried: one clear problem instead of one per member of the union
        if value == "auto":
            return value
        try:
            rate = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"must be a number greater than 0, or auto (got {value!r})") from None
        if not math.isfinite(rate) or rate <= 0:
            raise ValueError(f"must be a finite number greater than 0, or auto (got {value!r})")
        return rate

    @field_validator("packing", mode="before")
    @classmethod
    def _yaml_off(cls, value: Any) -> Any:
        return "off" if value is False else value  # YAML 1.1 reads a bare `off` as false

    @field_validator("report_to")
    @classmethod
    def _known_trackers(cls, value: list[str]) -> list[str]:
        if value:
            from transformers.integrations.integration_utils import (
                INTEGRATION_TO_CALLBACK,
            )

            for name in value:
                _one_of(name, "report_to", list(INTEGRATION_TO_CALLBACK), extra=" (or [] for none)")
        return value

    @field_validator("best_metric")
    @classmethod
    def _known_metric(cls, value: str | None) -> str | None:
        if value:
            _one_of(_eval_name(value), "best_metric", ["eval_loss", *GENERATION_METRICS], extra=", or null")
        return value

    @model_validator(mode="after")
    def _best_metric_is_logged(self) -> TrainConfig:
        """The metric that picks the best checkpoint must be one that evaluation logs, and
        checkpoints must fall on evaluated steps; the Trainer finds out only at the first
        evaluation, after training time is spent."""
        if not self.best_metric:
            return self
        metric = _eval_name(self.best_metric)
        logged = ["eval_loss"] + (list(GENERATION_METRICS) if self.generation_eval_every else [])
        if metric not in logged:
            needs = (
                " (eval_exact_match and eval_f1 need train.generation_eval_every)"
                if metric in GENERATION_METRICS
                else ""
            )
            raise Problem(
                f"best_metric {self.best_metric!r} is never logged{needs}; evaluation logs {', '.join(logged)}",
                "set train.best_metric to one of those (eval_f1/eval_exact_match with train.generation_eval_every), or to null",
            )
        eval_every = self.generation_eval_every or self.eval_every
        if eval_every and self.save_every and self.save_every % eval_every:
            which = "generation_eval_every" if self.generation_eval_every else "eval_every"
            raise Problem(
                f"save_every ({self.save_every}) must be a multiple of train.{which} ({eval_every}) so the best checkpoint is kept",
                f"set train.save_every={eval_every * max(1, round(self.save_every / eval_every))}, or train.best_metric=null",
            )
        return self


class EvalConfig(Section):
    split: Literal["train", "validation", "test"] = Field(
        "test", description="Which split of the run's data lorakit eval scores."
    )
    max_new_tokens: int = Field(64, ge=1, description="Generation limit per answer.")
    # 32: on the CPU both paths measured faster than 16 (bench/bench_generation.py --batch-size 16 / 32)
    batch_size: int = Field(
        32,
        ge=1,
        description="Questions generated together (batched, left-padded). Questions that read a shared passage "
        "once fill a batch by the cache room of this many prompts instead, so more of them run together.",
    )
    temperature: float = Field(0.0, ge=0, description="0 means greedy decoding.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass (with temperature > 0).")
    max_examples: int | None = Field(None, ge=1, description="Score at most this many examples.")
    extractive: bool | Literal["auto"] = Field(
        "auto",
        description="Keep each answer inside a span of its passage (or data.no_answer), then EOS; auto: on when "
        "the training answers are spans of their passages (at least 90%, extractive QA). Stored in the run: "
        "eval, generate, chat and serve use it (--no-extractive turns it off for one command).",
    )
    lang: str | None = Field(
        None,
        description="Language code for answer normalization (fa, bn, ...); None picks per example from the references.",
    )
    bleu_tokenize: str = Field("auto", description="sacreBLEU tokenizer: auto, 13a, intl, char, zh, ...")

    @field_validator("bleu_tokenize")
    @classmethod
    def _known_bleu_tokenizer(cls, value: str) -> str:
        from sacrebleu.metrics.bleu import (
            _TOKENIZERS,  # sacreBLEU's own registry of tokenizer names
        )

        return _one_of(value, "bleu_tokenize", ["auto", *_TOKENIZERS])


class ServeConfig(Section):
    """`lorakit serve` settings: read from a config's serve section (`lorakit serve --config FILE`),
    overridden by the command-line flags; the one owner of every serve default."""

    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: int = Field(8000, ge=1, le=65535, description="Port to listen on.")
    api_key: str | None = Field(None, description="Require this bearer token (or set LORAKIT_API_KEY).")
    max_tokens_limit: int = Field(512, ge=1, description="Largest max_tokens a request may ask for.")
    max_batch_size: int = Field(8, ge=1, description="Requests generated together.")
    max_wait_ms: float = Field(
        10.0, ge=0, description="How long the worker waits to gather a batch of compatible requests."
    )
    max_body_bytes: int = Field(
        1024 * 1024, ge=1, description="Larger request bodies are refused with 413 before they are parsed."
    )
    extractive: bool | None = Field(
        None,
        description="Keep chat answers inside a span of the request's context (a lorakit extension field); "
        "None: each run's own eval.extractive, as stored in the run.",
    )


class LorakitConfig(Section):
    data: DataConfig
    model: ModelConfig
    template: TemplateConfig = Field(default_factory=TemplateConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)


def default_of(section: type[Section], key: str) -> Any:
    """A config value's one default, for a function parameter that mirrors a config key: a caller
    that leaves it out gets what a config that leaves it out gets."""
    return section.model_fields[key].default


class Problem(ValueError):
    """A validator's finding: what is wrong, and the fix (reported in the error's Fix: part)."""

    def __init__(self, what: str, fix: str):
        self.what, self.fix = what, fix
        super().__init__(what)


GENERATION_METRICS = ("eval_exact_match", "eval_f1")
# The defaults are valid names (test_config checks them); only other names import transformers,
# which takes seconds.
DEFAULT_NAMES = {"optimizer": "adamw_torch", "lr_scheduler": "cosine"}


def _eval_name(metric: str) -> str:
    """The name evaluation logs a metric under (the Trainer in train/recipe.py prefixes eval_ the same way)."""
    return metric if metric.startswith("eval_") else f"eval_{metric}"


def _check_transformers_name(key: str, value: str) -> str:
    """An optimizer or scheduler name that transformers' TrainingArguments accepts."""
    if value == DEFAULT_NAMES[key]:
        return value
    from transformers.trainer_utils import SchedulerType
    from transformers.training_args import OptimizerNames

    enum = OptimizerNames if key == "optimizer" else SchedulerType
    return _one_of(value, key, [member.value for member in enum])


def _one_of(value: str, key: str, valid: list[str], extra: str = "") -> str:
    """`value` when it is in `valid`, else a Problem suggesting the closest valid name."""
    if value in valid:
        return value
    close = [name for name in valid if name.startswith(value)][:1] or difflib.get_close_matches(value, valid, n=1)
    guess = f"did you mean '{close[0]}'? " if close else ""
    raise Problem(f"unknown {key} {value!r}", f"{guess}use one of: {', '.join(valid)}{extra}")


# --- loading -------------------------------------------------------------------------------
