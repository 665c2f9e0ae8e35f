"""Is the base model still the one a run was trained on?

lorakit.json records the base model's identity at training time (base_model_identity, below): for
local weights their sha256 plus each file's size and mtime, for hub ids the commit. Every command
that loads a run's base (eval, generate, chat, serve, merge) checks it first, so an adapter is never
applied to other weights, for example a base folder a merge was written into.

Hashing multi-GB weights on every load would be slow, so weights whose size and mtime still match
the record are trusted without hashing; otherwise they are hashed once and the digest is cached per
(path, size, mtime, inode) in the lorakit cache folder.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from ..config import ModelConfig
from ..errors import ModelError
from ..files import sha256_file
from ..runs import METADATA_FILE
from .loading import resolve_source


def _cached_sha256(path: Path) -> str:
    """sha256 of a weights file, remembered in the lorakit cache per (path, size, mtime, inode), so a
    base that was copied or touched since training is hashed once, not on every load."""
    from ..files import atomic_write_json, cache_root, sha256_file

    st = path.stat()
    key, stamp = str(path.resolve()), [st.st_size, st.st_mtime_ns, st.st_ino]
    cache_file = cache_root() / "sha256.json"
    try:
        cache = json.loads(cache_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cache = {}
    cache = cache if isinstance(cache, dict) else {}
    entry = cache.get(key)
    if isinstance(entry, dict) and entry.get("stat") == stamp:
        return entry["sha256"]
    digest = sha256_file(path)
    try:
        atomic_write_json(cache_file, {**cache, key: {"stat": stamp, "sha256": digest}})
    except OSError:
        pass  # an unwritable cache only costs hashing again next time
    return digest


def check_base_weights(info) -> None:
    """Refuse a run whose local base model changed since training (its adapter would be applied to
    other weights, e.g. a base a merge was written into). Weights whose size and mtime still match
    lorakit.json are trusted without hashing; otherwise they are hashed (once, see _cached_sha256).
    Hub ids are pinned by their stored revision instead (check_base_revision).

    Raises:
        ModelError: the weights' sha256 differs from the one lorakit.json records.
    """
    from .identity import base_weight_files, weight_file_stats, weights_sha256

    stored, source = info.base.get("sha256"), info.base.get("name_or_path")
    if not stored or not source or not Path(source).is_dir():
        return  # a hub id, an older run without a digest, or a missing folder the loader reports
    files = [f for f in base_weight_files(source, info.base.get("gguf_file")) if f.is_file()]
    if not files or weight_file_stats(files) == info.base.get("files"):
        return
    current = weights_sha256(files, _cached_sha256)
    if current != stored:
        where = Path(source) / info.base["gguf_file"] if info.base.get("gguf_file") else Path(source)
        raise ModelError(
            f"the base model '{where}' changed since '{info.root}' was trained: its weights' sha256 is"
            f" {current[:12]}..., but the run's {METADATA_FILE} records {stored[:12]}...; the adapter would be"
            " applied to other weights.",
            hint=f"restore the original base model at '{where}' (copy it back or download it again), or retrain"
            " the run on the new base with `lorakit train CONFIG`",
        )


def check_base_revision(info, model) -> None:
    """For a hub base: the commit loaded must be the one the run recorded (when it recorded one).

    Raises:
        ModelError: another commit was loaded.
    """
    stored = info.base.get("revision") or ""
    loaded = getattr(getattr(model, "config", None), "_commit_hash", None)
    if info.base.get("sha256") or not re.fullmatch(r"[0-9a-f]{40}", stored) or not loaded or loaded == stored:
        return
    raise ModelError(
        f"the base model '{info.base.get('name_or_path')}' loaded at commit {loaded}, but '{info.root}' was trained on"
        f" commit {stored} ({METADATA_FILE}).",
        hint=f"make revision {stored} of the model available (online, or in the local hub cache), or retrain the run",
    )


def base_weight_files(source: str, gguf: str | None) -> list[Path]:
    """The files whose bytes identify a local base model: the GGUF file, else the weights."""
    folder = Path(source)
    if gguf:
        return [folder / gguf]
    weights = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    return [w for w in weights if not w.name.startswith("training_args")]


def weights_sha256(files: list[Path], hash_file=sha256_file) -> str | None:
    """One digest for the weights: a single file's sha256, or for several shards a digest of
    their names and hashes (None without files)."""
    if len(files) == 1:
        return hash_file(files[0])
    if not files:
        return None
    combined = hashlib.sha256()
    for weight in files:
        combined.update(f"{weight.name}:{hash_file(weight)}\n".encode())
    return combined.hexdigest()


def weight_file_stats(files: list[Path]) -> dict:
    """{file name: [size, mtime_ns]}: lets a load skip re-hashing weights nobody has touched."""
    stats = {}
    for f in files:
        st = f.stat()
        stats[f.name] = [st.st_size, st.st_mtime_ns]
    return stats


def base_model_identity(model_config: ModelConfig, *, commit_hash: str | None = None) -> dict:
    """What exactly the adapter was trained on: for local files the sha256 of the GGUF or of the
    weights (several safetensors shards hash to one digest of their names and hashes) and each
    file's size and mtime; for hub ids the revision (the resolved commit when known)."""
    source, gguf, is_local = resolve_source(model_config)
    identity: dict[str, Any] = {
        "name_or_path": source,
        "gguf_file": gguf,
        "revision": model_config.revision,
        "sha256": None,
    }
    if not is_local:
        identity["revision"] = commit_hash or model_config.revision or "main"
        return identity
    files = base_weight_files(source, gguf)
    identity["files"] = weight_file_stats(files)  # taken before hashing: a write meanwhile shows later
    identity["sha256"] = weights_sha256(files)
    return identity
