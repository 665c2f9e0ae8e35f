"""How lorakit reads and writes files: atomic writes, sha256 digests, the cache folder, wide encodings."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks (weights files are large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
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


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


# Byte-order marks of the encodings people save text in by mistake (Windows "Unicode" is UTF-16).
_BOMS = (
    (b"\xff\xfe\x00\x00", "UTF-32 LE"),
    (b"\x00\x00\xfe\xff", "UTF-32 BE"),
    (b"\xff\xfe", "UTF-16 LE"),
    (b"\xfe\xff", "UTF-16 BE"),
)


def wide_encoding(data: bytes) -> str | None:
    """The name of a UTF-16/32 encoding when `data` looks like one (a BOM, or NUL bytes, which
    UTF-8 text never holds), else None. Such files otherwise fail with misleading syntax errors."""
    for bom, name in _BOMS:
        if data.startswith(bom):
            return name
    head = data[:4096]
    if b"\x00" in head:
        # ASCII characters in UTF-16 have their NUL byte after (LE) or before (BE) them
        return "UTF-16 LE" if head[1::2].count(0) > head[0::2].count(0) else "UTF-16 BE"
    return None


CACHE_ENV = "LORAKIT_CACHE"


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """Where converted models live: the argument, else $LORAKIT_CACHE, else ~/.cache/lorakit."""
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path.home() / ".cache" / "lorakit"
