"""An OpenAI-compatible HTTP server for lorakit runs and merged models.

    POST /v1/chat/completions   chat messages -> the run's own training template -> answer
    POST /v1/completions        raw prompt text -> continuation
    GET  /v1/models             the served model ids (run folder names, or NAME=PATH names)
    GET  /health                liveness

One worker thread owns the models: requests wait in a queue and requests for the same model with
the same decoding settings are generated together, up to `max_batch_size` prompts gathered within
`max_wait_ms`. Several adapters trained on the same base model share one copy of its weights (peft
`load_adapter`), the request's `model` field picking the adapter.
"""
# No `from __future__ import annotations` here: FastAPI reads the route annotations (Request)
# at definition time, and those names are imported lazily inside create_app.


import asyncio
import copy
import hmac
import json
import logging
import os
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from .errors import LorakitError, ModelError, ServeError, require
from .serve_schemas import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    chat_chunk,
    chat_response,
    completion_chunk,
    completion_response,
    error_body,
    model_card,
    new_id,
    parse_request,
    usage_chunk,
)
from .serve_worker import BatchWorker, Job

logger = logging.getLogger("lorakit.serve")
API_KEY_ENV = "LORAKIT_API_KEY"


# --- loading the models --------------------------------------------------------------------------


@dataclass
class ServedModel:
    """One model id: its Predictor, plus a view of it with a private tokenizer copy, so the
    event-loop thread builds prompt ids and counts tokens while the worker uses the original."""

    name: str
    predictor: object
    base: Optional[str]
    created: int

    def __post_init__(self):
        self.view = copy.copy(self.predictor)
        self.view.tokenizer = copy.deepcopy(self.predictor.tokenizer)

    def count(self, text: str) -> int:
        return self.view.count_tokens(text)


def _split_spec(spec: str) -> tuple[Optional[str], str]:
    """"NAME=PATH" -> (NAME, PATH); a plain path -> (None, path). A path may itself hold '='."""
    name, sep, path = spec.partition("=")
    if sep and name and "/" not in name and "\\" not in name and not Path(spec).exists():
        return name, path
    return None, spec


def _base_key(info) -> Optional[tuple]:
    """What must match for two adapters to share one loaded base model (None: cannot share)."""
    if info.is_merged:
        return None
    base = info.base
    quantization = info.config.model.quantization if info.config is not None else "none"
    return (base.get("name_or_path"), base.get("gguf_file"), base.get("revision"), base.get("sha256"),
            info.task_type, info.precision, quantization)


def load_models(specs: list[str], *, device: Optional[str] = None) -> dict[str, ServedModel]:
    """Load each run (or merged folder) once; adapters of one base model share its weights.

    Raises:
        ServeError: no paths, or two models would get the same id.
        RunError / ModelError: a folder is not a usable run, or its model cannot be loaded.
    """
    from .infer import Predictor, load_predictor
    from .runs import read_run

    if not specs:
        raise ServeError("no model to serve.", hint="pass one or more run folders: lorakit serve runs/NAME")
    served: dict[str, ServedModel] = {}
    hosts: dict[tuple, object] = {}  # base key -> the predictor whose model holds that base
    for spec in specs:
        name, path = _split_spec(spec)
        info = read_run(path)
        name = name or info.root.resolve().name
        if name in served:
            raise ServeError(
                f"two models would both be served as '{name}' ('{path}' and an earlier one).",
                hint=f"name them explicitly: lorakit serve first={path} second=OTHER_PATH",
            )
        key = _base_key(info)
        host = hosts.get(key) if key is not None else None
        if host is None:
            predictor = load_predictor(path, device=device)
            if key is not None:
                # name the first adapter too, so switching back to it after another one works
                predictor.adapter_name = predictor.model.active_adapter
                hosts[key] = predictor
        else:
            adapter_name = f"served_{len(served)}"  # model ids may hold '.', which peft names may not
            host.model.load_adapter(str(info.adapter_dir), adapter_name=adapter_name)
            predictor = Predictor(
                host.model, _run_tokenizer(info.adapter_dir, host.tokenizer), info.template,
                task_type=info.task_type, name=name, system_prompt=info.system_prompt,
                adapter_name=adapter_name, max_length=info.max_length,
            )
            logger.info("model %s shares the base weights already loaded for %s", name, host.name)
        served[name] = ServedModel(name=name, predictor=predictor, base=info.base.get("name_or_path"),
                                   created=int(Path(path).stat().st_mtime))
    return served


def _run_tokenizer(adapter_dir: Path, fallback):
    """The tokenizer saved beside an adapter (the one its training used), else the host's."""
    if not (adapter_dir / "tokenizer_config.json").is_file():
        return fallback
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# --- the HTTP app --------------------------------------------------------------------------------


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class _Server:
    """The state behind the routes: models, worker and limits."""

    def __init__(self, models: dict[str, ServedModel], worker: BatchWorker, max_tokens_limit: int):
        self.models = models
        self.worker = worker
        self.max_tokens_limit = max_tokens_limit

    def model(self, name: str) -> ServedModel:
        if name not in self.models:
            raise APIError(404, f"the model '{name}' does not exist; served: {', '.join(self.models)}.",
                           param="model", code="model_not_found")
        return self.models[name]

    def check_limit(self, requested: Optional[int]) -> None:
        if requested is not None and requested > self.max_tokens_limit:
            raise APIError(400, f"max_tokens={requested} exceeds this server's limit of {self.max_tokens_limit}.",
                           param="max_tokens", code="max_tokens_exceeded")

    def budget(self, served: ServedModel, prompt_tokens: int, requested: Optional[int], default: int) -> int:
        """max_tokens for a request, after checking it against the limit and the model's context."""
        self.check_limit(requested)
        context = served.predictor.max_context
        room = context - prompt_tokens
        wanted = requested if requested is not None else min(default, self.max_tokens_limit, room)
        if prompt_tokens + wanted > context or wanted < 1:
            raise APIError(
                400,
                f"this model's context is {context} tokens, but the prompt has {prompt_tokens} and "
                f"{wanted} more were requested; shorten the messages or lower max_tokens.",
                param="messages" if requested is None else "max_tokens", code="context_length_exceeded",
            )
        return wanted

    async def generate(self, job: Job) -> list:
        self.worker.submit(job)
        return await asyncio.wrap_future(job.future)

    def stream(self, job: Job, on_done: Callable[[str, int], None], render: Callable[[str], dict],
               finish: Callable[[str], dict], extra_end: Callable[[int], list[dict]], opening: Optional[dict] = None):
        """An SSE body: an opening chunk (chat: the role), one chunk per text piece, a finish
        chunk, optional usage, then [DONE]."""
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue = asyncio.Queue()
        job.emit = lambda item: loop.call_soon_threadsafe(pieces.put_nowait, item)
        self.worker.submit(job)

        async def body():
            text, reason = "", "error"
            try:
                if opening is not None:
                    yield _sse(opening)
                while True:
                    item = await pieces.get()
                    if item is None:
                        break
                    if isinstance(item, Exception):
                        yield _sse(error_body(f"generation failed: {item}", type="server_error"))
                        return
                    text += item
                    yield _sse(render(item))
                produced = job.model.count(text) if text else 0
                reason = "length" if produced >= job.max_new_tokens else "stop"
                yield _sse(finish(reason))
                for chunk in extra_end(produced):
                    yield _sse(chunk)
                yield "data: [DONE]\n\n"
            finally:
                job.cancelled = True  # no-op when finished; stops the worker if the client left
                on_done(reason, job.model.count(text) if text else 0)

        return body()


def create_app(paths: list[str], *, api_key: Optional[str] = None, max_tokens_limit: int = 512,
               max_batch_size: int = 8, max_wait_ms: float = 10.0, device: Optional[str] = None):
    """The FastAPI app serving `paths` (run folders, adapter folders, merged folders, or NAME=PATH).

    api_key: when set (or $LORAKIT_API_KEY), /v1/* requires `Authorization: Bearer <key>`.

    Raises:
        MissingExtraError: fastapi is not installed.
        ServeError, RunError, ModelError: a model cannot be served.
    """
    require("fastapi", "serve", "Serving a model")
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV) or None
    state = _Server(load_models(paths, device=device), BatchWorker(max_batch_size, max_wait_ms), max_tokens_limit)

    @asynccontextmanager
    async def lifespan(_app):
        yield
        state.worker.stop()

    app = FastAPI(title="lorakit", lifespan=lifespan)
    app.state.lorakit = state

    def log_line(request: Request, status: int, model: str = "-", tokens_in: int = 0, tokens_out: int = 0,
                 started: Optional[float] = None) -> None:
        started = started if started is not None else getattr(request.state, "started", time.perf_counter())
        logger.info("%s %s status=%s model=%s tokens_in=%d tokens_out=%d latency_ms=%.1f", request.method,
                    request.url.path, status, model, tokens_in, tokens_out, (time.perf_counter() - started) * 1000)

    @app.middleware("http")
    async def check_key_and_log(request: Request, call_next):
        request.state.started = time.perf_counter()
        if api_key and request.url.path.startswith("/v1"):
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                log_line(request, 401)
                return JSONResponse(error_body("missing or wrong API key; send 'Authorization: Bearer <key>'.",
                                               code="invalid_api_key"), status_code=401)
        response = await call_next(request)
        if not getattr(request.state, "logged", False):  # generation routes log their own line
            log_line(request, response.status_code)
        return response

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        request.state.logged = True
        log_line(request, exc.status, getattr(request.state, "model", "-"))
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(LorakitError)
    async def user_error(request: Request, exc: LorakitError):  # e.g. a template that cannot render these messages
        return await api_error(request, APIError(400, exc.message))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        kind = "not_found" if exc.status_code == 404 else None
        return JSONResponse(error_body(str(exc.detail), code=kind), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception):
        logger.exception("unexpected error on %s", request.url.path)
        return JSONResponse(error_body(f"internal error: {exc}", type="server_error"), status_code=500)

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": list(state.models)}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [model_card(m.name, m.created, m.base) for m in state.models.values()]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str):
        served = state.model(name)
        return model_card(served.name, served.created, served.base)

    def finished(request: Request, model: str, tokens_in: int) -> Callable[[str, int], None]:
        request.state.logged = True
        return lambda reason, tokens_out: log_line(request, 200, model, tokens_in, tokens_out)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = parse_request(ChatCompletionRequest, await request.body())
        request.state.model = req.model
        req.check_supported()
        served = state.model(req.model)
        requested = req.requested_max_tokens()
        state.check_limit(requested)
        try:  # ids built as training built them; a passage too long for the context is shortened
            ids = served.view.prompt_ids(req.conversation(), req.context, max_new_tokens=requested or 0)
        except ModelError as exc:
            raise APIError(400, exc.message, param="messages", code="context_length_exceeded") from None
        max_new = state.budget(served, len(ids), requested, state.max_tokens_limit)
        prompt_tokens = len(ids)
        job = Job(served, [ids], max_new, req.temperature, req.top_p, req.stop_strings())
        rid, created = new_id("chatcmpl"), int(time.time())
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            body = state.stream(
                job, finished(request, served.name, prompt_tokens),
                lambda piece: chat_chunk(rid, served.name, created, {"content": piece}),
                lambda reason: chat_chunk(rid, served.name, created, {}, reason),
                lambda out: [usage_chunk(rid, served.name, created, "chat.completion.chunk", prompt_tokens, out)]
                if include_usage else [],
                opening=chat_chunk(rid, served.name, created, {"role": "assistant", "content": ""}),
            )
            return StreamingResponse(body, media_type="text/event-stream")
        gen = (await state.generate(job))[0]
        finished(request, served.name, prompt_tokens)(gen.finish_reason, gen.completion_tokens)
        return chat_response(rid, served.name, gen.text, gen.finish_reason, prompt_tokens, gen.completion_tokens)

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = parse_request(CompletionRequest, await request.body())
        request.state.model = req.model
        req.check_supported()
        served = state.model(req.model)
        prompts = req.prompts()
        counts = [served.count(p) for p in prompts]
        # OpenAI's default for completions is 16 new tokens
        max_new = min(state.budget(served, c, req.max_tokens, 16) for c in counts)
        if len(prompts) > state.worker.max_batch_size:
            raise APIError(400, f"at most {state.worker.max_batch_size} prompts per request.", param="prompt")
        job = Job(served, prompts, max_new, req.temperature, req.top_p, req.stop_strings())
        rid, created = new_id("cmpl"), int(time.time())
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            body = state.stream(
                job, finished(request, served.name, counts[0]),
                lambda piece: completion_chunk(rid, served.name, created, piece),
                lambda reason: completion_chunk(rid, served.name, created, "", reason),
                lambda out: [usage_chunk(rid, served.name, created, "text_completion", counts[0], out)]
                if include_usage else [],
            )
            return StreamingResponse(body, media_type="text/event-stream")
        gens = await state.generate(job)
        tokens_out = sum(g.completion_tokens for g in gens)
        finished(request, served.name, sum(counts))("stop", tokens_out)
        return completion_response(rid, served.name, [(g.text, g.finish_reason) for g in gens], sum(counts), tokens_out)

    return app


def run_server(paths: list[str], host: str = "127.0.0.1", port: int = 8000, api_key: Optional[str] = None,
               *, max_tokens_limit: int = 512, max_batch_size: int = 8, max_wait_ms: float = 10.0,
               device: Optional[str] = None) -> None:
    """Load the models and serve them with uvicorn until interrupted.

    Raises:
        MissingExtraError: fastapi or uvicorn is not installed.
        ServeError: the port is taken, or a model cannot be served.
    """
    uvicorn = require("uvicorn", "serve", "Serving a model")
    _check_port(host, port)  # before minutes of model loading, not after
    app = create_app(paths, api_key=api_key, max_tokens_limit=max_tokens_limit, max_batch_size=max_batch_size,
                     max_wait_ms=max_wait_ms, device=device)
    names = ", ".join(app.state.lorakit.models)
    key_note = "an API key is required" if (api_key or os.environ.get(API_KEY_ENV)) else "no API key"
    print(f"Serving {names} at http://{host}:{port}/v1 ({key_note}); Ctrl+C stops.", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")


def _check_port(host: str, port: int) -> None:
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(infos[0][4])
    except OSError as exc:
        raise ServeError(f"cannot listen on {host}:{port}: {exc.strerror or exc}.",
                         hint="choose another --port, or stop the program using this one") from None


def serve_command(runs: list[str], *, host: str = "127.0.0.1", port: int = 8000, api_key: Optional[str] = None,
                  max_tokens_limit: int = 512, max_batch_size: int = 8) -> None:
    """What `lorakit serve` runs: request log lines go to stderr."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logger.setLevel(logging.INFO)
    run_server(runs, host=host, port=port, api_key=api_key, max_tokens_limit=max_tokens_limit,
               max_batch_size=max_batch_size)
