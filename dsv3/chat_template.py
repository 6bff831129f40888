"""Chat templates: the Jinja `chat_template` of a checkpoint rendered as transformers 5.23 renders it
(`transformers.utils.chat_template_utils`), without transformers.

The environment is transformers': sandboxed, `trim_blocks`, `lstrip_blocks`, loop controls, a
`{% generation %}` tag, `raise_exception`, `strftime_now`, a non-HTML-escaping `tojson`, and a `namespace`
that refuses underscore attributes. Messages: keys whose value is `None` are dropped before rendering
(OpenAI-style `content=None` next to `tool_calls` therefore reaches DeepSeek's template as a missing key,
and its `content is none` branch raises `UndefinedError`: pass `content=""`); `reasoning`/`thinking` are
aliased to `reasoning_content`. Inputs are rebuilt from plain JSON types first (the sandbox cannot vet the
methods of rich objects); a numpy scalar is accepted only when numpy is already imported — dsv3 never
imports it.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any, ClassVar

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "

Conversation = list[dict[str, Any]]


def select_template(templates: str | dict[str, str] | None, chat_template: str | None = None,
                    tools: list[dict] | None = None, source: str = "this tokenizer") -> str:
    """The template string: `chat_template` itself, a named one of `templates`, or the default."""
    if isinstance(templates, dict):
        if chat_template in templates:
            return templates[chat_template]
        if chat_template is None:
            name = "tool_use" if tools is not None and "tool_use" in templates else "default"
            if name not in templates:
                raise ValueError(f"No default chat template among {sorted(templates)}; pass chat_template=NAME.")
            return templates[name]
        return chat_template
    if chat_template is not None:
        return chat_template
    if templates is None:
        raise ValueError(f"{source} has no chat template; pass chat_template=JINJA_STRING.")
    return templates


def render_chat(template: str, conversation: Conversation | Sequence[Conversation], tools: list[dict] | None = None,
                documents: list[dict] | None = None, add_generation_prompt: bool = False,
                continue_final_message: bool | str = False, variables: Mapping[str, Any] | None = None
                ) -> str | list[str]:
    """Render one conversation (-> str) or a batch of them (-> list[str]) with `template`."""
    if isinstance(conversation, (list, tuple)) and not conversation:
        raise ValueError("Cannot apply the chat template to an empty conversation; pass at least one message.")
    batched = isinstance(conversation[0], (list, tuple)) or hasattr(conversation[0], "messages")
    conversations = conversation if batched else [conversation]
    conversations = [getattr(c, "messages", c) for c in conversations]
    if continue_final_message and add_generation_prompt:
        raise ValueError("continue_final_message and add_generation_prompt are exclusive; pick one.")
    for tool in tools or []:
        if not isinstance(tool, dict):
            raise TypeError(f"tools must be JSON-schema dicts, got {type(tool).__name__}: {tool!r}.")
    plain_vars = _plain_template_data(dict(variables or {}))
    rendered = [_render(template, chat, _plain_template_data(tools), _plain_template_data(documents),
                        add_generation_prompt, continue_final_message, plain_vars)
                for chat in conversations]
    return rendered if batched else rendered[0]


class _GenerationTag(jinja2.ext.Extension):
    """Accepts `{% generation %}...{% endgeneration %}` (assistant-mask markers) and renders the body."""

    tags: ClassVar[set[str]] = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller: Any) -> str:
        return caller()


class _TemplateDict:
    """`dict(...)` inside templates without exposing the real type."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """Jinja's namespace, refusing underscore names (a sandbox escape route)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # no `self`: lets templates pass `self=` (Jinja's trick)
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"Chat templates cannot store underscore-prefixed attributes on a namespace, got {name!r}."
            )


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # Jinja's own tojson HTML-escapes (<, >, &, '), which would change the prompt.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


@lru_cache
def _compile(template: str) -> jinja2.Template:
    if tuple(int(p) for p in jinja2.__version__.split(".")[:3] if p.isdigit()) < (3, 1, 6):
        raise ImportError(f"jinja2 {jinja2.__version__} has sandbox escapes; "
                          "`pip install -U 'jinja2>=3.1.6'`.")
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_TemplateDict(),
                       namespace=_TemplateNamespace)
    return env.from_string(template)


def _plain_template_data(value: Any) -> Any:
    """Rebuild inputs from plain JSON types (the sandbox cannot vet methods of rich objects)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain_template_data(k): _plain_template_data(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain_template_data(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain_template_data(v) for v in value)
    np = sys.modules.get("numpy")  # a numpy scalar implies numpy is already imported
    if np is not None and isinstance(value, np.generic):
        return _plain_template_data(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain_template_data(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):  # pydantic
        return _plain_template_data(value.model_dump())
    return f"<{type(value).__name__}>"


def _render(template: str, chat: Conversation, tools: Any, documents: Any, add_generation_prompt: bool,
            continue_final_message: bool | str, variables: dict[str, Any]) -> str:
    """One conversation → prompt text (transformers' `render_jinja_template` for one chat)."""
    for i, message in enumerate(chat):
        if not isinstance(message, Mapping):
            raise TypeError(f"Message {i} is {message!r}; messages must be dicts with 'role' and 'content'.")
    # Drop None values first: APIs send content=None next to tool_calls, templates mostly test for presence.
    chat = _plain_template_data([{k: v for k, v in m.items() if v is not None} for m in chat])
    for i, message in enumerate(chat):
        reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            chat[i] = {"thinking": reasoning, **message, "reasoning_content": reasoning}
    final_message = None
    if continue_final_message:
        field = continue_final_message if isinstance(continue_final_message, str) else "content"
        final_message = chat[-1].get(field)
        if final_message is None:
            raise ValueError(f"continue_final_message is set but the final message has no {field!r} "
                             "to continue.")
        fields = [field]
        if field in _REASONING_FIELDS:
            fields = [f for f in _REASONING_FIELDS if chat[-1].get(f) == final_message]
        if not any(f in template for f in fields):
            raise ValueError(f"continue_final_message={field!r} but the chat template never reads it.")
        if isinstance(final_message, (list, tuple)):
            block = next((b for b in reversed(final_message) if "text" in b), None)
            if block is None:
                raise ValueError("continue_final_message is set but the final message has no text block.")
            final_message = block["text"]
            block["text"] += _CONTINUE_TAG
        else:
            for f in fields:
                chat[-1][f] = chat[-1][f] + _CONTINUE_TAG
    try:
        text = _compile(template).render(messages=chat, tools=tools, documents=documents,
                                         add_generation_prompt=add_generation_prompt, **variables)
    except jinja2.exceptions.UndefinedError as e:
        raise jinja2.exceptions.UndefinedError(
            f"{e} (message keys whose value is None are dropped before rendering, as in transformers; "
            "e.g. give an assistant tool-call message content='' instead of None)"
        ) from e
    if final_message is not None:
        if final_message.strip() not in text or _CONTINUE_TAG.strip() not in text:
            raise ValueError(
                "continue_final_message is set but the template removed part of the final message "
                f"(e.g. DeepSeek drops text before </think>); final message: {final_message.strip()!r}."
            )
        cut = text.rindex(_CONTINUE_TAG.strip())
        text = text[:cut] if text[cut:cut + len(_CONTINUE_TAG)] == _CONTINUE_TAG else text[:cut].rstrip()
    return text
