"""Merge a run's LoRA adapter into its base model, verify the result, and save a standalone model.

The merged folder holds safetensors weights, the tokenizer with the run's TRAINING template as its
chat template (so plain transformers `apply_chat_template` renders exactly the training prompt),
`lorakit.json` (so `lorakit eval/generate/serve` work on it) and `merge_verification.json`.

Verification is part of merging: the saved model is loaded back and its logits on a few prompts
are compared with base + adapter computed in float32 before merging. The merge itself is always
done in float32 and cast to the requested dtype afterwards. Every logit must satisfy
|merged - reference| <= atol + rtol * scale, where scale is the largest |logit| of that prompt
(rounding error grows with the size of the activations, not of each single logit):

    float32   atol 1e-4, rtol 1e-4   (only summation-order rounding differs)
    float16   atol 5e-2, rtol 2e-2   (10-bit mantissa: ~1e-3 relative per op, compounding over layers)
    bfloat16  atol 2e-1, rtol 5e-2   (7-bit mantissa: ~8e-3 relative per op)

A run trained on a 4-bit/8-bit base is merged into the unquantized base (k-bit weights cannot
hold the merge), so the merged model is not the model that trained: it lacks the base's
quantization error. Where bitsandbytes can load that base again, the merged logits are also
compared with the quantized base + adapter, and must lie within 1.5x (+ atol) of the error the
quantization alone causes on the same prompts: the larger of the base's (quantized vs not,
adapter off) and the merged weights' (quantized again with the same scheme vs not).

Half precision alone can exceed these on some models (activations in the hundreds), so for
float16/bfloat16 the merge also passes when it is within 1.5x (+ atol) of the difference that
base + adapter itself shows, unmerged, in that dtype: the merge then adds no error of its own.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, ModelError, RunError

if TYPE_CHECKING:  # annotations only: no torch or transformers on import
    import torch

    from ..prompting.templates import Template
    from ..run_metadata import RunInfo
from .verify import (
    FLOOR_FACTOR,
    TOLERANCES,
    _logits,
    compare_logits,
    quantization_floor,
    requantized_logits,
    trained_reference,
    verification_prompts,
    within_floor,
)

VERIFICATION_FILE = "merge_verification.json"
_QUANTIZED = ("4bit", "8bit", "int4", "int8", "nf4", "fp4", "4-bit", "8-bit")


@dataclass
class MergeReport:
    """What `merge_run` did and how closely the saved model matches base + adapter."""

    out_dir: str
    dtype: str
    passed: bool
    max_abs_diff: float
    mean_abs_diff: float
    top1_agreement: float
    atol: float
    rtol: float
    inputs: int
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    dtype_noise_floor: float | None = None  # float16/bfloat16: base + adapter itself in that dtype
    # a run trained on a k-bit base: the merged model against that model as it trained
    quantized_max_abs_diff: float | None = None  # merged vs quantized base + adapter
    quantization_floor: float | None = None  # quantized base vs unquantized base (largest over prompts)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        verdict = "PASSED" if self.passed else "FAILED"
        lines = [*self.notes, f"Merged model ({self.dtype}) saved to {self.out_dir} in {self.seconds:.1f} s."]
        lines.append(
            f"Verification {verdict}: on {self.inputs} prompts the merged logits differ from base + adapter "
            f"by at most {self.max_abs_diff:.3g} (mean {self.mean_abs_diff:.3g}; tolerance atol {self.atol:g} + "
            f"rtol {self.rtol:g} x the largest |logit|); greedy next tokens agree at {self.top1_agreement:.1%} of positions."
        )
        if self.dtype_noise_floor is not None:
            lines.append(
                f"For comparison, base + adapter unmerged in {self.dtype} differs from float32 by up to "
                f"{self.dtype_noise_floor:.3g} (the precision's own noise; the merge may be up to {FLOOR_FACTOR:g}x that)."
            )
        if self.quantization_floor is not None and self.quantized_max_abs_diff is not None:
            lines.append(
                f"Against the model as it trained (the quantized base + adapter) the merged logits differ by up to "
                f"{self.quantized_max_abs_diff:.3g}; the quantization alone moves them by up to "
                f"{self.quantization_floor:.3g} (base, and merged weights quantized again; the merge may be up to "
                f"{FLOOR_FACTOR:g}x that, per prompt)."
            )
        return "\n".join(lines)


# --- the chat template written into the merged tokenizer -----------------------------------------


def _jinja_string(text: str | None) -> str:
    """A Jinja string literal (Jinja unescapes like Python, so JSON's escapes read back exactly)."""
    return "none" if text is None else json.dumps(text, ensure_ascii=False)


def hf_chat_template(template: Template) -> str:
    """Translate a lorakit Template into a transformers chat template with the same output.

    transformers passes `messages` (system turns included), `add_generation_prompt`, the special
    tokens and any extra keyword, so `apply_chat_template(messages, context=passage)` works too.
    Like lorakit, system messages are pulled out (joined by blank lines) and the run's system
    prompt is the default; for a model's own chat template the system text and the passage are
    folded into the messages, as lorakit does before rendering it.
    """
    default = template.system  # the run's system prompt, stored once in its template
    prelude = (
        "{%- if context is not defined %}{% set context = none %}{% endif %}\n"
        "{%- set _own = messages | selectattr('role', 'equalto', 'system') | map(attribute='content') | list %}\n"
        f"{{%- set _default = {_jinja_string(default)} %}}\n"
        "{%- set system = (_own | join('\\n\\n')) if _own else _default %}\n"
        "{%- if not system %}{% set system = none %}{% endif %}\n"
        "{%- set _turns = messages | rejectattr('role', 'equalto', 'system') | list %}\n"
    )
    if template.uses_model_chat_template:
        prelude += (
            "{%- set ns = namespace(out=[], placed=not context) %}\n"
            "{%- if system %}{% set ns.out = [{'role': 'system', 'content': system}] %}{% endif %}\n"
            "{%- for m in _turns %}\n"
            "{%- if not ns.placed and m['role'] == 'user' %}\n"
            "{%- set ns.out = ns.out + [{'role': 'user', 'content': 'Context: ' ~ context ~ '\\n\\nQuestion: ' ~ m['content']}] %}\n"
            "{%- set ns.placed = true %}\n"
            "{%- else %}{% set ns.out = ns.out + [{'role': m['role'], 'content': m['content']}] %}{% endif %}\n"
            "{%- endfor %}\n"
            "{%- set messages = ns.out %}\n"
        )
    else:
        prelude += "{%- set messages = _turns %}\n"
    return prelude + template.source.lstrip("\n")


# --- merging -------------------------------------------------------------------------------------


def _check_dtype(dtype: str) -> torch.dtype:
    import torch

    if dtype.lower() in _QUANTIZED:
        raise ConfigError(
            f"--dtype {dtype}: merging into 4-bit or 8-bit weights is refused: rounding base + adapter to "
            "k bits throws away much of what the adapter learned.",
            hint="merge to float16 or bfloat16 (or float32) and quantize the merged model afterwards if you must",
        )
    table = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype not in table:
        raise ConfigError(f"--dtype {dtype!r} is not supported.", hint="use float32, float16 or bfloat16")
    return table[dtype]


def _relation(out: Path, folder: Path) -> str | None:
    """How --out overlaps a folder that must survive: 'is', 'is inside' or 'contains' (None: apart).
    Paths are resolved first, so a symlink counts as the folder it points to."""
    a, b = out.resolve(), folder.resolve()
    if a == b:
        return "is"
    if a.is_relative_to(b):
        return "is inside"
    return "contains" if b.is_relative_to(a) else None


def _prepare_out_dir(out: Path, info: RunInfo, overwrite: bool) -> None:
    protected = [("the run", info.root)]
    base = info.base.get("name_or_path")
    if base and Path(base).is_dir():  # a local base (a hub id has no folder here)
        protected.append(("the run's base model", Path(base)))
    for what, folder in protected:
        relation = _relation(out, folder)
        if relation is not None:
            raise RunError(
                f"--out '{out}' {relation} {what} '{folder}', which a merge must leave untouched"
                + (
                    " (a merge written over the base makes the run apply its adapter twice)." if "base" in what else "."
                ),
                hint=f"give a new folder outside the run and its base model, e.g. --out merged/{info.root.resolve().name}",
            )
    if out.exists() and not out.is_dir():
        raise RunError(f"--out '{out}' is a file.", hint="give a folder path that does not exist yet")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise RunError(
            f"--out '{out}' already exists and is not empty; it is never overwritten silently.",
            hint="choose a new folder, or pass --overwrite to replace it",
        )


def merge_run(
    path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    dtype: str = "float32",
    verify_inputs: list[str] | None = None,
    overwrite: bool = False,
    device: str | None = None,
    on_start: Callable[[], None] | None = None,
) -> MergeReport:
    """Merge the run's adapter into its base model and save a verified standalone model to out_dir.

    The folder is built beside out_dir and renamed into place only when everything, verification
    included, succeeded.

    Args:
        path: the run folder (or its adapter folder).
        out_dir: where the merged model goes (new or empty, unless overwrite).
        dtype: the saved precision, "float32", "float16" or "bfloat16" (merging is in float32).
        verify_inputs: prompt texts for the logit check (default: a few questions rendered with
            the run's template).
        overwrite: replace an existing merged folder.
        device: where to merge and verify; default the best available.
        on_start: called once every check passed, before the base model loads.

    Returns:
        The merge report: the folder written and the largest logit difference against base + adapter.

    Raises:
        RunError: not a run with an adapter (e.g. an already merged folder), or out_dir is not
            empty (without overwrite), or is, is inside or contains the run or its base model folder.
        ConfigError: dtype is not float32/float16/bfloat16 (4-bit/8-bit merging is refused).
        ModelError: the base model cannot be loaded or changed since training, or verification failed.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from ..files import atomic_write_json
    from ..models.identity import check_base_weights
    from ..pipeline import load_run
    from ..run_metadata import read_run, write_metadata

    started = time.perf_counter()
    torch_dtype = _check_dtype(dtype)
    info = read_run(path)
    adapter_dir = info.adapter_dir
    if adapter_dir is None:  # a merged model folder (info.is_merged)
        raise RunError(
            f"'{path}' is already a merged model (it has no adapter to merge).",
            hint="merge a run folder written by `lorakit train`",
        )
    out = Path(out_dir)
    _prepare_out_dir(out, info, overwrite)
    check_base_weights(info)
    if on_start is not None:  # every check passed: the slow part begins
        on_start()
    notes = []
    quantization = info.config.model.quantization if info.config is not None else "none"
    if quantization != "none":
        notes.append(
            f"The run trained on a {quantization}-quantized base; merging into k-bit weights would lose quality, "
            "so the base is loaded unquantized in float32 and the adapter merged into that; the result is also "
            "checked against the quantized base + adapter, within the quantization's own error."
        )
    # merging needs real weights: the base loads unquantized, in float32 (on the CPU unless told)
    run = load_run(info, device=device or "cpu", dtype=torch.float32, quantize=False)
    tokenizer, peft_model = run.tokenizer, run.model
    prompts = list(verify_inputs) if verify_inputs else verification_prompts(info)
    reference = _logits(peft_model, tokenizer, prompts, info.task_type)
    quantized = trained_reference(info, device or "cpu", tokenizer, prompts)
    if quantization != "none" and quantized is None:
        notes.append("bitsandbytes cannot load the quantized base here, so only the unquantized check ran.")
    floor_per_prompt = None
    if quantized is not None:
        with peft_model.disable_adapter():
            floor_per_prompt = quantization_floor(quantized[1], _logits(peft_model, tokenizer, prompts, info.task_type))
    merged = peft_model.merge_and_unload()
    del peft_model, run
    merged = merged.to(torch_dtype)
    merged.config.dtype = torch_dtype

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.merging-{uuid.uuid4().hex[:8]}"
    try:
        merged.save_pretrained(tmp)
        del merged
        tokenizer.chat_template = hf_chat_template(info.template)
        tokenizer.save_pretrained(tmp)
        write_metadata(
            tmp,
            base=dict(info.base),
            task_type=info.task_type,
            template=info.template,
            precision=dtype,
            max_length=info.max_length,
            extractive=info.extractive,
            no_answer=info.no_answer,
            extra={
                "merged_from": {
                    "run": str(info.root.resolve()),
                    "adapter": str(adapter_dir.resolve()),
                    "dtype": dtype,
                    "base_quantization_in_training": quantization,
                }
            },
        )
        if info.paths.config.is_file():  # lets `lorakit eval` find the run's data splits
            shutil.copyfile(info.paths.config, tmp / "config.yaml")

        # verify what was written, loaded back the way users will load it
        auto = AutoModelForSeq2SeqLM if info.task_type == "seq2seq" else AutoModelForCausalLM
        reloaded = auto.from_pretrained(str(tmp), dtype=torch_dtype)
        if device is not None:
            # transformers wraps nn.Module.to in a decorator whose type hides the signature
            reloaded = reloaded.to(device)  # type: ignore[arg-type]
        atol, rtol = TOLERANCES[dtype]
        merged_logits = _logits(reloaded, tokenizer, prompts, info.task_type)
        del reloaded
        result = compare_logits(reference, merged_logits, atol, rtol)
        if quantized is not None and floor_per_prompt is not None:
            again = quantization_floor(
                requantized_logits(tmp, info, tokenizer, prompts, device or "cpu"), merged_logits
            )
            floor_per_prompt = [max(a, b) for a, b in zip(floor_per_prompt, again)]
            near, worst = within_floor(merged_logits, quantized[0], floor_per_prompt, atol)
            result["quantized_max_abs_diff"], result["quantization_floor"] = worst, max(floor_per_prompt)
            result["passed"] = result["passed"] and near
        floor: float | None = None
        if dtype != "float32":
            # what the precision alone costs: base + adapter, unmerged, run in the same dtype
            unmerged = load_run(info, device=device or "cpu", dtype=torch_dtype, quantize=False).model
            unmerged_result = compare_logits(
                reference, _logits(unmerged, tokenizer, prompts, info.task_type), atol, rtol
            )
            del unmerged
            floor = float(unmerged_result["max_abs_diff"])
            result["passed"] = result["passed"] or result["max_abs_diff"] <= FLOOR_FACTOR * floor + atol
        report = MergeReport(
            out_dir=str(out),
            dtype=dtype,
            atol=atol,
            rtol=rtol,
            inputs=len(prompts),
            notes=notes,
            seconds=round(time.perf_counter() - started, 2),
            dtype_noise_floor=floor,
            **result,
        )
        atomic_write_json(tmp / VERIFICATION_FILE, {**report.to_dict(), "prompts": prompts})
        if not report.passed:
            against = (
                f"; from the quantized base + adapter it trained as by up to {report.quantized_max_abs_diff:.3g} "
                f"({FLOOR_FACTOR:g}x the quantization error {report.quantization_floor:.3g} allowed)"
                if report.quantization_floor is not None
                else ""
            )
            raise ModelError(
                f"merge verification failed: the merged {dtype} model's logits differ from base + adapter by up to "
                f"{report.max_abs_diff:.3g} (tolerance atol {atol:g}, rtol {rtol:g}){against}; nothing was written to '{out}'.",
                hint="merge with --dtype float32; if that fails too, the adapter does not match this base model",
            )
        _publish(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return report


def _publish(tmp: Path, out: Path) -> None:
    """Move the finished folder into place; an old one is moved aside first and removed after."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
