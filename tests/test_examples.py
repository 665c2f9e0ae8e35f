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
    assert by_name["squad_extractive_qa.yaml"].template.name == "context_qa"
    assert by_name["faq_chatbot.yaml"].template.name == "human_assistant"
    assert by_name["alpaca_instructions.yaml"].template.name == "alpaca"
    assert by_name["chat_messages.yaml"].data.format == "messages"
    assert by_name["chat_messages.yaml"].template.name == "chat"
    persian = by_name["persian_qa.yaml"]
    assert persian.data.format == "squad" and persian.data.no_answer == "پاسخی وجود ندارد"
