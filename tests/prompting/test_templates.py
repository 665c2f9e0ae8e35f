import json

import pytest
from transformers import AutoTokenizer

from lorakit.config import TemplateConfig
from lorakit.errors import TemplateError
from lorakit.prompting.builtin_templates import BUILTINS
from lorakit.prompting.templates import Template, render_prompt, render_segments, resolve_template

TWO_TURNS = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris"},
    {"role": "user", "content": "And of Iran?"},
    {"role": "assistant", "content": "Tehran"},
]


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir):
    return AutoTokenizer.from_pretrained(tiny_llama_dir)


@pytest.fixture(scope="module")
def plain_tokenizer(tiny_t5_dir):
    """The same tokenizer without a chat template."""
    return AutoTokenizer.from_pretrained(tiny_t5_dir)


def resolve(tokenizer, **kwargs):
    has_context = kwargs.pop("has_context", False)
    task_type = kwargs.pop("task_type", "causal")
    return resolve_template(TemplateConfig(**kwargs), tokenizer, task_type=task_type, has_context=has_context)


@pytest.mark.parametrize("name", [*BUILTINS, "chat"])
def test_multi_turn_trains_every_reply_and_prompt_matches_training(tokenizer, name):
    template = resolve(tokenizer, name=name, system_prompt="You are terse.")
    segments = render_segments(template, TWO_TURNS, context="France is in Europe.")
    trained = [text for text, is_trained in segments if is_trained]
    assert len(trained) == 2
    assert trained[0].startswith(("Paris", " Paris")) and trained[1].lstrip().startswith("Tehran")
    untrained = "".join(text for text, is_trained in segments if not is_trained)
    for needle in ("What is the capital of France?", "And of Iran?", "France is in Europe.", "You are terse."):
        assert needle in untrained
    assert "Paris" not in untrained and "Tehran" not in untrained
    # inference prompt + first reply == the training text up to the end of that reply
    prompt = render_prompt(template, TWO_TURNS[:1], context="France is in Europe.")
    assert segments[0] == (prompt, False)
    assert "".join(t for t, _ in segments[:2]) == prompt + trained[0]


def test_builtin_layouts(tokenizer):
    human = resolve(tokenizer, name="human_assistant")
    assert render_prompt(human, TWO_TURNS[:3]) == (
        "Human: What is the capital of France?\nAssistant: Paris\nHuman: And of Iran?\nAssistant:"
    )
    qa = resolve(tokenizer, name="question_answer")
    text = "".join(t for t, _ in render_segments(qa, TWO_TURNS))
    assert text.count("### Question:") == 2 and text.count("### Answer:") == 2
    alpaca = resolve(tokenizer, name="alpaca")
    prompt = render_prompt(alpaca, TWO_TURNS[:1], context="Some input.")
    assert "### Instruction:\nWhat is the capital of France?\n\n### Input:\nSome input.\n\n### Response:\n" in prompt
    assert "\nHuman:" in human.stop_strings and "### Question:" in qa.stop_strings


def test_chat_template_is_copied_and_gets_context_and_system(tokenizer):
    template = resolve(tokenizer, name="chat", system_prompt="Be brief.")
    assert template.uses_model_chat_template and template.source == tokenizer.chat_template
    prompt = render_prompt(template, TWO_TURNS[:1], context="Paris is the capital.")
    assert prompt == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nContext: Paris is the capital.\n\nQuestion: What is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    # the end-of-turn marker is trained, the newline after it is not
    segments = render_segments(template, TWO_TURNS[:2])
    assert segments[1] == ("Paris<|im_end|>", True)
    assert "<|im_end|>" in template.stop_strings


def test_record_system_message_wins_over_configured_default(tokenizer):
    template = resolve(tokenizer, name="human_assistant", system_prompt="default system")
    messages = [{"role": "system", "content": "record system"}] + TWO_TURNS[:1]
    prompt = render_prompt(template, messages)
    assert prompt.startswith("record system\n\n") and "default system" not in prompt


def test_auto_picks_chat_then_context_qa_then_question_answer(tokenizer, plain_tokenizer):
    assert resolve(tokenizer).name == "chat"
    assert resolve(plain_tokenizer, has_context=True).name == "context_qa"
    assert resolve(plain_tokenizer).name == "question_answer"


def test_errors_name_the_problem_and_fix(plain_tokenizer, tokenizer):
    with pytest.raises(TemplateError, match="human_assistant.*question_answer.*alpaca"):
        resolve(tokenizer, name="vicuna")
    with pytest.raises(TemplateError, match="no chat_template") as info:
        resolve(plain_tokenizer, name="chat")
    assert "template.name" in str(info.value)
    bad = "{% for m in messages %}\n{{ m.content }}\n{% if %}\n{% endfor %}"
    with pytest.raises(TemplateError, match="line 3"):
        resolve(tokenizer, name="custom", custom=bad)
    with pytest.raises(TemplateError, match="template.custom"):
        resolve(tokenizer, name="custom")


def test_template_that_is_not_prefix_stable_is_rejected(tokenizer):
    # renders the last message differently from earlier ones, so replies cannot be located
    unstable = (
        "{% for m in messages %}{% if loop.last %}LAST {% endif %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    with pytest.raises(TemplateError, match="prefix-stable"):
        resolve(tokenizer, name="custom", custom=unstable)


def test_custom_template_renders_and_derives_stop_strings(tokenizer):
    custom = (
        "{% if system %}{{ system }}\n{% endif %}"
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}</turn>\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    template = resolve(tokenizer, name="custom", custom=custom, system_prompt="Sys")
    segments = render_segments(template, TWO_TURNS)
    assert [t for t, trained in segments if trained] == ["Paris</turn>", "Tehran</turn>"]
    assert template.stop_strings[0] == "</turn>"
    assert render_prompt(template, TWO_TURNS[:1]) == "Sys\n<user>What is the capital of France?</turn>\n<assistant>"


def test_to_dict_round_trip_renders_identically(tokenizer):
    for name in ("chat", "alpaca"):
        template = resolve(tokenizer, name=name, system_prompt="Sys")
        stored = json.loads(json.dumps(template.to_dict()))
        again = Template.from_dict(stored)
        assert again == template
        assert render_segments(again, TWO_TURNS, context="c") == render_segments(template, TWO_TURNS, context="c")


def test_seq2seq_renders_only_the_prompt_side(plain_tokenizer):
    template = resolve(plain_tokenizer, name="question_answer", task_type="seq2seq")
    segments = render_segments(template, TWO_TURNS)
    assert segments == [(render_prompt(template, TWO_TURNS[:3]), False), ("Tehran", True)]
    assert "Tehran" not in segments[0][0] and "Paris" in segments[0][0]


def test_persian_text_renders(tokenizer):
    template = resolve(tokenizer, name="context_qa")
    messages = [{"role": "user", "content": "پایتخت ایران کجاست؟"}, {"role": "assistant", "content": "تهران"}]
    segments = render_segments(template, messages, context="پایتخت ایران تهران است.")
    assert segments[1] == ("تهران", True)
    assert "پایتخت ایران تهران است." in segments[0][0]
