"""Explicit cache positions: rows of different lengths share a batch (dynamic, static and paged caches,
both MLA paths) and get the logits each row gets alone; the cache writes where it is told; the paged
cache's block table and pool; speculation reclaims rejected draft slots."""

from __future__ import annotations

import pytest
import torch

from dsv3 import DeepseekV3Config, DeepseekV3ForCausalLM, DynamicLatentCache, StaticLatentCache
from dsv3.cache import LatentCache, PagedLatentCache
from dsv3.generation.generate import generate
from dsv3.generation.sampling import SamplingParams
from dsv3.generation.speculative import speculative_generate
from tests.oracle import assert_close, left_padded_batch


def tiny(seed: int = 0, **overrides) -> DeepseekV3ForCausalLM:
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(DeepseekV3Config.tiny(**overrides)).eval()
    with torch.no_grad():   # spread the router so routing is decisive (and differences show)
        for layer in model.model.layers[model.config.first_k_dense_replace:]:
            layer.mlp.gate.e_score_correction_bias.uniform_(-0.1, 0.1)
            layer.mlp.gate.weight.normal_(0, 0.3)
    return model


def new_cache(kind: str, model: DeepseekV3ForCausalLM, batch: int, length: int) -> LatentCache:
    n = model.num_cache_layers
    if kind == "dynamic":
        return DynamicLatentCache(n)
    if kind == "static":
        return StaticLatentCache(model.config, batch, length, num_layers=n)
    return PagedLatentCache(model.config, batch, num_blocks=batch * (length // 4) + 3, block_size=4, num_layers=n)


LENGTHS = [7, 2, 5]
STEPS = [1, 2, 1, 3, 1]   # new tokens per decode call after the prefill


@pytest.mark.parametrize("kind", ["dynamic", "static", "paged"])
@pytest.mark.parametrize("path", ["naive", "absorbed"])
def test_rows_of_different_lengths_get_the_logits_they_get_alone(kind: str, path: str) -> None:
    model = tiny(1)
    g = torch.Generator().manual_seed(2)
    total = max(LENGTHS) + sum(STEPS)
    seqs = torch.randint(0, model.config.vocab_size, (len(LENGTHS), total), generator=g)
    with torch.no_grad():
        alone = []
        for row, n in enumerate(LENGTHS):   # each row by itself: prefill n tokens, then the decode chunks
            cache = new_cache(kind, model, 1, 32)
            pieces = [model(seqs[row:row + 1, :n], past_key_values=cache, mla_path=path).logits[:, -1:]]
            start = n
            for s in STEPS:
                pieces.append(model(seqs[row:row + 1, start:start + s], past_key_values=cache, mla_path=path).logits)
                start += s
            assert cache.get_seq_length() == start
            alone.append(torch.cat(pieces, 1))

        # together: one right-padded prefill, each row cropped to its own length, then per-row appends
        lengths = torch.tensor(LENGTHS)
        cache = new_cache(kind, model, len(LENGTHS), 32)
        pad = (torch.arange(max(LENGTHS))[None] < lengths[:, None]).long()
        prefill = model(seqs[:, : max(LENGTHS)], attention_mask=pad, past_key_values=cache, mla_path=path).logits
        cache.crop(lengths)
        assert torch.equal(cache.lengths(3), lengths) and cache.get_seq_length() == max(LENGTHS)
        rows = torch.arange(len(LENGTHS))[:, None]
        pieces = [prefill[rows, lengths[:, None] - 1]]
        start = lengths.clone()
        for i, s in enumerate(STEPS):
            cols = start[:, None] + torch.arange(s)                           # [B, s] each row's next tokens
            explicit = cols if i % 2 else None                                # both: told where, and appended
            pieces.append(model(seqs[rows, cols], past_key_values=cache, cache_position=explicit,
                                mla_path=path).logits)
            start += s
        assert torch.equal(cache.lengths(3), start)
    together = torch.cat(pieces, 1)
    for row in range(len(LENGTHS)):
        assert_close(together[row:row + 1], alone[row], 1e-5, f"ragged: {kind}/{path} row {row}")


@pytest.mark.parametrize("kind", ["dynamic", "static", "paged"])
def test_int_crop_on_rows_of_different_lengths_applies_per_row(kind: str) -> None:
    """crop(n) keeps at most n tokens of each row and crop(-k) drops k from each: a shorter row never grows
    into slots it did not write; the continuation equals that of each row cropped alone."""
    model = tiny(5)
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(6))
    lengths = torch.tensor([7, 4])
    with torch.no_grad():
        cache = new_cache(kind, model, 2, 16)
        pad = (torch.arange(7)[None] < lengths[:, None]).long()
        model(ids[:, :7], attention_mask=pad, past_key_values=cache)
        cache.crop(lengths)
        cache.crop(5)                                                      # row 0: 7 -> 5, row 1 keeps 4
        assert cache.lengths(2).tolist() == [5, 4] and cache.get_seq_length() == 5
        cache.crop(-1)                                                     # each row drops one
        assert cache.lengths(2).tolist() == [4, 3] and cache.get_seq_length() == 4
        with pytest.raises(ValueError, match="holds only 3 tokens"):
            cache.crop(-5)
        rows = torch.arange(2)[:, None]
        nxt = ids[rows, cache.lengths(2)[:, None]]                          # each row's next real token
        out = model(nxt, past_key_values=cache).logits[:, -1]
        for row, n in enumerate([4, 3]):
            alone = model(ids[row:row + 1, : n + 1], use_cache=False).logits[:, -1]
            assert_close(out[row:row + 1], alone, 1e-5, f"crop per row: {kind} row {row}")


@pytest.mark.parametrize("kind", ["dynamic", "static", "paged"])
def test_cache_writes_where_it_is_told(kind: str) -> None:
    """cache_position rewinds: writing at slot p makes the row p+1 long (gpt-fast's input_pos)."""
    model = tiny(3)
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cache = new_cache(kind, model, 2, 16)
        model(ids[:, :8], past_key_values=cache)
        model(ids[:, 3:4] + 1, past_key_values=cache)                     # a token we take back
        out = model(ids[:, 3:9], past_key_values=cache, cache_position=torch.arange(3, 9)).logits
        assert cache.get_seq_length() == 9
    assert_close(out, full[:, 3:9], 1e-5, f"explicit cache_position: {kind}")


def test_paged_cache_blocks_and_errors() -> None:
    model = tiny(5)
    cache = PagedLatentCache(model.config, 2, num_blocks=5, block_size=4, num_layers=model.num_cache_layers)
    ids = torch.randint(0, model.config.vocab_size, (2, 6))
    with torch.no_grad():
        model(ids, past_key_values=cache)
    assert cache._owned == [2, 2] and len(cache._free) == 1               # ceil(6 / 4) blocks per row
    table = cache.block_table[:, :2]
    assert len(set(table.flatten().tolist())) == 4                        # no block shared between rows
    pool = cache.layers[0].view(-1, model.config.kv_cache_dim)
    slots = (table[:, :, None] * 4 + torch.arange(4)).view(2, 8)[:, :6]   # the slot mapping, by hand
    dense = StaticLatentCache(model.config, 2, 8, num_layers=model.num_cache_layers)
    with torch.no_grad():
        model(ids, past_key_values=dense)
    assert torch.equal(pool[slots], dense.layers[0][:, :6])
    with pytest.raises(ValueError, match="out of blocks"):
        with torch.no_grad():
            model(ids, past_key_values=cache)                              # 12 tokens: 6 blocks needed
    cache.release(1)
    assert len(cache._free) == 3 and torch.equal(cache.lengths(2), torch.tensor([6, 0]))
    with pytest.raises(ValueError, match="batch 3"):
        model(torch.zeros(3, 2, dtype=torch.long), past_key_values=cache)


@pytest.mark.parametrize("cache", ["dynamic", "static", "paged"])
def test_speculation_reclaims_rejected_draft_slots(cache: str) -> None:
    """After speculation the cache holds, per row, exactly the tokens kept (as plain generation leaves
    it: prompt + new - 1), not one slot per fed draft."""
    torch.manual_seed(6)
    model = DeepseekV3ForCausalLM(DeepseekV3Config.tiny()).eval()
    ids, mask = left_padded_batch(model.config.vocab_size, [9, 5], seed=7)
    n = 24
    kw = dict(max_new_tokens=n, eos_token_id=[], return_dict_in_generate=True)
    plain = generate(model, ids, mask, cache_implementation="dynamic", **kw)
    kept = plain.sequences.shape[1] - 1
    assert plain.past_key_values.get_seq_length() == kept
    if cache == "paged":   # generate() has no paged option: call the speculative loop with the cache
        spec_cache = new_cache("paged", model, 2, 36)
        sequences, stats = speculative_generate(model, ids, mask, n, SamplingParams(), [], 0, spec_cache)
    else:
        spec = generate(model, ids, mask, use_mtp=True, cache_implementation=cache, **kw)
        sequences, stats, spec_cache = spec.sequences, spec.speculative, spec.past_key_values
    assert torch.equal(sequences, plain.sequences)
    assert stats.acceptance_rate < 1.0
    assert spec_cache.get_seq_length() == kept
    assert torch.equal(spec_cache.lengths(2), torch.full((2,), kept))
