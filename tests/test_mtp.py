"""The MTP module: its formula against a written-out reference (the block run by transformers' decoder
layer), cached drafting == full-sequence MTP, checkpoint round trips, and loading checkpoints without it."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dsv3 import DeepseekV3Config, DeepseekV3ForCausalLM, DynamicLatentCache, StaticLatentCache
from dsv3.checkpoint.errors import CheckpointError
from tests.oracle import assert_close, hf_config, left_padded_batch, make_hf_model, positions_from_mask, randomise, yarn

pytestmark = pytest.mark.usefixtures("single_thread")


def tiny_mtp_model(seed: int = 0, **overrides) -> tuple[DeepseekV3ForCausalLM, object]:
    """A random dsv3 model with one MTP module (fp32, eval) and the matching transformers config."""
    hf_cfg = hf_config(rope_scaling=yarn(), num_nextn_predict_layers=1, **overrides)
    hf_cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(DeepseekV3Config.from_dict(hf_cfg.to_dict())).eval()
    randomise(model, seed)
    return model, hf_cfg


def rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


@torch.no_grad()
def reference_mtp(model: DeepseekV3ForCausalLM, hf_cfg, hidden: torch.Tensor, next_ids: torch.Tensor,
                  pos: torch.Tensor) -> torch.Tensor:
    """DESIGN §2 written out over the module's weights: logits = head(norm(Block(eh_proj(cat[enorm(embed(t_{i+1})),
    hnorm(h_i)])))), with the block computed by transformers' own DeepseekV3DecoderLayer (loaded with the same
    weights) so that no dsv3 code is involved."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3DecoderLayer, DeepseekV3RotaryEmbedding

    mtp = model.mtp[0]
    eps = model.config.rms_norm_eps
    sd = {k: v for k, v in mtp.state_dict().items()}
    e = rms(sd["embed_tokens.weight"][next_ids], sd["enorm.weight"], eps)
    h = rms(hidden, sd["hnorm.weight"], eps)
    x = torch.cat([e, h], dim=-1) @ sd["eh_proj.weight"].T               # embedding first
    block = DeepseekV3DecoderLayer(hf_cfg, model.config.num_hidden_layers).eval()
    block.load_state_dict({k: v for k, v in sd.items() if k.split(".")[0] in
                           ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm")})
    s = x.shape[1]
    causal = torch.full((s, s), float("-inf")).triu(1)[None, None]
    cos_sin = DeepseekV3RotaryEmbedding(hf_cfg)(x, pos)
    y = block(x, attention_mask=causal, position_ids=pos, position_embeddings=cos_sin)
    y = y[0] if isinstance(y, tuple) else y
    return rms(y, sd["shared_head.norm.weight"], eps) @ sd["shared_head.head.weight"].T


def test_mtp_logits_match_reference_formula() -> None:
    model, hf_cfg = tiny_mtp_model(seed=1)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=g)
    with torch.no_grad():
        hidden = model(ids, use_cache=False).last_hidden_state          # final-normed h_i
        next_ids = ids[:, 1:]
        pos = torch.arange(11).expand(2, 11)
        got, h_mtp = model.mtp_forward(hidden[:, :-1], next_ids, pos)
    ref = reference_mtp(model, hf_cfg, hidden[:, :-1], next_ids, pos)
    assert_close(got, ref, 1e-4, "mtp: logits vs written-out formula")
    assert h_mtp.shape == hidden[:, :-1].shape
    # the order of the concatenation matters: swapping it changes the result
    mtp = model.mtp[0]
    with torch.no_grad():
        swapped = mtp.eh_proj(torch.cat([mtp.hnorm(hidden[:, :-1]), mtp.enorm(mtp.embed_tokens(next_ids))], -1))
        assert not torch.allclose(swapped, mtp.combine(hidden[:, :-1], next_ids), atol=1e-3)


@pytest.mark.parametrize("cache_kind", ["dynamic", "static"])
def test_cached_drafting_matches_full_sequence_mtp(cache_kind: str) -> None:
    """Main model chunk by chunk with a cache, MTP right after each chunk on the same positions (its own
    cache slot L): the MTP logits equal those of one uncached pass over the whole sequence."""
    model, _ = tiny_mtp_model(seed=3)
    ids, mask = left_padded_batch(model.config.vocab_size, [14, 9], seed=4)
    pos = positions_from_mask(mask)
    t = ids.shape[1]
    nxt = torch.cat([ids[:, 1:], torch.full((2, 1), 5)], dim=1)          # t_{i+1}; the last one "just sampled"
    with torch.no_grad():
        full_h = model(ids, attention_mask=mask, position_ids=pos, use_cache=False).last_hidden_state
        full, _ = model.mtp_forward(full_h, nxt, pos, attention_mask=mask)
        if cache_kind == "dynamic":
            cache = DynamicLatentCache(model.num_cache_layers)
        else:
            cache = StaticLatentCache(model.config, 2, 16, num_layers=model.num_cache_layers)
        pieces, start = [], 0
        for stop in (6, 9, 10, 13, 14):
            out = model(ids[:, start:stop], attention_mask=mask[:, :stop], position_ids=pos[:, start:stop],
                        past_key_values=cache, use_cache=True)
            logits, _ = model.mtp_forward(out.last_hidden_state, nxt[:, start:stop], pos[:, start:stop], cache,
                                          attention_mask=mask[:, :stop])
            pieces.append(logits)
            assert cache.get_seq_length() == stop
            start = stop
    assert t == 14
    valid = mask.bool()
    assert_close(torch.cat(pieces, 1)[valid], full[valid], 1e-4, f"mtp cached ({cache_kind})")


def test_model_cache_has_room_for_mtp_and_errors_name_the_fix() -> None:
    model, _ = tiny_mtp_model()
    ids = torch.randint(0, model.config.vocab_size, (1, 5))
    with torch.no_grad():
        out = model(ids, use_cache=True)
        assert out.past_key_values.num_layers == model.config.num_hidden_layers + 1 == model.num_cache_layers
        model.mtp_forward(out.last_hidden_state, ids, cache=out.past_key_values)
        small = DynamicLatentCache.for_config(model.config)
        model(ids, past_key_values=small, use_cache=True)
        with pytest.raises(ValueError, match="layer slots"):
            model.mtp_forward(out.last_hidden_state, ids, cache=small)
        with pytest.raises(ValueError, match="run the main model"):
            model.mtp_forward(torch.zeros(1, 9, 64), torch.zeros(1, 9, dtype=torch.long), cache=out.past_key_values)
        with pytest.raises(ValueError, match="k=1"):
            model.mtp_forward(out.last_hidden_state, ids, k=1)


def test_mtp_option_and_main_weights_unchanged_by_it() -> None:
    config = DeepseekV3Config.tiny()
    torch.manual_seed(0)
    with_mtp = DeepseekV3ForCausalLM(config)
    torch.manual_seed(0)
    without = DeepseekV3ForCausalLM(config, mtp=False)
    assert with_mtp.mtp is not None and len(with_mtp.mtp) == 1 and without.mtp is None
    assert with_mtp.mtp[0].self_attn.layer_idx == config.num_hidden_layers
    main = without.state_dict()
    for name, tensor in with_mtp.state_dict().items():
        if not name.startswith("mtp."):
            assert torch.equal(tensor, main[name]), name
    assert DeepseekV3ForCausalLM(config.replace(num_nextn_predict_layers=0)).mtp is None
    with pytest.raises(ValueError, match="num_nextn_predict_layers"):
        DeepseekV3ForCausalLM(config.replace(num_nextn_predict_layers=0), mtp=True)


def _checkpoint_keys(directory: Path) -> set[str]:
    from safetensors import safe_open

    keys: set[str] = set()
    for f in directory.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            keys.update(st.keys())
    return keys


def test_save_load_round_trip_keeps_mtp_under_layer_L(tmp_path: Path) -> None:
    model, _ = tiny_mtp_model(seed=5)
    model.save_pretrained(tmp_path)
    keys = _checkpoint_keys(tmp_path)
    L = model.config.num_hidden_layers
    assert not any(k.startswith("mtp.") for k in keys)
    for part in ("embed_tokens.weight", "enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
                 "shared_head.head.weight", "self_attn.kv_b_proj.weight", "mlp.gate.e_score_correction_bias",
                 "mlp.experts.0.gate_proj.weight", "mlp.shared_experts.down_proj.weight", "input_layernorm.weight"):
        assert f"model.layers.{L}.{part}" in keys, part
    assert json.loads((tmp_path / "config.json").read_text())["num_nextn_predict_layers"] == 1
    loaded = DeepseekV3ForCausalLM.from_pretrained(tmp_path, torch_dtype=torch.float32)
    assert loaded.mtp is not None
    theirs = loaded.state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, theirs[name]), name
    ids = torch.randint(0, model.config.vocab_size, (1, 8))
    with torch.no_grad():
        h = model(ids, use_cache=False).last_hidden_state
        assert torch.equal(model.mtp_forward(h, ids)[0], loaded.mtp_forward(h, ids)[0])
    skipped = DeepseekV3ForCausalLM.from_pretrained(tmp_path, torch_dtype=torch.float32, load_mtp=False)
    assert skipped.mtp is None


def test_transformers_checkpoint_without_mtp_tensors_loads(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    hf = make_hf_model(tmp_path, seed=6, num_nextn_predict_layers=1)   # config says 1; transformers saves none
    assert not any(k.startswith(f"model.layers.{hf.config.num_hidden_layers}.") for k in _checkpoint_keys(tmp_path))
    with caplog.at_level(logging.INFO, logger="dsv3"):
        ours = DeepseekV3ForCausalLM.from_pretrained(tmp_path, torch_dtype=torch.float32)
    assert ours.mtp is None
    assert any("MTP" in r.getMessage() for r in caplog.records)
    ids = torch.randint(0, hf.config.vocab_size, (1, 7))
    with torch.no_grad():
        assert_close(ours(ids, use_cache=False).logits, hf(input_ids=ids).logits, 1e-4, "mtp: hf ckpt logits")
        with pytest.raises(ValueError, match="requested but the model has 0"):
            ours.mtp_forward(torch.zeros(1, 7, 64), ids)
    with pytest.raises(CheckpointError, match="MTP"):
        DeepseekV3ForCausalLM.from_pretrained(tmp_path, torch_dtype=torch.float32, load_mtp=True)


def test_mtp_gradients_reach_its_weights_only_through_the_mtp_loss() -> None:
    model, _ = tiny_mtp_model(seed=7)
    model.train()
    ids = torch.randint(0, model.config.vocab_size, (2, 10))
    out = model(ids, labels=ids, use_cache=False)
    logits, _ = model.mtp_forward(out.last_hidden_state[:, :-1], ids[:, 1:])
    F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 2:].reshape(-1)).backward()
    assert model.mtp[0].eh_proj.weight.grad is not None and model.mtp[0].embed_tokens.weight.grad is not None
    assert model.model.layers[0].self_attn.kv_b_proj.weight.grad is not None   # MTP loss trains the trunk too
    assert model.lm_head.weight.grad is None
    assert model.mtp[0].mlp.gate.e_score_correction_bias.grad is None
