"""The bundled demo dataset: valid SQuAD v1.1 layout, exact answer offsets, loads through lorakit."""

from __future__ import annotations

import json
from collections import Counter
from importlib import resources
from pathlib import Path

import pytest

DEMO_FILE = Path(str(resources.files("lorakit.demo") / "demo_data" / "reading_comprehension.json"))


@pytest.fixture(scope="module")
def squad() -> dict:
    return json.loads(DEMO_FILE.read_text(encoding="utf-8"))


def _questions(squad: dict):
    for article in squad["data"]:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                yield article, paragraph, qa


def test_layout_is_official_squad(squad):
    assert isinstance(squad["data"], list) and squad["data"]
    for article in squad["data"]:
        assert isinstance(article["title"], str) and article["title"].strip()
        assert article["paragraphs"]
        for paragraph in article["paragraphs"]:
            assert isinstance(paragraph["context"], str)
            assert 3 <= len(paragraph["qas"]) <= 5
            for qa in paragraph["qas"]:
                assert set(qa) == {"id", "question", "answers"}
                assert qa["question"].endswith("?")
                assert qa["answers"], qa["id"]
                for answer in qa["answers"]:
                    assert set(answer) == {"text", "answer_start"}


def test_size_and_uniqueness(squad):
    qas = [qa for _, _, qa in _questions(squad)]
    assert 120 <= len(qas) <= 160
    assert 30 <= len(squad["data"]) <= 45
    ids = Counter(qa["id"] for qa in qas)
    assert max(ids.values()) == 1, "question ids must be unique"
    titles = Counter(article["title"] for article in squad["data"])
    assert max(titles.values()) == 1, "titles are the split groups: they must be unique"


def test_every_answer_is_an_exact_short_span(squad):
    for article, paragraph, qa in _questions(squad):
        context = paragraph["context"]
        for answer in qa["answers"]:
            start, text = answer["answer_start"], answer["text"]
            where = f"{article['title']} / {qa['id']}"
            assert context[start : start + len(text)] == text, where
            assert text == text.strip() and 1 <= len(text.split()) <= 6, where


def test_passages_are_short(squad):
    for article in squad["data"]:
        for paragraph in article["paragraphs"]:
            sentences = [s for s in paragraph["context"].split(". ") if s]
            assert 3 <= len(sentences) <= 6, article["title"]
            assert len(paragraph["context"]) < 600, article["title"]


def test_loads_through_lorakit_as_squad(squad):
    from lorakit.data import load_examples

    loaded = load_examples(str(DEMO_FILE))
    assert loaded.format == "squad"
    total = sum(1 for _ in _questions(squad))
    assert len(loaded.examples) == total and not loaded.report.dropped
    first = loaded.examples[0]
    assert first.context and first.answers and first.group == squad["data"][0]["title"]
    assert first.target == first.answers[0]


def test_article_split_never_shares_a_passage(squad):
    from lorakit.data import load_examples, split_examples

    examples = load_examples(str(DEMO_FILE)).examples
    result = split_examples(examples, {"train": 0.7, "validation": 0.05, "test": 0.25}, seed=0, split_by="group")
    train_groups = {ex.group for ex in result.train}
    test_groups = {ex.group for ex in result.test}
    assert result.test and not train_groups & test_groups
    assert not {ex.context for ex in result.train} & {ex.context for ex in result.test}


def test_demo_config_holds_out_whole_articles(tmp_path):
    from lorakit.data import load_splits
    from lorakit.demo.end_to_end import demo_config, demo_data_path

    config = demo_config(tmp_path / "model", tmp_path / "runs" / "demo")
    assert Path(config.data.path) == demo_data_path() == DEMO_FILE
    assert config.model.precision == "float32" and config.data.split_by == "group"
    assert Path(config.train.output_dir) / config.train.run_name == tmp_path / "runs" / "demo"
    splits = load_splits(config.data)
    assert 25 <= len(splits.test) <= 50 and len(splits.train) >= 90
    assert not {ex.group for ex in splits.train} & {ex.group for ex in splits.test}
    assert demo_config(tmp_path, quick=True).train.epochs < config.train.epochs


@pytest.mark.integration  # the demo end to end: trainings and evaluations
def test_run_demo_end_to_end_on_a_tiny_model(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    """The demo's wiring (model -> train -> before/after eval -> table), with the tiny test model
    standing in for SmolLM2 so nothing is downloaded."""
    import lorakit.demo.hubless
    from lorakit.demo import end_to_end as demo

    monkeypatch.setattr(lorakit.demo.hubless, "ensure_smollm2", lambda *a, **k: tiny_llama_dir)
    result = demo.run_demo(tmp_path / "runs" / "demo", quick=True)
    assert set(result["times_s"]) == {"model", "train", "evaluate", "total"}
    for side in ("before", "after"):
        assert 0 <= result[side]["f1"] <= 100 and result[side]["never_stops_rate"] is not None
    assert result["n_test"] >= 25
    assert Path(result["report"]).is_file() and Path(result["run"], "adapter").is_dir()
    assert capsys.readouterr().out == ""  # a library function: `lorakit demo` prints the table
    table = demo.format_table(result)
    assert "| F1 |" in table and "never stops" in table and result["report"] in table


@pytest.mark.integration  # both demo recipes end to end on the tiny model
def test_qlora_demo_runs_both_recipes_and_measures_each_peak(tiny_llama_dir, tmp_path, monkeypatch):
    import lorakit.demo.hubless
    from lorakit.demo import qlora
    from lorakit.run_metadata import read_run

    monkeypatch.setattr(lorakit.demo.hubless, "ensure_smollm2", lambda *a, **k: tiny_llama_dir)
    result = qlora.run_qlora_demo(tmp_path / "runs" / "demo", quick=True)
    lora, four_bit = result["runs"]["lora"], result["runs"]["qlora"]
    assert read_run(lora["run"]).config.model.quantization == "none"
    stored = read_run(four_bit["run"]).config
    assert stored.model.quantization == "4bit" and stored.train.optimizer == "paged_adamw_8bit"
    assert stored.train.gradient_checkpointing and Path(four_bit["run"]).name == "demo-qlora"
    for run in (lora, four_bit):
        assert 0 <= run["after"]["f1"] <= 100 and run["train_s"] > 0
        # its own process: at least the code it imports, at most all of memory
        assert 50 * 2**20 < run["peak_rss"] < 64 * 2**30
    table = qlora.format_qlora_table(result)
    assert "| peak memory of the training process (RSS) |" in table and "4-bit QLoRA" in table
