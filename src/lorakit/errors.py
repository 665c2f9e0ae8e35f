"""The exceptions lorakit raises for user mistakes (and for a training run the user stopped).

Every message says what was wrong, where (file, line or record, field) and how to fix it
(`hint`, printed after "Fix:"). Only the CLI catches these: it prints one line and exits with
`exit_code` (2 for a mistake), with no traceback. Library callers catch `LorakitError`.

    LorakitError                 exit 2
    ├── ConfigError              a config key or value is wrong (`problems` lists every one)
    ├── DataError                a data file cannot be read or a record is malformed
    ├── TemplateError            a prompt template is unknown or cannot be rendered
    ├── ModelError               a model or tokenizer cannot be loaded, or a device is unsuitable
    ├── RunError                 a run folder is missing, incomplete or would be overwritten,
    │   │                        or training diverged (a NaN/infinite loss or gradient)
    │   └── TrainingInterrupted  Ctrl-C (exit 130) or SIGTERM (exit 143) stopped training after a
    │                            checkpoint was saved; `--resume` continues it
    ├── EvalError                predictions or references cannot be scored
    ├── ServeError               the server cannot start with what it was given
    └── MissingExtraError        an optional dependency (an extra: serve, quant, tracking) is missing
"""

from __future__ import annotations

from types import ModuleType


class LorakitError(Exception):
    """Base of every error caused by the user's input rather than by a bug."""

    exit_code = 2

    def __init__(self, message: str, *, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(message if hint is None else f"{message} Fix: {hint}")


class ConfigError(LorakitError):
    """A config file, key or value is invalid. `problems` lists every one found."""

    def __init__(self, message: str, *, hint: str | None = None, problems: list[str] | None = None):
        self.problems = problems or []
        super().__init__(message, hint=hint)


class DataError(LorakitError):
    """A data file cannot be read, has an unknown format, or holds a malformed record."""


class TemplateError(LorakitError):
    """A prompt template is unknown or fails to render."""


class ModelError(LorakitError):
    """A model or tokenizer cannot be loaded, or the requested device/precision is unavailable."""


class RunError(LorakitError):
    """A run folder is missing, incomplete, or would be overwritten; or training diverged."""


class TrainingInterrupted(RunError):
    """Ctrl-C (exit 130) or SIGTERM (exit 143) stopped training after saving a checkpoint; `--resume` continues it."""

    exit_code = 130

    def __init__(self, message: str, *, hint: str | None = None, exit_code: int = 130):
        super().__init__(message, hint=hint)
        self.exit_code = exit_code


class EvalError(LorakitError):
    """Predictions or references cannot be scored."""


class ServeError(LorakitError):
    """The server cannot start with the given runs or options."""


class MissingExtraError(LorakitError):
    """An optional dependency is not installed; the hint names the extra that installs it."""

    def __init__(self, package: str, extra: str, purpose: str):
        super().__init__(
            f"{purpose} needs the package '{package}', which is not installed.",
            hint=f"pip install 'lorakit[{extra}]'",
        )


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """Import an optional dependency lazily, or raise an error with the install hint.

    Args:
        module: the module to import, e.g. "uvicorn".
        extra: the lorakit extra that installs it, e.g. "serve".
        purpose: what needs it, for the message, e.g. "Serving a model".

    Returns:
        The imported module.

    Raises:
        MissingExtraError: the module cannot be imported.
    """
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(module.split(".")[0], extra, purpose) from exc
