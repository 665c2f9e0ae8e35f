"""Reference perplexity with shared passages encoded once equals the plain computation (float
tolerance), for plain and peft models, and falls back to it for seq2seq models."""

from __future__ import annotations

import math
from contextlib import nullcontext

import pytest
import torch
from test_prefix_cache import PROMPTS, PrefillCounter
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

from lorakit.evaluate.perplexity import reference_perplexity
from lorakit.evaluate.shared_perplexity import reference_perplexity_shared
from lorakit.inference.decoding import encode_prompt

ANSWERS = ["Paris", "the author", "blue", "four legs", "hi", "x", "Tehran", "the sky", "", "dog", "fox"]


@pytest.fixture(scope="module")
def llama(tiny_llama_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    return model, tokenizer


@pytest.mark.parametrize("batch_size", [16, 3])
def test_shared_perplexity_equals_the_plain_one(llama, batch_size):
    model, tokenizer = llama
    expected = reference_perplexity(model, tokenizer, PROMPTS, ANSWERS, batch_size=batch_size)
    counter = PrefillCounter(model, tokenizer.pad_token_id)
    try:
        shared = reference_perplexity_shared(model, tokenizer, PROMPTS, ANSWERS, batch_size=batch_size)
    finally:
        counter.handle.remove()
    # a mean of log-probabilities in float32: a few eps of relative noise, far below any real change
    assert math.log(shared) == pytest.approx(math.log(expected), rel=1e-5)
    assert 1 < expected < 1e6
    prompt_tokens = sum(len(encode_prompt(tokenizer, p)) for p in PROMPTS)
    assert counter.tokens < prompt_tokens  # the passages were not all encoded once per question


def test_shared_perplexity_sees_the_answers(llama):
    model, tokenizer = llama
    right = reference_perplexity_shared(model, tokenizer, PROMPTS, ANSWERS)
    wrong = reference_perplexity_shared(model, tokenizer, PROMPTS, ANSWERS[1:] + ANSWERS[:1])
    assert right != pytest.approx(wrong, rel=1e-3)
    assert wrong == pytest.approx(reference_perplexity(model, tokenizer, PROMPTS, ANSWERS[1:] + ANSWERS[:1]), rel=1e-5)


def test_peft_model_and_seq2seq(llama, tiny_llama_dir, tiny_t5_dir):
    from peft import LoraConfig, get_peft_model

    _, tokenizer = llama
    torch.manual_seed(3)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(base, lora).eval()
    for context in (model.disable_adapter, nullcontext):
        with context():
            expected = reference_perplexity(model, tokenizer, PROMPTS, ANSWERS)
            assert reference_perplexity_shared(model, tokenizer, PROMPTS, ANSWERS) == pytest.approx(expected, rel=1e-5)
    t5 = AutoModelForSeq2SeqLM.from_pretrained(tiny_t5_dir).eval()
    t5_tokenizer = AutoTokenizer.from_pretrained(tiny_t5_dir)
    expected = reference_perplexity(t5, t5_tokenizer, PROMPTS, ANSWERS, task_type="seq2seq")
    assert reference_perplexity_shared(t5, t5_tokenizer, PROMPTS, ANSWERS, task_type="seq2seq") == expected
