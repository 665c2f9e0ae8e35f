"""`lorakit eval --compare base` on a run with an adapter: one model load serves the adapter pass and
the base pass (peft's disable_adapter), and with passages shared by several questions every
answer is the one its question gets alone, in both passes."""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path

import pytest
from tiny import make_run

from lorakit.data import load_examples
from lorakit.evaluate.answers import extract_answer
from lorakit.evaluate.perplexity import reference_perplexity
from lorakit.evaluate.runner import evaluate_path
from lorakit.inference.predictor import load_predictor

PASSAGES = {
    "Paris is the capital of France. The sky is blue and a dog has four legs. " * 2: [
        "What is the capital of France?",
        "What color is the sky?",
        "How many legs has a dog?",
    ],
    "The author wrote the book in Tehran. پایتخت ایران تهران است. " * 2: ["Who wrote the book?", "Where?"],
}
MAX_NEW = 8


def squad_file(path: Path) -> Path:
    paragraphs = [
        {
            "context": context,
            "qas": [
                {"id": f"p{p}q{q}", "question": question, "answers": [{"text": "x", "answer_start": 0}]}
                for q, question in enumerate(questions)
            ],
        }
        for p, (context, questions) in enumerate(PASSAGES.items())
    ]
    path.write_text(json.dumps({"version": "1.1", "data": [{"title": "T", "paragraphs": paragraphs}]}))
    return path


def test_compare_base_loads_once_and_answers_as_each_question_alone(tiny_llama_dir, tmp_path, monkeypatch):
    from lorakit.models import loading

    run = make_run(tmp_path / "run", tiny_llama_dir, template_name="context_qa")
    data = squad_file(tmp_path / "dev.json")
    loads = []
    real_load = loading.load_base_model

    def counting_load(*args, **kwargs):
        loads.append(args)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(loading, "load_base_model", counting_load)
    result = evaluate_path(
        run, data=str(data), compare_base=True, max_new_tokens=MAX_NEW, out_dir=tmp_path / "out", verbose=False
    )
    assert len(loads) == 1  # the base pass reused the adapter pass's model
    assert result["n"] == 5 and result["base"] is not None
    lines = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]

    monkeypatch.setattr(loading, "load_base_model", real_load)
    predictor = load_predictor(run, device="cpu")
    examples = {ex.id: ex for ex in load_examples(str(data)).examples}

    def alone() -> list[str]:
        out = []
        for line in lines:
            ex = examples[line["id"]]
            generation = predictor.generate([ex.prompt_messages()], [ex.context], max_new_tokens=MAX_NEW)[0]
            out.append(extract_answer(generation.text, predictor.template.stop_strings))
        return out

    with_adapter = alone()
    with predictor.base_model():
        without = alone()
    assert [line["prediction"] for line in lines] == with_adapter
    assert [line["base_prediction"] for line in lines] == without
    assert with_adapter != without  # the base pass really ran with the adapter off

    # perplexity (shared passages encoded once) is the plain computation's, in both passes
    prompts = [
        predictor.prompt_ids(
            examples[line["id"]].prompt_messages(), examples[line["id"]].context, max_new_tokens=MAX_NEW
        )
        for line in lines
    ]
    references = [examples[line["id"]].answers[0] for line in lines]
    for key, context in (("adapter", nullcontext), ("base", predictor.base_model)):
        with context():
            expected = reference_perplexity(predictor.model, predictor.tokenizer, prompts, references, batch_size=16)
        assert result[key]["perplexity"] == pytest.approx(expected, rel=1e-5)
