"""Loading a config: YAML file < `--set` overrides, validated at once, every problem reported with its fix."""

from __future__ import annotations

import difflib
import logging
from collections.abc import Hashable
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from .config import LorakitConfig, Problem, ServeConfig
from .errors import ConfigError

logger = logging.getLogger("lorakit.config")


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):
            child = {}
            node[key] = child
        node = child
    node[keys[-1]] = value


def parse_overrides(overrides: list[str] | None) -> list[tuple[str, Any]]:
    """`key.sub=value` strings -> (key, value); values are parsed as YAML (numbers, lists, true)."""
    parsed = []
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(
                f"--set '{item}' has no '='.", hint="write --set section.key=value, e.g. --set train.epochs=2"
            )
        key, raw = item.split("=", 1)
        if not all(part.strip() for part in key.split(".")):
            raise ConfigError(
                f"--set '{item}': '{key}' is not a key.",
                hint="write --set section.key=value, e.g. --set train.epochs=2",
            )
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        parsed.append((key.strip(), value))
    return parsed


def _known_keys(model: type[BaseModel], loc: tuple[int | str, ...]) -> list[str]:
    """The field names valid at `loc` (a pydantic error location), for "did you mean"."""
    current: Any = model
    for part in loc[:-1]:
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return []
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            current = annotation
        else:
            return []
    return list(getattr(current, "model_fields", {}).keys())


def _describe(err: ErrorDetails, model: type[BaseModel]) -> tuple[str, str]:
    """(what is wrong, how to fix it) for one pydantic error, both naming the key."""
    loc = tuple(err["loc"])
    key = ".".join(str(p) for p in loc) or "(top level)"
    if err["type"] == "extra_forbidden":
        known = _known_keys(model, loc)
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        suggestion = f" (did you mean '{'.'.join(str(p) for p in loc[:-1] + (close[0],))}'?)" if close else ""
        return f"{key}: unknown key{suggestion}", f"{key}: rename or remove it; valid keys here: {', '.join(known)}"
    if err["type"] == "missing":
        return f"{key}: required but missing", f"add {key} to the config or pass --set {key}=..."
    problem = (err.get("ctx") or {}).get("error")
    if isinstance(problem, Problem):  # our own validators say what to do
        where = key if key != "(top level)" else "config"
        return f"{where}: {problem.what}", problem.fix
    value = err.get("input")
    shown = repr(value) if not isinstance(value, dict) else "{...}"
    message = err["msg"].removeprefix("Value error, ")
    return f"{key}: {message} (got {shown})", f"set {key} to a value that satisfies: {message[:1].lower()}{message[1:]}"


def validate_config(tree: dict[str, Any], source: str = "config") -> LorakitConfig:
    """Validate a raw config tree, reporting every problem at once."""
    if not isinstance(tree, dict):
        raise ConfigError(
            f"{source}: the top level must be a mapping of sections (data, model, ...).",
            hint="start from a config in examples/: data:, model:, train: ... at the left margin",
        )
    try:
        return LorakitConfig.model_validate(tree)
    except ValidationError as exc:
        raise _config_error(source, [_describe(err, LorakitConfig) for err in exc.errors()]) from None


def _config_error(source: str, described: list[tuple[str, str]]) -> ConfigError:
    problems = [what for what, _ in described]
    return ConfigError(
        f"{source}: {len(problems)} problem(s): {'; '.join(problems).rstrip('.?')}.",
        hint="; ".join(fix for _, fix in described),
        problems=problems,
    )


def load_serve_config(path: str | Path | None = None, **overrides: Any) -> ServeConfig:
    """The serve settings: ServeConfig's defaults < the file's serve section < overrides.

    Only the serve section is read, so a serve-only file needs no data or model section. An
    override of None means "not given" (the command-line flags pass None when left out).

    Raises:
        ConfigError: the file cannot be read, or a serve key or value is invalid.
    """
    section = load_config_tree(path).get("serve") if path is not None else None
    section = dict(section) if isinstance(section, dict) else ({} if section is None else section)
    if isinstance(section, dict):
        section.update({key: value for key, value in overrides.items() if value is not None})
    try:
        return ServeConfig.model_validate(section)
    except ValidationError as exc:
        described = [_describe({**err, "loc": ("serve", *err["loc"])}, LorakitConfig) for err in exc.errors()]
        raise _config_error(str(path) if path else "serve settings", described) from None


def load_config_tree(path: str | Path | None, overrides: list[str] | None = None) -> dict[str, Any]:
    """Read YAML and apply overrides, without validating."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise ConfigError(
                f"'{path}' is a folder, not a config file.",
                hint="give the YAML file itself, e.g. examples/faq_chatbot.yaml",
            )
        if not path.is_file():
            raise ConfigError(
                f"config file '{path}' does not exist.", hint="check the path, or start from one in examples/"
            )
        try:
            loader = _WarnDuplicatesLoader(_read_utf8(path))
            loader.name = str(path)  # for the duplicate-key warning
            try:
                loaded = loader.get_single_data()
            finally:
                loader.dispose()
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ConfigError(
                f"{path}: invalid YAML{where}: {getattr(exc, 'problem', exc)}.", hint="fix the YAML syntax there"
            ) from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(
                f"{path}: the top level must be a mapping of sections (data, model, ...).",
                hint="start from a config in examples/: data:, model:, train: ... at the left margin",
            )
        tree = loaded
    for key, value in parse_overrides(overrides):
        _set_dotted(tree, key, value)
    return tree


def _read_utf8(path: Path) -> str:
    """A config file's text; anything but UTF-8 is an error naming the line and the fix."""
    from .files import wide_encoding

    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"{path}: cannot read the config file: {exc.strerror}.", hint="check the path and its permissions"
        ) from None
    encoding = wide_encoding(data)
    if encoding:
        raise ConfigError(f"{path}: the file is encoded as {encoding}, not UTF-8.", hint="re-save it as UTF-8")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(
            f"{path}: line {line} holds the byte 0x{data[exc.start]:02x}, which is not UTF-8 (the file was saved as Latin-1 or Windows-1252?).",
            hint="re-save the file as UTF-8",
        ) from None


class _WarnDuplicatesLoader(yaml.SafeLoader):
    """YAML keeps the last of two equal keys silently; say so, since one of them was a mistake."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        seen: set[Hashable] = set()
        for key_node, _ in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if key is not None and key in seen:
                logger.warning(
                    "warning: %s line %d: duplicate key '%s'; the last value is used.",
                    self.name,
                    key_node.start_mark.line + 1,
                    key,
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def check_paths(config: LorakitConfig) -> None:
    """Checks against the file system that need no data, tokenizer or weights: the run folder
    can be created under train.output_dir."""
    output = Path(config.train.output_dir).expanduser()
    for folder in (output, *output.parents):
        if folder.exists():
            if not folder.is_dir():
                raise ConfigError(
                    f"train.output_dir: '{folder}' is a file, so run folders cannot be made under '{output}'.",
                    hint="set train.output_dir to a folder (it is created when missing), e.g. runs",
                )
            break


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> LorakitConfig:
    """Load a YAML config, apply `--set` overrides, validate everything at once.

    Relative data paths are resolved against the config file's folder when they exist there.

    Args:
        path: the YAML file; None for code defaults and overrides alone.
        overrides: "section.key=value" strings (`--set`), applied after the file.

    Returns:
        The validated config: every value checked, cross-field rules included.

    Raises:
        ConfigError: the file is missing, not UTF-8 or not YAML, any key or value is invalid, or
            train.output_dir lies under a file.
    """
    tree = load_config_tree(path, overrides)
    config = validate_config(tree, source=str(path) if path else "config")
    check_paths(config)
    if path is not None:
        base = Path(path).resolve().parent
        for attr in ("path", "validation_path", "test_path"):
            value = getattr(config.data, attr)
            if value and not Path(value).is_absolute() and not Path(value).exists() and (base / value).exists():
                setattr(config.data, attr, str(base / value))
    return config
