"""Shared-prefix (cascade) attention: each group's passage is kept once and read once per group, each
row's cache holds only its own tokens, and every row's logits equal those of its prompt run whole
and alone (float tolerance), through the suffix prefill, decoding steps and rows leaving the batch;
for grouped-query and plain multi-head attention, with and without biases; calls without a shared
prefix are SDPA's, and the model's own attention comes back after the block."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from lorakit.inference import greedy
from lorakit.inference.decoding import generate_batched
from lorakit.inference.greedy import length_buckets
from lorakit.inference.prefix_cache import PrefixBatch, PrefixGroup, encode_shared_prefixes
from lorakit.inference.shared_attention import SharedPrefix, shared_attention, supports_shared_attention

EPS = torch.finfo(torch.float32).eps
PAD = 0


def tiny(kind: str, kv_heads: int):
    torch.manual_seed(0)
    common = dict(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=256,
        pad_token_id=PAD,
    )
    if kind == "qwen2":  # biases on q, k, v
        return Qwen2ForCausalLM(Qwen2Config(**common)).eval()
    model = LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=False)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)  # logits at a realistic scale, so the tolerance means something
    return model


def prompts() -> tuple[list[list[int]], PrefixBatch]:
    """Three passages of different lengths asked 3, 1 and 2 questions of different lengths."""
    g = torch.Generator().manual_seed(1)

    def ids(n):
        return torch.randint(1, 97, (n,), generator=g).tolist()

    passages = [ids(23), ids(9), ids(31)]
    encoded, rows, row_group = [], [], []
    for group, (passage, n_questions) in enumerate(zip(passages, [3, 1, 2])):
        for q in range(n_questions):
            encoded.append(passage + ids(3 + 2 * q))
            rows.append(len(encoded) - 1)
            row_group.append(group)
    groups = [PrefixGroup([i for i, gr in zip(rows, row_group) if gr == n], len(p)) for n, p in enumerate(passages)]
    return encoded, PrefixBatch(rows, groups, row_group)


def alone_logits(model, encoded: list[int], continuation: list[int]) -> torch.Tensor:
    """The last position's logits after the prompt and after each continuation token, the prompt run alone."""
    ids = torch.tensor([encoded + continuation])
    with torch.inference_mode():
        return model(input_ids=ids).logits[0, len(encoded) - 1 :]


def tolerance(reference: torch.Tensor) -> float:
    # float32 rounding at the logits' scale, through a 2-layer model: a few hundred eps
    return 300 * EPS * float(reference.abs().max())


def prefill_questions(model, encoded, batch):
    """The batch's questions through the model after their passages (encoded once): the output,
    the questions' mask, the SharedPrefix and each row's position offset."""
    suffix_ids, suffix_mask, shared = encode_shared_prefixes(model, encoded, batch, PAD, "cpu")
    offsets = shared.position_offsets("cpu")
    positions = (suffix_mask.cumsum(-1) - 1).clamp(min=0) + offsets[:, None]
    out = model(
        input_ids=suffix_ids, attention_mask=suffix_mask, position_ids=positions, use_cache=True, shared_prefix=shared
    )
    return out, suffix_mask, shared, offsets


@pytest.mark.parametrize("kind,kv_heads", [("llama", 2), ("llama", 4), ("qwen2", 2)])
def test_every_row_gets_the_logits_of_its_prompt_alone(kind, kv_heads):
    model = tiny(kind, kv_heads)
    assert supports_shared_attention(model)
    encoded, batch = prompts()
    steps = [[1 + (5 + 3 * r + 7 * k) % 90 for k in range(3)] for r in range(len(batch.rows))]  # an answer per row
    with torch.inference_mode(), shared_attention(model):
        out, suffix_mask, shared, offsets = prefill_questions(model, encoded, batch)
        assert shared.keys[0].shape[0] == 3  # one copy per passage, not per row
        got = [[out.logits[r, -1]] for r in range(len(batch.rows))]
        cache, mask, next_position = out.past_key_values, suffix_mask, suffix_mask.sum(-1) + offsets
        assert cache.get_seq_length() == suffix_mask.shape[1]  # the rows' caches hold no passage
        for k in range(3):
            tokens = torch.tensor([s[k] for s in steps])
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            out = model(
                input_ids=tokens[:, None],
                attention_mask=mask,
                position_ids=next_position[:, None],
                past_key_values=cache,
                use_cache=True,
                shared_prefix=shared,
            )
            next_position = next_position + 1
            for r in range(len(batch.rows)):
                got[r].append(out.logits[r, -1])
    for r, index in enumerate(batch.rows):  # the model's own attention again
        reference = alone_logits(model, encoded[index], steps[r])
        assert torch.allclose(torch.stack(got[r]), reference, rtol=0, atol=tolerance(reference)), (kind, r)


def test_rows_leaving_the_batch_keep_their_logits():
    model = tiny("llama", 2)
    encoded, batch = prompts()
    keep = [0, 2, 5]  # a whole group (row 3) and one row of each other group leave
    with torch.inference_mode(), shared_attention(model):
        out, suffix_mask, shared, offsets = prefill_questions(model, encoded, batch)
        cache = out.past_key_values
        cache.batch_select_indices(torch.tensor(keep))
        shared.keep_rows(keep)
        assert shared.spans == [(0, 0, 2), (2, 2, 3)]
        mask = torch.cat([suffix_mask[keep], torch.ones(len(keep), 1, dtype=torch.long)], dim=1)
        position = (suffix_mask.sum(-1) + offsets)[keep]
        out = model(
            input_ids=torch.full((len(keep), 1), 9),
            attention_mask=mask,
            position_ids=position[:, None],
            past_key_values=cache,
            use_cache=True,
            shared_prefix=shared,
        )
    for r, row in enumerate(keep):
        reference = alone_logits(model, encoded[batch.rows[row]], [9])[-1]
        assert torch.allclose(out.logits[r, -1], reference, rtol=0, atol=tolerance(reference))


def test_without_a_shared_prefix_it_is_sdpa_and_the_models_attention_comes_back():
    model = tiny("llama", 2)
    ids = torch.randint(1, 97, (2, 12), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    before = model.config._attn_implementation
    with torch.inference_mode():
        reference = model(input_ids=ids, attention_mask=mask).logits
        with shared_attention(model):
            assert model.config._attn_implementation != before
            plain = model(input_ids=ids, attention_mask=mask).logits
        assert model.config._attn_implementation == before
        with pytest.raises(RuntimeError), shared_attention(model):
            raise RuntimeError("a failure inside the block")
    assert model.config._attn_implementation == before
    assert torch.equal(plain[0], reference[0]) and torch.equal(plain[1, 4:], reference[1, 4:])


def test_rows_of_a_group_must_be_neighbours():
    keys = [torch.zeros(2, 1, 4, 8)]
    with pytest.raises(ValueError, match="neighbours"):
        SharedPrefix(keys, keys, [4, 4], [0, 1, 0])


def test_models_outside_the_covered_attention_keep_the_copy_path(tiny_t5_dir):
    from transformers import AutoModelForSeq2SeqLM, GPT2Config, GPT2LMHeadModel

    assert not supports_shared_attention(AutoModelForSeq2SeqLM.from_pretrained(tiny_t5_dir))
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    assert not supports_shared_attention(gpt2)


def test_length_buckets_cut_only_where_padding_costs_more_than_a_forward_pass():
    lengths = [3, 30, 4, 31, 5]
    assert length_buckets(lengths, overhead=10) == [[0, 2, 4], [1, 3]]  # each bucket in row order
    assert length_buckets(lengths, overhead=1000) == [[0, 1, 2, 3, 4]]
    assert length_buckets([7, 7, 7], overhead=0) == [[0, 1, 2]]
    assert sorted(i for b in length_buckets(lengths, overhead=0) for i in b) == [0, 1, 2, 3, 4]


def test_questions_prefilled_in_length_buckets_get_the_answers_they_get_alone(tiny_llama_dir, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    passage = "The quick brown fox jumps over the lazy dog 0123456789, and the capital of France is Paris. " * 2
    questions = ["Who?", "What is the capital of France, and who wrote the book about the fox?", "Why", "Is it?"]
    prompts = [f"### Context: {passage}\n### Question: {q}" for q in questions]
    alone = [generate_batched(model, tokenizer, [p], max_new_tokens=6)[0] for p in prompts]
    forwards = []
    hook = model.get_input_embeddings().register_forward_hook(
        lambda module, args, output: forwards.append(args[0].shape) if args[0].shape[1] > 1 else None
    )
    monkeypatch.setattr(greedy, "POSITIONS_PER_FORWARD", 0)  # every saving of padding is worth a bucket
    try:
        together = generate_batched(model, tokenizer, prompts, max_new_tokens=6)
    finally:
        hook.remove()
    assert [(g.raw_text, g.completion_tokens) for g in together] == [(g.raw_text, g.completion_tokens) for g in alone]
    # one forward for the passage, then the questions in more than one bucket, none padded to the longest
    suffixes = forwards[1:]
    assert len(suffixes) > 1
    assert sum(rows * width for rows, width in suffixes) < len(prompts) * max(width for _, width in suffixes)
