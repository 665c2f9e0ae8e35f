"""Batched evaluation against one-question-at-a-time generation, measured in the same run.

Answers SQuAD v1.1 questions (with their passages) from ../shared/data/squad-v1.1-dev-part-a.json
with SmolLM2-135M-Instruct and its own chat template, greedy. Three passes, same code, same prompts:

- batched, shared prefixes: lorakit's generate_batched as `lorakit eval` runs it: the questions on
  one passage have the passage (and everything before it) encoded once, its KV cache copied to
  each question's row (inference.prefix_cache); then left-padded batches, per-row stop.
- batched, no prefix sharing: length-sorted, left-padded batches of --batch-size prompts, each
  encoded whole (share_prefixes off): what batching alone gives.
- one at a time: the first --one-at-a-time-n questions with batch size 1, its per-question time
  extrapolated to --n (printed as such).

The answers of both batched passes are compared with the one-at-a-time answers on the shared questions.

    .venv/bin/python bench/bench_generation.py [--n 200] [--one-at-a-time-n 40] [--batch-size 32]
        [--max-new-tokens 32] [--closed-book] [--model PATH] [--device cpu|cuda] [--threads N]

On a CPU, prefilling long passages is compute-bound and batching alone cannot shrink it; encoding
each passage once for all its questions does (--closed-book: short prompts, decoding dominates).

The model is the converted SmolLM2 cache (lorakit.demo.hubless) when it exists, else --model PATH
(any chat model folder). Skips with a message when the data file or the model is absent.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "squad-v1.1-dev-part-a.json"


def find_model(given: str | None) -> Path | None:
    if given:
        return Path(given)
    from lorakit.demo.hubless import is_converted, model_dir

    folder = model_dir()
    return folder if is_converted(folder) else None


def plain_prefill(prompts: list[list[int]], batch_size: int) -> tuple[int, int]:
    """(prompt tokens, positions computed with padding) of length-sorted, left-padded batches."""
    lengths = sorted((len(p) for p in prompts), reverse=True)
    chunks = [lengths[i : i + batch_size] for i in range(0, len(lengths), batch_size)]
    return sum(lengths), sum(len(c) * c[0] for c in chunks)


def shared_prefill(prompts: list[list[int]], batch_size: int, new_tokens: int) -> tuple[list, int, int, list[int]]:
    """(the shared groups, prompt tokens prefilled, positions computed with padding, questions per
    shared batch) when each batch encodes its distinct prefixes once, then every row's suffix;
    unshared prompts plainly."""
    from lorakit.inference.prefix_cache import group_by_prefix, prefix_batches

    groups = [g for g in group_by_prefix(prompts) if len(g.members) > 1]
    real = slots = 0
    sizes = []
    # the batches generate_batched makes when attention reads each passage once (cache room)
    for batch in prefix_batches(groups, batch_size, lengths=[len(p) for p in prompts], new_tokens=new_tokens):
        sizes.append(len(batch.rows))
        suffixes = [len(prompts[i]) - batch.groups[g].length for i, g in zip(batch.rows, batch.row_group)]
        real += sum(g.length for g in batch.groups) + sum(suffixes)
        slots += len(batch.groups) * max(g.length for g in batch.groups) + len(suffixes) * max(suffixes)
    grouped = {i for g in groups for i in g.members}
    plain_real, plain_slots = plain_prefill([p for i, p in enumerate(prompts) if i not in grouped] or [[]], batch_size)
    return groups, real + plain_real, slots + plain_slots, sizes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=200, help="questions answered in batches")
    parser.add_argument("--one-at-a-time-n", type=int, default=40, help="questions answered one by one (baseline)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--model", default=None, help="a chat model folder (default: the SmolLM2 cache)")
    parser.add_argument(
        "--closed-book",
        action="store_true",
        help="ask without the passage: short prompts, so decoding (what batching speeds up) dominates",
    )
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's own); on a CPU other jobs share, 1 avoids threads waiting on each other",
    )
    args = parser.parse_args()

    if not DATA.is_file():
        print(f"SKIP: {DATA} is absent; this benchmark needs the shared SQuAD file.")
        return 0
    model_path = find_model(args.model)
    if model_path is None or not model_path.is_dir():
        print("SKIP: no SmolLM2-135M-Instruct cache (run `lorakit demo` once to convert it) and no --model PATH given.")
        return 0

    import torch

    from lorakit.data import load_examples
    from lorakit.evaluate.answers import extract_answer
    from lorakit.evaluate.metrics import corpus_metrics
    from lorakit.inference.predictor import load_predictor

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    examples = load_examples(str(DATA)).examples[: args.n]
    single_n = min(args.one_at_a_time_n, len(examples))
    predictor = load_predictor(model_path, device=device)
    decoding = dict(max_new_tokens=args.max_new_tokens, temperature=0.0)
    contexts = [None if args.closed_book else ex.context for ex in examples]
    prompts = [
        predictor.prompt_ids(ex.prompt_messages(), c, max_new_tokens=args.max_new_tokens)
        for ex, c in zip(examples, contexts)
    ]
    lengths = sorted(len(p) for p in prompts)
    print(
        f"model: {model_path.name} on {device} ({torch.get_num_threads()} threads), template '{predictor.template.name}'"
    )
    print(
        f"questions: {len(examples)} from {DATA.name}; prompt tokens median {lengths[len(lengths) // 2]}, "
        f"max {lengths[-1]}; max_new_tokens {args.max_new_tokens}, greedy"
        f"{', closed book (no passage)' if args.closed_book else ', with passages'}"
    )

    groups, real, slots, sizes = shared_prefill(prompts, args.batch_size, args.max_new_tokens)
    _, plain_slots = plain_prefill(prompts, args.batch_size)
    print(
        f"shared prefixes: {sum(len(g.members) for g in groups)} questions in {len(groups)} groups; prefill "
        f"{real} of {sum(lengths)} prompt tokens ({sum(lengths) / real:.1f}x fewer); positions computed with "
        f"padding: {slots} shared, {plain_slots} without sharing; shared batches of {sizes} questions "
        f"(the cache room of {args.batch_size} prompts)"
    )

    predictor.generate_prompts(prompts[:2], batch_size=2, max_new_tokens=2)  # warm-up, not timed

    started = time.perf_counter()
    batched = predictor.generate_prompts(prompts, batch_size=args.batch_size, **decoding)
    batched_s = time.perf_counter() - started

    started = time.perf_counter()
    unshared = predictor.generate_prompts(prompts, batch_size=args.batch_size, share_prefixes=False, **decoding)
    unshared_s = time.perf_counter() - started

    started = time.perf_counter()
    single = [predictor.generate_prompts([p], batch_size=1, **decoding)[0] for p in prompts[:single_n]]
    single_s = time.perf_counter() - started
    per_question = single_s / single_n
    extrapolated = per_question * len(examples)

    same = sum(a.text == b.text for a, b in zip(batched, single))
    same_unshared = sum(a.text == b.text for a, b in zip(unshared, single))
    new_tokens = sum(g.completion_tokens for g in batched)
    quality = corpus_metrics(
        [extract_answer(g.text) for g in batched],
        [ex.answers for ex in examples],
        finish_reasons=[g.finish_reason for g in batched],
    )
    print(
        f"batched, shared prefixes (batch {args.batch_size}): {batched_s:.1f} s for {len(examples)} questions "
        f"({batched_s / len(examples):.3f} s/question, {new_tokens / batched_s:.1f} new tokens/s)"
    )
    print(
        f"batched, no prefix sharing (batch {args.batch_size}): {unshared_s:.1f} s "
        f"({unshared_s / len(examples):.3f} s/question)"
    )
    print(
        f"one at a time: {single_s:.1f} s for {single_n} questions ({per_question:.3f} s/question); "
        f"extrapolated to {len(examples)} questions: {extrapolated:.1f} s"
    )
    print("speed-up over one at a time, per question:")
    print(f"  batched, shared prefixes:   {extrapolated / batched_s:.1f}x  (target 10x)")
    print(f"  batched, no prefix sharing: {extrapolated / unshared_s:.1f}x")
    print(f"  shared prefixes over no sharing: {unshared_s / batched_s:.1f}x")
    print(
        f"identical greedy answers on the {single_n} shared questions: shared prefixes {same}/{single_n}, "
        f"no sharing {same_unshared}/{single_n}"
    )
    print(
        f"batched answers: EM {quality['exact_match']:.1f}  F1 {quality['f1']:.1f}  "
        f"never-stops {quality['never_stops_rate']:.1f}%"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
