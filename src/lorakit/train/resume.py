"""Resuming a run: the config it resumes with, checked against the run's own config.yaml."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from ..config import LorakitConfig
from ..errors import RunError
from ..run_metadata import config_changes
from ..runs import RunPaths


def resume_config(
    config: LorakitConfig, paths: RunPaths, checkpoint: Path, allow_change: bool
) -> tuple[LorakitConfig, dict[str, Any]]:
    """The config to resume with, and the accepted changes {dotted key: (old, new)}.

    The run folder must describe what produced it: a config that differs from the run's own
    config.yaml is refused unless the user accepts the change (--allow-config-change).
    """
    if not paths.config.is_file():
        return config, {}
    old = yaml.safe_load(paths.config.read_text(encoding="utf-8")) or {}
    changes = config_changes(old, yaml.safe_load(config.to_yaml()))
    changes.pop("train.overwrite", None)  # says how to treat an old folder, not how this run trains
    batch = ("train.micro_batch_size", "train.gradient_accumulation")
    old_train = old.get("train", {})
    if set(changes) & set(batch) and all(isinstance(old_train.get(k.split(".")[1]), int) for k in batch):
        micro, accum = old_train["micro_batch_size"], old_train["gradient_accumulation"]
        if micro * accum == config.train.micro_batch_size * config.train.gradient_accumulation:
            # the run backed off after running out of memory: keep its (equivalent) split
            config = config.model_copy(deep=True)
            config.train.micro_batch_size, config.train.gradient_accumulation = micro, accum
            for key in batch:
                changes.pop(key, None)
    if changes and not allow_change:
        listed = ", ".join(f"{key}: {a!r} -> {b!r}" for key, (a, b) in changes.items())
        raise RunError(
            f"cannot resume '{paths.root}' from {checkpoint.name}: the config differs from the run's own {paths.config} in {listed}.",
            hint=f"resume with the run's config (`lorakit train {paths.config} --resume`), or accept the change with "
            "`--resume --allow-config-change` (config.yaml then records the new config and lorakit.json the change)",
        )
    return config, changes
