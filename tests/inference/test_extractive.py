"""Extractive decoding: every way a span of the passage can be written is reachable token by
token, anything else is blocked, EOS ends an answer, and generation keeps inside the passage on
the plain, shared-prefix and seq2seq paths, with passages of different lengths in one batch."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

from lorakit.inference import decoding
from lorakit.inference.decoding import generate_batched
from lorakit.inference.extractive import ExtractiveSpans, span_vocabulary

ENGLISH = "What is the capital of France? The capital of France is Paris."
PERSIAN = "پایتخت ایران تهران است."
NO_ANSWER = "unanswerable"


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir):
    return AutoTokenizer.from_pretrained(tiny_llama_dir)


@pytest.fixture(scope="module")
def llama(tiny_llama_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()


def walk(tokenizer, passage: str, ids: list[int], no_answer: str | None = NO_ANSWER) -> tuple[bool, bool]:
    """(every token of `ids` was allowed in turn, EOS was allowed after the last one): the
    processor driven the way generate drives it, one step per token."""
    eos = tokenizer.eos_token_id
    processor = ExtractiveSpans(span_vocabulary(tokenizer), [passage], no_answer, [eos])
    sequence = torch.tensor([[eos]])  # the prompt: its content does not matter to the processor
    for token in ids:
        scores = processor(sequence, torch.zeros(1, len(tokenizer)))
        if not torch.isfinite(scores[0, token]):
            return False, False
        sequence = torch.cat([sequence, torch.tensor([[token]])], dim=1)
    scores = processor(sequence, torch.zeros(1, len(tokenizer)))
    return True, bool(torch.isfinite(scores[0, eos]))


def ids_of(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def in_passage_ids(tokenizer, passage: str, span: str) -> list[int]:
    """The passage's own tokens that cover `span` (with the space before it), as the prompt has them."""
    encoded = tokenizer(passage, add_special_tokens=False, return_offsets_mapping=True)
    start = passage.index(span)
    start -= passage[start - 1 : start] == " "
    end = start + len(span) + (passage[start] == " ")
    return [t for t, (a, b) in zip(encoded["input_ids"], encoded["offset_mapping"]) if a >= start and b <= end]


@pytest.mark.parametrize(
    ("passage", "span"),
    [
        (ENGLISH, "What is"),  # the passage's start
        (ENGLISH, "capital of France"),  # the middle
        (ENGLISH, "Paris."),  # the end
        (ENGLISH, "Paris"),
        (PERSIAN, "پایتخت"),  # non-ASCII: at the start
        (PERSIAN, "تهران"),  # the middle
        (PERSIAN, "است."),  # the end
    ],
)
def test_a_gold_span_is_reachable_however_it_is_tokenized(tokenizer, passage, span):
    ways = {
        "alone": ids_of(tokenizer, span),
        "with a leading space": ids_of(tokenizer, " " + span),
    }
    if passage.index(span) > 0:
        ways["as the passage tokenizes it"] = in_passage_ids(tokenizer, passage, span)
    for how, ids in ways.items():
        assert walk(tokenizer, passage, ids) == (True, True), f"{span!r} {how}: {tokenizer.convert_ids_to_tokens(ids)}"


def test_the_tokenizations_really_differ(tokenizer):
    # what makes the test above mean something: a span alone is not the passage's own tokens
    assert ids_of(tokenizer, "Paris") != in_passage_ids(tokenizer, ENGLISH, "Paris")
    assert ids_of(tokenizer, "تهران") != in_passage_ids(tokenizer, PERSIAN, "تهران")


@pytest.mark.parametrize(
    "text",
    ["London", "Paris is", "capital  of", "Paris.x", "  Paris", "France? The capital of Iran", "تهران ایران"],
)
def test_what_is_not_a_span_is_blocked(tokenizer, text):
    passage = PERSIAN if "ا" in text else ENGLISH
    assert walk(tokenizer, passage, ids_of(tokenizer, text))[0] is False


def test_eos_needs_an_answer_and_whole_characters(tokenizer):
    eos = tokenizer.eos_token_id
    vocab = span_vocabulary(tokenizer)
    processor = ExtractiveSpans(vocab, [PERSIAN], NO_ANSWER, [eos])
    first = processor(torch.tensor([[eos]]), torch.zeros(1, len(tokenizer)))
    assert not torch.isfinite(first[0, eos])  # an empty answer is not a span
    # the first byte of "ت" alone: its second byte may follow, EOS may not
    te = "ت".encode()
    half = vocab.ids_by_bytes[te[:1]][0]
    assert walk(tokenizer, PERSIAN, [half])[1] is False
    assert walk(tokenizer, PERSIAN, [half, vocab.ids_by_bytes[te[1:]][0]]) == (True, True)


def test_the_no_answer_text_is_allowed_whole_and_only_whole(tokenizer):
    for text in (NO_ANSWER, " " + NO_ANSWER):
        assert walk(tokenizer, ENGLISH, ids_of(tokenizer, text)) == (True, True)
    assert walk(tokenizer, ENGLISH, ids_of(tokenizer, "unans")) == (True, False)
    assert walk(tokenizer, ENGLISH, ids_of(tokenizer, NO_ANSWER), no_answer=None)[0] is False


def is_span(text: str, passage: str) -> bool:
    return bool(text.strip()) and (text in passage or text.removeprefix(" ") in passage or text.strip() == NO_ANSWER)


PASSAGES = [
    "The capital of France is Paris.",
    "پایتخت ایران تهران است. کتاب را چه کسی نوشت؟",
    "The quick brown fox jumps over the lazy dog 0123456789, then the fox jumps again over the dog.",
]


def check_rows(generations, passages, max_new):
    for generation, passage in zip(generations, passages):
        assert is_span(generation.text, passage), (generation.text, passage)
        assert generation.finish_reason == "stop" or generation.completion_tokens == max_new


@pytest.mark.parametrize("share_prefixes", [False, True])
def test_batched_generation_stays_inside_each_rows_passage(llama, tokenizer, monkeypatch, share_prefixes):
    # three passages of different lengths, two questions each, plus a free row in the same batch
    prompts = [f"Context: {p}\nQuestion: {q}?\nAnswer:" for p in PASSAGES for q in ("who", "what")]
    passages = [p for p in PASSAGES for _ in range(2)]
    shared = []
    for name in ("encode_prefixes", "encode_shared_prefixes"):  # passage copied per row, or read once
        original = getattr(decoding, name)
        monkeypatch.setattr(decoding, name, lambda *a, original=original: shared.append(1) or original(*a))
    free = generate_batched(llama, tokenizer, prompts, max_new_tokens=10, share_prefixes=False)
    assert not all(is_span(g.text, p) for g, p in zip(free, passages)), "the random model must need the constraint"
    kept = generate_batched(
        llama,
        tokenizer,
        prompts + ["Question: free row?"],
        max_new_tokens=10,
        batch_size=4,
        passages=passages + [None],
        no_answer=NO_ANSWER,
        share_prefixes=share_prefixes,
    )
    assert bool(shared) is share_prefixes  # the shared-prefix path was taken when asked for
    check_rows(kept, passages, 10)
    alone = generate_batched(llama, tokenizer, ["Question: free row?"], max_new_tokens=10)[0]
    assert kept[-1].text == alone.text  # a row without a passage is left free


def test_a_row_stops_at_eos_once_its_passage_is_used_up(llama, tokenizer):
    # "Paris" and "none" are the only texts; after either, EOS is the only token left
    out = generate_batched(
        llama,
        tokenizer,
        ["Answer:", "Q: where? Answer:"],
        max_new_tokens=16,
        passages=["Paris", "Paris"],
        no_answer="none",
    )
    for generation in out:
        assert generation.finish_reason == "stop" and generation.raw_text.endswith(tokenizer.eos_token)
        assert generation.text.strip() and (generation.text.strip() in "Paris" or generation.text.strip() == "none")


def test_seq2seq_and_streaming_stay_inside_the_passage(tiny_t5_dir, llama, tokenizer):
    t5 = AutoModelForSeq2SeqLM.from_pretrained(tiny_t5_dir).eval()
    t5_tokenizer = AutoTokenizer.from_pretrained(tiny_t5_dir)
    prompts = [f"question: what? context: {p}" for p in PASSAGES]
    out = generate_batched(
        t5, t5_tokenizer, prompts, task_type="seq2seq", max_new_tokens=10, passages=PASSAGES, no_answer=NO_ANSWER
    )
    check_rows(out, PASSAGES, 10)
    streamed = "".join(
        decoding.stream_generate(
            llama, tokenizer, "Context: x\nAnswer:", max_new_tokens=10, passage=PASSAGES[2], no_answer=NO_ANSWER
        )
    )
    assert is_span(streamed, PASSAGES[2])


def test_sentencepiece_style_tokens_are_read_as_bytes():
    """A Metaspace tokenizer (SentencePiece-style "▁", as T5 and Llama 2 have) spells "▁Paris" as
    " Paris"; a character it does not know splits the passage, and no span crosses it."""
    from tiny import CORPUS
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Metaspace()
    raw.decoder = decoders.Metaspace()
    raw.train_from_iterator(
        CORPUS * 4, trainer=trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "</s>"], show_progress=False)
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="</s>", unk_token="<unk>")
    vocab = span_vocabulary(tokenizer)
    assert vocab.token_bytes[tokenizer.convert_tokens_to_ids("▁the")] == b" the"
    passage = "The capital of France is Paris. Then €uro capital."
    for span in ("Paris", " Paris", "capital of France", "The capital", "uro capital."):
        assert walk(tokenizer, passage, ids_of(tokenizer, span)) == (True, True), span
    for text in ("Paris. Then uro", "London"):
        assert walk(tokenizer, passage, ids_of(tokenizer, text))[0] is False, text
    assert len(vocab.segments(passage)) == 2  # split at the unknown "€"


def test_sampling_is_masked_before_temperature_and_top_p(llama, tokenizer):
    prompts = [f"Context: {p}\nAnswer:" for p in PASSAGES]
    for seed in range(3):
        out = generate_batched(
            llama,
            tokenizer,
            prompts,
            max_new_tokens=8,
            temperature=1.5,
            top_p=0.5,
            seed=seed,
            passages=PASSAGES,
            no_answer=NO_ANSWER,
        )
        check_rows(out, PASSAGES, 8)
