"""The benchmark helpers the llama.cpp comparison rests on (benchmarks/): bytes a decode token reads for every
weight format, the FP8 copy of a bf16 checkpoint, llama-bench's JSON rows, the ratios of the report, the probes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_llamacpp  # noqa: E402
import common  # noqa: E402
import probes  # noqa: E402

from dsv3 import DeepseekV3Config, DeepseekV3ForCausalLM  # noqa: E402
from tests.oracle import assert_close  # noqa: E402

# The bench layout in small: 1 dense + 2 MoE layers, 16 experts (4 per token), widths that tile 128-blocks
# partially (hidden 160, expert intermediate 96) so the FP8 copy has ragged edge blocks.
SMALL = dict(vocab_size=512, hidden_size=160, intermediate_size=256, moe_intermediate_size=96, q_lora_rank=64,
             kv_lora_rank=64, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32, num_attention_heads=2,
             num_key_value_heads=2, n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2,
             num_hidden_layers=3, first_k_dense_replace=1, num_nextn_predict_layers=0)


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("bench-bf16")
    config = DeepseekV3Config.tiny(**SMALL)
    common.random_model(config, seed=3).save_pretrained(directory)
    return directory


def _expected_bytes(model: DeepseekV3ForCausalLM) -> int:
    """From the state dict: every tensor once, but the routed experts k/E of their bytes and one embedding row."""
    config = model.config
    total = 0
    for name, t in model.state_dict().items():
        n = t.numel() * t.element_size()
        if ".mlp.experts." in name:
            n = n * config.num_experts_per_tok / config.n_routed_experts
        elif name == "model.embed_tokens.weight":
            n = n / config.vocab_size
        total += n
    return round(total)


@pytest.mark.parametrize("quantization", [None, "int8", "int4"])
def test_decode_bytes_count_the_tensors_each_format_holds(bf16_dir: Path, quantization: str | None) -> None:
    model = DeepseekV3ForCausalLM.from_pretrained(bf16_dir, torch_dtype=torch.bfloat16, quantization=quantization)
    got = common.decode_step_bytes(model, batch=1, context=0).weights
    assert abs(got - _expected_bytes(model)) <= 8 * model.config.num_hidden_layers, (got, _expected_bytes(model))


def test_fp8_copy_of_a_checkpoint_loads_and_matches_bf16(bf16_dir: Path, tmp_path: Path) -> None:
    from dsv3.checkpoint.safetensors_io import CheckpointReader
    from dsv3.quant.fp8 import dequantize_fp8_blocks

    common.write_fp8_checkpoint(bf16_dir, tmp_path / "fp8")
    config = json.loads((tmp_path / "fp8" / "config.json").read_text())
    assert config["quantization_config"]["weight_block_size"] == [128, 128]
    with CheckpointReader(bf16_dir) as src, CheckpointReader(tmp_path / "fp8") as dst:
        scales = [k for k in dst.keys() if k.endswith("_scale_inv")]
        assert sorted(k.removesuffix("_scale_inv") for k in scales) == sorted(
            k for k in src.keys() if k.split(".")[-2] in common.FP8_PROJECTIONS)
        for key in src.keys():
            if key + "_scale_inv" in scales:
                assert dst.dtype(key) == torch.float8_e4m3fn
                w = dequantize_fp8_blocks(dst.get(key), dst.get(key + "_scale_inv"), (128, 128), torch.float32)
                ref = src.get(key).float()
                assert float((w - ref).norm() / ref.norm()) < 0.05, key        # e4m3: ~2-3 % RMS per block
            else:                                                              # head, embeddings, norms, router
                assert torch.equal(dst.get(key), src.get(key)), key
    kept = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "fp8", torch_dtype=torch.bfloat16, fp8="keep")
    dequantised = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "fp8", torch_dtype=torch.bfloat16)
    assert kept.state_dict()["model.layers.1.mlp.experts.gate_up_proj"].dtype == torch.float8_e4m3fn
    ids = torch.randint(2, SMALL["vocab_size"], (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = dequantised(ids).logits.float(), kept(ids).logits.float()
    assert_close(b, a, 0.02 * float(a.abs().max()), "fp8 copy kept vs dequantised logits")
    # FP8 bytes per token: about half of bf16 (1 byte + a scale per 128x128 block for the projections).
    bf16 = DeepseekV3ForCausalLM.from_pretrained(bf16_dir, torch_dtype=torch.bfloat16)
    ratio = common.decode_step_bytes(kept, 1, 0).weights / common.decode_step_bytes(bf16, 1, 0).weights
    assert 0.5 < ratio < 0.8


LLAMA_BENCH_JSON = [   # the fields bench_llamacpp reads, as `llama-bench -o json` writes them
    {"model_type": "deepseek2 16B Q8_0", "n_prompt": 512, "n_gen": 0, "n_depth": 0, "repack": False,
     "avg_ts": 250.0, "stddev_ts": 2.0, "samples_ts": [248.0, 252.0], "model_size": 2_500_000_000},
    {"model_type": "deepseek2 16B Q8_0", "n_prompt": 0, "n_gen": 64, "n_depth": 0, "repack": False,
     "avg_ts": 20.0, "stddev_ts": 0.1, "samples_ts": [20.0], "model_size": 2_500_000_000},
    {"model_type": "deepseek2 16B Q8_0", "n_prompt": 0, "n_gen": 64, "n_depth": 0, "repack": True,
     "avg_ts": 25.0, "stddev_ts": 0.1, "samples_ts": [25.0], "model_size": 2_500_000_000},
    {"model_type": "deepseek2 16B Q8_0", "n_prompt": 0, "n_gen": 64, "n_depth": 2048, "repack": True,
     "avg_ts": 22.0, "stddev_ts": 0.1, "samples_ts": [22.0], "model_size": 2_500_000_000},
]


def test_llama_bench_rows_and_ratios_pick_the_matching_precision_and_best_configuration() -> None:
    rows = bench_llamacpp.llama_rows(LLAMA_BENCH_JSON, "q8_0", bytes_per_token=1_000_000_000)
    assert [(r["kind"], r["context"], r["config"], r["tok_s"]) for r in rows] == [
        ("prefill", 0, "no repack", 250.0), ("decode", 0, "no repack", 20.0), ("decode", 0, "repack", 25.0),
        ("decode", 2048, "repack", 22.0)]

    def dsv3(precision: str, kind: str, context: int, tok_s: float) -> dict:
        return dict(engine="dsv3", precision=precision, config="default", kind=kind, tokens=512 if kind == "prefill"
                    else 1, context=context, tok_s=tok_s, bytes_per_token=500_000_000)

    rows += [dsv3("bf16", "decode", 128, 10.0), dsv3("int8", "decode", 128, 30.0), dsv3("int8", "decode", 2048, 11.0),
             dsv3("bf16", "decode", 2048, 10.0), dsv3("bf16", "prefill", 0, 400.0), dsv3("int8", "prefill", 0, 300.0)]
    machine = dict(decode_roofline_gbs=30.0, gemm_peak_gflops=400.0)
    bench_llamacpp.summarise(rows, machine, DeepseekV3Config.tiny(**SMALL))
    by = {(r["engine"], r["precision"], r["kind"], r["context"], r["config"]): r for r in rows}
    int8 = by[("dsv3", "int8", "decode", 128, "default")]
    assert int8["x_llamacpp"] == pytest.approx(30.0 / 25.0)            # context 128 vs depth 0, best config (repack)
    assert int8["vs"] == "Q8_0 (repack)"
    assert int8["x_dsv3_bf16"] == pytest.approx(3.0)
    assert int8["pct_roofline"] == pytest.approx(100 * 0.5 * 30.0 / 30.0)   # 0.5 GB/token x 30 tok/s / 30 GB/s
    assert by[("dsv3", "int8", "decode", 2048, "default")]["x_llamacpp"] == pytest.approx(11.0 / 22.0)
    assert by[("dsv3", "int8", "prefill", 0, "default")]["x_llamacpp"] == pytest.approx(300.0 / 250.0)
    assert by[("llama.cpp", "Q8_0", "decode", 0, "repack")]["x_dsv3_bf16"] == pytest.approx(25.0 / 10.0)
    goals = {g["goal"]: g for g in bench_llamacpp.goals(rows, [128, 2048])}
    assert goals["dsv3 int8 / llama.cpp Q8_0 decode ctx 128"]["met"] is True
    assert goals["dsv3 int8 / llama.cpp Q8_0 decode ctx 2048"]["met"] is False
    assert goals["dsv3 int4 / llama.cpp Q4_K_M decode ctx 128"]["met"] is None        # not measured


def test_rounds_keep_each_rows_best_with_its_worst_and_every_round() -> None:
    def row(engine: str, context: int, tok_s: float, round_: int) -> dict:
        return dict(engine=engine, precision="x", config="default", kind="decode", context=context, tok_s=tok_s,
                    round=round_)

    rows = [row("dsv3", 128, 10.0, 0), row("llama.cpp", 0, 20.0, 0), row("dsv3", 128, 12.0, 1),
            row("llama.cpp", 0, 18.0, 1), row("dsv3", 2048, 9.0, 1)]
    best = {(r["engine"], r["context"]): r for r in bench_llamacpp.best_of_rounds(rows)}
    assert len(best) == 3
    assert (best["dsv3", 128]["tok_s"], best["dsv3", 128]["low"], best["dsv3", 128]["round"]) == (12.0, 10.0, 1)
    assert best["dsv3", 128]["rounds"] == [10.0, 12.0]
    llama = best["llama.cpp", 0]
    assert (llama["tok_s"], llama["low"], llama["round"]) == (20.0, 18.0, 0)
    assert best["dsv3", 2048]["rounds"] == [9.0] and best["dsv3", 2048]["low"] == 9.0


def test_probes_report_best_and_median_for_one_and_more_threads() -> None:
    bw = probes.bandwidth(threads=2, repeats=3, read_mib=16, triad_mib=8)
    assert set(bw) == {"read 1t", "read 2t", "triad 1t", "triad 2t"}
    assert all(v["best"] >= v["median"] > 0 and v["runs"] == 3 for v in bw.values())
    peaks = probes.gemm_peaks(DeepseekV3Config.tiny(**SMALL), repeats=2, tokens=64, min_seconds=0.001)
    assert probes.PEAK_KEY in peaks and len(peaks) == 5
    assert all(p["best_gflops"] >= p["median_gflops"] > 0 for p in peaks.values())


@pytest.mark.slow   # compiles a decode step
def test_step_overhead_calls_the_cached_graph_only_after_its_guards_pass(bf16_dir: Path, capsys, monkeypatch) -> None:
    import step_overhead

    result = step_overhead.main([str(bf16_dir), "--quantization", "int8", "--steps", "3", "--context", "8",
                                 "--evict-mb", "8"])
    assert result["steps"] == 3 and result["quantization"] == "int8" and result["context"] == 8
    assert result["layers"] == 3 and result["evict_mb"] == 8
    assert result["guard_cold_us"] > 0 and result["dynamo_ms"] > 0 and result["direct_ms"] > 0
    assert result["full_guard_cold_us"] > 0 and result["full_guards_ms"] > 0
    assert result["guards_per_call"] > 10 * result["guards_per_step"] > 0   # the model's guards: once per call
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result

    real = step_overhead.cached_entry

    class Rejecting:   # the real cache entry, with guards that say no
        def __init__(self, entry) -> None:  # noqa: ANN001
            self.code, self.guard_manager = entry.code, self

        def check(self, frame: dict) -> bool:
            return False

    monkeypatch.setattr(step_overhead, "cached_entry", lambda step: Rejecting(real(step)))
    with pytest.raises(RuntimeError, match="guards fail at position 15"):   # 8 + 3 warm-up + 3 in turn + 1
        step_overhead.main([str(bf16_dir), "--quantization", "int8", "--steps", "3", "--context", "8"])
