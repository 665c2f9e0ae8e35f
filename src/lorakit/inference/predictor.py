"""Use a trained run: load it with its own template, then generate, stream or chat.

Everything comes from the folder (base model, template, system prompt, task type), read from
lorakit.json: the template a run was trained with is the one it is prompted with, always.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import DataConfig, EvalConfig, TemplateConfig, default_of
from ..errors import ModelError, RunError
from ..runs import METADATA_FILE, RunPaths
from .decoding import Generation, encode_prompt, generate_batched, stream_generate

if TYPE_CHECKING:  # annotations only: importing transformers here would cost every import
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from ..prompting.templates import Template

_POSITION_ATTRS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def _max_context(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, max_length: int | None) -> int:
    """The longest prompt + completion the model can take: its positions, else the tokenizer's limit."""
    config = getattr(model, "config", None)
    for attr in _POSITION_ATTRS:
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < 1_000_000:  # "no limit" is stored as a huge number
        return limit
    if max_length:
        return max_length
    # neither the model nor a run states a limit: the one default for a sequence's length
    default: int = default_of(TemplateConfig, "max_length")
    return default


class Predictor:
    """A model, its tokenizer and the template it was trained with, ready to answer.

    Usually made by load_predictor(folder). The system prompt is the template's own
    (Template.system, stored once with the run).

    Args:
        model: the model (a peft PeftModel with the adapter, or a plain/merged model).
        tokenizer: its tokenizer.
        template: the template the run was trained with.
        task_type: "causal" or "seq2seq".
        name: the model's name (the run folder's name).
        adapter_name: activated before each generation, so several adapters can share one base model.
        max_length: the run's training max_length; a prompt with a context is shortened to fit it.
        extractive: keep each answer to a question with a passage inside a span of that passage,
            or the no_answer text (inference.extractive); the run's stored setting.
        no_answer: the text an unanswerable question is answered with (None: data.no_answer's default).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        template: Template,
        *,
        task_type: str,
        name: str,
        adapter_name: str | None = None,
        max_length: int | None = None,
        extractive: bool = False,
        no_answer: str | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.template = template
        self.task_type = task_type
        self.name = name
        self.adapter_name = adapter_name
        self.max_length = max_length
        self.extractive = extractive
        # the text an unanswerable question is answered with: the run's, else data.no_answer's default
        self.no_answer = no_answer if no_answer is not None else default_of(DataConfig, "no_answer")
        self.max_context = _max_context(model, tokenizer, max_length)

    # --- prompts ------------------------------------------------------------------------------

    def prompt_for(self, messages: list[dict[str, Any]], context: str | None = None) -> str:
        """The rendered prompt text for a conversation (ending where the reply begins)."""
        from ..prompting.templates import render_prompt

        return render_prompt(self.template, messages, context)

    def count_tokens(self, text: str) -> int:
        return len(encode_prompt(self.tokenizer, text, self.task_type))

    def prompt_ids(
        self, messages: list[dict[str, Any]], context: str | None = None, *, max_new_tokens: int = 0
    ) -> list[int]:
        """Prompt ids built exactly as training built them; a context that makes the prompt too
        long is cut (keeping its start, as nothing may peek at the answer here).

        Raises:
            ModelError: the prompt does not fit even without its context.
        """
        from ..prompting.encoding import encode_prompt as encode_conversation

        def build(text: str | None) -> list[int]:
            return encode_conversation(self.template, self.tokenizer, messages, text)

        budget = self.max_context - max_new_tokens
        if self.max_length:
            budget = min(budget, self.max_length)
        ids = build(context)
        while len(ids) > budget and context:
            pieces = self.tokenizer(context, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
            keep = len(pieces) - (len(ids) - budget)
            context = context[: pieces[keep - 1][1]] if keep > 0 else None
            ids = build(context)
        if len(ids) + max_new_tokens > self.max_context:
            raise ModelError(
                f"the prompt has {len(ids)} tokens and {max_new_tokens} new ones were asked for, but"
                f" '{self.name}' takes at most {self.max_context} tokens.",
                hint="shorten the conversation (or /reset in chat), or lower max_new_tokens",
            )
        return ids

    # --- generation ---------------------------------------------------------------------------

    def _activate(self) -> None:
        if self.adapter_name and getattr(self.model, "active_adapter", None) != self.adapter_name:
            self.model.set_adapter(self.adapter_name)

    def _stops(self, extra: Sequence[str] | None) -> list[str]:
        return list(dict.fromkeys([*self.template.stop_strings, *(extra or [])]))

    def generate_prompts(
        self,
        prompts: Sequence[str | list[int]],
        *,
        max_new_tokens: int = default_of(EvalConfig, "max_new_tokens"),
        temperature: float = default_of(EvalConfig, "temperature"),
        top_p: float = default_of(EvalConfig, "top_p"),
        batch_size: int = default_of(EvalConfig, "batch_size"),
        stop_strings: Sequence[str] | None = None,
        seed: int | None = None,
        cancelled: Callable[[int], bool] | None = None,
        share_prefixes: bool = True,
        passages: Sequence[str | None] | None = None,
    ) -> list[Generation]:
        """Complete raw prompts (text, or ids), stopping at the template's stop strings too.
        cancelled(i) True ends prompt i early; share_prefixes: a common start (a passage) is
        encoded once for all its questions; passages: one per prompt (None: free), each answer
        kept inside a span of its passage or the no-answer text (see generate_batched)."""
        self._activate()
        return generate_batched(
            self.model,
            self.tokenizer,
            list(prompts),
            task_type=self.task_type,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            batch_size=batch_size,
            stop_strings=self._stops(stop_strings),
            seed=seed,
            cancelled=cancelled,
            share_prefixes=share_prefixes,
            passages=passages,
            no_answer=self.no_answer,
        )

    def generate(
        self,
        conversations: list[list[dict[str, Any]]],
        contexts: Sequence[str | None] | None = None,
        *,
        max_new_tokens: int = default_of(EvalConfig, "max_new_tokens"),
        extractive: bool | None = None,
        **decoding: Any,
    ) -> list[Generation]:
        """One reply per conversation (its prompt messages), rendered with the stored template.

        Args:
            conversations: each a list of {"role", "content"} messages, ending with the user's turn.
            contexts: one passage (or None) per conversation, for templates with a context.
            max_new_tokens: the longest reply, in tokens.
            extractive: keep answers inside spans of their context; None: the run's setting.
            **decoding: temperature, top_p, batch_size, stop_strings, seed, share_prefixes
                (see generate_prompts).

        Returns:
            One Generation per conversation: text, finish_reason ("stop" or "length"), token counts.

        Raises:
            ModelError: a prompt does not fit the model's context even without its passage.
        """
        contexts = list(contexts) if contexts is not None else [None] * len(conversations)
        if len(contexts) != len(conversations):
            raise ValueError(f"generate: {len(conversations)} conversations but {len(contexts)} contexts")
        prompts = [self.prompt_ids(m, c, max_new_tokens=max_new_tokens) for m, c in zip(conversations, contexts)]
        passages = contexts if self.extractive_for(extractive) else None
        return self.generate_prompts(prompts, max_new_tokens=max_new_tokens, passages=passages, **decoding)

    def extractive_for(self, extractive: bool | None) -> bool:
        """Whether a call keeps answers inside their passage: its own choice, else the run's."""
        return self.extractive if extractive is None else extractive

    def stream_prompt(
        self,
        prompt: str | list[int],
        *,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop_strings: Sequence[str] | None = None,
        seed: int | None = None,
        batch_size: int | None = None,  # accepted so the same decoding options work everywhere
        stopping_criteria: Sequence[Any] = (),
        passage: str | None = None,
    ) -> Iterator[str]:
        """Yield the completion of a raw prompt piece by piece (inside a span of passage, if given)."""
        self._activate()
        return stream_generate(
            self.model,
            self.tokenizer,
            prompt,
            task_type=self.task_type,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            stop_strings=self._stops(stop_strings),
            seed=seed,
            stopping_criteria=stopping_criteria,
            passage=passage,
            no_answer=self.no_answer,
        )

    def stream(
        self,
        messages: list[dict[str, Any]],
        context: str | None = None,
        *,
        max_new_tokens: int = 256,
        extractive: bool | None = None,
        **decoding: Any,
    ) -> Iterator[str]:
        """Yield the reply to a conversation piece by piece.

        Args:
            messages: the conversation, ending with the user's turn.
            context: a passage, for templates with a context.
            max_new_tokens: the longest reply, in tokens.
            extractive: keep the reply inside a span of the context; None: the run's setting.
            **decoding: temperature, top_p, stop_strings, seed.

        Returns:
            An iterator of text pieces, as they are generated.

        Raises:
            ModelError: the prompt does not fit the model's context even without its passage.
        """
        ids = self.prompt_ids(messages, context, max_new_tokens=max_new_tokens)
        passage = context if self.extractive_for(extractive) else None
        return self.stream_prompt(ids, max_new_tokens=max_new_tokens, passage=passage, **decoding)

    @property
    def has_adapter(self) -> bool:
        from peft import PeftModel

        return isinstance(self.model, PeftModel)

    @contextmanager
    def base_model(self) -> Iterator[Predictor]:
        """Inside this block the LoRA adapter is off: the same template and decoding, base weights.

        Raises:
            RunError: there is no adapter to switch off (a merged or plain model folder).
        """
        if not self.has_adapter:
            raise RunError(
                f"'{self.name}' has no LoRA adapter to switch off (a merged or plain model folder).",
                hint="evaluate the run folder the adapter came from to compare against the base model",
            )
        self._activate()
        # a PeftModel here (has_adapter checked above), though typed as the PreTrainedModel it wraps
        with self.model.disable_adapter():  # type: ignore[operator]
            yield self


# --- loading ------------------------------------------------------------------------------------


def _is_plain_model(folder: Path) -> bool:
    """A transformers model folder that lorakit did not write (no lorakit.json anywhere)."""
    return (
        folder.is_dir()
        and (folder / "config.json").is_file()
        and not (folder / METADATA_FILE).is_file()
        and not RunPaths(folder).lorakit_json.is_file()
    )


def _load_plain(folder: Path, device: str) -> Predictor:
    """A model folder without lorakit.json: usable only with its own chat template."""
    from ..config import ModelConfig
    from ..models.loading import detect_task_type, load_base_model, load_tokenizer
    from ..models.precision import choose_precision
    from ..prompting.templates import resolve_template

    model_config = ModelConfig(name_or_path=str(folder))
    tokenizer = load_tokenizer(model_config)
    if not getattr(tokenizer, "chat_template", None):
        raise RunError(
            f"'{folder}' is a model folder without {METADATA_FILE}, and its tokenizer has no chat template,"
            " so the prompt format it expects is unknown.",
            hint="pass a run folder written by `lorakit train` (or its merged folder), or a chat model whose"
            " tokenizer has a chat_template",
        )
    task_type = detect_task_type(model_config)
    template = resolve_template(TemplateConfig(name="chat"), tokenizer, task_type)
    dtype, _ = choose_precision("auto", device)
    model = load_base_model(model_config, task_type, dtype=dtype, device=device)
    model.eval()  # type: ignore[no-untyped-call]  # transformers leaves nn.Module.eval unannotated here
    return Predictor(model, tokenizer, template, task_type=task_type, name=folder.resolve().name)


def load_predictor(path: str | os.PathLike[str], *, device: str | None = None, adapter: bool = True) -> Predictor:
    """Load a run folder, its adapter folder, or a merged model folder, ready to generate.

    Args:
        path: a run folder, its adapter folder, a merged folder, or a plain model folder with a
            chat template.
        device: "cpu", "cuda", ...; default the best available.
        adapter: False loads the base model alone, with the run's template (for a merged folder:
            the base it was merged from), so the same prompts can be compared without the fine-tuning.

    Returns:
        A Predictor that renders prompts with the run's stored template.

    Raises:
        RunError: not a lorakit run (see runs.read_run), or a plain model folder without a chat template.
        ModelError: the base model or tokenizer cannot be loaded.
    """
    from ..models.precision import default_device
    from ..pipeline import load_run

    device = device or default_device()
    folder = Path(path)
    if _is_plain_model(folder):
        return _load_plain(folder, device)
    run = load_run(folder, device=device, adapter=adapter)
    info = run.info
    return Predictor(
        run.model,
        run.tokenizer,
        info.template,
        task_type=info.task_type,
        name=info.root.resolve().name,
        max_length=info.max_length,
        extractive=info.extractive,
        no_answer=info.no_answer,
    )


# --- the generate and chat commands -------------------------------------------------------------
