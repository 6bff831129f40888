"""`dsv3 serve` as a real process on 127.0.0.1, driven by the official `openai` client and raw HTTP.

Greedy answers (fp32) equal offline generate for 16 concurrent clients (streamed and not, prompts of
different lengths, joining at different times); stop strings, n, logprobs; every bad request gets its
status and OpenAI's error shape; a dropped stream frees its blocks (/metrics); 401, 429 + Retry-After;
SIGTERM drains the running request and exits 0. Every wait is bounded.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from dsv3.auto import AutoModelForCausalLM  # noqa: E402
from dsv3.cli import SHIPPED_MODEL  # noqa: E402
from dsv3.tokenizer import AutoTokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NAME = "dsv3-pystd"
PROMPTS = [
    "def add(a, b):",
    "import os\nimport sys\n\ndef main():\n    args = sys.argv",
    "class Stack:\n    def __init__(self):\n        self.items = []\n    def push(self, x):",
    "for i in range(10):",
    "x = [i * i for i in range(100) if i % 3 == 0]\nprint(",
    "# compute the mean\ndef mean(values):\n    total = 0\n",
    "with open(path) as f:\n    for line in f:",
    "try:\n    import json\nexcept ImportError:\n    json = None\n\n\ndef load(path):\n    '''Read a file.'''\n",
]
NEW = 6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, *flags: str) -> None:
        self.port = free_port()
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dsv3", "serve", "--host", "127.0.0.1", "--port", str(self.port), "--dtype",
             "float32", *flags], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.proc.stdout.read()}")
            try:
                if self.get("/health")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError("server did not become healthy within 180 s")

    def conn(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)

    def request(self, method: str, path: str, body: bytes | str | None = None, headers: dict | None = None
                ) -> tuple[int, dict, bytes]:
        c = self.conn()
        try:
            c.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
            r = c.getresponse()
            return r.status, dict(r.getheaders()), r.read()
        finally:
            c.close()

    def get(self, path: str) -> tuple[int, dict, bytes]:
        return self.request("GET", path)

    def post(self, path: str, data, headers: dict | None = None) -> tuple[int, dict, bytes]:
        return self.request("POST", path, data if isinstance(data, (str, bytes)) else json.dumps(data), headers)

    def metric(self, name: str) -> float:
        text = self.get("/metrics")[2].decode()
        m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
        assert m, f"{name} not in /metrics"
        return float(m.group(1))

    def client(self, key: str = "none") -> openai.OpenAI:
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key=key, max_retries=0, timeout=300)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture(scope="module")
def server():
    s = Server("--max-batch", "8", "--block-size", "4", "--token-budget", "24")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def offline():
    model = AutoModelForCausalLM.from_pretrained(SHIPPED_MODEL, torch_dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(SHIPPED_MODEL)
    refs = {}
    for p in PROMPTS:
        ids = tok(p)["input_ids"]
        out = model.generate(torch.tensor([ids]), max_new_tokens=NEW, do_sample=False, eos_token_id=[])
        refs[p] = tok.decode(out[0, len(ids):].tolist())
    return model, tok, refs


def assert_error(status: int, body: bytes, want: int) -> dict:
    assert status == want, body
    err = json.loads(body)["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    return err


def test_16_concurrent_clients_greedy_equals_generate(server, offline):
    _, _, refs = offline
    client = server.client()
    results: dict[int, str] = {}
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            time.sleep(0.15 * (i % 8))                          # clients join while others decode
            prompt = PROMPTS[i % len(PROMPTS)]
            kw = dict(model=NAME, prompt=prompt, max_tokens=NEW, temperature=0, extra_body={"ignore_eos": True})
            if i % 2:
                results[i] = "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw))
            else:
                r = client.completions.create(**kw)
                assert r.usage.completion_tokens == NEW and r.choices[0].finish_reason == "length"
                results[i] = r.choices[0].text
        except BaseException as e:  # noqa: BLE001 - collected and re-raised in the test thread
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert not errors, errors
    for i in range(16):
        assert results[i] == refs[PROMPTS[i % len(PROMPTS)]], (i, results[i])
    assert server.metric("dsv3_cache_blocks_in_use") == 0


def test_chat_greedy_streamed_and_not(server, offline):
    model, tok, _ = offline
    messages = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "Sort a list."}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    out = model.generate(torch.tensor([ids]), max_new_tokens=NEW, do_sample=False, eos_token_id=[])
    want = tok.decode(out[0, len(ids):].tolist())
    client = server.client()
    r = client.chat.completions.create(model=NAME, messages=messages, max_tokens=NEW, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert r.choices[0].message.content == want
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == NEW
    chunks = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=NEW, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == r.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == NEW


def test_stop_n_logprobs(server, offline):
    model, tok, refs = offline
    client = server.client()
    full = refs[PROMPTS[0]]
    stop = full[4:7]
    r = client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=NEW, temperature=0, stop=[stop],
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == full[: full.find(stop)] and r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=NAME, prompt=PROMPTS[0], max_tokens=NEW, temperature=0, stop=stop, stream=True,
        extra_body={"ignore_eos": True}))
    assert streamed == r.choices[0].text
    r = client.completions.create(model=NAME, prompt=PROMPTS[3], max_tokens=5, n=3, seed=7, temperature=1.0,
                                  extra_body={"ignore_eos": True})
    assert sorted(c.index for c in r.choices) == [0, 1, 2] and r.usage.completion_tokens == 15
    again = client.completions.create(model=NAME, prompt=PROMPTS[3], max_tokens=5, n=3, seed=7, temperature=1.0,
                                      extra_body={"ignore_eos": True})
    assert [c.text for c in again.choices] == [c.text for c in r.choices]       # seeded
    assert len({c.text for c in r.choices}) > 1
    r = client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=1, temperature=0, logprobs=3)
    ids = tok(PROMPTS[0])["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), -1)
    lp = r.choices[0].logprobs
    assert abs(lp.token_logprobs[0] - float(logp.max())) < 1e-4
    v, i = logp.topk(3)
    assert list(lp.top_logprobs[0]) == [tok.decode([t]) for t in i.tolist()]
    c = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                       temperature=0, logprobs=True, top_logprobs=2)
    content = c.choices[0].logprobs.content
    assert len(content) == 2 and len(content[0].top_logprobs) == 2
    assert content[0].logprob == pytest.approx(content[0].top_logprobs[0].logprob, abs=1e-6)


def test_tools_are_rendered_into_the_prompt(server, offline):
    _, tok, _ = offline
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                                "parameters": {"type": "object", "properties": {"city": {}}}}}]
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    client = server.client()
    plain = client.chat.completions.create(model=NAME, messages=messages, max_tokens=1, temperature=0)
    with_tools = client.chat.completions.create(model=NAME, messages=messages, max_tokens=1, temperature=0,
                                                tools=tools)
    from dsv3.serving.parsers import tools_system_prompt

    ids = tok.apply_chat_template([{"role": "system", "content": tools_system_prompt(tools)}, *messages],
                                  add_generation_prompt=True, return_dict=False)
    assert with_tools.usage.prompt_tokens == len(ids) > plain.usage.prompt_tokens


BAD = [
    ("/v1/completions", b"{not json", 400, "invalid_json"),
    ("/v1/completions", b"[1, 2]", 400, "invalid_json"),
    ("/v1/completions", {"model": NAME}, 400, "missing_required_parameter"),
    ("/v1/completions", {"model": NAME, "prompt": "a", "temperature": "hot"}, 400, "invalid_value"),
    ("/v1/completions", {"model": NAME, "prompt": "a", "max_tokens": "5"}, 400, "invalid_value"),
    ("/v1/completions", {"model": NAME, "prompt": "a", "temperature": 5}, 400, "invalid_value"),
    ("/v1/completions", {"model": NAME, "prompt": "a", "top_p": 0}, 400, "invalid_value"),
    ("/v1/completions", {"model": NAME, "prompt": "a", "n": 0}, 400, "invalid_value"),
    ("/v1/completions", {"model": NAME, "prompt": "a", "max_tokens": 0}, 400, "invalid_value"),
    ("/v1/completions", {"model": NAME, "prompt": "a", "logprobs": 50}, 400, "invalid_value"),
    ("/v1/completions", {"model": NAME, "prompt": [999999]}, 400, None),
    ("/v1/completions", {"model": "gpt-4", "prompt": "a"}, 404, "model_not_found"),
    ("/v1/completions", {"model": NAME, "prompt": "x " * 5000}, 400, "context_length_exceeded"),
    ("/v1/completions", {"model": NAME, "prompt": "a", "max_tokens": 100000}, 400, "context_length_exceeded"),
    ("/v1/chat/completions", {"model": NAME, "messages": []}, 400, "invalid_value"),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "wizard", "content": "a"}]}, 400,
     "invalid_value"),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "a"}], "top_logprobs": 2},
     400, "invalid_value"),
    ("/v1/chat/completions", {"model": NAME, "messages": "hello"}, 400, "invalid_value"),
    ("/v1/nothing", {"model": NAME}, 404, "not_found"),
]


@pytest.mark.parametrize("path,body,status,code", BAD, ids=[f"{i}-{b[2]}" for i, b in enumerate(BAD)])
def test_bad_requests_get_openai_errors(server, path, body, status, code):
    st, _, raw = server.post(path, body)
    err = assert_error(st, raw, status)
    if code is not None:
        assert err["code"] == code, err
    assert server.get("/health")[0] == 200


def test_openai_client_sees_the_errors(server):
    client = server.client()
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="a", max_tokens=1)
    with pytest.raises(openai.BadRequestError, match="context length"):
        client.completions.create(model=NAME, prompt="x " * 5000, max_tokens=1)
    assert [m.id for m in client.models.list()] == [NAME]


def test_dropped_stream_frees_its_blocks(server):
    aborted = server.metric('dsv3_requests_total{finish_reason="abort"}')
    c = server.conn()
    c.request("POST", "/v1/completions", body=json.dumps(
        {"model": NAME, "prompt": PROMPTS[1], "max_tokens": 2000, "temperature": 0, "stream": True,
         "ignore_eos": True}), headers={"Content-Type": "application/json"})
    r = c.getresponse()
    assert r.status == 200
    assert r.readline().startswith(b"data: ")                   # generation is under way
    assert server.metric("dsv3_cache_blocks_in_use") > 0
    c.sock.shutdown(socket.SHUT_RDWR)
    c.close()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and server.metric("dsv3_cache_blocks_in_use") > 0:
        time.sleep(0.2)
    assert server.metric("dsv3_cache_blocks_in_use") == 0
    assert server.metric("dsv3_num_requests_running") == 0
    assert server.metric('dsv3_requests_total{finish_reason="abort"}') == aborted + 1
    assert server.get("/health")[0] == 200


def test_dropped_non_streaming_request_is_cancelled(server):
    aborted = server.metric('dsv3_requests_total{finish_reason="abort"}')
    c = server.conn()
    c.request("POST", "/v1/completions", body=json.dumps(
        {"model": NAME, "prompt": PROMPTS[2], "max_tokens": 3000, "temperature": 0, "ignore_eos": True}),
        headers={"Content-Type": "application/json"})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and server.metric("dsv3_cache_blocks_in_use") == 0:
        time.sleep(0.05)
    assert server.metric("dsv3_cache_blocks_in_use") > 0
    c.sock.shutdown(socket.SHUT_RDWR)
    c.close()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and server.metric("dsv3_cache_blocks_in_use") > 0:
        time.sleep(0.2)
    assert server.metric("dsv3_cache_blocks_in_use") == 0
    assert server.metric('dsv3_requests_total{finish_reason="abort"}') == aborted + 1


def test_several_prompts_in_one_completion(server, offline):
    _, _, refs = offline
    r = server.client().completions.create(model=NAME, prompt=PROMPTS[:3], max_tokens=NEW, temperature=0,
                                           extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert [c.text for c in r.choices] == [refs[p] for p in PROMPTS[:3]]
    assert r.usage.completion_tokens == 3 * NEW


def test_metrics_text(server):
    text = server.get("/metrics")[2].decode()
    for name in ["dsv3_prompt_tokens_total", "dsv3_generation_tokens_total", "dsv3_num_requests_waiting",
                 "dsv3_time_to_first_token_seconds_bucket", "dsv3_time_per_output_token_seconds_count"]:
        assert name in text
    assert server.metric("dsv3_time_to_first_token_seconds_count") > 0


def test_api_key_queue_limit_speculation_and_drain_on_sigterm(offline):
    s = Server("--max-batch", "1", "--max-queue", "1", "--api-key", "sekret", "--served-model-name", "m",
               "--speculative", "mtp")
    try:
        # MTP speculation: greedy answers unchanged, drafts accepted
        r = s.client("sekret").completions.create(model="m", prompt=PROMPTS[1], max_tokens=NEW, temperature=0,
                                                  extra_body={"ignore_eos": True})
        assert r.choices[0].text == offline[2][PROMPTS[1]]
        assert s.metric("dsv3_spec_decode_accepted_total") > 0
        st, _, raw = s.post("/v1/completions", {"model": "m", "prompt": "a", "max_tokens": 1})
        assert_error(st, raw, 401)
        st, _, raw = s.post("/v1/completions", {"model": "m", "prompt": "a"}, {"Authorization": "Bearer wrong"})
        assert_error(st, raw, 401)
        with pytest.raises(openai.AuthenticationError):
            s.client("wrong").models.list()
        auth = {"Authorization": "Bearer sekret"}
        long = {"model": "m", "prompt": PROMPTS[2], "max_tokens": 400, "temperature": 0, "ignore_eos": True}
        # 1: running (its first chunk arrived)
        c1 = s.conn()
        c1.request("POST", "/v1/completions", json.dumps({**long, "stream": True}),
                   {**auth, "Content-Type": "application/json"})
        r1 = c1.getresponse()
        assert r1.readline().startswith(b"data: ")
        # 2: waits in the queue
        second: dict = {}
        t2 = threading.Thread(target=lambda: second.update(r=s.post("/v1/completions", {**long, "max_tokens": 3},
                                                                     auth)))
        t2.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and s.metric("dsv3_num_requests_waiting") < 1:
            time.sleep(0.1)
        # 3: the queue is full
        st, headers, raw = s.post("/v1/completions", {**long, "max_tokens": 3}, auth)
        assert_error(st, raw, 429)
        assert int(headers["retry-after"]) >= 1
        # SIGTERM: the running stream and the queued request finish, then the process exits 0
        s.proc.send_signal(signal.SIGTERM)
        rest = r1.read().decode()
        assert rest.rstrip().endswith("data: [DONE]")
        finals = [json.loads(line[6:]) for line in rest.splitlines() if line.startswith("data: {")]
        assert finals[-1]["choices"][0]["finish_reason"] == "length"
        t2.join(120)
        assert second["r"][0] == 200 and json.loads(second["r"][2])["usage"]["completion_tokens"] == 3
        assert s.proc.wait(120) == 0
    finally:
        s.stop()


def test_serve_cli_bad_model_dir_is_one_error_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "dsv3", "serve", "--model", str(tmp_path), "--port", str(free_port())],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"error: {tmp_path} is not a checkpoint directory (no config.json); "
                                             "pass --model DIR"]


def test_quantised_weights_served_greedy_equals_generate():
    """`dsv3 serve --quantization int8 --head-quantization int4`: the server holds the weights as
    from_pretrained(quantization=..., head_quantization=...) does, and its greedy answers equal that model's
    offline generate (fp32 activations; the default kernels on both sides)."""
    model = AutoModelForCausalLM.from_pretrained(SHIPPED_MODEL, torch_dtype=torch.float32, quantization="int8",
                                                 head_quantization="int4").eval()
    tok = AutoTokenizer.from_pretrained(SHIPPED_MODEL)
    dense = AutoModelForCausalLM.from_pretrained(SHIPPED_MODEL, torch_dtype=torch.float32).eval()
    refs, dense_refs = {}, {}
    for p in PROMPTS[:4]:
        ids = torch.tensor([tok(p)["input_ids"]])
        for m, out in ((model, refs), (dense, dense_refs)):
            out[p] = tok.decode(m.generate(ids, max_new_tokens=NEW, do_sample=False, eos_token_id=[])[0,
                                           ids.shape[1]:].tolist())
    assert refs != dense_refs          # the quantised model answers differently: the comparison can tell them apart
    s = Server("--quantization", "int8", "--head-quantization", "int4", "--max-batch", "4")
    try:
        client = s.client()
        for p in PROMPTS[:4]:
            r = client.completions.create(model=NAME, prompt=p, max_tokens=NEW, temperature=0,
                                          extra_body={"ignore_eos": True})
            assert r.choices[0].text == refs[p], (p, r.choices[0].text, refs[p])
    finally:
        s.stop()
