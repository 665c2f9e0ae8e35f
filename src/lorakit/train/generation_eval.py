"""Answer quality during training: EM/F1 from real generations on a validation subset.

Validation loss says little about whether answers are right. With train.generation_eval_every,
every evaluation also generates answers for the first train.generation_eval_examples validation
examples (greedy, the run's own template) and logs eval_exact_match, eval_f1 and
eval_never_stops_rate next to eval_loss, so `train.best_metric: f1` and early stopping can use them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from transformers import Trainer

from ..config import LorakitConfig
from ..data.example import Example

logger = logging.getLogger("lorakit.train")


class GenerationEvalTrainer(Trainer):
    """A Trainer whose evaluations also carry generation metrics.

    The metrics are added to the evaluation loop's output, so they travel through the same path
    as eval_loss: the log, metrics.jsonl, best-checkpoint selection and EarlyStoppingCallback.

    Batches with `shift_labels` (the causal collators') take lorakit's loss (train/loss.py); with
    `labelled_logits_only` (train.labelled_logits_only) and a model whose logits are a plain
    projection, only labelled positions go through the output projection. Other batches (seq2seq,
    or a collator without shift_labels) keep the Trainer's own loss.
    """

    def __init__(
        self,
        *args,
        generation_eval: Callable[[object], dict] | None = None,
        labelled_logits_only: bool = True,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.generation_eval = generation_eval
        self.labelled_logits_only = labelled_logits_only

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if "shift_labels" not in inputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        from .loss import causal_loss

        # the labelled path calls the decoder directly, which would skip a DDP/FSDP wrapper's forward
        wrapped = self.accelerator.unwrap_model(model) is not model
        if wrapped and self.labelled_logits_only and not getattr(self, "_told_wrapped", False):
            self._told_wrapped = True
            logger.info("loss: the model's own loss (the model is wrapped for distributed training)")
        with self.accelerator.autocast():  # accelerate's mixed precision wraps only the model's forward
            loss, outputs = causal_loss(
                model,
                inputs,
                num_items_in_batch,
                labelled_logits_only=self.labelled_logits_only and not wrapped,
            )
        if model.training:  # the labelled path skips the model's forward, where the guard listens
            for callback in self.callback_handler.callbacks:
                if hasattr(callback, "record_loss"):
                    callback.record_loss(loss)
        # as Trainer.compute_loss: num_items_in_batch counted every process's tokens, and the
        # gradients are averaged over processes, so scale the loss back up by their number
        if (
            self.args.average_tokens_across_devices
            and (self.model_accepts_loss_kwargs or self.compute_loss_func)
            and num_items_in_batch is not None
        ):
            loss_scale = self.accelerator.num_processes // self.get_tp_size()
            loss = loss * (loss_scale if self.args.n_gpu <= 1 else self.args.n_gpu)
        return (loss, outputs) if return_outputs else loss

    def _track_num_input_tokens(self, inputs):
        # a packed batch's mask is [B, 1, L, L]; its diagonal marks the real tokens (see
        # prompting/packing.py), which is what "non_padding" counts on a 2D mask
        mask = inputs.get("attention_mask")
        if mask is not None and mask.dim() == 4:
            inputs = {**inputs, "attention_mask": mask[:, 0].diagonal(dim1=-2, dim2=-1)}
        return super()._track_num_input_tokens(inputs)

    def evaluation_loop(self, *args, **kwargs):
        output = super().evaluation_loop(*args, **kwargs)
        if self.generation_eval is not None:
            prefix = kwargs.get("metric_key_prefix", "eval")
            scores = self.generation_eval(self.model)
            output.metrics.update({f"{prefix}_{name}": value for name, value in scores.items()})
        return output


def make_generation_eval(
    config: LorakitConfig, examples: list[Example], tokenizer, template, task_type: str
) -> Callable[[object], dict]:
    """A function model -> {exact_match, f1, never_stops_rate} on a fixed validation subset."""
    from ..evaluate.runner import score_examples
    from ..inference.predictor import Predictor

    subset = examples[: config.train.generation_eval_examples]
    decoding = dict(
        max_new_tokens=config.eval.max_new_tokens,
        batch_size=config.eval.batch_size,
        temperature=0.0,  # greedy: comparable from one evaluation to the next
        top_p=1.0,
        seed=config.train.seed,
    )

    def evaluate(model) -> dict:
        was_training = model.training
        model.eval()
        predictor = Predictor(
            model,
            tokenizer,
            template,
            task_type=task_type,
            name="validation",
            max_length=config.template.max_length,  # the system prompt is the template's own
        )
        try:
            _, metrics = score_examples(
                predictor,
                subset,
                decoding=decoding,
                no_answer=config.data.no_answer,
                bleu_tokenize=config.eval.bleu_tokenize,
                lang=config.eval.lang,
                perplexity=False,
            )
        finally:
            if was_training:
                model.train()
        return {
            "exact_match": metrics["exact_match"],
            "f1": metrics["f1"],
            "never_stops_rate": metrics["never_stops_rate"],
        }

    return evaluate
