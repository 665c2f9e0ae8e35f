"""Every ready config in examples/ loads and validates (only load_config: no training here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorakit.config_loading import load_config

EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "examples").glob("*.yaml"))


def test_the_documented_examples_exist():
    names = {path.name for path in EXAMPLES}
    for name in (
        "squad_extractive_qa.yaml",
        "faq_chatbot.yaml",
        "alpaca_instructions.yaml",
        "chat_messages.yaml",
        "persian_qa.yaml",
    ):
        assert name in names


@pytest.mark.parametrize("path", EXAMPLES, ids=[path.name for path in EXAMPLES])
def test_example_config_validates(path):
    config = load_config(path)
    assert config.data.path and config.model.name_or_path
    first = path.read_text(encoding="utf-8").lstrip().splitlines()[0]
    assert first.startswith("#"), f"{path.name} should start with a comment saying what it is for"


def test_examples_pair_formats_with_templates():
    by_name = {path.name: load_config(path) for path in EXAMPLES}
    assert by_name["squad_extractive_qa.yaml"].data.format == "squad"
    assert by_name["squad_extractive_qa.yaml"].template.name == "chat"  # with its extractive system prompt
    assert by_name["faq_chatbot.yaml"].template.name == "human_assistant"
    assert by_name["alpaca_instructions.yaml"].template.name == "alpaca"
    assert by_name["chat_messages.yaml"].data.format == "messages"
    assert by_name["chat_messages.yaml"].template.name == "chat"
    persian = by_name["persian_qa.yaml"]
    assert persian.data.format == "squad" and persian.data.no_answer == "پاسخی وجود ندارد"


def cpu_override(path: Path) -> list[str]:
    """The --set overrides of the `lorakit train ...` CPU line in an example's header comment."""
    line = next(t for t in path.read_text(encoding="utf-8").splitlines() if t.startswith("#   lorakit train"))
    words = line.split()
    return [words[i + 1] for i, word in enumerate(words) if word == "--set"]


@pytest.mark.integration  # two training steps of a tiny model
def test_the_squad_example_trains_on_a_cpu_with_its_documented_override(tmp_path, tiny_llama_dir):
    import json

    from lorakit.train.recipe import train

    path = next(p for p in EXAMPLES if p.name == "squad_extractive_qa.yaml")
    overrides = cpu_override(path)
    assert any(o.startswith("model.quantization=none") for o in overrides)
    # the tiny model stands in for the SmolLM2 folder; a small SQuAD file for the user's data
    overrides = [o for o in overrides if not o.startswith("model.name_or_path=")]
    passage = "The Broncos beat the Panthers 24 to 10 in Santa Clara, California."
    qas = [("Who won?", "The Broncos"), ("Who lost?", "the Panthers"), ("Where was it?", "Santa Clara, California")]
    articles = [
        {
            "title": f"Article {a}",
            "paragraphs": [
                {
                    "context": passage,
                    "qas": [
                        {
                            "id": f"{a}-{q}",
                            "question": question,
                            "answers": [{"text": answer, "answer_start": passage.index(answer)}],
                        }
                        for q, (question, answer) in enumerate(qas)
                    ],
                }
            ],
        }
        for a in range(20)
    ]
    data = tmp_path / "squad.json"
    data.write_text(json.dumps({"version": "1.1", "data": articles}), encoding="utf-8")
    overrides += [
        f"model.name_or_path={tiny_llama_dir}",
        f"data.path={data}",
        f"train.output_dir={tmp_path / 'runs'}",
        "train.max_steps=2",
        "eval.max_new_tokens=4",
    ]
    config = load_config(path, overrides)
    assert config.model.quantization == "none" and not config.train.gradient_checkpointing
    assert config.train.learning_rate == "auto" and config.lora.target_modules == "all-linear"
    paths = train(config)
    meta = json.loads((paths.adapter / "lorakit.json").read_text(encoding="utf-8"))
    assert meta["global_step"] == 2 and meta["template"]["name"] == "chat"
