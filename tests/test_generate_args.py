"""generate() arguments people carry over from transformers, against the transformers 5.23 oracle (fp32,
greedy token for token; seeded sampling draw for draw): min_new_tokens/min_length, num_return_sequences,
no_repeat_ngram_size, stop_strings, output_scores/output_logits; plus the warnings and named errors for
max_length next to max_new_tokens, a padded batch without attention_mask, tiny temperatures and a pad id
outside the vocabulary."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from dsv3 import DeepseekV3ForCausalLM
from dsv3.generation.generate import GenerationConfig, generate
from dsv3.generation.sampling import SamplingParams
from tests.oracle import assert_close, left_padded_batch, make_hf_model, yarn

PAD = 0
VOCAB = 64


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp("genargs")
    hf = make_hf_model(path, seed=11, rope_scaling=yarn(), vocab_size=VOCAB)
    ours = DeepseekV3ForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
    return hf, ours


def hf_generate(hf, ids, mask, **kwargs):
    with torch.no_grad():
        return hf.generate(ids, attention_mask=mask, pad_token_id=PAD, **kwargs)


def free_greedy(ours, ids, mask, n):
    return generate(ours, ids, mask, max_new_tokens=n, eos_token_id=[], pad_token_id=PAD)


def compare_steps(got: tuple[torch.Tensor, ...], ref: tuple[torch.Tensor, ...], what: str) -> None:
    """Per-step [B, V] tensors: same -inf pattern, finite values within fp32 parity."""
    assert len(got) == len(ref), f"{what}: {len(got)} steps, transformers {len(ref)}"
    for i, (g, r) in enumerate(zip(got, ref, strict=True)):
        assert g.dtype == torch.float32 and g.shape == r.shape, f"{what}[{i}]: {g.dtype} {tuple(g.shape)}"
        assert torch.equal(torch.isinf(g), torch.isinf(r)), f"{what}[{i}]: -inf masks differ"
        finite = torch.isfinite(r)
        assert_close(g[finite], r[finite], 1e-4, f"{what}[{i}]: generate scores")


# ----- min_new_tokens / min_length -----------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["min_new_tokens", "min_length"])
def test_min_length_bans_eos_like_transformers(pair, which: str) -> None:
    hf, ours = pair
    ids, mask = left_padded_batch(VOCAB, [7, 4, 6], seed=21)
    t = ids.shape[1]
    free = free_greedy(ours, ids, mask, 12)[:, t:]
    eos = sorted({int(free[0, 1]), int(free[1, 2])})   # stop tokens the rows emit early
    kw = {"min_new_tokens": 6} if which == "min_new_tokens" else {"min_length": t + 6}
    ref = hf_generate(hf, ids, mask, max_new_tokens=12, do_sample=False, eos_token_id=eos, **kw)
    got = generate(ours, ids, mask, max_new_tokens=12, eos_token_id=eos, pad_token_id=PAD, **kw)
    assert torch.equal(got, ref), f"\n{got}\n{ref}"
    early = generate(ours, ids, mask, max_new_tokens=12, eos_token_id=eos, pad_token_id=PAD)
    assert not torch.equal(early, got), "the minimum length changed nothing: the test needs an early stop token"
    assert not torch.isin(got[:, t:t + 6], torch.tensor(eos)).any()


# ----- no_repeat_ngram_size -----------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 2, 3])
def test_no_repeat_ngram_size_matches_transformers(pair, n: int) -> None:
    hf, ours = pair
    ids, mask = left_padded_batch(VOCAB, [8, 5], seed=22)
    ref = hf_generate(hf, ids, mask, max_new_tokens=16, do_sample=False, eos_token_id=[], no_repeat_ngram_size=n)
    got = generate(ours, ids, mask, max_new_tokens=16, eos_token_id=[], pad_token_id=PAD, no_repeat_ngram_size=n)
    assert torch.equal(got, ref), f"\n{got}\n{ref}"
    assert not torch.equal(got, free_greedy(ours, ids, mask, 16)), "no n-gram was banned: the test proves nothing"


# ----- num_return_sequences ----------------------------------------------------------------------------------

def test_num_return_sequences_samples_like_transformers(pair) -> None:
    """Same global RNG state -> the same draws as transformers, rows ordered prompt by prompt."""
    hf, ours = pair
    ids, mask = left_padded_batch(VOCAB, [6, 3], seed=23)
    kw = dict(max_new_tokens=8, do_sample=True, temperature=1.2, top_k=0, eos_token_id=[], num_return_sequences=3)
    torch.manual_seed(123)
    ref = hf_generate(hf, ids, mask, **kw)
    torch.manual_seed(123)
    got = generate(ours, ids, mask, pad_token_id=PAD, **kw)
    assert got.shape == (6, ids.shape[1] + 8)
    assert torch.equal(got, ref), f"\n{got}\n{ref}"
    assert torch.equal(got[:, :ids.shape[1]], ids.repeat_interleave(3, 0))
    assert len({tuple(r) for r in got[:3].tolist()}) > 1, "the copies of a prompt drew the same tokens"


def test_num_return_sequences_with_greedy_is_refused_like_transformers(pair) -> None:
    hf, ours = pair
    ids = torch.tensor([[3, 4, 5]])
    with pytest.raises(ValueError, match="num_return_sequences"):
        hf_generate(hf, ids, None, max_new_tokens=2, do_sample=False, num_return_sequences=2)
    with pytest.raises(ValueError, match="num_return_sequences=2 .*do_sample=True"):
        generate(ours, ids, max_new_tokens=2, do_sample=False, num_return_sequences=2)


# ----- output_scores / output_logits -------------------------------------------------------------------------

@pytest.mark.parametrize("sample", [False, True])
def test_scores_and_logits_match_transformers(pair, sample: bool) -> None:
    hf, ours = pair
    ids, mask = left_padded_batch(VOCAB, [7, 5], seed=24)
    t = ids.shape[1]
    free = free_greedy(ours, ids, mask, 10)[:, t:]
    eos = [int(free[0, 1])]
    kw = dict(max_new_tokens=10, eos_token_id=eos, repetition_penalty=1.3, no_repeat_ngram_size=3,
              min_new_tokens=3, output_scores=True, output_logits=True, return_dict_in_generate=True)
    kw.update(dict(do_sample=True, temperature=0.7, top_k=12, top_p=0.9) if sample else dict(do_sample=False))
    torch.manual_seed(5)
    ref = hf_generate(hf, ids, mask, **kw)
    torch.manual_seed(5)
    got = generate(ours, ids, mask, pad_token_id=PAD, **kw)
    assert torch.equal(got.sequences, ref.sequences), f"\n{got.sequences}\n{ref.sequences}"
    compare_steps(got.logits, ref.logits, "logits")
    compare_steps(got.scores, ref.scores, "scores")
    assert any(not torch.equal(s, lg) for s, lg in zip(got.scores, got.logits, strict=True))
    # Without the flags the fields stay None, as transformers.
    plain = generate(ours, ids, mask, pad_token_id=PAD, max_new_tokens=2, return_dict_in_generate=True)
    assert plain.scores is None and plain.logits is None


def test_scores_without_return_dict_return_the_tensor(pair) -> None:
    _, ours = pair
    out = generate(ours, torch.tensor([[3, 4, 5]]), max_new_tokens=3, eos_token_id=[], output_scores=True)
    assert isinstance(out, torch.Tensor) and out.shape == (1, 6)


# ----- stop_strings ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def text_pair(tmp_path_factory: pytest.TempPathFactory):
    """A tiny model on the real DeepSeek vocabulary, with dsv3's and transformers' tokenizers for it."""
    from transformers import PreTrainedTokenizerFast

    from dsv3.tokenizer import AutoTokenizer, default_tokenizer_dir

    path = tmp_path_factory.mktemp("stop")
    hf = make_hf_model(path, seed=17, vocab_size=129280, num_hidden_layers=2)
    ours = DeepseekV3ForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
    hf_tok = PreTrainedTokenizerFast(tokenizer_file=str(default_tokenizer_dir() / "tokenizer.json"))
    return hf, ours, AutoTokenizer.from_pretrained(), hf_tok


def test_stop_strings_match_transformers(text_pair) -> None:
    """A stop string that starts inside one generated token and ends inside the next one."""
    hf, ours, tok, hf_tok = text_pair
    ids = tok("def fibonacci(n):", return_tensors="pt").input_ids
    t = ids.shape[1]
    free = generate(ours, ids, max_new_tokens=20, eos_token_id=[])
    pieces = [tok.decode([i]) for i in free[0, t:].tolist()]
    k = next(k for k in range(3, 19) if len(pieces[k]) >= 2 and len(pieces[k + 1]) >= 2)
    stop = pieces[k][-1] + pieces[k + 1][:1]   # spans the boundary between new tokens k and k+1
    ref = hf_generate(hf, ids, None, max_new_tokens=20, do_sample=False, eos_token_id=[], stop_strings=[stop],
                      tokenizer=hf_tok)
    got = generate(ours, ids, max_new_tokens=20, eos_token_id=[], stop_strings=[stop], tokenizer=tok)
    assert torch.equal(got, ref), f"stop {stop!r}\n{got}\n{ref}"
    assert got.shape[1] <= t + k + 2 < free.shape[1]
    assert stop in tok.decode(got[0, t:].tolist())


def test_stop_string_checker_agrees_with_transformers_criteria(text_pair) -> None:
    """Overhangs at either end count; a stop string that no longer touches the last token does not."""
    from transformers.generation.stopping_criteria import StopStringCriteria

    from dsv3.generation.generate import StopStringChecker

    _, _, tok, hf_tok = text_pair
    words = ["st", "op", "stop", "opera", "sto", "pper", "las", "topper", "s", "to", "pped", "at", "tion", "x"]
    ids = {w: tok.encode(w, add_special_tokens=False) for w in words}
    words = [w for w in words if len(ids[w]) == 1]   # words that are single tokens
    assert len(words) >= 8
    g = torch.Generator().manual_seed(0)
    for stop in ["stop", "top", "pp"]:
        hf_crit = StopStringCriteria(hf_tok, [stop])
        checker = StopStringChecker([stop], tok)
        rows = torch.tensor([[ids[words[j]][0] for j in torch.randint(len(words), (4,), generator=g).tolist()]
                             for _ in range(64)])
        expected = hf_crit(rows, torch.zeros(64, 1))
        got = checker(rows, torch.ones(64, dtype=torch.bool))
        assert torch.equal(got, expected), f"stop {stop!r}: rows {rows[got != expected].tolist()}"
        assert 0 < int(expected.sum()) < 64


def test_stop_strings_need_a_tokenizer(pair) -> None:
    _, ours = pair
    with pytest.raises(ValueError, match="tokenizer="):
        generate(ours, torch.tensor([[3, 4, 5]]), max_new_tokens=2, stop_strings=["\n"])
    with pytest.raises(ValueError, match="stop_strings"):
        generate(ours, torch.tensor([[3, 4, 5]]), max_new_tokens=2, stop_strings=[""], tokenizer=object())


# ----- invalid values of the new arguments ---------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    (dict(min_new_tokens=-1), "min_new_tokens=-1"),
    (dict(min_length=2.5), "min_length=2.5"),
    (dict(num_return_sequences=0, do_sample=True), "num_return_sequences=0"),
    (dict(no_repeat_ngram_size=-2), "no_repeat_ngram_size=-2"),
    (dict(stop_strings=5), "stop_strings=5"),
    (dict(output_scores="yes"), "output_scores='yes'"),
    (dict(output_logits=1), "output_logits=1"),
    (dict(num_beams=3), "num_beams=3: beam search"),
    (dict(pad_token_id=VOCAB), f"pad_token_id={VOCAB} .*vocab_size={VOCAB}"),
    (dict(pad_token_id=-1), "pad_token_id=-1"),
])
def test_invalid_new_arguments_raise(pair, kwargs: dict, message: str) -> None:
    _, ours = pair
    with pytest.raises(ValueError, match=message):
        generate(ours, torch.tensor([[1, 2, 3]]), **{"max_new_tokens": 2, **kwargs})


# ----- max_length next to max_new_tokens -------------------------------------------------------------------------

def test_max_length_with_max_new_tokens_in_generation_config_warns(pair, caplog: pytest.LogCaptureFixture) -> None:
    """The documentation's second example: generation_config sets max_new_tokens, the call max_length=30."""
    _, ours = pair
    gc = GenerationConfig.from_dict({"max_new_tokens": 3, "do_sample": False, "eos_token_id": []})
    prompt = torch.tensor([[5, 6, 7]])
    with caplog.at_level(logging.WARNING, logger="dsv3.generation.generate"):
        out = generate(ours, prompt, generation_config=gc, max_length=30)
    assert out.shape[1] == 3 + 3   # max_new_tokens takes precedence, as in transformers
    assert "`max_new_tokens` will take precedence" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dsv3.generation.generate"):
        out = generate(ours, prompt, generation_config=gc)
        assert generate(ours, prompt, max_length=8, eos_token_id=[]).shape[1] == 8
    assert out.shape[1] == 6 and "precedence" not in caplog.text


# ----- left-padded batch without attention_mask ----------------------------------------------------------------

def test_padded_batch_without_mask_infers_it_like_transformers(pair, caplog: pytest.LogCaptureFixture) -> None:
    hf, ours = pair
    ids, mask = left_padded_batch(VOCAB, [8, 3, 5], seed=25)
    ref = hf_generate(hf, ids, None, max_new_tokens=8, do_sample=False, eos_token_id=[])
    with_mask = generate(ours, ids, mask, max_new_tokens=8, eos_token_id=[], pad_token_id=PAD)
    assert torch.equal(ref, with_mask)   # transformers infers the mask from pad_token_id
    with caplog.at_level(logging.INFO, logger="dsv3.generation.generate"):
        got = generate(ours, ids, max_new_tokens=8, eos_token_id=[], pad_token_id=PAD)
    assert torch.equal(got, ref), f"\n{got}\n{ref}"
    assert "attention_mask inferred from pad_token_id=0" in caplog.text


def test_padded_batch_without_mask_or_pad_id_warns(pair, caplog: pytest.LogCaptureFixture) -> None:
    _, ours = pair
    ids, _ = left_padded_batch(VOCAB, [6, 3], seed=26)
    with caplog.at_level(logging.WARNING, logger="dsv3.generation.generate"):
        generate(ours, ids, max_new_tokens=2, eos_token_id=[7])   # no pad id: it falls back to eos
    assert "attention mask and the pad token id were not set" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dsv3.generation.generate"):
        generate(ours, ids, max_new_tokens=2, eos_token_id=[PAD], pad_token_id=PAD)
    assert "cannot be inferred from input because pad token is same as eos token" in caplog.text


# ----- tiny temperatures ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("temperature", [1e-38, 1e-30, 1e-6])
def test_tiny_temperature_decodes_greedily(pair, temperature: float, caplog: pytest.LogCaptureFixture) -> None:
    _, ours = pair
    ids, mask = left_padded_batch(VOCAB, [6, 4], seed=27)
    greedy = free_greedy(ours, ids, mask, 10)
    with caplog.at_level(logging.WARNING, logger="dsv3.generation.generate"):
        got = generate(ours, ids, mask, max_new_tokens=10, eos_token_id=[], pad_token_id=PAD, do_sample=True,
                       temperature=temperature, top_k=0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(got, greedy)
    assert f"temperature={temperature:g} is below" in caplog.text
    with pytest.raises(ValueError, match=f"temperature={temperature!r} .*do_sample=False"):
        SamplingParams(do_sample=True, temperature=temperature)


def test_smallest_accepted_temperature_still_samples_finite(pair) -> None:
    _, ours = pair
    ids = torch.tensor([[3, 4, 5, 6]])
    out = generate(ours, ids, max_new_tokens=4, eos_token_id=[], do_sample=True, temperature=1e-5,
                   output_scores=True, return_dict_in_generate=True, generator=torch.Generator().manual_seed(0))
    assert not any(torch.isnan(s).any() for s in out.scores)
    assert all(torch.isfinite(s.max()) for s in out.scores)
    assert torch.equal(out.sequences, generate(ours, ids, max_new_tokens=4, eos_token_id=[]))


def test_generation_config_file_keys_are_read(pair, tmp_path: Path) -> None:
    """min_new_tokens / no_repeat_ngram_size from generation_config.json act as the arguments would."""
    _, ours = pair
    ids, mask = left_padded_batch(VOCAB, [6, 4], seed=28)
    gc = GenerationConfig.from_dict({"no_repeat_ngram_size": 2, "max_new_tokens": 12, "eos_token_id": [],
                                     "pad_token_id": PAD})
    assert torch.equal(generate(ours, ids, mask, generation_config=gc),
                       generate(ours, ids, mask, max_new_tokens=12, eos_token_id=[], pad_token_id=PAD,
                                no_repeat_ngram_size=2))


def test_generation_config_takes_the_new_fields(pair) -> None:
    _, ours = pair
    gc = GenerationConfig(max_new_tokens=4, min_new_tokens=2, no_repeat_ngram_size=2, output_scores=True,
                          return_dict_in_generate=True, eos_token_id=[])
    assert GenerationConfig.from_dict(gc.to_dict()) == gc
    out = generate(ours, torch.tensor([[3, 4, 5]]), generation_config=gc)
    assert out.sequences.shape == (1, 7) and len(out.scores) == 4
