"""The printing commands behind `lorakit generate`, `chat`, `merge`, `serve` and `plan`: they call the
library and print for the terminal. Each imports its stage when it runs, so `lorakit --help` stays fast."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ModelError

if TYPE_CHECKING:
    from .export.merge import MergeReport


def read_context(context: str | None) -> str | None:
    """`--context` is a path to a text file, or the passage itself."""
    if not context:
        return None
    try:
        candidate = Path(context).expanduser()
        if len(context) < 4096 and "\n" not in context and candidate.is_file():
            return candidate.read_text(encoding="utf-8")
    except OSError:
        pass
    return context


def generate_command(path: str, question: str, context: str | None = None, **decoding) -> str:
    """`lorakit generate RUN "question" [--context FILE_OR_TEXT]`: one answer, with the run's template."""
    from .inference.predictor import load_predictor

    predictor = load_predictor(path)
    messages = [{"role": "user", "content": question}]
    return predictor.generate([messages], [read_context(context)], **decoding)[0].text


def chat_loop(
    path: str,
    *,
    context: str | None = None,
    input_fn: Callable[[str], str] = input,
    output: Callable[..., None] = print,
    **decoding,
) -> list[dict]:
    """`lorakit chat RUN`: a multi-turn conversation in the terminal, replies streamed as they come.

    `/reset` starts over, `/exit` (or end of input) quits. `output` is called like print.
    context: a passage (or a text file's path) every turn is asked about; an extractive run
    answers with spans of it. Returns the conversation as it stood at the end.
    """
    from .inference.predictor import load_predictor

    predictor = load_predictor(path)
    passage = read_context(context)
    output(f"Chatting with {predictor.name} (template '{predictor.template.name}'). /reset starts over, /exit quits.")
    messages: list[dict] = []
    while True:
        try:
            line = input_fn("you> ")
        except (EOFError, KeyboardInterrupt):
            output()
            break
        text = line.strip()
        if text == "/exit":
            break
        if text == "/reset":
            messages = []
            output("(conversation cleared)")
            continue
        if not text:
            continue
        messages.append({"role": "user", "content": text})
        # forget the oldest exchanges when the conversation outgrows the model's context
        while True:
            try:
                pieces = predictor.stream(messages, passage, **decoding)
                break
            except ModelError:
                if len(messages) <= 1:
                    raise
                messages = messages[2:]
                output("(the oldest turn was dropped to fit the model's context)")
        output("bot> ", end="", flush=True)
        reply = []
        for piece in pieces:
            reply.append(piece)
            output(piece, end="", flush=True)
        output()
        messages.append({"role": "assistant", "content": "".join(reply).strip()})
    return messages


def merge_command(run: str, out: str, *, dtype: str = "float32", overwrite: bool = False) -> MergeReport:
    """What `lorakit merge` runs: merge, verify, print the verdict and the largest difference."""
    from .export.merge import merge_run

    def announce() -> None:
        print(f"Merging the adapter of {run} into its base model (in float32, saved as {dtype}) ...", flush=True)

    report = merge_run(run, out, dtype=dtype, overwrite=overwrite, on_start=announce)
    print(report.summary(), flush=True)
    return report


def serve_command(runs: list[str], config: str | None = None, **flags) -> None:
    """What `lorakit serve` runs: ServeConfig's defaults < the serve section of `config` < the
    flags that were given (None: not given). Request log lines go to stderr."""
    from .config_loading import load_serve_config
    from .serve.app import logger, run_server

    settings = load_serve_config(config, **flags)  # a bad setting fails before any model loads
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logger.setLevel(logging.INFO)
    run_server(runs, settings)


def plan_command(
    config_path,
    overrides: list[str] | None = None,
    gpu: str = "cpu",
    memory_gb: float | None = None,
    fit: bool = False,
    console=None,
) -> str:
    """`lorakit plan config.yaml [--gpu ...] [--memory-gb N] [--fit]`: print the plan, return its text.
    With --fit (or train.auto_fit: true) the plan shown is the fitted config's, with each choice."""
    from rich.console import Console

    from .config_loading import load_config
    from .plan.estimate import _task_type, data_lengths
    from .plan.fitting import fit_config
    from .plan.planner import plan_run
    from .plan.render import render_plan
    from .plan.shape import read_model_shape

    config = load_config(config_path, overrides)
    choices = None
    if fit or config.train.auto_fit:
        shape = read_model_shape(config.model)
        lengths = data_lengths(config, _task_type(config, shape))
        config, choices = fit_config(config, gpu, memory_gb, shape=shape, lengths=lengths)
        plan = plan_run(config, gpu, memory_gb, shape=shape, lengths=lengths)
    else:
        plan = plan_run(config, gpu, memory_gb)
    return render_plan(plan, choices, console or Console(record=True))  # stdout: the CLI prints
