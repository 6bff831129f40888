"""Tiny checkpoints in the layout DeepSeek publishes (V3, R1, V3.1), built by the tests themselves.

What the published release looks like, and what `build_published` reproduces at toy size:
- `config.json` in hub form (`rope_scaling`, `num_nextn_predict_layers`, `torch_dtype: bfloat16`, extra
  keys such as topk_method / scoring_func / auto_map) with
  `quantization_config {quant_method: fp8, fmt: e4m3, activation_scheme: dynamic, weight_block_size}`;
- every linear projection of attention (q_a, q_b or q, kv_a_proj_with_mqa, kv_b, o), of the dense MLPs
  and of the shared and routed experts stored as float8_e4m3fn `weight` + fp32 `weight_scale_inv`
  (block grid with partial edge blocks); embeddings, lm_head, norms, router `mlp.gate.weight` and the
  MTP `eh_proj` / `shared_head.head` in bf16, `e_score_correction_bias` in fp32;
- routed experts per expert (`mlp.experts.E.{gate,up,down}_proj`), or fused (`experts.gate_up_proj`);
- the MTP module as layer `num_hidden_layers`: enorm, hnorm, eh_proj, a full MoE decoder layer,
  shared_head.{norm,head}, its own copy of embed_tokens;
- many shards `model-0000i-of-00000N.safetensors` (6-digit total, as in the release) and an index.

The oracle is the transformers model carrying the *dequantised* values of exactly those tensors, in fp32.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dsv3.checkpoint.fp8 import dequantize_fp8_blocks, quantize_fp8_blocks
from dsv3.checkpoint.safetensors_io import INDEX_NAME, save_safetensors_sharded
from tests.oracle import TINY, hf_config, randomise

QUANTISED = ("q_a_proj", "q_b_proj", "q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj",
             "gate_proj", "up_proj", "down_proj")

# 128x128 blocks with ragged dims above 128: kv_a_proj_with_mqa has 128+16 = 144 rows (as V3's 576 = 4·128+64),
# hidden 160, q_lora 136, dense intermediate 200; expert intermediate 48 is one partial block.
RAGGED_128: dict[str, Any] = dict(
    hidden_size=160, q_lora_rank=136, kv_lora_rank=128, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=24,
    num_attention_heads=2, num_key_value_heads=2, intermediate_size=200, moe_intermediate_size=48,
    n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1, num_hidden_layers=2,
    first_k_dense_replace=1,
)
# 32x32 blocks: hidden 72 = 2·32+8, expert intermediate 40 = 32+8 (gate and up grids do not tile 2I), kv_a 48.
RAGGED_32: dict[str, Any] = dict(hidden_size=72, moe_intermediate_size=40)

HUB_EXTRAS = {"topk_method": "noaux_tc", "scoring_func": "sigmoid", "moe_layer_freq": 1, "ep_size": 1,
              "aux_loss_alpha": 0.001, "seq_aux": True, "transformers_version": "4.46.3",
              "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config",
                           "AutoModel": "modeling_deepseek.DeepseekV3Model",
                           "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"}}
OTHER_FILES = {"tokenizer.json": '{"version": "1.0", "model": {"type": "BPE"}}\n',
               "tokenizer_config.json": '{"bos_token": "<｜begin▁of▁sentence｜>", "chat_template": "{{ x }}"}\n',
               "generation_config.json": '{"bos_token_id": 0, "eos_token_id": 1, "do_sample": true, '
                                         '"temperature": 0.6, "top_p": 0.95}\n',
               "configuration_deepseek.py": "# remote code, copied verbatim\n",
               "README.md": "# tiny published-format checkpoint\n"}


@dataclass
class Published:
    path: Path
    oracle: Any                           # transformers model (fp32, eager) with the dequantised weights
    values: dict[str, torch.Tensor]       # dequantised fp32 value of every tensor, checkpoint names (per expert)
    stored: dict[str, torch.Tensor]       # what the files hold
    config: dict[str, Any]                # config.json as written
    block: tuple[int, int] | None


def is_quantised(key: str) -> bool:
    """Linear weights the release stores as FP8 (and the fused expert stacks of the transformers-5 layout)."""
    parts = key.split(".")
    if parts[-2:] in (["experts", "gate_up_proj"], ["experts", "down_proj"]):
        return True
    return key.endswith(".weight") and parts[-2] in QUANTISED


def hub_config(overrides: dict[str, Any], block: tuple[int, int] | None, mtp: bool) -> dict[str, Any]:
    cfg = {**TINY, **overrides}
    cfg.update(model_type="deepseek_v3", architectures=["DeepseekV3ForCausalLM"], torch_dtype="bfloat16",
               num_nextn_predict_layers=1 if mtp else 0, bos_token_id=0, eos_token_id=1, hidden_act="silu",
               rms_norm_eps=1e-6, initializer_range=0.02, use_cache=True, **HUB_EXTRAS)
    if block is not None:
        cfg["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                      "weight_block_size": list(block)}
    return cfg


def _mtp_tensors(sd: dict[str, torch.Tensor], n_layers: int, hidden: int,
                 g: torch.Generator) -> dict[str, torch.Tensor]:
    """The MTP layer: the last main layer's tensors perturbed (a full MoE decoder layer) plus MTP's own."""
    last, mtp = f"model.layers.{n_layers - 1}.", f"model.layers.{n_layers}."
    out = {}
    for key, t in sd.items():
        if key.startswith(last):
            noise = 0.01 * torch.randn(t.shape, generator=g) if t.is_floating_point() else 0
            out[mtp + key[len(last):]] = t + noise
    out[mtp + "enorm.weight"] = 1 + 0.1 * torch.randn(hidden, generator=g)
    out[mtp + "hnorm.weight"] = 1 + 0.1 * torch.randn(hidden, generator=g)
    out[mtp + "eh_proj.weight"] = 0.02 * torch.randn(hidden, 2 * hidden, generator=g)
    out[mtp + "shared_head.norm.weight"] = 1 + 0.1 * torch.randn(hidden, generator=g)
    out[mtp + "shared_head.head.weight"] = sd["lm_head.weight"].clone()
    out[mtp + "embed_tokens.weight"] = sd["model.embed_tokens.weight"].clone()
    return out


def _per_expert(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, t in sd.items():
        if key.endswith("mlp.experts.gate_up_proj"):
            prefix, inter = key[: -len("gate_up_proj")], t.shape[1] // 2
            for e in range(t.shape[0]):
                out[f"{prefix}{e}.gate_proj.weight"] = t[e, :inter]
                out[f"{prefix}{e}.up_proj.weight"] = t[e, inter:]
        elif key.endswith("mlp.experts.down_proj"):
            prefix = key[: -len("down_proj")]
            for e in range(t.shape[0]):
                out[f"{prefix}{e}.down_proj.weight"] = t[e]
        else:
            out[key] = t
    return out


def _fused(values: dict[str, torch.Tensor], hf_keys: list[str]) -> dict[str, torch.Tensor]:
    """Per-expert values -> the transformers state dict (fused experts)."""
    out = {}
    for key in hf_keys:
        if key.endswith("mlp.experts.gate_up_proj") or key.endswith("mlp.experts.down_proj"):
            prefix, proj = key.rsplit(".", 1)
            e = 0
            stack = []
            while f"{prefix}.{e}.down_proj.weight" in values:
                parts = ("gate_proj", "up_proj") if proj == "gate_up_proj" else ("down_proj",)
                stack.append(torch.cat([values[f"{prefix}.{e}.{p}.weight"] for p in parts]))
                e += 1
            out[key] = torch.stack(stack)
        else:
            out[key] = values[key]
    return out


def build_published(directory: Path, overrides: dict[str, Any] | None = None,
                    block: tuple[int, int] | None = (128, 128), mtp: bool = True, layout: str = "per_expert",
                    shards: int = 4, seed: int = 0) -> Published:
    """Write a published-format checkpoint into `directory` (block=None: unquantised bf16)."""
    from transformers import DeepseekV3ForCausalLM as HFModel

    overrides = overrides or {}
    torch.manual_seed(seed)
    cfg = hf_config(**overrides)
    cfg._attn_implementation = "eager"
    hf = HFModel(cfg).eval()
    randomise(hf, seed)
    sd = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    n_layers = cfg.num_hidden_layers
    per_expert = _per_expert(sd)
    if mtp:
        per_expert.update(_mtp_tensors(per_expert, n_layers, cfg.hidden_size, torch.Generator().manual_seed(seed)))

    if layout == "fused":
        raw = _fused(per_expert, sorted({_fused_name(k) for k in per_expert}))
    elif layout == "per_expert":
        raw = per_expert
    else:
        raise ValueError(f"layout={layout!r}: expected 'per_expert' or 'fused'")

    stored: dict[str, torch.Tensor] = {}
    values: dict[str, torch.Tensor] = {}
    for key, t in raw.items():
        if block is not None and is_quantised(key):
            if t.dim() == 3:     # fused stack: one block grid per expert over its 2I (or H) rows
                pairs = [quantize_fp8_blocks(t[e].float(), block) for e in range(t.shape[0])]
                q, s = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
                values[key] = torch.stack([dequantize_fp8_blocks(a, b, block, torch.float32) for a, b in pairs])
            else:
                q, s = quantize_fp8_blocks(t.float(), block)
                values[key] = dequantize_fp8_blocks(q, s, block, torch.float32)
            stored[key], stored[key + "_scale_inv"] = q, s
        elif key.endswith("e_score_correction_bias"):
            stored[key] = values[key] = t.float().contiguous()
        else:
            stored[key] = t.to(torch.bfloat16).contiguous()
            values[key] = stored[key].float()
    with torch.no_grad():
        hf.load_state_dict({k: values[k] for k in sd} if layout == "fused" else _fused(values, list(sd)), strict=True)

    _write(directory, stored, shards)
    config = hub_config(overrides, block, mtp)
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name, text in OTHER_FILES.items():
        (directory / name).write_text(text, encoding="utf-8")
    return Published(directory, hf, values, stored, config, block)


def _fused_name(key: str) -> str:
    """model.layers.N.mlp.experts.E.gate_proj.weight -> model.layers.N.mlp.experts.gate_up_proj (others as is)."""
    if ".mlp.experts." not in key:
        return key
    prefix, rest = key.split(".mlp.experts.")
    proj = "down_proj" if rest.split(".")[1] == "down_proj" else "gate_up_proj"
    return f"{prefix}.mlp.experts.{proj}"


def _write(directory: Path, stored: dict[str, torch.Tensor], shards: int) -> None:
    """Shards in layer order, renamed to the release's `model-0000i-of-00000N.safetensors`."""
    def order(key: str) -> tuple[int, str]:
        parts = key.split(".")
        layer = int(parts[2]) if key.startswith("model.layers.") else (-1 if "embed" in key else 10**6)
        return layer, key

    items = [(k, stored[k]) for k in sorted(stored, key=order)]
    total = sum(t.numel() * t.element_size() for _, t in items)
    directory.mkdir(parents=True, exist_ok=True)
    files = save_safetensors_sharded(items, directory, max_shard_bytes=max(1, total // shards + 1))
    if len(files) == 1:
        return
    index = json.loads((directory / INDEX_NAME).read_text())
    n = len(files)
    renames = {Path(f).name: f"model-{i:05d}-of-{n:06d}.safetensors" for i, f in enumerate(files, 1)}
    for old, new in renames.items():
        os.replace(directory / old, directory / new)
    index["weight_map"] = {k: renames[v] for k, v in sorted(index["weight_map"].items())}
    (directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def write_sparse_v3(directory: Path, config: dict[str, Any], n_shards: int = 8) -> dict[str, tuple[str, list[int]]]:
    """The full published V3 tensor list (61 layers + the MTP layer, FP8 with scales) as shards whose headers
    are real and whose data are holes (sparse files: ~690 GB apparent, a few MB on disk). Only header-level
    code may touch it. Returns {name: (safetensors dtype, shape)}. Names are written out independently of dsv3."""
    d, v, e = config["hidden_size"], config["vocab_size"], config["n_routed_experts"]
    h, qr, kr = config["num_attention_heads"], config["q_lora_rank"], config["kv_lora_rank"]
    dn, dr, dv = config["qk_nope_head_dim"], config["qk_rope_head_dim"], config["v_head_dim"]
    inter, moe = config["intermediate_size"], config["moe_intermediate_size"]
    n_layers, block = config["num_hidden_layers"], config["quantization_config"]["weight_block_size"]
    entries: dict[str, tuple[str, list[int]]] = {}

    def fp8(key: str, rows: int, cols: int) -> None:
        entries[key + ".weight"] = ("F8_E4M3", [rows, cols])
        entries[key + ".weight_scale_inv"] = ("F32", [-(-rows // block[0]), -(-cols // block[1])])

    def bf16(key: str, *shape: int) -> None:
        entries[key] = ("BF16", list(shape))

    bf16("model.embed_tokens.weight", v, d)
    for i in range(n_layers + config["num_nextn_predict_layers"]):
        p = f"model.layers.{i}."
        fp8(p + "self_attn.q_a_proj", qr, d)
        bf16(p + "self_attn.q_a_layernorm.weight", qr)
        fp8(p + "self_attn.q_b_proj", h * (dn + dr), qr)
        fp8(p + "self_attn.kv_a_proj_with_mqa", kr + dr, d)
        bf16(p + "self_attn.kv_a_layernorm.weight", kr)
        fp8(p + "self_attn.kv_b_proj", h * (dn + dv), kr)
        fp8(p + "self_attn.o_proj", d, h * dv)
        bf16(p + "input_layernorm.weight", d)
        bf16(p + "post_attention_layernorm.weight", d)
        if i < config["first_k_dense_replace"]:
            fp8(p + "mlp.gate_proj", inter, d)
            fp8(p + "mlp.up_proj", inter, d)
            fp8(p + "mlp.down_proj", d, inter)
        else:
            bf16(p + "mlp.gate.weight", e, d)
            entries[p + "mlp.gate.e_score_correction_bias"] = ("F32", [e])
            for x in [*(f"experts.{j}" for j in range(e)), "shared_experts"]:
                width = moe * (config["n_shared_experts"] if x == "shared_experts" else 1)
                fp8(p + f"mlp.{x}.gate_proj", width, d)
                fp8(p + f"mlp.{x}.up_proj", width, d)
                fp8(p + f"mlp.{x}.down_proj", d, width)
        if i >= n_layers:                                          # the MTP module's own parts
            for name in ("enorm.weight", "hnorm.weight", "shared_head.norm.weight"):
                bf16(p + name, d)
            bf16(p + "eh_proj.weight", d, 2 * d)
            bf16(p + "shared_head.head.weight", v, d)
            bf16(p + "embed_tokens.weight", v, d)
    bf16("model.norm.weight", d)
    bf16("lm_head.weight", v, d)

    itemsize = {"F8_E4M3": 1, "BF16": 2, "F32": 4}
    keys = list(entries)
    per = -(-len(keys) // n_shards)
    weight_map, total = {}, 0
    directory.mkdir(parents=True, exist_ok=True)
    for s in range(n_shards):
        name = f"model-{s + 1:05d}-of-{n_shards:06d}.safetensors"
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for key in keys[s * per:(s + 1) * per]:
            dtype, shape = entries[key]
            n = itemsize[dtype]
            for dim in shape:
                n *= dim
            header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
            offset += n
            weight_map[key] = name
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        with open(directory / name, "wb") as f:
            f.write(len(raw).to_bytes(8, "little") + raw)
            f.truncate(8 + len(raw) + offset)                      # a hole: no data blocks on disk
        total += offset
    (directory / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps(config))
    return entries
