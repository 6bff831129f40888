"""Sharded runs as a user starts them: real torchrun launchers and real process groups (gloo, CPU), never mocks.

- two `torchrun --nnodes=2 --nproc_per_node=1 --node_rank=0|1 --rdzv-backend c10d` launchers on localhost (two
  simulated nodes) run the documentation's script with `dsv3` imported: full-vocabulary logits within 1e-5
  (fp32) of one process on every rank, identical greedy tokens, each rank holding half the routed experts;
- `torchrun --nproc_per_node=2 -m dsv3 generate|chat` prints exactly what one process prints (greedy);
- the failures a user meets end with one line naming the cause and the fix, and do not hang: a network
  interface that does not exist (GLOO_SOCKET_IFNAME), a rendezvous nobody listens at, a rank that never
  joins, a rank that dies or hangs mid-run.
"""

from __future__ import annotations

import datetime
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dsv3.parallel.context import ParallelContext
from dsv3.parallel.launch import (
    ParallelError,
    launch_env,
    peer_failure_message,
    rank_device,
    start_failure_message,
    start_parallel,
)

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).parent / "torchrun"
LAUNCHER = [str(TORCHRUN)] if TORCHRUN.exists() else [sys.executable, "-m", "torch.distributed.run"]
PROMPT = "def fibonacci(n):"
GENERATE = ["generate", PROMPT, "--greedy", "--max-new-tokens", "12", "--dtype", "float32", "--threads", "1"]
SAMPLED = ["generate", PROMPT, "--seed", "7", "--temperature", "1.0", "--max-new-tokens", "12", "--dtype", "float32",
           "--threads", "1"]          # sampling: the same generator on every rank, the same tokens as one process
CHAT = ["chat", "--greedy", "--max-new-tokens", "8", "--dtype", "float32", "--threads", "1"]
CHAT_INPUT = "Write a function that adds two numbers.\n/reset\nWhat is a list?\n"
TIMEOUT = 300   # seconds for any one launch on a loaded 2-core machine; a hang fails instead of blocking the run

DOC_SCRIPT = '''
import sys
import torch
import torch.distributed as dist
from dsv3 import AutoModelForCausalLM     # the documentation's script, "transformers" replaced by "dsv3"

torch.set_num_threads(1)
path, out = sys.argv[1], sys.argv[2]
model = AutoModelForCausalLM.from_pretrained(path, device_map="auto", torch_dtype=torch.float32)
input_ids = torch.tensor([[0, 5, 17, 42, 99, 3, 250, 7]])
with torch.no_grad():
    logits = model(input_ids).logits                                        # [1, T, V] full vocabulary
tokens = model.generate(input_ids, max_new_tokens=8, do_sample=False)
experts = sum(p.shape[0] for n, p in model.named_parameters() if n.endswith("mlp.experts.gate_up_proj"))
torch.save(dict(rank=dist.get_rank(), world=dist.get_world_size(), logits=logits, tokens=tokens,
                experts=experts), f"{out}.{dist.get_rank()}")
dist.destroy_process_group()
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without torchrun's variables, dsv3 importable, one thread per process."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE",
                        "GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "TORCHELASTIC_RUN_ID")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", TORCH_CPP_LOG_LEVEL="FATAL", **extra)
    return env


def run(cmd: list[str], env: dict[str, str] | None = None, stdin: str | None = None,
        timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, input=stdin, capture_output=True, text=True, env=env or clean_env(), cwd=REPO,
                          timeout=timeout)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


# ---------------------------------------------------------------- two simulated nodes, the documentation's script

@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dsv3 import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(DeepseekV3Config.tiny()).eval()
    path = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(path)
    return path


@pytest.mark.slow   # spawns processes
def test_two_torchrun_nodes_match_one_process(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from dsv3 import AutoModelForCausalLM

    script = tmp_path / "run_deepseek.py"
    script.write_text(DOC_SCRIPT)
    out = tmp_path / "result"
    port = free_port()
    launchers = [subprocess.Popen(
        [*LAUNCHER, "--nnodes=2", "--nproc_per_node=1", f"--node_rank={node}", "--rdzv-backend", "c10d",
         "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "dsv3-two-nodes", str(script), str(tiny_checkpoint),
         str(out)], env=clean_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for node in (0, 1)]
    try:
        outputs = [p.communicate(timeout=TIMEOUT) for p in launchers]
    finally:
        for p in launchers:
            p.kill()
    for p, (_, err) in zip(launchers, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]

    torch.manual_seed(0)
    reference = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, torch_dtype=torch.float32)   # one process
    input_ids = torch.tensor([[0, 5, 17, 42, 99, 3, 250, 7]])
    with torch.no_grad():
        logits = reference(input_ids).logits
    tokens = reference.generate(input_ids, max_new_tokens=8, do_sample=False)
    n_experts = sum(p.shape[0] for n, p in reference.named_parameters() if n.endswith("mlp.experts.gate_up_proj"))
    for rank in (0, 1):
        got = torch.load(f"{out}.{rank}")
        assert (got["rank"], got["world"]) == (rank, 2)
        diff = (got["logits"] - logits).abs().max().item()
        assert diff <= 1e-5, f"rank {rank}: logits differ from one process by {diff:.2e} (max abs)"
        assert torch.equal(got["tokens"], tokens), f"rank {rank}: {got['tokens'].tolist()} != {tokens.tolist()}"
        assert got["experts"] == n_experts // 2, f"rank {rank} holds {got['experts']} of {n_experts} experts"


# ---------------------------------------------------------------- the command line under torchrun

@pytest.fixture(scope="module")
def one_process() -> dict[str, subprocess.CompletedProcess]:
    """The reference: `python -m dsv3 generate|chat` in one process (the shipped model)."""
    return {"generate": run([sys.executable, "-m", "dsv3", *GENERATE]),
            "sampled": run([sys.executable, "-m", "dsv3", *SAMPLED]),
            "chat": run([sys.executable, "-m", "dsv3", *CHAT], stdin=CHAT_INPUT)}


@pytest.mark.slow   # spawns processes
@pytest.mark.parametrize("command", ["generate", "sampled", "chat"])
def test_torchrun_command_line_prints_what_one_process_prints(command: str, one_process: dict) -> None:
    single = one_process[command]
    assert single.returncode == 0, single.stderr[-2000:]
    assert single.stdout.strip(), "the one-process reference printed nothing"
    args = {"generate": GENERATE, "sampled": SAMPLED, "chat": CHAT}[command]
    sharded = run([*LAUNCHER, "--nproc_per_node=2", "--master-port", str(free_port()), "-m", "dsv3", *args],
                  stdin=CHAT_INPUT if command == "chat" else None)
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    assert sharded.stdout == single.stdout               # rank 0 alone prints, the same text as one process
    assert "Traceback" not in sharded.stderr
    assert sharded.stderr.count("tokens/s]") == single.stderr.count("tokens/s]")   # rank 0's speed lines only


@pytest.mark.slow   # spawns processes
def test_torchrun_rank_that_dies_ends_the_others_with_one_line(tmp_path: Path) -> None:
    """Two ranks of `dsv3 chat` started by hand (the variables torchrun sets); rank 1 is killed while both
    wait for input; rank 0, handed the next line, ends at once with one line saying a rank went away."""
    port = free_port()
    common = dict(WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cmd = [sys.executable, "-m", "dsv3", *CHAT, "--preset", "tiny", "--timeout", "30"]
    rank1 = subprocess.Popen(cmd, env=clean_env(RANK="1", LOCAL_RANK="1", **common), cwd=REPO,
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    rank0 = subprocess.Popen(cmd, env=clean_env(RANK="0", LOCAL_RANK="0", **common), cwd=REPO,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        banner = rank0.stderr.readline()                 # written once the model is loaded on every rank
        deadline = time.monotonic() + TIMEOUT
        while "dsv3 chat" not in banner and banner and time.monotonic() < deadline:
            banner = rank0.stderr.readline()
        assert "dsv3 chat" in banner, banner
        rank1.send_signal(signal.SIGKILL)
        rank1.wait(timeout=30)
        _, err = rank0.communicate("Hello\n", timeout=120)
    finally:
        for p in (rank0, rank1):
            p.kill()
    assert rank0.returncode == 1, err[-2000:]
    assert "Traceback" not in err
    (line,) = error_lines(err)
    assert line.startswith("error: rank 0 of 2: another rank went away"), line


@pytest.mark.slow   # spawns processes
def test_rank_that_hangs_times_out_with_one_line() -> None:
    """Rank 1 stops (SIGSTOP) after loading; rank 0, handing it the next line, waits --timeout seconds and ends
    with one line naming the timeout instead of waiting forever."""
    port = free_port()
    common = dict(WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cmd = [sys.executable, "-m", "dsv3", *CHAT, "--preset", "tiny", "--timeout", "20"]   # the start too: load skew
    rank1 = subprocess.Popen(cmd, env=clean_env(RANK="1", LOCAL_RANK="1", **common), cwd=REPO,
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rank0 = subprocess.Popen(cmd, env=clean_env(RANK="0", LOCAL_RANK="0", **common), cwd=REPO,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = rank0.stderr.readline()
        while line and "dsv3 chat" not in line:
            line = rank0.stderr.readline()
        assert "dsv3 chat" in line
        rank1.send_signal(signal.SIGSTOP)
        _, err = rank0.communicate("Hello\n", timeout=120)
    finally:
        rank1.send_signal(signal.SIGCONT)
        for p in (rank0, rank1):
            p.kill()
    assert rank0.returncode == 1, err[-2000:]
    assert "Traceback" not in err
    (line,) = error_lines(err)
    assert line.startswith("error: rank 0 of 2: a collective waited 20 s without the other ranks"), line
    assert "died, hung" in line, line


# ---------------------------------------------------------------- starting the process group: real failures

START_SCRIPT = """
import datetime, sys
from dsv3.parallel.launch import ParallelError, start_parallel, stop_parallel
try:
    ctx, device = start_parallel("auto", timeout=datetime.timedelta(seconds=float(sys.argv[1])))
except ParallelError as e:
    sys.stdout.write(f"ParallelError: {e} | cause: {type(e.__cause__).__name__}\\n")
    sys.stdout.flush()
    sys.exit(3)
sys.stdout.write(f"started {ctx.rank} {ctx.world_size} {device}\\n")   # one write: ranks share the pipe
sys.stdout.flush()
stop_parallel()
"""


@pytest.fixture
def start(tmp_path: Path) -> str:
    """A script that calls start_parallel with the timeout in seconds given as its argument."""
    script = tmp_path / "start.py"
    script.write_text(START_SCRIPT)
    return str(script)


@pytest.mark.slow   # spawns processes
def test_gloo_interface_that_does_not_exist_names_gloo_socket_ifname(start: str) -> None:
    done = run([*LAUNCHER, "--nproc_per_node=2", "--master-port", str(free_port()), start, "20"],
               env=clean_env(GLOO_SOCKET_IFNAME="nonexistent0"))
    lines = [line for line in done.stdout.splitlines() if line.startswith("ParallelError")]
    assert len(lines) == 2, done.stdout + done.stderr[-2000:]
    for line in lines:
        assert "GLOO_SOCKET_IFNAME names 'nonexistent0'" in line and "this machine has: " in line, line
        assert "lo" in line.split("this machine has: ")[1] and "| cause: RuntimeError" in line


@pytest.mark.slow   # spawns processes
def test_rendezvous_nobody_listens_at_names_the_endpoint(start: str) -> None:
    port = free_port()
    env = clean_env(RANK="1", LOCAL_RANK="1", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    done = run([sys.executable, start, "2"], env=env, timeout=120)
    assert done.returncode == 3, done.stdout + done.stderr[-2000:]
    line = done.stdout.strip().splitlines()[-1]
    assert f"cannot reach the rendezvous at 127.0.0.1:{port} within 2 s" in line, line
    assert "--rdzv-endpoint host:port" in line and "| cause: DistNetworkError" in line, line


@pytest.mark.slow   # spawns processes
def test_peer_that_never_arrives_times_out_with_the_timeout_named(start: str) -> None:
    env = clean_env(RANK="0", LOCAL_RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    done = run([sys.executable, start, "2"], env=env, timeout=120)
    assert done.returncode == 3, done.stdout + done.stderr[-2000:]
    line = done.stdout.strip().splitlines()[-1]
    assert "not all 2 processes joined within 2 s" in line and "1/2 clients joined" in line, line
    assert "--node_rank" in line and "| cause: DistStoreError" in line, line


@pytest.mark.slow   # spawns processes
def test_two_ranks_start_and_agree(start: str) -> None:
    done = run([*LAUNCHER, "--nproc_per_node=2", "--master-port", str(free_port()), start, "60"])
    assert done.returncode == 0, done.stderr[-2000:]
    started = sorted(re.findall(r"started \d \d (?:cpu|cuda:\d+)", done.stdout))
    assert started == ["started 0 2 cpu", "started 1 2 cpu"], done.stdout


# ---------------------------------------------------------------- in-process: what start_parallel decides

def test_single_process_is_none_and_tp_plan_auto_is_a_world_of_one(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert start_parallel() is None
    assert start_parallel(tp_plan="auto") == (ParallelContext(0, 1), torch.device("cpu"))
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert start_parallel("cpu") is None
    with pytest.raises(ValueError, match="tp_plan='sequence'.*tp_plan='auto'"):
        start_parallel(tp_plan="sequence")
    with pytest.raises(ValueError, match="timeout=.*positive"):
        start_parallel(tp_plan="auto", timeout=datetime.timedelta(0))


def test_launch_env_names_the_bad_variable() -> None:
    assert launch_env({}) is None
    env = launch_env({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.1",
                      "MASTER_PORT": "29500"})
    assert (env.rank, env.world_size, env.local_rank, env.endpoint) == (3, 4, 1, "10.0.0.1:29500")
    with pytest.raises(ParallelError, match="WORLD_SIZE=2 is set but RANK is not"):
        launch_env({"WORLD_SIZE": "2"})
    with pytest.raises(ParallelError, match="RANK='x' is not an integer"):
        launch_env({"WORLD_SIZE": "2", "RANK": "x"})
    with pytest.raises(ParallelError, match="0 ≤ RANK < WORLD_SIZE"):
        launch_env({"WORLD_SIZE": "2", "RANK": "2"})


def test_rank_device() -> None:
    assert rank_device("auto", 3) == torch.device("cuda", 3) if torch.cuda.is_available() else torch.device("cpu")
    assert rank_device(None, 1).type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert rank_device("cpu", 5) == torch.device("cpu")
    assert rank_device({"": "cpu", "lm_head": "cpu"}, 0) == torch.device("cpu")
    with pytest.raises(ValueError, match="one device"):
        rank_device({"model": "cpu", "lm_head": "meta"}, 0)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            rank_device("cuda", 0)


def test_nccl_bootstrap_failure_names_nccl_socket_ifname() -> None:
    """The documentation's NCCL message (no GPU here to provoke it): the fix named is NCCL_SOCKET_IFNAME."""
    env = launch_env({"WORLD_SIZE": "16", "RANK": "9", "LOCAL_RANK": "1", "MASTER_ADDR": "node0",
                      "MASTER_PORT": "29500"})
    nccl = RuntimeError("NCCL error in: ProcessGroupNCCL.cpp:1970, internal error - please report this issue to "
                        "the NCCL developers, NCCL version 2.21.5\nncclInternalError: Internal check failed.\n"
                        "Last error:\nBootstrap : no socket interface found")
    message = start_failure_message(nccl, "nccl", env, datetime.timedelta(minutes=10))
    assert message.startswith("NCCL could not start: no usable network interface") and "NCCL_SOCKET_IFNAME" in message


def test_peer_failure_message_says_timeout_and_death_and_nothing_else() -> None:
    ctx = ParallelContext(1, 2)
    timeout = datetime.timedelta(seconds=30)
    hung = RuntimeError("[../gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 30000ms for recv operation")
    died = RuntimeError("[../gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:1234")
    assert "rank 1 of 2: a collective waited 30 s" in peer_failure_message(hung, ctx, timeout)
    assert "another rank went away" in peer_failure_message(died, ctx, timeout)
    assert peer_failure_message(RuntimeError("shape mismatch"), ctx, timeout) is None
    assert peer_failure_message(died, ParallelContext(), timeout) is None
