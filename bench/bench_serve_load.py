"""Load test of `lorakit serve`: N concurrent clients against a live server on 127.0.0.1.

The server runs as `lorakit serve` in its own process (so the clients do not share its
interpreter lock); the clients are asyncio tasks in this one.

Measures requests per second, p50/p95 latency and errors, twice in the same run: with request
batching (max_batch_size 8, the default) and without it (max_batch_size 1, the baseline), and
prints the throughput ratio. The served model is the tiny test Llama with a random LoRA adapter,
plus SmolLM2-135M-Instruct when lorakit has already converted it (see lorakit.hubless).

    .venv/bin/python bench/bench_serve_load.py [--clients 50] [--requests 4] [--max-tokens 16]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

QUESTIONS = ["What is the capital of France?", "Who wrote the book?", "What color is the sky?",
             "How many legs has a dog?", "Where is Paris?", "What is a fox?"]


def make_run(root: Path, base_dir: Path) -> Path:
    """A run folder with a LoRA adapter on `base_dir` (random non-zero weights: throughput only)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorakit.config import validate_config
    from lorakit.modeling import base_model_identity, load_tokenizer
    from lorakit.runs import RunPaths, atomic_write_text, write_metadata
    from lorakit.templates import resolve_template

    config = validate_config({"data": {"path": "unused.jsonl"}, "model": {"name_or_path": str(base_dir)},
                              "template": {"name": "question_answer"}})
    tokenizer = load_tokenizer(config.model)
    template = resolve_template(config.template, tokenizer, "causal")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
                           LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn_like(param) * 0.01)
    paths = RunPaths(root)
    model.save_pretrained(paths.adapter)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(paths.adapter)
    write_metadata(paths.adapter, base=base_model_identity(config.model), task_type="causal", template=template,
                   precision="float32", system_prompt=None, max_length=512)
    atomic_write_text(paths.config, config.to_yaml())
    return root


def start_server(run: Path, name: str, max_batch_size: int, log: Path, threads: int | None):
    """`lorakit serve NAME=RUN` on a free port of 127.0.0.1; returns (process, base_url)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cmd = [sys.executable, "-m", "lorakit.cli", "serve", f"{name}={run}", "--host", "127.0.0.1",
           "--port", str(port), "--max-batch-size", str(max_batch_size)]
    env = {**os.environ, "LORAKIT_API_KEY": ""}
    if threads:  # on a shared, busy CPU one torch thread per process avoids OpenMP thrashing
        env["OMP_NUM_THREADS"] = str(threads)
    process = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with code {process.returncode}: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("the server did not start within 300 s")


async def load(url: str, model: str, clients: int, requests: int, max_tokens: int) -> dict:
    latencies, errors = [], []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def client(http: httpx.AsyncClient, index: int):
        for r in range(requests):
            question = QUESTIONS[(index + r) % len(QUESTIONS)]
            body = {"model": model, "max_tokens": max_tokens, "messages": [{"role": "user", "content": question}]}
            start = time.perf_counter()
            try:
                response = await http.post("/v1/chat/completions", json=body)
                if response.status_code != 200:
                    errors.append(f"{response.status_code}: {response.text[:200]}")
            except httpx.HTTPError as exc:
                errors.append(repr(exc))
            latencies.append(time.perf_counter() - start)

    started = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        await asyncio.gather(*(client(http, i) for i in range(clients)))
    wall = time.perf_counter() - started
    cuts = statistics.quantiles(latencies, n=20)
    return {"requests": len(latencies), "errors": len(errors), "first_error": errors[0] if errors else None,
            "rps": len(latencies) / wall, "p50": statistics.median(latencies), "p95": cuts[18], "wall": wall}


def bench(run: Path, label: str, args) -> None:
    results = {}
    for batch in (1, args.max_batch_size):
        process, url = start_server(run, label, batch, run.parent / f"server-{label}-{batch}.log", args.threads)
        try:
            asyncio.run(load(url, label, min(4, args.clients), 1, args.max_tokens))  # warm-up
            results[batch] = r = asyncio.run(load(url, label, args.clients, args.requests, args.max_tokens))
        finally:
            process.terminate()
            process.wait(timeout=60)
        print(f"{label:8s} max_batch_size={batch}: {r['requests']} requests from {args.clients} clients in "
              f"{r['wall']:.1f} s, {r['rps']:.2f} req/s, p50 {r['p50'] * 1000:.0f} ms, p95 {r['p95'] * 1000:.0f} ms, "
              f"errors {r['errors']}" + (f" (first: {r['first_error']})" if r["errors"] else ""), flush=True)
    ratio = results[args.max_batch_size]["rps"] / results[1]["rps"]
    print(f"{label:8s} batching speed-up (req/s, batch {args.max_batch_size} / batch 1): {ratio:.2f}x", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--requests", type=int, default=4, help="requests per client")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="torch threads in the server (OMP_NUM_THREADS)")
    parser.add_argument("--no-smollm2", action="store_true", help="only the tiny model")
    args = parser.parse_args()

    from tiny import build_tiny_llama

    with tempfile.TemporaryDirectory(prefix="lorakit-bench-") as tmp:
        tmp = Path(tmp)
        bench(make_run(tmp / "tiny-run", build_tiny_llama(tmp / "tiny-llama")), "tiny", args)
        from lorakit import hubless

        if not args.no_smollm2 and hubless.is_converted(hubless.model_dir()):
            bench(make_run(tmp / "smol-run", hubless.model_dir()), "smollm2", args)
        elif not args.no_smollm2:
            print("SmolLM2 is not converted yet (lorakit.hubless.ensure_smollm2()); skipped.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
