"""Load test of `lorakit serve`: N concurrent clients against a live server on 127.0.0.1.

The server runs as `lorakit serve` in its own process (so the clients do not share its
interpreter lock); the clients are asyncio tasks in this one.

Measures requests per second, p50/p95 latency and errors, twice in the same run: with request
batching (max_batch_size 8, the default) and without it (max_batch_size 1, the baseline), and
prints the throughput ratio. The served model is the tiny test Llama with a random LoRA adapter,
plus SmolLM2-135M-Instruct when lorakit has already converted it (see lorakit.demo.hubless).

Then a mixed load: among the same number of concurrent clients, a tenth each are slow (they send
their body in pieces over about a second), abandoning (they disconnect mid-request) and oversized
(2 MiB bodies, half with Content-Length, half chunked), while a prober asks /health every 50 ms.
It reports p50/p95, errors and 5xx per kind of client, and the worst /health latency (targets:
no 5xx, /health always under 100 ms). All traffic goes to 127.0.0.1 and every loop is bounded.

    .venv/bin/python bench/bench_serve_load.py [--clients 50] [--requests 4] [--max-tokens 16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
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

QUESTIONS = [
    "What is the capital of France?",
    "Who wrote the book?",
    "What color is the sky?",
    "How many legs has a dog?",
    "Where is Paris?",
    "What is a fox?",
]


def make_run(root: Path, base_dir: Path) -> Path:
    """A run folder with a LoRA adapter on `base_dir` (random non-zero weights: throughput only)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorakit.config_loading import validate_config
    from lorakit.files import atomic_write_text
    from lorakit.models.identity import base_model_identity
    from lorakit.models.loading import load_tokenizer
    from lorakit.prompting.templates import resolve_template
    from lorakit.run_metadata import write_metadata
    from lorakit.runs import RunPaths

    config = validate_config(
        {
            "data": {"path": "unused.jsonl"},
            "model": {"name_or_path": str(base_dir)},
            "template": {"name": "question_answer"},
        }
    )
    tokenizer = load_tokenizer(config.model)
    template = resolve_template(config.template, tokenizer, "causal")
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
        LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    )
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn_like(param) * 0.01)
    paths = RunPaths(root)
    model.save_pretrained(paths.adapter)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(paths.adapter)
    write_metadata(
        paths.adapter,
        base=base_model_identity(config.model),
        task_type="causal",
        template=template,
        precision="float32",
        max_length=512,
    )
    atomic_write_text(paths.config, config.to_yaml())
    return root


def start_server(run: Path, name: str, max_batch_size: int, log: Path, threads: int | None):
    """`lorakit serve NAME=RUN` on a free port of 127.0.0.1; returns (process, base_url)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "lorakit.cli",
        "serve",
        f"{name}={run}",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-batch-size",
        str(max_batch_size),
    ]
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
    return {
        "requests": len(latencies),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "rps": len(latencies) / wall,
        "p50": statistics.median(latencies),
        "p95": cuts[18],
        "wall": wall,
    }


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
        print(
            f"{label:8s} max_batch_size={batch}: {r['requests']} requests from {args.clients} clients in "
            f"{r['wall']:.1f} s, {r['rps']:.2f} req/s, p50 {r['p50'] * 1000:.0f} ms, p95 {r['p95'] * 1000:.0f} ms, "
            f"errors {r['errors']}" + (f" (first: {r['first_error']})" if r["errors"] else ""),
            flush=True,
        )
    ratio = results[args.max_batch_size]["rps"] / results[1]["rps"]
    print(f"{label:8s} batching speed-up (req/s, batch {args.max_batch_size} / batch 1): {ratio:.2f}x", flush=True)


# --- mixed load: slow, abandoning and oversized clients among normal ones --------------------------

OVERSIZED = 2 * 1024 * 1024  # twice the server's default body limit


async def _raw_post(url: str, body: bytes, *, pieces: int = 1, pause: float = 0.0, abandon_after: float | None = None):
    """POST over a bare socket: the body in `pieces` with `pause` between them (a slow client), or
    closed `abandon_after` seconds after sending (a client that gives up). Returns the status or None."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
        )
        step = -(-len(body) // pieces)
        for start in range(0, len(body), step):
            writer.write(body[start : start + step])
            await writer.drain()
            if pause:
                await asyncio.sleep(pause)
        if abandon_after is not None:
            await asyncio.sleep(abandon_after)
            writer.transport.abort()  # gone at once, mid-generation
            return None
        status_line = await asyncio.wait_for(reader.readline(), timeout=600)
        return int(status_line.split()[1])
    finally:
        writer.close()


def _probe_health(url: str, stop, results) -> None:
    """/health every 50 ms until `stop`, in a process of its own: timed from a thread of the
    load's process, its latency would include waiting for that process's interpreter lock."""
    latencies = []
    with httpx.Client(base_url=url, timeout=10) as http:
        while not stop.is_set() and len(latencies) < 100_000:
            start = time.perf_counter()
            try:
                ok = http.get("/health").status_code == 200
            except httpx.HTTPError:
                ok = False
            latencies.append((time.perf_counter() - start) if ok else float("inf"))
            stop.wait(0.05)
    results.put(latencies)


async def mixed_load(url: str, model: str, clients: int, requests: int, max_tokens: int) -> dict:
    tenth = max(1, clients // 10)
    kinds = ["slow"] * tenth + ["abandoning"] * tenth + ["oversized"] * tenth
    kinds += ["normal"] * (clients - len(kinds))
    stats = {kind: {"sent": 0, "statuses": [], "latencies": [], "errors": []} for kind in dict.fromkeys(kinds)}
    # valid JSON, so that a server without a limit parses and tokenizes all of it
    huge = json.dumps(
        {"model": model, "max_tokens": max_tokens, "messages": [{"role": "user", "content": "fox " * (OVERSIZED // 4)}]}
    ).encode()
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def client(http: httpx.AsyncClient, index: int, kind: str):
        for r in range(requests):
            question = QUESTIONS[(index + r) % len(QUESTIONS)]
            body = {"model": model, "max_tokens": max_tokens, "messages": [{"role": "user", "content": question}]}
            record, start = stats[kind], time.perf_counter()
            record["sent"] += 1
            try:
                if kind == "normal":
                    status = (await http.post("/v1/chat/completions", json=body)).status_code
                elif kind == "slow":
                    status = await _raw_post(url, json.dumps(body).encode(), pieces=10, pause=0.1)
                elif kind == "abandoning":  # a long answer it will not wait for
                    long = {**body, "max_tokens": max_tokens * 8, "temperature": 1.0}
                    status = await _raw_post(url, json.dumps(long).encode(), abandon_after=0.2)
                elif r % 2:  # oversized, chunked (no Content-Length)

                    async def chunks():
                        for start_at in range(0, len(huge), 64 * 1024):
                            yield huge[start_at : start_at + 64 * 1024]

                    status = (await http.post("/v1/chat/completions", content=chunks())).status_code
                else:  # oversized, with Content-Length
                    status = (await http.post("/v1/chat/completions", content=huge)).status_code
            except (httpx.HTTPError, OSError, asyncio.TimeoutError) as exc:
                record["errors"].append(repr(exc))
                continue
            record["latencies"].append(time.perf_counter() - start)
            record["statuses"].append(status)
            expected = {"normal": 200, "slow": 200, "abandoning": None, "oversized": 413}[kind]
            if status != expected:
                record["errors"].append(f"status {status}")

    spawn = multiprocessing.get_context("spawn")
    stop, results = spawn.Event(), spawn.Queue()
    prober = spawn.Process(target=_probe_health, args=(url, stop, results), daemon=True)
    prober.start()
    await asyncio.sleep(2.0)  # the prober's interpreter starts before the load does
    started = time.perf_counter()
    try:
        async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
            await asyncio.gather(*(client(http, i, kind) for i, kind in enumerate(kinds)))
    finally:
        stop.set()
        health = results.get(timeout=60)
        prober.join(timeout=30)
    return {"kinds": stats, "health": health, "wall": time.perf_counter() - started}


def bench_mixed(run: Path, label: str, args) -> None:
    process, url = start_server(run, label, args.max_batch_size, run.parent / f"server-{label}-mixed.log", args.threads)
    try:
        asyncio.run(load(url, label, min(4, args.clients), 1, args.max_tokens))  # warm-up
        result = asyncio.run(mixed_load(url, label, args.clients, args.requests, args.max_tokens))
    finally:
        process.terminate()
        process.wait(timeout=60)
    print(
        f"{label}: mixed load, {args.clients} concurrent clients x {args.requests} requests, "
        f"max_batch_size {args.max_batch_size}, {result['wall']:.1f} s",
        flush=True,
    )
    print(
        f"  {'clients':11s} {'requests':>8s} {'200':>5s} {'413':>5s} {'5xx':>5s} {'abandoned':>9s} "
        f"{'errors':>6s} {'p50 ms':>8s} {'p95 ms':>8s}"
    )
    for kind, record in result["kinds"].items():
        statuses, latencies = record["statuses"], sorted(record["latencies"])
        if kind == "abandoning":
            latencies = []  # they left on purpose: their time says nothing
        p50 = f"{statistics.median(latencies) * 1000:.0f}" if latencies else "-"
        p95 = f"{latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))] * 1000:.0f}" if latencies else "-"
        print(
            f"  {kind:11s} {record['sent']:8d} {statuses.count(200):5d} {statuses.count(413):5d} "
            f"{sum(1 for s in statuses if s is not None and s >= 500):5d} {statuses.count(None):9d} "
            f"{len(record['errors']):6d} {p50:>8s} {p95:>8s}"
            + (f"  first error: {record['errors'][0]}" if record["errors"] else "")
        )
    health = sorted(result["health"])
    print(
        f"  /health: {len(health)} probes, p50 {statistics.median(health) * 1000:.1f} ms, "
        f"max {health[-1] * 1000:.1f} ms, over 100 ms: {sum(1 for h in health if h > 0.1)}",
        flush=True,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--requests", type=int, default=4, help="requests per client")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="torch threads in the server (OMP_NUM_THREADS)")
    parser.add_argument("--no-smollm2", action="store_true", help="only the tiny model")
    parser.add_argument("--only", choices=["batching", "mixed"], default=None, help="run one of the two loads")
    args = parser.parse_args()

    def bench_all(run: Path, label: str) -> None:
        if args.only != "mixed":
            bench(run, label, args)
        if args.only != "batching":
            bench_mixed(run, label, args)

    from tiny import build_tiny_llama

    with tempfile.TemporaryDirectory(prefix="lorakit-bench-") as tmp:
        tmp = Path(tmp)
        bench_all(make_run(tmp / "tiny-run", build_tiny_llama(tmp / "tiny-llama")), "tiny")
        from lorakit.demo import hubless

        if not args.no_smollm2 and hubless.is_converted(hubless.model_dir()):
            bench_all(make_run(tmp / "smol-run", hubless.model_dir()), "smollm2")
        elif not args.no_smollm2:
            print("SmolLM2 is not converted yet (lorakit.demo.hubless.ensure_smollm2()); skipped.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
