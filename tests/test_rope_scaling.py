"""Linear and dynamic-NTK RoPE scaling against transformers 5.23 in fp32, past max_position_embeddings.

transformers' dynamic NTK is stateful: DeepseekV3RotaryEmbedding recomputes inv_freq when a call reaches a
position beyond the longest it has seen (max_seq_len_cached) and keeps it until a call shorter than
max_position_embeddings resets it. On a fresh model, and while calls only grow (a prompt then cached decode
steps), that is the rule "base from this call's longest position", which dsv3 applies statelessly.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dsv3 import DeepseekV3ForCausalLM
from tests.oracle import assert_close, make_hf_model, scaled_rope

ATOL = 1e-4


def _pair(tmp_path: Path, kind: str, factor: float, max_pos: int, seed: int = 0):
    hf = make_hf_model(tmp_path, seed=seed, rope_scaling=scaled_rope(kind, factor), max_position_embeddings=max_pos)
    ours = DeepseekV3ForCausalLM.from_pretrained(tmp_path, torch_dtype=torch.float32)
    return hf, ours


def _ids(vocab: int, n: int, seed: int) -> torch.Tensor:
    return torch.randint(2, vocab, (2, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", ["linear", "dynamic"])
def test_long_sequences_match_transformers(kind: str, tmp_path: Path, single_thread: None) -> None:
    """Uncached forwards of growing length, up to factor × max_position_embeddings, both MLA paths."""
    hf, ours = _pair(tmp_path, kind, 4.0, 32)
    assert ours.config.max_context_length == 128
    first: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        for n in (20, 32, 33, 57, 128):     # growing, so transformers' state equals a fresh model's
            ids = _ids(hf.config.vocab_size, n, seed=n)
            ref = hf(input_ids=ids).logits
            for path in ("naive", "absorbed"):
                got = ours(input_ids=ids, mla_path=path, use_cache=False).logits
                assert_close(got, ref, ATOL, f"{kind}: {kind} rope uncached vs transformers")
            first[n] = got
        # dsv3 is stateless: a shorter sequence after a longer one gives what it gave before ...
        ids = _ids(hf.config.vocab_size, 33, seed=33)
        assert torch.equal(ours(input_ids=ids, mla_path="absorbed", use_cache=False).logits, first[33])
        if kind == "dynamic":
            # ... where transformers keeps the base of the 128-token call (its documented statefulness).
            assert (hf(input_ids=ids).logits - first[33]).abs().max() > 5 * ATOL
        with pytest.raises(ValueError, match="context of 128 positions"):
            ours(input_ids=_ids(hf.config.vocab_size, 129, seed=0), use_cache=False)


@pytest.mark.parametrize("kind", ["linear", "dynamic"])
def test_cached_decoding_matches_transformers(kind: str, tmp_path: Path, single_thread: None) -> None:
    """Prefill, a chunk, then single tokens across max_position_embeddings, with each library's cache."""
    from transformers import DynamicCache

    hf, ours = _pair(tmp_path, kind, 2.0, 16, seed=1)
    ids = _ids(hf.config.vocab_size, 30, seed=2)
    hf_cache, cache = DynamicCache(config=hf.config), None
    pieces, start = [], 0
    with torch.no_grad():
        for stop in (10, 14, 15, 16, 17, 18, 21, 22, 30):   # single tokens and chunks on both sides of 16
            ref = hf(input_ids=ids[:, start:stop], past_key_values=hf_cache, use_cache=True)
            got = ours(input_ids=ids[:, start:stop], past_key_values=cache, use_cache=True)
            assert_close(got.logits, ref.logits, ATOL, f"{kind}: {kind} rope cached vs transformers")
            hf_cache, cache, start = ref.past_key_values, got.past_key_values, stop
            pieces.append(got.logits)
        full = ours(input_ids=ids, use_cache=False).logits
        with pytest.raises(ValueError, match="30 cached \\+ 3 new tokens exceed the context of 32"):
            ours(input_ids=ids[:, :3], past_key_values=cache, use_cache=True)
    cached = torch.cat(pieces, 1)
    if kind == "linear":    # positions only: cached decoding equals one uncached pass
        assert_close(cached, full, ATOL, "linear: cached == uncached")
    else:
        # Up to 16 positions dynamic NTK is plain RoPE; past them each step's keys keep the base they were
        # computed with, as in transformers, so incremental decoding differs from one 30-token pass (which
        # rotates every position, the first 16 too, with the base of 30).
        with torch.no_grad():
            within = ours(input_ids=ids[:, :16], use_cache=False).logits
        assert_close(cached[:, :16], within, ATOL, "dynamic: cached == uncached within max_position")
        assert (cached - full).abs().max() > 5 * ATOL   # measured 6e-4, against 2e-7 parity


def test_dynamic_base_is_computed_on_the_device_without_host_sync() -> None:
    """The dynamic branch uses tensor ops only (compile/CUDA-graph friendly) and equals transformers' formula."""
    from transformers import DeepseekV3Config as HFConfig
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RotaryEmbedding

    from dsv3 import DeepseekV3Config
    from dsv3.model.rope import RotaryEmbedding

    cfg = DeepseekV3Config.tiny(rope_scaling={"type": "dynamic", "factor": 3.0}, max_position_embeddings=64)
    hf_cfg = HFConfig(qk_rope_head_dim=16, hidden_size=64, num_attention_heads=4, max_position_embeddings=64,
                      rope_parameters={"rope_type": "dynamic", "factor": 3.0, "rope_theta": cfg.rope_theta})
    for n in (10, 64, 65, 100, 192):
        pos = torch.arange(n).view(1, n)
        hf_rope = DeepseekV3RotaryEmbedding(hf_cfg)        # fresh: transformers' state would carry over
        cos, sin = hf_rope(torch.zeros(1, dtype=torch.float32), pos)
        ours = RotaryEmbedding(cfg)(pos)
        assert_close(ours.real, cos[..., :8], 1e-6, "dynamic rope: cos")
        assert_close(ours.imag, sin[..., :8], 1e-6, "dynamic rope: sin")
    compiled = torch.compile(RotaryEmbedding(cfg), fullgraph=True, backend="eager")
    pos = torch.arange(100).view(1, 100)
    assert torch.equal(compiled(pos), RotaryEmbedding(cfg)(pos))


@pytest.mark.parametrize("kind", ["linear", "dynamic"])
def test_generate_runs_past_max_position_embeddings_like_transformers(kind: str, tmp_path: Path,
                                                                      single_thread: None) -> None:
    """generate() takes its limit from config.max_context_length: greedy tokens past max_position_embeddings
    equal transformers' (fp32), and the limit itself is a named error."""
    hf, ours = _pair(tmp_path, kind, 2.0, 16, seed=3)
    ids = _ids(hf.config.vocab_size, 10, seed=4)
    with torch.no_grad():
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=14, do_sample=False,
                          min_new_tokens=14, pad_token_id=0)
        got = ours.generate(ids, max_new_tokens=14, do_sample=False, min_new_tokens=14, pad_token_id=0)
    assert got.shape[1] == 24 > ours.config.max_position_embeddings
    assert torch.equal(got, ref)
    with pytest.raises(ValueError, match="context of 32 positions"):
        ours.generate(ids, max_new_tokens=23, do_sample=False)
