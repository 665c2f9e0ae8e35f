"""train(config) -> RunPaths: data -> template -> features -> LoRA model -> HF Trainer -> run folder.

The recipe reads as setup, train, save. The run folder (runs.py) is written so that everything
after training needs only it: adapter + tokenizer + lorakit.json, the resolved config, the
per-step metrics and the loss curve.
"""

from __future__ import annotations

import shutil
from typing import Callable, Optional

import torch
from rich.console import Console

from .callbacks import InterruptCallback, MetricsFileCallback, RichProgressCallback, read_metrics, truncate_metrics
from .config import LorakitConfig
from .generation_eval import GenerationEvalTrainer
from .errors import ConfigError, DataError, RunError
from .runs import RunPaths, atomic_write_text, prepare_run_dir, run_dir_for, write_metadata

console = Console(stderr=True)


class TrainingInterrupted(RunError):
    """Ctrl-C stopped training after saving a checkpoint; `--resume` continues it."""

    exit_code = 130


class FeatureDataset(torch.utils.data.Dataset):
    """A list of feature dicts (input_ids, attention_mask, labels), as the Trainer expects."""

    def __init__(self, features: list[dict]):
        self.features = features

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> dict:
        return self.features[index]


def train(
    config: LorakitConfig,
    *,
    resume: bool = False,
    on_log: Optional[Callable[[dict], None]] = None,
    callbacks: Optional[list] = None,
) -> RunPaths:
    """Train a LoRA adapter as configured and write the run folder; returns its paths.

    With train.auto_fit the micro-batch, accumulation, checkpointing (and on GPUs 4-bit) are
    first chosen to fit the device (lorakit plan --fit). An out-of-memory error before the first
    checkpoint halves the micro-batch and doubles the accumulation, then starts again.
    """
    from .plan import run_with_oom_backoff

    if config.train.auto_fit:
        config = _auto_fit(config)

    def attempt(current: LorakitConfig) -> RunPaths:
        return _train(current, resume=resume, on_log=on_log, callbacks=callbacks)

    return run_with_oom_backoff(attempt, config, log=lambda message: console.print(f"[yellow]{message}"))


def _auto_fit(config: LorakitConfig) -> LorakitConfig:
    from .devices import detect_device
    from .plan import fit_config

    device, memory_gb = detect_device()
    fitted, choices = fit_config(config, device, memory_gb)
    for choice in choices:
        console.print(f"[cyan]auto_fit[/cyan]: {choice}")
    return fitted


def _train(
    config: LorakitConfig,
    *,
    resume: bool,
    on_log: Optional[Callable[[dict], None]],
    callbacks: Optional[list],
) -> RunPaths:
    """One training attempt (see train).

    resume: continue from the newest checkpoint in checkpoints/ (same config).
    on_log: called with each record appended to metrics.jsonl (step, loss, eval_loss, ...).
    callbacks: extra transformers TrainerCallbacks (tracking, tests).

    Raises:
        RunError: the run folder holds a finished run (without resume / train.overwrite), or
            resume was asked with no checkpoint. TrainingInterrupted after Ctrl-C (checkpoint saved).
        ConfigError: checkpoint/eval intervals that cannot pick a best checkpoint.
        DataError, TemplateError, ModelError: from loading data, template and model.
    """
    from transformers import EarlyStoppingCallback, set_seed

    from .data import load_splits
    from .modeling import (
        apply_lora,
        base_model_identity,
        check_quantization,
        choose_precision,
        default_device,
        detect_task_type,
        load_base_model,
        load_tokenizer,
        trainable_summary,
    )
    from .templates import resolve_template
    from .tokenize import PaddingCollator, encode_examples

    from .distributed import is_main_process

    tc = config.train
    main = is_main_process()  # under torchrun only rank 0 writes the run folder and prints
    console.quiet = not main
    paths = prepare_run_dir(run_dir_for(config), resume=resume, overwrite=tc.overwrite)
    checkpoint = paths.latest_checkpoint() if resume else None

    # setup: everything that can fail on user input fails here, before any weights load
    device = default_device()
    check_quantization(config.model)
    task_type = detect_task_type(config.model)
    dtype, precision = choose_precision(config.model.precision, device)
    tokenizer = load_tokenizer(config.model)
    splits = load_splits(config.data)
    has_context = any(example.context for example in splits.train)
    template = resolve_template(config.template, tokenizer, task_type, has_context=has_context)
    encode = dict(
        max_length=config.template.max_length,
        train_on_prompt=config.template.train_on_prompt,
        task_type=task_type,
    )
    train_features, stats = encode_examples(splits.train, template, tokenizer, **encode)
    console.print(f"[bold]train data[/bold] ({splits.format}, split by {splits.split_by}): {stats.summary()}")
    if not train_features:
        raise DataError(
            f"{config.data.path}: every training record was dropped while tokenizing ({stats.dropped[0][1]}).",
            hint="raise template.max_length, or check the records named above",
        )
    eval_features = []
    if splits.validation:
        eval_features, eval_stats = encode_examples(splits.validation, template, tokenizer, **encode)
        console.print(f"[bold]validation data[/bold]: {eval_stats.summary().splitlines()[0]}")

    set_seed(tc.seed)  # the LoRA initialisation is random too
    model = load_base_model(config.model, task_type, dtype=dtype, device=None)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model = apply_lora(model, config.lora, task_type, gradient_checkpointing=tc.gradient_checkpointing)
    console.print(f"[bold]LoRA[/bold]: {trainable_summary(model)}")

    args = build_training_args(config, paths, precision, device, has_eval=bool(eval_features))
    if main:
        if not resume:
            _clear_run(paths)  # only now: a setup error must not cost an existing run (train.overwrite)
        atomic_write_text(paths.config, config.to_yaml())  # an interrupted run still describes itself
        if checkpoint is not None:
            truncate_metrics(paths.metrics, int(checkpoint.name.split("-")[1]))

    interrupt = InterruptCallback()
    progress = RichProgressCallback(console)
    writers = [MetricsFileCallback(paths.metrics, on_log), progress] if main else []
    all_callbacks = [*writers, interrupt, *(callbacks or [])]
    if tc.early_stopping_patience and args.load_best_model_at_end:
        all_callbacks.append(EarlyStoppingCallback(early_stopping_patience=tc.early_stopping_patience))
    elif tc.early_stopping_patience:
        console.print("[yellow]train.early_stopping_patience is ignored: it needs a validation split and train.best_metric")
    generation_eval = None
    if tc.generation_eval_every and eval_features:
        from .generation_eval import make_generation_eval

        generation_eval = make_generation_eval(config, splits.validation, tokenizer, template, task_type)
    trainer = GenerationEvalTrainer(
        generation_eval=generation_eval,
        model=model,
        args=args,
        train_dataset=FeatureDataset(train_features),
        eval_dataset=FeatureDataset(eval_features) if eval_features else None,
        data_collator=PaddingCollator(tokenizer.pad_token_id, seq2seq=task_type == "seq2seq"),
        processing_class=tokenizer,
        callbacks=all_callbacks,
    )
    _remove_default_printers(trainer)

    # train
    interrupt.install()
    try:
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except KeyboardInterrupt:  # a second Ctrl-C, or one outside the step loop
        progress.stop()
        trainer._save_checkpoint(trainer.model, trial=None)
        interrupt.interrupted = True
    finally:
        interrupt.uninstall()
        progress.stop()
    if interrupt.interrupted:
        saved = paths.latest_checkpoint()
        raise TrainingInterrupted(
            f"training interrupted at step {trainer.state.global_step}; checkpoint saved to {saved}.",
            hint=f"continue with `lorakit train CONFIG --resume` (same config; run folder {paths.root})",
        )

    if not main:
        return paths
    # save: adapter + tokenizer + metadata, then the curve
    trainer.model.save_pretrained(paths.adapter)
    tokenizer.save_pretrained(paths.adapter)
    (paths.adapter / "README.md").unlink(missing_ok=True)  # peft's generic model card; lorakit.json describes the run
    write_metadata(
        paths.adapter,
        base=base_model_identity(config.model, commit_hash=getattr(model.config, "_commit_hash", None)),
        task_type=task_type,
        template=template,
        precision=precision,
        system_prompt=config.template.system_prompt,
        max_length=config.template.max_length,
        extra={
            "train_examples": len(train_features),
            "validation_examples": len(eval_features),
            "global_step": trainer.state.global_step,
            "best_checkpoint": trainer.state.best_model_checkpoint,
            "lora": config.lora.model_dump(mode="json"),
        },
    )
    from .plots import plot_loss

    plot_loss(read_metrics(paths.metrics), paths.loss_plot, title=paths.root.name)
    console.print(f"[bold green]done[/bold green]: adapter saved to {paths.adapter}")
    return paths


def _clear_run(paths: RunPaths) -> None:
    """A fresh start (allowed by prepare_run_dir) removes only what lorakit itself writes."""
    for folder in (paths.adapter, paths.checkpoints, paths.plots, paths.eval):
        if folder.is_dir():
            shutil.rmtree(folder)
    for file in (paths.metrics, paths.config):
        file.unlink(missing_ok=True)


def _remove_default_printers(trainer) -> None:
    """The rich bar replaces the Trainer's tqdm bar and its printed dicts."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)


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
        elif eval_every and save_every and save_every % eval_every:
            raise ConfigError(
                f"train.save_every ({save_every}) must be a multiple of train.eval_every ({eval_every}) so the best checkpoint is kept.",
                hint=f"set train.save_every={eval_every * max(1, round(save_every / eval_every))}, or train.best_metric=null",
            )
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


def build_training_args(config: LorakitConfig, paths: RunPaths, precision: str, device: str, *, has_eval: bool):
    """TrainingArguments from the train section (transformers 5.x names)."""
    from transformers import TrainingArguments

    tc = config.train
    _check_names(tc)
    cuda = device == "cuda"
    return TrainingArguments(
        output_dir=str(paths.checkpoints),
        num_train_epochs=tc.epochs,
        max_steps=tc.max_steps,
        per_device_train_batch_size=tc.micro_batch_size,
        per_device_eval_batch_size=tc.micro_batch_size,
        gradient_accumulation_steps=tc.gradient_accumulation,
        learning_rate=tc.learning_rate,
        lr_scheduler_type=tc.lr_scheduler,
        warmup_steps=tc.warmup_ratio,  # a value below 1 is a fraction of the total steps
        weight_decay=tc.weight_decay,
        optim=tc.optimizer,
        max_grad_norm=tc.max_grad_norm,
        seed=tc.seed,
        data_seed=tc.seed,
        logging_strategy="steps",
        logging_steps=tc.logging_steps,
        save_total_limit=tc.save_total_limit,
        **_intervals(config, has_eval),
        train_sampling_strategy="group_by_length" if tc.group_by_length else "random",
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


def _check_names(tc) -> None:
    """Optimizer and scheduler names are free text in the config; check them against transformers."""
    from transformers.trainer_utils import SchedulerType
    from transformers.training_args import OptimizerNames

    for key, value, valid in (
        ("train.optimizer", tc.optimizer, [o.value for o in OptimizerNames]),
        ("train.lr_scheduler", tc.lr_scheduler, [s.value for s in SchedulerType]),
    ):
        if value not in valid:
            raise ConfigError(f"{key}: unknown value '{value}'.", hint=f"use one of: {', '.join(valid)}")
    if "8bit" in tc.optimizer or "bnb" in tc.optimizer or tc.optimizer.startswith("paged"):
        # bitsandbytes optimizers: fail in setup with the fix, not in the Trainer with a traceback
        from .errors import require

        if not torch.cuda.is_available():
            raise ConfigError(
                f"train.optimizer={tc.optimizer} is a bitsandbytes optimizer, which needs a CUDA GPU.",
                hint="use train.optimizer=adamw_torch on the CPU",
            )
        require("bitsandbytes", "quant", f"train.optimizer={tc.optimizer}")
