"""Tensor + expert parallelism on CPU processes (gloo): a sharded model against the same checkpoint in one process.

Each world size spawns its processes once per checkpoint (torch.multiprocessing, gloo on 127.0.0.1 with a free
port, one thread per rank); every rank loads with `from_pretrained(..., parallel=ParallelContext(...))`, runs the
whole list of checks and sends its results back, and the tests below compare them with one process: logits
(fp32, 1e-5), greedy tokens (plain, static cache, left-padded batch, MTP speculative: identical), sampled tokens,
the bytes each rank holds, and FP8 parts read from a multi-file checkpoint with ragged blocks (bit-exact).

The checkpoint config makes the routed experts dominate the weights (32 experts of intermediate 48 against
hidden 64, vocabulary 98), as in DeepSeek-V3, so "each rank holds about 1/W" is a meaningful bound; the vocabulary
98 splits unevenly over 4 ranks (25, 25, 24, 24).
"""

from __future__ import annotations

import datetime
import io
import socket
import time
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

from dsv3 import DeepseekV3Config, DeepseekV3ForCausalLM
from dsv3.model.parallel import check_world_size, shard_regions
from dsv3.parallel.context import ParallelContext
from tests.oracle import assert_close, left_padded_batch
from tests.published import build_published

ATOL = 1e-5
EXPERTS_HEAVY = dict(vocab_size=98, n_routed_experts=32, moe_intermediate_size=48, n_group=4, topk_group=2)
# FP8, 32x32 blocks: hidden 72 and the expert intermediate 40 are ragged (2·32+8, 32+8), the dense intermediate 200
# splits on block boundaries into 128 + 72 (a ragged last block on the last rank); heads of 32+32 q rows,
# 32+32 kv_b rows and 32 o_proj columns put every head split on a block boundary, so fp8="keep" can hold them.
FP8_ALIGNED = dict(hidden_size=72, moe_intermediate_size=40, intermediate_size=200, qk_nope_head_dim=32,
                   qk_rope_head_dim=32, v_head_dim=32, kv_lora_rank=32, q_lora_rank=40)
# FP8, 128x128 blocks (DeepSeek's), fused experts: every head split falls inside a block (dequantised and cut).
FP8_RAGGED_128 = dict(hidden_size=160, q_lora_rank=136, kv_lora_rank=128, intermediate_size=200,
                      moe_intermediate_size=48)
PROMPTS = [9, 5, 7]          # left-padded batch lengths
NEW = 8


# -- running ranks -------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, results: Any, job: str, args: tuple) -> None:
    import faulthandler

    import torch.distributed as dist

    faulthandler.enable()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        buffer = io.BytesIO()   # plain bytes: tensors sent through the queue would be shared with a dead process
        torch.save(globals()[job](ParallelContext(rank, world), *args), buffer)
        results.put((rank, buffer.getvalue()))
    except BaseException:
        traceback.print_exc()   # every rank's own error (spawn re-raises only the first rank to fail)
        raise
    finally:
        dist.destroy_process_group()


def run_ranks(world: int, job: str, *args: Any) -> list[Any]:
    """Run `job(ParallelContext, *args)` on `world` spawned gloo ranks; its results in rank order."""
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    procs = mp.start_processes(_rank_main, args=(world, _free_port(), results, job, args), nprocs=world,
                               join=False, start_method="spawn")
    got = {}
    while len(got) < world:   # read while the ranks run: a result larger than the pipe blocks its sender
        if not results.empty():
            rank, data = results.get()
            got[rank] = data
        elif procs.join(timeout=0.2):   # every rank has exited (a failed one raises here, with its traceback)
            while not results.empty():
                rank, data = results.get()
                got[rank] = data
            break
    while not procs.join():
        pass
    assert len(got) == world, f"ranks {sorted(set(range(world)) - set(got))} returned nothing"
    return [torch.load(io.BytesIO(got[r]), weights_only=False) for r in range(world)]


def held_bytes(model: torch.nn.Module, experts_only: bool = False) -> int:
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    return sum(t.numel() * t.element_size() for n, t in tensors
               if not experts_only or ".experts.gate_up_proj" in n or ".experts.down_proj" in n)


# -- what each rank (and the single process) computes ---------------------------------------------------------
def _inputs(vocab: int) -> dict[str, torch.Tensor]:
    ids, mask = left_padded_batch(vocab, PROMPTS, seed=3)
    return {"ids": ids, "mask": mask, "one": ids[:1, :]}


def run_checks(model: DeepseekV3ForCausalLM) -> dict[str, Any]:
    """The same list on a sharded rank and in one process."""
    x = _inputs(model.config.vocab_size)
    greedy = dict(max_new_tokens=NEW, eos_token_id=[], do_sample=False)
    out: dict[str, Any] = {}
    with torch.no_grad():
        one = model(x["one"], output_attentions=True)
        out["logits"], out["attentions"] = one.logits, one.attentions[-1]   # [1, H, S, S]: every rank's heads
        out["padded_logits"] = model(x["ids"], attention_mask=x["mask"]).logits[x["mask"].bool()]
        out["plain"] = model.generate(x["one"], **greedy)
        out["static"] = model.generate(x["one"], cache_implementation="static", **greedy)
        out["batch"] = model.generate(x["ids"], x["mask"], **greedy)
        out["mtp"] = model.generate(x["ids"], x["mask"], use_mtp=True, **greedy)
        out["sampled"] = model.generate(x["ids"], x["mask"], max_new_tokens=NEW, eos_token_id=[], do_sample=True,
                                        temperature=1.5, generator=torch.Generator().manual_seed(7))
    out["bytes"], out["expert_bytes"] = held_bytes(model), held_bytes(model, experts_only=True)
    return out


def job_checks(parallel: ParallelContext, path: str, how: str) -> dict[str, Any]:
    if how == "explicit":
        model = DeepseekV3ForCausalLM.from_pretrained(path, torch_dtype=torch.float32, parallel=parallel)
        assert model.parallel is parallel
    else:   # tp_plan="auto" in a process whose group is started: dsv3.parallel.launch.start_parallel picks it up
        model = DeepseekV3ForCausalLM.from_pretrained(path, torch_dtype=torch.float32, tp_plan="auto")
        assert model.parallel == parallel and model.model.parallel == parallel
    return run_checks(model)


def job_state(parallel: ParallelContext, path: str, modes: list[str]) -> dict[str, Any]:
    out = {}
    for fp8 in modes:
        model = DeepseekV3ForCausalLM.from_pretrained(path, torch_dtype=torch.float32, fp8=fp8, parallel=parallel)
        x = _inputs(model.config.vocab_size)
        with torch.no_grad():
            logits = model(x["ids"], attention_mask=x["mask"]).logits[x["mask"].bool()]
        out[fp8] = {"state": {k: v.clone() for k, v in model.state_dict().items()}, "logits": logits}
    return out


# -- fixtures: the checkpoints and one spawn per (world size, checkpoint) --------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_published(tmp_path_factory.mktemp("tp"), EXPERTS_HEAVY, block=None, seed=5).path


@pytest.fixture(scope="module")
def single(checkpoint: Path) -> dict[str, Any]:
    return run_checks(DeepseekV3ForCausalLM.from_pretrained(checkpoint, torch_dtype=torch.float32))


TIMES: dict[str, float] = {}


@pytest.fixture(scope="module", params=[2, 4], ids=["world2", "world4"])
def ranks(request: pytest.FixtureRequest, checkpoint: Path) -> tuple[int, list[dict[str, Any]]]:
    start = time.perf_counter()
    how = "explicit" if request.param == 2 else "tp_plan"   # world 4 loads with tp_plan="auto"
    results = run_ranks(request.param, "job_checks", str(checkpoint), how)
    TIMES[f"world{request.param}"] = time.perf_counter() - start
    return request.param, results


# -- sharded == one process -------------------------------------------------------------------------------------
def test_logits_match_one_process(ranks: tuple[int, list[dict[str, Any]]], single: dict[str, Any]) -> None:
    world, results = ranks
    for rank, got in enumerate(results):
        assert_close(got["logits"], single["logits"], ATOL, f"world {world} rank {rank}: tp logits")
        assert_close(got["padded_logits"], single["padded_logits"], ATOL,
                     f"world {world} rank {rank}: tp left-padded logits")
        # after the all-gather every rank holds the very same full-vocabulary logits
        assert torch.equal(got["logits"], results[0]["logits"]), f"rank {rank} logits differ from rank 0's"
        assert got["logits"].shape[-1] == 98
        assert_close(got["attentions"], single["attentions"], ATOL, f"world {world} rank {rank}: tp attentions")


@pytest.mark.parametrize("kind", ["plain", "static", "batch", "mtp"])
def test_greedy_tokens_match_one_process(ranks: tuple[int, list[dict[str, Any]]], single: dict[str, Any],
                                         kind: str) -> None:
    world, results = ranks
    for rank, got in enumerate(results):
        assert torch.equal(got[kind], single[kind]), f"world {world} rank {rank} {kind}: {got[kind]} != {single[kind]}"


def test_sampling_with_one_seed_gives_one_sequence(ranks: tuple[int, list[dict[str, Any]]],
                                                   single: dict[str, Any]) -> None:
    world, results = ranks
    for rank, got in enumerate(results):
        assert torch.equal(got["sampled"], results[0]["sampled"]), f"world {world}: rank {rank} sampled differently"
    assert torch.equal(results[0]["sampled"], single["sampled"])


def test_each_rank_holds_its_share(ranks: tuple[int, list[dict[str, Any]]], single: dict[str, Any]) -> None:
    world, results = ranks
    for rank, got in enumerate(results):
        assert got["expert_bytes"] * world <= single["expert_bytes"], (rank, got["expert_bytes"])
        share = got["bytes"] / single["bytes"]
        print(f"world {world} rank {rank}: {got['bytes']} of {single['bytes']} bytes ({share:.3f}), experts "
              f"{got['expert_bytes']} of {single['expert_bytes']}")
        if world == 2:
            assert share <= 0.6, share
    assert single["expert_bytes"] > 0.5 * single["bytes"]   # the experts dominate, as in V3


# -- FP8: each rank reads exactly its part ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fp8_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {"aligned-32": build_published(tmp_path_factory.mktemp("fp8a"), FP8_ALIGNED, block=(32, 32),
                                          layout="per_expert", seed=6).path,
            "ragged-128-fused": build_published(tmp_path_factory.mktemp("fp8b"), FP8_RAGGED_128, block=(128, 128),
                                                layout="fused", seed=7).path}


@pytest.mark.parametrize("name, modes, world", [("aligned-32", ["dequantize", "keep"], 2), ("aligned-32", ["keep"], 4),
                                                ("ragged-128-fused", ["dequantize"], 2)])
def test_fp8_parts_are_exact_slices(fp8_checkpoints: dict[str, Path], name: str, modes: list[str], world: int) -> None:
    path = fp8_checkpoints[name]
    results = run_ranks(world, "job_state", str(path), modes)
    for fp8 in modes:
        _check_parts(path, name, fp8, world, [r[fp8] for r in results])


def _check_parts(path: Path, name: str, fp8: str, world: int, results: list[dict[str, Any]]) -> None:
    full = DeepseekV3ForCausalLM.from_pretrained(path, torch_dtype=torch.float32, fp8=fp8)
    full_state = full.state_dict()
    x = _inputs(full.config.vocab_size)
    with torch.no_grad():
        ref_logits = full(x["ids"], attention_mask=x["mask"]).logits[x["mask"].bool()]
    unit = 32 if name == "aligned-32" else 128
    split_names = set()
    for rank, got in enumerate(results):
        regions = shard_regions(full, full.config, ParallelContext(rank, world), ffn_unit=unit)
        split_names |= set(regions)
        assert set(got["state"]) == set(full_state)
        for key, value in got["state"].items():
            want = regions[key].narrow(full_state[key]) if key in regions else full_state[key]
            assert value.dtype == want.dtype and value.shape == want.shape, (key, value.shape, want.shape)
            assert torch.equal(value.view(torch.uint8) if value.dtype.itemsize == 1 else value,
                               want.contiguous().view(torch.uint8) if want.dtype.itemsize == 1 else want), \
                f"rank {rank}: {key} is not exactly its part"
        assert_close(got["logits"], ref_logits, ATOL, f"world {world} rank {rank}: tp fp8 {fp8} logits")
    expected = {"experts.gate_up_proj", "self_attn.kv_b_proj.weight", "self_attn.o_proj.weight", "mlp.down_proj.weight"}
    assert all(any(n.endswith(e) for n in split_names) for e in expected)
    if fp8 == "keep":
        assert any(n.endswith("o_proj.weight_scale_inv") for n in split_names)
        assert full_state["model.layers.0.self_attn.o_proj.weight"].dtype == torch.float8_e4m3fn


def test_fp8_keep_refuses_a_head_split_inside_a_block(fp8_checkpoints: dict[str, Path]) -> None:
    full = DeepseekV3ForCausalLM.from_pretrained(fp8_checkpoints["ragged-128-fused"], torch_dtype=torch.float32,
                                                 fp8="keep")
    with pytest.raises(ValueError, match=r"q_b_proj.*does not start and end on the FP8 block size 128.*"
                                         r"fp8='dequantize'"):
        shard_regions(full, full.config, ParallelContext(0, 2), ffn_unit=128)


# -- errors -------------------------------------------------------------------------------------------------------
def test_world_size_must_divide_heads_and_experts() -> None:
    config = DeepseekV3Config.tiny(num_attention_heads=6, num_key_value_heads=6)
    with pytest.raises(ValueError, match=r"num_attention_heads=6 is not divisible by the world size 4.*"
                                         r"n_routed_experts=16.*World sizes that work: \[1, 2\]"):
        check_world_size(config, 4)
    with pytest.raises(ValueError, match=r"n_routed_experts=16 is not divisible by the world size 3.*\[1, 2\]"):
        check_world_size(config, 3)
    check_world_size(config, 2)


def test_tp_plan_values_and_sharded_save(checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"tp_plan='colwise'.*None or 'auto'"):
        DeepseekV3ForCausalLM.from_pretrained(checkpoint, tp_plan="colwise")
    model = DeepseekV3ForCausalLM.from_pretrained(checkpoint, torch_dtype=torch.float32)
    model.parallel = ParallelContext(1, 2)   # as rank 1 of a sharded run sees itself
    with pytest.raises(ValueError, match=r"sharded \(rank 1 of 2\).*load the checkpoint in one process"):
        model.save_pretrained(tmp_path / "out")


def job_compile(parallel: ParallelContext, path: str, dtype: torch.dtype) -> dict[str, Any]:
    model = DeepseekV3ForCausalLM.from_pretrained(path, torch_dtype=dtype, parallel=parallel)
    x = _inputs(model.config.vocab_size)
    greedy = dict(max_new_tokens=6, eos_token_id=[], do_sample=False)
    out = model.generate(x["ids"], x["mask"], compile=True, return_dict_in_generate=True, **greedy)
    return {"compiled": out.sequences, "steps": out.compiled_steps,
            "eager": model.generate(x["ids"], x["mask"], **greedy)}


def job_quantized(parallel: ParallelContext, path: str) -> dict[str, Any]:
    return {quantization: _quantized(parallel, path, quantization) for quantization in ("int8", "int4")}


def _quantized(parallel: ParallelContext, path: str, quantization: str) -> dict[str, Any]:
    """A sharded quantised load against quantising the sharded dense model after loading (same formats)."""
    from dsv3.model.moe import RoutedExperts
    from dsv3.model.weights import Linear

    q = DeepseekV3ForCausalLM.from_pretrained(path, torch_dtype=torch.float32, quantization=quantization,
                                              parallel=parallel)
    dense = DeepseekV3ForCausalLM.from_pretrained(path, torch_dtype=torch.float32, parallel=parallel)
    x = _inputs(q.config.vocab_size)
    with torch.no_grad():
        dense_logits = dense(x["ids"], attention_mask=x["mask"]).logits
        for name, module in list(q.named_modules()):
            if isinstance(module, Linear):
                owner, _, child = name.rpartition(".")
                setattr(dense.get_submodule(owner) if owner else dense, child,
                        Linear.from_linear(dense.get_submodule(name), module.format))
            elif isinstance(module, RoutedExperts):
                for stack, fmt in module.formats.items():
                    dense.get_submodule(name).adopt_format(stack, fmt)
        return {"quantized": q(x["ids"], attention_mask=x["mask"]).logits,
                "requantized": dense(x["ids"], attention_mask=x["mask"]).logits, "dense": dense_logits,
                "formats": sorted({type(m.format).__name__ for m in q.modules() if isinstance(m, Linear)})}


def job_kernels(parallel: ParallelContext, path: str) -> dict[str, Any]:
    """bf16 decode on each rank's shard with and without the CPU kernels (the expert kernel sees other ranks'
    (token, expert) pairs parked on the last local expert)."""
    from dsv3.kernels import use_cpu_kernels

    model = DeepseekV3ForCausalLM.from_pretrained(path, torch_dtype=torch.bfloat16, parallel=parallel)
    x = _inputs(model.config.vocab_size)
    greedy = dict(max_new_tokens=4, eos_token_id=[], do_sample=False, output_logits=True,
                  return_dict_in_generate=True)
    stock = model.generate(x["ids"], x["mask"], **greedy)
    assert use_cpu_kernels(model)
    fast = model.generate(x["ids"], x["mask"], **greedy)
    return {"stock": (stock.sequences, torch.stack(stock.logits)),
            "kernels": (fast.sequences, torch.stack(fast.logits))}


# -- quantised, CPU kernels, compiled ----------------------------------------------------------------------------
def test_quantised_load_quantises_each_part(checkpoint: Path, single: dict[str, Any]) -> None:
    for rank, both in enumerate(run_ranks(2, "job_quantized", str(checkpoint))):
        for quantization, got in both.items():
            _check_quantized(rank, quantization, got, single)


def _check_quantized(rank: int, quantization: str, got: dict[str, Any], single: dict[str, Any]) -> None:
    assert_close(got["quantized"], got["requantized"], 1e-5, f"rank {rank}: tp {quantization} part")
    assert got["formats"] == (["Int8PerChannel"] if quantization == "int8" else ["Int4Grouped", "Int8PerChannel"])
    assert_close(got["dense"][:1, -1], single["logits"][0, -1:], ATOL, f"rank {rank}: tp dense beside quantised")
    assert_close(got["quantized"], got["dense"], 0.15, f"rank {rank}: tp {quantization} against dense")


def test_cpu_kernels_on_each_shard(checkpoint: Path) -> None:
    from dsv3 import kernels

    if not kernels.available():
        pytest.skip("the CPU kernels cannot be built here")
    for rank, got in enumerate(run_ranks(2, "job_kernels", str(checkpoint))):
        assert torch.equal(got["kernels"][0], got["stock"][0]), f"rank {rank}: kernels changed the tokens"
        assert_close(got["kernels"][1], got["stock"][1], 0.05, f"rank {rank}: tp bf16 kernels against stock ops")


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16-grouped", "fp32-gather"])
def test_compiled_decode_step_traces_the_collectives(checkpoint: Path, dtype: torch.dtype) -> None:
    for rank, got in enumerate(run_ranks(2, "job_compile", str(checkpoint), dtype)):
        assert got["steps"] == 5, f"rank {rank}: {got['steps']} compiled steps (the graph fell back to eager)"
        assert torch.equal(got["compiled"], got["eager"]), f"rank {rank}: compiled tokens differ"


def test_split_points() -> None:
    """Even-ish parts in whole units; the vocabulary 98 over 4 ranks; FP8 channels on 32-blocks, ragged last."""
    def parts(size: int, world: int, unit: int = 1) -> list[tuple[int, int]]:
        return [ParallelContext(r, world).split(size, unit) for r in range(world)]

    assert parts(98, 4) == [(0, 25), (25, 50), (50, 74), (74, 98)]
    assert ParallelContext(0, 4).sizes(98) == [25, 25, 24, 24]
    assert parts(200, 2, 32) == [(0, 128), (128, 200)]
    assert parts(40, 4, 32) == [(0, 32), (32, 40), (40, 40), (40, 40)]   # small dims: empty parts, no overlap
    with pytest.raises(ValueError, match=r"sizes=\[3, 3\] do not fit rank 0 of 2 holding 2"):
        ParallelContext(0, 2).all_gather(torch.zeros(2), 0, sizes=[3, 3])
