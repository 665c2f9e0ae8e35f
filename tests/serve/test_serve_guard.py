"""A server that one bad client cannot stall: body-size limit, prompts prepared off the event
loop, generation cancelled when its client leaves, the API key guarding the docs, no filesystem
paths in /v1/models, and streamed usage counting the tokens actually generated.

Every wait here is for an event (a gate the test holds, a job flag), bounded by a generous
deadline that only a broken server reaches; no test depends on how fast this machine is.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
import time

import httpx
import pytest
from test_serve import app, runs, server  # noqa: F401  (module fixtures: a trained run served live)

pytestmark = pytest.mark.integration  # a live server

openai = pytest.importorskip("openai")

DEADLINE = 30.0  # seconds; reached only when the behaviour under test is broken


def _wait_for(condition, what: str) -> None:
    end = time.monotonic() + DEADLINE
    while not condition():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.01)


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def _raw_request(port: int, head: str, body: bytes = b"") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
    sock.sendall(head.encode() + body)
    return sock


def _read_status_and_body(sock: socket.socket) -> tuple[int, dict]:
    """Read one HTTP response (Content-Length framed, as JSONResponse sends) from a raw socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response: {data!r}"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    length = next(int(line.split(":", 1)[1]) for line in lines if line.lower().startswith("content-length:"))
    while len(rest) < length:
        rest += sock.recv(65536)
    return int(lines[0].split()[1]), json.loads(rest[:length])


def _abandon(sock: socket.socket) -> None:
    """Close with RST (linger 0): the client is gone at once, as a killed process would be."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _post_head(path: str, length: int | None = None, chunked: bool = False) -> str:
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {length}"
    return f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n{framing}\r\n\r\n"


class _ModelGate:
    """Hooks on the served base model: counts forward passes (one per decoding step), can hold
    the first one until released, and can forbid EOS so rows generate until max_tokens."""

    def __init__(self, predictor, *, hold: bool = False, no_eos: bool = False, on_step=None):
        self.model = predictor.model.get_base_model()
        self.eos = predictor.tokenizer.eos_token_id
        self.steps, self.hold, self.no_eos, self.on_step = 0, hold, no_eos, on_step
        self.entered, self.release = threading.Event(), threading.Event()

    def _before(self, module, args, kwargs):
        self.steps += 1
        if self.on_step is not None:
            self.on_step(self.steps)
        if self.hold and not self.entered.is_set():
            self.entered.set()
            assert self.release.wait(DEADLINE), "the test never released the gate"

    def _after(self, module, args, kwargs, output):
        if self.no_eos:
            output.logits[..., self.eos] = float("-inf")
        return output

    def __enter__(self):
        self.handles = [
            self.model.register_forward_pre_hook(self._before, with_kwargs=True),
            self.model.register_forward_hook(self._after, with_kwargs=True),
        ]
        return self

    def __exit__(self, *exc):
        self.release.set()
        for handle in self.handles:
            handle.remove()


def _chat(model: str, max_tokens: int, **extra) -> dict:
    return {
        "model": model,
        "max_tokens": max_tokens,
        "temperature": 0,
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        **extra,
    }


# --- 1. one big or slow request must not stall the others -----------------------------------------


def test_health_answers_while_a_prompt_is_being_tokenized(server, monkeypatch):
    """Tokenizing is held inside a gate: /health must still answer, so it runs off the event loop."""
    from lorakit.inference.predictor import Predictor

    entered, release = threading.Event(), threading.Event()
    original = Predictor.prompt_ids

    def gated(self, *args, **kwargs):
        entered.set()
        assert release.wait(DEADLINE)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Predictor, "prompt_ids", gated)
    replies = []
    asker = threading.Thread(
        target=lambda: replies.append(
            httpx.post(f"{server}/v1/chat/completions", json=_chat("qa", 4), timeout=DEADLINE * 2)
        )
    )
    asker.start()
    try:
        assert entered.wait(DEADLINE), "the chat request never reached tokenization"
        health = httpx.get(f"{server}/health", timeout=10)  # times out if tokenizing blocks the event loop
        assert health.status_code == 200 and not replies, "health answered while the prompt was still held"
    finally:
        release.set()
        asker.join(DEADLINE * 2)
    assert replies[0].status_code == 200


def test_a_body_over_the_limit_is_refused_by_its_content_length(server):
    """An 8 MB Content-Length is refused before a byte of the body is sent (default limit 1 MiB)."""
    with _raw_request(_port(server), _post_head("/v1/chat/completions", 8 * 1024 * 1024)) as sock:
        status, body = _read_status_and_body(sock)
    assert status == 413
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == "request_too_large"
    assert "1048576 bytes" in error["message"] and "--max-body-bytes" in error["message"]


def test_a_chunked_body_is_cut_off_once_it_passes_the_limit(server):
    """No Content-Length: the 413 comes while the body is still being sent (it never ends here)."""
    piece = b"x" * 64 * 1024
    chunk = f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
    with _raw_request(_port(server), _post_head("/v1/completions", chunked=True), chunk * 17) as sock:
        status, body = _read_status_and_body(sock)  # 17 x 64 KiB > 1 MiB, and no final chunk is sent
    assert status == 413 and "1048576 bytes" in body["error"]["message"]
    ok = httpx.post(f"{server}/v1/chat/completions", json=_chat("qa", 4), timeout=DEADLINE)
    assert ok.status_code == 200, "the server serves the next client normally"


def test_the_limit_is_configurable(runs):  # noqa: F811
    from fastapi.testclient import TestClient

    from lorakit.serve.app import create_app

    with TestClient(create_app([str(runs[0])], max_body_bytes=2000)) as http:
        small = http.post("/v1/chat/completions", json=_chat("qa", 4))
        big = http.post("/v1/chat/completions", json=_chat("qa", 4, context="y" * 3000))
    assert small.status_code == 200
    assert big.status_code == 413 and "2000 bytes" in big.json()["error"]["message"]


# --- 2. a client that leaves stops costing compute -------------------------------------------------


def test_abandoned_requests_stop_generating(server, app):  # noqa: F811
    """Six clients (five plain, one streaming) send long requests and disconnect while the first is
    being generated. After that, the worker spends no more decoding steps on them: the next
    request runs almost alone. Counted in forward passes, not seconds."""
    state = app.state.lorakit
    jobs, original_submit = [], state.worker.submit
    state.worker.submit = lambda job: jobs.append(job) or original_submit(job)
    port, sockets = _port(server), []
    max_tokens = [40 + i for i in range(6)]  # different settings: six separate batches before the fix
    try:
        with _ModelGate(state.models["other"].predictor, hold=True, no_eos=True) as gate:
            for i, limit in enumerate(max_tokens):
                body = json.dumps(_chat("other", limit, stream=(i == 5))).encode()
                sockets.append(_raw_request(port, _post_head("/v1/chat/completions", len(body)), body))
                if i == 0:
                    assert gate.entered.wait(DEADLINE), "the first request never started generating"
            _wait_for(lambda: len(jobs) == len(max_tokens), "every request to be queued")
            for sock in sockets:
                _abandon(sock)
            _wait_for(lambda: all(job.cancelled for job in jobs), "the server to notice the disconnects")
            gate.steps = 0
            gate.release.set()  # the first request's step finishes; from here on, count steps
            reply = httpx.post(f"{server}/v1/chat/completions", json=_chat("other", 5), timeout=DEADLINE)
            steps = gate.steps
    finally:
        del state.worker.submit
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 5
    # the held step of the first request, then the new request's 5 steps; before the fix the
    # abandoned requests ran to their max_tokens first: sum(max_tokens) = 255 steps
    assert steps <= 1 + 5 + 1, f"{steps} decoding steps; abandoned requests kept generating"


def test_worker_stops_a_running_batch_row_whose_job_is_cancelled(app):  # noqa: F811
    """The stop flag is checked between decoding steps: cancelling mid-generation ends the batch."""
    from lorakit.serve.worker import Job

    served = app.state.lorakit.models["other"]
    with served.view() as view:
        ids = view.prompt_ids([{"role": "user", "content": "hi"}])
    job = Job(served, [ids], 50, 0.0, 1.0)
    with _ModelGate(served.predictor, no_eos=True, on_step=lambda step: step == 3 and job.cancel()) as gate:
        app.state.lorakit.worker.submit(job)
        _wait_for(job.future.done, "the cancelled job to end")
    assert gate.steps == 3, f"generation went on for {gate.steps} steps after its job was cancelled at step 3"


# --- 3. keys, paths and counts ----------------------------------------------------------------------


def test_docs_need_the_key_when_one_is_set(runs):  # noqa: F811
    from fastapi.testclient import TestClient

    from lorakit.serve.app import create_app

    with TestClient(create_app([str(runs[0])], api_key="s3cret")) as http:
        for path in ("/docs", "/redoc", "/openapi.json", "/v1/models"):
            refused = http.get(path)
            assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key", path
        assert http.get("/openapi.json", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert http.get("/health").status_code == 200  # liveness stays open


def test_model_list_shows_no_filesystem_path(server, runs, tiny_llama_dir):  # noqa: F811
    text = httpx.get(f"{server}/v1/models").text
    for secret in (str(tiny_llama_dir), str(runs[0]), str(runs[0].parent)):
        assert secret not in text
    cards = json.loads(text)["data"]
    assert {card["root"] for card in cards} == {tiny_llama_dir.name}


def test_streamed_usage_counts_the_tokens_generated(server, app):  # noqa: F811
    """EOS forbidden: exactly max_tokens are generated, and usage must say so, streamed or not."""
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="not-needed", max_retries=0)
    with _ModelGate(app.state.lorakit.models["other"].predictor, no_eos=True):
        plain = client.chat.completions.create(**_chat("other", 8))
        chunks = list(
            client.chat.completions.create(**_chat("other", 8), stream=True, stream_options={"include_usage": True})
        )
    assert plain.usage.completion_tokens == 8 and plain.choices[0].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == 8
    assert chunks[-1].usage.prompt_tokens == plain.usage.prompt_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == plain.choices[0].message.content
