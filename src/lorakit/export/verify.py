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
