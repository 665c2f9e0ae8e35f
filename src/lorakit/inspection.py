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
    from .models.loading import detect_task_type, load_tokenizer
    from .prompting.templates import resolve_template
    from .prompting.encoding import encode_examples, render_marked_example
    from .data import load_splits

    task_type = detect_task_type(config.model)
    tokenizer = load_tokenizer(config.model)
    splits = load_splits(config.data)
    has_context = any(example.context for example in splits.train)
    template = resolve_template(config.template, tokenizer, task_type, has_context=has_context)

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
    for name in ("train", "validation", "test"):
        examples = getattr(splits, name)[:max_examples_per_split]
        if not examples:
            continue
        _, stats = encode_examples(
            examples, template, tokenizer, max_length=config.template.max_length,
            train_on_prompt=config.template.train_on_prompt, task_type=task_type,
        )
        lines.append(f"--- {name} ---")
        lines.append(stats.summary())
    if splits.train:
        lines.append("--- first training example (trained part in ⟦ ⟧) ---")
        lines.append(render_marked_example(splits.train[0], template, tokenizer))
    return "\n".join(lines)
