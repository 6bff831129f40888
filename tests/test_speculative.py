"""Speculative decoding with the MTP drafter: greedy output equals plain greedy whatever the drafts,
acceptance works per row, and sampling keeps the main model's distribution."""

from __future__ import annotations

import pytest
import torch

from dsv3 import DeepseekV3Config, DeepseekV3ForCausalLM
from dsv3.generation.generate import generate
from tests.oracle import left_padded_batch


def tiny(seed: int = 0, **overrides) -> DeepseekV3ForCausalLM:
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(DeepseekV3Config.tiny(**overrides)).eval()
    assert model.mtp is not None
    return model


def oracle_drafter(model: DeepseekV3ForCausalLM, sequences: torch.Tensor, pads: torch.Tensor,
                   right_every: int = 1):
    """Replace the MTP logits with a drafter that knows the greedy continuation; it is right at
    positions divisible by `right_every` and wrong elsewhere (exercises rows diverging)."""
    real = model.mtp_forward
    vocab = model.config.vocab_size

    def fake(hidden, next_ids, position_ids=None, cache=None, attention_mask=None, k=0, **kw):
        logits, h = real(hidden, next_ids, position_ids, cache, attention_mask, k, **kw)
        col = (pads[:, None] + position_ids + 2).clamp(max=sequences.shape[1] - 1)
        target = sequences.gather(1, col)
        wrong = (position_ids % right_every) != 0
        target = torch.where(wrong, (target + 1) % vocab, target)
        return torch.nn.functional.one_hot(target, vocab).float() * 100, h

    model.mtp_forward = fake   # instance attribute: only this model object
    return model


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("lengths", [[9], [9, 5, 7, 3]])
def test_greedy_speculative_equals_plain_greedy(cache: str, lengths: list[int]) -> None:
    model = tiny()
    ids, mask = left_padded_batch(model.config.vocab_size, lengths, seed=1)
    plain = generate(model, ids, mask, max_new_tokens=20, eos_token_id=[], cache_implementation=cache)
    spec = generate(model, ids, mask, max_new_tokens=20, eos_token_id=[], cache_implementation=cache,
                    use_mtp=True, return_dict_in_generate=True)
    assert torch.equal(spec.sequences, plain)


@pytest.mark.parametrize("right_every, lengths", [(1, [8]), (1, [8, 4, 6]), (3, [8, 4, 6]), (3, [5])])
def test_oracle_drafts_are_accepted_and_output_unchanged(right_every: int, lengths: list[int]) -> None:
    model = tiny(2)
    ids, mask = left_padded_batch(model.config.vocab_size, lengths, seed=3)
    n = 17
    plain = generate(model, ids, mask, max_new_tokens=n + 3, eos_token_id=[])
    pads = (mask == 0).sum(1)
    oracle_drafter(model, plain, pads, right_every)
    spec = generate(model, ids, mask, max_new_tokens=n, eos_token_id=[], use_mtp=True,
                    return_dict_in_generate=True)
    assert torch.equal(spec.sequences, plain[:, : ids.shape[1] + n])
    stats = spec.speculative
    if right_every == 1:
        assert stats.acceptance_rate == 1.0
        assert stats.main_forwards == 1 + (n - 1 + 1) // 2   # prefill, then two tokens per forward
    else:
        assert 0.0 < stats.acceptance_rate < 1.0
        assert stats.main_forwards < n


def test_stop_tokens_and_finished_rows() -> None:
    model = tiny(4)
    ids, mask = left_padded_batch(model.config.vocab_size, [6, 6, 4], seed=5)
    free = generate(model, ids, mask, max_new_tokens=12, eos_token_id=[])
    eos = [int(free[0, 8]), int(free[2, 10])]
    plain = generate(model, ids, mask, max_new_tokens=12, eos_token_id=eos)
    spec = generate(model, ids, mask, max_new_tokens=12, eos_token_id=eos, use_mtp=True)
    assert torch.equal(spec, plain)


def test_speculative_sampling_keeps_the_target_distribution() -> None:
    """The second new token passes through accept/reject: its marginal must equal
    Σ_t1 P(t1) P(t2 | t1) of the main model, whatever the (random) drafter proposes."""
    model = tiny(6, vocab_size=24)
    prompt = torch.tensor([[3, 7, 11, 5]])
    v = model.config.vocab_size
    with torch.no_grad():
        p1 = torch.softmax(model(prompt).logits[0, -1].double(), -1)
        second = torch.cat([prompt.expand(v, -1), torch.arange(v)[:, None]], dim=1)
        p2_given = torch.softmax(model(second).logits[:, -1].double(), -1)
    p2 = (p1[:, None] * p2_given).sum(0)
    n = 6000
    out = generate(model, prompt.expand(n, -1), max_new_tokens=2, do_sample=True, top_k=0, eos_token_id=[],
                   use_mtp=True, generator=torch.Generator().manual_seed(0), return_dict_in_generate=True)
    assert 0.0 < out.speculative.acceptance_rate < 1.0, "both the accept and the reject branch must run"
    for probs, column in ((p1, 4), (p2, 5)):
        counts = torch.bincount(out.sequences[:, column], minlength=v).double()
        sigma = (probs * (1 - probs) / n).sqrt()
        z = ((counts / n - probs).abs() / sigma.clamp_min(1e-9)).max()
        assert z < 5, f"token {column - 3}: max z-score {float(z):.1f}"


def test_speculative_requires_an_mtp_module() -> None:
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(DeepseekV3Config.tiny(), mtp=False).eval()
    with pytest.raises(ValueError, match="MTP module"):
        generate(model, torch.tensor([[1, 2, 3]]), max_new_tokens=3, use_mtp=True)


@pytest.mark.parametrize("max_new", [50, 54])   # 10 + 54 = exactly the context of 64 positions
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_speculation_reaches_the_context_limit(max_new: int, cache: str) -> None:
    """Rejected drafts must not use up positions: MTP speculation runs to the context limit and its
    greedy output equals plain greedy (both rows of a left-padded batch, one of them at the limit)."""
    model = tiny(8, max_position_embeddings=64)
    for lengths in ([10], [10, 7]):
        ids, mask = left_padded_batch(model.config.vocab_size, lengths, seed=9)
        plain = generate(model, ids, mask, max_new_tokens=max_new, eos_token_id=[], cache_implementation=cache)
        spec = generate(model, ids, mask, max_new_tokens=max_new, eos_token_id=[], cache_implementation=cache,
                        use_mtp=True, return_dict_in_generate=True)
        assert spec.speculative.acceptance_rate < 1.0   # some drafts were rejected
        assert torch.equal(spec.sequences, plain)
