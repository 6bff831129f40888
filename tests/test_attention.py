"""Attention outputs and edge cases against the transformers oracle (fp32, eager): attention
probabilities (`output_attentions`), padding queries on left-padded batches (the loss counts the first
real token, predicted from the last padding position), and named errors for bad inputs."""

from __future__ import annotations

import pytest
import torch

from dsv3 import DeepseekV3Config, DeepseekV3ForCausalLM, StaticLatentCache
from tests.oracle import assert_close, left_padded_batch, make_hf_model, positions_from_mask, yarn


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp("attn")
    hf = make_hf_model(path, seed=11, rope_scaling=yarn())
    ours = DeepseekV3ForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
    return hf, ours


def test_output_attentions_match_transformers_on_both_paths(pair) -> None:
    hf, ours = pair
    ids, mask = left_padded_batch(hf.config.vocab_size, [9, 6, 2], seed=12)
    pos = positions_from_mask(mask)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, position_ids=pos, output_attentions=True)
        probs = {}
        for path in ("naive", "absorbed"):
            got = ours(input_ids=ids, attention_mask=mask, position_ids=pos, output_attentions=True, mla_path=path)
            assert_close(got.logits[mask.bool()], ref.logits[mask.bool()], 1e-4, f"attentions: {path} logits")
            assert len(got.attentions) == len(ref.attentions) == hf.config.num_hidden_layers
            for i, (a, r) in enumerate(zip(got.attentions, ref.attentions)):
                assert a.shape == r.shape == (3, hf.config.num_attention_heads, 9, 9)
                assert_close(a, r, 1e-5, f"attentions: {path} layer {i}")   # padding rows included (uniform)
            probs[path] = got.attentions
    for a, n in zip(probs["absorbed"], probs["naive"]):
        assert_close(a, n, 1e-5, "attentions: absorbed vs naive")
    assert ours(ids[:1, -3:]).attentions is None


def test_output_attentions_with_a_cache_cover_cached_keys(pair) -> None:
    _, ours = pair
    ids = torch.randint(2, ours.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(13))
    with torch.no_grad():
        full = ours(ids, output_attentions=True, use_cache=False).attentions
        out = ours(ids[:, :5], use_cache=True)
        for path in ("naive", "absorbed"):
            cache = out.past_key_values
            cache.crop(5)
            step = ours(ids[:, 5:], past_key_values=cache, output_attentions=True, mla_path=path).attentions
            for a, f in zip(step, full):
                assert_close(a, f[:, :, 5:], 1e-5, f"attentions: cached {path}")


@pytest.mark.parametrize("path", ["naive", "absorbed"])
def test_left_padded_loss_counts_the_first_real_token(pair, path: str) -> None:
    """The first real token is predicted from the last padding position: transformers gives a padding
    query no keys (a uniform softmax over all of them); the loss must match with that label counted."""
    hf, ours = pair
    ids, mask = left_padded_batch(hf.config.vocab_size, [10, 4, 7, 1], seed=14)
    pos = positions_from_mask(mask)
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, position_ids=pos, labels=labels)
        got = ours(input_ids=ids, attention_mask=mask, position_ids=pos, labels=labels, mla_path=path)
    assert_close(got.logits, ref.logits, 1e-4, f"padded: all logits ({path})")   # padding positions too
    assert_close(got.loss, ref.loss, 1e-5, f"padded: loss ({path})")


def test_bad_inputs_get_named_errors() -> None:
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(DeepseekV3Config.tiny()).eval()
    v = model.config.vocab_size
    ids = torch.randint(0, v, (2, 5))
    for bad in (v, v + 7, -1, -101):
        labels = ids.clone()
        labels[1, 2] = bad
        with pytest.raises(ValueError, match=f"labels contain {bad}.*-100"):
            model(ids, labels=labels)
    model(ids, labels=ids.masked_fill(ids < 5, -100))   # -100 is fine
    for empty in (torch.zeros(1, 0, dtype=torch.long), torch.zeros(0, 4, dtype=torch.long)):
        with pytest.raises(ValueError, match="non-empty"):
            model(empty)
    with pytest.raises(ValueError, match="hidden_size=64"):
        model(inputs_embeds=torch.randn(2, 5, 32))
    with pytest.raises(ValueError, match="non-empty"):
        model(inputs_embeds=torch.randn(2, 0, 64))
    with pytest.raises(ValueError, match="batch_size=2"):
        model(ids, past_key_values=StaticLatentCache(model.config, 3, 16, num_layers=model.num_cache_layers))
    with pytest.raises(ValueError, match="torch.float32"):
        model(ids, past_key_values=StaticLatentCache(model.config, 2, 16, dtype=torch.bfloat16,
                                                      num_layers=model.num_cache_layers))
