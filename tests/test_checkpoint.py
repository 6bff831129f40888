"""Loading published-format checkpoints (FP8, ragged blocks, shards, MTP layer) against the transformers oracle,
FP8 held at run time against dequantise-on-load, save_pretrained through transformers, and every load error.

The checkpoints are built here (tests/published.py) in the release's layout; the oracle is transformers 5.23
carrying the dequantised weights, in fp32.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from unittest import mock

import pytest
import torch

from dsv3 import AutoConfig, AutoModelForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM, DeepseekV3Model
from dsv3.checkpoint.errors import CheckpointError
from dsv3.checkpoint.fp8 import dequantize_fp8_blocks
from dsv3.checkpoint.loader import PreparedLoad, prepare_load
from dsv3.checkpoint.safetensors_io import (
    INDEX_NAME,
    CheckpointReader,
    read_safetensors_header,
    save_safetensors_sharded,
)
from dsv3.model.weights import Linear
from dsv3.quant.formats import Fp8Blocks
from tests.oracle import assert_close, compare_padded_logits, left_padded_batch, load_hf, positions_from_mask, yarn
from tests.published import RAGGED_32, RAGGED_128, Published, build_published, write_sparse_v3

ATOL = 2e-4
HUB_CONFIG = Path(__file__).parent / "data" / "deepseek-v3-hub.json"
VARIANTS = {
    "blocks-128-ragged": (RAGGED_128, (128, 128)),
    "blocks-32-ragged-yarn": ({**RAGGED_32, "rope_scaling": yarn()}, (32, 32)),
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def published(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Published:
    overrides, block = VARIANTS[request.param]
    return build_published(tmp_path_factory.mktemp(request.param), overrides, block)


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Published:
    """The 32-block variant, for the argument and error tests (each copies it before damaging it)."""
    overrides, block = VARIANTS["blocks-32-ragged-yarn"]
    return build_published(tmp_path_factory.mktemp("small"), overrides, block, seed=1)


def _copy(pub: Published, tmp_path: Path) -> Path:
    return Path(shutil.copytree(pub.path, tmp_path / "ckpt"))


def _compare_logits(model: torch.nn.Module, oracle: torch.nn.Module, what: str, atol: float = ATOL) -> None:
    ids, mask = left_padded_batch(oracle.config.vocab_size, [9, 6], seed=3)
    pos = positions_from_mask(mask)
    with torch.no_grad():
        ref = oracle(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        for path in ("naive", "absorbed"):
            got = model(input_ids=ids, attention_mask=mask, position_ids=pos, mla_path=path).logits
            assert_close(got[mask.bool()].float(), ref[mask.bool()], atol, f"{what}: {path}")


# -- the published format ---------------------------------------------------------------------------------------
def test_published_fp8_checkpoint_matches_transformers(published: Published) -> None:
    path, block = published.path, published.block
    index = json.loads((path / INDEX_NAME).read_text())
    assert len(set(index["weight_map"].values())) > 2                      # really sharded
    assert all(f.endswith(".safetensors") and "-of-0000" in f for f in index["weight_map"].values())
    assert "model.layers.1.mlp.experts.0.gate_proj.weight_scale_inv" in index["weight_map"]
    with CheckpointReader(path) as reader:
        kv_a = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"
        rows = reader.shape(kv_a)[0]
        assert reader.dtype(kv_a) == torch.float8_e4m3fn and rows % block[0] != 0          # a ragged row block
        assert tuple(reader.shape(kv_a + "_scale_inv"))[0] == -(-rows // block[0])
        assert reader.dtype("model.layers.1.mlp.gate.weight") == torch.bfloat16
        assert reader.dtype("model.layers.1.mlp.gate.e_score_correction_bias") == torch.float32

    model = DeepseekV3ForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
    _compare_logits(model, published.oracle, "fp8 published")
    # Every loaded tensor is the dequantised checkpoint value, experts stacked gate rows first.
    params = dict(model.named_parameters())
    assert torch.equal(params[kv_a], published.values[kv_a])
    gate_up = params["model.layers.1.mlp.experts.gate_up_proj"]
    inter = gate_up.shape[1] // 2
    assert torch.equal(gate_up[3, :inter], published.values["model.layers.1.mlp.experts.3.gate_proj.weight"])
    assert torch.equal(gate_up[3, inter:], published.values["model.layers.1.mlp.experts.3.up_proj.weight"])
    assert model.model.layers[1].mlp.gate.weight.dtype == torch.float32


def test_dequantises_to_the_requested_dtype(published: Published) -> None:
    model = DeepseekV3ForCausalLM.from_pretrained(published.path, torch_dtype="bfloat16")
    key = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"
    want = dequantize_fp8_blocks(published.stored[key], published.stored[key + "_scale_inv"], published.block,
                                 torch.bfloat16)
    assert torch.equal(dict(model.named_parameters())[key], want)          # fp32 math, one rounding to bf16
    assert model.dtype == torch.bfloat16 and model.model.layers[1].mlp.gate.weight.dtype == torch.float32
    assert model.model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32


def test_mtp_layer_is_recognised_not_unexpected(published: Published) -> None:
    config = DeepseekV3Config.from_pretrained(published.path)
    mtp_keys = {k for k in published.stored if k.startswith(f"model.layers.{config.num_hidden_layers}.")}
    assert len(mtp_keys) > 20
    with CheckpointReader(published.path) as reader:
        prep = prepare_load(DeepseekV3ForCausalLM, reader, config)
    assert prep.plan.unexpected == [] and prep.plan.missing == []
    loaded = {k for s in prep.plan.sources.values() for k in s.keys()}
    for key in mtp_keys:   # each MTP tensor feeds the MTP module, is an FP8 scale of one that does, or is set aside
        assert key in loaded or key in prep.plan.mtp_keys or key[: -len("_scale_inv")] in loaded, key
    model = DeepseekV3ForCausalLM.from_pretrained(published.path, torch_dtype=torch.float32)
    ckpt_of = {name: ckpt for ckpt, name in prep.names.items()}
    compared = 0
    for name, p in model.named_parameters():   # the MTP module (when the model has one) carries the checkpoint's layer
        if name.startswith("mtp."):
            assert torch.equal(p, _stacked_value(published.values, ckpt_of[name])), name
            compared += 1
    if getattr(model, "mtp", None) is not None:
        assert compared > 15 and not prep.plan.mtp_keys
        kept = DeepseekV3ForCausalLM.from_pretrained(published.path, torch_dtype=torch.float32, fp8="keep")
        assert _holds_fp8(kept.mtp[0].self_attn.kv_b_proj)
        assert _holds_fp8(kept.mtp[0].mlp.experts)


def _holds_fp8(module: torch.nn.Module) -> bool:
    """A linear layer or expert stack whose weights are held in the block-FP8 format."""
    formats = getattr(module, "formats", None) or {"weight": getattr(module, "format", None)}
    return all(isinstance(f, Fp8Blocks) for f in formats.values())


def _stacked_value(values: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """A dsv3 tensor's expected value from per-expert checkpoint values (experts stacked, gate rows first)."""
    for proj, parts in (("gate_up_proj", ("gate_proj", "up_proj")), ("down_proj", ("down_proj",))):
        if name.endswith(f"mlp.experts.{proj}"):
            prefix = name[: -len(proj)]
            n = len({k for k in values if k.startswith(prefix) and k.endswith(".down_proj.weight")})
            return torch.stack([torch.cat([values[f"{prefix}{e}.{p}.weight"] for p in parts]) for e in range(n)])
    return values[name]


def test_checkpoint_without_mtp_weights_loads(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    pub = build_published(tmp_path / "no-mtp", RAGGED_32, (32, 32), mtp=False, seed=2)
    config = json.loads((pub.path / "config.json").read_text())
    config["num_nextn_predict_layers"] = 1          # the config still announces MTP, as converted releases do
    (pub.path / "config.json").write_text(json.dumps(config))
    with caplog.at_level(logging.INFO, logger="dsv3.checkpoint.loader"):
        model = DeepseekV3ForCausalLM.from_pretrained(pub.path, torch_dtype=torch.float32)
    _compare_logits(model, pub.oracle, "no MTP weights")
    assert not any(n.startswith("mtp.") for n, _ in model.named_parameters())
    with pytest.raises(CheckpointError, match=r"load_mtp=True but the checkpoint has no MTP weights"):
        DeepseekV3ForCausalLM.from_pretrained(pub.path, torch_dtype=torch.float32, load_mtp=True)
    skipped = DeepseekV3ForCausalLM.from_pretrained(pub.path, torch_dtype=torch.float32, load_mtp=False)
    assert not any(n.startswith("mtp.") for n, _ in skipped.named_parameters())


@pytest.mark.parametrize("layout", ["fused", "per_expert"])
@pytest.mark.parametrize("block", [None, (32, 32)], ids=["bf16", "fp8"])
def test_both_expert_layouts_load(layout: str, block: tuple[int, int] | None, tmp_path: Path) -> None:
    pub = build_published(tmp_path / layout, RAGGED_32, block, layout=layout, seed=4)
    keys = set(json.loads((pub.path / INDEX_NAME).read_text())["weight_map"])
    fused_key = "model.layers.1.mlp.experts.gate_up_proj"
    assert (fused_key in keys) == (layout == "fused")
    assert (fused_key + "_scale_inv" in keys) == (layout == "fused" and block is not None)
    model = DeepseekV3ForCausalLM.from_pretrained(pub.path, torch_dtype=torch.float32)
    _compare_logits(model, pub.oracle, f"{layout} experts")
    if block is not None:
        kept = DeepseekV3ForCausalLM.from_pretrained(pub.path, torch_dtype=torch.float32, fp8="keep")
        assert kept.model.layers[1].mlp.experts.gate_up_parts == (1 if layout == "fused" else 2)
        _compare_logits(kept, pub.oracle, f"{layout} experts, fp8 kept")


def test_real_v3_checkpoint_layout_is_checked_from_headers_alone(tmp_path: Path) -> None:
    """The published DeepSeek-V3 (671B, 91,991 tensors, 61 layers + MTP, FP8 with 576-row kv_a blocks) as
    sparse shards: phase 1 plans and checks every tensor on the real shapes, reading no data."""
    from dsv3.checkpoint.convert import plan_conversion

    write_sparse_v3(tmp_path, json.loads(HUB_CONFIG.read_text()))
    config = DeepseekV3Config.from_pretrained(tmp_path)
    forbid = mock.patch.object(CheckpointReader, "read", side_effect=AssertionError("data read"))
    with forbid, mock.patch.object(CheckpointReader, "get", side_effect=AssertionError("data read")), \
            CheckpointReader(tmp_path) as reader:
        assert len(reader) == 91991 and 688e9 < reader.total_bytes() < 689e9          # as published
        preps = {mode: prepare_load(DeepseekV3ForCausalLM, reader, config, mode) for mode in ("dequantize", "keep")}
        scales = preps["keep"].scales
        bf16_out = sum(e.nbytes for e in plan_conversion(reader, torch.bfloat16, False, scales))
    for mode, prep in preps.items():
        assert not prep.plan.missing and not prep.plan.unexpected and not prep.plan.mtp_keys, mode
        assert "model.layers.61.mlp.experts.gate_up_proj" in prep.plan.sources          # the MTP layer, stacked
    kept = preps["keep"].model
    assert kept.model.layers[0].self_attn.kv_a_proj_with_mqa.weight_scale_inv.shape == (5, 56)   # 576 = 4·128+64
    experts = kept.model.layers[3].mlp.experts
    assert experts.gate_up_proj.shape == (256, 4096, 7168) and experts.gate_up_proj_scale_inv.shape == (256, 32, 56)
    assert _holds_fp8(kept.mtp[0].mlp.experts) if getattr(kept, "mtp", None) else True

    def weight_bytes(prep: PreparedLoad) -> int:       # as loaded with torch_dtype=bfloat16 (router fp32)
        return sum(t.numel() * (t.element_size() if t.dtype == torch.float8_e4m3fn or n.endswith(
            ("_scale_inv", "mlp.gate.weight", "e_score_correction_bias")) else 2) for n, t in prep.targets.items())

    dense, held = weight_bytes(preps["dequantize"]), weight_bytes(preps["keep"])
    assert 1.36e12 < dense < 1.38e12 and 1.36e12 < bf16_out < 1.38e12 and held < 0.51 * dense   # FP8 held: half


# -- FP8 held at run time -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_keep_equals_dequantise_on_load(published: Published, dtype: torch.dtype) -> None:
    plain = DeepseekV3ForCausalLM.from_pretrained(published.path, torch_dtype=dtype)
    kept = DeepseekV3ForCausalLM.from_pretrained(published.path, torch_dtype=dtype, fp8="keep")
    attn = kept.model.layers[0].self_attn
    assert _holds_fp8(attn.kv_b_proj) and attn.kv_b_proj.weight.dtype == torch.float8_e4m3fn
    assert _holds_fp8(kept.model.layers[1].mlp.experts)
    assert _holds_fp8(kept.model.layers[1].mlp.shared_experts.down_proj)
    assert type(kept.lm_head) is torch.nn.Linear and kept.lm_head.weight.dtype == dtype

    ids, _ = left_padded_batch(published.oracle.config.vocab_size, [7, 7], seed=5)
    with torch.no_grad():
        for path in ("naive", "absorbed"):           # absorbed reads kv_b_proj's matrix, dequantised
            for dispatch in ("grouped", "gather"):   # grouped dequantises the layer's experts, gather the chosen
                want = plain(ids, mla_path=path, moe_dispatch=dispatch).logits
                got = kept(ids, mla_path=path, moe_dispatch=dispatch).logits
                assert torch.equal(got, want), f"{path}/{dispatch}: max diff {(got - want).abs().max():.3e}"

    def nbytes(m: torch.nn.Module) -> int:
        return sum(t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers()))

    bf16 = dict(DeepseekV3ForCausalLM.from_pretrained(published.path, torch_dtype=torch.bfloat16).named_modules())
    held = {n: m for n, m in kept.named_modules() if _holds_fp8(m)}
    fp8_bytes, bf16_bytes = sum(nbytes(m) for m in held.values()), sum(nbytes(bf16[n]) for n in held)
    assert fp8_bytes < 0.51 * bf16_bytes, (fp8_bytes, bf16_bytes)   # 1 byte per weight + one fp32 per block


def test_fp8_modules_keep_their_dtypes_under_to(small: Published) -> None:
    kept = DeepseekV3ForCausalLM.from_pretrained(small.path, torch_dtype=torch.float32, fp8="keep")
    ids, _ = left_padded_batch(small.oracle.config.vocab_size, [5], seed=6)
    with torch.no_grad():
        before = kept(ids).logits
        kept.to(torch.bfloat16).to(torch.float32)                  # casts activations' dtype, never FP8/scales
        experts = kept.model.layers[1].mlp.experts
        assert experts.gate_up_proj.dtype == torch.float8_e4m3fn
        assert experts.gate_up_proj_scale_inv.dtype == torch.float32
        assert kept.model.layers[0].self_attn.o_proj.weight_scale_inv.dtype == torch.float32
        after = kept(ids).logits
    assert_close(after, before, 0.05, "fp8 kept after bf16 round trip")   # only the bf16 tensors were rounded
    dense = torch.nn.Linear(70, 40, bias=True)
    fp8 = Linear.from_linear(dense, Fp8Blocks((32, 32)))
    x = torch.randn(3, 70)
    want = torch.nn.functional.linear(x, dequantize_fp8_blocks(fp8.weight, fp8.weight_scale_inv, (32, 32),
                                                               torch.float32), dense.bias)
    assert torch.equal(fp8(x), want) and fp8.weight_scale_inv.shape == (2, 3)
    assert_close(fp8(x), dense(x), 0.1, "Linear.from_linear(Fp8Blocks) vs dense")   # FP8 rounding: 3 mantissa bits


# -- arguments ------------------------------------------------------------------------------------------------------
def test_dtype_device_and_auto_classes(small: Published) -> None:
    path = small.path
    assert AutoConfig.from_pretrained(path).quantization_config["weight_block_size"] == [32, 32]
    for spec, want in ((torch.bfloat16, torch.bfloat16), ("bfloat16", torch.bfloat16), ("auto", torch.bfloat16),
                       ("float32", torch.float32), ("torch.float16", torch.float16)):
        model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=spec, device_map="cpu")
        assert model.dtype == want, spec
    model = DeepseekV3ForCausalLM.from_pretrained(path, dtype=torch.float32, device_map=torch.device("cpu"))
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    auto = DeepseekV3ForCausalLM.from_pretrained(path, torch_dtype="float32", device_map="auto")
    assert auto.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="torch_dtype='int8'"):
        DeepseekV3ForCausalLM.from_pretrained(path, torch_dtype="int8")
    with pytest.raises(ValueError, match="fp8='yes'"):
        DeepseekV3ForCausalLM.from_pretrained(path, fp8="yes")
    with pytest.raises(ValueError, match="device_map='tpu'"):
        DeepseekV3ForCausalLM.from_pretrained(path, device_map="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            DeepseekV3ForCausalLM.from_pretrained(path, device_map="cuda")

    base = DeepseekV3Model.from_pretrained(path, torch_dtype=torch.float32)     # the "model." part only
    ids, _ = left_padded_batch(small.oracle.config.vocab_size, [6], seed=7)
    with torch.no_grad():
        ref = small.oracle(ids, output_hidden_states=True).hidden_states[-1]
        assert_close(base(ids).last_hidden_state, ref, ATOL, "DeepseekV3Model from fp8")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("fp8", ["dequantize", "keep"])
def test_loads_onto_cuda(small: Published, fp8: str) -> None:
    model = DeepseekV3ForCausalLM.from_pretrained(small.path, torch_dtype=torch.float32, device_map="cuda", fp8=fp8)
    assert all(t.device.type == "cuda" for t in list(model.parameters()) + list(model.buffers()))
    ids, _ = left_padded_batch(small.oracle.config.vocab_size, [6], seed=8)
    with torch.no_grad():
        assert_close(model(ids.cuda()).logits.cpu(), small.oracle(ids).logits, 1e-3, f"cuda {fp8}")


def test_progress_bar_and_one_copy(small: Published, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    DeepseekV3ForCausalLM.from_pretrained(small.path, torch_dtype=torch.float32, progress=True)
    assert "Loading weights" in capsys.readouterr().err
    # No mmap'd views (their resident pages would be a second copy): data comes through `read`, and a tensor
    # whose stored dtype is the requested one is read straight into its parameter.
    monkeypatch.setattr(CheckpointReader, "get", lambda *a: pytest.fail("the loader must not mmap tensors"))
    into, scratch = [], []
    original = CheckpointReader.read

    def recording(self: CheckpointReader, key: str, out: torch.Tensor | None = None) -> torch.Tensor:
        (into if out is not None else scratch).append(key)
        return original(self, key, out)

    monkeypatch.setattr(CheckpointReader, "read", recording)
    DeepseekV3ForCausalLM.from_pretrained(small.path, torch_dtype=torch.bfloat16, fp8="keep")
    assert len(into) > 100 and scratch and all(k.endswith("mlp.gate.weight") for k in scratch)   # bf16 -> fp32 router


# -- save_pretrained ---------------------------------------------------------------------------------------------------
def test_save_pretrained_loads_in_transformers(published: Published, tmp_path: Path) -> None:

    model = DeepseekV3ForCausalLM.from_pretrained(published.path, torch_dtype=torch.float32)
    assert model.generation_config is not None                      # read from the checkpoint's generation_config.json
    out = tmp_path / "saved"
    model.save_pretrained(out, max_shard_size="40KB")
    names = os.listdir(out)
    assert INDEX_NAME in names and "generation_config.json" in names and not [n for n in names if n.startswith(".")]
    saved = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in saved and saved["torch_dtype"] == "float32"
    assert json.loads((out / "generation_config.json").read_text())["temperature"] == 0.6

    compare_padded_logits(model, load_hf(out), [8, 5], 9, 1e-5, "transformers reads save_pretrained")
    again = DeepseekV3ForCausalLM.from_pretrained(out, torch_dtype="auto")
    assert again.dtype == torch.float32
    for (n1, a), (n2, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert n1 == n2 and torch.equal(a, b), n1


def test_save_pretrained_of_fp8_held_model_stays_fp8(small: Published, tmp_path: Path) -> None:
    kept = DeepseekV3ForCausalLM.from_pretrained(small.path, torch_dtype=torch.bfloat16, fp8="keep")
    kept.generation_config = {"temperature": 0.3}
    kept.save_pretrained(tmp_path / "fp8")
    assert json.loads((tmp_path / "fp8" / "generation_config.json").read_text()) == {"temperature": 0.3}
    saved = json.loads((tmp_path / "fp8" / "config.json").read_text())
    assert saved["quantization_config"]["weight_block_size"] == [32, 32] and saved["torch_dtype"] == "bfloat16"
    with CheckpointReader(tmp_path / "fp8") as reader, CheckpointReader(small.path) as original:
        main = {k for k in original.keys() if not k.startswith("model.layers.3.")}   # the MTP layer is layer 3
        assert main <= set(reader.keys()) <= set(original.keys())
        up = "model.layers.1.mlp.experts.2.up_proj.weight"
        for key in (up, up + "_scale_inv"):
            assert torch.equal(reader.read(key), original.read(key)), key
    a = DeepseekV3ForCausalLM.from_pretrained(small.path, torch_dtype=torch.float32)
    b = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "fp8", torch_dtype=torch.float32)
    ids, _ = left_padded_batch(small.oracle.config.vocab_size, [6], seed=10)
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)


# -- errors: each names the file and tensor and says what was expected, before any tensor data is read --------
def _shard_of(path: Path, key: str) -> Path:
    return path / json.loads((path / INDEX_NAME).read_text())["weight_map"][key]


def _rewrite_shard(path: Path, key: str, edit) -> Path:  # noqa: ANN001
    """Rewrite the shard holding `key` with edit(dict of its tensors) applied, and the index to match."""
    shard = _shard_of(path, key)
    with CheckpointReader(shard) as r:
        tensors = {k: r.read(k) for k in r.keys()}
    edit(tensors)
    tmp = path / "rewrite"
    save_safetensors_sharded(tensors, tmp)
    os.replace(tmp / "model.safetensors", shard)
    shutil.rmtree(tmp)
    index = json.loads((path / INDEX_NAME).read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != shard.name}
    index["weight_map"].update({k: shard.name for k in tensors})
    (path / INDEX_NAME).write_text(json.dumps(index))
    return shard


def _load_error(path: Path, **kwargs: object) -> str:
    """The CheckpointError a load raises — found from headers alone: no tensor data may be read before it."""
    def forbidden(*args: object, **kwargs: object) -> None:
        pytest.fail("tensor data was read before the checkpoint was checked")

    with mock.patch.object(CheckpointReader, "read", forbidden), mock.patch.object(CheckpointReader, "get", forbidden):
        with pytest.raises(CheckpointError) as info:
            DeepseekV3ForCausalLM.from_pretrained(path, torch_dtype=torch.float32, **kwargs)
    return str(info.value)


KV_A = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"


def test_missing_shard(small: Published, tmp_path: Path) -> None:
    path = _copy(small, tmp_path)
    shard = _shard_of(path, KV_A)
    shard.unlink()
    msg = _load_error(path)
    assert shard.name in msg and "missing" in msg and "model.layers.0" in msg


def test_truncated_shard(small: Published, tmp_path: Path) -> None:
    path = _copy(small, tmp_path)
    shard = _shard_of(path, KV_A)
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 100)
    msg = _load_error(path)
    assert shard.name in msg and "truncated" in msg and "tensor model." in msg and "bytes" in msg


def test_corrupt_shard_header(small: Published, tmp_path: Path) -> None:
    path = _copy(small, tmp_path)
    shard = _shard_of(path, KV_A)
    data = bytearray(shard.read_bytes())
    data[8:20] = b"#not json!#("
    shard.write_bytes(bytes(data))
    msg = _load_error(path)
    assert shard.name in msg and "not valid JSON" in msg


def _copy_with_config(pub: Published, tmp_path: Path, **changes: object) -> Path:
    """A copy of `pub` whose config.json has `changes` applied (the weights untouched)."""
    path = _copy(pub, tmp_path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, **changes}))
    return path


def test_shape_that_does_not_fit_the_config(small: Published, tmp_path: Path) -> None:
    msg = _load_error(_copy_with_config(small, tmp_path, kv_lora_rank=24))
    assert ".safetensors" in msg and "has shape" in msg and "config implies" in msg and "model.layers." in msg


def test_expert_shape_that_does_not_fit_the_config(small: Published, tmp_path: Path) -> None:
    msg = _load_error(_copy_with_config(small, tmp_path, moe_intermediate_size=24))
    assert "expert tensor model.layers." in msg and "moe_intermediate_size" in msg and ".safetensors" in msg


def test_missing_tensor(small: Published, tmp_path: Path) -> None:
    path = _copy(small, tmp_path)
    key = "model.layers.1.self_attn.o_proj.weight"
    _rewrite_shard(path, key, lambda t: (t.pop(key), t.pop(key + "_scale_inv")))
    msg = _load_error(path)
    assert "missing tensors (1" in msg and key in msg and INDEX_NAME in msg


def test_unexpected_tensor(small: Published, tmp_path: Path) -> None:
    path = _copy(small, tmp_path)
    extra = "model.layers.0.self_attn.extra_proj.weight"
    shard = _rewrite_shard(path, KV_A, lambda t: t.update({extra: torch.zeros(2, 2, dtype=torch.bfloat16)}))
    msg = _load_error(path)
    assert "unexpected tensors (1)" in msg and f"{extra} (in {shard.name})" in msg


def test_unexpected_tensor_allowed_when_not_strict(small: Published, tmp_path: Path) -> None:
    path = _copy(small, tmp_path)
    _rewrite_shard(path, KV_A, lambda t: t.update({"model.layers.0.extra.weight": torch.zeros(2)}))
    DeepseekV3ForCausalLM.from_pretrained(path, torch_dtype=torch.float32, strict=False)


@pytest.mark.parametrize("change, named", [
    ({"quant_method": "gptq"}, "quant_method='gptq'"),
    ({"fmt": "int4"}, "fmt='int4'"),
    ({"activation_scheme": "static"}, "activation_scheme='static'"),
    ({"weight_block_size": [128]}, "weight_block_size=[128]"),
])
def test_unsupported_quantisation(small: Published, tmp_path: Path, change: dict, named: str,
                                  ) -> None:
    path = _copy(small, tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"].update(change)
    (path / "config.json").write_text(json.dumps(config))
    msg = _load_error(path)
    assert "config.json" in msg and named in msg and "not supported" in msg


def test_fp8_format_inconsistencies(small: Published, tmp_path: Path) -> None:
    path = _copy(small, tmp_path)
    config_path = path / "config.json"
    config = json.loads(config_path.read_text())

    config["quantization_config"]["weight_block_size"] = [64, 64]           # scales were written for 32x32
    config_path.write_text(json.dumps(config))
    msg = _load_error(path)
    assert "_scale_inv has shape" in msg and "weight_block_size [64, 64] needs" in msg and ".safetensors" in msg

    config["quantization_config"]["fmt"] = "e5m2"                           # the weights are e4m3
    config["quantization_config"]["weight_block_size"] = [32, 32]
    config_path.write_text(json.dumps(config))
    msg = _load_error(path)
    assert "float8_e4m3fn" in msg and "fmt='e5m2'" in msg and "model.layers." in msg

    del config["quantization_config"]                                     # scales but no quantization_config
    config_path.write_text(json.dumps(config))
    msg = _load_error(path)
    assert "no quantization_config" in msg and "_scale_inv" in msg


def test_fp8_weight_without_its_scale(small: Published, tmp_path: Path) -> None:
    path = _copy(small, tmp_path)
    shard = _rewrite_shard(path, KV_A, lambda t: t.pop(KV_A + "_scale_inv"))
    msg = _load_error(path)
    assert shard.name in msg and KV_A in msg and "no" in msg and "_scale_inv companion" in msg


def test_scale_without_its_weight(small: Published, tmp_path: Path) -> None:
    path = _copy(small, tmp_path)
    shard = _rewrite_shard(path, KV_A, lambda t: t.pop(KV_A))
    msg = _load_error(path)
    assert shard.name in msg and f"{KV_A}_scale_inv has no weight" in msg


def test_reader_header_errors_are_about_files_not_a_partial_model(small: Published, tmp_path: Path) -> None:
    path = _copy(small, tmp_path)
    shard = _shard_of(path, KV_A)
    infos, _ = read_safetensors_header(shard)
    assert KV_A in infos
    (path / "config.json").unlink()
    with pytest.raises(Exception, match="config.json"):
        DeepseekV3ForCausalLM.from_pretrained(path)
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        DeepseekV3ForCausalLM.from_pretrained(path / "nope")


# ---- stored dtypes and FP8 scale values -------------------------------------------------------------------
def test_integer_tensor_in_a_float_checkpoint_is_an_error(small: Published, tmp_path: Path) -> None:
    """int8/bool data where the model has a float weight would load as garbage after a silent cast."""
    path = _copy(small, tmp_path)
    norm = "model.layers.0.input_layernorm.weight"
    shard = _rewrite_shard(path, norm, lambda t: t.update({norm: torch.ones_like(t[norm], dtype=torch.int8)}))
    msg = _load_error(path)
    assert shard.name in msg and f"tensor {norm} is stored as torch.int8" in msg and "floating-point" in msg


def test_any_float_dtype_loads_cast(small: Published, tmp_path: Path) -> None:
    """config.json's torch_dtype describes the bulk: an fp32 router stored as bf16 or a norm stored as fp64
    is legitimate and loads, cast (router in fp32 by the numerics policy)."""
    path = _copy(small, tmp_path)
    gate = next(k for k in small.stored if k.endswith("mlp.gate.weight"))
    norm = "model.norm.weight"
    values = {gate: small.stored[gate].to(torch.bfloat16), norm: small.stored[norm].double()}
    _rewrite_shard(path, gate, lambda t: t.update({gate: values[gate]}))
    _rewrite_shard(path, norm, lambda t: t.update({norm: values[norm]}))
    model = DeepseekV3ForCausalLM.from_pretrained(path, torch_dtype=torch.bfloat16)
    state = model.state_dict()
    assert state[gate].dtype == torch.float32 and torch.equal(state[gate], values[gate].float())
    assert state[norm].dtype == torch.bfloat16 and torch.equal(state[norm], values[norm].to(torch.bfloat16))


@pytest.mark.parametrize("fp8", ["dequantize", "keep"])
def test_non_finite_fp8_scale_names_the_tensor(small: Published, tmp_path: Path, fp8: str) -> None:
    path = _copy(small, tmp_path)
    scale = f"{KV_A}_scale_inv"

    def poison(t: dict[str, torch.Tensor]) -> None:
        t[scale] = t[scale].clone()
        t[scale][1, 0] = float("inf")

    _rewrite_shard(path, scale, poison)
    with pytest.raises(CheckpointError, match=rf"{scale}: 1 of \d+ FP8 block scales are not finite \(e\.g\. inf at "
                                              r"block \[1, 0\]\).*re-download"):
        DeepseekV3ForCausalLM.from_pretrained(path, torch_dtype=torch.float32, fp8=fp8)
