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
import gc
import json
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from ..config import ServeConfig
from ..errors import LorakitError, ModelError, ServeError, require
from .guard import API_KEY_ENV, _Guard, _log
from .schemas import (
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
from .worker import PREPARE_THREADS, BatchWorker, Job, ServedModel, load_models

logger = logging.getLogger("lorakit.serve")


# --- the HTTP app --------------------------------------------------------------------------------


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _disconnected(request) -> None:
    """Returns when the client has gone (the body is already read: only a disconnect comes next)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class _Server:
    """The state behind the routes: models, worker, preparing threads and limits."""

    def __init__(
        self, models: dict[str, ServedModel], worker: BatchWorker, max_tokens_limit: int, extractive: bool | None
    ):
        self.models = models
        self.extractive = extractive  # None: each run's own setting
        self.worker = worker
        self.max_tokens_limit = max_tokens_limit
        self.pool = ThreadPoolExecutor(PREPARE_THREADS, thread_name_prefix="lorakit-prepare")

    def model(self, name: str) -> ServedModel:
        if name not in self.models:
            raise APIError(
                404,
                f"the model '{name}' does not exist; served: {', '.join(self.models)}.",
                param="model",
                code="model_not_found",
            )
        return self.models[name]

    def check_limit(self, requested: int | None) -> None:
        if requested is not None and requested > self.max_tokens_limit:
            raise APIError(
                400,
                f"max_tokens={requested} exceeds this server's limit of {self.max_tokens_limit}.",
                param="max_tokens",
                code="max_tokens_exceeded",
            )

    def budget(self, served: ServedModel, prompt_tokens: int, requested: int | None, default: int) -> int:
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
                param="messages" if requested is None else "max_tokens",
                code="context_length_exceeded",
            )
        return wanted

    async def off_loop(self, fn, *args):
        """Run fn on a preparing thread: parsing, rendering and tokenizing a large prompt take
        seconds, and on the event loop they would stall every client, /health included."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    def prepare_chat(self, raw: bytes, note) -> tuple:
        req = parse_request(ChatCompletionRequest, raw)
        note.model = req.model  # for the log line of a refused request
        req.check_supported()
        served = self.model(req.model)
        requested = req.requested_max_tokens()
        self.check_limit(requested)
        with served.view() as view:
            try:  # ids built as training built them; a passage too long for the context is shortened
                ids = view.prompt_ids(req.conversation(), req.context, max_new_tokens=requested or 0)
            except ModelError as exc:
                raise APIError(400, exc.message, param="messages", code="context_length_exceeded") from None
        return req, served, ids, self.budget(served, len(ids), requested, self.max_tokens_limit)

    def prepare_completion(self, raw: bytes, note) -> tuple:
        req = parse_request(CompletionRequest, raw)
        note.model = req.model
        req.check_supported()
        served = self.model(req.model)
        prompts = req.prompts()
        if len(prompts) > self.worker.max_batch_size:
            raise APIError(400, f"at most {self.worker.max_batch_size} prompts per request.", param="prompt")
        with served.view() as view:
            counts = [view.count_tokens(p) for p in prompts]
        # OpenAI's default for completions is 16 new tokens
        return req, served, prompts, counts, min(self.budget(served, c, req.max_tokens, 16) for c in counts)

    async def generate(self, job: Job, request) -> list | None:
        """The job's generations; None when the client disconnected first, which cancels the job
        (skipped if still queued, its rows stopped at the next decoding step if running)."""
        self.worker.submit(job)
        result = asyncio.wrap_future(job.future)
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
            if result.done() and not result.cancelled():
                return result.result()
            return None
        finally:
            gone.cancel()
            if not result.done() or result.cancelled():
                job.cancel()

    def stream(
        self,
        job: Job,
        on_done: Callable[[str, int], None],
        render: Callable[[str], dict],
        finish: Callable[[str], dict],
        extra_end: Callable[[int], list[dict]],
        opening: dict | None = None,
    ):
        """An SSE response: an opening chunk (chat: the role), one chunk per text piece, a finish
        chunk, optional usage (the tokens the worker generated), then [DONE]."""
        from starlette.background import BackgroundTask
        from starlette.responses import StreamingResponse

        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue = asyncio.Queue()
        job.emit = lambda item: loop.call_soon_threadsafe(pieces.put_nowait, item)
        self.worker.submit(job)

        async def body():
            reason = "error"
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
                    yield _sse(render(item))
                reason = "length" if job.generated >= job.max_new_tokens else "stop"
                yield _sse(finish(reason))
                for chunk in extra_end(job.generated):
                    yield _sse(chunk)
                yield "data: [DONE]\n\n"
            finally:
                job.cancel()  # no-op when finished; stops the worker if the client left
                on_done(reason, job.generated)

        # the background task runs even when the client leaves before the body ever started
        return StreamingResponse(body(), media_type="text/event-stream", background=BackgroundTask(job.cancel))


def create_app(paths: list[str], settings: ServeConfig | None = None, *, device: str | None = None, **overrides):
    """The FastAPI app serving `paths` (run folders, adapter folders, merged folders, or NAME=PATH).

    Args:
        paths: the folders to serve.
        settings: the serve settings (config.ServeConfig, e.g. from config_loading.load_serve_config);
            None: ServeConfig's defaults.
        device: where the models load (default: the best available).
        overrides: ServeConfig fields replacing those of `settings` (max_tokens_limit=64, ...).
            api_key, when set (or $LORAKIT_API_KEY), is required as `Authorization: Bearer <key>`
            on every path but /health, /docs and /openapi.json included; a request body over
            max_body_bytes gets a 413 before it is parsed.

    Raises:
        MissingExtraError: fastapi is not installed.
        ConfigError: an override is not a valid serve setting.
        ServeError, RunError, ModelError: a model cannot be served.
    """
    require("fastapi", "serve", "Serving a model")
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException as StarletteHTTPException

    settings = _settings(settings, overrides)
    api_key = settings.api_key if settings.api_key is not None else os.environ.get(API_KEY_ENV) or None
    worker = BatchWorker(settings.max_batch_size, settings.max_wait_ms)
    state = _Server(load_models(paths, device=device), worker, settings.max_tokens_limit, settings.extractive)

    @asynccontextmanager
    async def lifespan(_app):
        # What is loaded by now (torch, transformers, the models) lives as long as the server: keep
        # it out of the collector's scans, or one full collection under load holds the interpreter
        # lock for ~200 ms and stalls every route, /health included (bench_serve_load.py).
        gc.collect()
        gc.freeze()
        yield
        state.worker.stop()
        state.pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="lorakit", lifespan=lifespan)
    app.state.lorakit = state
    app.add_middleware(_Guard, api_key=api_key, max_body_bytes=settings.max_body_bytes)

    def log_line(request: Request, status: int, model: str = "-", tokens_in: int = 0, tokens_out: int = 0) -> None:
        _log(request.method, request.url.path, status, request.state.started, model, tokens_in, tokens_out)

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

    def client_gone(request: Request, model: str, tokens_in: int):
        """The client left before its answer: nobody reads this, but the log says what happened."""
        request.state.logged = True
        log_line(request, 499, model, tokens_in)  # 499: nginx's "client closed request"
        return Response(status_code=499)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req, served, ids, max_new = await state.off_loop(state.prepare_chat, await request.body(), request.state)
        prompt_tokens = len(ids)
        job = Job(served, [ids], max_new, req.temperature, req.top_p, req.stop_strings())
        if req.context and served.predictor.extractive_for(state.extractive):
            job.passages = [req.context]  # an extractive run answers with a span of the passage
        rid, created = new_id("chatcmpl"), int(time.time())
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return state.stream(
                job,
                finished(request, served.name, prompt_tokens),
                lambda piece: chat_chunk(rid, served.name, created, {"content": piece}),
                lambda reason: chat_chunk(rid, served.name, created, {}, reason),
                lambda out: (
                    [usage_chunk(rid, served.name, created, "chat.completion.chunk", prompt_tokens, out)]
                    if include_usage
                    else []
                ),
                opening=chat_chunk(rid, served.name, created, {"role": "assistant", "content": ""}),
            )
        gens = await state.generate(job, request)
        if gens is None:
            return client_gone(request, served.name, prompt_tokens)
        gen = gens[0]
        finished(request, served.name, prompt_tokens)(gen.finish_reason, gen.completion_tokens)
        return chat_response(rid, served.name, gen.text, gen.finish_reason, prompt_tokens, gen.completion_tokens)

    @app.post("/v1/completions")
    async def completions(request: Request):
        req, served, prompts, counts, max_new = await state.off_loop(
            state.prepare_completion, await request.body(), request.state
        )
        job = Job(served, prompts, max_new, req.temperature, req.top_p, req.stop_strings())
        rid, created = new_id("cmpl"), int(time.time())
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return state.stream(
                job,
                finished(request, served.name, counts[0]),
                lambda piece: completion_chunk(rid, served.name, created, piece),
                lambda reason: completion_chunk(rid, served.name, created, "", reason),
                lambda out: (
                    [usage_chunk(rid, served.name, created, "text_completion", counts[0], out)] if include_usage else []
                ),
            )
        gens = await state.generate(job, request)
        if gens is None:
            return client_gone(request, served.name, sum(counts))
        tokens_out = sum(g.completion_tokens for g in gens)
        finished(request, served.name, sum(counts))("stop", tokens_out)
        return completion_response(rid, served.name, [(g.text, g.finish_reason) for g in gens], sum(counts), tokens_out)

    return app


def run_server(
    paths: list[str], settings: ServeConfig | None = None, *, device: str | None = None, **overrides
) -> None:
    """Load the models and serve them with uvicorn (at settings.host:settings.port) until interrupted.

    Args: as create_app.

    Raises:
        MissingExtraError: fastapi or uvicorn is not installed.
        ConfigError: an override is not a valid serve setting.
        ServeError: the port is taken, or a model cannot be served.
    """
    uvicorn = require("uvicorn", "serve", "Serving a model")
    settings = _settings(settings, overrides)
    host, port = settings.host, settings.port
    _check_port(host, port)  # before minutes of model loading, not after
    app = create_app(paths, settings, device=device)
    names = ", ".join(app.state.lorakit.models)
    key_note = "an API key is required" if (settings.api_key or os.environ.get(API_KEY_ENV)) else "no API key"
    logger.info(f"Serving {names} at http://{host}:{port}/v1 ({key_note}); Ctrl+C stops.")
    uvicorn.run(app, host=host, port=port, log_level="warning")


def _settings(settings: ServeConfig | None, overrides: dict) -> ServeConfig:
    """`settings` (default: ServeConfig's defaults) with `overrides` applied, validated again."""
    from ..config_loading import load_serve_config

    base = (settings or ServeConfig()).model_dump()
    return load_serve_config(None, **{**base, **overrides})


def _check_port(host: str, port: int) -> None:
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(infos[0][4])
    except OSError as exc:
        raise ServeError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}.",
            hint="choose another --port, or stop the program using this one",
        ) from None
