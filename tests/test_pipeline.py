"""The spine: prepare(config) is what train encodes, load_run is how every stage loads a run, and a
config value set away from its default reaches the stage that uses it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from lorakit import pipeline
from lorakit.config_loading import load_serve_config, validate_config
from lorakit.errors import ConfigError
from lorakit.files import atomic_write_text
from lorakit.run_metadata import RunInfo
from lorakit.runs import RunPaths

RECORDS = [
    {"question": f"What is item {i}?", "answer": f"thing {i}", "context": f"Item {i} is thing {i}. " * (1 + i % 4)}
    for i in range(24)
]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("spine") / "qa.json"
    path.write_text(json.dumps(RECORDS), encoding="utf-8")
    return path


def _config(data_file, model_dir, out, **sections):
    tree = {
        "data": {"path": str(data_file), "split": {"train": 0.75, "validation": 0.25, "test": 0.0}},
        "model": {"name_or_path": str(model_dir)},
        # away from the defaults, so a stage that ignored them would encode differently
        "template": {"name": "question_answer", "train_on_prompt": True, "max_length": 48},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "train": {
            "output_dir": str(out),
            "run_name": "spine",
            "max_steps": 1,
            "micro_batch_size": 2,
            "save_every": 1000,
            "best_metric": None,
        },
    }
    for name, values in sections.items():
        tree[name] = {**tree.get(name, {}), **values}
    return validate_config(tree)


class _TrainFeatures(TrainerCallback):
    """Keeps the features the Trainer's training dataloader serves (packed: its micro-batches' members)."""

    features = None

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        dataset = train_dataloader.dataset
        batches = getattr(dataset, "batches", None)
        self.features = [f for batch in batches for f in batch] if batches is not None else list(dataset.features)


@pytest.mark.integration  # a tiny training
def test_prepare_gives_the_features_train_trains_on(tiny_llama_dir, data_file, tmp_path):
    from lorakit.run_metadata import read_run
    from lorakit.train.recipe import train

    config = _config(data_file, tiny_llama_dir, tmp_path)
    prepared = pipeline.prepare(config)
    spy = _TrainFeatures()
    paths = train(config, callbacks=[spy])

    # packing plans micro-batches in its own order: the same features, each exactly once
    assert sorted(map(json.dumps, spy.features)) == sorted(map(json.dumps, prepared.train_features))
    assert len(spy.features) == len(prepared.train_features)
    assert prepared.task_type == "causal" and prepared.has_context
    # train_on_prompt and max_length reached the encoding: every kept token is labelled, none is over 48
    assert all(f["labels"] == f["input_ids"] for f in prepared.train_features)
    assert max(prepared.train_stats.lengths) <= 48 and prepared.train_stats.n_context_truncated > 0
    meta = read_run(paths.root).metadata
    assert meta["train_examples"] == len(prepared.train_features)
    assert meta["validation_examples"] == len(prepared.validation_features) > 0


def test_prepare_can_skip_encoding_and_a_missing_tokenizer(tiny_llama_dir, data_file, tmp_path):
    config = _config(data_file, tiny_llama_dir, tmp_path)
    bare = pipeline.prepare(config, encode=False)
    assert bare.train_features == [] and bare.train_stats is None and bare.template is not None
    features, stats = bare.encode(bare.splits.train)  # as training encodes them
    assert features == pipeline.prepare(config).train_features and stats.n_examples == len(bare.splits.train)

    empty = tmp_path / "no-tokenizer"
    empty.mkdir()
    (empty / "config.json").write_text((Path(tiny_llama_dir) / "config.json").read_text())
    no_tokenizer = _config(data_file, empty, tmp_path)
    with pytest.raises(Exception, match="tokenizer"):
        pipeline.prepare(no_tokenizer)
    kept = pipeline.prepare(no_tokenizer, require_tokenizer=False, task_type="causal")
    assert kept.tokenizer is None and kept.template is None and "tokenizer" in kept.tokenizer_error
    assert len(kept.splits.train) == 18


# --- load_run: the one way a run folder is loaded ------------------------------------------------


def _make_run(root: Path, base_dir: Path, seed: int, system: str | None = None) -> Path:
    """A run folder as `lorakit train` writes it, with a random non-zero adapter (no training)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorakit.models.identity import base_model_identity
    from lorakit.prompting.templates import resolve_template
    from lorakit.run_metadata import write_metadata

    config = validate_config(
        {
            "data": {"path": "unused.jsonl"},
            "model": {"name_or_path": str(base_dir)},
            "template": {"name": "question_answer", "system_prompt": system, "max_length": 200},
        }
    )
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    torch.manual_seed(seed)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_dir),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    paths = RunPaths(root)
    model.save_pretrained(paths.adapter)
    tokenizer.save_pretrained(paths.adapter)
    write_metadata(
        paths.adapter,
        base=base_model_identity(config.model),
        task_type="causal",
        template=resolve_template(config.template, tokenizer, "causal"),
        precision="float32",
        max_length=200,
    )
    atomic_write_text(paths.config, config.to_yaml())
    return root


@pytest.fixture(scope="module")
def two_runs(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("load_run")
    return [_make_run(root / "a", tiny_llama_dir, 1, system="Be brief."), _make_run(root / "b", tiny_llama_dir, 2)]


@pytest.fixture
def spied(monkeypatch):
    """Records every pipeline.load_run and pipeline.run_tokenizer call, then does the real work."""
    calls = []
    real_load, real_tokenizer = pipeline.load_run, pipeline.run_tokenizer

    def load_run(run, **kwargs):
        calls.append(("load_run", run.root.name if isinstance(run, RunInfo) else Path(run).name))
        return real_load(run, **kwargs)

    def run_tokenizer(info, fallback=None):
        calls.append(("run_tokenizer", info.root.name))
        return real_tokenizer(info, fallback)

    monkeypatch.setattr(pipeline, "load_run", load_run)
    monkeypatch.setattr(pipeline, "run_tokenizer", run_tokenizer)
    return calls


def test_predictor_merge_and_serve_all_load_runs_through_load_run(two_runs, spied, tmp_path):
    from lorakit.export.merge import merge_run
    from lorakit.inference.predictor import load_predictor
    from lorakit.serve.worker import load_models

    predictor = load_predictor(two_runs[0], device="cpu")
    assert spied == [("load_run", "a"), ("run_tokenizer", "a")]  # load_run's tokenizer is run_tokenizer
    # what the run stored, read back once: template (with its system prompt) and max_length
    assert predictor.template.system == "Be brief." and predictor.max_length == 200
    assert "Be brief." in predictor.prompt_for([{"role": "user", "content": "hi"}])

    spied.clear()
    merge_run(two_runs[0], tmp_path / "merged", device="cpu")
    assert spied and set(spied) == {("load_run", "a"), ("run_tokenizer", "a")}

    spied.clear()
    served = load_models([str(two_runs[0]), str(two_runs[1])], device="cpu")
    # the first run loads whole; the second shares its base and takes only its own tokenizer
    assert spied == [("load_run", "a"), ("run_tokenizer", "a"), ("run_tokenizer", "b")]
    assert served["b"].predictor.model is served["a"].predictor.model
    assert served["b"].predictor.template.system is None and served["a"].predictor.template.system == "Be brief."


def test_a_merged_folder_keeps_the_system_prompt_once(two_runs, tmp_path):
    from lorakit.export.merge import merge_run
    from lorakit.run_metadata import read_run

    merge_run(two_runs[0], tmp_path / "merged", device="cpu")
    meta = json.loads((tmp_path / "merged" / "lorakit.json").read_text())
    assert "system_prompt" not in meta and meta["template"]["system"] == "Be brief."
    assert read_run(tmp_path / "merged").system_prompt == "Be brief."


# --- one owner per value: a non-default config value reaches the stage that uses it ------------


def test_plan_passes_every_config_value_to_the_memory_model(tiny_llama_dir, data_file, tmp_path, monkeypatch):
    import inspect

    from lorakit.plan import estimate
    from lorakit.plan.memory import estimate_step_memory
    from lorakit.plan.shape import read_model_shape

    config = _config(
        data_file,
        tiny_llama_dir,
        tmp_path,
        lora={"r": 12, "dropout": 0.2, "target_modules": "all-linear", "use_dora": True},
        train={"optimizer": "adamw_torch_fused", "gradient_checkpointing": True, "micro_batch_size": 3},
    )
    seen = {}

    def spy(shape, **kwargs):
        seen.update(kwargs)
        return estimate_step_memory(shape, **kwargs)

    monkeypatch.setattr(estimate, "estimate_step_memory", spy)
    estimate.estimate_memory(config, read_model_shape(config.model), "cpu", 64)
    mirrored = {
        "lora_r": 12,
        "lora_dropout": 0.2,
        "target_modules": "all-linear",
        "use_dora": True,
        "optimizer": "adamw_torch_fused",
        "gradient_checkpointing": True,
        "micro_batch": 3,
        "quantization": "none",
    }
    assert {key: seen[key] for key in mirrored} == mirrored
    # and where a caller leaves one out, the memory model assumes the config's own default
    params = inspect.signature(estimate_step_memory).parameters
    defaults = validate_config({"data": {"path": "x"}, "model": {"name_or_path": "m"}})
    assert params["lora_r"].default == defaults.lora.r and params["optimizer"].default == defaults.train.optimizer
    assert params["lora_dropout"].default == defaults.lora.dropout


def test_plan_lengths_use_the_configured_encoding(tiny_llama_dir, data_file, tmp_path):
    from lorakit.plan.estimate import data_lengths

    config = _config(data_file, tiny_llama_dir, tmp_path)
    lengths = data_lengths(config, "causal")
    assert lengths.lengths == pipeline.prepare(config).train_stats.lengths
    assert max(lengths.lengths) <= 48


def test_serve_settings_have_one_owner(tmp_path, two_runs):
    from lorakit.config import ServeConfig
    from lorakit.serve.app import create_app

    file = tmp_path / "serve.yaml"
    file.write_text("serve:\n  max_batch_size: 3\n  max_tokens_limit: 40\n  max_wait_ms: 2\n", encoding="utf-8")
    settings = load_serve_config(file, max_tokens_limit=20, port=None)  # None: the flag was left out
    assert (settings.max_batch_size, settings.max_tokens_limit, settings.max_wait_ms) == (3, 20, 2)
    assert settings.port == ServeConfig().port and settings.max_body_bytes == ServeConfig().max_body_bytes
    with pytest.raises(ConfigError, match="serve.max_batch_siz: unknown key.*did you mean 'serve.max_batch_size'"):
        load_serve_config(None, max_batch_siz=2)
    with pytest.raises(ConfigError, match="serve.max_tokens_limit"):
        load_serve_config(file, max_tokens_limit=0)

    app = create_app([str(two_runs[1])], settings, device="cpu", max_wait_ms=5)
    state = app.state.lorakit
    assert state.worker.max_batch_size == 3 and state.worker.max_wait == 0.005 and state.max_tokens_limit == 20


def test_serve_command_line_reads_the_config_serve_section(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from lorakit.cli import app
    from lorakit.serve import app as serve_app

    got = {}
    monkeypatch.setattr(serve_app, "run_server", lambda runs, settings: got.update(runs=runs, settings=settings))
    file = tmp_path / "serve.yaml"
    file.write_text("serve:\n  port: 9001\n  max_batch_size: 3\n", encoding="utf-8")
    result = CliRunner().invoke(app, ["serve", "runs/x", "--config", str(file), "--max-batch-size", "5"])
    assert result.exit_code == 0, result.output
    settings = got["settings"]
    assert got["runs"] == ["runs/x"] and (settings.port, settings.max_batch_size) == (9001, 5)
    assert settings.max_tokens_limit == type(settings)().max_tokens_limit  # neither file nor flag: the default


@pytest.mark.integration  # a tiny training
def test_a_device_check_fails_before_data_or_weights_load(tiny_llama_dir, data_file, tmp_path, monkeypatch):
    from lorakit.models import kbit, loading
    from lorakit.train.recipe import train

    monkeypatch.setattr(kbit, "probe", lambda part, device: "bitsandbytes 0.49.2 failed on cpu: no kernel")

    def must_not_run(*args, **kwargs):
        raise AssertionError("setup went on past a config the device cannot run")

    monkeypatch.setattr(loading, "load_base_model", must_not_run)
    monkeypatch.setattr(pipeline, "prepare", must_not_run)
    config = _config(data_file, tiny_llama_dir, tmp_path, train={"optimizer": "paged_adamw_8bit"})
    with pytest.raises(ConfigError, match=r"paged_adamw_8bit needs bitsandbytes.*bitsandbytes>=0\.50"):
        train(config)
