"""Prompt templates: how a conversation becomes the text a model is trained on and prompted with.

Every template is Jinja text rendered from the same variables: `messages` (role/content dicts,
system messages removed), `context` (a passage or None), `system` (a system prompt or None) and
`add_generation_prompt`. The built-ins are written here; `chat` copies the tokenizer's own chat
template. The whole source is stored in a run's lorakit.json, so a run renders exactly as it was
trained with no config at hand.

Training text is split into segments by rendering growing prefixes of the conversation and
taking string differences; that works for any prefix-stable Jinja template, ours or a model's.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import TemplateError
from .builtin_templates import BUILTINS, NAMES

if TYPE_CHECKING:  # annotations only, no import cost
    from transformers import PreTrainedTokenizerBase

    from ..config import TemplateConfig

# --- built-in templates ---------------------------------------------------------------------
# Assistant replies are never followed by text inside their own turn: separators come before
# the next turn, so a trained segment is exactly the reply (tokenize appends EOS after it).


# Tokens that models' chat templates read by name (HF passes the same ones).
_SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


@dataclass
class Template:
    """A named template with its full Jinja source: everything needed to render it again.

    system: the configured default system prompt; a record's own system message wins over it.
    special_tokens: token strings a model chat template may reference (bos_token, eos_token...).
    """

    name: str
    source: str
    stop_strings: list[str]
    uses_model_chat_template: bool
    task_type: str = "causal"
    system: str | None = None
    special_tokens: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Template:
        try:
            return cls(
                name=data["name"],
                source=data["source"],
                stop_strings=list(data.get("stop_strings") or []),
                uses_model_chat_template=bool(data.get("uses_model_chat_template", False)),
                task_type=data.get("task_type", "causal"),
                system=data.get("system"),
                special_tokens=dict(data.get("special_tokens") or {}),
            )
        except KeyError as exc:
            raise TemplateError(
                f"stored template is missing the field {exc.args[0]!r}.",
                hint="the run's lorakit.json is incomplete; re-train or restore it from the run's config",
            ) from None

    def render(self, messages: list[dict], context=None, system=None, add_generation_prompt=False) -> str:
        """Render the conversation to text (see the module docstring for the variables)."""
        system_text, turns = _split_system(messages, system if system is not None else self.system)
        variables: dict[str, Any] = dict(self.special_tokens)
        if self.uses_model_chat_template:
            turns = _chat_messages(turns, context, system_text)
        variables.update(
            messages=turns,
            context=context or None,
            system=system_text,
            add_generation_prompt=add_generation_prompt,
            tools=None,
            documents=None,
        )
        try:
            return _compile(self.source).render(**variables)
        except jinja2.TemplateError as exc:
            raise TemplateError(
                f"template '{self.name}' failed to render: {exc}.",
                hint="check the conversation's roles (some chat templates require user/assistant to alternate)"
                " or pick another template with template.name",
            ) from None


def _split_system(messages: list[dict], default: str | None) -> tuple[str | None, list[dict]]:
    """Pull system messages out of the conversation; the record's own system text beats the default."""
    own = [m["content"] for m in messages if m["role"] == "system"]
    turns = [{"role": m["role"], "content": m["content"]} for m in messages if m["role"] != "system"]
    return ("\n\n".join(own) if own else default) or None, turns


def _chat_messages(turns: list[dict], context: str | None, system: str | None) -> list[dict]:
    """A model's chat template knows only messages: fold system and context into them."""
    out = [{"role": "system", "content": system}] if system else []
    placed = not context
    for message in turns:
        if not placed and message["role"] == "user":
            message = {"role": "user", "content": f"Context: {context}\n\nQuestion: {message['content']}"}
            placed = True
        out.append(message)
    return out


# --- the Jinja environment --------------------------------------------------------------------


class _GenerationTag(jinja2.ext.Extension):
    """Accept the `{% generation %}` blocks some hub chat templates use; render the body as is."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    import json

    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    from datetime import datetime

    return datetime.now().strftime(fmt)


@lru_cache(maxsize=32)
def _compile(source: str) -> jinja2.Template:
    # The same sandbox and helpers as transformers' apply_chat_template, so hub templates render.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
    return env.from_string(source)


# --- resolving a config to a template ---------------------------------------------------------


def _special_tokens(tokenizer) -> dict[str, str]:
    tokens = {}
    for name in _SPECIAL_TOKEN_NAMES:
        value = getattr(tokenizer, name, None) if tokenizer is not None else None
        if isinstance(value, str):
            tokens[name] = value
    return tokens


def _model_chat_template(tokenizer) -> str | None:
    source = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    if isinstance(source, dict):  # several named templates: the default one is for chat
        source = source.get("default")
    return source if isinstance(source, str) and source.strip() else None


def resolve_template(
    config: TemplateConfig, tokenizer: PreTrainedTokenizerBase, task_type: str = "causal", has_context: bool = False
) -> Template:
    """Turn the `template` config section into a Template, checked on a sample conversation.

    `auto` picks the tokenizer's own chat template when it has one, else `context_qa` when the
    data has passages (`has_context`), else `question_answer`.

    Raises:
        TemplateError: unknown name; `chat` without a tokenizer chat template; `custom` without
            text or with a Jinja syntax error (the line is named); a template that cannot render
            a conversation or is not prefix-stable.
    """
    name = getattr(config, "name", "auto")
    system = getattr(config, "system_prompt", None)
    chat_source = _model_chat_template(tokenizer)
    if name == "auto":
        name = "chat" if chat_source else ("context_qa" if has_context else "question_answer")

    if name in BUILTINS:
        source, stops = BUILTINS[name]
        template = Template(name, source, list(stops), False, task_type, system, _special_tokens(tokenizer))
    elif name == "chat":
        if chat_source is None:
            raise TemplateError(
                "template.name is 'chat' but the tokenizer has no chat_template.",
                hint="set template.name to one of human_assistant, question_answer, alpaca, context_qa"
                " (or auto), or give your own Jinja text with template.name=custom and template.custom",
            )
        template = Template("chat", chat_source, [], True, task_type, system, _special_tokens(tokenizer))
        template.stop_strings = _derive_stop_strings(template)
    elif name == "custom":
        source = getattr(config, "custom", None) or ""
        if not source:
            raise TemplateError(
                "template.name is 'custom' but template.custom is empty.",
                hint="put your Jinja text in template.custom (variables: messages, context, system,"
                " add_generation_prompt)",
            )
        try:
            _compile(source)
        except jinja2.TemplateSyntaxError as exc:
            raise TemplateError(
                f"template.custom: Jinja syntax error at line {exc.lineno}: {exc.message}.",
                hint=f"fix line {exc.lineno} of template.custom",
            ) from None
        template = Template("custom", source, [], False, task_type, system, _special_tokens(tokenizer))
        template.stop_strings = _derive_stop_strings(template)
    else:
        raise TemplateError(
            f"template.name: unknown template '{name}'.",
            hint=f"use one of: {', '.join(NAMES)}",
        )
    _self_check(template)
    return template


_SAMPLE = [
    {"role": "user", "content": "lorakit-q1"},
    {"role": "assistant", "content": "lorakit-a1"},
    {"role": "user", "content": "lorakit-q2"},
    {"role": "assistant", "content": "lorakit-a2"},
]


def _self_check(template: Template) -> None:
    """Fail at resolve time, not mid-dataset: render a two-turn sample and check both replies."""
    segments = render_segments(template, _SAMPLE, context="lorakit-ctx")
    trained = [text for text, is_trained in segments if is_trained]
    full = "".join(text for text, _ in segments)
    if template.task_type == "causal" and (len(trained) != 2 or "lorakit-a1" not in trained[0]):
        raise TemplateError(
            f"template '{template.name}' does not render assistant replies where training expects them.",
            hint="the template must output each assistant message's content, in order",
        )
    for needle in ("lorakit-q1", "lorakit-q2"):
        if needle not in full:
            raise TemplateError(
                f"template '{template.name}' drops user messages (it never renders their content).",
                hint="loop over `messages` and output every message's content",
            )
    if template.system and template.system not in full:
        raise TemplateError(
            f"template '{template.name}' does not render the system prompt (template.system_prompt).",
            hint="output {{ system }} in the template, or leave template.system_prompt unset",
        )


_END_MARKER = re.compile(r"\s*(<[^<>\s]+>)")  # <|im_end|>, <|eot_id|>, </s>, <end_of_turn>


def _derive_stop_strings(template: Template) -> list[str]:
    """For templates we did not write: stop at the end-of-turn marker after a reply and at the
    header that opens the next user turn, both read off a rendered sample."""
    probe = Template(
        template.name, template.source, [], template.uses_model_chat_template, "causal", None, template.special_tokens
    )
    text = probe.render(_SAMPLE)
    stops = []
    a1, q2 = text.find("lorakit-a1"), text.find("lorakit-q2")
    if 0 <= a1 < q2:
        between = text[a1 + len("lorakit-a1") : q2]
        marker = _END_MARKER.match(between)
        if marker:
            stops.append(marker.group(1))
            between = between[marker.end() :]
        header = between.rstrip()
        if header.strip():
            stops.append(header if header.startswith("\n") else header.lstrip())
    eos = template.special_tokens.get("eos_token")
    if eos and eos not in stops:
        stops.append(eos)
    return stops


# --- rendering --------------------------------------------------------------------------------


def render_prompt(template: Template, messages: list[dict], context=None, system=None) -> str:
    """The text up to where the model's reply begins: what inference feeds the model.

    `messages` are the prompt messages (no final assistant turn). For a seq2seq model this is the
    encoder input; the reply is the decoder's target.
    """
    return template.render(messages, context, system, add_generation_prompt=True)


def render_segments(
    template: Template, messages: list[dict], context=None, system=None, *, add_generation_prompt=False
) -> list[tuple[str, bool]]:
    """The full training text split into (text, trained) segments; every assistant reply is trained.

    Causal models: each reply is the difference between rendering messages[:i+1] and rendering
    messages[:i] with the generation prompt; the end-of-turn marker a chat template writes after a
    reply stays in the trained segment, whitespace after it does not. Seq2seq models: the prompt
    of the last turn, then its reply. `add_generation_prompt=True` ends the text with the
    generation prompt instead (for building a multi-turn inference prompt the training way).

    Raises:
        TemplateError: the template is not prefix-stable (an earlier turn renders differently once
            later turns follow), so replies cannot be located in the training text.
    """
    if template.task_type == "seq2seq":
        _, turns = _split_system(messages, None)
        if turns and turns[-1]["role"] == "assistant" and not add_generation_prompt:
            prompt = render_prompt(template, messages[: _last_assistant(messages)], context, system)
            return [(prompt, False), (turns[-1]["content"], True)]
        return [(render_prompt(template, messages, context, system), False)]

    segments: list[tuple[str, bool]] = []
    done = ""  # the text already split into segments
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = template.render(messages[:i], context, system, add_generation_prompt=True)
        after = template.render(messages[: i + 1], context, system)
        if not before.startswith(done) or not after.startswith(before):
            raise _not_prefix_stable(template, i)
        reply = after[len(before) :]
        body = reply.rstrip()
        segments += [(before[len(done) :], False), (body, True), (reply[len(body) :], False)]
        done = after
    full = template.render(messages, context, system, add_generation_prompt=add_generation_prompt)
    if not full.startswith(done):
        raise _not_prefix_stable(template, len(messages) - 1)
    segments.append((full[len(done) :], False))
    merged: list[tuple[str, bool]] = []
    for text, trained in segments:
        if merged and not trained and not merged[-1][1]:
            merged[-1] = (merged[-1][0] + text, False)
        elif text or trained:
            merged.append((text, trained))
    return merged


def _last_assistant(messages: list[dict]) -> int:
    return max(i for i, m in enumerate(messages) if m["role"] == "assistant")


def _not_prefix_stable(template: Template, index: int) -> TemplateError:
    return TemplateError(
        f"template '{template.name}' is not prefix-stable: message {index} changes how earlier turns"
        " render, so the assistant replies cannot be located in the training text.",
        hint="use a built-in template (template.name=question_answer, human_assistant, ...) or a custom"
        " template that renders each turn independently of the turns after it",
    )
