"""Sampling and streaming against transformers as the oracle, plus statistical tests of the sampler.

transformers is imported here only, as the reference: its LogitsProcessorList for processed logits,
torch.multinomial (what its `_sample` calls) for seeded draws, and its TextStreamer for streamed pieces.
"""

from __future__ import annotations

import io
import math
import queue
import threading

import pytest
import torch
from transformers import (
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers import TextStreamer as HFTextStreamer

from dsv3.generation.sampling import (
    SamplingParams,
    apply_repetition_penalty,
    exponential_noise,
    process_logits,
    sampling_probs,
    seen_mask,
    select_next_token,
    update_seen_mask,
)
from dsv3.generation.streamer import TextIteratorStreamer, TextStreamer

# ----------------------------------------------------------------------------------------------------------
# helpers


def hf_processors(params: SamplingParams) -> LogitsProcessorList:
    """The list transformers' `_get_logits_processor` builds for these parameters."""
    procs = LogitsProcessorList()
    if params.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(float(params.repetition_penalty)))
    if params.do_sample:
        if params.temperature != 1.0:
            procs.append(TemperatureLogitsWarper(float(params.temperature)))
        if params.top_k:
            procs.append(TopKLogitsWarper(top_k=params.top_k))
        if params.top_p is not None and params.top_p < 1.0:
            procs.append(TopPLogitsWarper(top_p=params.top_p))
        if params.min_p is not None:
            procs.append(MinPLogitsWarper(min_p=params.min_p))
    return procs


def hf_process(logits: torch.Tensor, ids: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    # transformers' _sample upcasts the last-position logits to fp32 before the processors.
    return hf_processors(params)(ids, logits.float().clone())


def assert_same_logits(ours: torch.Tensor, ref: torch.Tensor) -> None:
    """Exact match of the -inf masks and of the finite values; reports where they differ."""
    ours_inf, ref_inf = torch.isinf(ours), torch.isinf(ref)
    mask_diff = (ours_inf != ref_inf).sum().item()
    finite = ~ref_inf
    val_diff = (ours[finite] - ref[finite]).abs()
    max_diff = val_diff.max().item() if val_diff.numel() else 0.0
    assert ours.dtype == torch.float32
    assert mask_diff == 0 and torch.equal(ours, ref), (
        f"-inf mask differs at {mask_diff} entries; finite values max |diff| {max_diff:.3e}, "
        f"mean {val_diff.mean().item() if val_diff.numel() else 0.0:.3e}"
    )


def tied_logits(b: int, v: int, seed: int) -> torch.Tensor:
    """Logits on a coarse grid, so that many values tie (also at the top-k / top-p boundary)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-6, 7, (b, v), generator=g).float() / 2


def random_logits(b: int, v: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, v, generator=g) * 3


PARAMS = [
    SamplingParams(),
    SamplingParams(repetition_penalty=1.3),
    SamplingParams(do_sample=True),
    SamplingParams(do_sample=True, temperature=0.7),
    SamplingParams(do_sample=True, temperature=1.6, top_k=5),
    SamplingParams(do_sample=True, top_k=1),
    SamplingParams(do_sample=True, top_k=500),  # larger than the vocabulary
    SamplingParams(do_sample=True, top_p=0.9),
    SamplingParams(do_sample=True, top_p=0.05),
    SamplingParams(do_sample=True, temperature=0.6, top_p=0.95),  # DeepSeek-V3's generation_config
    SamplingParams(do_sample=True, temperature=0.8, top_k=7, top_p=0.8, repetition_penalty=1.2),
    SamplingParams(do_sample=True, min_p=0.1),
    SamplingParams(do_sample=True, temperature=0.9, top_k=10, top_p=0.9, min_p=0.05, repetition_penalty=0.8),
]


# ----------------------------------------------------------------------------------------------------------
# processed logits == transformers


@pytest.mark.parametrize("params", PARAMS, ids=repr)
@pytest.mark.parametrize("make_logits", [random_logits, tied_logits], ids=["random", "ties"])
def test_process_logits_matches_transformers(params: SamplingParams, make_logits) -> None:
    b, v, t = 6, 64, 9
    logits = make_logits(b, v, seed=0)
    ids = torch.randint(0, v, (b, t), generator=torch.Generator().manual_seed(1))
    before = logits.clone()
    ref = hf_process(logits, ids, params)
    assert_same_logits(process_logits(logits, params, seen=ids), ref)
    assert_same_logits(process_logits(logits, params, seen=seen_mask(ids, v)), ref)
    assert torch.equal(logits, before), "process_logits modified its input"


def test_process_logits_upcasts_bf16() -> None:
    params = SamplingParams(do_sample=True, temperature=0.7, top_k=9, top_p=0.9, repetition_penalty=1.1)
    logits = random_logits(4, 80, seed=3).bfloat16()
    ids = torch.randint(0, 80, (4, 5), generator=torch.Generator().manual_seed(2))
    assert_same_logits(process_logits(logits, params, seen=ids), hf_process(logits, ids, params))


def test_top_p_keeps_at_least_the_best_token() -> None:
    logits = torch.tensor([[5.0, 1.0, 0.0, -1.0], [0.0, 0.0, 0.0, 0.0]])
    params = SamplingParams(do_sample=True, top_p=1e-6)
    out = process_logits(logits, params)
    assert_same_logits(out, hf_process(logits, torch.zeros(2, 0, dtype=torch.long), params))
    assert torch.isfinite(out).sum(-1).tolist() == [1, 1]


def test_repetition_penalty_ids_and_mask_paths() -> None:
    b, v = 3, 40
    logits = random_logits(b, v, seed=5)
    # Ids beyond the lm_head (embedding padding) are ignored, as transformers clamps them away.
    ids = torch.tensor([[1, 2, 2, 45], [0, 39, 39, 39], [7, 8, 9, 40]])
    ref = RepetitionPenaltyLogitsProcessor(1.5)(ids, logits.clone())
    assert torch.equal(apply_repetition_penalty(logits, ids, 1.5), ref)
    assert torch.equal(apply_repetition_penalty(logits, seen_mask(ids, v), 1.5), ref)
    # Padding sentinels and masked-out positions are not marked.
    padded = torch.tensor([[-1, -1, 3]])
    assert seen_mask(padded, 5).tolist() == [[False, False, False, True, False]]
    attn = torch.tensor([[0, 1, 1]])
    assert seen_mask(torch.tensor([[4, 1, 2]]), 5, attn).tolist() == [[False, True, True, False, False]]


def test_incremental_seen_mask_equals_full_history() -> None:
    b, v, t0, steps = 4, 30, 6, 10
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, v, (b, t0), generator=g)
    seen = seen_mask(ids, v)
    for _ in range(steps):
        nxt = torch.randint(0, v, (b,), generator=g)
        assert update_seen_mask(seen, nxt) is seen
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        assert torch.equal(seen, seen_mask(ids, v))


def test_repetition_penalty_requires_seen() -> None:
    with pytest.raises(ValueError, match="repetition_penalty=1.2 needs the seen tokens"):
        process_logits(torch.zeros(1, 4), SamplingParams(repetition_penalty=1.2))


# ----------------------------------------------------------------------------------------------------------
# greedy and seeded sampling


def test_greedy_is_argmax() -> None:
    logits = random_logits(16, 100, seed=7)
    # Warpers are ignored without do_sample, as in transformers.
    params = SamplingParams(temperature=0.0, top_k=3, top_p=0.5)
    assert torch.equal(select_next_token(logits, params), logits.argmax(-1))
    penalised = SamplingParams(repetition_penalty=3.0)
    ids = logits.argmax(-1, keepdim=True)  # penalise the current favourite
    expected = hf_process(logits, ids, penalised).argmax(-1)
    assert torch.equal(select_next_token(logits, penalised, seen=ids), expected)
    assert not torch.equal(expected, logits.argmax(-1))


@pytest.mark.parametrize("params", [p for p in PARAMS if p.do_sample], ids=repr)
def test_sampling_equals_torch_multinomial(params: SamplingParams) -> None:
    """Same generator state → the same tokens transformers' _sample draws with torch.multinomial."""
    logits, ids = random_logits(256, 64, seed=11), torch.randint(0, 64, (256, 5))
    probs = torch.softmax(hf_process(logits, ids, params), dim=-1)
    expected = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(42))[:, 0]
    got = select_next_token(logits, params, torch.Generator().manual_seed(42), seen=ids)
    assert got.dtype == torch.long and got.shape == (256,)
    assert torch.equal(got, expected)
    torch.manual_seed(3)
    expected = torch.multinomial(probs, 1)[:, 0]
    torch.manual_seed(3)
    assert torch.equal(select_next_token(logits, params, seen=ids), expected)


def test_seeded_reproducibility() -> None:
    logits = torch.zeros(64, 1000)
    params = SamplingParams(do_sample=True, temperature=1.3, top_p=0.99)
    a = select_next_token(logits, params, torch.Generator().manual_seed(1))
    b = select_next_token(logits, params, torch.Generator().manual_seed(1))
    c = select_next_token(logits, params, torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    g = torch.Generator().manual_seed(1)
    first, second = select_next_token(logits, params, g), select_next_token(logits, params, g)
    assert torch.equal(first, a) and not torch.equal(first, second)


def test_zero_noise_never_picks_a_filtered_token() -> None:
    logits = torch.tensor([[0.0, 1.0, -float("inf"), 2.0]])
    noise = torch.zeros(1, 4)  # all draws tied at zero: 0/0 must not win
    tok = select_next_token(logits, SamplingParams(do_sample=True), noise=noise)
    assert tok.item() != 2


def test_compiled_fullgraph_equals_eager() -> None:
    params = SamplingParams(do_sample=True, temperature=0.7, top_k=20, top_p=0.9, repetition_penalty=1.3)
    logits = random_logits(4, 128, seed=2)
    seen = seen_mask(torch.randint(0, 128, (4, 7)), 128)
    noise = exponential_noise(logits, torch.Generator().manual_seed(0))
    compiled = torch.compile(select_next_token, fullgraph=True, backend="aot_eager")
    eager = select_next_token(logits, params, seen=seen, noise=noise)
    assert torch.equal(compiled(logits, params, seen=seen, noise=noise), eager)
    greedy = SamplingParams(repetition_penalty=1.3)
    assert torch.equal(compiled(logits, greedy, seen=seen), select_next_token(logits, greedy, seen=seen))


# ----------------------------------------------------------------------------------------------------------
# statistics: empirical frequencies vs the processed distribution

N_DRAWS = 20_000
STAT_LOGITS = torch.tensor([2.0, 1.5, 1.2, 1.0, 0.7, 0.5, 0.1, 0.0, -0.4, -1.0, -2.0, -3.0])


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(do_sample=True),
        SamplingParams(do_sample=True, temperature=0.5),
        SamplingParams(do_sample=True, temperature=2.0),
        SamplingParams(do_sample=True, top_k=4),
        SamplingParams(do_sample=True, top_p=0.7),
        SamplingParams(do_sample=True, min_p=0.2),
        SamplingParams(do_sample=True, temperature=1.5, top_k=8, top_p=0.8),
    ],
    ids=repr,
)
def test_empirical_frequencies_match_processed_distribution(params: SamplingParams) -> None:
    v = STAT_LOGITS.numel()
    logits = STAT_LOGITS.expand(N_DRAWS, v)
    # Expected distribution from the oracle; our draws as one batch of N_DRAWS rows.
    no_history = torch.zeros(1, 0, dtype=torch.long)
    expected = torch.softmax(hf_process(STAT_LOGITS[None], no_history, params), dim=-1)[0]
    tokens = select_next_token(logits, params, torch.Generator().manual_seed(1234))
    freq = torch.bincount(tokens, minlength=v).double() / N_DRAWS
    p = expected.double()
    # 5 sigma of a binomial proportion per token, plus 1/N for rounding of tiny probabilities.
    tol = 5 * torch.sqrt(p * (1 - p) / N_DRAWS) + 1 / N_DRAWS
    err = (freq - p).abs()
    assert bool((err <= tol).all()), f"max |freq - p| {err.max():.4f} (tolerance {tol[err.argmax()]:.4f})"
    assert bool((freq[p == 0] == 0).all()), "a filtered-out token was sampled"
    # Chi-square over the support: mean df, sd sqrt(2 df); 6 sd is far beyond any seed's luck.
    support = p > 0
    df = int(support.sum()) - 1
    if df > 0:
        chi2 = (((freq - p)[support] ** 2) / p[support]).sum() * N_DRAWS
        assert chi2 < df + 6 * math.sqrt(2 * df), f"chi2 {chi2:.1f} with {df} degrees of freedom"


def test_filtered_tokens_never_sampled() -> None:
    logits = random_logits(1, 200, seed=9).expand(10_000, 200)
    for params in (SamplingParams(do_sample=True, top_k=5), SamplingParams(do_sample=True, top_p=0.6)):
        allowed = torch.isfinite(process_logits(logits[:1], params))[0]
        tokens = select_next_token(logits, params, torch.Generator().manual_seed(0))
        assert bool(allowed[tokens].all())
        assert sampling_probs(logits[:1], params)[0][~allowed].sum() == 0


# ----------------------------------------------------------------------------------------------------------
# parameters


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": -0.5}, "temperature=-0.5"),
        ({"temperature": -0.5, "do_sample": True}, "temperature=-0.5"),
        ({"temperature": 0.0, "do_sample": True}, "do_sample=False"),
        ({"temperature": float("nan"), "do_sample": True}, "temperature=nan"),
        ({"temperature": float("inf")}, "temperature=inf"),
        ({"top_p": 0}, r"top_p=0 .*\(0, 1\]"),
        ({"top_p": 1.5}, r"top_p=1.5 .*\(0, 1\]"),
        ({"top_k": -1}, "top_k=-1 .*non-negative integer"),
        ({"top_k": 2.5}, "top_k=2.5"),
        ({"min_p": 1.5}, "min_p=1.5"),
        ({"repetition_penalty": 0}, "repetition_penalty=0 .*> 0"),
        ({"repetition_penalty": -1.0}, "repetition_penalty=-1.0"),
        ({"do_sample": 1}, "do_sample=1"),
    ],
)
def test_validation_names_the_value(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_valid_edge_values() -> None:
    SamplingParams(temperature=0.0)  # greedy: temperature is ignored
    SamplingParams(do_sample=True, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=0.5)
    p = SamplingParams(do_sample=True, top_k=0, top_p=1.0)
    logits = random_logits(2, 10, seed=0)
    assert torch.equal(process_logits(logits, p), logits)


def test_from_generation_config() -> None:
    deepseek = {"bos_token_id": 0, "eos_token_id": 1, "do_sample": True, "temperature": 0.6, "top_p": 0.95}
    p = SamplingParams.from_generation_config(deepseek)
    # Keys missing from the file take transformers' generate() defaults, top_k=50 included.
    assert p == SamplingParams(do_sample=True, temperature=0.6, top_p=0.95, top_k=50)
    q = SamplingParams.from_generation_config(deepseek, temperature=0.3, top_k=None, top_p=None)
    assert q == SamplingParams(do_sample=True, temperature=0.3, top_p=0.95, top_k=50)
    r = SamplingParams.from_generation_config(deepseek, do_sample=False, top_k=0, repetition_penalty=1.1)
    assert (r.do_sample, r.top_k, r.repetition_penalty) == (False, 0, 1.1)
    assert SamplingParams.from_generation_config({"temperature": None}) == SamplingParams(top_k=50, top_p=1.0)
    assert SamplingParams.from_generation_config(None, min_p=0.1).min_p == 0.1
    with pytest.raises(ValueError, match="unknown sampling parameter"):
        SamplingParams.from_generation_config(deepseek, temprature=0.5)
    with pytest.raises(ValueError, match="top_p=2"):
        SamplingParams.from_generation_config({"top_p": 2})


# ----------------------------------------------------------------------------------------------------------
# streaming

# A byte-level fake: each id is a byte string, so characters can be split across tokens.
PIECES = [b"Hello", b" wor", b"ld", b",", b" \xe4\xbd", b"\xa0", b"\xe5\xa5\xbd", b"\xe4\xb8\x96", b"!",
          b" \xf0\x9f", b"\x91", b"\x8d", b" caf", b"\xc3", b"\xa9", b"\n", b"next", b" line", b" \xe6",
          b"\x97\xa5", b"\xe6\x9c\xac", b"\xe8\xaa\x9e", b" end"]  # fmt: skip


class ByteTokenizer:
    def decode(self, ids: list[int], **kwargs) -> str:
        text = b"".join(PIECES[i] for i in ids).decode("utf-8", errors="replace")
        return text.upper() if kwargs.get("upper") else text


def stream_pieces(streamer_cls, tokenizer, ids: list[int], **kw) -> list[str]:
    pieces: list[str] = []

    class Capture(streamer_cls):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            pieces.append(text)

    s = Capture(tokenizer, **kw)
    s.put(torch.tensor([[0]]))  # the prompt
    for i in ids:
        s.put(torch.tensor([i]))
    s.end()
    return pieces


def test_streamer_pieces_match_transformers() -> None:
    ids = list(range(1, len(PIECES)))
    tok = ByteTokenizer()
    ours = stream_pieces(TextStreamer, tok, ids, skip_prompt=True)
    assert ours == stream_pieces(HFTextStreamer, tok, ids, skip_prompt=True)
    assert "".join(ours) == tok.decode(ids)
    assert not any("\ufffd" in p for p in ours), f"partial UTF-8 was emitted: {ours}"


def test_text_streamer_prints_full_decode() -> None:
    tok, out = ByteTokenizer(), io.StringIO()
    s = TextStreamer(tok, file=out, upper=True)
    s.put(torch.tensor([[0, 1]]))
    for i in range(2, len(PIECES)):
        s.put(torch.tensor([i]))
    s.end()
    assert out.getvalue() == tok.decode(list(range(len(PIECES))), upper=True) + "\n"


def test_streamer_rejects_batches() -> None:
    s = TextStreamer(ByteTokenizer(), file=io.StringIO())
    with pytest.raises(ValueError, match=r"batch size 1 only.*\(2, 3\)"):
        s.put(torch.zeros(2, 3, dtype=torch.long))


def _byte_level_bpe():
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(
        ["the quick brown fox jumps over the lazy dog. 你好世界 hello world"] * 20, trainer
    )
    return tok


def test_iterator_streamer_with_byte_level_bpe() -> None:
    tok = _byte_level_bpe()
    text = "the lazy fox says 你好, 世界! 👍🏽 café\nnew line ünïcödé 日本語テキスト end"
    ids = tok.encode(text).ids
    assert any("\ufffd" in tok.decode(ids[:i]) for i in range(len(ids))), "no split character to test"
    streamer = TextIteratorStreamer(tok, skip_prompt=True, timeout=10.0)

    def produce() -> None:
        streamer.put(torch.tensor([ids[:3]]))  # prompt, skipped
        for i in ids:
            streamer.put(torch.tensor([i]))
        streamer.end()

    worker = threading.Thread(target=produce)
    worker.start()
    pieces = list(streamer)
    worker.join()
    assert "".join(pieces) == text == tok.decode(ids)
    assert not any("\ufffd" in p for p in pieces)
    assert len(pieces) > 5  # it did stream


def test_iterator_streamer_timeout_and_abort() -> None:
    s = TextIteratorStreamer(ByteTokenizer(), timeout=0.01)
    with pytest.raises(queue.Empty):
        next(s)
    s.put([0, 1])  # "Hello wor": only "Hello " is final
    s.abort(RuntimeError("generation failed"))
    assert next(s) == "Hello "
    with pytest.raises(RuntimeError, match="generation failed"):
        next(s)
