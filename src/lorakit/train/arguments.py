"""What the Hugging Face Trainer is given: the `TrainingArguments` of a run (evaluation, logging and
saving intervals, names checked) and the dataset wrapper around encoded features."""

from __future__ import annotations

import logging
from typing import Any

import torch

from ..config import LorakitConfig
from ..errors import ConfigError
from ..runs import RunPaths

logger = logging.getLogger("lorakit.train")


def _intervals(config: LorakitConfig, has_eval: bool) -> dict:
    """Evaluation and checkpoint schedule. Picking the best checkpoint needs both on the same
    schedule, with checkpoints at evaluated steps."""
    tc = config.train
    # generation metrics are computed at evaluations, so they set the evaluation interval
    eval_every, save_every = tc.generation_eval_every or tc.eval_every, tc.save_every
    load_best = has_eval and bool(tc.best_metric)
    if load_best:
        if eval_every and not save_every:
            save_every = eval_every
        elif save_every and not eval_every:
            eval_every = save_every
        # save_every is a multiple of eval_every: config.TrainConfig checks it at load
    out = {
        "save_strategy": "steps" if save_every else "epoch",
        "eval_strategy": ("steps" if eval_every else "epoch") if has_eval else "no",
        "load_best_model_at_end": load_best,
    }
    if save_every:
        out["save_steps"] = save_every
    if has_eval and eval_every:
        out["eval_steps"] = eval_every
    if load_best:
        metric = tc.best_metric if tc.best_metric.startswith("eval_") else f"eval_{tc.best_metric}"
        out["metric_for_best_model"] = metric
        out["greater_is_better"] = "loss" not in metric
    return out


# train.learning_rate: auto. The LoRA rate that 7B recipes settle on (the QLoRA paper's), and the
# width it belongs to; Adam's best rate falls roughly as 1 / width (muP), so other widths scale it.
# On SmolLM2-135M (width 576) this gives 1.4e-3, between the two best rates of docs/recipes.md.
AUTO_LR_AT_WIDTH = (2e-4, 4096)
AUTO_LR_RANGE = (5e-5, 2e-3)


def resolve_learning_rate(config: LorakitConfig, model_config: Any) -> tuple[float, str]:
    """(the peak learning rate, why) for train.learning_rate, auto or a number."""
    value = config.train.learning_rate
    if value != "auto":
        return float(value), "set in the config"
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    width = getattr(text, "hidden_size", None)
    rate, at = AUTO_LR_AT_WIDTH
    if not isinstance(width, int) or width <= 0:
        return rate, "auto: the model's hidden size is unknown, so the 7B rate"
    low, high = AUTO_LR_RANGE
    chosen = min(max(rate * at / width, low), high)
    return chosen, f"auto: {rate:g} x {at} / hidden size {width}, within [{low:g}, {high:g}]"


def build_training_args(
    config: LorakitConfig,
    paths: RunPaths,
    precision: str,
    device: str,
    *,
    has_eval: bool,
    packed: bool = False,
    learning_rate: float,
):
    """TrainingArguments from the train section (transformers 5.x names).

    packed: the datasets' items are whole micro-batches (train/batching.py), so the Trainer takes
    one item per step and samples them at random (lengths are already grouped by the packing).
    """
    from transformers import TrainingArguments

    tc = config.train
    cuda = device == "cuda"
    return TrainingArguments(
        output_dir=str(paths.checkpoints),
        num_train_epochs=tc.epochs,
        max_steps=tc.max_steps,
        per_device_train_batch_size=1 if packed else tc.micro_batch_size,
        per_device_eval_batch_size=1 if packed else tc.micro_batch_size,
        gradient_accumulation_steps=tc.gradient_accumulation,
        learning_rate=learning_rate,
        lr_scheduler_type=tc.lr_scheduler,
        warmup_steps=tc.warmup_ratio,  # a value below 1 is a fraction of the total steps
        weight_decay=tc.weight_decay,
        optim=tc.optimizer,
        max_grad_norm=tc.max_grad_norm,
        seed=tc.seed,
        data_seed=tc.seed,
        logging_strategy="steps",
        logging_steps=tc.logging_steps,
        save_total_limit=None,  # CheckpointCompletionCallback rotates, after marking the new one complete
        **_intervals(config, has_eval),
        train_sampling_strategy="group_by_length" if tc.group_by_length and not packed else "random",
        report_to=list(tc.report_to) or "none",
        bf16=precision == "bfloat16",
        fp16=precision == "float16",
        use_cpu=device == "cpu",
        remove_unused_columns=False,  # features are already exactly the model inputs
        ddp_find_unused_parameters=False,  # LoRA uses every trainable parameter in each step
        label_names=["labels"],  # peft wrappers hide the signature the Trainer inspects
        prediction_loss_only=True,  # eval needs the loss only; never keep vocab-sized logits
        include_num_input_tokens_seen="non_padding",
        dataloader_num_workers=0,
        dataloader_pin_memory=cuda,
        disable_tqdm=True,
        run_name=paths.root.name,
    )


def is_bnb_optimizer(name: str) -> bool:
    """transformers' bitsandbytes optimizers: adamw_8bit, adamw_bnb_8bit, paged_adamw_8bit, lion_8bit, ..."""
    return "8bit" in name or "bnb" in name or name.startswith("paged")


def check_optimizer(tc, device: str | None = None) -> None:
    """Optimizer and scheduler names are checked at config load; what the device must offer is
    checked here, in the recipe's setup before any weights load.

    Raises:
        MissingExtraError: a bitsandbytes optimizer, and bitsandbytes is not installed.
        ConfigError: a bitsandbytes optimizer the installed bitsandbytes cannot run on the device
            (the message names the version that can).
    """
    if not is_bnb_optimizer(tc.optimizer):
        return
    # bitsandbytes optimizers: fail in setup with the fix, not in the Trainer with a traceback
    from ..models import kbit

    setting = f"train.optimizer={tc.optimizer}"
    kbit.ensure_runs("optimizer", setting, device, ConfigError)
    if kbit.device_type(device) != "cuda" and tc.optimizer.startswith("paged"):
        logger.info(
            f"{setting}: paging needs CUDA unified memory, so on {kbit.device_type(device)} bitsandbytes runs "
            "the same optimizer unpaged (its states stay in ordinary memory)"
        )


class FeatureDataset(torch.utils.data.Dataset[dict[str, Any]]):
    """A list of feature dicts (input_ids, attention_mask, labels), as the Trainer expects."""

    def __init__(self, features: list[dict[str, Any]]) -> None:
        self.features = features

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.features[index]
