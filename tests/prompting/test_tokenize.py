import pytest
from transformers import AutoTokenizer

from lorakit.config import TemplateConfig
from lorakit.data.example import Example
from lorakit.prompting.collation import PaddingCollator
from lorakit.prompting.encoding import (
    Dropped,
    Encoded,
    encode_example,
    encode_examples,
    encode_prompt,
    length_percentiles,
    render_marked_example,
)
from lorakit.prompting.templates import render_prompt, resolve_template

IGNORE = -100


@pytest.fixture(scope="module")
def tok(tiny_llama_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # the case this module must get right
    return tokenizer


@pytest.fixture(scope="module")
def t5_tok(tiny_t5_dir):
    return AutoTokenizer.from_pretrained(tiny_t5_dir)


def template(tokenizer, name, **kwargs):
    task_type = kwargs.pop("task_type", "causal")
    return resolve_template(TemplateConfig(name=name, **kwargs), tokenizer, task_type=task_type)


def qa(question, answer, context=None, source="test.json:0"):
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return Example(messages=messages, context=context, answers=[answer], source=source)


def trained_spans(labels):
    """Runs of labelled positions as (start, end)."""
    spans, start = [], None
    for i, label in enumerate(labels + [IGNORE]):
        if label != IGNORE and start is None:
            start = i
        elif label == IGNORE and start is not None:
            spans.append((start, i))
            start = None
    return spans


def test_labels_mask_prompt_and_train_answer_plus_eos(tok):
    tpl = template(tok, "question_answer")
    example = qa("What is the capital of France?", "Paris")
    enc = encode_example(example, tpl, tok, max_length=128)
    assert isinstance(enc, Encoded) and not enc.context_truncated
    prompt_ids = tok(render_prompt(tpl, example.prompt_messages()), add_special_tokens=False)["input_ids"]
    answer_ids = tok(" Paris", add_special_tokens=False)["input_ids"]
    assert enc.input_ids == prompt_ids + answer_ids + [tok.eos_token_id]
    assert enc.labels == [IGNORE] * len(prompt_ids) + answer_ids + [tok.eos_token_id]
    # the inference prompt ids are exactly the training prompt ids
    assert encode_prompt(tpl, tok, example.prompt_messages()) == prompt_ids


def test_train_on_prompt_labels_everything(tok):
    enc = encode_example(qa("q?", "a"), template(tok, "human_assistant"), tok, max_length=64, train_on_prompt=True)
    assert enc.labels == enc.input_ids


def test_chat_template_trains_end_of_turn_marker_without_extra_eos(tok):
    tpl = template(tok, "chat")
    enc = encode_example(qa("What is the capital of France?", "Paris"), tpl, tok, max_length=128)
    trained = [enc.input_ids[s:e] for s, e in trained_spans(enc.labels)]
    assert trained == [tok("Paris<|im_end|>", add_special_tokens=False)["input_ids"]]
    # <|im_end|> (= EOS here) closes the user turn and the reply; none is appended a second time
    assert enc.input_ids.count(tok.eos_token_id) == 2
    assert tok.decode(enc.input_ids) == (
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\nParis<|im_end|>\n"
    )


def test_multi_turn_trains_both_replies_not_user_turns(tok):
    messages = [
        {"role": "user", "content": "hello there"},
        {"role": "assistant", "content": "hi"},
        {"role": "user", "content": "Who wrote the book?"},
        {"role": "assistant", "content": "the author"},
    ]
    for name in ("human_assistant", "chat"):
        tpl = template(tok, name, system_prompt="You are a helpful assistant.")
        enc = encode_example(Example(messages=messages), tpl, tok, max_length=256)
        texts = [tok.decode(enc.input_ids[s:e]) for s, e in trained_spans(enc.labels)]
        assert [t.replace("<|im_end|>", "").strip() for t in texts] == ["hi", "the author"]
        assert all(t.endswith("<|im_end|>") for t in texts)  # EOS / end-of-turn learned each time
        prompt_text = tok.decode([i for i, label in zip(enc.input_ids, enc.labels) if label == IGNORE])
        assert "hello there" in prompt_text and "Who wrote the book?" in prompt_text
        assert "You are a helpful assistant." in prompt_text


def test_long_context_is_shortened_and_answer_survives(tok):
    tpl = template(tok, "context_qa")
    context = "The quick brown fox jumps over the lazy dog. " * 40 + "The capital of France is Paris."
    example = qa("What is the capital of France?", "the author wrote it", context=context)
    enc = encode_example(example, tpl, tok, max_length=80)
    assert isinstance(enc, Encoded) and enc.context_truncated
    assert len(enc.input_ids) <= 80
    answer_ids = tok("the author wrote it", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert enc.input_ids[-len(answer_ids) :] == answer_ids
    assert enc.labels[-len(answer_ids) :] == answer_ids
    text = tok.decode(enc.input_ids)
    assert "The quick brown fox" in text and "What is the capital of France?" in text  # start of context kept


def test_extractive_answer_window_is_kept(tok):
    tpl = template(tok, "context_qa")
    context = "The quick brown fox jumps over the lazy dog. " * 40 + "The capital of France is Paris. " + "0123 " * 30
    enc = encode_example(qa("What is the capital?", "Paris", context=context), tpl, tok, max_length=90)
    assert enc.context_truncated and len(enc.input_ids) <= 90
    prompt = tok.decode([i for i, label in zip(enc.input_ids, enc.labels) if label == IGNORE])
    assert "capital of France is Paris" in prompt


def test_example_that_cannot_fit_is_dropped_with_reason(tok):
    tpl = template(tok, "question_answer")
    long_answer = "the quick brown fox " * 30
    dropped = encode_example(qa("q?", long_answer, context="some passage text here"), tpl, tok, max_length=20)
    assert isinstance(dropped, Dropped)
    assert "even without context" in dropped.reason and "max_length 20" in dropped.reason
    no_context = encode_example(qa("q?", long_answer), tpl, tok, max_length=20)
    assert isinstance(no_context, Dropped) and "no context to shorten" in no_context.reason


def test_encode_examples_stats(tok):
    tpl = template(tok, "question_answer")
    examples = [
        qa("What is the capital of France?", "Paris", source="f.json:0"),
        qa("q?", "the quick brown fox " * 30, source="f.json:1"),
        qa("Who?", "the author", context="passage text here " * 30, source="f.json:2"),
        Example(messages=[{"role": "user", "content": "no reply"}], source="f.json:3"),
    ]
    features, stats = encode_examples(examples, tpl, tok, max_length=40)
    assert len(features) == 2 and set(features[0]) == {"input_ids", "attention_mask", "labels"}
    assert stats.n_examples == 4 and stats.n_context_truncated == 1
    assert [source for source, _ in stats.dropped] == ["f.json:1", "f.json:3"]
    assert stats.lengths == [len(f["input_ids"]) for f in features]
    assert stats.n_label_tokens == sum(sum(1 for x in f["labels"] if x != IGNORE) for f in features)
    assert stats.n_total_tokens == sum(stats.lengths)
    summary = stats.summary()
    assert "2 encoded, 2 dropped" in summary and "f.json:1" in summary
    assert length_percentiles([1, 2, 3, 4, 100]) == {"min": 1, "median": 3, "p95": 100, "max": 100}


def test_collator_pads_dynamically_and_masks_padding_by_position(tok):
    tpl = template(tok, "question_answer")
    features, _ = encode_examples(
        [qa("What is the capital of France?", "Paris"), qa("Who?", "the author")], tpl, tok, max_length=512
    )
    batch = PaddingCollator(tok.pad_token_id)(features)
    lengths = [len(f["input_ids"]) for f in features]
    assert batch["input_ids"].shape == (2, max(lengths))  # longest in batch, not max_length
    short = lengths.index(min(lengths))
    n = lengths[short]
    assert batch["attention_mask"][short, n:].eq(0).all() and batch["attention_mask"][short, :n].eq(1).all()
    assert batch["labels"][short, n:].eq(IGNORE).all()
    assert batch["labels"][short, n - 1].item() == tok.eos_token_id  # the real EOS stays labelled, pad == eos
    assert batch["input_ids"][short, n:].eq(tok.pad_token_id).all()
    left = PaddingCollator(tok.pad_token_id, padding_side="left", pad_to_multiple_of=8)(features)
    assert left["input_ids"].shape[1] % 8 == 0
    assert left["labels"][short, -1].item() == tok.eos_token_id and left["attention_mask"][short, 0].item() == 0


def test_seq2seq_encoding_and_collation(t5_tok):
    tpl = template(t5_tok, "context_qa", task_type="seq2seq")
    example = qa("Who wrote the book?", "the author", context="passage text here")
    enc = encode_example(example, tpl, t5_tok, max_length=128)
    prompt = render_prompt(tpl, example.prompt_messages(), context="passage text here")
    assert enc.input_ids == t5_tok(prompt)["input_ids"]
    assert "the author" not in t5_tok.decode(enc.input_ids)
    assert enc.labels == t5_tok("the author", add_special_tokens=False)["input_ids"] + [t5_tok.eos_token_id]
    other = encode_example(qa("q?", "a"), tpl, t5_tok, max_length=128)
    batch = PaddingCollator(t5_tok.pad_token_id, seq2seq=True)([enc.to_feature(), other.to_feature()])
    assert batch["labels"].shape == (2, len(enc.labels)) and batch["labels"][1, len(other.labels) :].eq(IGNORE).all()
    assert batch["input_ids"].shape[1] == max(len(enc.input_ids), len(other.input_ids))


def test_persian_round_trip(tok):
    tpl = template(tok, "chat")
    example = qa("پایتخت ایران کجاست؟", "تهران است.", context="پایتخت ایران تهران است.")
    enc = encode_example(example, tpl, tok, max_length=256)
    ((start, end),) = trained_spans(enc.labels)
    assert tok.decode(enc.input_ids[start:end]) == "تهران است.<|im_end|>"
    assert "پایتخت ایران تهران است." in tok.decode(enc.input_ids)


def test_marked_example_shows_trained_part(tok):
    tpl = template(tok, "human_assistant")
    marked = render_marked_example(qa("hello there", "hi"), tpl, tok)
    assert marked == "Human: hello there\nAssistant:⟦ hi<|im_end|>⟧"
    chat = render_marked_example(qa("hello there", "hi"), template(tok, "chat"), tok)
    assert chat.endswith("assistant\n⟦hi<|im_end|>⟧\n")


def test_bos_added_once_when_the_tokenizer_adds_one(tiny_llama_dir):
    from tokenizers import processors

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tokenizer.bos_token = "<|endoftext|>"
    bos = tokenizer.bos_token_id
    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", pair="<|endoftext|> $A $B", special_tokens=[("<|endoftext|>", bos)]
    )
    example = qa("q?", "a")
    enc = encode_example(example, template(tokenizer, "question_answer"), tokenizer, max_length=64)
    assert enc.input_ids[0] == bos and enc.input_ids.count(bos) == 1 and enc.labels[0] == IGNORE
    # a chat template that writes {{ bos_token }} itself gets no second BOS
    tokenizer.chat_template = "{{ bos_token }}" + tokenizer.chat_template
    chat = template(tokenizer, "chat")
    enc = encode_example(example, chat, tokenizer, max_length=64)
    assert enc.input_ids[0] == bos and enc.input_ids.count(bos) == 1
    first_trained = next(i for i, label in enumerate(enc.labels) if label != IGNORE)
    assert encode_prompt(chat, tokenizer, example.prompt_messages()) == enc.input_ids[:first_trained]
