"""Generates the config reference (docs/config.md) from the typed config, so it is always true.

Run `python -m lorakit.config_reference > docs/config.md`; a test fails when the file is stale.
"""

from __future__ import annotations

import typing

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from .config import LorakitConfig


def _type_name(annotation) -> str:
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " \\| ".join(f"`{value}`" for value in typing.get_args(annotation))
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        parts = [_type_name(arg) for arg in typing.get_args(annotation) if arg is not type(None)]
        optional = type(None) in typing.get_args(annotation)
        return " \\| ".join(parts) + (" or null" if optional else "")
    if origin is not None:
        args = ", ".join(_type_name(arg) for arg in typing.get_args(annotation))
        return f"{origin.__name__}[{args}]"
    return getattr(annotation, "__name__", str(annotation))


def _default(field) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "**required**"
    value = field.default_factory() if field.default_factory is not None else field.default
    if isinstance(value, BaseModel):
        return "(section)"
    return f"`{value!r}`"


def _rows(model: type[BaseModel], prefix: str) -> list[str]:
    rows = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            rows.extend(_rows(annotation, f"{key}."))
            continue
        description = (field.description or "").replace("|", "\\|")
        rows.append(f"| `{key}` | {_type_name(annotation)} | {_default(field)} | {description} |")
    return rows


def render_reference() -> str:
    lines = [
        "# Config reference",
        "",
        "Generated from `lorakit/config.py` by `python -m lorakit.config_reference`; do not edit by hand.",
        "Precedence: code defaults < YAML file < `--set key.sub=value`. Unknown keys are errors.",
        "",
    ]
    for section, field in LorakitConfig.model_fields.items():
        lines += [f"## `{section}`", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        lines += _rows(field.annotation, f"{section}.")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(render_reference(), end="")
