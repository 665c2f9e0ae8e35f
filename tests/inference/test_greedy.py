"""Greedy decoding that drops finished rows gives what transformers' generate gives, token for token:
rows of different lengths ending at different steps, shared-prefix batches, stop strings and
passages (extractive decoding); and it really stops computing the finished rows."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from lorakit.inference import decoding
from lorakit.inference.decoding import _batch_tensors, encode_prompt, generate_batched
from lorakit.inference.greedy import greedy_decode, plain_greedy

PROMPTS = [
    "### Context: The quick brown fox jumps over the lazy dog, and the capital of France is Paris.\n### Question: " + q
    for q in ("Who jumps?", "What is the capital of France?", "Which dog?", "What color is the fox?")
] + ["hello there", "The author wrote the book in 1999 and then", "A", "Who wrote the book?"]
MAX_NEW = 10


@pytest.fixture(scope="module")
def llama(tiny_llama_dir):
    """The tiny Llama with weights 10x the usual scale: its attention is sharp, so a token given
    the wrong position or the wrong cache row changes what it predicts (at the usual scale
    attention is near uniform and such mistakes would go unseen)."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")):
                weight.mul_(10.0)
    return model, tokenizer


def early_eos(model, tokenizer, rows) -> set[int]:
    """EOS ids that end the rows at different steps: the tokens some rows emit at steps 1 to 3 when
    nothing stops them (a random tiny model seldom emits its own EOS)."""
    ids, mask = _batch_tensors(rows, tokenizer.pad_token_id, True, "cpu")
    free = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=None
    )
    new = free[:, ids.shape[1] :]
    return {int(new[0, 1]), int(new[3, 2]), int(new[5, 3])}


def test_same_tokens_as_generate_and_finished_rows_leave_the_batch(llama):
    model, tokenizer = llama
    rows = [encode_prompt(tokenizer, p) for p in PROMPTS]
    eos = early_eos(model, tokenizer, rows)
    pad = tokenizer.pad_token_id
    ids, mask = _batch_tensors(rows, pad, True, "cpu")
    reference = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=MAX_NEW,
        do_sample=False,
        eos_token_id=sorted(eos),
        pad_token_id=pad,
    )[:, ids.shape[1] :].tolist()

    widths: list[int] = []
    hook = model.register_forward_pre_hook(
        lambda module, args, kwargs: widths.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    try:
        got = greedy_decode(model, ids, mask, max_new_tokens=MAX_NEW, eos_ids=eos, pad_id=pad)
    finally:
        hook.remove()

    for row, tokens in zip(reference, got):
        end = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        assert tokens == row[:end]
    lengths = sorted(len(t) for t in got)
    assert lengths[0] < MAX_NEW and lengths[-1] == MAX_NEW  # some rows ended early, one ran to the end
    # the finished rows were dropped: later steps ran on fewer rows than the batch
    assert widths[0] == len(rows) and widths[-1] < len(rows)
    assert widths == sorted(widths, reverse=True)


def both_paths(monkeypatch, model, tokenizer, prompts, **options):
    """generate_batched through inference.greedy, then through transformers' generate."""
    ours = generate_batched(model, tokenizer, prompts, max_new_tokens=MAX_NEW, **options)
    monkeypatch.setattr(decoding, "plain_greedy", lambda config: False)
    theirs = generate_batched(model, tokenizer, prompts, max_new_tokens=MAX_NEW, **options)
    monkeypatch.undo()
    return ours, theirs


@pytest.mark.parametrize("share_prefixes", [True, False])
def test_generate_batched_gives_what_generate_gives(llama, monkeypatch, share_prefixes):
    model, tokenizer = llama
    eos = early_eos(model, tokenizer, [encode_prompt(tokenizer, p) for p in PROMPTS])
    monkeypatch.setattr(decoding, "_eos_ids", lambda tokenizer, model: eos)
    ours, theirs = both_paths(monkeypatch, model, tokenizer, PROMPTS, batch_size=3, share_prefixes=share_prefixes)
    assert [(g.raw_text, g.completion_tokens, g.finish_reason) for g in ours] == [
        (g.raw_text, g.completion_tokens, g.finish_reason) for g in theirs
    ]
    assert {g.finish_reason for g in ours} == {"stop", "length"}


def test_stop_strings_and_passages_as_with_generate(llama, monkeypatch):
    model, tokenizer = llama
    free = generate_batched(model, tokenizer, PROMPTS, max_new_tokens=MAX_NEW)
    # a stop string that some rows write: the third and fourth characters of the first row's text
    stop = free[0].text[2:4] or free[0].text[:1]
    ours, theirs = both_paths(monkeypatch, model, tokenizer, PROMPTS, stop_strings=[stop], batch_size=4)
    assert [(g.text, g.completion_tokens, g.finish_reason) for g in ours] == [
        (g.text, g.completion_tokens, g.finish_reason) for g in theirs
    ]
    assert any(g.completion_tokens < MAX_NEW for g in ours)

    # free rows first: when they end and leave the batch, the constrained rows move up
    passages = [None] * 4 + ["The quick brown fox jumps over the lazy dog, and the capital of France is Paris."] * 4
    eos = early_eos(model, tokenizer, [encode_prompt(tokenizer, p) for p in PROMPTS])
    monkeypatch.setattr(decoding, "_eos_ids", lambda tokenizer, model: eos)
    ours, theirs = both_paths(monkeypatch, model, tokenizer, PROMPTS, passages=passages, batch_size=8)
    assert [g.raw_text for g in ours] == [g.raw_text for g in theirs]
    for generation in ours[4:]:
        assert generation.text.strip() in passages[4]


def test_configs_that_change_scores_keep_generate():
    assert plain_greedy(GenerationConfig(do_sample=False))
    assert not plain_greedy(GenerationConfig(do_sample=False, repetition_penalty=1.3))
    assert not plain_greedy(GenerationConfig(do_sample=False, no_repeat_ngram_size=3))
    assert not plain_greedy(GenerationConfig(do_sample=True))
