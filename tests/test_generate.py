"""generate(): greedy equals transformers token for token; compiled equals eager; sampling is seeded
and follows the model's distribution; bad arguments fail clearly; the documentation's script runs."""

from __future__ import annotations

import io
import logging
import math
from pathlib import Path

import pytest
import torch

from dsv3 import DeepseekV3ForCausalLM
from dsv3.generation.generate import DecodeStep, GenerationConfig, generate, make_cache
from dsv3.generation.streamer import TextStreamer
from tests.oracle import assert_close, left_padded_batch, make_hf_model, yarn

PAD = 0


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp("gen")
    hf = make_hf_model(path, seed=11, rope_scaling=yarn(), vocab_size=64)
    hf.generation_config.pad_token_id = PAD
    ours = DeepseekV3ForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
    return hf, ours


def hf_greedy(hf, ids, mask, n, eos, cache="dynamic"):
    kwargs = dict(attention_mask=mask, max_new_tokens=n, do_sample=False, eos_token_id=eos, pad_token_id=PAD)
    if cache == "static":
        kwargs["cache_implementation"] = "static"
    with torch.no_grad():
        return hf.generate(ids, **kwargs)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_greedy_matches_transformers_with_left_padding_and_stop_tokens(pair, cache: str) -> None:
    hf, ours = pair
    ids, mask = left_padded_batch(64, [9, 5, 7], seed=12)
    free = hf_greedy(hf, ids, mask, 12, eos=[], cache=cache)
    assert torch.equal(generate(ours, ids, mask, max_new_tokens=12, eos_token_id=[], pad_token_id=PAD,
                                cache_implementation=cache), free)
    # Stop tokens that really occur: one row's 3rd new token and another row's 6th.
    new = free[:, ids.shape[1]:]
    eos = sorted({int(new[0, 2]), int(new[1, 5])})
    ref = hf_greedy(hf, ids, mask, 12, eos=eos, cache=cache)
    got = generate(ours, ids, mask, max_new_tokens=12, eos_token_id=eos, pad_token_id=PAD,
                   cache_implementation=cache)
    assert torch.equal(got, ref), f"\n{got}\n{ref}"


def test_generation_stops_when_all_rows_finish(pair) -> None:
    _, ours = pair
    ids, mask = left_padded_batch(64, [6, 6], seed=13)
    free = generate(ours, ids, mask, max_new_tokens=10, eos_token_id=[])
    first = int(free[0, 6])
    second = int(free[1, 6])
    out = generate(ours, ids, mask, max_new_tokens=10, eos_token_id=[first, second])
    assert out.shape[1] == 7   # both rows emitted a stop token at the first step


@pytest.mark.slow
def test_compiled_decode_equals_eager(pair, caplog: pytest.LogCaptureFixture) -> None:
    """fp32 compiles with the gather dispatch (grouped_mm's fake kernel is bf16-only); every decode step must
    have run in the compiled graph, not in the eager fallback."""
    _, ours = pair
    ids, mask = left_padded_batch(64, [8, 4], seed=14)
    eager = generate(ours, ids, mask, max_new_tokens=8, cache_implementation="static", eos_token_id=[])
    with caplog.at_level(logging.WARNING, logger="dsv3.generation.generate"):
        compiled = generate(ours, ids, mask, max_new_tokens=8, cache_implementation="static", eos_token_id=[],
                            compile=True, return_dict_in_generate=True)
    assert "failed to compile" not in caplog.text
    assert compiled.compiled_steps == 7   # 8 new tokens: prefill + 7 compiled decode steps
    assert torch.equal(compiled.sequences, eager)


def test_decode_step_falls_back_only_on_named_compile_failures(pair, caplog: pytest.LogCaptureFixture) -> None:
    _, ours = pair
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])

    def run(step: DecodeStep) -> torch.Tensor:
        cache = make_cache(ours, "dynamic", 2, 8)
        ours(ids, past_key_values=cache, use_cache=True)
        return step(ids[:, -1:], torch.full((2, 1), 3), cache, None)

    reference = run(DecodeStep(ours))

    def broken(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise RuntimeError("a real error inside the step")

    step = DecodeStep(ours)
    step._fn, step.compiled = broken, True
    with pytest.raises(RuntimeError, match="a real error"):
        run(step)

    def unsupported(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise torch._dynamo.exc.Unsupported("graph break under fullgraph")

    step = DecodeStep(ours)
    step._fn, step.compiled = unsupported, True
    with caplog.at_level(logging.WARNING, logger="dsv3.generation.generate"):
        logits = run(step)
    assert "failed to compile (Unsupported: graph break" in caplog.text
    assert not step.compiled and step.compiled_calls == 0
    assert torch.equal(logits, reference)


@pytest.mark.slow
def test_decode_step_falls_back_when_dynamo_runs_out_of_recompiles(pair, caplog: pytest.LogCaptureFixture) -> None:
    """A real compile that exhausts dynamo's recompile limit (a long-lived process decoding new shapes) is a
    named compile failure: one warning, eager from then on, the same logits — not a crash."""
    _, ours = pair
    torch._dynamo.reset()
    results = []
    with torch._dynamo.config.patch(recompile_limit=1), caplog.at_level(logging.WARNING,
                                                                           logger="dsv3.generation.generate"):
        step = DecodeStep(ours, compile=True)
        for batch in (1, 3):          # a new batch size forces a recompile, over the limit of 1
            ids = torch.arange(5, 5 + 3 * batch).view(batch, 3)
            cache = make_cache(ours, "dynamic", batch, 8)
            ours(ids, past_key_values=cache, use_cache=True)
            got = step(ids[:, -1:], torch.full((batch, 1), 3), cache, None)
            cache_ref = make_cache(ours, "dynamic", batch, 8)
            ours(ids, past_key_values=cache_ref, use_cache=True)
            want = DecodeStep(ours)(ids[:, -1:], torch.full((batch, 1), 3), cache_ref, None)
            results.append((got, want))
    torch._dynamo.reset()
    assert step.compiled_calls == 1 and not step.compiled
    assert "failed to compile (FailOnRecompileLimitHit" in caplog.text
    for got, want in results:
        assert_close(got, want, 1e-5, "compiled then eager-after-limit vs eager")


def test_compiled_step_picks_a_dispatch_that_traces(pair) -> None:
    _, ours = pair
    assert DecodeStep(ours, compile=True).moe_dispatch == "gather"      # fp32: grouped_mm cannot be traced
    assert DecodeStep(ours, compile=False).moe_dispatch == "auto"
    assert DecodeStep(ours, compile=True, moe_dispatch="grouped").moe_dispatch == "grouped"   # explicit wins


def test_seeded_sampling_is_reproducible(pair) -> None:
    _, ours = pair
    ids, mask = left_padded_batch(64, [5, 5], seed=15)
    runs = [generate(ours, ids, mask, max_new_tokens=10, do_sample=True, temperature=1.3, top_k=20,
                     generator=torch.Generator().manual_seed(seed)) for seed in (1, 1, 2)]
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


# top_k=0 switches off transformers' default top_k=50 (which generate() reproduces).
@pytest.mark.parametrize("kwargs", [dict(temperature=1.0, top_k=0), dict(temperature=0.7, top_k=5),
                                    dict(temperature=1.0, top_p=0.6, top_k=0)])
def test_first_sampled_token_follows_processed_distribution(pair, kwargs: dict) -> None:
    _, ours = pair
    n = 6000
    prompt = torch.tensor([[3, 17, 42, 9]])
    with torch.no_grad():
        logits = ours(prompt).logits[0, -1].double() / kwargs["temperature"]
    probs = torch.softmax(logits, -1)
    if kwargs["top_k"]:
        cut = probs.topk(kwargs["top_k"]).values[-1]
        probs = torch.where(probs >= cut, probs, 0)
    if "top_p" in kwargs:
        sorted_p, order = probs.sort(descending=True)
        keep = (sorted_p.cumsum(0) - sorted_p) < kwargs["top_p"]
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    probs = probs / probs.sum()
    out = generate(ours, prompt.expand(n, -1), max_new_tokens=1, do_sample=True, eos_token_id=[],
                   generator=torch.Generator().manual_seed(7), **kwargs)
    counts = torch.bincount(out[:, -1], minlength=probs.numel()).double()
    assert counts[probs == 0].sum() == 0, "sampled a token the filters removed"
    sigma = (probs * (1 - probs) / n).sqrt()
    err = (counts / n - probs).abs()
    assert bool((err <= 5 * sigma + 1e-9).all()), f"max z-score {float((err / sigma.clamp_min(1e-12)).max()):.1f}"


@pytest.mark.parametrize("kwargs, message", [
    (dict(do_sample=True, temperature=-1.0), "temperature"),
    (dict(do_sample=True, top_p=0.0), "top_p"),
    (dict(do_sample=True, top_p=1.5), "top_p"),
    (dict(top_k=-3), "top_k"),
    (dict(max_new_tokens=10**6), "max_position_embeddings"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(cache_implementation="paged"), "cache_implementation"),
])
def test_invalid_arguments_raise(pair, kwargs: dict, message: str) -> None:
    _, ours = pair
    with pytest.raises(ValueError, match=message):
        generate(ours, torch.tensor([[1, 2, 3]]), **{"max_new_tokens": 2, **kwargs})


def test_bad_prompts_raise(pair) -> None:
    _, ours = pair
    with pytest.raises(ValueError, match="out of range"):
        generate(ours, torch.tensor([[1, 64]]), max_new_tokens=2)
    ids, mask = left_padded_batch(64, [4, 2], seed=16)
    with pytest.raises(ValueError, match="left padding"):
        generate(ours, ids.flip(1), mask.flip(1), max_new_tokens=2)
    with pytest.raises(TypeError, match="unsupported"):
        generate(ours, ids, mask, num_beam_groups=2)
    with pytest.raises(ValueError, match="num_beams=4"):
        generate(ours, ids, mask, num_beams=4)


def test_generation_config_is_read_and_overridden(pair, tmp_path: Path) -> None:
    _, ours = pair
    gc = GenerationConfig.from_dict({"max_new_tokens": 3, "do_sample": False, "eos_token_id": []})
    out = generate(ours, torch.tensor([[5, 6, 7]]), generation_config=gc)
    assert out.shape[1] == 6
    out = generate(ours, torch.tensor([[5, 6, 7]]), generation_config=gc, max_new_tokens=5)
    assert out.shape[1] == 8


def test_streamer_prints_the_generated_text(tmp_path_factory: pytest.TempPathFactory) -> None:
    from dsv3.tokenizer import AutoTokenizer

    tok = AutoTokenizer.from_pretrained()
    path = tmp_path_factory.mktemp("stream")
    make_hf_model(path, seed=17, vocab_size=129280, num_hidden_layers=2)
    model = DeepseekV3ForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
    ids = tok("def fibonacci(n):", return_tensors="pt").input_ids
    sink = io.StringIO()
    out = model.generate(ids, max_new_tokens=12, streamer=TextStreamer(tok, skip_prompt=True, file=sink),
                         eos_token_id=[])
    assert sink.getvalue().rstrip("\n") == tok.decode(out[0, ids.shape[1]:].tolist())


def test_documentation_usage_script_runs(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The transformers documentation's script with only the import changed, on a tiny checkpoint."""
    path = tmp_path_factory.mktemp("doc")
    make_hf_model(path, seed=18, vocab_size=129280, num_hidden_layers=2)
    from dsv3.tokenizer import default_tokenizer_dir  # the checkpoint directory ships tokenizer files
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (path / name).write_bytes((default_tokenizer_dir() / name).read_bytes())

    from dsv3 import AutoModelForCausalLM
    from dsv3.tokenizer import AutoTokenizer

    torch.manual_seed(30)
    tokenizer = AutoTokenizer.from_pretrained(path)
    chat = [
        {"role": "user", "content": "Hello, how are you?"},
        {"role": "assistant", "content": "I'm doing great. How can I help you today?"},
        {"role": "user", "content": "I'd like to show off how chat templating works!"},
    ]
    model = AutoModelForCausalLM.from_pretrained(path, device_map="auto", torch_dtype=torch.bfloat16)
    inputs = tokenizer.apply_chat_template(chat, tokenize=True, add_generation_prompt=True,
                                           return_tensors="pt").to(model.device)
    outputs = model.generate(inputs, max_new_tokens=50)
    decoded = tokenizer.batch_decode(outputs)
    prompt_text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert len(decoded) == 1 and decoded[0].startswith(prompt_text)
    assert outputs.shape[1] > inputs["input_ids"].shape[1]
    assert not math.isnan(float(model(outputs).logits.float().mean()))
