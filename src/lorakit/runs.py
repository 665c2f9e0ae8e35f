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

import json
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import RunError

if TYPE_CHECKING:
    from .config import LorakitConfig
from .files import atomic_write_json

METADATA_FILE = "lorakit.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


class RunPaths:
    """Where each part of a run lives, relative to the run's root folder."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)
        self.publish_to: Path | None = None  # set for a staging folder (prepare_run_dir)

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

    def latest_checkpoint(self) -> Path | None:
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
        marker: dict[str, object] = json.loads((Path(folder) / CHECKPOINT_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return marker.get("step") == int(Path(folder).name.rsplit("-", 1)[1])


def mark_checkpoint_complete(folder: Path, step: int) -> None:
    atomic_write_json(Path(folder) / CHECKPOINT_MARKER, {"step": step, "complete": True})


def unmark_checkpoint(folder: Path) -> None:
    (Path(folder) / CHECKPOINT_MARKER).unlink(missing_ok=True)


# --- atomic writes -----------------------------------------------------------------------------


# --- creating a run ----------------------------------------------------------------------------


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "run"


def run_dir_for(config: LorakitConfig) -> Path:
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


def prepare_run_dir(root: str | os.PathLike[str], *, resume: bool, overwrite: bool) -> RunPaths:
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
                + (
                    f" ({', '.join(f.name for f in skipped)} incomplete: the save was interrupted)." if skipped else "."
                ),
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


# --- reading a run back ------------------------------------------------------------------------


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records in metrics.jsonl (skipping a torn last line after a crash)."""
    if not Path(path).is_file():
        return []
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
