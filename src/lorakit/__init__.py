"""lorakit: LoRA/QLoRA fine-tuning for QA and chat, evaluated honestly.

The public API, one name per pipeline stage::

    import lorakit

    config = lorakit.load_config("examples/faq_chatbot.yaml", ["train.epochs=1"])
    paths = lorakit.train(config)                      # runs/<name>/, a RunPaths
    metrics = lorakit.evaluate(paths.root, compare_base=True)
    predictor = lorakit.load_predictor(paths.root)
    answer = predictor.generate([[{"role": "user", "content": "Hi?"}]])[0].text
    report = lorakit.merge(paths.root, "merged/")
    plan = lorakit.plan(config, gpu="t4")

Every mistake in the input raises a subclass of `LorakitError` (see `lorakit.errors`), whose
message says what was wrong and how to fix it. Library functions return values and log (loggers
under "lorakit"); only the `lorakit` command prints.

`import lorakit` stays light (no torch): the functions are imported the first time they are used.
"""

from __future__ import annotations

import importlib
import types
from typing import TYPE_CHECKING, Any

from . import models as _models  # noqa: F401  (installs the filter on bitsandbytes' noisy log lines; no torch)
from ._version import __version__
from .errors import (
    ConfigError,
    DataError,
    EvalError,
    LorakitError,
    MissingExtraError,
    ModelError,
    RunError,
    ServeError,
    TemplateError,
    TrainingInterrupted,
)

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time __getattr__ imports these on first use
    from .config_loading import load_config as load_config
    from .evaluate.runner import evaluate_path as evaluate
    from .evaluate.runner import score_predictions as score
    from .export.merge import merge_run as merge
    from .inference.predictor import Predictor as Predictor
    from .inference.predictor import load_predictor as load_predictor
    from .plan.fitting import fit_config as fit_config
    from .plan.planner import plan_run as plan
    from .train.recipe import train as train

__all__ = [
    "__version__",
    "load_config",
    "train",
    "evaluate",
    "score",
    "load_predictor",
    "Predictor",
    "merge",
    "plan",
    "fit_config",
    "LorakitError",
    "ConfigError",
    "DataError",
    "TemplateError",
    "ModelError",
    "RunError",
    "TrainingInterrupted",
    "EvalError",
    "ServeError",
    "MissingExtraError",
]

# public name -> (module, attribute), imported on first access (PEP 562)
_LAZY = {
    "load_config": ("lorakit.config_loading", "load_config"),
    "score": ("lorakit.evaluate.runner", "score_predictions"),
    "load_predictor": ("lorakit.inference.predictor", "load_predictor"),
    "Predictor": ("lorakit.inference.predictor", "Predictor"),
    "merge": ("lorakit.export.merge", "merge_run"),
    "fit_config": ("lorakit.plan.fitting", "fit_config"),
}

# `train`, `evaluate` and `plan` are also the names of subpackages, and importing a submodule
# (`lorakit.train.recipe`) binds the subpackage to that name on this package, whatever was there.
# So the subpackage itself is made callable: `lorakit.train(config)` calls train.recipe.train, and
# `import lorakit.train.recipe` keeps working. Their __init__ files hold only a docstring (no cost).
_CALLABLE_PACKAGES = {
    "train": ("lorakit.train.recipe", "train"),
    "evaluate": ("lorakit.evaluate.runner", "evaluate_path"),
    "plan": ("lorakit.plan.planner", "plan_run"),
}


def _resolve(module: str, attribute: str) -> Any:
    return getattr(importlib.import_module(module), attribute)


class _CallablePackage(types.ModuleType):
    """A subpackage that, called, runs its stage's main function (imported on the first call)."""

    _target: tuple[str, str]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return _resolve(*self._target)(*args, **kwargs)

    @property
    def __wrapped__(self) -> Any:
        """The function a call runs, for inspect.signature, help() and the docstring check."""
        return _resolve(*self._target)


for _name, _target in _CALLABLE_PACKAGES.items():
    _package = importlib.import_module(f"{__name__}.{_name}")
    _package.__class__ = _CallablePackage
    _package._target = _target  # type: ignore[attr-defined]
del _name, _target, _package


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = _resolve(*_LAZY[name])
        globals()[name] = value  # resolved once; later lookups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
