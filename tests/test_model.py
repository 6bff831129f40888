"""dsv3's own paths against each other: cached == uncached, absorbed == naive, grouped == gathered ==
a per-expert loop, the two caches, and the numerics policy (router in fp32)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dsv3 import DeepseekV3Config, DeepseekV3ForCausalLM, DynamicLatentCache, StaticLatentCache
from dsv3.model.attention import MultiHeadLatentAttention, choose_path
from dsv3.model.moe import MoE, RoutedExperts
from dsv3.model.rope import RotaryEmbedding
from tests.oracle import assert_close, left_padded_batch, positions_from_mask


def tiny_model(seed: int = 0, **overrides) -> DeepseekV3ForCausalLM:
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(DeepseekV3Config.tiny(**overrides)).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            if isinstance(layer.mlp, MoE):
                layer.mlp.gate.e_score_correction_bias.uniform_(-0.1, 0.1)
                layer.mlp.gate.weight.normal_(0, 0.3)
    return model


def make_cache(kind: str, model: DeepseekV3ForCausalLM, batch: int, length: int):
    if kind == "dynamic":
        return DynamicLatentCache.for_config(model.config)
    return StaticLatentCache(model.config, batch, length, dtype=model.dtype)


@pytest.mark.parametrize("cache_kind", ["dynamic", "static"])
@pytest.mark.parametrize("path", ["naive", "absorbed", "auto"])
def test_incremental_decoding_matches_full_forward(cache_kind: str, path: str) -> None:
    model = tiny_model()
    ids, mask = left_padded_batch(model.config.vocab_size, [20, 14], seed=3)
    pos = positions_from_mask(mask)
    with torch.no_grad():
        full = model(ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
        cache = make_cache(cache_kind, model, 2, 32)
        pieces, start = [], 0
        for stop in (6, 10, 13, 14, 15, 16, 20):   # prefill, chunks of several tokens, then single tokens
            out = model(ids[:, start:stop], attention_mask=mask[:, :stop], position_ids=pos[:, start:stop],
                        past_key_values=cache, use_cache=True, mla_path=path)
            pieces.append(out.logits)
            start = stop
        assert cache.get_seq_length() == 20
    valid = mask.bool()
    assert_close(torch.cat(pieces, 1)[valid], full[valid], 1e-4, f"{cache_kind}/{path}")


def test_absorbed_equals_naive_at_any_start() -> None:
    model = tiny_model(1)
    attn: MultiHeadLatentAttention = model.model.layers[1].self_attn
    rope = RotaryEmbedding(model.config)
    torch.manual_seed(0)
    x = torch.randn(2, 9, model.config.hidden_size)
    from dsv3.model.attention import build_attention_mask
    for start, s in [(0, 9), (5, 4), (8, 1), (3, 6)]:
        mask = torch.ones(2, start + s, dtype=torch.long)
        mask[1, :2] = 0
        pos = torch.arange(start, start + s).expand(2, s)
        out = {}
        for path in ("naive", "absorbed"):
            cache = DynamicLatentCache(model.config.num_hidden_layers)
            if start:
                step = cache.plan(2, start, x.device)
                cache.update(1, torch.randn(2, start, model.config.kv_cache_dim,
                                            generator=torch.Generator().manual_seed(start)), step)
                cache.commit(step)
            step = cache.plan(2, s, x.device)
            m = build_attention_mask(mask, start, s, x.device)
            with torch.no_grad():
                out[path] = attn(x[:, :s], rope(pos), m, cache.view(step), path)
        assert_close(out["absorbed"], out["naive"], 1e-5, f"start={start} s={s}")


def test_cost_rule_picks_absorbed_for_decode_and_naive_for_prefill() -> None:
    v3 = DeepseekV3Config()
    assert choose_path(v3, 1, 4096) == "absorbed"
    assert choose_path(v3, 8, 4096) == "absorbed"
    assert choose_path(v3, 4096, 4096) == "naive"
    with pytest.raises(ValueError, match="mla_path"):
        choose_path(v3, 1, 1, "flash")


def per_expert_reference(experts: RoutedExperts, x, weights, indices) -> torch.Tensor:
    """The slow, obviously-correct loop over experts that the dispatches must reproduce."""
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32)
    inter = experts.intermediate
    for e in range(experts.num_experts):
        tok, slot = torch.where(indices == e)
        if tok.numel() == 0:
            continue
        gu = x[tok] @ experts.gate_up_proj[e].T
        y = (F.silu(gu[:, :inter]) * gu[:, inter:]) @ experts.down_proj[e].T
        out.index_add_(0, tok, y.float() * weights[tok, slot, None])
    return out


@pytest.mark.parametrize("n_tokens", [1, 3, 40])
def test_expert_dispatches_match_loop(n_tokens: int) -> None:
    model = tiny_model(2)
    moe: MoE = model.model.layers[1].mlp
    torch.manual_seed(n_tokens)
    x = torch.randn(n_tokens, model.config.hidden_size)
    route = moe.gate(x)
    with torch.no_grad():
        ref = per_expert_reference(moe.experts, x, route.weights, route.indices)
        for dispatch in ("grouped", "gather", "auto"):
            assert_close(moe.experts(x, route.weights, route.indices, dispatch), ref, 1e-5, dispatch)


def test_router_matches_reference_formula() -> None:
    model = tiny_model(3)
    gate = model.model.layers[1].mlp.gate
    cfg = model.config
    x = torch.randn(50, cfg.hidden_size)
    with torch.no_grad():
        out = gate(x)
        s = torch.sigmoid(x @ gate.weight.T)
    choice = s + gate.e_score_correction_bias
    per_group = cfg.n_routed_experts // cfg.n_group
    for n in range(x.shape[0]):
        groups = choice[n].view(cfg.n_group, per_group)
        gscore = groups.sort(-1, descending=True).values[:, :2].sum(-1)
        kept = set(gscore.argsort(descending=True)[: cfg.topk_group].tolist())
        allowed = [e for e in range(cfg.n_routed_experts) if e // per_group in kept]
        best = sorted(allowed, key=lambda e: -float(choice[n, e]))[: cfg.num_experts_per_tok]
        assert set(out.indices[n].tolist()) == set(best)
        w = s[n, out.indices[n]]
        w = w / w.sum() * cfg.routed_scaling_factor
        assert_close(out.weights[n], w, 1e-6, "router weights")


def test_router_stays_fp32_in_bf16_model() -> None:
    model = tiny_model(4).to(torch.bfloat16)
    gate = model.model.layers[1].mlp.gate
    assert gate.weight.dtype == torch.float32 and gate.e_score_correction_bias.dtype == torch.float32
    assert model.model.layers[1].mlp.experts.gate_up_proj.dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_tracks_fp32(dtype: torch.dtype) -> None:
    model = tiny_model(5)
    ids, _ = left_padded_batch(model.config.vocab_size, [16, 16], seed=5)
    with torch.no_grad():
        ref = F.log_softmax(model(ids).logits, -1)
        low = F.log_softmax(model.to(dtype)(ids).logits.float(), -1)
    assert low.isfinite().all()
    assert_close(low.exp(), ref.exp(), 0.05, f"{dtype} probabilities")


def test_static_cache_reads_only_filled_tokens_and_rejects_overflow() -> None:
    model = tiny_model(6)
    cache = StaticLatentCache(model.config, 1, 8)
    ids = torch.randint(0, model.config.vocab_size, (1, 6))
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
        latent = cache.update(0, torch.zeros(1, 0, model.config.kv_cache_dim), cache.plan(1, 0, ids.device))
    assert latent.shape[1] == 6   # a read covers the filled prefix, not the reserved 8
    with pytest.raises(ValueError, match="max_cache_len"):
        model(torch.zeros(1, 3, dtype=torch.long), past_key_values=cache, use_cache=True)


def test_cache_crop_rolls_back() -> None:
    model = tiny_model(7)
    ids = torch.randint(0, model.config.vocab_size, (1, 10))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cache = DynamicLatentCache.for_config(model.config)
        model(ids[:, :8], past_key_values=cache)
        cache.crop(5)   # reject three tokens, then continue from position 5
        tail = model(ids[:, 5:], past_key_values=cache).logits
    assert_close(tail, full[:, 5:], 1e-4, "after crop")


def test_cache_memory_is_latent_only() -> None:
    cfg = DeepseekV3Config()
    cache = StaticLatentCache(cfg.replace(num_hidden_layers=1, first_k_dense_replace=1), 1, 16,
                              dtype=torch.bfloat16, device="meta")
    assert cfg.kv_cache_dim == 576
    assert cache.layers[0].shape == (1, 16, 576)
    assert cache.layers[0].element_size() * cache.layers[0].shape[-1] == 1152   # bytes per token and layer


def test_bad_inputs_raise_clear_errors() -> None:
    model = tiny_model(8)
    with pytest.raises(ValueError, match="out of range"):
        model(torch.tensor([[1, model.config.vocab_size]]))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.zeros(1, model.config.max_position_embeddings + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask"):
        model(torch.zeros(2, 4, dtype=torch.long), attention_mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match="exactly one"):
        model()


def test_gradient_checkpointing_gives_same_gradients() -> None:
    ids = torch.randint(0, 256, (2, 12))
    grads = []
    for ckpt in (False, True):
        model = tiny_model(9).train()
        model.gradient_checkpointing_enable(ckpt)
        model(ids, labels=ids).loss.backward()
        grads.append(model.model.layers[1].self_attn.kv_b_proj.weight.grad.clone())
    assert_close(grads[1], grads[0], 1e-6, "checkpointed grads")
