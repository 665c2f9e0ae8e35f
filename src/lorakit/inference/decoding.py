"""Batched generation that stops when it should, and answer extraction from what it produced.

Causal models are fed left-padded batches (so every row's next token sits in the last column),
sorted by length to waste little compute on padding. Greedy prompts that share a long start
(several questions on one passage) have it encoded once per batch and its cache reused
(prefix_cache.py). A row is finished by EOS or by one of the template's stop strings; greedy
causal batches drop their finished rows as they go (greedy.py), the others end when every row has.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from .extractive import spans_processor as _spans
from .greedy import greedy_decode, plain_greedy
from .prefix_cache import (
    PrefixGroup,
    can_share_prefixes,
    encode_prefixes,
    encode_shared_prefixes,
    group_by_prefix,
    prefix_batches,
)
from .shared_attention import SharedPrefix, supports_shared_attention
from .stopping import StopOnStrings, _Cancelled, _RowsCancelled

if TYPE_CHECKING:  # annotations only, no import cost
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass
class Generation:
    """One completion: `text` is what a user sees (cut at the stop string, specials removed)."""

    text: str
    raw_text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: Literal["stop", "length"]


# --- encoding prompts ---------------------------------------------------------------------------


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str, task_type: str = "causal") -> list[int]:
    """Token ids of an already-rendered prompt, the way training encoded prompts.

    Causal: the rendered template carries its own special tokens, so only the BOS the tokenizer
    would add itself is prepended (as prompting/encoding.py does). Seq2seq encoders get the tokenizer's own
    special tokens (T5 appends </s>), as in training.
    """
    if task_type == "seq2seq":
        return list(tokenizer(prompt)["input_ids"])
    from ..prompting.encoding import _bos_prefix

    return _bos_prefix(tokenizer, prompt) + list(tokenizer(prompt, add_special_tokens=False)["input_ids"])


def _as_ids(tokenizer, prompt: str | list[int], task_type: str) -> list[int]:
    """Prompts come as rendered text, or as ids already built the training way (multi-turn)."""
    return list(prompt) if not isinstance(prompt, str) else encode_prompt(tokenizer, prompt, task_type)


def _pad_id(tokenizer, model) -> int:
    for candidate in (
        tokenizer.pad_token_id,
        getattr(model.generation_config, "pad_token_id", None),
        tokenizer.eos_token_id,
    ):
        if isinstance(candidate, int):
            return candidate
    return 0


def _eos_ids(tokenizer, model) -> set[int]:
    ids = set()
    for value in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


def _batch_tensors(rows: list[list[int]], pad_id: int, left: bool, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad id lists into (input_ids, attention_mask) without touching the tokenizer's settings."""
    width = max(len(r) for r in rows)
    ids, mask = [], []
    for row in rows:
        fill = width - len(row)
        if left:
            ids.append([pad_id] * fill + row)
            mask.append([0] * fill + [1] * len(row))
        else:
            ids.append(row + [pad_id] * fill)
            mask.append([1] * len(row) + [0] * fill)
    return torch.tensor(ids, device=device), torch.tensor(mask, device=device)


def _generation_config(model, *, max_new_tokens, temperature, top_p, pad_id, eos_ids):
    config = copy.deepcopy(model.generation_config)
    config.max_new_tokens = max_new_tokens
    config.max_length = None
    config.min_new_tokens = None
    config.num_beams = 1
    config.use_cache = True
    config.pad_token_id = pad_id
    config.eos_token_id = sorted(eos_ids) if eos_ids else None
    config.do_sample = temperature > 0
    if config.do_sample:
        config.temperature = float(temperature)
        config.top_p = float(top_p)
        config.top_k = None  # OpenAI-style decoding: temperature and top_p only
    else:
        config.temperature = None
        config.top_p = None
        config.top_k = None
    return config


def _first_stop(text: str, stop_strings: Iterable[str]) -> int:
    """Index of the earliest stop string in text, or -1."""
    found = [text.find(s) for s in stop_strings if s and s in text]
    return min(found) if found else -1


def _finish(
    tokenizer, row: list[int], *, prompt_tokens, eos_ids, stopped_at, stop_strings, max_new_tokens
) -> Generation:
    """Turn one row of generated ids into a Generation, deciding why it ended.

    stopped_at: how many tokens the row had when a stop string appeared (None if it never did);
    after that, and after EOS, the row holds only padding while the rest of the batch continues.
    """
    end = next((i + 1 for i, token in enumerate(row) if token in eos_ids), None)
    if stopped_at is not None and (end is None or stopped_at < end):
        end = stopped_at
    finished = end is not None
    row = row[:end] if finished else row
    raw_text = tokenizer.decode(row, skip_special_tokens=False)
    text = tokenizer.decode([t for t in row if t not in eos_ids], skip_special_tokens=True)
    cut = _first_stop(text, stop_strings)
    if cut >= 0:
        text = text[:cut]
    reason: Literal["stop", "length"] = "stop" if finished or cut >= 0 or len(row) < max_new_tokens else "length"
    return Generation(text, raw_text, prompt_tokens, len(row), reason)


def _decoding_setup(model, tokenizer, *, max_new_tokens, temperature, top_p, seed):
    """What every generation needs first: seeded RNG, device, pad and EOS ids, generation config."""
    if seed is not None:
        torch.manual_seed(seed)
    device = next(model.parameters()).device
    pad_id, eos_ids = _pad_id(tokenizer, model), _eos_ids(tokenizer, model)
    config = _generation_config(
        model, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, pad_id=pad_id, eos_ids=eos_ids
    )
    return device, pad_id, eos_ids, config


# --- public API ----------------------------------------------------------------------------------


def generate_batched(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str | list[int]],
    *,
    task_type: str = "causal",
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    batch_size: int = 16,
    stop_strings: Sequence[str] = (),
    seed: int | None = None,
    cancelled: Callable[[int], bool] | None = None,
    share_prefixes: bool = True,
    passages: Sequence[str | None] | None = None,
    no_answer: str | None = None,
) -> list[Generation]:
    """Generate one completion per prompt, in batches, returned in the prompts' order.

    Greedy when temperature == 0. A prompt is already-rendered template text, or its token ids.
    stop_strings end a row (the template's, plus any the caller adds); EOS always does.
    cancelled(i), asked between decoding steps, ends prompt i's row early (its caller has gone).
    share_prefixes: greedy causal prompts that start alike (several questions on one passage) have
    their common start encoded once and its cache reused (inference.prefix_cache); the answers
    are those each prompt gets alone.
    passages: one per prompt (or None for a free row): the row's answer is kept inside a span of
    its passage, or is the no_answer text, then EOS (inference.extractive).
    """
    if not prompts:
        return []
    device, pad_id, eos_ids, config = _decoding_setup(
        model, tokenizer, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed
    )
    encoded = [_as_ids(tokenizer, p, task_type) for p in prompts]
    results: list[Generation | None] = [None] * len(prompts)

    def run(chunk: list[int], input_ids: torch.Tensor, mask: torch.Tensor, past: object = None) -> None:
        """Generate one batch (prompt indices `chunk`) and store its rows' Generations. past: a
        cache of the rows' first tokens, or their passages encoded once (a SharedPrefix, greedy only)."""
        width = 1 if task_type == "seq2seq" else input_ids.shape[1]
        stopper = StopOnStrings(tokenizer, stop_strings, width)
        spans = _spans(tokenizer, [passages[i] for i in chunk], no_answer, eos_ids) if passages else {}
        if task_type != "seq2seq" and plain_greedy(config):
            store(chunk, _greedy(chunk, input_ids, mask, past, stopper, spans), stopper)
            return
        criteria = StoppingCriteriaList([stopper] if stopper.stop_strings else [])
        if cancelled is not None:
            criteria.append(_RowsCancelled(cancelled, chunk))
        cache = {"past_key_values": past} if past is not None else {}
        # mypy sees generate through nn.Module.__getattr__ (a Tensor) in transformers' stubs
        output = model.generate(  # type: ignore[operator]
            input_ids=input_ids,
            attention_mask=mask,
            generation_config=config,
            stopping_criteria=criteria,
            **cache,
            **spans,
        )
        # causal output repeats the prompt; seq2seq output starts with the decoder start token
        new = output[:, input_ids.shape[1] :] if task_type != "seq2seq" else output[:, 1:]
        store(chunk, new.tolist(), stopper)

    def _greedy(chunk, input_ids, mask, past, stopper: StopOnStrings, spans) -> list[list[int]]:
        """The batch through inference.greedy: finished rows stop costing decoding steps."""

        def row_done(row: int, tokens: list[int]) -> bool:
            return (cancelled is not None and cancelled(chunk[row])) or stopper.row_stops(row, tokens)

        shared = past if isinstance(past, SharedPrefix) else None
        return greedy_decode(
            model,
            input_ids,
            mask,
            max_new_tokens=max_new_tokens,
            eos_ids=eos_ids,
            pad_id=pad_id,
            past=None if shared is not None else past,
            processors=list(spans.get("logits_processor", [])),
            row_done=row_done,
            shared=shared,
        )

    def store(chunk: list[int], new: list[list[int]], stopper: StopOnStrings) -> None:
        for j, index in enumerate(chunk):
            results[index] = _finish(
                tokenizer,
                new[j],
                prompt_tokens=len(encoded[index]),
                eos_ids=eos_ids,
                stopped_at=stopper.stopped_at.get(j),
                stop_strings=stop_strings,
                max_new_tokens=max_new_tokens,
            )

    # prompts that share a long start (a passage asked several questions) have it encoded once;
    # greedy only, so sampled rows keep the batches (and the seeded draws) they always had
    plain = list(range(len(prompts)))
    shared: list[PrefixGroup] = []
    if share_prefixes and task_type != "seq2seq" and temperature == 0 and can_share_prefixes(model):
        shared = [g for g in group_by_prefix(encoded) if len(g.members) > 1]
        in_groups = {i for g in shared for i in g.members}
        plain = [i for i in plain if i not in in_groups]
    # longest first: similar lengths share a batch, and an out-of-memory shows up at once
    plain.sort(key=lambda i: -len(encoded[i]))
    # greedy batches read each passage once per group (shared_attention); the rest copy it per row
    once = plain_greedy(config) and supports_shared_attention(model)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            # rows that read their passage once fill a batch by cache room, not by row count
            lengths = [len(e) for e in encoded] if once else None
            batches = prefix_batches(shared, batch_size, lengths=lengths, new_tokens=max_new_tokens)
            for n, batch in enumerate(batches):
                prepared = (
                    encode_shared_prefixes(model, encoded, batch, pad_id, device)
                    if once
                    else encode_prefixes(model, encoded, batch, pad_id, device, max_new_tokens)
                )
                if prepared is None:  # this model's cache cannot be shared: the plain way for these rows
                    plain = sorted(plain + [i for b in batches[n:] for i in b.rows], key=lambda i: -len(encoded[i]))
                    break
                run(batch.rows, *prepared)
            for start in range(0, len(plain), max(1, batch_size)):
                chunk = plain[start : start + batch_size]
                run(chunk, *_batch_tensors([encoded[i] for i in chunk], pad_id, task_type != "seq2seq", device))
    finally:
        model.train(was_training)
    return results  # type: ignore[return-value]


def stream_generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str | list[int],
    *,
    task_type: str = "causal",
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop_strings: Sequence[str] = (),
    seed: int | None = None,
    stopping_criteria: Sequence[StoppingCriteria] = (),
    passage: str | None = None,
    no_answer: str | None = None,
) -> Iterator[str]:
    """Yield text pieces as the model produces them; nothing at or after a stop string.

    stopping_criteria: extra criteria, called once per generated token (e.g. a caller's counter).
    passage: keep the answer inside a span of it, or the no_answer text (see generate_batched).
    """
    device, pad_id, eos_ids, config = _decoding_setup(
        model, tokenizer, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed
    )
    ids = _as_ids(tokenizer, prompt, task_type)
    input_ids, mask = _batch_tensors([ids], pad_id, left=True, device=device)
    criteria = StoppingCriteriaList()
    if stop_strings:
        criteria.append(StopOnStrings(tokenizer, stop_strings, 1 if task_type == "seq2seq" else input_ids.shape[1]))
    criteria.extend(stopping_criteria)
    cancel = threading.Event()
    criteria.append(_Cancelled(cancel))
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    spans = _spans(tokenizer, [passage], no_answer, eos_ids)
    failure: list[BaseException] = []

    def work():
        try:
            with torch.inference_mode():
                model.generate(
                    input_ids=input_ids,
                    attention_mask=mask,
                    generation_config=config,
                    stopping_criteria=criteria,
                    streamer=streamer,
                    **spans,
                )
        except BaseException as exc:  # surfaced in the caller's thread below
            failure.append(exc)
            streamer.end()

    model.eval()
    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    # hold back a tail that could be the start of a stop string until we know it is not one
    hold = max((len(s) for s in stop_strings if s), default=1) - 1
    pending, ended = "", False
    try:
        for piece in streamer:
            pending += piece
            cut = _first_stop(pending, stop_strings)
            if cut >= 0:
                pending = pending[:cut]
                break
            if len(pending) > hold:
                ready, pending = pending[: len(pending) - hold], pending[len(pending) - hold :]
                yield ready
        else:
            ended = True
        if pending:
            yield pending
    finally:
        if not ended:  # the caller stopped early or a stop string appeared: end the worker soon
            cancel.set()
            for _ in streamer:
                pass
        thread.join()
    if failure:
        raise failure[0]
