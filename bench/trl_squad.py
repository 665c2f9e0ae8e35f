"""TRL's row of bench/squad_smollm2.py: SFTTrainer on the same questions, then greedy answers.

Runs in a separate environment (TRL is never a lorakit dependency), started by squad_smollm2.py:

    /work/bench-env/bin/python bench/trl_squad.py --model DIR --pairs train.jsonl --prompts test.jsonl
        --out DIR [--epochs 1]

--pairs: {"prompt", "completion"} lines, the prompt rendered by lorakit's template (the same text
lorakit trains on); TRL tokenizes them, appends EOS and puts the loss on the completion, its
default for prompt-completion data. --prompts: {"id", "prompt"} lines for the test questions.
Writes --out/predictions.jsonl ({"id", "text", "new_tokens", "stopped"}) and --out/trl_row.json
(train and answer wall time, versions, the settings used).

Settings: TRL's documented PEFT recipe (LoraConfig r=32, alpha=16, dropout 0.05; SFTConfig
learning_rate 2e-4), SFTConfig's defaults for everything else, except bf16 off (this CPU runs
bf16 matmuls ~500x slower) and the number of epochs (TRL's default is 3; the row trains the
epochs lorakit's recipe trains, so both see the same data).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

MAX_NEW_TOKENS = 32  # as the lorakit rows (bench_config's eval.max_new_tokens)


def train(args) -> tuple[object, object, float]:
    import torch
    import transformers as hf
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    tokenizer = hf.AutoTokenizer.from_pretrained(args.model)
    model = hf.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    pairs = [json.loads(line) for line in Path(args.pairs).read_text(encoding="utf-8").splitlines() if line]
    lora = LoraConfig(r=32, lora_alpha=16, lora_dropout=0.05, bias="none", task_type="CAUSAL_LM")
    config = SFTConfig(
        output_dir=str(Path(args.out) / "trainer"),
        learning_rate=2e-4,
        num_train_epochs=args.epochs,
        bf16=False,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )
    trainer = SFTTrainer(
        model=model, args=config, train_dataset=Dataset.from_list(pairs), processing_class=tokenizer, peft_config=lora
    )
    started = time.perf_counter()
    trainer.train()
    return trainer.model, tokenizer, time.perf_counter() - started


def answer(model, tokenizer, prompts: list[dict], batch_size: int = 16) -> tuple[list[dict], float]:
    """Greedy answers, left-padded batches of similar length, as a TRL user evaluates."""
    import torch

    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]["prompt"]))
    out: dict[int, dict] = {}
    started = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            batch = tokenizer(
                [prompts[i]["prompt"] for i in chunk], return_tensors="pt", padding=True, add_special_tokens=False
            )
            generated = model.generate(
                **batch, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
            for i, row in zip(chunk, generated[:, batch["input_ids"].shape[1] :].tolist()):
                stop = next((k for k, t in enumerate(row) if t == tokenizer.eos_token_id), None)
                kept = row if stop is None else row[:stop]
                text = tokenizer.decode(kept, skip_special_tokens=True)
                out[i] = {"id": prompts[i]["id"], "text": text, "new_tokens": len(kept), "stopped": stop is not None}
    return [out[i] for i in range(len(prompts))], time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--pairs", required=True)
    parser.add_argument("--prompts", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--epochs", type=float, default=1.0)
    args = parser.parse_args()
    import peft
    import transformers
    import trl

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer, train_s = train(args)
    prompts = [json.loads(line) for line in Path(args.prompts).read_text(encoding="utf-8").splitlines() if line]
    predictions, answer_s = answer(model, tokenizer, prompts)
    (out / "predictions.jsonl").write_text("".join(json.dumps(p) + "\n" for p in predictions), encoding="utf-8")
    row = {
        "train_s": train_s,
        "eval_s": answer_s,
        "versions": {"trl": trl.__version__, "peft": peft.__version__, "transformers": transformers.__version__},
        "settings": "LoraConfig(r=32, alpha=16, dropout=0.05), SFTConfig(learning_rate=2e-4, bf16=False), "
        f"{args.epochs:g} epoch(s), other SFTConfig defaults",
    }
    (out / "trl_row.json").write_text(json.dumps(row, indent=2), encoding="utf-8")
    print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
