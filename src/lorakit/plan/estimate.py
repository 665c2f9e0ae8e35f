"""Estimates from a config: the data's token lengths, the micro-batches training will form from
them (padded, or packed as train.packing packs them), and memory and time per step for a device."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from ..config import LorakitConfig
from ..errors import ConfigError
from ..prompting.encoding import IGNORE
from .devices import GpuSpec, gpu_spec, precision_bytes, step_time
from .memory import (
    MemoryEstimate,
    TimeEstimate,
    estimate_step_memory,
    lora_modules,
    lora_param_count,
)
from .shape import ModelShape


@dataclass
class DataLengths:
    lengths: list[int]  # tokens per training example (causal: prompt + answer; seq2seq: encoder input)
    target_lengths: list[int]  # seq2seq label lengths (empty for causal models)
    safe_min: int  # the shortest max_length that cuts no answer (contexts may be shortened)
    n_train: int
    note: str
    # causal models: each example's input_ids and labels, from which packed micro-batches are planned
    # exactly as training plans them (empty: plan them as padded)
    features: list[dict[str, list[int]]] = field(default_factory=list)


def data_lengths(config: LorakitConfig, task_type: str) -> DataLengths:
    """Token lengths of the training split, encoded exactly as training will encode them.

    Falls back to template.max_length (and says so) when the tokenizer cannot be loaded here.
    Raises the data's own errors (DataError, TemplateError): a plan of broken data is no plan.
    """
    import dataclasses

    from ..pipeline import prepare
    from ..prompting.encoding import Dropped, encode_example

    prepared = prepare(config, encode=False, task_type=task_type, require_tokenizer=False)
    train, max_length = prepared.splits.train, config.template.max_length
    if prepared.tokenizer is None:
        return DataLengths(
            [],
            [],
            1,
            len(train),
            f"tokenizer unavailable ({prepared.tokenizer_error}): assumed every sequence is template.max_length={max_length}",
        )
    template, tokenizer, kw = prepared.template, prepared.tokenizer, prepared.encode_options
    lengths, targets, safe_min, dropped = [], [], 1, 0
    features: list[dict[str, list[int]]] = []
    for example in train:
        encoded = encode_example(example, template, tokenizer, **kw)
        if isinstance(encoded, Dropped):
            dropped += 1
            continue
        lengths.append(len(encoded.input_ids))
        if task_type == "seq2seq":
            targets.append(len(encoded.labels))
        else:
            features.append({"input_ids": encoded.input_ids, "labels": encoded.labels})
        bare = encoded
        if example.context:  # the context can be shortened; question and answer cannot
            bare = encode_example(dataclasses.replace(example, context=None), template, tokenizer, **kw)
        if not isinstance(bare, Dropped):
            safe_min = max(safe_min, len(bare.labels) if task_type == "seq2seq" else len(bare.input_ids))
    note = f"lengths from tokenizing the {len(lengths)} training examples (max_length {max_length})"
    if dropped:
        note += f"; {dropped} would be dropped as too long"
    return DataLengths(lengths, targets, safe_min, len(train), note, features)


def _padded_mean(lengths: list[int], batch: int, grouped: bool, seed: int) -> float:
    """Mean padded length of a batch: batches pad to their longest member."""
    if not lengths:
        return 0.0
    order = sorted(lengths) if grouped else random.Random(seed).sample(lengths, len(lengths))
    chunks = [order[i : i + batch] for i in range(0, len(order), batch)]
    return sum(max(c) * len(c) for c in chunks) / len(order)


def _task_type(config: LorakitConfig, shape: ModelShape) -> str:
    if config.model.task_type != "auto":
        return config.model.task_type
    return "seq2seq" if shape.is_seq2seq else "causal"


def packing_mode(config: LorakitConfig, task_type: str) -> str:
    """The packing training will use: passages, examples or off (train.batching's rule, read from
    the config alone; a model whose forward takes no position_ids is only found out by training).

    Raises:
        ConfigError: train.packing names a mode this model cannot run.
    """
    asked = config.train.packing
    if asked == "off":
        return "off"
    attention = config.model.attn_implementation or ""
    reason = None
    if task_type != "causal":
        reason = "a seq2seq model's encoder attends both ways, so examples cannot share its rows"
    elif attention.startswith("flash"):
        reason = f"attn_implementation={attention} takes no 4D attention mask"
    if reason is None:
        return "passages" if asked == "auto" else asked
    if asked == "auto":
        return "off"
    raise ConfigError(
        f"train.packing={asked} cannot run here: {reason}.",
        hint="set train.packing=auto (packs where it can) or train.packing=off",
    )


@dataclass
class Batches:
    """One epoch's micro-batches as training forms them, by tensor shape."""

    mode: str  # passages, examples or off
    # (rows, row length, labelled positions or None when unknown) of each distinct micro-batch shape;
    # padded micro-batches are represented by their longest (micro_batch_size x longest example)
    shapes: list[tuple[int, int, int | None]]
    target_len: int | None  # seq2seq: the longest label sequence
    micro_batches: int  # per epoch
    tokens_per_micro_batch: float  # on average, padding included: what the compute is spent on
    mean_row: float  # mean row length (the attention's span)
    computed_tokens: int  # per epoch, padding included
    labelled_per_micro_batch: float | None = None  # positions that predict a labelled token, on average

    @property
    def packed(self) -> bool:
        return self.mode != "off"


def _labelled(feature: dict[str, list[int]]) -> int:
    """Positions that predict a labelled token (the first token is never predicted)."""
    return sum(1 for label in feature["labels"][1:] if label != IGNORE)


def plan_batches(
    config: LorakitConfig,
    lengths: DataLengths,
    task_type: str,
    max_length: int | None = None,
    mode: str | None = None,
) -> Batches:
    """The micro-batches of one epoch: packed with prompting.packing's own planner (the one training
    uses, same seed) when train.packing packs and the features are known, else padded.

    `max_length` overrides template.max_length (fitting tries shorter ones): longer examples are
    cut from the front, as shortening their context does. `mode` overrides train.packing's choice.
    """
    from ..prompting.packing import build_units, fill_rows, plan_micro_batches

    t, limit = config.train, max_length or config.template.max_length
    mode = mode or packing_mode(config, task_type)
    if mode != "off" and lengths.features:
        features = [
            {key: values[-limit:] for key, values in f.items()} if len(f["input_ids"]) > limit else f
            for f in lengths.features
        ]
        share = mode == "passages"
        budget = t.batch_tokens or t.micro_batch_size * limit
        options = dict(micro_batch_size=t.micro_batch_size, batch_tokens=budget, max_length=limit, share=share)
        shapes, computed, widths, labelled_sum = set(), 0, 0, 0
        planned = plan_micro_batches(features, seed=t.seed, **options)
        for batch in planned:
            items = [features[i] for i in batch]
            rows = fill_rows(build_units(items, limit, share), limit)
            width = max(sum(len(unit) for unit in row) for row in rows)
            labelled = sum(_labelled(f) for f in items)
            shapes.add((len(rows), width, labelled))
            computed, widths, labelled_sum = computed + len(rows) * width, widths + width, labelled_sum + labelled
        n = len(planned)
        return Batches(mode, sorted(shapes), None, n, computed / n, widths / n, computed, labelled_sum / n)
    # padded (also when packing but the tokenizer was unavailable): peak memory at the longest
    # example, time at the mean padded length
    micro = t.micro_batch_size
    if lengths.lengths:
        seq = min(max(lengths.lengths), limit)
        target = min(max(lengths.target_lengths), limit) if lengths.target_lengths else None
        mean = _padded_mean([min(n, limit) for n in lengths.lengths], micro, t.group_by_length, t.seed)
        if lengths.target_lengths:
            mean += sum(lengths.target_lengths) / len(lengths.target_lengths)
        counts = [_labelled(f) for f in lengths.features]
        labelled = sum(sorted(counts, reverse=True)[:micro]) or None
        mean_labelled = micro * sum(counts) / len(counts) if counts else None
        count = len(lengths.lengths)
    else:
        seq, mean, labelled, mean_labelled, count = limit, float(limit), None, None, lengths.n_train
        target = limit if task_type == "seq2seq" else None
    n = max(1, -(-count // micro))
    return Batches("off", [(micro, seq, labelled)], target, n, micro * mean, mean, int(mean * count), mean_labelled)


def peak_memory(
    config: LorakitConfig, shape: ModelShape, gpu, batches: Batches
) -> tuple[MemoryEstimate, tuple[int, int, int | None]]:
    """The memory of the micro-batch shape that needs the most, and that shape."""
    best: tuple[MemoryEstimate, tuple[int, int, int | None]] | None = None
    for rows, width, labelled in batches.shapes:
        memory = estimate_memory(
            config, shape, gpu, width, batches.target_len, rows=rows, labelled=labelled, packed=batches.packed
        )
        if best is None or memory.total > best[0].total:
            best = memory, (rows, width, labelled)
    assert best is not None  # plan_batches gives at least one shape
    return best


def estimate_memory(
    config: LorakitConfig,
    shape: ModelShape,
    gpu,
    seq_len: int,
    target_len: int | None = None,
    *,
    rows: int | None = None,
    labelled: int | None = None,
    packed: bool = False,
) -> MemoryEstimate:
    """Peak memory of this config's training step on `gpu` (a name or GpuSpec) at `seq_len` tokens:
    `rows` rows (default train.micro_batch_size), `labelled` of their positions labelled (None:
    all), `packed` rows carrying a 4D attention mask."""
    spec = gpu if isinstance(gpu, GpuSpec) else gpu_spec(gpu)
    weight_b, act_b, _ = precision_bytes(config, spec)
    return estimate_step_memory(
        shape,
        micro_batch=rows or config.train.micro_batch_size,
        seq_len=seq_len,
        target_len=target_len,
        lora_r=config.lora.r,
        lora_dropout=config.lora.dropout,
        target_modules=config.lora.target_modules,
        use_dora=config.lora.use_dora,
        quantization=config.model.quantization,
        weight_bytes_per_param=weight_b,
        act_bytes=act_b,
        optimizer=config.train.optimizer,
        gradient_checkpointing=config.train.gradient_checkpointing,
        attn=config.model.attn_implementation or "sdpa",
        device="cpu" if spec.name == "cpu" else "cuda",
        labelled_logits_only=config.train.labelled_logits_only,
        labelled_tokens=labelled,
        packed=packed,
    )


def estimate_time(
    config: LorakitConfig,
    shape: ModelShape,
    gpu,
    mean_len: float,
    seq_len: float | None = None,
    labelled: float | None = None,
) -> TimeEstimate:
    """Seconds per optimizer step for this config on `gpu` with micro-batches of micro_batch_size x
    `mean_len` tokens (padding included) in rows of `seq_len` tokens (default `mean_len`), of which
    `labelled` (None: unknown) predict a labelled token."""
    spec = gpu if isinstance(gpu, GpuSpec) else gpu_spec(gpu)
    modules = lora_modules(shape, config.lora.target_modules)
    t = config.train
    head_only_labelled = t.labelled_logits_only and not shape.is_seq2seq and shape.plain_logits
    return step_time(
        shape,
        spec,
        n_lora=lora_param_count(shape, modules, config.lora.r),
        n_adapters=len(modules),
        tokens=t.micro_batch_size * t.gradient_accumulation * mean_len,
        seq_len=seq_len or mean_len,
        micro_batches=t.gradient_accumulation,
        gradient_checkpointing=t.gradient_checkpointing,
        quantization=config.model.quantization,
        labelled_tokens=labelled * t.gradient_accumulation if head_only_labelled and labelled is not None else None,
    )
