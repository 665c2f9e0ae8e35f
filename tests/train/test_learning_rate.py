"""train.learning_rate: auto scales the 7B rate by width; a number is taken as given; bad values say so."""

from __future__ import annotations

import pytest
from transformers import LlamaConfig, T5Config

from lorakit.config import LorakitConfig
from lorakit.config_loading import validate_config
from lorakit.errors import ConfigError
from lorakit.train.arguments import AUTO_LR_RANGE, resolve_learning_rate


def config(**train) -> LorakitConfig:
    return validate_config({"data": {"path": "d.jsonl"}, "model": {"name_or_path": "m"}, "train": train}, "test")


@pytest.mark.parametrize(
    ("width", "expected"),
    [
        (4096, 2e-4),
        (2048, 4e-4),
        (576, 2e-4 * 4096 / 576),
        (8192, 1e-4),
        (64, AUTO_LR_RANGE[1]),
        (65536, AUTO_LR_RANGE[0]),
    ],
)
def test_auto_rate_scales_inversely_with_width_within_its_range(width, expected):
    rate, why = resolve_learning_rate(config(), LlamaConfig(hidden_size=width, num_attention_heads=1))
    assert rate == pytest.approx(expected, rel=1e-12)
    assert why.startswith("auto") and str(width) in why


def test_auto_reads_the_width_of_seq2seq_models_and_a_number_wins():
    rate, _ = resolve_learning_rate(config(), T5Config(d_model=1024))
    assert rate == pytest.approx(2e-4 * 4)
    assert resolve_learning_rate(config(learning_rate=3e-5), T5Config(d_model=1024)) == (3e-5, "set in the config")


def test_auto_without_a_width_falls_back_to_the_7b_rate():
    class Opaque:  # a config without hidden_size
        pass

    rate, why = resolve_learning_rate(config(), Opaque())
    assert rate == 2e-4 and "unknown" in why


@pytest.mark.parametrize("bad", [0, -1e-4, "fast", float("inf"), float("nan")])
def test_a_bad_rate_is_one_problem_naming_the_key(bad):
    with pytest.raises(ConfigError) as info:
        config(learning_rate=bad)
    problems = info.value.problems
    assert len(problems) == 1 and problems[0].startswith("train.learning_rate") and "auto" in problems[0]
