"""Shared pieces of the benchmarks: random-weight models, the machine's memory bandwidth and matmul
peak, the bytes and FLOPs a step must move, peak RSS."""

from __future__ import annotations

import json
import resource
from dataclasses import dataclass
from pathlib import Path

import torch

from dsv3 import DeepseekV3Config, DeepseekV3ForCausalLM

BENCH_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "bench.json"


def bench_config(**overrides) -> DeepseekV3Config:
    return DeepseekV3Config.from_dict({**json.loads(BENCH_CONFIG.read_text()), **overrides})


@torch.no_grad()
def random_model(config: DeepseekV3Config, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                 parallel=None) -> DeepseekV3ForCausalLM:  # noqa: ANN001 - a dsv3.parallel.ParallelContext
    """Random weights allocated directly in `dtype` (never a full fp32 copy). With `parallel`, this rank's shard
    only (built on meta and sharded first); the draws are the same on every rank (equal shard shapes, same order)."""
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(config)
    if parallel is not None:
        from dsv3.model.parallel import shard_model

        shard_model(model, parallel)
    model.to_empty(device="cpu")
    model.to(dtype)
    gen = torch.Generator().manual_seed(seed)
    std = config.initializer_range
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        elif p.dim() >= 2:
            p.normal_(0, std, generator=gen)
        else:
            p.zero_()
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.uniform_(-0.01, 0.01, generator=gen)
    from dsv3.model.rope import RotaryEmbedding
    model.model.rotary_emb = RotaryEmbedding(config)
    return model.eval()


def active_weight_bytes(config: DeepseekV3Config, dtype_bytes: int = 2) -> int:
    """Bytes of weights one decode token reads: attention, dense/shared MLPs, k routed experts, head."""
    d, h = config.hidden_size, config.num_attention_heads
    attn = (d * config.q_lora_rank + config.q_lora_rank * h * config.qk_head_dim if config.q_lora_rank
            else d * h * config.qk_head_dim)
    attn += d * config.kv_cache_dim + config.kv_lora_rank * h * (config.qk_nope_head_dim + config.v_head_dim)
    attn += h * config.v_head_dim * d
    dense = 3 * d * config.intermediate_size
    expert = 3 * d * config.moe_intermediate_size
    moe = (config.num_experts_per_tok + config.n_shared_experts) * expert + config.n_routed_experts * d * 2
    layers = sum(attn + (moe if config.is_moe_layer(i) else dense) for i in range(config.num_hidden_layers))
    return (layers + d * config.vocab_size) * dtype_bytes + 2 * d * dtype_bytes


BANDWIDTH_METHOD = "best of {repeats} fp32 x.sum() over a {size_mb} MiB buffer ({threads} threads)"


def memory_bandwidth_gbs(size_mb: int = 1024, repeats: int = 10) -> float:
    """Read bandwidth in GB/s: the best of `repeats` fp32 sums over a `size_mb` buffer with torch's threads
    (benchmarks/probes.py measures it, with the triad and 1 thread beside it: `machine_probes`).
    `BANDWIDTH_METHOD.format(...)` describes the measurement for reports."""
    from probes import bandwidth

    threads = torch.get_num_threads()
    return bandwidth(threads, repeats=repeats, read_mib=size_mb)[f"read {threads}t"]["best"]


def matmul_peak_gflops(n: int = 2048, dtype: torch.dtype = torch.bfloat16, repeats: int = 5) -> float:
    """Best-of-`repeats` GFLOP/s of one [n, n] @ [n, n] bf16 matmul: the compute roofline for prefill
    (benchmarks/probes.py `gemm_peaks` measures it with the bench model's own GEMM shapes beside it)."""
    if dtype != torch.bfloat16 or n != 2048:
        raise ValueError(f"matmul_peak_gflops(n={n}, dtype={dtype}): probes.gemm_peaks measures bf16 2048^3")
    from probes import PEAK_KEY, gemm_peaks

    return gemm_peaks(None, repeats=repeats)[PEAK_KEY]["best_gflops"]


@dataclass
class StepBytes:
    """Bytes one decode step must read: weights (only the routed experts it touches) and the latent cache."""

    weights: int
    cache: int

    @property
    def total(self) -> int:
        return self.weights + self.cache


def _nbytes(module: torch.nn.Module, skip: tuple[str, ...] = ()) -> int:
    tensors = [*module.named_parameters(), *module.named_buffers()]
    return sum(t.numel() * t.element_size() for name, t in tensors if not name.startswith(skip))


def decode_step_bytes(model: DeepseekV3ForCausalLM, batch: int, context: int,
                      experts_touched: list[float] | None = None) -> StepBytes:
    """Bytes read by one decode step of `batch` tokens over `context` cached tokens, from the model's tensors.

    Every weight of attention, norms, dense and shared MLPs, routers and the head is read once; of
    the routed experts only the distinct ones the batch selects (`experts_touched`, one count per
    MoE layer; default: the expected distinct count for uniform routing). Embedding rows: one per
    token. The cache: the whole [context, r_kv + dr] latent of every layer.
    """
    from dsv3.model.moe import MoE

    config = model.config
    base = model.model
    moe_layers = [layer for layer in base.layers if isinstance(layer.mlp, MoE)]
    if experts_touched is None:
        experts_touched = [expected_distinct_experts(config, batch)] * len(moe_layers)
    if len(experts_touched) != len(moe_layers):
        raise ValueError(f"experts_touched has {len(experts_touched)} counts for {len(moe_layers)} MoE layers")
    weights = sum(_nbytes(layer, skip=("mlp.experts.",)) for layer in base.layers)
    for layer, touched in zip(moe_layers, experts_touched):
        experts = layer.mlp.experts
        # Whatever tensors the weight format holds (bf16 stacks, FP8 + scales, int8/int4 + scales): 1/E each.
        per_expert = _nbytes(experts) / experts.num_experts
        weights += round(touched * per_expert)
    emb = base.embed_tokens.weight
    weights += batch * emb.shape[1] * emb.element_size() + _nbytes(base.norm) + _nbytes(model.lm_head)
    cache_dtype_bytes = torch.empty(0, dtype=model.dtype).element_size()
    cache = batch * context * config.kv_cache_dim * cache_dtype_bytes * len(base.layers)
    return StepBytes(int(weights), int(cache))


def expected_distinct_experts(config: DeepseekV3Config, batch: int) -> float:
    """E·(1 - (1 - k/E)^batch): distinct experts selected by `batch` tokens routed uniformly at random."""
    e, k = config.n_routed_experts, config.num_experts_per_tok
    return e * (1 - (1 - k / e) ** batch)


def prefill_flops(config: DeepseekV3Config, batch: int, length: int, logits_rows: int = 1) -> int:
    """Matmul FLOPs of a causal prefill with the expanded MLA path (k routed experts per token), with
    the LM head applied to `logits_rows` positions per sequence (generate keeps only the last)."""
    d, h = config.hidden_size, config.num_attention_heads
    attn = (d * config.q_lora_rank + config.q_lora_rank * h * config.qk_head_dim if config.q_lora_rank
            else d * h * config.qk_head_dim)
    attn += d * config.kv_cache_dim + config.kv_lora_rank * h * (config.qk_nope_head_dim + config.v_head_dim)
    attn += h * config.v_head_dim * d
    expert = 3 * d * config.moe_intermediate_size
    moe = (config.num_experts_per_tok + config.n_shared_experts) * expert + config.n_routed_experts * d
    params = sum(attn + (moe if config.is_moe_layer(i) else 3 * d * config.intermediate_size)
                 for i in range(config.num_hidden_layers))
    scores = h * length * (length + 1) // 2 * (config.qk_head_dim + config.v_head_dim)   # QKᵀ and PV, causal
    per_seq = 2 * length * params + 2 * scores * config.num_hidden_layers + 2 * logits_rows * d * config.vocab_size
    return batch * per_seq


FP8_PROJECTIONS = ("q_a_proj", "q_b_proj", "q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj",
                   "gate_proj", "up_proj", "down_proj")


def write_fp8_checkpoint(src: Path, dst: Path, block_size: tuple[int, int] = (128, 128),
                         max_shard_bytes: int = 2 * 2**30) -> None:
    """Write the bf16 checkpoint `src` as DeepSeek block FP8 in `dst`: every projection of attention, the dense
    MLPs and the experts as float8_e4m3fn `weight` + fp32 `weight_scale_inv` per 128x128 block (as DeepSeek
    publishes V3); embeddings, LM head, norms and router as stored. One tensor in memory at a time;
    config.json (with quantization_config) last, so a directory with a config.json is complete."""
    from dsv3.checkpoint.atomic import atomic_write_text
    from dsv3.checkpoint.safetensors_io import CheckpointReader, save_safetensors_sharded
    from dsv3.quant.fp8 import quantize_fp8_blocks

    def tensors(reader: CheckpointReader):  # noqa: ANN202
        for key in reader.keys():
            t = reader.get(key)
            parts = key.split(".")
            if key.endswith(".weight") and len(parts) >= 2 and parts[-2] in FP8_PROJECTIONS:
                q, scale_inv = quantize_fp8_blocks(t, block_size)
                yield key, q
                yield key.removesuffix(".weight") + ".weight_scale_inv", scale_inv
            else:
                yield key, t

    dst.mkdir(parents=True, exist_ok=True)
    with CheckpointReader(src) as reader:
        save_safetensors_sharded(tensors(reader), dst, max_shard_bytes=max_shard_bytes)
    skip = ("config.json", "model.safetensors.index.json")
    for f in src.iterdir():                     # tokenizer and generation files; not weights, markers or config
        if f.is_file() and not f.name.startswith(".") and not f.name.endswith(".safetensors") and f.name not in skip:
            (dst / f.name).write_bytes(f.read_bytes())
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": list(block_size)}
    atomic_write_text(dst / "config.json", json.dumps(config, indent=2) + "\n")


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
