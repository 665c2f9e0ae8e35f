"""The served models (loaded once, adapters of one base sharing it) and the one thread that runs
them, batching compatible requests together.

The HTTP side only queues `Job`s. The worker takes the oldest job and gathers queued jobs for the
same model with the same decoding settings, up to `max_batch_size` prompts or until `max_wait_ms`
has passed, then generates them in one call. Streaming jobs run alone. A job whose client went
away (`Job.cancel()`) is skipped while queued, and its row stops at the next decoding step once
running, streaming or not; nothing a job does can stop the worker.
"""

from __future__ import annotations

import collections
import copy
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import StoppingCriteria

from ..errors import ServeError
from .schemas import APIError

logger = logging.getLogger("lorakit.serve")
MAX_QUEUE = 1024  # jobs waiting beyond this are refused with 429 instead of growing without bound


@dataclass
class Job:
    """One request's work for `model` (a serve.ServedModel; its `.predictor` generates).

    A batch job's `future` receives the list of Generations, one per prompt. A stream job
    (`emit` set) gets `emit(piece)` per text piece, then `emit(None)` at the end, or
    `emit(exception)` when generation failed.
    """

    model: Any
    prompts: list  # rendered prompt text, or prompt token ids built the training way
    max_new_tokens: int
    temperature: float
    top_p: float
    stop: list[str] = field(default_factory=list)
    emit: Callable[[object], None] | None = None
    passages: list | None = None  # one per prompt (None: free): answers kept inside it (extractive runs)
    future: Future = field(default_factory=Future)
    cancelled: bool = False
    generated: int = 0  # tokens generated so far (stream jobs): the honest `usage` count

    def cancel(self) -> None:
        """The client went away: skip this job if it is queued, stop its generation if it runs."""
        self.cancelled = True
        self.future.cancel()  # False once running; the flag then stops it between decoding steps

    @property
    def batch_key(self) -> tuple | None:
        if self.emit is not None:
            return None  # streams run one at a time
        return (self.model.name, self.max_new_tokens, self.temperature, self.top_p, tuple(self.stop))


class _StreamWatch(StoppingCriteria):
    """Called by generate once per new token of a stream job: counts the tokens (re-tokenizing the
    streamed text miscounts: specials dropped, pieces merged differently) and ends the generation
    at the next step once the job is cancelled, even while no text piece has come out yet."""

    def __init__(self, job: Job):
        self.job = job

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        self.job.generated += 1
        return torch.full((input_ids.shape[0],), self.job.cancelled, dtype=torch.bool, device=input_ids.device)


class BatchWorker:
    """Owns the models: every generation happens on its thread, one batch at a time."""

    def __init__(self, max_batch_size: int, max_wait_ms: float):  # config.ServeConfig owns the defaults
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.batch_sizes: collections.Counter = collections.Counter()  # prompts per generate call
        self._queue: queue.Queue = queue.Queue()
        self._held: collections.deque = collections.deque()  # taken from the queue, not batchable yet
        self._thread = threading.Thread(target=self._loop, name="lorakit-generate", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> Job:
        if self._queue.qsize() + len(self._held) >= MAX_QUEUE:
            raise APIError(429, "the server is overloaded; retry shortly.", type="server_error", code="overloaded")
        self._queue.put(job)
        return job

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _loop(self) -> None:
        while True:
            job = self._held.popleft() if self._held else self._queue.get()
            if job is None:
                return
            try:
                if job.emit is not None:
                    if not job.cancelled:
                        self._stream(job)
                elif job.future.set_running_or_notify_cancel():  # False: the client already left
                    self._run_batch(self._gather(job))
            except Exception:  # a bug in one job must not take the server down with it
                logger.exception("the generation worker failed on a job for %s", job.model.name)

    def _take(self, job: Job, first: Job, size: int) -> bool:
        return (
            job is not None
            and not job.cancelled
            and job.batch_key == first.batch_key
            and size + len(job.prompts) <= self.max_batch_size
        )

    def _gather(self, first: Job) -> list[Job]:
        """`first` plus compatible jobs already held or arriving within max_wait."""
        batch, size = [first], len(first.prompts)
        for job in list(self._held):
            if job.cancelled:  # its client left while it waited: drop it
                self._held.remove(job)
            elif self._take(job, first, size):
                self._held.remove(job)
                if job.future.set_running_or_notify_cancel():
                    batch.append(job)
                    size += len(job.prompts)
        deadline = time.monotonic() + self.max_wait
        while size < self.max_batch_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                job = self._queue.get(timeout=remaining)
            except queue.Empty:
                break
            if job is not None and job.cancelled:
                continue
            if self._take(job, first, size):
                if job.future.set_running_or_notify_cancel():
                    batch.append(job)
                    size += len(job.prompts)
            else:
                self._held.append(job)  # keeps its place for the next round (a stop sentinel too)
        return batch

    def _run_batch(self, batch: list[Job]) -> None:
        first = batch[0]
        prompts = [p for job in batch for p in job.prompts]
        owners = [job for job in batch for _ in job.prompts]  # prompt index -> its job
        passages = [p for job in batch for p in (job.passages or [None] * len(job.prompts))]
        self.batch_sizes[len(prompts)] += 1
        try:
            generations = first.model.predictor.generate_prompts(
                prompts,
                max_new_tokens=first.max_new_tokens,
                temperature=first.temperature,
                top_p=first.top_p,
                batch_size=len(prompts),
                stop_strings=first.stop,
                cancelled=lambda i: owners[i].cancelled,
                passages=passages if any(p is not None for p in passages) else None,
            )
        except Exception as exc:  # a failed generation fails its requests, never the server
            logger.exception("generation failed for model %s", first.model.name)
            for job in batch:
                job.future.set_exception(exc)
            return
        start = 0
        for job in batch:
            job.future.set_result(generations[start : start + len(job.prompts)])
            start += len(job.prompts)

    def _stream(self, job: Job) -> None:
        try:
            pieces = job.model.predictor.stream_prompt(
                job.prompts[0],
                max_new_tokens=job.max_new_tokens,
                temperature=job.temperature,
                top_p=job.top_p,
                stop_strings=job.stop,
                stopping_criteria=[_StreamWatch(job)],
                passage=job.passages[0] if job.passages else None,
            )
            for piece in pieces:
                if job.cancelled:  # the client went away: stop sending to it
                    pieces.close()
                    return
                job.emit(piece)
        except Exception as exc:
            logger.exception("streaming failed for model %s", job.model.name)
            job.emit(exc)
            return
        job.emit(None)


# --- loading the models --------------------------------------------------------------------------


PREPARE_THREADS = 2  # threads that parse, render and tokenize requests, off the event loop


@dataclass
class ServedModel:
    """One model id: its Predictor, plus views of it with private tokenizer copies, one per
    preparing thread, so prompts are tokenized beside the worker (which uses the original) and
    beside each other (a fast tokenizer shared across threads can fail with "Already borrowed")."""

    name: str
    predictor: object
    base: str | None
    created: int

    def __post_init__(self):
        self._views: queue.Queue = queue.Queue()
        for _ in range(PREPARE_THREADS):
            view = copy.copy(self.predictor)
            view.tokenizer = copy.deepcopy(self.predictor.tokenizer)
            view.name = self.name  # error messages name the served id, not the run folder
            self._views.put(view)

    @contextmanager
    def view(self):
        view = self._views.get()
        try:
            yield view
        finally:
            self._views.put(view)


def _public_name(base: str | None) -> str | None:
    """A base model as clients may see it: a hub id as is, a local folder by its name only."""
    if not base:
        return None
    path = Path(base).expanduser()
    if path.is_absolute() or path.exists() or base.startswith((".", "~")):
        return path.name
    return base


def _split_spec(spec: str) -> tuple[str | None, str]:
    """ "NAME=PATH" -> (NAME, PATH); a plain path -> (None, path). A path may itself hold '='."""
    name, sep, path = spec.partition("=")
    if sep and name and "/" not in name and "\\" not in name and not Path(spec).exists():
        return name, path
    return None, spec


def _base_key(info) -> tuple | None:
    """What must match for two adapters to share one loaded base model (None: cannot share)."""
    if info.is_merged:
        return None
    base = info.base
    quantization = info.config.model.quantization if info.config is not None else "none"
    return (
        base.get("name_or_path"),
        base.get("gguf_file"),
        base.get("revision"),
        base.get("sha256"),
        info.task_type,
        info.precision,
        quantization,
    )


def load_models(specs: list[str], *, device: str | None = None) -> dict[str, ServedModel]:
    """Load each run (or merged folder) once; adapters of one base model share its weights.

    Raises:
        ServeError: no paths, or two models would get the same id.
        RunError / ModelError: a folder is not a usable run, or its model cannot be loaded.
    """
    from ..inference.predictor import Predictor, load_predictor
    from ..pipeline import run_tokenizer
    from ..run_metadata import read_run

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
                host.model,
                run_tokenizer(info, fallback=host.tokenizer),
                info.template,
                task_type=info.task_type,
                name=name,
                adapter_name=adapter_name,
                max_length=info.max_length,
                extractive=info.extractive,
                no_answer=info.no_answer,
            )
            logger.info("model %s shares the base weights already loaded for %s", name, host.name)
        served[name] = ServedModel(
            name=name,
            predictor=predictor,
            base=_public_name(info.base.get("name_or_path")),
            created=int(Path(path).stat().st_mtime),
        )
    return served
