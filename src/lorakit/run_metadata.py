"""A run's metadata: lorakit.json written at the end of training and read back (`read_run`), and the
config changes accepted on resume."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from ._version import __version__
from .errors import ConfigError, RunError
from .files import atomic_write_json
from .runs import ADAPTER_CONFIG, ADAPTER_WEIGHTS, METADATA_FILE, RunPaths

if TYPE_CHECKING:
    from .config import LorakitConfig
    from .prompting.templates import Template


def config_changes(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> dict[str, tuple[Any, Any]]:
    """{dotted key: (old, new)} for every value that differs between two config trees."""
    changes = {}
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changes.update(config_changes(a, b, f"{prefix}{key}."))
        elif a != b:
            changes[f"{prefix}{key}"] = (a, b)
    return changes


def record_config_change(paths: RunPaths, step: int, changes: dict[str, tuple[Any, Any]]) -> list[dict[str, Any]]:
    """Append a resume's accepted config change to config_changes.json; returns the whole history."""
    history = read_config_history(paths)
    history.append(
        {
            "resumed_at_step": step,
            "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "changes": {key: {"old": a, "new": b} for key, (a, b) in changes.items()},
        }
    )
    atomic_write_json(paths.config_changes, history)
    return history


def read_config_history(paths: RunPaths) -> list[dict[str, Any]]:
    try:
        history: list[dict[str, Any]] = json.loads(paths.config_changes.read_text(encoding="utf-8"))
        return history
    except (OSError, ValueError):
        return []


def write_metadata(
    adapter_dir: str | os.PathLike[str],
    *,
    base: dict[str, Any],
    task_type: str,
    template: Template,
    precision: str,
    max_length: int,
    extractive: bool = False,
    no_answer: str | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write `lorakit.json`: everything needed to use the adapter again without the config.

    `base` comes from models.identity.base_model_identity(): name_or_path, gguf_file, revision, sha256.
    The system prompt is stored once, inside the template (Template.system). extractive: answers
    are kept inside spans of their passage, or the no_answer text (inference.extractive).
    """
    metadata = {
        "lorakit_version": __version__,
        "base_model": {
            "name_or_path": base.get("name_or_path"),
            "gguf_file": base.get("gguf_file"),
            "revision": base.get("revision"),
            "sha256": base.get("sha256"),
            **{k: v for k, v in base.items() if k not in ("name_or_path", "gguf_file", "revision", "sha256")},
        },
        "task_type": task_type,
        "template": template.to_dict(),
        "precision": precision,
        "max_length": max_length,
        "decoding": {"extractive": extractive, "no_answer": no_answer},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    for key, value in (extra or {}).items():
        if key in metadata:
            raise ValueError(f"write_metadata: extra key '{key}' would replace a core field")
        metadata[key] = value
    return atomic_write_json(Path(adapter_dir) / METADATA_FILE, metadata)


@dataclass
class RunInfo:
    """What a run (or a merged model folder) says about itself."""

    root: Path
    adapter_dir: Path | None
    base: dict[str, Any]
    task_type: str
    template: Template
    precision: str
    max_length: int
    config: LorakitConfig | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    extractive: bool = False  # answers kept inside spans of their passage (runs before it: off)
    no_answer: str | None = None

    @property
    def system_prompt(self) -> str | None:
        """The run's default system prompt: the template's own (stored once, in lorakit.json's template)."""
        return self.template.system

    @property
    def paths(self) -> RunPaths:
        return RunPaths(self.root)

    @property
    def is_merged(self) -> bool:
        """A merged model folder: full weights with lorakit.json, no adapter to apply."""
        return self.adapter_dir is None


def _locate(path: Path) -> tuple[Path, Path | None, Path]:
    """(root, adapter_dir or None, folder holding lorakit.json) for a run, adapter or merged folder."""
    if not path.exists():
        raise RunError(
            f"'{path}' does not exist.",
            hint="pass a run folder (runs/<name>), its adapter/ folder, or a merged model folder; train first with `lorakit train`",
        )
    if not path.is_dir():
        raise RunError(
            f"'{path}' is a file, not a run folder.", hint="pass the run folder runs/<name> that `lorakit train` wrote"
        )
    nested = RunPaths(path)
    if nested.lorakit_json.is_file():
        return path, nested.adapter, nested.adapter
    if (path / METADATA_FILE).is_file():
        if (path / ADAPTER_CONFIG).is_file():
            # the adapter folder itself; its run root is the parent when that looks like a run
            root = path.parent if path.name == "adapter" and (path.parent / "config.yaml").is_file() else path
            return root, path, path
        return path, None, path  # a merged model folder
    if nested.adapter.is_dir() or nested.checkpoint_folders():
        raise RunError(
            f"run folder '{path}' is incomplete: '{nested.lorakit_json}' is missing (training did not finish).",
            hint="continue training with `lorakit train CONFIG --resume`, or train again",
        )
    if (path / ADAPTER_CONFIG).is_file():
        raise RunError(
            f"'{path}' holds a peft adapter but no {METADATA_FILE}, so its template and base model are unknown.",
            hint="use an adapter trained by `lorakit train`, or retrain it with lorakit",
        )
    raise RunError(
        f"'{path}' is not a lorakit run: neither '{nested.lorakit_json}' nor '{path / METADATA_FILE}' exists.",
        hint="pass the run folder runs/<name> written by `lorakit train` (train first)",
    )


def _load_config(config_path: Path) -> LorakitConfig | None:
    if not config_path.is_file():
        return None
    from .config_loading import validate_config

    try:
        tree = yaml.safe_load(config_path.read_text(encoding="utf-8"))
        return validate_config(tree, source=str(config_path))
    except (yaml.YAMLError, ConfigError) as exc:
        raise RunError(
            f"'{config_path}' cannot be read back: {exc}",
            hint="restore the config.yaml that training wrote, or delete it (lorakit.json alone is enough to use the run)",
        ) from None


def read_run(path: str | os.PathLike[str]) -> RunInfo:
    """Read a run folder, its adapter folder, or a merged model folder written by lorakit.

    Raises:
        RunError: the folder is missing, incomplete (training did not finish) or its lorakit.json
            is unreadable or lacks a field.
    """
    from .prompting.templates import Template

    root, adapter_dir, meta_dir = _locate(Path(path))
    meta_path = meta_dir / METADATA_FILE
    try:
        metadata = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise RunError(
            f"'{meta_path}' is not valid JSON: {exc}.", hint="retrain the run, or restore the file"
        ) from None
    missing = [k for k in ("base_model", "task_type", "template") if k not in metadata]
    if missing:
        raise RunError(
            f"'{meta_path}' lacks the field(s) {', '.join(missing)}.",
            hint="it was not written by this lorakit version or was edited; retrain the run",
        )
    if adapter_dir is not None and not (adapter_dir / ADAPTER_WEIGHTS).is_file():
        raise RunError(
            f"adapter folder '{adapter_dir}' has no {ADAPTER_WEIGHTS}.",
            hint="the save was interrupted; continue with `lorakit train CONFIG --resume` or retrain",
        )
    config = _load_config(root / "config.yaml")
    decoding = metadata.get("decoding") or {}
    return RunInfo(
        root=root,
        adapter_dir=adapter_dir,
        base=dict(metadata["base_model"]),
        task_type=metadata["task_type"],
        template=_stored_template(metadata, Template),
        precision=metadata.get("precision", "float32"),
        max_length=int(metadata["max_length"]) if metadata.get("max_length") else _default_max_length(config),
        config=config,
        metadata=metadata,
        extractive=bool(decoding.get("extractive", False)),
        no_answer=decoding.get("no_answer") or (config.data.no_answer if config is not None else None),
    )


def _stored_template(metadata: dict[str, Any], template_type: type[Template]) -> Template:
    """The run's template. lorakit 0.1.0 also wrote a top-level system_prompt beside the template's
    own `system`; where the two differ, the top-level one is what its predictor used."""
    template = template_type.from_dict(metadata["template"])
    if metadata.get("system_prompt") is not None:
        template.system = metadata["system_prompt"]
    return template


def _default_max_length(config: LorakitConfig | None) -> int:
    """A lorakit.json without max_length: the run's config.yaml, else the config's own default."""
    if config is not None:
        return config.template.max_length
    from .config import TemplateConfig, default_of

    default: int = default_of(TemplateConfig, "max_length")
    return default
