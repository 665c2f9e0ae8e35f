"""Extractive decoding as a run setting: decided from the training data, stored in lorakit.json,
and used by eval, generate, chat and serve, each of which can turn it off for one command."""

from __future__ import annotations

import json

import pytest
from tiny import make_run

from lorakit.cli_commands import chat_loop, generate_command
from lorakit.config_loading import validate_config
from lorakit.evaluate.runner import evaluate_path
from lorakit.inference.predictor import load_predictor
from lorakit.pipeline import prepare
from lorakit.run_metadata import read_run

PASSAGES = [
    "The capital of France is Paris.",
    "پایتخت ایران تهران است. کتاب را چه کسی نوشت؟",
    "The quick brown fox jumps over the lazy dog 0123456789, then the fox jumps again over the dog.",
]
QUESTION = [{"role": "user", "content": "What is the capital?"}]


def is_span(text: str, passage: str) -> bool:
    text = text.strip()
    return bool(text) and (text in passage or text == "unanswerable")


@pytest.fixture(scope="module")
def run(tiny_llama_dir, tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("extractive") / "run", tiny_llama_dir, extractive=True)


@pytest.fixture(scope="module")
def predictor(run):
    return load_predictor(run, device="cpu")


def test_the_run_says_it_is_extractive_and_the_predictor_keeps_to_the_passage(run, predictor):
    info = read_run(run)
    assert info.extractive and info.no_answer == "unanswerable"
    assert json.loads(info.paths.lorakit_json.read_text())["decoding"] == {
        "extractive": True,
        "no_answer": "unanswerable",
    }
    kept = predictor.generate([QUESTION] * 3, PASSAGES, max_new_tokens=10)
    assert all(is_span(g.text, p) for g, p in zip(kept, PASSAGES)), [g.text for g in kept]
    free = predictor.generate([QUESTION] * 3, PASSAGES, max_new_tokens=10, extractive=False)
    assert not all(is_span(g.text, p) for g, p in zip(free, PASSAGES)), "the random adapter must need the constraint"
    # a question without a passage is never constrained
    assert predictor.generate([QUESTION], [None], max_new_tokens=10)[0].text == (
        predictor.generate([QUESTION], [None], max_new_tokens=10, extractive=False)[0].text
    )


def test_a_run_from_before_extractive_decoding_keeps_free_decoding(run, tmp_path):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(run, old)
    metadata_file = read_run(old).paths.lorakit_json
    metadata = json.loads(metadata_file.read_text())
    del metadata["decoding"]
    metadata_file.write_text(json.dumps(metadata))
    assert read_run(old).extractive is False


def test_generate_and_chat_commands(run, predictor):
    passage = PASSAGES[2]
    answer = generate_command(str(run), "What jumps?", passage, max_new_tokens=10)
    assert is_span(answer, passage)
    free = generate_command(str(run), "What jumps?", passage, max_new_tokens=10, extractive=False)
    ask = [{"role": "user", "content": "What jumps?"}]
    assert free == predictor.generate([ask], [passage], max_new_tokens=10, extractive=False)[0].text

    lines = iter(["What jumps?", "And then?", "/exit"])
    printed: list[str] = []
    messages = chat_loop(
        str(run),
        context=passage,
        input_fn=lambda _: next(lines),
        output=lambda *a, **k: printed.append(" ".join(map(str, a))),
        max_new_tokens=10,
    )
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    assert len(replies) == 2 and all(is_span(r, passage) for r in replies), replies


def squad_file(path):
    data = [
        {
            "title": f"t{a}",
            "paragraphs": [
                {
                    "context": passage,
                    "qas": [
                        {
                            "id": f"q{a}-{k}",
                            "question": f"Question {k} about passage {a}?",
                            "answers": [
                                {"text": passage.split()[1], "answer_start": passage.index(passage.split()[1])}
                            ],
                        }
                        for k in range(2)
                    ],
                }
            ],
        }
        for a, passage in enumerate(PASSAGES)
    ]
    path.write_text(json.dumps({"version": "1.1", "data": data}, ensure_ascii=False), encoding="utf-8")
    return path


def test_eval_keeps_to_the_passage_and_records_it(run, tmp_path):
    data = squad_file(tmp_path / "squad.json")
    kept = evaluate_path(run, data=str(data), out_dir=tmp_path / "kept", max_new_tokens=10, verbose=False)
    free = evaluate_path(
        run, data=str(data), out_dir=tmp_path / "free", max_new_tokens=10, extractive=False, verbose=False
    )
    assert kept["evaluation"]["decoding"]["extractive"] is True
    assert free["evaluation"]["decoding"]["extractive"] is False
    records = [json.loads(line) for line in (tmp_path / "kept" / "predictions.jsonl").read_text().splitlines()]
    assert len(records) == 6 and all(is_span(r["raw_output"].split("<|im_end|>")[0], r["context"]) for r in records)


def test_serve_keeps_chat_answers_inside_the_requests_context(run):
    from fastapi.testclient import TestClient

    from lorakit.serve.app import create_app

    body = {"model": "run", "max_tokens": 10, "messages": QUESTION, "context": PASSAGES[2]}
    answers = {}
    for setting in (None, False):
        with TestClient(create_app([str(run)], extractive=setting)) as http:
            reply = http.post("/v1/chat/completions", json=body)
            assert reply.status_code == 200
            answers[setting] = reply.json()["choices"][0]["message"]["content"]
            streamed = http.post("/v1/chat/completions", json={**body, "stream": True}).text
        pieces = [json.loads(line[6:]) for line in streamed.splitlines() if line.startswith("data: {")]
        text = "".join(p["choices"][0]["delta"].get("content") or "" for p in pieces)
        assert text == answers[setting]  # streamed or not, the same constraint
    assert is_span(answers[None], PASSAGES[2])
    assert answers[False] == generate_command(
        str(run), "What is the capital?", PASSAGES[2], max_new_tokens=10, extractive=False
    )


def config_for(tmp_path, tiny_llama_dir, records, **eval_section):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    tree = {"data": {"path": str(data)}, "model": {"name_or_path": str(tiny_llama_dir)}, "eval": eval_section}
    return validate_config(tree)


def test_auto_is_on_for_extractive_data_only(tmp_path, tiny_llama_dir):
    spans = [{"question": f"q{i}", "context": f"The answer {i} is here.", "answer": f"answer {i}"} for i in range(10)]
    prepared = prepare(config_for(tmp_path, tiny_llama_dir, spans), encode=False)
    assert prepared.extractive == (True, "auto: 100% of the training answers are spans of their passage")
    assert prepare(config_for(tmp_path, tiny_llama_dir, spans, extractive=False), encode=False).extractive[0] is False
    written = [{"question": f"q{i}", "context": f"Notes {i}.", "answer": f"A long reply {i}"} for i in range(10)]
    prepared = prepare(config_for(tmp_path, tiny_llama_dir, written), encode=False)
    assert prepared.extractive == (False, "auto: 0% of the training answers are spans of their passage")
    closed = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(10)]
    prepared = prepare(config_for(tmp_path, tiny_llama_dir, closed), encode=False)
    assert prepared.extractive == (False, "auto: the training data has no passages")
    assert prepare(config_for(tmp_path, tiny_llama_dir, closed, extractive=True), encode=False).extractive[0]


def test_generation_eval_during_training_decodes_as_the_run_will(tiny_llama_dir, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorakit.data.example import Example
    from lorakit.inference.predictor import Predictor
    from lorakit.prompting.templates import resolve_template
    from lorakit.train.generation_eval import make_generation_eval

    seen = []
    original = Predictor.generate_prompts

    def spy(self, prompts, **decoding):
        seen.append(decoding.get("passages"))
        return original(self, prompts, **decoding)

    monkeypatch.setattr(Predictor, "generate_prompts", spy)
    config = config_for(tmp_path, tiny_llama_dir, [{"question": "q", "answer": "a"}], max_new_tokens=4)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    template = resolve_template(config.template, tokenizer, "causal", has_context=True)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    examples = [
        Example(messages=[*QUESTION, {"role": "assistant", "content": "Paris"}], context=p, answers=["Paris"])
        for p in PASSAGES
    ]
    for extractive in (True, False):
        make_generation_eval(config, examples, tokenizer, template, "causal", extractive=extractive)(model)
    assert seen == [PASSAGES, None]


def test_the_command_line_flag_turns_it_off_for_one_command(run, capsys):
    from lorakit.cli import main

    passage = PASSAGES[2]
    printed = {}
    for flag in ("--extractive", "--no-extractive"):
        assert main(["generate", str(run), "What jumps?", "--context", passage, "--max-new-tokens", "10", flag]) == 0
        printed[flag] = capsys.readouterr().out.rstrip("\n")
    assert is_span(printed["--extractive"], passage)
    assert printed["--extractive"] == generate_command(str(run), "What jumps?", passage, max_new_tokens=10)
    free = generate_command(str(run), "What jumps?", passage, max_new_tokens=10, extractive=False)
    assert printed["--no-extractive"] == free != printed["--extractive"]
