"""dsv3 against the transformers 5.23 oracle: logits, loss, hidden states and gradients in fp32.

Each case is a tiny random model built and saved by transformers, loaded through dsv3's real
loader, and run on a left-padded batch (positions counted over real tokens) and an unpadded one.
"""

from __future__ import annotations

import pytest
import torch

from dsv3 import DeepseekV3ForCausalLM, DeepseekV3Model
from tests.oracle import assert_close, left_padded_batch, make_hf_model, positions_from_mask, scaled_rope, yarn

LOGITS_ATOL = 1e-4
LOSS_ATOL = 1e-5

CASES = {
    "base-yarn": dict(rope_scaling=yarn()),
    "no-q-lora-default-rope": dict(q_lora_rank=None),
    "yarn-mscale-all-dim-0.5": dict(rope_scaling=yarn(factor=8.0, mscale=1.0, mscale_all_dim=0.5)),
    "yarn-mscale-0.707-both": dict(rope_scaling=yarn(factor=16.0, mscale=0.707, mscale_all_dim=0.707)),
    "yarn-no-mscale-keys": dict(rope_scaling=yarn(factor=4.0, mscale=None, mscale_all_dim=None)),
    "rope-not-interleaved": dict(rope_interleave=False, rope_scaling=yarn()),
    "all-moe": dict(first_k_dense_replace=0),
    "all-dense": dict(first_k_dense_replace=3),
    "one-group": dict(n_group=1, topk_group=1),
    "8-groups-keep-3": dict(n_group=8, topk_group=3, num_experts_per_tok=5),
    "no-topk-norm": dict(norm_topk_prob=False, routed_scaling_factor=1.0),
    "2-shared-experts": dict(n_shared_experts=2),
    "attention-bias": dict(attention_bias=True, q_lora_rank=None),
    "attention-bias-q-lora": dict(attention_bias=True),
    "tied-embeddings": dict(tie_word_embeddings=True),
    # Small max_position_embeddings put the 11-token padded batch past it: linear needs the stretched context
    # limit (2 × 8), dynamic NTK recomputes its base from 11 positions. For dynamic the 9-token batch that
    # follows stays within 10 positions, where transformers resets its (stateful) base to plain RoPE; past
    # 10 it would keep the base of the 11-token call, where dsv3 uses each call's own (tests/test_rope_scaling).
    "rope-linear-past-max-pos": dict(rope_scaling=scaled_rope("linear", 2.0), max_position_embeddings=8),
    "rope-dynamic-past-max-pos": dict(rope_scaling=scaled_rope("dynamic", 8.0), max_position_embeddings=10),
    "rope-linear-4": dict(rope_scaling=scaled_rope("linear", 4.0)),
}


def _load_pair(name: str, overrides: dict, tmp_path_factory: pytest.TempPathFactory, seed: int = 0):
    path = tmp_path_factory.mktemp(name)
    hf = make_hf_model(path, seed=seed, **overrides)
    ours = DeepseekV3ForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
    return hf, ours, path


@pytest.mark.parametrize("name", list(CASES))
def test_logits_and_loss_match_transformers(name: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    hf, ours, _ = _load_pair(name, CASES[name], tmp_path_factory)
    vocab = hf.config.vocab_size
    ids, mask = left_padded_batch(vocab, [11, 7, 3], seed=1)
    pos = positions_from_mask(mask)
    labels = ids.masked_fill(mask == 0, -100)   # the first real token counts: predicted from the last padding
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, position_ids=pos, labels=labels)
        got = ours(input_ids=ids, attention_mask=mask, position_ids=pos, labels=labels)
    valid = mask.bool()
    assert_close(got.logits[valid], ref.logits[valid], LOGITS_ATOL, f"{name}: padded logits")
    assert_close(got.loss, ref.loss, LOSS_ATOL, f"{name}: loss")

    plain, _ = left_padded_batch(vocab, [9, 9], seed=2)
    with torch.no_grad():
        ref = hf(input_ids=plain).logits
        for path in ("naive", "absorbed"):
            assert_close(ours(input_ids=plain, mla_path=path).logits, ref, LOGITS_ATOL, f"{name}: {path}")


def test_right_padding_and_hidden_states(tmp_path_factory: pytest.TempPathFactory) -> None:
    hf, ours, path = _load_pair("hidden", CASES["base-yarn"], tmp_path_factory, seed=3)
    ids, mask = left_padded_batch(hf.config.vocab_size, [8, 5], seed=4)
    ids, mask = ids.flip(1), mask.flip(1)   # right padding
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        got = ours(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    valid = mask.bool()
    assert_close(got.logits[valid], ref.logits[valid], LOGITS_ATOL, "right-padded logits")
    assert len(got.hidden_states) == len(ref.hidden_states)
    for i, (a, b) in enumerate(zip(got.hidden_states, ref.hidden_states)):
        assert_close(a[valid], b[valid], LOGITS_ATOL, f"hidden state {i}")
    base = DeepseekV3Model.from_pretrained(path, torch_dtype="float32")
    with torch.no_grad():
        assert_close(base(ids, attention_mask=mask).last_hidden_state[valid],
                     ref.hidden_states[-1][valid], LOGITS_ATOL, "DeepseekV3Model")


def test_logits_to_keep_and_tuple_output(tmp_path_factory: pytest.TempPathFactory) -> None:
    hf, ours, _ = _load_pair("keep", CASES["base-yarn"], tmp_path_factory, seed=5)
    ids, _ = left_padded_batch(hf.config.vocab_size, [6, 6], seed=6)
    with torch.no_grad():
        ref = hf(input_ids=ids, logits_to_keep=2).logits
        got = ours(input_ids=ids, logits_to_keep=2).logits
        assert_close(got, ref, LOGITS_ATOL, "logits_to_keep=2")
        as_tuple = ours(input_ids=ids, return_dict=False, use_cache=False)
    assert isinstance(as_tuple, tuple)
    assert_close(as_tuple[0], hf(input_ids=ids).logits, LOGITS_ATOL, "return_dict=False")


def test_gradients_match_transformers(tmp_path_factory: pytest.TempPathFactory) -> None:
    hf, ours, _ = _load_pair("grad", CASES["base-yarn"], tmp_path_factory, seed=7)
    hf.train()
    ours.train()
    ids, mask = left_padded_batch(hf.config.vocab_size, [10, 6], seed=8)
    pos = positions_from_mask(mask)
    labels = ids.masked_fill((mask == 0) | (pos == 0), -100)
    hf(input_ids=ids, attention_mask=mask, position_ids=pos, labels=labels).loss.backward()
    ours(input_ids=ids, attention_mask=mask, position_ids=pos, labels=labels).loss.backward()
    ref_grads = {n: p.grad for n, p in hf.named_parameters() if p.grad is not None}
    checked = 0
    for name, p in ours.named_parameters():
        if name not in ref_grads:
            assert p.grad is None or float(p.grad.abs().max()) == 0.0, f"{name} has a gradient HF lacks"
            continue
        assert p.grad is not None, f"{name}: no gradient"
        scale = max(1.0, float(ref_grads[name].abs().max()))
        assert_close(p.grad, ref_grads[name], 1e-4 * scale, f"grad {name}")
        checked += 1
    assert checked >= 25
    for layer in ours.model.layers[1:]:
        assert not layer.mlp.gate.e_score_correction_bias.requires_grad
