"""A passage shared by several prompts is encoded once and its cache reused: the greedy answers are
token for token those of each prompt generated alone, for plain and peft models, with stop
strings, with groups split across batches; seq2seq, sampling and models whose cache cannot be
copied keep the plain path; the grouping finds passages and leaves unrelated prompts alone."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, MistralConfig, MistralForCausalLM

from lorakit.inference import prefix_cache
from lorakit.inference.decoding import encode_prompt, generate_batched
from lorakit.inference.prefix_cache import MAX_SHARED_ROWS, PrefixGroup, group_by_prefix, prefix_batches

PASSAGES = [
    "The quick brown fox jumps over the lazy dog 0123456789, and the capital of France is Paris. " * 2,
    "Human: hello there Assistant: hi, how can I help you today? The author wrote the book. " * 2,
    "پایتخت ایران تهران است. کتاب را چه کسی نوشت؟ The sky is blue and a dog has four legs. " * 2,
]
QUESTIONS = ["Who wrote the book?", "What is the capital of France?", "hello", "What color is the sky?"]
# three passages with 4, 3 and 2 questions, and two prompts that share nothing long with anyone
PROMPTS = (
    [f"### Context: {PASSAGES[0]}\n### Question: {q}" for q in QUESTIONS]
    + [f"### Context: {PASSAGES[1]}\n### Question: {q}" for q in QUESTIONS[:3]]
    + [f"### Context: {PASSAGES[2]}\n### Question: {q}" for q in QUESTIONS[1:3]]
    + ["Who wrote the book?", "The quick brown fox"]
)
MAX_NEW = 8


@pytest.fixture(scope="module")
def llama(tiny_llama_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    return model, tokenizer


# Token-exact comparisons are safe here: alone, the greedy top-1 logit of these prompts leads the
# runner-up by at least 0.01 at every step, while the shared path's logits differ from the solo ones
# by about 3e-6 (float32 noise at a logit scale of 11): over 1000x apart.


def ids_of(generations) -> list[tuple[str, int]]:
    """raw_text holds every generated token (specials included); with the count it pins the ids."""
    return [(g.raw_text, g.completion_tokens) for g in generations]


def alone(model, tokenizer, prompts, **options):
    return [generate_batched(model, tokenizer, [p], max_new_tokens=MAX_NEW, **options)[0] for p in prompts]


class PrefillCounter:
    """Counts the prompt tokens (padding left out) embedded by forward passes over more than one
    position: what prefill computes."""

    def __init__(self, model, pad_id):
        self.tokens, self.pad_id = 0, pad_id
        self.handle = model.get_input_embeddings().register_forward_hook(self.hook)

    def hook(self, module, args, output):
        if args[0].shape[1] > 1:
            self.tokens += int((args[0] != self.pad_id).sum())


def test_grouping_finds_each_passage_and_leaves_the_rest_alone(llama):
    _, tokenizer = llama
    encoded = [encode_prompt(tokenizer, p) for p in PROMPTS]
    groups = group_by_prefix(encoded)
    by_members = sorted(sorted(g.members) for g in groups)
    assert by_members == [[0, 1, 2, 3], [4, 5, 6], [7, 8], [9], [10]]
    for group in groups:
        if len(group.members) > 1:
            first = encoded[group.members[0]]
            passage = len(encode_prompt(tokenizer, PROMPTS[group.members[0]].split("\n### Question")[0]))
            # the passage (up to the question's first differing token) is shared, and every row keeps a suffix
            assert group.length >= passage - 1
            assert all(encoded[i][: group.length] == first[: group.length] for i in group.members)
            assert all(len(encoded[i]) > group.length for i in group.members)


def test_grouping_edge_cases():
    passage = list(range(100, 160))
    # a prompt that is another's prefix, and a duplicate: the shared part stops one token short
    groups = group_by_prefix([passage, passage + [1, 2], passage])
    assert [sorted(g.members) for g in groups] == [[0, 1, 2]] and groups[0].length == len(passage) - 1
    # a lone question on passage A next to passage B's questions: B keeps its whole passage
    other = list(range(200, 260))
    groups = group_by_prefix([[7] * 20 + passage + [1], [7] * 20 + other + [1], [7] * 20 + other + [2]])
    assert sorted((sorted(g.members), g.length) for g in groups) == [([0], 0), ([1, 2], 80)]
    # a short common start (a system prompt) is not worth a separate prefill
    assert all(len(g.members) == 1 for g in group_by_prefix([[5] * 10 + [1, 2], [5] * 10 + [3, 4]]))


def test_batches_are_full_and_keep_each_rows_group():
    groups = [PrefixGroup([0, 1, 2], 40), PrefixGroup([3, 4], 90), PrefixGroup([5, 6, 7], 10)]
    batches = prefix_batches(groups, 3)
    assert [b.rows for b in batches] == [[3, 4, 0], [1, 2, 5], [6, 7]]  # longest prefix first
    for batch in batches:
        for row, g in zip(batch.rows, batch.row_group):
            assert row in batch.groups[g].members


def test_rows_that_read_their_passage_once_fill_the_cache_room_of_batch_size_prompts():
    # 3 passages of 100 tokens, 10 questions each (own tokens 10..19), 8 new tokens per answer
    groups = [PrefixGroup(list(range(10 * p, 10 * p + 10)), 100) for p in range(3)]
    lengths = [100 + 10 + i % 10 for i in range(30)]
    room = 4 * (sum(lengths) / 30 + 8)  # the cache 4 average prompts with their answers would hold
    batches = prefix_batches(groups, 4, lengths=lengths, new_tokens=8)
    assert sorted(i for b in batches for i in b.rows) == list(range(30))

    def held(batch):  # each passage once, each question's own tokens and its answer
        return sum(g.length for g in batch.groups) + sum(lengths[i] - 100 + 8 for i in batch.rows)

    for batch in batches:
        assert held(batch) <= room
        for row, g in zip(batch.rows, batch.row_group):
            assert row in batch.groups[g].members
    assert max(len(b.rows) for b in batches) > 4  # a passage counted once leaves room for more questions
    # full batches: the next row would not have fitted
    for batch, after in zip(batches, batches[1:]):
        first = after.rows[0]
        extra = lengths[first] - 100 + 8 + (0 if after.groups[0] in batch.groups else 100)
        assert held(batch) + extra > room
    # a row larger than the room still gets a batch of its own; the row cap holds
    assert [b.rows for b in prefix_batches([PrefixGroup([0, 1], 100)], 1, lengths=[900, 900])] == [[0], [1]]
    many = prefix_batches([PrefixGroup(list(range(600)), 20)], 600, lengths=[21] * 600)
    assert [len(b.rows) for b in many] == [MAX_SHARED_ROWS, MAX_SHARED_ROWS, 600 - 2 * MAX_SHARED_ROWS]


@pytest.mark.parametrize("read_once", [True, False], ids=["passage-read-once", "passage-copied-per-row"])
@pytest.mark.parametrize("batch_size", [16, 3])
def test_shared_prefix_answers_equal_each_prompt_alone(llama, batch_size, read_once, monkeypatch):
    model, tokenizer = llama
    if not read_once:  # the path of models shared_attention does not cover
        monkeypatch.setattr("lorakit.inference.decoding.supports_shared_attention", lambda model: False)
    reference = alone(model, tokenizer, PROMPTS)
    counter = PrefillCounter(model, tokenizer.pad_token_id)
    try:
        shared = generate_batched(model, tokenizer, PROMPTS, max_new_tokens=MAX_NEW, batch_size=batch_size)
    finally:
        counter.handle.remove()
    assert ids_of(shared) == ids_of(reference)
    assert [g.prompt_tokens for g in shared] == [len(encode_prompt(tokenizer, p)) for p in PROMPTS]
    assert len({g.text for g in shared[:4]}) > 2  # the questions on one passage get different answers
    plain = generate_batched(model, tokenizer, PROMPTS, max_new_tokens=MAX_NEW, share_prefixes=False)
    assert ids_of(plain) == ids_of(reference)
    # each shared prefix went through the model once per batch it appears in, then only suffixes
    encoded = [encode_prompt(tokenizer, p) for p in PROMPTS]
    groups = [g for g in group_by_prefix(encoded) if len(g.members) > 1]
    lengths = [len(e) for e in encoded] if read_once else None  # as generate_batched batches them
    batches = prefix_batches(groups, batch_size, lengths=lengths, new_tokens=MAX_NEW)
    prefixes = sum(g.length for b in batches for g in b.groups)
    total = sum(len(e) for e in encoded)
    assert counter.tokens == total - sum(g.length * len(g.members) for g in groups) + prefixes
    if batch_size >= len(PROMPTS):  # one batch: every passage encoded exactly once
        assert prefixes == sum(g.length for g in groups) and counter.tokens < total * 0.6


def test_stop_strings_and_eos_end_rows_on_the_shared_path(llama):
    model, tokenizer = llama
    reference = alone(model, tokenizer, PROMPTS[:4])
    text = reference[1].text
    stop = next(text[i : i + 2] for i in range(1, len(text) - 1) if text[i : i + 2].strip())
    expected = alone(model, tokenizer, PROMPTS[:4], stop_strings=[stop])
    shared = generate_batched(model, tokenizer, PROMPTS[:4], max_new_tokens=MAX_NEW, stop_strings=[stop])
    assert [g.text for g in shared] == [g.text for g in expected]
    assert [g.finish_reason for g in shared] == [g.finish_reason for g in expected]
    assert shared[1].finish_reason == "stop" and shared[1].text == text[: text.index(stop)]
    # a token only the second row generates, made EOS: that row ends there, the others go on
    greedy = []
    for text_prompt in PROMPTS[:4]:
        prompt = torch.tensor([encode_prompt(tokenizer, text_prompt)])
        greedy.append(model.generate(prompt, max_new_tokens=MAX_NEW, do_sample=False)[0, prompt.shape[1] :].tolist())
    others = {t for n, row in enumerate(greedy) if n != 1 for t in row}
    end = next(k for k in range(1, MAX_NEW) if greedy[1][k] not in others and greedy[1][k] not in greedy[1][:k])
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = greedy[1][end]
    try:
        expected = alone(model, tokenizer, PROMPTS[:4])
        shared = generate_batched(model, tokenizer, PROMPTS[:4], max_new_tokens=MAX_NEW)
    finally:
        model.generation_config.eos_token_id = saved
    assert ids_of(shared) == ids_of(expected)
    assert [g.finish_reason for g in shared] == [g.finish_reason for g in expected]
    assert expected[1].finish_reason == "stop" and expected[1].completion_tokens == end + 1
    assert all(g.completion_tokens == MAX_NEW for n, g in enumerate(expected) if n != 1)


def test_peft_model_with_and_without_its_adapter(llama, tiny_llama_dir):
    from peft import LoraConfig, get_peft_model

    _, tokenizer = llama
    torch.manual_seed(3)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(base, lora).eval()
    with_adapter = generate_batched(model, tokenizer, PROMPTS, max_new_tokens=MAX_NEW)
    assert ids_of(with_adapter) == ids_of(alone(model, tokenizer, PROMPTS))
    with model.disable_adapter():
        without = generate_batched(model, tokenizer, PROMPTS, max_new_tokens=MAX_NEW)
        assert ids_of(without) == ids_of(alone(model, tokenizer, PROMPTS))
    assert ids_of(with_adapter) != ids_of(without)


def test_sampling_and_seq2seq_never_take_the_shared_path(llama, tiny_t5_dir, monkeypatch):
    from transformers import AutoModelForSeq2SeqLM

    calls = []
    for name in ("encode_prefixes", "encode_shared_prefixes"):  # copied per row, or read once per group
        real = getattr(prefix_cache, name)
        monkeypatch.setattr(f"lorakit.inference.decoding.{name}", lambda *a, real=real: calls.append(1) or real(*a))
    model, tokenizer = llama
    generate_batched(model, tokenizer, PROMPTS[:4], max_new_tokens=2, temperature=1.0, seed=0)
    assert calls == []
    t5 = AutoModelForSeq2SeqLM.from_pretrained(tiny_t5_dir).eval()
    t5_tokenizer = AutoTokenizer.from_pretrained(tiny_t5_dir)
    generate_batched(t5, t5_tokenizer, PROMPTS[:4], task_type="seq2seq", max_new_tokens=2)
    assert calls == []
    generate_batched(model, tokenizer, PROMPTS[:4], max_new_tokens=2)
    assert calls == [1]


def test_a_cache_that_cannot_be_copied_falls_back_to_the_plain_path(llama, monkeypatch):
    _, tokenizer = llama
    torch.manual_seed(0)
    config = MistralConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        sliding_window=16,  # a sliding-window cache keeps only the last 16 positions
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = MistralForCausalLM(config).eval()
    prepared = []
    for name in ("encode_prefixes", "encode_shared_prefixes"):
        real = getattr(prefix_cache, name)
        monkeypatch.setattr(
            f"lorakit.inference.decoding.{name}", lambda *a, real=real: prepared.append(out := real(*a)) or out
        )
    shared = generate_batched(model, tokenizer, PROMPTS, max_new_tokens=MAX_NEW, batch_size=4)
    assert prepared == [None]  # tried once, then every row the plain way
    assert ids_of(shared) == ids_of(alone(model, tokenizer, PROMPTS))


def test_preallocated_cache_layer_writes_in_place_then_concatenates_past_its_room():
    layer_class = prefix_cache._preallocated_layer_class()
    keys, values = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4)
    layer = layer_class(keys, values, capacity=7)
    buffer = layer.key_buffer
    new_keys, new_values = torch.randn(2, 3, 2, 4), torch.randn(2, 3, 2, 4)
    k, v = layer.update(new_keys, new_values)
    assert k.data_ptr() == buffer.data_ptr()  # written into the buffer, not a new tensor
    assert torch.equal(k, torch.cat([keys, new_keys], dim=2)) and torch.equal(v, torch.cat([values, new_values], 2))
    assert layer.get_seq_length() == 7
    more = torch.randn(2, 3, 1, 4)
    k, v = layer.update(more, more)  # no room left: the plain DynamicLayer way
    assert torch.equal(k, torch.cat([keys, new_keys, more], dim=2)) and layer.get_seq_length() == 8
    k, v = layer.update(more, more)
    assert torch.equal(v, torch.cat([values, new_values, more, more], dim=2))


def test_models_with_their_own_cache_implementation_keep_the_plain_path(llama, monkeypatch):
    model, tokenizer = llama
    assert prefix_cache.can_share_prefixes(model)
    monkeypatch.setattr(model.generation_config, "cache_implementation", "static")
    assert not prefix_cache.can_share_prefixes(model)  # generate refuses a cache given alongside its own
