"""Batched generation: same greedy outputs as one at a time, stop strings and EOS end rows,
finish reasons, streaming, answer extraction and reference perplexity."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

from lorakit.evaluate.answers import extract_answer
from lorakit.evaluate.perplexity import reference_perplexity
from lorakit.inference.decoding import encode_prompt, generate_batched, stream_generate

PROMPTS = [
    "### Question: What is the capital of France?\n### Answer:",
    "hello",
    "Human: hello there\nAssistant:",
    "The quick brown fox jumps over the lazy dog 0123456789 , . ; :",
    "پایتخت ایران تهران است. کتاب را چه کسی نوشت؟",
    "Who wrote the book?",
]
MAX_NEW = 10


@pytest.fixture(scope="module")
def llama(tiny_llama_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    return model, tokenizer


@pytest.fixture(scope="module")
def t5(tiny_t5_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_t5_dir)
    model = AutoModelForSeq2SeqLM.from_pretrained(tiny_t5_dir).eval()
    return model, tokenizer


@pytest.fixture(scope="module")
def free_outputs(llama):
    """Each prompt generated alone (no padding at all): the reference for batching."""
    model, tokenizer = llama
    return [generate_batched(model, tokenizer, [p], max_new_tokens=MAX_NEW)[0] for p in PROMPTS]


def test_batched_greedy_equals_one_at_a_time_in_prompt_order(llama, free_outputs):
    model, tokenizer = llama
    batched = generate_batched(model, tokenizer, PROMPTS, max_new_tokens=MAX_NEW, batch_size=4)
    assert [g.text for g in batched] == [g.text for g in free_outputs]
    assert [g.prompt_tokens for g in batched] == [len(encode_prompt(tokenizer, p)) for p in PROMPTS]
    assert len({g.text for g in batched}) > 1  # the comparison means something


def test_padding_side_is_left_alone(llama):
    model, tokenizer = llama
    tokenizer.padding_side = "right"
    generate_batched(model, tokenizer, PROMPTS[:3], max_new_tokens=3)
    assert tokenizer.padding_side == "right"


def test_rows_without_eos_finish_by_length(llama, free_outputs):
    # the random tiny model never emits its EOS within a few tokens
    assert all(g.finish_reason == "length" and g.completion_tokens == MAX_NEW for g in free_outputs)


def test_stop_string_stops_only_its_row(llama, free_outputs):
    model, tokenizer = llama
    first, second = free_outputs[0].text, free_outputs[3].text
    # a stop string that occurs in the first row's output after its start, but not in the second's
    stop = next(
        first[i : i + 2]
        for i in range(1, len(first) - 1)
        if first[i : i + 2].strip() and first[i : i + 2] not in second
    )
    out = generate_batched(model, tokenizer, [PROMPTS[0], PROMPTS[3]], max_new_tokens=MAX_NEW, stop_strings=[stop])
    assert out[0].text == first[: first.index(stop)]
    assert out[0].finish_reason == "stop" and out[0].completion_tokens < MAX_NEW
    assert stop in out[0].raw_text
    assert out[1].text == second and out[1].finish_reason == "length"


def test_eos_ends_a_row_with_reason_stop(llama):
    model, tokenizer = llama
    prompt = torch.tensor([encode_prompt(tokenizer, PROMPTS[1])])
    greedy = model.generate(prompt, max_new_tokens=3, do_sample=False)[0, prompt.shape[1] :].tolist()
    # pretend the third greedy token is EOS: the row must end right there, the other goes on
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = greedy[2]
    try:
        out = generate_batched(model, tokenizer, [PROMPTS[1], PROMPTS[3]], max_new_tokens=MAX_NEW)
    finally:
        model.generation_config.eos_token_id = saved
    assert out[0].finish_reason == "stop"
    assert out[0].completion_tokens == greedy.index(greedy[2]) + 1
    assert out[1].completion_tokens > out[0].completion_tokens


def test_seq2seq_batched_equals_one_at_a_time(t5):
    model, tokenizer = t5
    single = [generate_batched(model, tokenizer, [p], task_type="seq2seq", max_new_tokens=6)[0] for p in PROMPTS]
    batched = generate_batched(model, tokenizer, PROMPTS, task_type="seq2seq", max_new_tokens=6, batch_size=3)
    assert [g.raw_text for g in batched] == [g.raw_text for g in single]
    assert all(g.completion_tokens <= 6 for g in batched)


def test_sampling_is_reproducible_with_a_seed(llama):
    model, tokenizer = llama
    a = generate_batched(model, tokenizer, PROMPTS[:3], max_new_tokens=8, temperature=1.5, seed=7)
    b = generate_batched(model, tokenizer, PROMPTS[:3], max_new_tokens=8, temperature=1.5, seed=7)
    c = generate_batched(model, tokenizer, PROMPTS[:3], max_new_tokens=8, temperature=1.5, seed=8)
    assert [g.text for g in a] == [g.text for g in b]
    assert [g.text for g in a] != [g.text for g in c]


def test_stream_joins_to_the_batched_text(llama, free_outputs):
    model, tokenizer = llama
    pieces = list(stream_generate(model, tokenizer, PROMPTS[3], max_new_tokens=MAX_NEW))
    assert len(pieces) > 1
    assert "".join(pieces) == free_outputs[3].text


def test_stream_stops_at_a_stop_string(llama, free_outputs):
    model, tokenizer = llama
    text = free_outputs[3].text
    stop = text[3:5]
    joined = "".join(stream_generate(model, tokenizer, PROMPTS[3], max_new_tokens=MAX_NEW, stop_strings=[stop]))
    assert joined == text[: text.index(stop)]
    # a reader that goes away early does not leave the generation running
    stream = stream_generate(model, tokenizer, PROMPTS[3], max_new_tokens=200)
    next(stream)
    stream.close()


@pytest.mark.parametrize(
    "raw, stops, expected",
    [
        (" Paris", (), "Paris"),
        ("Paris<|im_end|>\n<|im_start|>user", (), "Paris"),
        ("Paris</s>", (), "Paris"),
        ("Paris<|endoftext|>garbage", (), "Paris"),
        ("Answer: Paris", (), "Paris"),
        ("A: Paris", (), "Paris"),
        ("### Answer: Paris", (), "Paris"),
        ("Assistant: Paris", (), "Paris"),
        ('"Paris"', (), "Paris"),
        ("“Paris”", (), "Paris"),
        ("<think>it is in France</think> Paris", (), "Paris"),
        ("<think>thinking forever and never closing", (), ""),
        ("Paris\n### Question: what next?", ("### Question:",), "Paris"),
        ("Paris\nHuman: thanks", ("\nHuman:",), "Paris"),
        ("  the author  ", (), "the author"),
        ("Answers differ", (), "Answers differ"),  # "A" inside a word is not a prefix
        ("تهران<|im_end|>", (), "تهران"),
    ],
)
def test_extract_answer(raw, stops, expected):
    assert extract_answer(raw, stops) == expected


def _hf_perplexity(model, tokenizer, prompt: str, answer: str) -> float:
    """Independent check: transformers' own loss with the prompt masked out."""
    prompt_ids = encode_prompt(tokenizer, prompt)
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = torch.tensor([prompt_ids + answer_ids])
    labels = torch.tensor([[-100] * len(prompt_ids) + answer_ids])
    with torch.no_grad():
        return math.exp(model(input_ids=ids, labels=labels).loss.item())


def test_reference_perplexity_counts_only_answer_tokens(llama, free_outputs):
    model, tokenizer = llama
    ours = reference_perplexity(model, tokenizer, [PROMPTS[0]], ["Paris"])
    # float32 sums in another order differ by ~1e-6 relative; 1e-4 is 100x that, far below a wrong token count
    assert ours == pytest.approx(_hf_perplexity(model, tokenizer, PROMPTS[0], "Paris"), rel=1e-4)
    # batching (with padding) does not change the number
    pair = reference_perplexity(model, tokenizer, PROMPTS[:2], ["Paris", "hi there"], batch_size=2)
    singles = reference_perplexity(model, tokenizer, PROMPTS[:2], ["Paris", "hi there"], batch_size=1)
    assert pair == pytest.approx(singles, rel=1e-4)
    # the model's own greedy continuation is far less surprising than an arbitrary answer
    own = reference_perplexity(model, tokenizer, [PROMPTS[3]], [free_outputs[3].text])
    other = reference_perplexity(model, tokenizer, [PROMPTS[3]], ["Paris is the capital of France"])
    assert own < other


def test_reference_perplexity_seq2seq(t5):
    model, tokenizer = t5
    value = reference_perplexity(
        model, tokenizer, PROMPTS[:3], ["Paris", "hi", "dog"], task_type="seq2seq", batch_size=2
    )
    assert math.isfinite(value) and value > 1
