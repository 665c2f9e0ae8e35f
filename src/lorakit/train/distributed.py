"""More than one process: data-parallel training launched with torchrun on this machine.

`lorakit train config.yaml --nproc N` re-runs the same `lorakit train` entry point under
`torch.distributed.run`; the Trainer (through accelerate) then shards batches across the
processes (NCCL on GPUs, gloo on the CPU) and averages gradients. The global batch is
N x micro_batch_size x gradient_accumulation. Only rank 0 writes the run folder and logs.
For FSDP or DeepSpeed, start the same entry point with `accelerate launch --config_file
examples/distributed/fsdp.yaml -m lorakit.cli train config.yaml`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def rank() -> int:
    """This process's global rank (0 when not launched by torchrun)."""
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Whether this process writes files and prints progress."""
    return rank() == 0


def barrier() -> None:
    """Wait for every process (a no-op when running alone)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def torchrun_command(config: Path, overrides: list[str], *, resume: bool, nproc: int) -> list[str]:
    """The command line that runs `lorakit train` in `nproc` processes on this machine."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "lorakit.cli",
        "train",
        str(config),
    ]
    for override in overrides:
        command += ["--set", override]
    if resume:
        command.append("--resume")
    return command


def launch_data_parallel(config: Path, overrides: list[str], *, resume: bool, nproc: int) -> int:
    """Run data-parallel training; returns the exit code of the slowest process."""
    from ..config_loading import load_config

    load_config(config, overrides)  # report config mistakes once, before starting N processes
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return subprocess.call(torchrun_command(config, overrides, resume=resume, nproc=nproc), env=env)
