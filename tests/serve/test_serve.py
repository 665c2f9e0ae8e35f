"""The OpenAI-compatible server, live on 127.0.0.1 and driven by the official `openai` client:
served answers equal `lorakit generate`'s, streaming, two adapters on one base, batching under
50 concurrent clients, and OpenAI-style 4xx errors for every kind of bad request."""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from lorakit.cli_commands import generate_command
from lorakit.config_loading import validate_config
from lorakit.errors import ServeError
from lorakit.serve.app import create_app

pytestmark = pytest.mark.integration  # a trained run behind a live server

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

PAIRS = [
    ("What is the capital of France?", "Paris"),
    ("Who wrote the book?", "the author"),
    ("What color is the sky?", "blue"),
    ("How many legs has a dog?", "four"),
]
QUESTION = PAIRS[0][0]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def runs(tiny_llama_dir, tmp_path_factory):
    """Run "qa" trained by lorakit on a few Q/A pairs; run "other" is the same with its adapter
    weights perturbed, so both share one base model but answer differently."""
    from safetensors.torch import load_file, save_file

    from lorakit.train.recipe import train

    tmp = tmp_path_factory.mktemp("serve")
    data = tmp / "qa.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in PAIRS))
    config = validate_config(
        {
            "data": {"path": str(data), "split": {"train": 1.0, "validation": 0.0, "test": 0.0}},
            "model": {"name_or_path": str(tiny_llama_dir)},
            "template": {"name": "question_answer", "max_length": 64},
            # attention-only LoRA at the rate below: the learning these tests were measured on
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "auto"},
            "train": {
                "output_dir": str(tmp / "runs"),
                "run_name": "qa",
                "max_steps": 40,
                "micro_batch_size": 4,
                "learning_rate": 2e-2,
                "logging_steps": 10,
                "warmup_ratio": 0.0,
                "lr_scheduler": "constant",
            },
        }
    )
    qa = train(config).root
    other = tmp / "runs" / "other"
    shutil.copytree(qa, other)
    weights = other / "adapter" / "adapter_model.safetensors"
    torch.manual_seed(3)
    save_file({k: torch.randn_like(v) * 0.5 for k, v in load_file(weights).items()}, weights)
    return qa, other


@pytest.fixture(scope="module")
def expected(runs):
    qa, other = runs
    return {
        "qa": generate_command(str(qa), QUESTION, max_new_tokens=MAX_TOKENS),
        "other": generate_command(str(other), QUESTION, max_new_tokens=MAX_TOKENS),
    }


@pytest.fixture(scope="module")
def app(runs):
    qa, other = runs
    return create_app([str(qa), f"other={other}"], max_tokens_limit=64, max_batch_size=8, max_wait_ms=20)


@pytest.fixture(scope="module")
def server(app):
    """uvicorn serving `app` on a free port of 127.0.0.1, in a thread."""
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started:
        assert time.time() < deadline, "server did not start"
        time.sleep(0.05)
    port = srv.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=30)


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="not-needed", max_retries=0)


def ask(model: str, question: str = QUESTION) -> dict:
    return {
        "model": model,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "messages": [{"role": "user", "content": question}],
    }


# --- the OpenAI client against a live server ----------------------------------------------------


def test_chat_answer_equals_generate_command(client, expected):
    assert expected["qa"].strip() == "Paris", "the trained run answers its training question"
    assert expected["qa"] != expected["other"], "the two adapters must answer differently for the test to mean anything"
    reply = client.chat.completions.create(**ask("qa"))
    assert reply.choices[0].message.content == expected["qa"]
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens > 5 and 0 < reply.usage.completion_tokens <= MAX_TOKENS
    assert reply.model == "qa"


def test_streaming_chat_joins_to_the_same_answer(client, expected):
    chunks = list(client.chat.completions.create(**ask("qa"), stream=True, stream_options={"include_usage": True}))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == expected["qa"]
    assert chunks[0].choices[0].delta.role == "assistant"
    finishing = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishing and finishing[-1] in ("stop", "length")
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_sse_format_ends_with_done(server):
    with httpx.stream("POST", f"{server}/v1/chat/completions", json={**ask("qa"), "stream": True}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    first = json.loads(lines[0][6:])
    assert first["object"] == "chat.completion.chunk" and first["choices"][0]["delta"]["role"] == "assistant"


def test_completions_on_the_rendered_prompt(client, app, expected):
    prompt = app.state.lorakit.models["qa"].predictor.prompt_for([{"role": "user", "content": QUESTION}])
    reply = client.completions.create(model="qa", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
    assert reply.choices[0].text == expected["qa"]
    streamed = client.completions.create(model="qa", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == expected["qa"]
    several = client.completions.create(model="qa", prompt=[prompt, prompt], max_tokens=MAX_TOKENS, temperature=0)
    assert [c.text for c in several.choices] == [expected["qa"]] * 2 and [c.index for c in several.choices] == [0, 1]


def test_model_list_and_health(client, server):
    assert sorted(m.id for m in client.models.list().data) == ["other", "qa"]
    assert client.models.retrieve("other").id == "other"
    assert httpx.get(f"{server}/health").json() == {"status": "ok", "models": ["qa", "other"]}


def test_two_adapters_share_one_base_and_are_chosen_by_model(client, app, expected):
    models = app.state.lorakit.models
    qa, other = models["qa"].predictor, models["other"].predictor
    assert qa.model is other.model
    assert qa.model.get_base_model().model.embed_tokens.weight is other.model.get_base_model().model.embed_tokens.weight
    assert set(qa.model.peft_config) == {qa.adapter_name, other.adapter_name} and qa.adapter_name != other.adapter_name
    for name in ("other", "qa", "other", "qa"):  # switching back and forth picks the right adapter
        assert client.chat.completions.create(**ask(name)).choices[0].message.content == expected[name]


def test_fifty_concurrent_clients_are_batched(server, app, expected):
    predictor = app.state.lorakit.models["qa"].predictor
    sizes, original = [], predictor.generate_prompts

    def recording(prompts, **kwargs):
        sizes.append(len(prompts))
        return original(prompts, **kwargs)

    predictor.generate_prompts = recording
    try:
        with httpx.Client(base_url=server, timeout=120) as http, ThreadPoolExecutor(50) as pool:
            replies = list(pool.map(lambda _: http.post("/v1/chat/completions", json=ask("qa")), range(50)))
    finally:
        del predictor.generate_prompts
    assert [r.status_code for r in replies] == [200] * 50
    assert {r.json()["choices"][0]["message"]["content"] for r in replies} == {expected["qa"]}
    assert sum(sizes) == 50 and max(sizes) > 1 and max(sizes) <= 8


def test_one_log_line_per_request(client, caplog):
    with caplog.at_level(logging.INFO, logger="lorakit.serve"):
        client.chat.completions.create(**ask("qa"))
    lines = [r.getMessage() for r in caplog.records if r.name == "lorakit.serve" and "/v1/chat" in r.getMessage()]
    assert len(lines) == 1
    assert "model=qa" in lines[0] and "status=200" in lines[0] and "latency_ms=" in lines[0]
    assert "tokens_in=0" not in lines[0] and "tokens_out=" in lines[0]


# --- bad requests: 4xx with an OpenAI error body, never a 500 ------------------------------------


def _error(response, status: int, param=None, code=None) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    return error["message"]


@pytest.mark.parametrize(
    "body, param, code",
    [
        ({"model": "qa", "messages": []}, "messages", None),
        ({"model": "qa", "messages": "hello"}, "messages", None),
        ({"model": "qa"}, "messages", None),
        ({"messages": [{"role": "user", "content": "hi"}]}, "model", None),
        ({"model": "qa", "messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role", None),
        ({"model": "qa", "messages": [{"role": "user", "content": 5}]}, None, None),
        ({**ask("qa"), "max_tokens": "many"}, "max_tokens", None),
        ({**ask("qa"), "max_tokens": 0}, "max_tokens", None),
        ({**ask("qa"), "temperature": -1}, "temperature", None),
        ({**ask("qa"), "stream": "yes"}, "stream", None),
        ({**ask("qa"), "n": 2}, "n", "unsupported_parameter"),
        ({**ask("qa"), "max_tokens": 65}, "max_tokens", "max_tokens_exceeded"),
        ({"model": "qa", "messages": [{"role": "assistant", "content": "hi"}]}, "messages", None),
    ],
)
def test_bad_chat_requests(server, body, param, code):
    _error(httpx.post(f"{server}/v1/chat/completions", json=body), 400, param, code)


def test_malformed_and_misplaced_requests(server):
    url = f"{server}/v1/chat/completions"
    assert "not valid JSON" in _error(
        httpx.post(url, content=b"{bad json", headers={"content-type": "application/json"}), 400
    )
    assert "JSON object" in _error(httpx.post(url, json=[1, 2]), 400)
    assert "empty" in _error(httpx.post(url, content=b""), 400)
    assert "does not exist" in _error(httpx.post(url, json=ask("nope")), 404, "model", "model_not_found")
    _error(httpx.get(f"{server}/v1/nowhere"), 404)
    _error(httpx.get(url), 405)
    _error(httpx.post(f"{server}/v1/completions", json={"model": "qa", "prompt": ""}), 400, "prompt")
    _error(httpx.post(f"{server}/v1/completions", json={"model": "qa", "prompt": [1, 2]}), 400)
    _error(httpx.post(f"{server}/v1/completions", json={"model": "qa", "prompt": "x", "echo": True}), 400, "echo")


def test_context_length_is_checked(server, app):
    context = app.state.lorakit.models["qa"].predictor.max_context
    long_question = "fox " * (context + 10)
    message = _error(
        httpx.post(f"{server}/v1/chat/completions", json=ask("qa", long_question)), 400, code="context_length_exceeded"
    )
    assert str(context) in message
    still_fine = httpx.post(f"{server}/v1/chat/completions", json=ask("qa"))
    assert still_fine.status_code == 200


def test_api_key_is_required_when_set(runs, monkeypatch):
    from fastapi.testclient import TestClient

    monkeypatch.setenv("LORAKIT_API_KEY", "s3cret")
    with TestClient(create_app([str(runs[0])], max_tokens_limit=16)) as http:
        assert "API key" in _error(http.get("/v1/models"), 401, code="invalid_api_key")
        _error(http.post("/v1/chat/completions", json=ask("qa"), headers={"Authorization": "Bearer wrong"}), 401)
        ok = http.get("/v1/models", headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200 and ok.json()["data"][0]["id"] == "qa"
        assert http.get("/health").status_code == 200  # liveness stays open


def test_duplicate_model_ids_are_refused(runs):
    with pytest.raises(ServeError, match="both be served as 'qa'"):
        create_app([str(runs[0]), f"qa={runs[1]}"])


# --- the batching worker on its own ---------------------------------------------------------------


class _Recorder:
    """Stands in for a Predictor: records each generate call and answers with the prompt. Its
    first call waits at a gate, so the test can queue jobs while the worker is known to be busy."""

    def __init__(self):
        self.calls = []
        self.entered, self.release = threading.Event(), threading.Event()

    def generate_prompts(self, prompts, **decoding):
        from lorakit.inference.decoding import Generation

        if not self.entered.is_set():
            self.entered.set()
            assert self.release.wait(30), "the test never opened the gate"
        self.calls.append((list(prompts), decoding["max_new_tokens"]))
        return [Generation(f"re:{p}", f"re:{p}", 1, 1, "stop") for p in prompts]


def _job(name, predictor, prompt, max_new=8):
    from types import SimpleNamespace

    from lorakit.serve.worker import Job

    return Job(SimpleNamespace(name=name, predictor=predictor), [prompt], max_new, 0.0, 1.0)


def test_worker_groups_only_compatible_jobs_and_survives_cancelled_ones():
    from lorakit.serve.worker import BatchWorker

    recorder = _Recorder()
    worker = BatchWorker(max_batch_size=3, max_wait_ms=50)
    try:
        blocker = worker.submit(_job("a", recorder, "first"))
        assert recorder.entered.wait(30), "the worker never started the first job"
        # the worker is held inside the first batch: everything below is queued before it looks again
        jobs = [worker.submit(_job("a", recorder, f"a{i}")) for i in range(4)]
        other = worker.submit(_job("a", recorder, "long", max_new=99))  # different decoding: its own batch
        gone = worker.submit(_job("a", recorder, "gone"))
        gone.cancel()  # its client disconnected before it ran
        recorder.release.set()
        results = [j.future.result(timeout=30)[0].text for j in [blocker, *jobs, other]]
    finally:
        recorder.release.set()
        worker.stop()
    assert results == ["re:first", "re:a0", "re:a1", "re:a2", "re:a3", "re:long"]
    batches = [(sorted(p), m) for p, m in recorder.calls]
    assert batches == [(["first"], 8), (["a0", "a1", "a2"], 8), (["a3"], 8), (["long"], 99)]
    assert gone.future.cancelled()


def test_busy_port_is_a_clear_error(runs):
    import socket

    from lorakit.serve.app import run_server

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ServeError, match=f"cannot listen on 127.0.0.1:{port}"):
            run_server([str(runs[0])], port=port)
