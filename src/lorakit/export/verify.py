"""Verifying a merge: the merged model's logits against base + adapter on the run's own prompts,
within the saved precision's tolerance."""

from __future__ import annotations

TOLERANCES = {"float32": (1e-4, 1e-4), "float16": (5e-2, 2e-2), "bfloat16": (2e-1, 5e-2)}
FLOOR_FACTOR = 1.5


# Used when the caller gives no inputs: they exercise the template, a passage and non-Latin text.
DEFAULT_QUESTIONS = [
    ("What is the capital of France?", None),
    ("Who wrote the book?", "The book was written by the author in 1999."),
    ("پایتخت ایران کجاست؟", None),
]


def verification_prompts(info) -> list[str]:
    """A few prompts rendered with the run's own template (what the model will really see)."""
    from ..prompting.templates import render_prompt

    return [
        render_prompt(info.template, [{"role": "user", "content": q}], context=c, system=info.system_prompt)
        for q, c in DEFAULT_QUESTIONS
    ]


def _logits(model, tokenizer, prompts: list[str], task_type: str) -> list:
    """Float32 logits per prompt, one prompt at a time (no padding, so nothing but weights differs)."""
    import torch

    from ..inference.decoding import encode_prompt

    device = next(model.parameters()).device
    out = []
    model.eval()
    with torch.inference_mode():
        for prompt in prompts:
            ids = torch.tensor([encode_prompt(tokenizer, prompt, task_type)], device=device)
            if task_type == "seq2seq":
                start = model.config.decoder_start_token_id
                start = start if start is not None else (tokenizer.pad_token_id or 0)
                decoder = torch.cat([torch.tensor([[start]], device=device), ids[:, :8]], dim=1)
                logits = model(input_ids=ids, decoder_input_ids=decoder).logits
            else:
                logits = model(input_ids=ids).logits
            out.append(logits[0].float().cpu())
    return out


def compare_logits(reference: list, merged: list, atol: float, rtol: float) -> dict:
    """Largest and mean absolute difference, verdict against the scaled tolerance, greedy-token agreement."""
    import torch

    diffs = [(m - r).abs() for r, m in zip(reference, merged)]
    passed = all(float(d.max()) <= atol + rtol * float(r.abs().max()) for d, r in zip(diffs, reference))
    agree = sum(int((r.argmax(-1) == m.argmax(-1)).sum()) for r, m in zip(reference, merged))
    positions = sum(r.shape[0] for r in reference)
    return {
        "passed": passed,
        "max_abs_diff": max(float(d.max()) for d in diffs),
        "mean_abs_diff": float(torch.cat([d.flatten() for d in diffs]).mean()),
        "top1_agreement": agree / positions if positions else 1.0,
    }


def trained_reference(info, device: str, tokenizer, prompts: list[str]) -> tuple[list, list] | None:
    """For a run trained on a k-bit base, where that base can be loaded quantized again: the
    logits of the model as it trained (quantized base + adapter) and of the quantized base alone.
    None for an unquantized run, or where bitsandbytes cannot run on `device`."""
    from ..models import kbit
    from ..pipeline import load_run

    quantization = info.config.model.quantization if info.config is not None else "none"
    if quantization == "none" or not kbit.supports("quantization", device):
        return None
    run = load_run(info, device=device, quantize=True)
    trained = _logits(run.model, tokenizer, prompts, info.task_type)
    with run.model.disable_adapter():
        base = _logits(run.model, tokenizer, prompts, info.task_type)
    return trained, base


def quantization_floor(quantized: list, unquantized: list) -> list[float]:
    """Per prompt, the largest logit difference between a model with k-bit base weights and the
    same model unquantized: the quantization error alone, at the scale of this model's logits."""
    return [float((q - b).abs().max()) for q, b in zip(quantized, unquantized)]


def requantized_logits(folder, info, tokenizer, prompts: list[str], device: str) -> list:
    """The merged model in `folder` loaded again with the run's k-bit quantization: the trained
    weights under a 4-bit (8-bit) error of the same kind and size as the base had in training."""
    from ..config import ModelConfig
    from ..models.loading import load_base_model

    quantization = info.config.model.quantization
    config = ModelConfig(name_or_path=str(folder), quantization=quantization, task_type=info.task_type)
    return _logits(load_base_model(config, info.task_type, device=device), tokenizer, prompts, info.task_type)


def within_floor(merged: list, trained: list, floor: list[float], atol: float) -> tuple[bool, float]:
    """(merged is within FLOOR_FACTOR x the quantization error + atol of the model as trained, on
    every prompt; the largest difference). Merging into the unquantized base removes the base's
    quantization error: the logits should move by about what such an error moves them, no more.
    `floor` is that error per prompt, measured twice, the larger kept: on the base alone (quantized
    vs not, adapter off) and on the merged weights (quantized again vs not), where the trained
    adapter's sensitivity to it shows (measured on the tiny models: merged vs trained was 0.5-1.0x
    the second, and up to 2.1x the first after a long training)."""
    diffs = [float((m - t).abs().max()) for m, t in zip(merged, trained)]
    return all(d <= FLOOR_FACTOR * f + atol for d, f in zip(diffs, floor)), max(diffs)
