"""Data-parallel training: two CPU processes (gloo) follow one process's loss trajectory."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lorakit.config_loading import load_config
from lorakit.runs import read_metrics
from lorakit.train.distributed import torchrun_command
from lorakit.train.recipe import train

pytestmark = pytest.mark.integration  # torchrun with two processes

QA = [(f"What is item {i}?", f"item {i} is number {i * 7}") for i in range(16)]


def write_config(tmp_path, model_dir):
    data = tmp_path / "qa.jsonl"
    data.write_text("\n".join(json.dumps({"question": q, "answer": a}) for q, a in QA), encoding="utf-8")
    config = tmp_path / "config.yaml"
    config.write_text(
        f"data:\n  path: {data}\n  split: {{train: 1.0, validation: 0.0, test: 0.0}}\n"
        f"model:\n  name_or_path: {model_dir}\n"
        "lora: {r: 8, alpha: 16, dropout: 0.0}\n"
        f"train:\n  output_dir: {tmp_path / 'runs'}\n  max_steps: 5\n  learning_rate: 0.01\n"
        "  lr_scheduler: constant\n  warmup_ratio: 0.0\n  logging_steps: 1\n  save_every: 1000\n"
        "  group_by_length: false\n",
        encoding="utf-8",
    )
    return config


def losses(run_dir):
    return [line["loss"] for line in read_metrics(run_dir / "metrics.jsonl") if "loss" in line]


def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path, tiny_llama_dir):
    config_path = write_config(tmp_path, tiny_llama_dir)
    # one process, micro-batch 4; unpacked, because packing plans its micro-batches by their size,
    # so 1 x 4 and 2 x 2 would group different examples into a step
    single = train(
        load_config(config_path, ["train.run_name=one", "train.micro_batch_size=4", "train.packing=off"])
    ).root
    # two processes x micro-batch 2: the same 4 examples per optimizer step
    command = torchrun_command(
        config_path, ["train.run_name=two", "train.micro_batch_size=2", "train.packing=off"], resume=False, nproc=2
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    double = tmp_path / "runs" / "two"

    one, two = losses(single), losses(double)
    assert len(one) == len(two) == 5
    for a, b in zip(one, two):
        # all-reduce sums in another order: measured difference 4.8e-7, a 10^4x margin under this bound
        assert abs(a - b) <= 1e-3 * max(1.0, abs(a)), (one, two)
    assert one[-1] < one[0]  # it did learn
    # exactly one run folder, written once, with the documented files
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["one", "two"]
    assert (double / "adapter" / "adapter_model.safetensors").is_file()
    assert (double / "adapter" / "lorakit.json").is_file()
    assert len([line for line in (double / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]) == 5


def test_nproc_command_runs_the_same_entry_point(tmp_path):
    command = torchrun_command(tmp_path / "c.yaml", ["a.b=1"], resume=True, nproc=3)
    assert command[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--nproc_per_node=3" in command
    assert command[command.index("lorakit.cli") + 1] == "train"
    assert command[-1] == "--resume" and command[-3:-1] == ["--set", "a.b=1"]


def test_shipped_accelerate_configs_are_valid():
    from pathlib import Path

    from accelerate.commands.config.config_args import ClusterConfig

    folder = Path(__file__).resolve().parents[2] / "examples" / "distributed"
    configs = sorted(folder.glob("*.yaml"))
    assert {p.name for p in configs} >= {"fsdp.yaml", "deepspeed_zero2.yaml", "deepspeed_zero3.yaml"}
    for path in configs:
        cluster = ClusterConfig.from_yaml_file(str(path))
        assert cluster.num_processes == 2
        assert str(cluster.distributed_type) in (
            "DistributedType.FSDP",
            "DistributedType.DEEPSPEED",
            "FSDP",
            "DEEPSPEED",
        )
