"""The self-describing run folder: what is written where, and reading it back.

    runs/<name>/
      config.yaml        the fully resolved config (LorakitConfig.to_yaml())
      adapter/           adapter_model.safetensors, adapter_config.json, tokenizer files, lorakit.json
      checkpoints/       resumable trainer checkpoints (checkpoint-N/)
      metrics.jsonl      one line per logged step
      plots/loss.png     train + validation loss curves
      eval/              written later by evaluation
      config_changes.json  only when `--resume --allow-config-change` changed the config (history)

Everything after training (evaluate, generate, chat, merge, serve) needs only this folder: the
template, base model and task type are read from `lorakit.json`, never re-specified.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import yaml

from . import __version__
from .errors import ConfigError, RunError

if TYPE_CHECKING:
    from .config import LorakitConfig
    from .templates import Template

METADATA_FILE = "lorakit.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


class RunPaths:
    """Where each part of a run lives, relative to the run's root folder."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.publish_to: Optional[Path] = None  # set for a staging folder (prepare_run_dir)

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def adapter(self) -> Path:
        return self.root / "adapter"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def config_changes(self) -> Path:
        return self.root / "config_changes.json"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    @property
    def loss_plot(self) -> Path:
        return self.plots / "loss.png"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def lorakit_json(self) -> Path:
        return self.adapter / METADATA_FILE

    def is_finished(self) -> bool:
        """True when training completed: the adapter and its metadata are both written."""
        return self.lorakit_json.is_file() and (self.adapter / ADAPTER_WEIGHTS).is_file()

    def checkpoint_folders(self) -> list[tuple[int, Path]]:
        """Every `checkpoint-N` folder, complete or not, oldest step first."""
        if not self.checkpoints.is_dir():
            return []
        found = []
        for child in self.checkpoints.iterdir():
            match = re.fullmatch(r"checkpoint-(\d+)", child.name)
            if match and child.is_dir():
                found.append((int(match.group(1)), child))
        return sorted(found)

    def latest_checkpoint(self) -> Optional[Path]:
        """The newest complete `checkpoint-N` folder (see is_complete_checkpoint), or None."""
        complete = [folder for _, folder in self.checkpoint_folders() if is_complete_checkpoint(folder)]
        return complete[-1] if complete else None

    def incomplete_checkpoints(self) -> list[Path]:
        """Checkpoint folders whose writing never finished (a kill during the save): never resumed from."""
        return [folder for _, folder in self.checkpoint_folders() if not is_complete_checkpoint(folder)]

    def __repr__(self) -> str:
        return f"RunPaths({str(self.root)!r})"

    def __fspath__(self) -> str:
        return str(self.root)


# --- complete checkpoints ----------------------------------------------------------------------

# Written (atomically) into checkpoint-N only after the Trainer wrote everything else there, so a
# folder without it is the remains of an interrupted save (callbacks.CheckpointCompletionCallback).
CHECKPOINT_MARKER = "lorakit-checkpoint.json"


def is_complete_checkpoint(folder: Path) -> bool:
    try:
        marker = json.loads((Path(folder) / CHECKPOINT_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return marker.get("step") == int(Path(folder).name.rsplit("-", 1)[1])


def mark_checkpoint_complete(folder: Path, step: int) -> None:
    atomic_write_json(Path(folder) / CHECKPOINT_MARKER, {"step": step, "complete": True})


def unmark_checkpoint(folder: Path) -> None:
    (Path(folder) / CHECKPOINT_MARKER).unlink(missing_ok=True)


# --- atomic writes -----------------------------------------------------------------------------


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks (weights files are large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` so readers see the old file or the new one, never half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


# --- creating a run ----------------------------------------------------------------------------


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "run"


def run_dir_for(config: "LorakitConfig") -> Path:
    """`train.output_dir/<run_name>`; without a run_name, `<model>-<data>` (stable, so --resume finds it)."""
    name = config.train.run_name
    if not name:
        model = Path(config.model.gguf_file or config.model.name_or_path.rstrip("/\\")).stem
        data = Path(config.data.path.rstrip("/\\")).stem
        name = f"{model}-{data}"
    return Path(config.train.output_dir) / _slug(name)


# lorakit's own parts of a run folder; anything else in it is the user's and is never deleted
OWNED = ("config.yaml", "adapter", "checkpoints", "metrics.jsonl", "plots", "eval", "config_changes.json")


def staging_dir(root: Path) -> Path:
    """Where a `train.overwrite` run trains until it finishes: the old run stays whole meanwhile."""
    return root.parent / f".{root.name}.overwrite"


def _aside_dir(root: Path) -> Path:
    return root.parent / f".{root.name}.replaced"


def prepare_run_dir(root: str | os.PathLike, *, resume: bool, overwrite: bool) -> RunPaths:
    """Check that a run folder may be trained into; return the paths training writes to.

    Creates nothing (a failed setup must leave nothing behind). When train.overwrite replaces an
    existing run, the paths are a staging folder beside it (staging_dir), and `publish_to` names
    the folder it replaces once training finished (publish_run); `--resume` continues such a
    staging run.

    Raises:
        RunError: the folder holds a finished adapter (and neither resume nor overwrite was asked),
            resume was asked of a finished run, or there is no complete checkpoint to resume from.
    """
    final = RunPaths(root)
    _finish_interrupted_publish(final.root)
    staging = RunPaths(staging_dir(final.root))
    staging.publish_to = final.root
    if resume:
        paths = staging if overwrite and staging.latest_checkpoint() is not None else final
        if paths is final and final.is_finished():
            raise RunError(
                f"cannot resume: run '{final.root}' already finished (its adapter is saved); resuming would replace it.",
                hint="train a new run with --set train.run_name=NEW (without --resume), or replace this one with --set train.overwrite=true",
            )
        if paths.latest_checkpoint() is None:
            skipped = paths.incomplete_checkpoints()
            raise RunError(
                f"cannot resume: '{paths.checkpoints}' holds no complete checkpoint-N folder"
                + (f" ({', '.join(f.name for f in skipped)} incomplete: the save was interrupted)." if skipped else "."),
                hint="train without --resume to start this run, or point --set train.run_name at the interrupted run",
            )
        return paths
    if final.is_finished() and not overwrite:
        raise RunError(
            f"run folder '{final.root}' already holds a finished adapter ({final.adapter}); it is never overwritten silently.",
            hint="choose another name with --set train.run_name=NEW, or replace it with --set train.overwrite=true",
        )
    if final.latest_checkpoint() is not None and not overwrite:
        raise RunError(
            f"run folder '{final.root}' holds checkpoints of an unfinished run ({final.latest_checkpoint()}).",
            hint="continue it with `lorakit train ... --resume`, or start over with --set train.overwrite=true",
        )
    if overwrite and (final.is_finished() or final.latest_checkpoint() is not None):
        return staging  # the old run survives every failure of the new one
    return final


def publish_run(paths: RunPaths) -> RunPaths:
    """Put a finished staging run in the place of the run it replaces; returns the final paths.

    The user's own files in the old folder move into the new one; the old run's parts are moved
    aside and deleted only once the new run is in place.
    """
    if paths.publish_to is None:
        return paths
    root, aside = Path(paths.publish_to), _aside_dir(Path(paths.publish_to))
    if root.is_dir():
        for child in root.iterdir():
            if child.name not in OWNED and not (paths.root / child.name).exists():
                os.replace(child, paths.root / child.name)
        if aside.exists():
            shutil.rmtree(aside)
        os.replace(root, aside)
    os.replace(paths.root, root)
    shutil.rmtree(aside, ignore_errors=True)
    return RunPaths(root)


def _finish_interrupted_publish(root: Path) -> None:
    """A kill between publish_run's two renames left the old run aside: put it back."""
    aside = _aside_dir(root)
    if aside.is_dir():
        if root.exists():
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(aside, root)


def config_changes(old: dict, new: dict, prefix: str = "") -> dict[str, tuple]:
    """{dotted key: (old, new)} for every value that differs between two config trees."""
    changes = {}
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changes.update(config_changes(a, b, f"{prefix}{key}."))
        elif a != b:
            changes[f"{prefix}{key}"] = (a, b)
    return changes


def record_config_change(paths: RunPaths, step: int, changes: dict[str, tuple]) -> list[dict]:
    """Append a resume's accepted config change to config_changes.json; returns the whole history."""
    history = read_config_history(paths)
    history.append({
        "resumed_at_step": step,
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "changes": {key: {"old": a, "new": b} for key, (a, b) in changes.items()},
    })
    atomic_write_json(paths.config_changes, history)
    return history


def read_config_history(paths: RunPaths) -> list[dict]:
    try:
        return json.loads(paths.config_changes.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []


def write_metadata(
    adapter_dir: str | os.PathLike,
    *,
    base: dict,
    task_type: str,
    template: "Template",
    precision: str,
    system_prompt: Optional[str],
    max_length: int,
    extra: Optional[dict] = None,
) -> Path:
    """Write `lorakit.json`: everything needed to use the adapter again without the config.

    `base` comes from modeling.base_model_identity(): name_or_path, gguf_file, revision, sha256.
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
        "system_prompt": system_prompt,
        "max_length": max_length,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    for key, value in (extra or {}).items():
        if key in metadata:
            raise ValueError(f"write_metadata: extra key '{key}' would replace a core field")
        metadata[key] = value
    return atomic_write_json(Path(adapter_dir) / METADATA_FILE, metadata)


# --- reading a run back ------------------------------------------------------------------------


@dataclass
class RunInfo:
    """What a run (or a merged model folder) says about itself."""

    root: Path
    adapter_dir: Optional[Path]
    base: dict
    task_type: str
    template: "Template"
    precision: str
    system_prompt: Optional[str]
    max_length: int
    config: Optional["LorakitConfig"] = None
    metadata: dict = field(default_factory=dict)

    @property
    def paths(self) -> RunPaths:
        return RunPaths(self.root)

    @property
    def is_merged(self) -> bool:
        """A merged model folder: full weights with lorakit.json, no adapter to apply."""
        return self.adapter_dir is None


def _locate(path: Path) -> tuple[Path, Optional[Path], Path]:
    """(root, adapter_dir or None, folder holding lorakit.json) for a run, adapter or merged folder."""
    if not path.exists():
        raise RunError(
            f"'{path}' does not exist.",
            hint="pass a run folder (runs/<name>), its adapter/ folder, or a merged model folder; train first with `lorakit train`",
        )
    if not path.is_dir():
        raise RunError(f"'{path}' is a file, not a run folder.", hint="pass the run folder runs/<name> that `lorakit train` wrote")
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


def _load_config(config_path: Path) -> Optional["LorakitConfig"]:
    if not config_path.is_file():
        return None
    from .config import validate_config

    try:
        tree = yaml.safe_load(config_path.read_text(encoding="utf-8"))
        return validate_config(tree, source=str(config_path))
    except (yaml.YAMLError, ConfigError) as exc:
        raise RunError(
            f"'{config_path}' cannot be read back: {exc}",
            hint="restore the config.yaml that training wrote, or delete it (lorakit.json alone is enough to use the run)",
        ) from None


def read_run(path: str | os.PathLike) -> RunInfo:
    """Read a run folder, its adapter folder, or a merged model folder written by lorakit.

    Raises:
        RunError: the folder is missing, incomplete (training did not finish) or its lorakit.json
            is unreadable or lacks a field.
    """
    from .templates import Template

    root, adapter_dir, meta_dir = _locate(Path(path))
    meta_path = meta_dir / METADATA_FILE
    try:
        metadata = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise RunError(f"'{meta_path}' is not valid JSON: {exc}.", hint="retrain the run, or restore the file") from None
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
    return RunInfo(
        root=root,
        adapter_dir=adapter_dir,
        base=dict(metadata["base_model"]),
        task_type=metadata["task_type"],
        template=Template.from_dict(metadata["template"]),
        precision=metadata.get("precision", "float32"),
        system_prompt=metadata.get("system_prompt"),
        max_length=int(metadata.get("max_length") or 1024),
        config=_load_config(root / "config.yaml"),
        metadata=metadata,
    )
