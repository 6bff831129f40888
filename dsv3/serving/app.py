"""HTTP routes of `dsv3 serve` (FastAPI): the OpenAI API over the engine, SSE streaming, metrics.

    GET  /health                  200 "ok" while the engine loop runs
    GET  /metrics                 Prometheus text
    GET  /v1/models               the served model
    POST /v1/completions          prompt: str | [str] | [ids] | [[ids]]  (tokenised as tokenizer(prompt))
    POST /v1/chat/completions     messages rendered by the checkpoint's chat template; tools, reasoning

The engine thread hands every SequenceUpdate to the request's asyncio queue (call_soon_threadsafe). A client
that goes away cancels its request (streaming: the response task is cancelled; non-streaming: polled), so its
sequences leave the batch and free their blocks at the next step.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import jinja2
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import ValidationError

from dsv3.serving.engine import Engine, QueueFullError, RequestTooLargeError, SamplingOptions, SequenceUpdate
from dsv3.serving.parsers import THINK_START, OutputParser, parse_output, tools_system_prompt
from dsv3.serving.protocol import APIError, ChatCompletionRequest, CompletionRequest, validation_error

logger = logging.getLogger(__name__)

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets, self.counts, self.sum, self.n = buckets, [0] * len(buckets), 0.0, 0
        self.lock = threading.Lock()

    def observe(self, v: float) -> None:
        with self.lock:
            for i, b in enumerate(self.buckets):
                if v <= b:
                    self.counts[i] += 1
            self.sum += v
            self.n += 1

    def lines(self, name: str, help: str) -> list[str]:
        with self.lock:
            out = [f"# HELP {name} {help}", f"# TYPE {name} histogram"]
            out += [f'{name}_bucket{{le="{b}"}} {c}' for b, c in zip(self.buckets, self.counts, strict=True)]
            out += [f'{name}_bucket{{le="+Inf"}} {self.n}', f"{name}_sum {self.sum}", f"{name}_count {self.n}"]
        return out


@dataclass
class ServerState:
    engine: Engine
    tokenizer: Any
    model_name: str
    api_key: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    ttft: Histogram = field(default_factory=lambda: Histogram(TTFT_BUCKETS))
    per_token: Histogram = field(default_factory=lambda: Histogram(TOKEN_BUCKETS))
    http_errors: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.engine.observers.append(lambda kind, v: (self.ttft if kind == "ttft" else self.per_token).observe(v))
        template = self.tokenizer.chat_template
        text = json.dumps(template) if template is not None else ""
        self.template_renders_tools = "tools" in text
        self.reasoning = THINK_START in text or "</think>" in text


def error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="dsv3", docs_url=None, redoc_url=None)
    app.state.server = state

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        state.http_errors[exc.status] = state.http_errors.get(exc.status, 0) + 1
        return error_response(exc)

    @app.exception_handler(404)
    async def _not_found(request: Request, exc: Exception) -> JSONResponse:
        return error_response(APIError(404, f"no route {request.method} {request.url.path}", code="not_found"))

    @app.exception_handler(405)
    async def _bad_method(request: Request, exc: Exception) -> JSONResponse:
        return error_response(APIError(405, f"{request.method} is not allowed on {request.url.path}",
                                       code="method_not_allowed"))

    def authorise(request: Request) -> None:
        if state.api_key is None:
            return
        if request.headers.get("authorization", "") != f"Bearer {state.api_key}":
            raise APIError(401, "invalid or missing API key: send the header 'Authorization: Bearer <key>' with the "
                           "key the server was started with (--api-key)", type="authentication_error",
                           code="invalid_api_key")

    @app.get("/health")
    async def health() -> Response:
        alive = state.engine.alive
        return PlainTextResponse("ok" if alive else "engine stopped", status_code=200 if alive else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return PlainTextResponse(render_metrics(state), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        authorise(request)
        return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": state.created,
                                            "owned_by": "dsv3", "max_model_len": state.engine.max_context}]}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        authorise(request)
        req = await parse_body(request, CompletionRequest)
        check_model(state, req.model)
        prompts = completion_prompts(state, req.prompt)
        opts = sampling_options(state, req, req.max_tokens if req.max_tokens is not None else 16,
                                req.logprobs, prompts)
        return await run(request, state, req, prompts, opts, kind="completion")

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        authorise(request)
        req = await parse_body(request, ChatCompletionRequest)
        check_model(state, req.model)
        prompt, in_reasoning = chat_prompt(state, req)
        max_tokens = req.max_completion_tokens or req.max_tokens
        opts = sampling_options(state, req, max_tokens, (req.top_logprobs or 0) if req.logprobs else None, [prompt])
        return await run(request, state, req, [prompt], opts, kind="chat", in_reasoning=in_reasoning)

    return app


# ------------------------------------------------------------------------------------------- request → engine
async def parse_body(request: Request, schema: type) -> Any:
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"the body is not valid JSON ({exc}); send a JSON object", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the body is JSON {type(data).__name__}, not an object; send a JSON object",
                       code="invalid_json")
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from None


def check_model(state: ServerState, model: str) -> None:
    if model != state.model_name:
        raise APIError(404, f"the model {model!r} does not exist; this server serves {state.model_name!r}",
                       param="model", code="model_not_found")


def completion_prompts(state: ServerState, prompt: Any) -> list[list[int]]:
    if isinstance(prompt, str):
        prompt = [prompt]
    elif prompt and isinstance(prompt[0], int):
        prompt = [prompt]
    out = []
    vocab = state.engine.model.config.vocab_size
    for p in prompt:
        ids = state.tokenizer(p)["input_ids"] if isinstance(p, str) else list(p)
        if not ids:
            raise APIError(400, "prompt is empty: send at least one token", param="prompt")
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"prompt holds token id {bad[0]}, outside [0, {vocab})", param="prompt")
        out.append(ids)
    return out


def chat_prompt(state: ServerState, req: ChatCompletionRequest) -> tuple[list[int], bool]:
    messages: list[dict[str, Any]] = []
    for m in req.messages:
        msg: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": m.text}
        if m.tool_calls:
            msg["tool_calls"] = [{"id": c.id, "type": "function", "function": {"name": c.function.name,
                                  "arguments": c.function.arguments}} for c in m.tool_calls]
        if m.tool_call_id is not None:
            msg["tool_call_id"] = m.tool_call_id
        messages.append(msg)
    tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools and req.tool_choice != "none" else None
    if tools and not state.template_renders_tools:
        # The V3/R1 template ignores `tools`: describe them in a system message in the template's own call format.
        logger.info("chat template does not render tools: describing %d tool(s) in the system prompt", len(tools))
        messages.insert(0, {"role": "system", "content": tools_system_prompt(tools)})
        tools = None
    try:
        text = state.tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)
    except (jinja2.TemplateError, ValueError, TypeError, KeyError) as exc:   # the messages' fault: a 400
        raise APIError(400, f"the chat template cannot render these messages: {type(exc).__name__}: {exc}",
                       param="messages") from None
    ids = state.tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids, text.rstrip().endswith(THINK_START)


def sampling_options(state: ServerState, req: Any, max_tokens: int | None, logprobs: int | None,
                     prompts: list[list[int]]) -> SamplingOptions:
    longest = max(len(p) for p in prompts)
    if max_tokens is None:
        max_tokens = state.engine.default_max_tokens(longest)
    opts = SamplingOptions(
        max_tokens=max_tokens, temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p, top_k=req.top_k or 0, seed=req.seed,
        presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty, stop=req.stop_list,
        ignore_eos=req.ignore_eos, logprobs=logprobs)
    for p in prompts:
        try:
            state.engine.check_request(len(p), max_tokens, req.n)
        except RequestTooLargeError as exc:
            raise APIError(400, str(exc), param="max_tokens" if len(p) < state.engine.max_context else "prompt",
                           code="context_length_exceeded") from None
    return opts


async def run(request: Request, state: ServerState, req: Any, prompts: list[list[int]], opts: SamplingOptions,
              kind: str, in_reasoning: bool = False) -> Response:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[SequenceUpdate] = asyncio.Queue()
    rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
    ids = []
    try:
        for i, p in enumerate(prompts):
            ids.append(state.engine.submit(p, opts, lambda u: loop.call_soon_threadsafe(queue.put_nowait, u),
                                           n=req.n, request_id=f"{rid}-{i}"))
    except QueueFullError as exc:
        for r in ids:
            state.engine.cancel(r)
        raise APIError(429, str(exc), type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"}) \
            from None
    tools = kind == "chat" and bool(req.tools) and req.tool_choice != "none"
    job = _Job(state, req, kind, rid, ids, prompts, opts, in_reasoning, tools)
    if req.stream:
        return StreamingResponse(job.stream(queue), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    try:
        checked = time.monotonic()
        while not job.done:
            try:
                job.absorb(await asyncio.wait_for(queue.get(), timeout=0.5))
            except TimeoutError:
                pass
            if time.monotonic() - checked > 0.5:          # tokens may arrive faster than any timeout
                checked = time.monotonic()
                if await request.is_disconnected():
                    job.cancel()
                    return Response(status_code=499)
    except asyncio.CancelledError:
        job.cancel()
        raise
    return JSONResponse(job.final())


class _Job:
    """One HTTP request's choices: collects engine updates into OpenAI responses or SSE chunks."""

    def __init__(self, state: ServerState, req: Any, kind: str, rid: str, engine_ids: list[str],
                 prompts: list[list[int]], opts: SamplingOptions, in_reasoning: bool, tools: bool) -> None:
        self.state, self.req, self.kind, self.id, self.engine_ids = state, req, kind, rid, engine_ids
        self.prompts, self.opts, self.n = prompts, opts, req.n
        self.created = int(time.time())
        total = len(prompts) * req.n
        self.text = [""] * total
        self.finish: list[str | None] = [None] * total
        self.completion_tokens = [0] * total
        self.cached = [0] * len(prompts)
        self.logprobs: list[list[Any]] = [[] for _ in range(total)]
        self.parsers = [OutputParser(state.reasoning, tools, in_reasoning) for _ in range(total)] \
            if kind == "chat" else []
        self.in_reasoning, self.tools = in_reasoning, tools
        self.error: str | None = None

    @property
    def done(self) -> bool:
        return all(f is not None for f in self.finish)

    def cancel(self) -> None:
        for r in self.engine_ids:
            self.state.engine.cancel(r)

    def index(self, u: SequenceUpdate) -> int:
        return int(u.request_id.rsplit("-", 1)[1]) * self.n + u.index

    def absorb(self, u: SequenceUpdate) -> int:
        i = self.index(u)
        self.text[i] += u.text
        self.completion_tokens[i] = u.completion_tokens
        self.cached[i // self.n] = u.cached_tokens
        self.logprobs[i] += u.logprobs
        if u.finish_reason is not None:
            self.finish[i] = u.finish_reason
        if u.error:
            self.error = u.error
        return i

    def usage(self) -> dict[str, Any]:
        prompt = sum(len(p) for p in self.prompts)
        done = sum(self.completion_tokens)
        return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done,
                "prompt_tokens_details": {"cached_tokens": sum(self.cached)}}

    # -------------------------------------------------------------------- logprobs in OpenAI's two shapes
    def _token(self, t: int) -> str:
        return self.state.tokenizer.decode([t])

    def completion_logprobs(self, lps: list[Any], offset: int) -> dict[str, Any] | None:
        if self.opts.logprobs is None:
            return None
        tokens = [self._token(x.token_id) for x in lps]
        offsets, pos = [], offset
        for t in tokens:
            offsets.append(pos)
            pos += len(t)
        return {"tokens": tokens, "token_logprobs": [x.logprob for x in lps],
                "top_logprobs": [{self._token(t): v for t, v in x.top} for x in lps], "text_offset": offsets}

    def chat_logprobs(self, lps: list[Any]) -> dict[str, Any] | None:
        if self.opts.logprobs is None:
            return None

        def entry(t: int, v: float) -> dict[str, Any]:
            s = self._token(t)
            return {"token": s, "logprob": v, "bytes": list(s.encode())}
        return {"content": [{**entry(x.token_id, x.logprob), "top_logprobs": [entry(t, v) for t, v in x.top]}
                            for x in lps]}

    # -------------------------------------------------------------------- whole responses
    def final(self) -> dict[str, Any]:
        if self.error:
            raise APIError(500, f"generation failed: {self.error}", type="server_error", code="engine_error")
        choices = []
        for i, text in enumerate(self.text):
            reason = "stop" if self.finish[i] == "abort" else self.finish[i]
            if self.kind == "completion":
                choices.append({"index": i, "text": text, "logprobs": self.completion_logprobs(self.logprobs[i], 0),
                                "finish_reason": reason})
                continue
            thought, content, calls = parse_output(text, self.state.reasoning, self.tools, self.in_reasoning)
            message: dict[str, Any] = {"role": "assistant", "content": content if content or not calls else None}
            if thought is not None:
                message["reasoning_content"] = thought
            if calls:
                message["tool_calls"] = [c.to_openai() for c in calls]
                reason = "tool_calls" if reason == "stop" else reason
            choices.append({"index": i, "message": message, "logprobs": self.chat_logprobs(self.logprobs[i]),
                            "finish_reason": reason})
        obj = "chat.completion" if self.kind == "chat" else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.state.model_name,
                "choices": choices, "usage": self.usage()}

    # -------------------------------------------------------------------- SSE
    def _chunk(self, choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> str:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        body: dict[str, Any] = {"id": self.id, "object": obj, "created": self.created,
                                "model": self.state.model_name, "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    async def stream(self, queue: asyncio.Queue[SequenceUpdate]) -> AsyncIterator[str]:
        calls_sent = [0] * len(self.text)
        offsets = [0] * len(self.text)
        try:
            if self.kind == "chat":
                yield self._chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                    "finish_reason": None} for i in range(len(self.text))])
            while not self.done:
                u = await queue.get()
                i = self.absorb(u)
                if u.error:
                    yield f"data: {json.dumps(APIError(500, u.error, 'server_error', code='engine_error').body())}\n\n"
                    break
                reason = None if u.finish_reason is None else ("stop" if u.finish_reason == "abort"
                                                               else u.finish_reason)
                if self.kind == "completion":
                    if u.text or u.logprobs or reason:
                        yield self._chunk([{"index": i, "text": u.text, "finish_reason": reason,
                                            "logprobs": self.completion_logprobs(u.logprobs, offsets[i])}])
                    offsets[i] += len(u.text)
                    continue
                p = self.parsers[i]
                d = p.feed(u.text)
                if reason is not None:
                    rest = p.finish()
                    d.reasoning += rest.reasoning
                    d.content += rest.content
                    d.tool_calls += rest.tool_calls
                    if p.calls and reason == "stop":
                        reason = "tool_calls"
                delta: dict[str, Any] = {}
                if d.reasoning:
                    delta["reasoning_content"] = d.reasoning
                if d.content:
                    delta["content"] = d.content
                if d.tool_calls:
                    delta["tool_calls"] = [c.to_openai(calls_sent[i] + k) for k, c in enumerate(d.tool_calls)]
                    calls_sent[i] += len(d.tool_calls)
                if delta or u.logprobs or reason:
                    yield self._chunk([{"index": i, "delta": delta, "finish_reason": reason,
                                        "logprobs": self.chat_logprobs(u.logprobs)}])
            so = self.req.stream_options
            if so is not None and so.include_usage:
                yield self._chunk([], self.usage())
            yield "data: [DONE]\n\n"
        finally:
            if not self.done:
                self.cancel()


def render_metrics(state: ServerState) -> str:
    s = state.engine.stats()
    lines = ["# HELP dsv3_requests_total Finished requests by finish reason.", "# TYPE dsv3_requests_total counter"]
    for reason in sorted({"stop", "length", "abort", *s.requests}):
        lines.append(f'dsv3_requests_total{{finish_reason="{reason}"}} {s.requests.get(reason, 0)}')
    gauges = [("dsv3_prompt_tokens_total", "counter", "Prompt tokens of admitted requests.", s.prompt_tokens),
              ("dsv3_generation_tokens_total", "counter", "Generated tokens.", s.generation_tokens),
              ("dsv3_num_requests_running", "gauge", "Sequences in the running batch.", s.running),
              ("dsv3_num_requests_waiting", "gauge", "Sequences waiting for admission.", s.waiting),
              ("dsv3_cache_blocks_in_use", "gauge", "Latent-cache blocks held by sequences.", s.blocks_in_use),
              ("dsv3_cache_blocks_total", "gauge", "Latent-cache blocks in the pool.", s.num_blocks),
              ("dsv3_prefix_cache_reused_blocks_total", "counter", "Cache blocks reused from earlier prompts.",
               s.reused_blocks),
              ("dsv3_engine_steps_total", "counter", "Engine steps run.", s.steps),
              ("dsv3_spec_decode_drafts_total", "counter", "MTP draft tokens verified.", s.drafts),
              ("dsv3_spec_decode_accepted_total", "counter", "MTP draft tokens accepted.", s.accepted_drafts)]
    for name, kind, help, value in gauges:
        lines += [f"# HELP {name} {help}", f"# TYPE {name} {kind}", f"{name} {value}"]
    lines += ["# HELP dsv3_http_errors_total Requests answered with an error status.",
              "# TYPE dsv3_http_errors_total counter"]
    lines += [f'dsv3_http_errors_total{{status="{k}"}} {v}' for k, v in sorted(state.http_errors.items())]
    lines += state.ttft.lines("dsv3_time_to_first_token_seconds", "Time from arrival to the first token.")
    lines += state.per_token.lines("dsv3_time_per_output_token_seconds", "Time between a sequence's tokens.")
    return "\n".join(lines) + "\n"
