from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from tiny import build_tiny_llama, build_tiny_t5  # noqa: E402

# Tiny models gain nothing from threads, and two cores shared by two torch thread pools thrash:
# 40 training steps took 22 s with two threads and under 1 s with one on the CI machine.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A saved 2-layer Llama + ChatML tokenizer (pad = eos, like many real models)."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_t5_dir(tmp_path_factory) -> Path:
    """A saved 2-layer T5 + tokenizer."""
    return build_tiny_t5(tmp_path_factory.mktemp("tiny-t5"))
