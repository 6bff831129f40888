"""Serving benchmark: concurrent streaming clients against `dsv3 serve` (and `transformers serve`, when it runs).

For each concurrency level C (default 1, 8, 32) C client threads each send `--requests-per-client` streaming
completions (`max_tokens` tokens, greedy, eos ignored where the server allows) over raw HTTP on 127.0.0.1 and
time every SSE chunk. Reported per level: requests/s, generated tokens/s, time to first token and inter-token
latency (p50/p99). Then prefix reuse: time to first token of a ~1,000-token system prompt sent cold, then again
with a different question (its full blocks reused), against the same with --no-prefix-caching.

Prints a human table, then one JSON line. Servers are subprocesses on free loopback ports; nothing else is
reached (transformers serve runs with HF_HUB_OFFLINE=1 on the local checkpoint directory).

    PYTHONPATH=. python benchmarks/bench_serve.py [--model DIR] [--dtype bfloat16] [--levels 1,8,32]
        [--max-tokens 32] [--requests-per-client 2] [--no-transformers] [--transformers-path DIR]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "dsv3" / "assets" / "dsv3-pystd"
PROMPTS = [
    "def add(a, b):", "import os\nimport sys\n\ndef main():\n    args = sys.argv", "for i in range(10):",
    "class Stack:\n    def __init__(self):\n        self.items = []\n    def push(self, x):",
    "x = [i * i for i in range(100) if i % 3 == 0]\nprint(", "with open(path) as f:\n    for line in f:",
    "# compute the mean\ndef mean(values):\n    total = 0\n", "def parse(text):\n    '''Parse a config.'''\n",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    def __init__(self, cmd: list[str], port: int, env: dict[str, str] | None = None, ready_path: str = "/health",
                 timeout: float = 600) -> None:
        self.port = port
        self.log = open(Path(tempfile.gettempdir()) / f"bench_serve_{port}.log", "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=self.log,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{cmd[:4]} exited with {self.proc.returncode}; see {self.log.name}")
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                c.request("GET", ready_path)
                if c.getresponse().status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"{cmd[:4]} not ready in {timeout} s; see {self.log.name}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


def stream_one(port: int, body: dict) -> dict:
    """One streaming completion: arrival times of the chunks that carry text."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    t0 = time.perf_counter()
    c.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    r = c.getresponse()
    if r.status != 200:
        raise RuntimeError(f"HTTP {r.status}: {r.read()[:300]!r}")
    times, tokens = [], 0
    while True:
        line = r.readline()
        if not line:
            break
        if not line.startswith(b"data: "):
            continue
        data = line[6:].strip()
        if data == b"[DONE]":
            break
        chunk = json.loads(data)
        if chunk.get("usage"):
            tokens = chunk["usage"].get("completion_tokens", tokens)
        if chunk.get("choices") and chunk["choices"][0].get("text"):
            times.append(time.perf_counter())
    c.close()
    return {"start": t0, "times": times, "tokens": tokens or len(times)}


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def run_level(port: int, model: str, clients: int, per_client: int, max_tokens: int, ignore_eos: bool = True
              ) -> dict:
    results: list[dict] = []
    errors: list[str] = []
    lock = threading.Lock()

    def client(i: int) -> None:
        for k in range(per_client):
            body = {"model": model, "prompt": PROMPTS[(i + k) % len(PROMPTS)], "max_tokens": max_tokens,
                    "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
            if ignore_eos:   # vLLM's extension; transformers serve rejects it (then tokens are counted as sent)
                body["ignore_eos"] = True
            try:
                res = stream_one(port, body)
            except (OSError, RuntimeError) as e:
                with lock:
                    errors.append(str(e))
                return
            with lock:
                results.append(res)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ttft = [r["times"][0] - r["start"] for r in results if r["times"]]
    itl = [b - a for r in results for a, b in zip(r["times"], r["times"][1:], strict=False)]
    tokens = sum(r["tokens"] for r in results)
    if errors:
        print(f"  {len(errors)} failed requests at {clients} clients, e.g.: {errors[0]}", file=sys.stderr)
    return {"clients": clients, "requests": len(results), "errors": len(errors), "wall_s": wall,
            "req_per_s": len(results) / wall, "tok_per_s": tokens / wall,
            "ttft_p50_ms": 1e3 * pct(ttft, 50), "ttft_p99_ms": 1e3 * pct(ttft, 99),
            "itl_p50_ms": 1e3 * pct(itl, 50), "itl_p99_ms": 1e3 * pct(itl, 99)}


def prefix_ttft(port: int, model: str, system: str) -> dict:
    """TTFT (ms) of a long shared prefix: first request (cold) then two with other questions (warm)."""
    out = []
    for q in ["def first():", "def second():", "def third():"]:
        r = stream_one(port, {"model": model, "prompt": system + q, "max_tokens": 1, "temperature": 0,
                              "stream": True})
        out.append(1e3 * (r["times"][0] - r["start"]) if r["times"] else float("nan"))
    return {"cold_ms": out[0], "warm_ms": statistics.median(out[1:])}


def print_table(name: str, rows: list[dict]) -> None:
    print(f"\n{name}")
    print(f"{'clients':>8} {'req/s':>8} {'tok/s':>9} {'TTFT p50':>10} {'TTFT p99':>10} {'ITL p50':>9} {'ITL p99':>9}"
          f" {'errors':>7}")
    for r in rows:
        print(f"{r['clients']:>8} {r['req_per_s']:>8.2f} {r['tok_per_s']:>9.1f} {r['ttft_p50_ms']:>8.0f}ms "
              f"{r['ttft_p99_ms']:>8.0f}ms {r['itl_p50_ms']:>7.0f}ms {r['itl_p99_ms']:>7.0f}ms {r['errors']:>7}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=SHIPPED)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--levels", default="1,8,32")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--no-transformers", action="store_true", help="skip `transformers serve`")
    ap.add_argument("--serve-args", default="", help="extra `dsv3 serve` flags, e.g. '--speculative mtp'")
    ap.add_argument("--no-prefix", action="store_true", help="skip the prefix-reuse measurement")
    ap.add_argument("--transformers-cb", action="store_true",
                    help="run transformers serve with --continuous-batching (5.23 fails on MLA's head dims)")
    ap.add_argument("--transformers-path", default=None,
                    help="extra PYTHONPATH for `transformers serve` (it needs accelerate, which dsv3 does not)")
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    name = "bench-model"
    py = [sys.executable, "-m", "dsv3", "serve", "--model", str(args.model), "--dtype", args.dtype,
          "--served-model-name", name, "--host", "127.0.0.1", "--max-batch", str(max(levels)),
          *args.serve_args.split()]
    env = {"PYTHONPATH": str(ROOT)}
    report: dict = {"model": args.model.name, "dtype": args.dtype, "max_tokens": args.max_tokens}

    port = free_port()
    srv = Proc(py + ["--port", str(port)], port, env)
    try:
        run_level(port, name, 1, 1, 4)                                # warm-up
        rows = [run_level(port, name, c, args.requests_per_client, args.max_tokens) for c in levels]
        if not args.no_prefix:
            system = "# " + " ".join(f"helper_{i} = lambda x: x + {i}" for i in range(160)) + "\n"
            report["prefix_reuse"] = prefix_ttft(port, name, system)
    finally:
        srv.stop()
    report["dsv3"] = rows
    print_table(f"dsv3 serve ({args.model.name}, {args.dtype}, {args.max_tokens} tokens per request)", rows)
    if len(rows) > 1:
        report["scaling"] = rows[-1]["tok_per_s"] / rows[0]["tok_per_s"]
        print(f"tokens/s at {rows[-1]['clients']} clients / at {rows[0]['clients']}: {report['scaling']:.1f}x")

    if not args.no_prefix:
        port = free_port()
        srv = Proc(py + ["--port", str(port), "--no-prefix-caching"], port, env)
        try:
            run_level(port, name, 1, 1, 4)
            report["no_prefix_reuse"] = prefix_ttft(port, name, system)
        finally:
            srv.stop()
        on, off = report["prefix_reuse"], report["no_prefix_reuse"]
        print(f"\nrepeated ~1,000-token prefix, TTFT: reuse {on['warm_ms']:.0f} ms (cold {on['cold_ms']:.0f} ms), "
              f"no reuse {off['warm_ms']:.0f} ms -> {off['warm_ms'] / on['warm_ms']:.1f}x")

    if not args.no_transformers:
        port = free_port()
        cmd = [sys.executable, "-c", "import sys; from transformers.cli.transformers import main; "
               "sys.argv[0] = 'transformers'; sys.exit(main())", "serve", str(args.model), "--host",
               "127.0.0.1", "--port", str(port), "--dtype", args.dtype, "--device", "cpu"]
        if args.transformers_cb:
            cmd.append("--continuous-batching")
        try:
            hf_env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
            if args.transformers_path:
                hf_env["PYTHONPATH"] = args.transformers_path
            srv = Proc(cmd, port, hf_env)
        except RuntimeError as e:
            report["transformers"] = f"did not start: {e}"
            print(f"\ntransformers serve did not start: {e}")
        else:
            try:
                run_level(port, str(args.model), 1, 1, 4, ignore_eos=False)
                hf = [run_level(port, str(args.model), c, args.requests_per_client, args.max_tokens, ignore_eos=False)
                      for c in levels]
            finally:
                srv.stop()
            report["transformers"] = hf
            print_table(f"transformers serve{' --continuous-batching' if args.transformers_cb else ''}", hf)
            if hf[-1]["tok_per_s"] > 0:
                report["vs_transformers"] = rows[-1]["tok_per_s"] / hf[-1]["tok_per_s"]
                print(f"dsv3 / transformers at {levels[-1]} clients: {report['vs_transformers']:.1f}x")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
