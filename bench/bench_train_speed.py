"""Training speed on SQuAD-shaped data: the notebook recipe, TRL's SFTTrainer and lorakit, in one run.

Every row trains SmolLM2-135M-Instruct (float32, CPU) on the same questions, the first --questions
(96) of ../shared/data/squad-v1.1-dev-part-a.json, as encoded by lorakit's `context_qa` template
(max length 512): LoRA r=16, alpha 32, dropout 0.05 on all linear layers (--targets q_proj,v_proj
for the attention pair), micro-batch 8 x accumulation 2, learning rate 2e-4 (cosine, 3% warm-up),
seed 42, --steps optimizer steps (default: questions / 16 = 6). Rows:

  a  notebook recipe: transformers Trainer + peft written out here; every example padded to 512,
     loss on the whole text, pad = eos (so every EOS label is masked, as in the field's notebooks)
  b  TRL SFTTrainer, prompt-completion (loss on the completion), no packing
  c  TRL SFTTrainer, packing (best-fit, padding-free); stopped after --trl-packing-cap-s seconds.
     Its micro-batch is 8 packed rows of up to 512 tokens, so its steps hold more questions
  d  lorakit before issue 11: train.packing=off, train.labelled_logits_only=false;  e  the same with
     labelled_logits_only;  f  packing=examples + labelled_logits_only;  g  packing=passages +
     labelled_logits_only (the default)

Each row is a process of its own (TRL's in --trl-python, an environment lorakit never depends on),
so peak RSS is its own (wait4's ru_maxrss, model load included); its Trainer.training_step is
wrapped to count what each micro-batch holds. Definitions:

  wall s          on_train_begin -> on_train_end of the Trainer, less time spent saving checkpoints
  questions       answers trained on (runs of labelled positions in the batches); q/s: per wall s
  useful tok/s    questions x the mean unpacked length of a question (prompt + answer + EOS, as
                  lorakit encodes it without packing), / wall s: padding never counts and a shared
                  passage counts once per question. Exact when each question is seen once
  processed tok   input_ids positions the model actually ran (padding and packing included)
  % peak          4 x parameters x processed tok / wall s over the float32 matmul rate measured at
                  start and end (the best of the MLP shapes [4096,576]x[576,1536] and its transpose):
                  forward 2 + backward to the activations 2 (6 with checkpointing); LoRA's weight
                  gradients and attention scores are left out
  vs TRL, vs nb   questions/s over the faster TRL row that finished its steps, and over row a;
                  RSS vs TRL is peak RSS over that TRL row's

    .venv/bin/python bench/bench_train_speed.py [--rows abcdefg] [--json OUT] [--quick: 16 q, 1 step, abcdg]

About 30 minutes on an idle 2-core CPU; rows a and c need ~17-19 GB free (else the kernel kills
them). Timings on a shared machine are noisy: only ratios from one run mean anything. Skips with a
message without the data file or the cached model. TRL's environment:
    python3 -m venv /work/bench-env && /work/bench-env/bin/pip install torch==2.13.0 trl peft transformers datasets
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "squad-v1.1-dev-part-a.json"
TRL_PYTHON = Path("/work/bench-env/bin/python")
MICRO, ACCUM, LR, SEED = 8, 2, 2e-4, 42

ROWS: dict[str, tuple[str, str, dict]] = {
    "a": ("notebook recipe (pad 512, loss on all, pad=eos)", "notebook", {}),
    "b": ("TRL SFTTrainer prompt-completion, no packing", "trl", {"packing": False}),
    "c": ("TRL SFTTrainer packing (padding-free)", "trl", {"packing": True}),
    "d": ("lorakit before (packing=off, all logits)", "lorakit", {"packing": "off", "labelled_logits_only": False}),
    "e": ("lorakit labelled_logits_only only", "lorakit", {"packing": "off", "labelled_logits_only": True}),
    "f": ("lorakit packing=examples", "lorakit", {"packing": "examples", "labelled_logits_only": True}),
    "g": ("lorakit packing=passages (default)", "lorakit", {"packing": "passages", "labelled_logits_only": True}),
}


# --- the child: one row, one process --------------------------------------------------------------


def child_main(spec_path: str, result_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    callback = install_meter(spec, Path(result_path))
    (run_lorakit if spec["kind"] == "lorakit" else run_hf)(spec, callback)
    callback.save(done=True)
    return 0


def install_meter(spec: dict, result_path: Path):
    """A TrainerCallback that times the training loop and writes the result file after every step;
    Trainer.training_step and _save_checkpoint are wrapped to count batches and time saves."""
    from transformers import Trainer, TrainerCallback

    result = {"steps": 0, "questions": 0, "processed_tokens": 0, "save_s": 0.0, "wall_s": None, "capped": False}
    found = [name for name in ("torch", "transformers", "peft", "trl") if importlib.util.find_spec(name)]
    result["versions"] = {name: importlib.metadata.version(name) for name in found}
    step, save = Trainer.training_step, Trainer._save_checkpoint

    def training_step(trainer, model, inputs, *args, **kwargs):
        labels = inputs["labels"]
        on = labels != -100  # each question's answer is one run of labelled positions
        result["questions"] += int(on[:, 0].sum() + (on[:, 1:] & ~on[:, :-1]).sum())
        result["processed_tokens"] += int(inputs["input_ids"].numel())
        return step(trainer, model, inputs, *args, **kwargs)

    def save_checkpoint(trainer, *args, **kwargs):
        started = time.perf_counter()
        try:
            return save(trainer, *args, **kwargs)
        finally:
            result["save_s"] += time.perf_counter() - started

    Trainer.training_step, Trainer._save_checkpoint = training_step, save_checkpoint

    class Meter(TrainerCallback):
        start = 0.0

        def save(self, done: bool = False) -> None:
            result["done"] = done
            result_path.write_text(json.dumps(result))

        def elapsed(self) -> float:
            return time.perf_counter() - self.start - result["save_s"]

        def on_train_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_substep_end(self, args, state, control, **kwargs):
            cap = spec.get("cap_s")
            if cap and self.elapsed() > cap:
                control.should_training_stop = result["capped"] = True

        def on_step_end(self, args, state, control, **kwargs):
            result["steps"], result["wall_s"] = state.global_step, self.elapsed()  # kept if killed later
            self.on_substep_end(args, state, control)
            self.save()

        def on_train_end(self, args, state, control, **kwargs):
            result["steps"], result["wall_s"] = state.global_step, self.elapsed()
            self.save()

    return Meter()


def run_hf(spec: dict, callback) -> None:
    """Rows a-c, written as their users write them. The notebook: one text per example, padded to
    max length, labels = input_ids with the pad id (= eos) masked by DataCollatorForLanguageModeling.
    TRL: prompt / completion strings; SFTTrainer tokenizes them, appends EOS and trains on the completion."""
    import torch
    import transformers as hf
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model

    tokenizer = hf.AutoTokenizer.from_pretrained(spec["model"])
    model = hf.AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    targets = spec["targets"] if spec["targets"] == "all-linear" else spec["targets"].split(",")
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=targets, task_type="CAUSAL_LM")
    pairs = [json.loads(line) for line in Path(spec["pairs"]).read_text().splitlines()]
    common = dict(output_dir=spec["work"], max_steps=spec["steps"], per_device_train_batch_size=MICRO, seed=SEED)
    common |= dict(gradient_accumulation_steps=ACCUM, learning_rate=LR, lr_scheduler_type="cosine", warmup_steps=0.03)
    common |= dict(logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True)
    common |= dict(gradient_checkpointing=spec["gradient_checkpointing"])
    if spec["kind"] == "trl":
        from trl import SFTConfig, SFTTrainer

        # TRL defaults to bf16, which this CPU runs at a crawl (and transformers refuses without use_cpu)
        args = SFTConfig(**common, max_length=spec["max_length"], packing=spec["packing"], bf16=False)
        trainer: hf.Trainer = SFTTrainer(
            model=model, args=args, train_dataset=Dataset.from_list(pairs), processing_class=tokenizer, peft_config=lora
        )
    else:
        tokenizer.pad_token = tokenizer.eos_token
        texts = [p["prompt"] + p["completion"] + tokenizer.eos_token for p in pairs]
        encoded = tokenizer(texts, padding="max_length", truncation=True, max_length=spec["max_length"])
        dataset = Dataset.from_dict({"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]})
        collator, args = hf.DataCollatorForLanguageModeling(tokenizer, mlm=False), hf.TrainingArguments(**common)
        trainer = hf.Trainer(get_peft_model(model, lora), args, train_dataset=dataset, data_collator=collator)
    trainer.add_callback(callback)
    trainer.train()


def lorakit_config(spec: dict, **train: object):
    from lorakit.config import LorakitConfig

    targets = spec["targets"] if spec["targets"] == "all-linear" else spec["targets"].split(",")
    return LorakitConfig.model_validate(
        {  # as examples/squad_extractive_qa.yaml, on the cached SmolLM2, no evaluation split
            "data": {"path": spec["squad"], "format": "squad", "split": {"train": 1.0, "validation": 0.0, "test": 0.0}},
            "model": {"name_or_path": spec["model"], "precision": "float32"},
            "template": {"name": "context_qa", "max_length": spec["max_length"]},
            "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": targets},
            "train": {"output_dir": spec["work"], "run_name": "run", "max_steps": spec["steps"], "seed": SEED}
            | {"micro_batch_size": MICRO, "gradient_accumulation": ACCUM, "learning_rate": LR, "logging_steps": 1}
            | {"gradient_checkpointing": spec["gradient_checkpointing"], "best_metric": None, "overwrite": True}
            | train,
        }
    )


def run_lorakit(spec: dict, callback) -> None:
    from lorakit.train.recipe import train

    train(lorakit_config(spec, **spec["train"]), callbacks=[callback])


# --- the parent: data, matmul peak, one subprocess per row, the table ----------------------------


def write_pairs(spec: dict) -> list[int]:
    """lorakit's unpacked encoding of the questions, written as prompt/completion text for the
    rows that tokenize for themselves (so every row trains on the same text); returns the lengths."""
    from lorakit.pipeline import prepare

    prepared = prepare(lorakit_config(spec))
    tokenizer, lines, lengths = prepared.tokenizer, [], []
    for feature in prepared.train_features:
        ids, labels = feature["input_ids"], feature["labels"]
        first = next(i for i, label in enumerate(labels) if label != -100)
        answer = [t for t in ids[first:] if t != tokenizer.eos_token_id]  # TRL appends its own EOS
        lines.append(json.dumps({"prompt": tokenizer.decode(ids[:first]), "completion": tokenizer.decode(answer)}))
        lengths.append(len(ids))
    Path(spec["pairs"]).write_text("\n".join(lines) + "\n")
    return lengths


def matmul_gflops() -> float:
    """The better float32 rate of the model's two MLP matmul shapes (GFLOP/s, this process's threads)."""
    import torch

    best = 0.0
    for k, n in ((576, 1536), (1536, 576)):
        a, b = torch.randn(4096, k), torch.randn(k, n)
        torch.matmul(a, b)  # warm-up
        reps, started = 10, time.perf_counter()
        for _ in range(reps):
            torch.matmul(a, b)
        best = max(best, 2 * 4096 * k * n * reps / (time.perf_counter() - started) / 1e9)
    return best


def count_parameters(model_dir: Path) -> int:
    """Parameters from the safetensors header (tied weights are stored once)."""
    with (model_dir / "model.safetensors").open("rb") as raw:
        header = json.loads(raw.read(int.from_bytes(raw.read(8), "little")))
    return sum(math.prod(entry["shape"]) for name, entry in header.items() if name != "__metadata__")


def run_row(python: str, spec: dict, work: Path, hard_limit_s: float) -> dict:
    """One row in a fresh process; its own peak RSS comes from wait4."""
    spec_path, result_path, log_path = work / "spec.json", work / "result.json", work / "log.txt"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    with log_path.open("w") as log:
        command = [python, __file__, "--child", str(spec_path), str(result_path)]
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        limit_hit = threading.Event()
        timer = threading.Timer(hard_limit_s, lambda: (limit_hit.set(), proc.kill()))
        timer.start()
        _, status, usage = os.wait4(proc.pid, 0)
        timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
    result = json.loads(result_path.read_text()) if result_path.is_file() else {}
    result.update(rc=proc.returncode, rss_gb=usage.ru_maxrss * 1024 / 1e9, log=str(log_path))
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace").strip().splitlines()[-8:]
        # a child killed by SIGKILL is past the hard limit, or else the kernel's out-of-memory victim
        why = " (killed at the hard limit)" if limit_hit.is_set() else " (out of memory? see dmesg)"
        result["error"] = f"exit {proc.returncode}" + (why if proc.returncode == -9 else "")
        print(f"    {result['error']}; last lines of {log_path}:\n      " + "\n      ".join(tail), flush=True)
    return result


def summarise(key: str, r: dict, steps: int, mean_len: float) -> dict:
    out = {"row": key, "label": ROWS[key][0], **r, "finished": r.get("rc") == 0 and r.get("steps", 0) >= steps}
    if r.get("wall_s") and r.get("questions"):
        out["questions_per_s"] = r["questions"] / r["wall_s"]
        out["useful_tokens_per_s"] = r["questions"] * mean_len / r["wall_s"]
    return out


def table(rows: list[dict], steps: int) -> str:
    trl = [r for r in rows if ROWS[r["row"]][1] == "trl" and r["finished"]]
    best_trl = max(trl, key=lambda r: r["questions_per_s"], default=None)
    notebook = next((r for r in rows if r["row"] == "a" and r["finished"]), None)

    def ratio(r: dict, base: dict | None, key: str) -> str:
        return f"{r[key] / base[key]:.2f}x" if base and r.get(key) else ""

    lines = [
        "| row | system | steps | wall s | questions | questions/s | useful tok/s | processed tok "
        "| % matmul peak | peak RSS GB | q/s vs TRL | q/s vs notebook | RSS vs TRL |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "questions_per_s" not in r:
            why = r.get("skipped") or r.get("error") or "no result"
            lines.append(f"| {r['row']} | {r['label']} | {why} |" + " |" * 10)
            continue
        steps_done = f"{r['steps']}" if r["finished"] else f"{r['steps']}/{steps} (did not finish)"
        lines.append(
            f"| {r['row']} | {r['label']} | {steps_done} | {r['wall_s']:.0f} | {r['questions']} "
            f"| {r['questions_per_s']:.3f} | {r['useful_tokens_per_s']:.1f} | {r['processed_tokens']} "
            f"| {100 * r['peak_share']:.0f}% | {r['rss_gb']:.1f} | {ratio(r, best_trl, 'questions_per_s')} "
            f"| {ratio(r, notebook, 'questions_per_s')} | {ratio(r, best_trl, 'rss_gb')} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=96)
    parser.add_argument("--steps", type=int, help="optimizer steps (default: questions / 16)")
    parser.add_argument("--rows", default="abcdefg", help="which rows, e.g. adg")
    parser.add_argument("--targets", default="all-linear", help="LoRA targets: all-linear or e.g. q_proj,v_proj")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="in every row")
    parser.add_argument("--trl-python", default=str(TRL_PYTHON) if TRL_PYTHON.is_file() else None)
    parser.add_argument("--trl-packing-cap-s", type=float, default=600.0)
    parser.add_argument("--row-timeout-s", type=float, default=3600.0, help="hard limit per row (killed)")
    parser.add_argument("--quick", action="store_true", help="16 questions, 1 step, rows a,b,c,d,g")
    parser.add_argument("--json", help="also write the rows as JSON here")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child_main(*args.child)
    if args.quick:
        args.questions, args.steps, args.rows = 16, 1, "abcdg" if args.rows == "abcdefg" else args.rows
    steps = args.steps or max(1, args.questions // (MICRO * ACCUM))

    from lorakit.demo.hubless import is_converted, model_dir

    model = model_dir()
    if not DATA.is_file() or not is_converted(model):
        print(f"skipped: needs {DATA} and the converted SmolLM2 in {model} (lorakit demo fetches it).")
        return 0
    commit = subprocess.run(["git", "-C", str(ROOT), "log", "-1", "--format=%h %s"], capture_output=True, text=True)
    gflops = matmul_gflops()
    params = count_parameters(model)
    flops_per = 6 if args.gradient_checkpointing else 4
    print(
        f"lorakit at {commit.stdout.strip()[:90]}\nfloat32 matmul: {gflops:.0f} GFLOP/s; {params / 1e6:.1f}M parameters"
    )

    work_root = Path(tempfile.mkdtemp(prefix="bench-train-speed-"))
    base = dict(model=str(model), pairs=str(work_root / "pairs.jsonl"), steps=steps, max_length=512)
    base |= dict(targets=args.targets, gradient_checkpointing=args.gradient_checkpointing, work=str(work_root / "prep"))
    from squad_smollm2 import write_subsets  # the first n questions in file order (bench/ is on sys.path)

    base["squad"] = str(write_subsets(args.questions, 1, work_root / "data")[0])
    lengths = write_pairs(base)
    mean_len = sum(lengths) / len(lengths)
    print(
        f"{len(lengths)} questions, {sum(lengths)} tokens unpacked ({mean_len:.0f} per question); "
        f"{steps} steps of {MICRO} x {ACCUM}; LoRA r=16 on {args.targets}; work folder {work_root}\n",
        flush=True,
    )

    rows = []
    for key in args.rows:
        label, kind, options = ROWS[key]
        work = work_root / f"row-{key}"
        work.mkdir()
        spec = {**base, "kind": kind, "work": str(work)}
        python, limit = sys.executable, args.row_timeout_s
        if kind == "trl":
            spec["packing"] = options["packing"]
            if options["packing"]:
                spec["cap_s"] = args.trl_packing_cap_s
                # the cap is checked after each micro-batch; loading and the micro-batch in flight come on top
                limit = min(limit, args.trl_packing_cap_s + 900)
            python = args.trl_python
        elif kind == "lorakit":
            spec["train"] = options
        print(f"[{key}] {label} ...", flush=True)
        if python is None or not Path(python).is_file():
            rows.append({"row": key, "label": label, "skipped": "skipped: no TRL environment (--trl-python)"})
            print("    skipped: no TRL environment; create /work/bench-env or pass --trl-python", flush=True)
            continue
        row = summarise(key, run_row(python, spec, work, limit), steps, mean_len)
        rows.append(row)
        if "questions_per_s" in row:
            unfinished = "" if row["finished"] else f"did not finish {steps} steps: {row['steps']} done in "
            print(
                f"    {unfinished}{row['wall_s']:.0f} s, {row['questions']} questions, {row['questions_per_s']:.3f} q/s, "
                f"{row['useful_tokens_per_s']:.1f} useful tok/s, "
                f"peak RSS {row['rss_gb']:.1f} GB",
                flush=True,
            )

    gflops = max(gflops, matmul_gflops())  # the peak: the better of the measurements at start and end
    for row in rows:
        if "questions_per_s" in row:
            row["peak_share"] = flops_per * params * row["processed_tokens"] / row["wall_s"] / (gflops * 1e9)
    versions = next((r["versions"] for r in rows if ROWS[r["row"]][1] == "trl" and "versions" in r), None)
    print(f"\nSmolLM2-135M-Instruct, float32 CPU, {len(lengths)} SQuAD questions, {steps} steps of {MICRO}x{ACCUM}, ")
    print(f"LoRA r=16 {args.targets}, max length 512; matmul peak {gflops:.0f} GFLOP/s; TRL env: {versions}\n")
    print(table(rows, steps))
    if args.json:
        summary = {"gflops": gflops, "params": params, "steps": steps, "questions": len(lengths), "rows": rows}
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
