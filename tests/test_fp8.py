"""FP8 block (de)quantisation against a per-block Python loop, ragged edges included, and config parsing."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from dsv3.checkpoint.errors import CheckpointError
from dsv3.checkpoint.fp8 import (
    Fp8Spec,
    dequantize_checked,
    dequantize_fp8_blocks,
    dequantize_fp8_stacked,
    fp8_scale_shape,
    fp8_weight_pairs,
    is_quantized_weight_key,
    parse_quantization_config,
    quantize_fp8_blocks,
    scale_inv_key,
)

HUB_CONFIG = Path(__file__).parent / "data" / "deepseek-v3-hub.json"
PUBLISHED = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}
# (rows, cols, block): aligned, DeepSeek's ragged kv_a_proj (576 = 4*128 + 64), ragged both ways, tiny edges.
SHAPES = [(256, 384, (128, 128)), (576, 64, (128, 128)), (200, 300, (128, 128)), (1, 129, (128, 128)),
          (130, 1, (128, 128)), (13, 11, (4, 3))]


# -- references: one block at a time, the obvious way -----------------------------------------------------------
def ref_dequant(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    bo, bi = block
    out = torch.empty(weight.shape, dtype=torch.float32)
    for r in range(scale_inv.shape[0]):
        for c in range(scale_inv.shape[1]):
            rows, cols = slice(r * bo, (r + 1) * bo), slice(c * bi, (c + 1) * bi)
            out[rows, cols] = weight[rows, cols].float() * scale_inv[r, c]
    return out


def ref_quant(weight: torch.Tensor, block: tuple[int, int],
              dtype: torch.dtype = torch.float8_e4m3fn) -> tuple[torch.Tensor, torch.Tensor]:
    bo, bi = block
    fmax = torch.finfo(dtype).max
    R, C = math.ceil(weight.shape[0] / bo), math.ceil(weight.shape[1] / bi)
    q = torch.empty(weight.shape, dtype=dtype)
    scale_inv = torch.empty(R, C)
    for r in range(R):
        for c in range(C):
            rows, cols = slice(r * bo, (r + 1) * bo), slice(c * bi, (c + 1) * bi)
            blk = weight[rows, cols].float()
            amax = blk.abs().max()
            s = amax / fmax if amax > 0 else torch.tensor(1.0)
            scale_inv[r, c] = s
            q[rows, cols] = (blk / s).clamp(-fmax, fmax).to(dtype)
    return q, scale_inv


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def random_fp8(rows: int, cols: int, block: tuple[int, int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    weight = (torch.randn(rows, cols, generator=g) * 100).to(torch.float8_e4m3fn)
    scale_inv = torch.rand(fp8_scale_shape((rows, cols), block), generator=g) * 1e-2 + 1e-4
    return weight, scale_inv


# -- dequantisation -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rows,cols,block", SHAPES)
def test_dequant_matches_block_loop(rows: int, cols: int, block: tuple[int, int]) -> None:
    weight, scale_inv = random_fp8(rows, cols, block)
    ref = ref_dequant(weight, scale_inv, block)
    got32 = dequantize_fp8_blocks(weight, scale_inv, block, dtype=torch.float32)
    assert got32.shape == (rows, cols) and got32.is_contiguous()
    assert torch.equal(got32, ref), f"max |diff| {(got32 - ref).abs().max():.3e}"
    got16 = dequantize_fp8_blocks(weight, scale_inv, block)      # default: bf16, cast once from fp32
    assert got16.dtype == torch.bfloat16
    assert torch.equal(got16, ref.to(torch.bfloat16))


def test_ragged_last_row_block_uses_its_own_scale() -> None:
    # kv_a_proj_with_mqa: 576 rows -> 5 row blocks, the last one 64 rows high.
    weight = torch.ones(576, 64, dtype=torch.float8_e4m3fn)
    scale_inv = torch.arange(1, 6, dtype=torch.float32)[:, None]         # [5, 1]
    out = dequantize_fp8_blocks(weight, scale_inv, dtype=torch.float32)
    for r in range(5):
        rows = out[r * 128:(r + 1) * 128]
        assert rows.shape[0] == (64 if r == 4 else 128)
        assert torch.all(rows == r + 1)


def test_dequant_does_not_modify_its_inputs() -> None:
    weight = torch.randn(256, 128)                 # already fp32: the fp32 path must still copy
    before = weight.clone()
    scale_inv = torch.full((2, 1), 3.0)
    out = dequantize_fp8_blocks(weight, scale_inv, dtype=torch.float32)
    assert torch.equal(weight, before)
    assert torch.equal(out, weight * 3)


@pytest.mark.parametrize("scale_shape", [(4, 3), (5, 2), (5,), (6, 3)])
def test_scale_shape_mismatch_names_tensor_and_expected_shape(scale_shape: tuple[int, ...]) -> None:
    weight = torch.zeros(576, 300, dtype=torch.float8_e4m3fn)
    name = "model.layers.3.self_attn.kv_a_proj_with_mqa.weight"
    with pytest.raises(CheckpointError) as e:
        dequantize_fp8_blocks(weight, torch.ones(scale_shape), name=name)
    msg = str(e.value)
    assert name in msg and "[5, 3]" in msg and str(scale_shape) in msg and "weight_block_size" in msg


def test_dequant_rejects_non_matrix() -> None:
    with pytest.raises(CheckpointError, match="2-D"):
        dequantize_fp8_blocks(torch.zeros(4, 4, 4, dtype=torch.float8_e4m3fn), torch.ones(1, 1), name="w")


@pytest.mark.parametrize("parts", [1, 2])
@pytest.mark.parametrize("inter,cols,block", [(13, 11, (4, 3)), (48, 160, (128, 128)), (64, 64, (32, 32))])
def test_stacked_dequant_matches_per_expert_block_loop(parts: int, inter: int, cols: int,
                                                       block: tuple[int, int]) -> None:
    # Stacked gate_up [E, 2I, D]: with parts=2 gate and up rows have their own grids (per-expert checkpoint
    # tensors), with parts=1 one grid spans all 2I rows (a fused checkpoint tensor).
    experts, rows = 5, 2 * inter
    pieces = [random_fp8(rows // parts, cols, block, seed=e * 10 + j) for e in range(experts) for j in range(parts)]
    weight = torch.stack([torch.cat([w for w, _ in pieces[e * parts:(e + 1) * parts]]) for e in range(experts)])
    scale = torch.stack([torch.cat([s for _, s in pieces[e * parts:(e + 1) * parts]]) for e in range(experts)])
    ref = torch.stack([torch.cat([ref_dequant(w, s, block) for w, s in pieces[e * parts:(e + 1) * parts]])
                       for e in range(experts)])
    got = dequantize_fp8_stacked(weight, scale, block, torch.float32, parts=parts)
    assert torch.equal(got, ref)
    assert torch.equal(dequantize_fp8_stacked(weight, scale, block, torch.bfloat16, parts), ref.to(torch.bfloat16))
    one_per_chunk = dequantize_fp8_stacked(weight, scale, block, torch.float32, parts=parts, chunk_elements=1)
    assert torch.equal(one_per_chunk, ref)                                 # one expert-part per chunk: same bits
    assert torch.equal(dequantize_fp8_stacked(weight[[3, 1, 3]], scale[[3, 1, 3]], block, torch.float32, parts),
                       ref[[3, 1, 3]])                                     # the gather path's selected experts


def test_stacked_dequant_rejects_bad_scales() -> None:
    weight = torch.zeros(4, 2 * 40, 72, dtype=torch.float8_e4m3fn)
    with pytest.raises(CheckpointError) as e:
        dequantize_fp8_stacked(weight, torch.ones(4, 3, 3), (32, 32), parts=2, name="experts.gate_up_proj")
    assert "experts.gate_up_proj" in str(e.value) and "[4, 4, 3]" in str(e.value)
    with pytest.raises(CheckpointError, match="3-D"):
        dequantize_fp8_stacked(weight[0], torch.ones(3, 3), (32, 32))


# -- quantisation -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rows,cols,block", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_quant_matches_block_loop(rows: int, cols: int, block: tuple[int, int], dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(rows * 1000 + cols)
    w = torch.randn(rows, cols, generator=g) * torch.logspace(-3, 2, cols)      # blocks of very different scale
    q, s = quantize_fp8_blocks(w, block, dtype=dtype)
    q_ref, s_ref = ref_quant(w, block, dtype)
    assert q.dtype == dtype and s.dtype == torch.float32 and s.shape == fp8_scale_shape(w.shape, block)
    assert torch.equal(s, s_ref)
    assert torch.equal(bits(q), bits(q_ref))


@pytest.mark.parametrize("rows,cols,block", SHAPES)
@pytest.mark.parametrize("dtype,mantissa_bits,min_subnormal", [(torch.float8_e4m3fn, 3, 2.0**-9),
                                                               (torch.float8_e5m2, 2, 2.0**-16)])
def test_round_trip_error_bound(rows: int, cols: int, block: tuple[int, int], dtype: torch.dtype,
                                mantissa_bits: int, min_subnormal: float) -> None:
    g = torch.Generator().manual_seed(7)
    w = torch.randn(rows, cols, generator=g) * torch.logspace(-4, 1, rows)[:, None]
    q, s = quantize_fp8_blocks(w, block, dtype=dtype)
    back = dequantize_fp8_blocks(q, s, block, dtype=torch.float32)
    # Round to nearest: half an ulp, relative 2^-(m+1) for normals, half the subnormal step (times the
    # block's scale) near zero; plus a hair for the fp32 division.
    s_full = s.repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    bound = w.abs() * 2.0 ** -(mantissa_bits + 1) + s_full * min_subnormal / 2 + w.abs() * 1e-6
    err = (back - w).abs()
    assert torch.all(err <= bound), f"worst err/bound {(err / bound).max():.3f}, max |err| {err.max():.3e}"
    # Each block's largest element maps to the top of the FP8 range and comes back (almost) exactly.
    i = w.abs().argmax()
    assert math.isclose(back.flatten()[i].item(), w.flatten()[i].item(), rel_tol=1e-6)


def test_quant_zero_blocks_get_unit_scale_and_round_trip() -> None:
    w = torch.zeros(200, 300)
    w[150:, 200:] = torch.randn(50, 100)             # only the last (ragged) block is non-zero
    q, s = quantize_fp8_blocks(w)
    assert torch.all(s[0] == 1) and torch.all(s[:, :1] == 1) and s[1, 2] != 1
    back = dequantize_fp8_blocks(q, s, dtype=torch.float32)
    assert torch.isfinite(back).all() and torch.all(back[:150] == 0)


def test_quant_accepts_bf16_and_rejects_non_finite() -> None:
    q, s = quantize_fp8_blocks(torch.randn(64, 64, dtype=torch.bfloat16))
    assert q.shape == (64, 64) and s.shape == (1, 1)
    w = torch.randn(64, 64)
    w[3, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        quantize_fp8_blocks(w)
    with pytest.raises(ValueError, match="dtype"):
        quantize_fp8_blocks(torch.randn(4, 4), dtype=torch.bfloat16)


def test_fp8_checkpoint_round_trip_through_disk(tmp_path: Path) -> None:
    from dsv3.checkpoint.safetensors_io import CheckpointReader, save_safetensors_sharded

    g = torch.Generator().manual_seed(3)
    weights = {"model.layers.0.self_attn.kv_a_proj_with_mqa.weight": torch.randn(576, 64, generator=g),
               "model.layers.0.mlp.down_proj.weight": torch.randn(200, 300, generator=g)}
    stored = {}
    for key, w in weights.items():
        stored[key], stored[scale_inv_key(key)] = quantize_fp8_blocks(w)
    save_safetensors_sharded(stored, tmp_path, max_shard_bytes=40_000)
    with CheckpointReader(tmp_path) as reader:
        pairs = fp8_weight_pairs(reader.keys())
        assert pairs == {k: scale_inv_key(k) for k in weights}
        for key, scale_key in pairs.items():
            assert reader.dtype(key) == torch.float8_e4m3fn and reader.dtype(scale_key) == torch.float32
            got = dequantize_fp8_blocks(reader.get(key), reader.get(scale_key), dtype=torch.float32, name=key)
            assert torch.equal(got, ref_dequant(stored[key], stored[scale_inv_key(key)], (128, 128)))
            assert (got - weights[key]).abs().max() <= weights[key].abs().max() / 16


# -- quantization_config --------------------------------------------------------------------------------------------
def test_parse_published_config() -> None:
    spec = parse_quantization_config(PUBLISHED)
    assert spec == Fp8Spec(fmt="e4m3", block_size=(128, 128), activation_scheme="dynamic")
    assert spec.dtype == torch.float8_e4m3fn
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.fmt = "e5m2"  # type: ignore[misc]


@pytest.mark.skipif(not HUB_CONFIG.exists(), reason="tests/data/deepseek-v3-hub.json not present")
def test_parse_hub_config_file() -> None:
    spec = parse_quantization_config(json.loads(HUB_CONFIG.read_text())["quantization_config"])
    assert spec is not None and spec.block_size == (128, 128) and spec.dtype == torch.float8_e4m3fn


def test_parse_defaults_and_e5m2() -> None:
    assert parse_quantization_config(None) is None
    assert parse_quantization_config({}) is None
    assert parse_quantization_config({"quant_method": "fp8"}) == Fp8Spec()     # transformers' defaults
    spec = parse_quantization_config({**PUBLISHED, "fmt": "e5m2", "weight_block_size": [64, 32]})
    assert spec is not None and spec.dtype == torch.float8_e5m2 and spec.block_size == (64, 32)


@pytest.mark.parametrize("override,named", [
    ({"quant_method": "gptq"}, "'gptq'"),
    ({"quant_method": None}, "None"),
    ({"fmt": "int8"}, "'int8'"),
    ({"fmt": "e4m3fnuz"}, "'e4m3fnuz'"),
    ({"activation_scheme": "static"}, "'static'"),
    ({"weight_block_size": [128]}, "[128]"),
    ({"weight_block_size": [0, 128]}, "[0, 128]"),
    ({"weight_block_size": None}, "None"),
    ({"weight_block_size": [128.0, 128]}, "[128.0, 128]"),
])
def test_parse_rejects_unsupported(override: dict, named: str) -> None:
    with pytest.raises(CheckpointError) as e:
        parse_quantization_config({**PUBLISHED, **override})
    msg = str(e.value)
    assert named in msg and "quantization_config" in msg and "config.json" in msg


def test_parse_rejects_non_dict() -> None:
    with pytest.raises(CheckpointError, match="must be an object"):
        parse_quantization_config(["fp8"])  # type: ignore[arg-type]


# -- key helpers ----------------------------------------------------------------------------------------------------
def test_weight_scale_pairing() -> None:
    keys = {"a.weight", "a.weight_scale_inv", "b.weight", "norm.weight"}
    assert scale_inv_key("a.weight") == "a.weight_scale_inv"
    assert is_quantized_weight_key("a.weight", keys) and not is_quantized_weight_key("b.weight", keys)
    assert fp8_weight_pairs(keys) == {"a.weight": "a.weight_scale_inv"}
    with pytest.raises(CheckpointError, match="c.weight_scale_inv"):
        fp8_weight_pairs(keys | {"c.weight_scale_inv"})
    with pytest.raises(ValueError):
        scale_inv_key("a.bias")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_scales_are_an_error_naming_the_tensor(bad: float) -> None:
    w, s = quantize_fp8_blocks(torch.randn(300, 200), (128, 128))
    s[2, 1] = bad
    with pytest.raises(CheckpointError, match=rf"x\.weight_scale_inv: 1 of 6 FP8 block scales are not finite "
                                              rf"\(e\.g\. {bad} at block \[2, 1\]\)"):
        dequantize_checked(w, s, (128, 128), torch.bfloat16, "x.weight")
    stacked = s.expand(2, 3, 2).clone()
    with pytest.raises(CheckpointError, match=r"experts\.down_proj \(weight_scale_inv\): 2 of 12"):
        dequantize_checked(w.expand(2, 300, 200), stacked, (128, 128), torch.bfloat16, "experts.down_proj")
