"""Starting a sharded run: torchrun's environment → a process group → the `ParallelContext` and the device.

    torchrun --nproc_per_node=2 -m dsv3 generate "..."                      one node, two processes
    torchrun --nnodes=2 --nproc_per_node=8 --node_rank=0|1 --rdzv-id an_id \\
             --rdzv-backend c10d --rdzv-endpoint master_addr:master_port script.py      two nodes

torchrun tells each process where it stands through environment variables, read here once (the API boundary,
as transformers does) and nowhere else:

    RANK         this process among all processes of all nodes, [0, WORLD_SIZE)
    WORLD_SIZE   processes in all               (nnodes × nproc_per_node)
    LOCAL_RANK   this process on its node        → its GPU, cuda:LOCAL_RANK
    MASTER_ADDR, MASTER_PORT   the store the processes meet at (torchrun points them at its rendezvous)

`start_parallel` initialises the default process group once (an already initialised one is reused): NCCL when
the process runs on a GPU, gloo on the CPU, with a timeout on every collective, so that a rank that dies or
hangs makes the others fail with a message instead of waiting forever. It then runs one tiny all-reduce, so a
group that cannot talk (NCCL connects lazily) fails here, at start, rather than in the middle of loading.

Failures to start are re-raised as `ParallelError` naming the cause and the fix — a network interface that
does not exist or cannot reach the other nodes (`NCCL_SOCKET_IFNAME` / `GLOO_SOCKET_IFNAME`), a rendezvous
endpoint nobody listens at (`--rdzv-endpoint host:port`, `MASTER_ADDR`/`MASTER_PORT`), processes that never
joined. `peer_failure_message` says the same for a collective that failed later (a peer died or hung).

`tp_plan="auto"` in a plain `python script.py` (no torchrun, no process group) is a world of one: the script
runs unsharded on one process (logged), so the documentation's script works with and without torchrun.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from dsv3.parallel.context import ParallelContext

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = datetime.timedelta(minutes=10)
"""How long a collective (and the start) waits for the other ranks before failing (torch's NCCL default)."""

TP_PLANS = (None, "auto")


class ParallelError(RuntimeError):
    """A sharded run could not start, or lost a peer; the message names the cause and the fix."""


@dataclass(frozen=True)
class LaunchEnv:
    """What torchrun (or a user exporting the same variables) says about this process."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str | None
    master_port: str | None

    @property
    def endpoint(self) -> str:
        return f"{self.master_addr or '?'}:{self.master_port or '?'}"


def launch_env(environ: Mapping[str, str]) -> LaunchEnv | None:
    """torchrun's variables from `environ`, or None when WORLD_SIZE is unset (not launched by torchrun).
    Raises ParallelError naming the variable when one is missing or not an integer in range."""
    if "WORLD_SIZE" not in environ:
        return None

    def integer(name: str, default: str | None = None) -> int:
        text = environ.get(name, default)
        if text is None:
            raise ParallelError(f"WORLD_SIZE={environ['WORLD_SIZE']} is set but {name} is not; launch with "
                                "torchrun (which sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) "
                                "or export all of them")
        try:
            return int(text)
        except ValueError:
            raise ParallelError(f"{name}={text!r} is not an integer; launch with torchrun or fix the "
                                "variable") from None

    world = integer("WORLD_SIZE")
    rank = integer("RANK", "0" if world == 1 else None)
    local_rank = integer("LOCAL_RANK", str(rank))
    if world < 1 or not 0 <= rank < world or local_rank < 0:
        raise ParallelError(f"RANK={rank}, LOCAL_RANK={local_rank}, WORLD_SIZE={world}: need WORLD_SIZE ≥ 1 and "
                            "0 ≤ RANK < WORLD_SIZE; launch with torchrun or fix the variables")
    return LaunchEnv(rank, world, local_rank, environ.get("MASTER_ADDR"), environ.get("MASTER_PORT"))


def rank_device(device_map: Any, local_rank: int) -> torch.device:
    """The one device this rank runs on. None/"auto": cuda:LOCAL_RANK when CUDA is available, else the CPU;
    "cuda": cuda:LOCAL_RANK; "cpu", "cuda:N", an int or a torch.device: that device; a dict mapping modules to
    devices must name a single device (one device per rank)."""
    if isinstance(device_map, dict):
        devices = {str(d) for d in device_map.values()}
        if len(devices) != 1:
            raise ValueError(f"device_map={device_map!r}: under torchrun each rank holds its shard on one device; "
                             "pass device_map='auto' (cuda:LOCAL_RANK, or the CPU)")
        return rank_device(devices.pop(), local_rank)
    if device_map is None or device_map == "auto":
        device_map = "cuda" if torch.cuda.is_available() else "cpu"
    if isinstance(device_map, int):
        device_map = torch.device("cuda", device_map)
    try:
        device = torch.device(device_map)
    except (RuntimeError, TypeError):
        raise ValueError(f"device_map={device_map!r}: expected 'auto', 'cpu', 'cuda', 'cuda:N' or a device") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device_map={device_map!r} but no CUDA device is available; use 'cpu' or 'auto'")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        if device.index >= torch.cuda.device_count():
            raise ValueError(f"rank on cuda:{device.index} (LOCAL_RANK={local_rank}) but this node has "
                             f"{torch.cuda.device_count()} GPU(s); use --nproc_per_node ≤ {torch.cuda.device_count()}")
    return device


def _interfaces() -> str:
    try:
        names = [name for _, name in socket.if_nameindex()]
    except OSError:
        return "unknown"
    return ", ".join(names) or "none"


def _first_line(e: BaseException) -> str:
    """The message of a backend error without the C++ frame dump torch appends."""
    text = str(e).split("\nException raised from", 1)[0]
    text = re.sub(r"\[E\d{4} [^\]]*\].*", "", text)         # c10d log lines glued to the message
    text = " ".join(text.split())
    return text[:300] + ("…" if len(text) > 300 else "")


def start_failure_message(e: BaseException, backend: str, env: LaunchEnv | None, timeout: datetime.timedelta) -> str:
    """Why the process group did not start and what to do about it (`e`: what init or the first
    collective raised)."""
    cause = _first_line(e)
    seconds = timeout.total_seconds()
    endpoint = env.endpoint if env is not None else "MASTER_ADDR:MASTER_PORT"
    world = env.world_size if env is not None else "?"
    if "no socket interface found" in cause or "Bootstrap" in cause:
        return (f"NCCL could not start: no usable network interface ({cause}). Set NCCL_SOCKET_IFNAME to the "
                f"interface that reaches the other nodes (this machine has: {_interfaces()}), e.g. "
                "NCCL_SOCKET_IFNAME=eth0, on every node")
    m = re.search(r"Unable to find address for:? ?(\S+)", cause)
    if m or "Unable to resolve hostname" in cause or "GLOO_SOCKET_IFNAME" in cause:
        named = (f"GLOO_SOCKET_IFNAME names {m.group(1).rstrip('.')!r}, which is no interface of this machine" if m
                 else "gloo found no address for this host")
        return (f"gloo could not start: {named} ({cause}). Set GLOO_SOCKET_IFNAME to the interface that reaches "
                f"the other nodes (this machine has: {_interfaces()}), e.g. GLOO_SOCKET_IFNAME=eth0, or unset it")
    if ("trying to connect to" in cause or "Connection refused" in cause
            or isinstance(e, _dist_error("DistNetworkError"))):
        return (f"cannot reach the rendezvous at {endpoint} within {seconds:g} s ({cause}). Check that the first "
                "node (node_rank 0) is running, that --rdzv-endpoint host:port (MASTER_ADDR/MASTER_PORT) names "
                "it as seen from this node, and that the port is open between the nodes")
    if "clients joined" in cause or "timed out" in cause.lower() or "timeout" in cause.lower():
        return (f"not all {world} processes joined within {seconds:g} s ({cause}): the missing ranks did not start "
                f"or cannot reach {endpoint}. Run the same torchrun command on every node (each with its own "
                "--node_rank, the same --nnodes, --nproc_per_node, --rdzv-id and --rdzv-endpoint) and read the "
                "missing ranks' logs")
    return (f"the {backend} process group did not start ({type(e).__name__}: {cause}). Check the torchrun "
            f"arguments on every node and the rendezvous endpoint {endpoint}")


def peer_failure_message(e: BaseException, ctx: ParallelContext,
                         timeout: datetime.timedelta | None = None) -> str | None:
    """A one-line explanation when `e`, raised by a collective during a sharded run, means another rank died
    or stopped answering; None when `e` is something else."""
    if ctx.world_size == 1:
        return None
    cause = _first_line(e)
    seconds = (timeout or DEFAULT_TIMEOUT).total_seconds()
    where = f"rank {ctx.rank} of {ctx.world_size}"
    if re.search(r"Timed out|timed out|Timeout|Watchdog caught collective operation timeout", cause):
        return (f"{where}: a collective waited {seconds:g} s without the other ranks ({cause}); another rank "
                "probably died, hung or is still busy — read its log (a larger timeout helps only a slow rank)")
    if re.search(r"Connection closed by peer|Connection reset|Broken pipe|remote process exited|"
                 r"NCCL communicator was aborted|ncclRemoteError", cause):
        return f"{where}: another rank went away during a collective ({cause}); read that rank's log for why"
    return None


def _dist_error(name: str) -> type:
    import torch.distributed as dist

    return getattr(dist, name, RuntimeError)


def start_parallel(device_map: Any = None, tp_plan: str | None = None,
                   timeout: datetime.timedelta | None = None) -> tuple[ParallelContext, torch.device] | None:
    """This process's `ParallelContext` and device, starting the default process group when needed; None for a
    single process (WORLD_SIZE unset or 1, no process group, tp_plan None: the caller loads unsharded).

    device_map: see `rank_device` ("auto": cuda:LOCAL_RANK or the CPU). tp_plan: None or "auto" (shard over
    all ranks; without torchrun a world of one). timeout: per collective and for the start (default 10 min).
    Raises ParallelError when the group cannot start, ValueError for a bad device_map or tp_plan."""
    import torch.distributed as dist

    if tp_plan not in TP_PLANS:
        raise ValueError(f"tp_plan={tp_plan!r}: dsv3 has one parallel plan; pass tp_plan='auto' (or None, which "
                         "shards whenever torchrun starts more than one process)")
    if timeout is None:
        timeout = DEFAULT_TIMEOUT
    if timeout.total_seconds() <= 0:
        raise ValueError(f"timeout={timeout}: must be positive")
    if not dist.is_available():
        raise ParallelError("this torch build has no torch.distributed; install a build with it to run sharded")

    if dist.is_initialized():   # the caller (a test, a script) started the group: use it as it is
        rank, world = dist.get_rank(), dist.get_world_size()
        if world == 1 and tp_plan is None:
            return None
        env = launch_env(os.environ)
        local_rank = env.local_rank if env is not None else rank
        device = rank_device(device_map, local_rank)
        logger.info("using the process group already started: rank %d of %d (%s) on %s", rank, world,
                    dist.get_backend(), device)
        return ParallelContext(rank, world), device

    env = launch_env(os.environ)
    if env is None or env.world_size == 1:
        if tp_plan is None:
            return None
        device = rank_device(device_map, env.local_rank if env is not None else 0)
        logger.info("tp_plan='auto' in a single process (no torchrun or WORLD_SIZE=1): world of one, "
                    "nothing to shard; launch with torchrun --nproc_per_node=N to shard")
        return ParallelContext(), device

    device = rank_device(device_map, env.local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs: dict[str, Any] = {}
    if device.type == "cuda":
        torch.cuda.set_device(device)
        kwargs["device_id"] = device       # NCCL: connect now, not at the first collective
    try:
        dist.init_process_group(backend, init_method="env://", rank=env.rank, world_size=env.world_size,
                                timeout=timeout, **kwargs)
        hello = torch.ones(1, device=device)
        dist.all_reduce(hello)   # fails here, at start, if the ranks cannot talk
        if int(hello.item()) != env.world_size:
            raise ParallelError(f"the first all-reduce over {env.world_size} ranks summed to {hello.item():g}")
    except ParallelError:
        raise
    except (RuntimeError, ValueError, OSError) as e:   # torch.distributed's errors are RuntimeErrors
        if dist.is_initialized():
            dist.destroy_process_group()
        raise ParallelError(f"rank {env.rank} of {env.world_size}: "
                            + start_failure_message(e, backend, env, timeout)) from e
    logger.info("rank %d of %d (local %d) on %s, %s process group, timeout %s", env.rank, env.world_size,
                env.local_rank, device, backend, timeout)
    return ParallelContext(env.rank, env.world_size), device


def stop_parallel() -> None:
    """Destroy the default process group if one is running (the end of a sharded command)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
