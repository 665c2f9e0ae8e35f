"""train(config) -> RunPaths: data -> template -> features -> LoRA model -> HF Trainer -> run folder.

The recipe reads as setup, train, save. The run folder (runs.py, run_metadata.py) is written so that everything
after training needs only it: adapter + tokenizer + lorakit.json, the resolved config, the
per-step metrics and the loss curve.
"""

from __future__ import annotations

import logging
import shutil
import signal
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import LorakitConfig
from ..errors import DataError, RunError, TrainingInterrupted  # re-exported: lorakit.train.recipe.TrainingInterrupted
from ..files import atomic_write_text
from ..run_metadata import read_config_history, record_config_change, write_metadata
from ..runs import RunPaths, prepare_run_dir, publish_run, read_metrics, run_dir_for
from .arguments import build_training_args, check_optimizer, resolve_learning_rate
from .callbacks import (
    CheckpointCompletionCallback,
    InterruptCallback,
    MetricsFileCallback,
    NonFiniteGuard,
    NonFiniteTraining,
    RichProgressCallback,
    remove_default_printers,
    truncate_metrics,
)
from .generation_eval import GenerationEvalTrainer
from .resume import resume_config

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainerCallback

    from ..prompting.templates import Template

logger = logging.getLogger("lorakit.train")  # the CLI shows these lines on stderr


def train(
    config: LorakitConfig,
    *,
    resume: bool = False,
    allow_config_change: bool = False,
    on_log: Callable[[dict[str, Any]], None] | None = None,
    callbacks: list[TrainerCallback] | None = None,
) -> RunPaths:
    """Train a LoRA adapter as configured and write the run folder; returns its paths.

    With train.auto_fit the micro-batch, accumulation, checkpointing (and 4-bit, where bitsandbytes runs it) are
    first chosen to fit the device (lorakit plan --fit). An out-of-memory error before the first
    checkpoint halves the micro-batch and doubles the accumulation, then starts again. Progress
    is logged (logger "lorakit.train"); a live bar is drawn on a terminal.

    Args:
        config: a validated config (config_loading.load_config).
        resume: continue from the newest complete checkpoint of the run.
        allow_config_change: with resume, accept a config that differs from the run's (recorded).
        on_log: called with each record appended to metrics.jsonl (step, loss, eval_loss, ...).
        callbacks: extra transformers TrainerCallbacks (tracking, tests).

    Returns:
        The run folder's paths (adapter, config.yaml, metrics.jsonl, checkpoints).

    Raises:
        ConfigError: a setting the device cannot run (e.g. a bitsandbytes optimizer that the installed
            bitsandbytes cannot run there).
        DataError, TemplateError, ModelError: the data, template or model cannot be loaded or used.
        RunError: the run folder holds a finished run (without resume or train.overwrite), resume
            found no complete checkpoint or a changed config, or the loss became NaN/infinite.
        TrainingInterrupted: Ctrl-C or SIGTERM stopped training (a checkpoint was saved).
    """
    from ..plan.fitting import run_with_oom_backoff

    if config.train.auto_fit:
        config = _auto_fit(config)

    def attempt(current: LorakitConfig) -> RunPaths:
        return _train(
            current, resume=resume, allow_config_change=allow_config_change, on_log=on_log, callbacks=callbacks
        )

    return run_with_oom_backoff(attempt, config, log=logger.warning)


def _auto_fit(config: LorakitConfig) -> LorakitConfig:
    from ..plan.devices import detect_device
    from ..plan.fitting import fit_config

    device, memory_gb = detect_device()
    fitted, choices = fit_config(config, device, memory_gb)
    for choice in choices:
        logger.info(f"auto_fit: {choice}")
    return fitted


def _train(
    config: LorakitConfig,
    *,
    resume: bool,
    allow_config_change: bool,
    on_log: Callable[[dict[str, Any]], None] | None,
    callbacks: list[TrainerCallback] | None,
) -> RunPaths:
    """One training attempt (see train).

    resume: continue from the newest complete checkpoint in checkpoints/ (same config, unless
        allow_config_change: then config.yaml records the new one and lorakit.json the change).
    on_log: called with each record appended to metrics.jsonl (step, loss, eval_loss, ...).
    callbacks: extra transformers TrainerCallbacks (tracking, tests).

    Raises:
        RunError: the folder holds a finished run (without resume / train.overwrite), resume was
            asked of a finished run, with no complete checkpoint or with a changed config; a loss,
            gradient or weight became NaN/infinite. TrainingInterrupted after Ctrl-C or SIGTERM
            (checkpoint saved).
        ConfigError: a bitsandbytes optimizer the installed bitsandbytes cannot run on this device
            (other config values are checked at load).
        DataError, TemplateError, ModelError: from loading data, template and model.
    """
    from .distributed import is_main_process

    tc = config.train
    main = is_main_process()  # under torchrun only rank 0 writes the run folder and prints
    if not main:  # under torchrun only rank 0 reports (a process of its own: nothing else is affected)
        logger.setLevel(logging.ERROR)
    paths = prepare_run_dir(run_dir_for(config), resume=resume, overwrite=tc.overwrite)
    checkpoint = paths.latest_checkpoint() if resume else None
    changes: dict[str, Any] = {}
    if resume:
        assert checkpoint is not None  # prepare_run_dir refuses a resume with no complete checkpoint
        config, changes = resume_config(config, paths, checkpoint, allow_config_change)
        tc = config.train
    # what this attempt creates it removes again if it fails before a checkpoint exists
    created = [p for p in (paths.root, *paths.root.parents) if not p.exists()]
    owns_root = bool(created) or (paths.publish_to is not None and not resume)
    try:
        return _run(config, paths, checkpoint, changes, main=main, on_log=on_log, callbacks=callbacks)
    except BaseException:
        if main and owns_root and paths.latest_checkpoint() is None:
            shutil.rmtree(paths.root, ignore_errors=True)
            for parent in created[1:]:
                try:
                    parent.rmdir()  # only if still empty
                except OSError:
                    break
        raise


def _run(
    config: LorakitConfig,
    paths: RunPaths,
    checkpoint: Path | None,
    changes: dict[str, Any],
    *,
    main: bool,
    on_log: Callable[[dict[str, Any]], None] | None,
    callbacks: list[TrainerCallback] | None,
) -> RunPaths:
    """Setup -> train -> save into `paths` (see _train)."""
    from transformers import EarlyStoppingCallback, set_seed

    from ..models.loading import check_quantization, load_base_model
    from ..models.lora import apply_lora, trainable_summary
    from ..models.precision import choose_precision, default_device
    from ..pipeline import prepare

    tc = config.train
    resume = checkpoint is not None
    # setup: everything that can fail on user input fails here, before any weights load
    device = default_device()
    check_quantization(config.model, device)
    check_optimizer(tc, device)
    dtype, precision = choose_precision(config.model.precision, device)
    prepared = prepare(config)
    task_type, tokenizer, splits, template = prepared.task_type, prepared.tokenizer, prepared.splits, prepared.template
    train_features, stats = prepared.train_features, prepared.train_stats
    assert stats is not None and template is not None  # prepare() encodes and resolves by default
    logger.info(f"train data ({splits.format}, split by {splits.split_by}): {stats.summary()}")
    for note in splits.notes:
        logger.info(f"data: {note}")
    extractive, why = prepared.extractive
    logger.info(f"extractive decoding: {'on' if extractive else 'off'} ({why})")
    if not train_features:
        raise DataError(
            f"{config.data.path}: every training record was dropped while tokenizing ({stats.dropped[0][1]}).",
            hint="raise template.max_length, or check the records named above",
        )
    eval_features = prepared.validation_features
    if prepared.validation_stats is not None:
        logger.info(f"validation data: {prepared.validation_stats.summary().splitlines()[0]}")

    set_seed(tc.seed)  # the LoRA initialisation is random too
    model = load_base_model(config.model, task_type, dtype=dtype, device=None, training=True)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model = apply_lora(model, config.lora, task_type, gradient_checkpointing=tc.gradient_checkpointing)  # type: ignore[assignment]  # the PeftModel wraps it
    logger.info(f"LoRA: {trainable_summary(model)}")

    from .batching import build_batching, resolve_packing

    batching = build_batching(
        config,
        resolve_packing(config, model, task_type),
        train_features,
        eval_features,
        tokenizer.pad_token_id,
        task_type,
    )
    learning_rate, why = resolve_learning_rate(config, model.config)
    logger.info(f"learning rate {learning_rate:.3g} ({why})")
    args = build_training_args(
        config,
        paths,
        precision,
        device,
        has_eval=bool(eval_features),
        packed=batching.packed,
        learning_rate=learning_rate,
    )
    if main:
        if not resume:
            _clear_run(paths)  # only now: a setup error must not cost an existing run
        for folder in paths.incomplete_checkpoints():
            logger.warning(f"skipping {folder.name}: its save was interrupted (incomplete); removed it")
            shutil.rmtree(folder)
        if checkpoint is not None:
            logger.info(f"resuming from {checkpoint}")
        atomic_write_text(paths.config, config.to_yaml())  # an interrupted run still describes itself
        if changes and checkpoint is not None:  # changes come only with a resume
            record_config_change(paths, int(checkpoint.name.split("-")[1]), changes)
        if checkpoint is not None:
            truncate_metrics(paths.metrics, int(checkpoint.name.split("-")[1]))

    interrupt = InterruptCallback()
    guard = NonFiniteGuard()
    guard.attach(model)
    progress = RichProgressCallback()  # the live bar is UI: it draws on stderr itself
    writers = [MetricsFileCallback(paths.metrics, on_log), progress] if main else []
    completion = CheckpointCompletionCallback(keep=tc.save_total_limit, main=main)
    all_callbacks = [*writers, completion, guard, interrupt, *(callbacks or [])]
    if tc.early_stopping_patience and args.load_best_model_at_end:
        all_callbacks.append(EarlyStoppingCallback(early_stopping_patience=tc.early_stopping_patience))
    elif tc.early_stopping_patience:
        logger.warning("train.early_stopping_patience is ignored: it needs a validation split and train.best_metric")
    generation_eval = None
    if tc.generation_eval_every and eval_features:
        from .generation_eval import make_generation_eval

        generation_eval = make_generation_eval(
            config, splits.validation, tokenizer, template, task_type, extractive=extractive
        )
    trainer = GenerationEvalTrainer(
        generation_eval=generation_eval,
        model=model,
        args=args,
        labelled_logits_only=tc.labelled_logits_only,
        train_dataset=batching.train_dataset,
        eval_dataset=batching.eval_dataset,
        data_collator=batching.collator,
        processing_class=tokenizer,
        callbacks=all_callbacks,
    )
    remove_default_printers(trainer)

    # train; the signal handlers stay until the adapter is saved, so a late signal cannot tear it
    interrupt.install()
    try:
        try:
            with warnings.catch_warnings():  # check_optimizer logged it once, in lorakit's words
                warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")
                trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        except KeyboardInterrupt:  # a third Ctrl-C: quit at once, saving nothing
            saved = paths.latest_checkpoint()
            raise TrainingInterrupted(
                f"training stopped at once at step {trainer.state.global_step}; nothing was saved"
                + (f" (the newest complete checkpoint is {saved})." if saved else ", and there is no checkpoint."),
                hint=f"continue with `lorakit train CONFIG --resume` (run folder {paths.root})"
                if saved
                else "train again",
            ) from None
        except NonFiniteTraining as exc:
            raise _non_finite_error(exc, learning_rate, paths) from None
        finally:
            progress.stop()
        if interrupt.stopped_at is not None:
            kept = f"; the old run in {paths.publish_to} stays until this one finishes" if paths.publish_to else ""
            raise TrainingInterrupted(
                f"training interrupted ({signal.Signals(interrupt.signum or signal.SIGINT).name}) at step {trainer.state.global_step}; "
                f"checkpoint saved to {paths.latest_checkpoint()}{kept}.",
                hint=f"continue with `lorakit train CONFIG --resume` (same config; run folder {paths.root})",
                exit_code=interrupt.exit_code,
            )
        if not main:
            return paths
        return _save(
            trainer,
            config,
            paths,
            tokenizer,
            template,
            task_type,
            precision,
            model,
            n_train=len(train_features),
            n_eval=len(eval_features),
            extractive=extractive,
        )
    finally:
        interrupt.uninstall()


def _save(
    trainer: Trainer,
    config: LorakitConfig,
    paths: RunPaths,
    tokenizer: PreTrainedTokenizerBase,
    template: Template,
    task_type: str,
    precision: str,
    model: PreTrainedModel,
    *,
    n_train: int,
    n_eval: int,
    extractive: bool,
) -> RunPaths:
    """Adapter + tokenizer + metadata, the curve, then (for train.overwrite) the swap into place."""
    from ..models.identity import base_model_identity

    final_root = paths.publish_to or paths.root
    trainer.model.save_pretrained(paths.adapter)  # type: ignore[union-attr,operator]  # the PeftModel it was given
    tokenizer.save_pretrained(paths.adapter)
    (paths.adapter / "README.md").unlink(missing_ok=True)  # peft's generic model card; lorakit.json describes the run
    best = trainer.state.best_model_checkpoint
    history = read_config_history(paths)
    write_metadata(
        paths.adapter,
        base=base_model_identity(config.model, commit_hash=getattr(model.config, "_commit_hash", None)),
        task_type=task_type,
        template=template,
        precision=precision,
        max_length=config.template.max_length,
        extractive=extractive,
        no_answer=config.data.no_answer,
        extra={
            "train_examples": n_train,
            "validation_examples": n_eval,
            "global_step": trainer.state.global_step,
            "best_checkpoint": best.replace(str(paths.root), str(final_root), 1) if best else None,
            "lora": config.lora.model_dump(mode="json"),
            "learning_rate": trainer.args.learning_rate,
            **({"config_changes": history} if history else {}),
        },
    )
    from ..evaluate.plots import plot_loss

    plot_loss(read_metrics(paths.metrics), paths.loss_plot, title=final_root.name)
    paths = publish_run(paths)
    logger.info(f"done: adapter saved to {paths.adapter}")
    return paths


def _non_finite_error(exc: NonFiniteTraining, rate: float, paths: RunPaths) -> RunError:
    good = paths.latest_checkpoint()
    where = f"; the last good checkpoint is {good}" if good else "; no checkpoint was kept"
    hint = f"lower train.learning_rate (now {rate:g}), or check the base model weights, the data and model.precision"
    if good:
        hint += (
            ", then continue with `lorakit train CONFIG --resume --allow-config-change --set train.learning_rate=...`"
        )
    else:
        hint += ", then train again"
    return RunError(
        f"training stopped at step {exc.step}: {exc.what} (loss {exc.loss}); nothing from that step was saved{where}.",
        hint=hint,
    )


def _clear_run(paths: RunPaths) -> None:
    """A fresh start (allowed by prepare_run_dir) removes only what lorakit itself writes."""
    if paths.publish_to is not None:  # a staging folder left by an earlier overwrite attempt
        shutil.rmtree(paths.root, ignore_errors=True)
        return
    for folder in (paths.adapter, paths.checkpoints, paths.plots, paths.eval):
        if folder.is_dir():
            shutil.rmtree(folder)
    for file in (paths.metrics, paths.config, paths.config_changes):
        file.unlink(missing_ok=True)
