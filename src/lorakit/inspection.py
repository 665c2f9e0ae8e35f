"""`lorakit data inspect`: the data exactly as training will see it, before any weights load."""

from __future__ import annotations

from .config import LorakitConfig


def inspect_data(config: LorakitConfig, *, max_examples_per_split: int | None = None) -> str:
    """Counts per split, what cleaning dropped and why, token-length statistics per split, how
    many examples would be truncated (context shortened) or dropped, and one fully rendered
    training example with the trained part marked ⟦like this⟧.

    Only the tokenizer and the model's config are loaded, never the weights.

    Raises:
        DataError, TemplateError, ModelError: the data, template or tokenizer cannot be loaded.
    """
    from .pipeline import prepare
    from .prompting.encoding import render_marked_example

    # the splits, tokenizer and template as training sets them up; each split is encoded below
    prepared = prepare(config, encode=False)
    task_type, tokenizer, splits, template = prepared.task_type, prepared.tokenizer, prepared.splits, prepared.template

    lines = [
        f"data: {config.data.path}",
        f"format: {splits.format} (detected)" if config.data.format == "auto" else f"format: {splits.format}",
        f"split by: {splits.split_by}; seed {config.data.seed}",
        "records: " + ", ".join(f"{name} {count}" for name, count in splits.counts().items()),
        "cleaning: " + splits.report.summary(),
    ]
    lines += [f"note: {note}" for note in splits.notes]
    lines.append(
        f"template: {template.name}; task type: {task_type}; max_length {config.template.max_length}; "
        f"loss on {'prompt and completion' if config.template.train_on_prompt else 'completion only'}"
    )
    extractive, why = prepared.extractive
    lines.append(f"extractive decoding: {'on' if extractive else 'off'} ({why})")
    for name in ("train", "validation", "test"):
        examples = getattr(splits, name)[:max_examples_per_split]
        if not examples:
            continue
        _, stats = prepared.encode(examples)
        lines.append(f"--- {name} ---")
        lines.append(stats.summary())
    if splits.train:
        lines.append("--- first training example (trained part in ⟦ ⟧) ---")
        lines.append(render_marked_example(splits.train[0], template, tokenizer))
    return "\n".join(lines)
