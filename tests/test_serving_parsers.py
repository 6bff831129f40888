"""DeepSeek reasoning and tool-call parsing, on crafted outputs fed token by token as the server streams them."""

from __future__ import annotations

import json

import pytest

from dsv3.cli import SHIPPED_MODEL
from dsv3.serving.parsers import OutputParser, parse_output, parse_tool_call, tools_system_prompt
from dsv3.tokenizer import AutoTokenizer

CALL_V3 = ("<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n"
           '{"city": "Paris", "unit": "C"}\n```<｜tool▁call▁end｜>\n<｜tool▁call▁begin｜>function<｜tool▁sep｜>'
           'get_time\n```json\n{"tz": "CET"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>')


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(SHIPPED_MODEL)


def stream(tok, text: str, **kw):
    """Encode text (its markers become the model's special tokens), then feed the decoded tokens one by one."""
    ids = tok(text, add_special_tokens=False)["input_ids"]
    p = OutputParser(**kw)
    reasoning, content, calls, pieces = "", "", [], []
    for i in range(len(ids)):
        piece = tok.decode(ids[: i + 1])[len(tok.decode(ids[:i])):]
        d = p.feed(piece)
        pieces.append(d)
        reasoning, content, calls = reasoning + d.reasoning, content + d.content, calls + d.tool_calls
    d = p.finish()
    return reasoning + d.reasoning, content + d.content, calls + d.tool_calls, pieces


def test_marker_tokens_exist(tok):
    for marker in ["<think>", "</think>", "<｜tool▁calls▁begin｜>", "<｜tool▁call▁begin｜>", "<｜tool▁sep｜>",
                   "<｜tool▁call▁end｜>", "<｜tool▁calls▁end｜>"]:
        assert len(tok(marker, add_special_tokens=False)["input_ids"]) == 1, marker


def test_reasoning_split_streamed(tok):
    text = "<think>\nThe user wants 2+2. That is 4.\n</think>\n\nThe answer is 4."
    reasoning, content, calls, pieces = stream(tok, text)
    assert reasoning == "\nThe user wants 2+2. That is 4.\n"
    assert content == "The answer is 4."
    assert calls == []
    # streamed as produced: reasoning arrives before the end marker, and no piece leaks a marker
    first_content = next(i for i, d in enumerate(pieces) if d.content)
    assert any(d.reasoning for d in pieces[:first_content])
    assert all("<" not in d.reasoning + d.content for d in pieces)
    assert parse_output(text) == (reasoning, content, [])


def test_no_reasoning_when_output_does_not_open_it(tok):
    assert parse_output("Plain answer <thinking about it>") == (None, "Plain answer <thinking about it>", [])
    # the prompt already opened <think> (R1-0528 templates): everything up to </think> is reasoning
    assert parse_output("step 1\n</think>\nDone", in_reasoning=True) == ("step 1\n", "Done", [])


def test_tool_calls_v3_format_streamed(tok):
    reasoning, content, calls, pieces = stream(tok, "Let me check." + CALL_V3)
    assert content == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris", "unit": "C"}), ("get_time", {"tz": "CET"})]
    assert all("tool" not in d.content for d in pieces)
    # each call is emitted when its end token arrives, not only at the end
    emitted_at = [i for i, d in enumerate(pieces) if d.tool_calls]
    assert len(emitted_at) == 2 and emitted_at[0] < emitted_at[1]


def test_tool_call_forms():
    v31 = parse_tool_call('search<｜tool▁sep｜>{"q": "x"}')
    assert (v31.name, json.loads(v31.arguments)) == ("search", {"q": "x"})
    fenced = parse_tool_call('function<｜tool▁sep｜>f\n```json\n{"a": [1, 2]}\n```')
    assert (fenced.name, json.loads(fenced.arguments)) == ("f", {"a": [1, 2]})
    assert parse_tool_call("garbage without separator") is None
    # an unparseable call is shown as content rather than dropped
    _, content, calls = parse_output("<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>oops<｜tool▁call▁end｜>")
    assert calls == [] and "oops" in content


def test_reasoning_then_tool_call(tok):
    reasoning, content, calls, _ = stream(tok, "<think>need weather</think>" + CALL_V3)
    assert reasoning == "need weather" and content == "" and [c.name for c in calls] == ["get_weather", "get_time"]


def test_tools_without_tool_parsing_stay_text():
    text = "x" + CALL_V3
    assert parse_output(text, tools=False) == (None, text, [])


def test_tools_prompt_names_every_tool_and_the_call_format():
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                                "parameters": {"type": "object", "properties": {"city": {}}}}}]
    text = tools_system_prompt(tools)
    assert "### get_weather" in text and "Weather of a city" in text and '"city"' in text
    assert "<｜tool▁call▁begin｜>function<｜tool▁sep｜>" in text


class _FakeEngine:
    max_context = 4096
    cancelled: list = []

    def cancel(self, rid):
        self.cancelled.append(rid)


def _job(tok, stream: bool, tools: bool = True):
    from types import SimpleNamespace

    from dsv3.serving.app import _Job
    from dsv3.serving.engine import SamplingOptions
    from dsv3.serving.protocol import ChatCompletionRequest

    state = SimpleNamespace(engine=_FakeEngine(), tokenizer=tok, model_name="m", reasoning=True)
    req = ChatCompletionRequest.model_validate({
        "model": "m", "messages": [{"role": "user", "content": "weather?"}], "stream": stream,
        "stream_options": {"include_usage": True} if stream else None,
        "tools": [{"type": "function", "function": {"name": "get_weather"}}] if tools else None})
    return _Job(state, req, "chat", "chatcmpl-x", ["chatcmpl-x-0"], [[1, 2, 3]], SamplingOptions(), False, tools)


def _updates(tok, text: str):
    """The engine's updates for an output whose tokens are tok(text), one token each, then eos."""
    from dsv3.serving.engine import SequenceUpdate

    ids = tok(text, add_special_tokens=False)["input_ids"]
    ups = [SequenceUpdate("chatcmpl-x-0", 0, [t], tok.decode(ids[: i + 1])[len(tok.decode(ids[:i])):], [], None, 3,
                          i + 1) for i, t in enumerate(ids)]
    ups.append(SequenceUpdate("chatcmpl-x-0", 0, [1], "", [], "stop", 3, len(ids) + 1))
    return ups


def test_chat_response_with_reasoning_and_tool_calls(tok):
    job = _job(tok, stream=False)
    for u in _updates(tok, "<think>check the weather</think>" + CALL_V3):
        job.absorb(u)
    out = job.final()
    choice = out["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["reasoning_content"] == "check the weather"
    assert choice["message"]["content"] is None
    calls = choice["message"]["tool_calls"]
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Paris", "unit": "C"}), ("get_time", {"tz": "CET"})]
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)
    assert out["usage"]["completion_tokens"] == len(tok("<think>check the weather</think>" + CALL_V3,
                                                        add_special_tokens=False)["input_ids"]) + 1


def test_chat_stream_with_reasoning_and_tool_calls(tok):
    import asyncio

    job = _job(tok, stream=True)

    async def run():
        q: asyncio.Queue = asyncio.Queue()
        for u in _updates(tok, "<think>hm</think>\n\nSure." + CALL_V3):
            q.put_nowait(u)
        return [c async for c in job.stream(q)]

    chunks = asyncio.run(run())
    assert chunks[-1] == "data: [DONE]\n\n"
    bodies = [json.loads(c[6:]) for c in chunks[:-1]]
    assert bodies[-1]["choices"] == [] and bodies[-1]["usage"]["prompt_tokens"] == 3       # include_usage
    deltas = [b["choices"][0]["delta"] for b in bodies[:-1]]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "hm"
    assert "".join(d.get("content", "") for d in deltas) == "Sure."
    calls = [c for d in deltas for c in d.get("tool_calls", [])]
    assert [(c["index"], c["function"]["name"]) for c in calls] == [(0, "get_weather"), (1, "get_time")]
    assert bodies[-2]["choices"][0]["finish_reason"] == "tool_calls"
    assert not any("<｜" in d.get("content", "") + d.get("reasoning_content", "") for d in deltas)
