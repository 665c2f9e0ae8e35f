"""The `lorakit` command line: maps sub-commands to library functions, nothing more.

This is the only place that catches `LorakitError`: it prints one line (and the fix) and exits
non-zero, so a user mistake never shows a Python traceback. The library returns values and logs
(loggers under "lorakit"); the CLI prints the values and shows the log lines on stderr. Heavy
imports happen inside each command so that `lorakit --help` stays instant.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import typer

from .errors import ConfigError, LorakitError

app = typer.Typer(
    name="lorakit",
    help="Fine-tune language models with LoRA/QLoRA for QA and chat, evaluate honestly, merge and serve.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Look at a dataset the way training will see it.", no_args_is_help=True)
app.add_typer(data_app, name="data")

SET_HELP = "Override a config value: --set section.key=value (repeatable)."
EXTRACTIVE_HELP = "Keep answers inside a span of the passage (or the no-answer text), or not; default: the run's own."


def _load(config: Path, overrides: list[str] | None):
    from .config_loading import load_config

    return load_config(config, overrides or [])


@app.command()
def train(
    config: Path = typer.Argument(..., help="YAML config file."),
    set_: list[str] | None = typer.Option(None, "--set", help=SET_HELP),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest checkpoint of the run."),
    nproc: int = typer.Option(1, "--nproc", min=1, help="Data-parallel processes (torchrun) on this machine."),
    allow_config_change: bool = typer.Option(
        False,
        "--allow-config-change",
        help="With --resume: accept a config that differs from the run's (recorded in the run).",
    ),
):
    """Train a LoRA adapter into runs/<name>/."""
    if allow_config_change and not resume:
        raise ConfigError(
            "--allow-config-change only applies to --resume.", hint="add --resume, or drop --allow-config-change"
        )
    if allow_config_change and nproc > 1:
        raise ConfigError(
            "--allow-config-change cannot be combined with --nproc yet.",
            hint="resume once with --nproc 1 --allow-config-change, then continue with --nproc",
        )
    if nproc > 1:
        from .train.distributed import launch_data_parallel

        raise typer.Exit(launch_data_parallel(config, set_ or [], resume=resume, nproc=nproc))
    cfg = _load(config, set_)  # config mistakes are reported before the heavy imports
    from .train.recipe import train as run_training

    paths = run_training(cfg, resume=resume, allow_config_change=allow_config_change)
    typer.echo(f"Run folder: {paths.root}")


@data_app.command("inspect")
def data_inspect(
    config: Path = typer.Argument(..., help="YAML config file."),
    set_: list[str] | None = typer.Option(None, "--set", help=SET_HELP),
):
    """Counts per split, dropped records and why, token lengths, one rendered example."""
    from .inspection import inspect_data

    typer.echo(inspect_data(_load(config, set_)))


@app.command("eval")
def eval_(
    run: Path = typer.Argument(..., help="Run folder, adapter folder or merged-model folder."),
    data: Path | None = typer.Option(None, "--data", help="Evaluate on this file instead of the run's own split."),
    split: str = typer.Option("test", "--split", help="train, validation or test (of the run's own data)."),
    compare: str | None = typer.Option(
        None, "--compare", help="'base': also evaluate the base model, same template and decoding."
    ),
    max_examples: int | None = typer.Option(None, "--max-examples", min=1),
    batch_size: int | None = typer.Option(None, "--batch-size", min=1),
    max_new_tokens: int | None = typer.Option(None, "--max-new-tokens", min=1),
    out: Path | None = typer.Option(
        None,
        "--out",
        help="Write the outputs exactly here (a new or empty folder) instead of RUN/eval/<split>-<time>/.",
    ),
    extractive: bool | None = typer.Option(None, "--extractive/--no-extractive", help=EXTRACTIVE_HELP),
):
    """Generate answers and score them: EM/F1, ROUGE, BLEU, perplexity, never-stops rate.
    Every evaluation is kept (RUN/eval/index.json lists them)."""
    if compare not in (None, "base"):
        raise ConfigError(f"--compare '{compare}' is not supported.", hint="use --compare base")
    from .evaluate.history import summary_lines
    from .evaluate.runner import evaluate_path

    result = evaluate_path(
        str(run),
        data=str(data) if data else None,
        split=split,
        compare_base=compare == "base",
        max_examples=max_examples,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        out_dir=str(out) if out else None,
        extractive=extractive,
        verbose=False,
    )
    index = None if out else Path(result["folder"]).parent / "index.json"
    typer.echo("\n".join(summary_lines(result, result["folder"], index)))


@app.command()
def score(
    predictions: Path = typer.Argument(..., help="JSONL of {id, prediction} or an official SQuAD prediction file."),
    data: Path = typer.Option(..., "--data", help="The dataset holding the reference answers."),
    out: Path | None = typer.Option(None, "--out", help="Folder for metrics.json and reports."),
    no_answer: str = typer.Option("unanswerable", "--no-answer", help="The text that means 'no answer'."),
):
    """Score predictions made elsewhere against a dataset's references."""
    from .evaluate.history import summary_lines
    from .evaluate.runner import score_predictions

    result = score_predictions(
        str(predictions), str(data), out_dir=str(out) if out else None, no_answer=no_answer, verbose=False
    )
    typer.echo("\n".join(summary_lines(result, result["folder"])))


def _eval_default(key: str) -> Any:
    from .config import EvalConfig, default_of

    return default_of(EvalConfig, key)


@app.command()
def generate(
    run: Path = typer.Argument(..., help="Run folder, adapter folder or merged-model folder."),
    question: str = typer.Argument(..., help="The question or instruction."),
    context: str | None = typer.Option(None, "--context", help="A passage, or a path to a text file holding one."),
    # the same decoding as `lorakit eval` by default: eval.* in config.py owns these defaults
    max_new_tokens: int = typer.Option(_eval_default("max_new_tokens"), "--max-new-tokens", min=1),
    temperature: float = typer.Option(_eval_default("temperature"), "--temperature", min=0.0),
    top_p: float = typer.Option(_eval_default("top_p"), "--top-p", min=0.0, max=1.0),
    extractive: bool | None = typer.Option(None, "--extractive/--no-extractive", help=EXTRACTIVE_HELP),
):
    """Answer one question with the run's own template."""
    from .cli_commands import generate_command

    answer = generate_command(
        str(run),
        question,
        context,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        extractive=extractive,
    )
    typer.echo(answer)


@app.command()
def chat(
    run: Path = typer.Argument(..., help="Run folder, adapter folder or merged-model folder."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", min=1),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0),
    top_p: float = typer.Option(1.0, "--top-p", min=0.0, max=1.0),
    context: str | None = typer.Option(
        None, "--context", help="A passage the whole conversation is about, or a path to a text file holding one."
    ),
    extractive: bool | None = typer.Option(None, "--extractive/--no-extractive", help=EXTRACTIVE_HELP),
):
    """Multi-turn chat in the terminal, streaming tokens as they come (/reset, /exit)."""
    from .cli_commands import chat_loop

    chat_loop(
        str(run),
        context=context,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        extractive=extractive,
    )


@app.command()
def merge(
    run: Path = typer.Argument(..., help="Run folder (or adapter folder)."),
    out: Path = typer.Option(..., "--out", help="Folder for the merged model (must not exist or be empty)."),
    dtype: str = typer.Option("float32", "--dtype", help="float16, bfloat16 or float32."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing merged folder."),
):
    """Merge the adapter into the base model, verify the logits, save safetensors + template."""
    from .cli_commands import merge_command

    merge_command(str(run), str(out), dtype=dtype, overwrite=overwrite)


def _serve_help(key: str) -> str:
    """A serve flag's help: the ServeConfig field's description and its one default."""
    from .config import ServeConfig

    field = ServeConfig.model_fields[key]
    return f"{field.description} (serve.{key}; default {field.default})"


@app.command()
def serve(
    runs: list[str] = typer.Argument(..., help="Run or merged folders; NAME=PATH sets the model id."),
    config: Path | None = typer.Option(
        None, "--config", help="A YAML file whose serve: section holds the settings below."
    ),
    # left out, a flag takes the config's serve.* value, else config.ServeConfig's default
    host: str | None = typer.Option(None, "--host", help=_serve_help("host")),
    port: int | None = typer.Option(None, "--port", min=1, max=65535, help=_serve_help("port")),
    api_key: str | None = typer.Option(None, "--api-key", envvar="LORAKIT_API_KEY", help=_serve_help("api_key")),
    max_tokens_limit: int | None = typer.Option(
        None, "--max-tokens-limit", min=1, help=_serve_help("max_tokens_limit")
    ),
    max_batch_size: int | None = typer.Option(None, "--max-batch-size", min=1, help=_serve_help("max_batch_size")),
    max_body_bytes: int | None = typer.Option(None, "--max-body-bytes", min=1, help=_serve_help("max_body_bytes")),
    extractive: bool | None = typer.Option(None, "--extractive/--no-extractive", help=_serve_help("extractive")),
):
    """Serve runs behind an OpenAI-compatible HTTP API."""
    from .cli_commands import serve_command

    serve_command(
        runs,
        str(config) if config else None,
        host=host,
        port=port,
        api_key=api_key,
        max_tokens_limit=max_tokens_limit,
        max_batch_size=max_batch_size,
        max_body_bytes=max_body_bytes,
        extractive=extractive,
    )


@app.command()
def plan(
    config: Path = typer.Argument(..., help="YAML config file."),
    set_: list[str] | None = typer.Option(None, "--set", help=SET_HELP),
    gpu: str = typer.Option("cpu", "--gpu", help="t4, l4, a10g, a100-40g, a100-80g, h100 or cpu."),
    memory_gb: float | None = typer.Option(None, "--memory-gb", help="Override the device memory."),
    fit: bool = typer.Option(False, "--fit", help="Choose settings that fit the device."),
):
    """Predict peak memory and time before loading any weights; --fit picks settings that fit."""
    from .cli_commands import plan_command

    plan_command(str(config), set_ or [], gpu=gpu, memory_gb=memory_gb, fit=fit)


@app.command()
def demo(
    workdir: Path = typer.Option(Path("runs/demo"), "--workdir", help="Where the demo run goes."),
    quick: bool = typer.Option(False, "--quick", help="One epoch instead of three (a smaller gain)."),
    qlora: bool = typer.Option(
        False, "--qlora", help="Also the seeds' QLoRA recipe (4-bit NF4, paged 8-bit AdamW), with peak memory."
    ),
):
    """Offline end to end on the CPU: SmolLM2-135M-Instruct, before/after scores on bundled QA data."""
    if qlora:
        from .demo.qlora import format_qlora_table, run_qlora_demo

        typer.echo(format_qlora_table(run_qlora_demo(workdir=str(workdir), quick=quick)))
        return
    from .demo.end_to_end import format_table, run_demo

    typer.echo(format_table(run_demo(workdir=str(workdir), quick=quick)))


@app.command()
def version():
    """Print the lorakit version."""
    from ._version import __version__

    typer.echo(__version__)


class _StderrHandler(logging.Handler):
    """Shows the library's log lines as plain text on the current sys.stderr (looked up at each
    line, so a test's captured stderr receives them too)."""

    def emit(self, record: logging.LogRecord) -> None:
        if logging.getLogger().handlers:  # configured since (`lorakit serve` does): the root shows it
            return
        try:
            print(self.format(record), file=sys.stderr, flush=True)
        except Exception:
            self.handleError(record)


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the app, turning user mistakes into one line and a non-zero exit."""
    library = logging.getLogger("lorakit")
    if library.handlers or logging.getLogger().handlers:  # the caller configured logging
        return _run(argv)
    # show the library's progress lines (INFO and up) on stderr while the command runs
    handler, level = _StderrHandler(), library.level
    library.addHandler(handler)
    library.setLevel(logging.INFO)
    try:
        return _run(argv)
    finally:
        library.removeHandler(handler)
        library.setLevel(level)


def _run(argv: list[str] | None) -> int:
    try:
        # standalone_mode=False: typer hands usage errors to us instead of printing its box
        code = app(args=argv, prog_name="lorakit", standalone_mode=False)
        return code if isinstance(code, int) else 0
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except typer.TyperException as exc:  # a wrong option, a missing argument, a value out of range
        if type(exc).__name__ == "NoArgsIsHelpError":  # bare `lorakit` or `lorakit data`: the help
            exc.show()
            return 0
        ctx = getattr(exc, "ctx", None)
        where = ctx.command_path if ctx is not None else "lorakit"
        message = exc.format_message().rstrip()
        message += "" if message.endswith((".", "?", "!")) else "."
        typer.echo(f"error: {message} Fix: see `{where} --help`", err=True)
        return 2
    except typer.Abort:
        typer.echo("aborted", err=True)
        return 1
    except LorakitError as exc:
        message = exc.message if not exc.hint else f"{exc.message} Fix: {exc.hint}"
        typer.echo(f"error: {message}", err=True)
        return exc.exit_code
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as exc:
        # A safety net for a user's path that no check caught; errors without a path are bugs.
        if exc.filename is None:
            raise
        typer.echo(f"error: {exc.strerror}: '{exc.filename}'. Fix: check that path (and its permissions)", err=True)
        return 2
    except UnicodeDecodeError as exc:
        typer.echo(
            f"error: a file is not UTF-8 text ({exc.reason} at byte {exc.start}). Fix: re-save it as UTF-8", err=True
        )
        return 2
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
