"""`lorakit data inspect` shows the data exactly as training sees it, without loading weights."""

from __future__ import annotations

import json

from lorakit.cli import main


def squad_file(path, n_articles=6):
    data = []
    for a in range(n_articles):
        context = f"Article {a} says the river number {a} is long and the town {a} is old."
        qas = [
            {
                "id": f"q{a}-1",
                "question": f"Which river is in article {a}?",
                "answers": [{"text": f"river number {a}", "answer_start": context.index("river")}],
            },
            {
                "id": f"q{a}-2",
                "question": f"What is old in article {a}?",
                "answers": [{"text": f"the town {a}", "answer_start": context.index("the town")}],
            },
        ]
        data.append({"title": f"article-{a}", "paragraphs": [{"context": context, "qas": qas}]})
    data[0]["paragraphs"][0]["qas"].append(
        {"id": "empty", "question": "   ", "answers": [{"text": "x", "answer_start": 0}]}
    )
    path.write_text(json.dumps({"version": "1.1", "data": data}), encoding="utf-8")
    return path


def test_data_inspect_reports_splits_drops_lengths_and_marked_example(tmp_path, tiny_llama_dir, capsys):
    data = squad_file(tmp_path / "squad.json")
    config = tmp_path / "config.yaml"
    config.write_text(
        f"data:\n  path: {data}\n  split: {{train: 0.5, validation: 0.25, test: 0.25}}\n"
        f"model:\n  name_or_path: {tiny_llama_dir}\n"
        "template:\n  name: context_qa\n  max_length: 64\n",
        encoding="utf-8",
    )
    assert main(["data", "inspect", str(config)]) == 0
    out = capsys.readouterr().out
    assert "format: squad (detected)" in out
    # 12 usable questions in 6 articles of 2: whole articles go to one split
    assert "records: train 6, validation 4, test 2" in out
    assert "split by: group" in out
    assert "with the context shortened to fit" in out
    assert "dropped 1" in out  # the whitespace-only question, with its reason
    assert "tokens per example: min" in out
    assert "⟦" in out and "⟧" in out
    marked = out.split("trained part in ⟦ ⟧) ---\n", 1)[1]
    trained = marked.split("⟦", 1)[1].split("⟧", 1)[0]
    assert trained.startswith("river number") or trained.startswith("the town")
    assert trained.endswith("<|im_end|>")  # the EOS is trained


def test_data_inspect_unknown_format_is_one_line(tmp_path, tiny_llama_dir, capsys):
    data = tmp_path / "odd.json"
    data.write_text(json.dumps([{"foo": 1, "bar": 2}]), encoding="utf-8")
    config = tmp_path / "config.yaml"
    config.write_text(f"data:\n  path: {data}\nmodel:\n  name_or_path: {tiny_llama_dir}\n", encoding="utf-8")
    assert main(["data", "inspect", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "foo" in err and "Traceback" not in err


def two_article_squad(path, sizes=(32, 8)):
    """Two articles (80% / 20% of the questions), two questions per passage."""
    data = []
    for a, size in enumerate(sizes):
        paragraphs = []
        for p in range(size // 2):
            context = f"Passage {p} of article {a}: the bridge {p} crosses the river {a}."
            qas = [
                {
                    "id": f"a{a}-p{p}-{k}",
                    "question": f"What does bridge {p} cross ({k})?",
                    "answers": [{"text": f"the river {a}", "answer_start": context.index("the river")}],
                }
                for k in range(2)
            ]
            paragraphs.append({"context": context, "qas": qas})
        data.append({"title": f"article-{a}", "paragraphs": paragraphs})
    path.write_text(json.dumps({"version": "1.1", "data": data}), encoding="utf-8")
    return path


def test_too_few_articles_split_by_passage_and_extractive_decoding_in_inspect_and_the_training_log(
    tmp_path, tiny_llama_dir, capsys, caplog
):
    import logging

    import lorakit

    data = two_article_squad(tmp_path / "squad.json")
    config = tmp_path / "config.yaml"
    config.write_text(
        f"data:\n  path: {data}\n  split: {{train: 0.8, validation: 0.1, test: 0.1}}\n"
        f"model:\n  name_or_path: {tiny_llama_dir}\n"
        "template:\n  name: context_qa\n  max_length: 96\n"
        f"train:\n  output_dir: {tmp_path / 'runs'}\n  max_steps: 1\n  micro_batch_size: 4\n  save_every: 1000\n",
        encoding="utf-8",
    )
    assert main(["data", "inspect", str(config)]) == 0
    out = capsys.readouterr().out
    assert "split by: context" in out and "records: train 32, validation 4, test 4" in out
    assert "note: split by passage, not by article: whole articles (2)" in out
    extractive = "extractive decoding: on (auto: 100% of the training answers are spans of their passage)"
    assert extractive in out

    with caplog.at_level(logging.INFO, logger="lorakit.train"):
        paths = lorakit.train(lorakit.load_config(config))
    logged = [r.getMessage() for r in caplog.records if r.name == "lorakit.train"]
    assert any(line.startswith("data: split by passage, not by article: whole articles (2)") for line in logged)
    assert extractive in logged  # and the run keeps it, for eval, generate, chat and serve
    decoding = json.loads((paths.adapter / "lorakit.json").read_text(encoding="utf-8"))["decoding"]
    assert decoding == {"extractive": True, "no_answer": "unanswerable"}
