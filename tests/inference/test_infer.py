"""Predictor / load_predictor / generate / chat: everything comes from the run folder, the stored
template is the one used, base_model() switches the adapter off, plain folders and bad paths."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorakit.cli_commands import chat_loop, generate_command, read_context
from lorakit.config import TemplateConfig
from lorakit.config_loading import validate_config
from lorakit.errors import ModelError, RunError
from lorakit.inference.decoding import generate_batched
from lorakit.inference.predictor import Predictor, load_predictor
from lorakit.prompting.builtin_templates import BUILTINS
from lorakit.prompting.templates import render_prompt, resolve_template
from lorakit.run_metadata import write_metadata

QUESTION = "What is the capital of France?"
MAX_NEW = 8


def make_run(root: Path, base_dir: Path, *, template: str = "question_answer", seed: int = 1) -> Path:
    """A run folder as training writes it, with a random (non-zero) LoRA adapter."""
    from peft import LoraConfig, get_peft_model

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    lora = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type="CAUSAL_LM"
    )
    model = get_peft_model(base, lora)
    adapter = root / "adapter"
    model.save_pretrained(adapter)
    tokenizer.save_pretrained(adapter)
    write_metadata(
        adapter,
        base={"name_or_path": str(base_dir)},
        task_type="causal",
        template=resolve_template(TemplateConfig(name=template), tokenizer, "causal"),
        precision="float32",
        max_length=128,
    )
    config = validate_config(
        {
            "data": {"path": str(root / "data.jsonl")},
            "model": {"name_or_path": str(base_dir)},
            "template": {"name": template, "max_length": 128},
        }
    )
    (root / "config.yaml").write_text(config.to_yaml(), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def run_dir(tiny_llama_dir, tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("infer") / "run", tiny_llama_dir)


@pytest.fixture(scope="module")
def predictor(run_dir) -> Predictor:
    return load_predictor(run_dir, device="cpu")


@pytest.fixture(scope="module")
def base_model(tiny_llama_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()


def ask(question: str = QUESTION) -> list[dict]:
    return [{"role": "user", "content": question}]


def test_everything_comes_from_the_run_folder(predictor, run_dir):
    assert predictor.template.name == "question_answer"
    assert predictor.task_type == "causal"
    assert predictor.name == "run"
    assert predictor.has_adapter
    assert predictor.max_context == 512  # the tiny Llama's max_position_embeddings
    assert predictor.prompt_for(ask()) == f"### Question: {QUESTION}\n### Answer:"
    # the adapter folder itself works too
    assert load_predictor(run_dir / "adapter", device="cpu").prompt_for(ask()) == predictor.prompt_for(ask())


def test_stored_template_is_the_one_used(run_dir, predictor, tmp_path):
    """Same model, same adapter; only the template text stored in lorakit.json is changed."""
    edited = tmp_path / "edited"
    shutil.copytree(run_dir, edited)
    meta_path = edited / "adapter" / "lorakit.json"
    meta = json.loads(meta_path.read_text())
    source, stops = BUILTINS["human_assistant"]
    meta["template"].update(name="human_assistant", source=source, stop_strings=stops)
    meta_path.write_text(json.dumps(meta))

    other = load_predictor(edited, device="cpu")
    assert other.prompt_for(ask()) == f"Human: {QUESTION}\nAssistant:"
    mine = predictor.generate([ask()], max_new_tokens=MAX_NEW)[0]
    theirs = other.generate([ask()], max_new_tokens=MAX_NEW)[0]
    # each output is exactly what the model gives for its own stored template's prompt
    for p, gen in ((predictor, mine), (other, theirs)):
        direct = generate_batched(
            p.model, p.tokenizer, [p.prompt_for(ask())], max_new_tokens=MAX_NEW, stop_strings=p.template.stop_strings
        )[0]
        assert gen.text == direct.text
    assert mine.prompt_tokens != theirs.prompt_tokens
    assert mine.text != theirs.text
    # the commands read the folder the same way
    assert generate_command(str(run_dir), QUESTION, max_new_tokens=MAX_NEW) == mine.text
    assert generate_command(str(edited), QUESTION, max_new_tokens=MAX_NEW) == theirs.text


def test_base_model_switches_the_adapter_off(predictor, base_model):
    prompt = predictor.prompt_for(ask())
    with_adapter = predictor.generate([ask()], max_new_tokens=MAX_NEW)[0].text
    with predictor.base_model():
        without = predictor.generate([ask()], max_new_tokens=MAX_NEW)[0].text
    plain = generate_batched(
        base_model, predictor.tokenizer, [prompt], max_new_tokens=MAX_NEW, stop_strings=predictor.template.stop_strings
    )[0].text
    assert without == plain
    assert with_adapter != without
    # and it is back on afterwards
    assert predictor.generate([ask()], max_new_tokens=MAX_NEW)[0].text == with_adapter


def test_adapter_false_loads_the_base_with_the_runs_template(run_dir, predictor):
    base_only = load_predictor(run_dir, device="cpu", adapter=False)
    assert not base_only.has_adapter
    assert base_only.prompt_for(ask()) == predictor.prompt_for(ask())
    with predictor.base_model():
        expected = predictor.generate([ask()], max_new_tokens=MAX_NEW)[0].text
    assert base_only.generate([ask()], max_new_tokens=MAX_NEW)[0].text == expected
    with pytest.raises(RunError, match="no LoRA adapter"), base_only.base_model():
        pass


def test_stream_and_raw_prompts_agree_with_generate(predictor):
    gen = predictor.generate([ask()], max_new_tokens=MAX_NEW)[0]
    assert "".join(predictor.stream(ask(), max_new_tokens=MAX_NEW)) == gen.text
    raw = predictor.generate_prompts([predictor.prompt_for(ask())], max_new_tokens=MAX_NEW)[0]
    assert raw.text == gen.text
    assert predictor.count_tokens(predictor.prompt_for(ask())) == gen.prompt_tokens


def test_adapter_name_selects_one_of_several_adapters(run_dir, tiny_llama_dir, tmp_path):
    second = make_run(tmp_path / "second", tiny_llama_dir, seed=5)
    host = load_predictor(run_dir, device="cpu")
    host.adapter_name = host.model.active_adapter
    host.model.load_adapter(str(second / "adapter"), adapter_name="second")
    guest = Predictor(
        host.model, host.tokenizer, host.template, task_type="causal", name="second", adapter_name="second"
    )
    alone = load_predictor(second, device="cpu").generate([ask()], max_new_tokens=MAX_NEW)[0].text
    first = load_predictor(run_dir, device="cpu").generate([ask()], max_new_tokens=MAX_NEW)[0].text
    assert alone != first
    assert guest.generate([ask()], max_new_tokens=MAX_NEW)[0].text == alone
    assert host.generate([ask()], max_new_tokens=MAX_NEW)[0].text == first


def test_long_context_is_cut_to_fit_keeping_its_start(predictor):
    context = " ".join(f"word{i}" for i in range(400))
    ids = predictor.prompt_ids(ask(), context, max_new_tokens=MAX_NEW)
    assert len(ids) <= predictor.max_length  # the run's max_length (128)
    text = predictor.tokenizer.decode(ids)
    assert "word0 word1" in text and "word399" not in text and QUESTION in text
    with pytest.raises(ModelError, match="at most 512 tokens"):
        predictor.prompt_ids(ask(" ".join(["Paris"] * 600)), max_new_tokens=MAX_NEW)


def test_context_is_a_file_or_the_text_itself(run_dir, tmp_path):
    passage = "The capital of France is Paris."
    path = tmp_path / "passage.txt"
    path.write_text(passage, encoding="utf-8")
    assert read_context(str(path)) == passage
    assert read_context(passage) == passage
    assert read_context(None) is None
    from_file = generate_command(str(run_dir), QUESTION, str(path), max_new_tokens=MAX_NEW)
    assert from_file == generate_command(str(run_dir), QUESTION, passage, max_new_tokens=MAX_NEW)


def test_chat_keeps_history_resets_and_streams(run_dir, predictor):
    lines = iter([QUESTION, "And of Iran?", "/reset", QUESTION, "/exit", "never read"])
    printed: list[str] = []

    def output(*args, end="\n", flush=False):
        printed.append(" ".join(str(a) for a in args) + end)

    final = chat_loop(str(run_dir), input_fn=lambda _: next(lines), output=output, max_new_tokens=MAX_NEW)
    first = predictor.generate([ask()], max_new_tokens=MAX_NEW)[0].text
    assert final == [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": first.strip()}]
    transcript = "".join(printed)
    assert transcript.count("bot> " + first) == 2  # the same answer before and after /reset
    assert "(conversation cleared)" in transcript
    # the second turn saw the first exchange: its reply is the multi-turn one
    history = [*ask(), {"role": "assistant", "content": first.strip()}, {"role": "user", "content": "And of Iran?"}]
    second = predictor.generate([history], max_new_tokens=MAX_NEW)[0].text
    assert "bot> " + second in transcript


def test_chat_ends_at_end_of_input(run_dir):
    def no_more(_):
        raise EOFError

    assert chat_loop(str(run_dir), input_fn=no_more, output=lambda *a, **k: None) == []


def test_plain_model_folder_uses_its_own_chat_template(tiny_llama_dir, tiny_t5_dir):
    plain = load_predictor(tiny_llama_dir, device="cpu")
    assert plain.template.name == "chat" and not plain.has_adapter
    assert plain.prompt_for(ask()) == f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n"
    assert plain.generate([ask()], max_new_tokens=4)[0].completion_tokens <= 4
    with pytest.raises(RunError, match="no chat template"):
        load_predictor(tiny_t5_dir, device="cpu")


def test_not_a_run(tmp_path):
    with pytest.raises(RunError, match="not a lorakit run"):
        load_predictor(tmp_path, device="cpu")
    with pytest.raises(RunError, match="does not exist"):
        load_predictor(tmp_path / "missing", device="cpu")


def test_render_prompt_is_what_predictor_uses(predictor):
    context = "Paris is in France."
    assert predictor.prompt_for(ask(), context) == render_prompt(predictor.template, ask(), context, None)
