"""Answer quality during training: EM/F1 from real generations on a validation subset.

Validation loss says little about whether answers are right. With train.generation_eval_every,
every evaluation also generates answers for the first train.generation_eval_examples validation
examples (greedy, the run's own template) and logs eval_exact_match, eval_f1 and
eval_never_stops_rate next to eval_loss, so `train.best_metric: f1` and early stopping can use them.
"""

from __future__ import annotations

from collections.abc import Callable

from transformers import Trainer

from ..config import LorakitConfig
from ..data.example import Example


class GenerationEvalTrainer(Trainer):
    """A Trainer whose evaluations also carry generation metrics.

    The metrics are added to the evaluation loop's output, so they travel through the same path
    as eval_loss: the log, metrics.jsonl, best-checkpoint selection and EarlyStoppingCallback.
    """

    def __init__(self, *args, generation_eval: Callable[[object], dict] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.generation_eval = generation_eval

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
