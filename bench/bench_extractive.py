"""What extractive decoding costs per token, and what it does to EM/F1, measured in one run.

Answers SQuAD v1.1 questions (with their passages) from ../shared/data/squad-v1.1-dev-part-a.json
with SmolLM2-135M-Instruct (the base model, no training) and its own chat template, greedy, in
batches, the way `lorakit eval` runs them (shared prefixes on). Three passes, same prompts,
alternated --repeat times, each pass's best time kept:

- prefill only (max_new_tokens 1): the time before the first new token, subtracted below;
- free: no constraint;
- extractive: every answer kept inside a span of its passage (inference.extractive).

Per decoding step: (pass time - prefill time) / decoding steps, where a step is one forward of a
batch (the batch ends when its last row stops); the extractive processor's own time is measured
around its calls, and its one-time set-up (the tokenizer's byte table, each passage's span table)
separately. Times are this process's CPU seconds (time.process_time), so another job sharing the
core does not count; with --threads 1 they are the compute. EM/F1 of both passes use the same
scoring as `lorakit eval`.

    OMP_NUM_THREADS=1 taskset -c 1 .venv/bin/python bench/bench_extractive.py [--n 100] [--batch-size 16]
        [--max-new-tokens 32] [--repeat 2] [--data FILE] [--model PATH] [--device cpu|cuda] [--threads 1]

Skips with a message when the data file or the SmolLM2 cache (`lorakit demo` converts it) is absent.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from bench_generation import DATA, find_model  # the same data file and model lookup (bench/ is on sys.path)

# CPU seconds of this process, not wall time: another job time-sharing the core does not count
clock = time.process_time


class Timed:
    """Wraps ExtractiveSpans.__call__: total seconds inside it and the number of calls (steps)."""

    def __init__(self, cls):
        self.cls, self.original, self.seconds, self.calls = cls, cls.__call__, 0.0, 0
        timer = self

        def call(processor, input_ids, scores):
            started = clock()
            out = timer.original(processor, input_ids, scores)
            timer.seconds += clock() - started
            timer.calls += 1
            return out

        cls.__call__ = call

    def restore(self):
        self.cls.__call__ = self.original


def steps_of(generations, batches):
    """Decoding steps: each batch runs as many steps as its longest row generated."""
    return sum(max(generations[i].completion_tokens for i in rows) for rows in batches)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100, help="questions")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--model", default=None, help="a chat model folder (default: the SmolLM2 cache)")
    parser.add_argument("--data", default=str(DATA), help="a SQuAD-format file (default: the shared SQuAD v1.1 part)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    parser.add_argument("--repeat", type=int, default=2, help="times each pass runs; the best time counts")
    args = parser.parse_args()

    data = Path(args.data)
    if not data.is_file():
        print(f"SKIP: {data} is absent; this benchmark needs the shared SQuAD file.")
        return 0
    model_path = find_model(args.model)
    if model_path is None or not model_path.is_dir():
        print("SKIP: no SmolLM2-135M-Instruct cache (run `lorakit demo` once to convert it) and no --model PATH given.")
        return 0

    import torch

    from lorakit.data import load_examples
    from lorakit.evaluate.answers import extract_answer
    from lorakit.evaluate.metrics import corpus_metrics
    from lorakit.inference import extractive
    from lorakit.inference.predictor import load_predictor
    from lorakit.inference.prefix_cache import group_by_prefix, prefix_batches

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    examples = load_examples(str(data)).examples[: args.n]
    references = [[] if ex.is_impossible else ex.answers for ex in examples]  # []: unanswerable
    predictor = load_predictor(model_path, device=device)
    contexts = [ex.context for ex in examples]
    prompts = [
        predictor.prompt_ids(ex.prompt_messages(), c, max_new_tokens=args.max_new_tokens)
        for ex, c in zip(examples, contexts)
    ]
    groups = group_by_prefix(prompts)
    batches = [b.rows for b in prefix_batches([g for g in groups if len(g.members) > 1], args.batch_size)]
    alone = sorted((i for g in groups if len(g.members) == 1 for i in g.members), key=lambda i: -len(prompts[i]))
    batches += [alone[i : i + args.batch_size] for i in range(0, len(alone), args.batch_size)]
    lengths = sorted(len(p) for p in prompts)
    print(
        f"model: {model_path.name} on {device} ({torch.get_num_threads()} threads), template '{predictor.template.name}'"
    )
    print(
        f"questions: {len(examples)} ({sum(not r for r in references)} unanswerable) on {len(set(contexts))} "
        f"passages from {data.name}; prompt tokens median "
        f"{lengths[len(lengths) // 2]}, max {lengths[-1]}; batch {args.batch_size}, max_new_tokens "
        f"{args.max_new_tokens}, greedy, shared prefixes"
    )

    started = clock()
    vocab = extractive.span_vocabulary(predictor.tokenizer)
    vocab_s = clock() - started
    started = clock()
    for passage in dict.fromkeys(contexts):
        vocab.segments(passage)
    tables_s = clock() - started
    print(
        f"set-up: the tokenizer's byte table {vocab_s:.2f} s (once per tokenizer); span tables of "
        f"{len(set(contexts))} passages {tables_s:.2f} s ({1000 * tables_s / len(set(contexts)):.1f} ms per passage, "
        "built again, inside the timing, by each extractive pass)"
    )

    predictor.generate_prompts(prompts[:2], batch_size=2, max_new_tokens=2)  # warm-up, not timed
    run = dict(batch_size=args.batch_size, temperature=0.0)

    def timed(**options):
        started = clock()
        out = predictor.generate_prompts(prompts, **run, **options)
        return out, clock() - started

    # the passes alternate, --repeat times; each one's best time counts (other jobs share the machine)
    prefill_s = free_s = kept_s = float("inf")
    timer = Timed(extractive.ExtractiveSpans)
    try:
        for _ in range(args.repeat):
            prefill_s = min(prefill_s, timed(max_new_tokens=1)[1])
            free, seconds = timed(max_new_tokens=args.max_new_tokens)
            free_s = min(free_s, seconds)
            vocab._cache.clear()  # each extractive pass builds its passages' span tables itself
            timer.seconds = timer.calls = 0
            kept, seconds = timed(max_new_tokens=args.max_new_tokens, passages=contexts)
            kept_s = min(kept_s, seconds)
    finally:
        timer.restore()

    rows = []
    for name, gens, seconds in (("free", free, free_s), ("extractive", kept, kept_s)):
        steps = steps_of(gens, batches)
        new = sum(g.completion_tokens for g in gens)
        decode = max(seconds - prefill_s, 1e-9)
        quality = corpus_metrics(
            [extract_answer(g.text, predictor.template.stop_strings) for g in gens],
            references,
            finish_reasons=[g.finish_reason for g in gens],
        )
        rows.append((name, seconds, steps, new, decode, quality))
        print(
            f"{name:>10}: {seconds:.1f} CPU s ({prefill_s:.1f} s prefill); {steps} decoding steps, {new} new tokens; "
            f"{1000 * decode / steps:.1f} ms per step, {1000 * decode / new:.2f} ms per new token; "
            f"EM {quality['exact_match']:.1f}  F1 {quality['f1']:.1f}  never-stops {quality['never_stops_rate']:.1f}%"
        )
    free_step = rows[0][4] / rows[0][2]
    kept_step = rows[1][4] / rows[1][2]
    print(
        f"extractive processor (its calls in the last pass; span tables are built outside them): {timer.seconds:.2f} s in {timer.calls} calls = {1000 * timer.seconds / timer.calls:.2f} ms "
        f"per decoding step of up to {args.batch_size} rows ({100 * timer.seconds / timer.calls / free_step:.1f}% of a "
        f"free step); per step, extractive / free: {kept_step / free_step:.2f}x"
    )
    # a row cut by max_new_tokens may end inside a multi-byte character, decoded as U+FFFD
    texts = [g.text.strip().removesuffix("\ufffd") if g.finish_reason == "length" else g.text.strip() for g in kept]
    spans = sum(t in c or t == "unanswerable" for t, c in zip(texts, contexts))
    cut = sum(g.finish_reason == "length" and g.text.strip().endswith("\ufffd") for g in kept)
    print(
        f"extractive answers that are spans of their passage (or the no-answer text): {spans}/{len(kept)} "
        f"({cut} cut by max_new_tokens inside a character, that character dropped)"
    )
    for g, ex in list(zip(zip(free, kept), examples))[:5]:
        print(
            f"  Q: {ex.question[:70]!r} gold {(ex.answers or ['(none)'])[0]!r}\n     free {g[0].text[:70]!r}\n     kept {g[1].text[:70]!r}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
