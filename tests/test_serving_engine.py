"""The serving engine against offline generate: continuous batching, chunked prefill, prefix reuse, sampling."""

from __future__ import annotations

import pytest
import torch

from dsv3.auto import AutoModelForCausalLM
from dsv3.cli import SHIPPED_MODEL as SHIPPED
from dsv3.serving.engine import Engine, QueueFullError, RequestTooLargeError, SamplingOptions, collect
from dsv3.tokenizer import AutoTokenizer

TEXTS = [
    "def add(a, b):",
    "import os\nimport sys\n\ndef main():\n    args = sys.argv",
    "class Stack:\n    def __init__(self):\n        self.items = []\n    def push(self, x):",
    "for i in range(10):",
    "x = [i * i for i in range(100) if i % 3 == 0]\nprint(",
    "# compute the mean\ndef mean(values):\n    total = 0\n",
]
NEW = 6


@pytest.fixture(scope="module")
def model_and_tokenizer():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(SHIPPED, torch_dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(SHIPPED)


@pytest.fixture(scope="module")
def references(model_and_tokenizer):
    """Greedy continuation of each prompt alone (offline generate, fp32)."""
    model, tok = model_and_tokenizer
    out = {}
    for text in TEXTS + [SYSTEM + TEXTS[0], SYSTEM + TEXTS[3]]:
        ids = tok(text)["input_ids"]
        gen = model.generate(torch.tensor([ids]), max_new_tokens=NEW, do_sample=False, eos_token_id=[])
        out[text] = gen[0, len(ids):].tolist()
    return out


SYSTEM = "# A module of small helpers for lists, strings and files, written for Python 3.\n"


def tokens(updates):
    return [t for u in updates for t in u.token_ids]


def test_greedy_continuous_batching_matches_generate(model_and_tokenizer, references):
    """Prompts of different lengths join at different steps, in small blocks, with a prefill budget that splits
    prompts into chunks and a pool that makes later requests wait for blocks: each answer equals generate alone."""
    model, tok = model_and_tokenizer
    engine = Engine(model, tok, max_batch=4, block_size=4, token_budget=9, num_blocks=16)
    greedy = SamplingOptions(max_tokens=NEW, temperature=0.0, ignore_eos=True)
    results: dict[str, list] = {}
    schedule = {0: TEXTS[:2], 2: TEXTS[2:4], 5: TEXTS[4:]}
    for step in range(200):
        for text in schedule.get(step, []):
            results[text] = []
            engine.submit(tok(text)["input_ids"], greedy, results[text].append)
        if step > max(schedule) and not engine.has_work:
            break
        engine.step()
    assert engine.steps > 0
    for text in TEXTS:
        assert tokens(results[text]) == references[text], text
        assert results[text][-1].finish_reason == "length"
        assert "".join(u.text for u in results[text]) == tok.decode(references[text])
    stats = engine.stats()
    assert stats.blocks_in_use == 0 and stats.running == 0 and stats.requests == {"length": len(TEXTS)}
    assert stats.generation_tokens == NEW * len(TEXTS)


def test_prefix_reuse_is_exact_and_skips_the_shared_blocks(model_and_tokenizer, references):
    model, tok = model_and_tokenizer
    engine = Engine(model, tok, max_batch=4, block_size=4, token_budget=64)
    greedy = SamplingOptions(max_tokens=NEW, temperature=0.0, ignore_eos=True)
    first = collect(engine, [tok(SYSTEM + TEXTS[0])["input_ids"]], greedy)[0]
    second = collect(engine, [tok(SYSTEM + TEXTS[3])["input_ids"]], greedy)[0]
    assert tokens(first) == references[SYSTEM + TEXTS[0]]
    assert tokens(second) == references[SYSTEM + TEXTS[3]]
    shared = len(tok(SYSTEM)["input_ids"]) // 4 * 4 - 4          # the system prompt's full blocks, give or take
    assert first[0].cached_tokens == 0
    assert second[0].cached_tokens >= shared > 0
    assert engine.stats().reused_blocks == second[0].cached_tokens // 4
    off = Engine(model, tok, max_batch=4, block_size=4, token_budget=64, prefix_caching=False)
    collect(off, [tok(SYSTEM + TEXTS[0])["input_ids"]], greedy)
    again = collect(off, [tok(SYSTEM + TEXTS[3])["input_ids"]], greedy)[0]
    assert again[0].cached_tokens == 0 and tokens(again) == references[SYSTEM + TEXTS[3]]


def test_cancel_frees_blocks(model_and_tokenizer):
    model, tok = model_and_tokenizer
    engine = Engine(model, tok, max_batch=4, block_size=4)
    got: list = []
    rid = engine.submit(tok(TEXTS[1])["input_ids"], SamplingOptions(max_tokens=50, temperature=0.0), got.append)
    engine.step()
    engine.step()
    assert engine.stats().blocks_in_use > 0
    engine.cancel(rid)
    engine.step()
    assert engine.stats().blocks_in_use == 0 and not engine.has_work
    assert got[-1].finish_reason == "abort"


def test_sampling_seed_n_and_penalties(model_and_tokenizer):
    model, tok = model_and_tokenizer
    engine = Engine(model, tok, max_batch=8, block_size=8)
    ids = tok(TEXTS[3])["input_ids"]
    sample = SamplingOptions(max_tokens=8, temperature=1.0, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)
    a, b = collect(engine, [ids, ids], sample, n=2)
    per_choice = lambda ups, i: [t for u in ups if u.index == i for t in u.token_ids]  # noqa: E731
    assert per_choice(a, 0) == per_choice(b, 0) and per_choice(a, 1) == per_choice(b, 1)   # seeded: reproducible
    assert per_choice(a, 0) != per_choice(a, 1)                  # n choices draw differently (seed + index)
    # the greedy answer for this prompt repeats tokens; a large presence penalty forbids every repeat
    plain = tokens(collect(engine, [ids], SamplingOptions(max_tokens=12, temperature=0.0, ignore_eos=True))[0])
    assert len(set(plain)) < len(plain)
    penal = tokens(collect(engine, [ids], SamplingOptions(max_tokens=12, temperature=0.0, ignore_eos=True,
                                                          presence_penalty=100.0))[0])
    assert len(set(penal)) == len(penal)


def test_logprobs_are_the_model_distribution(model_and_tokenizer):
    model, tok = model_and_tokenizer
    engine = Engine(model, tok, max_batch=2, block_size=8)
    ids = tok(TEXTS[0])["input_ids"]
    ups = collect(engine, [ids], SamplingOptions(max_tokens=2, temperature=0.0, ignore_eos=True, logprobs=3))[0]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1].float()
    ref = torch.log_softmax(logits, -1)
    first = ups[0].logprobs[0]
    assert first.token_id == int(ref.argmax())
    assert abs(first.logprob - float(ref.max())) < 1e-4
    v, i = ref.topk(3)
    assert [t for t, _ in first.top] == i.tolist()
    torch.testing.assert_close(torch.tensor([p for _, p in first.top]), v, atol=1e-4, rtol=0)


def test_stop_strings_are_cut_and_never_leak(model_and_tokenizer, references):
    model, tok = model_and_tokenizer
    engine = Engine(model, tok, max_batch=2, block_size=8)
    full = tok.decode(references[TEXTS[0]])
    stop = full[5:9]                                      # a string inside the greedy answer
    ups = collect(engine, [tok(TEXTS[0])["input_ids"]],
                  SamplingOptions(max_tokens=NEW, temperature=0.0, ignore_eos=True, stop=[stop]))[0]
    text = "".join(u.text for u in ups)
    assert text == full[: full.find(stop)] and ups[-1].finish_reason == "stop"
    # no update ever carried a prefix of the stop string that the final text does not contain
    assert all(stop[:2] not in u.text for u in ups)


def test_stop_string_holdback_on_crafted_text():
    """The hold-back logic alone: text arrives in pieces; what is emitted never contains a stop-string start
    that may still complete, and a non-matching tail is flushed."""
    from dsv3.serving.engine import _Request, _Sequence

    req = _Request("r", [1], SamplingOptions(), 1, lambda u: None, 0.0)
    s = _Sequence(req, 0, None)
    out = []
    for piece in ["Hello", " wor", "ld<", "|en", "d|>", " tail"]:
        s.text += piece
        delta, stopped = Engine._stop_strings(s, s.text, ["<|end|>"])
        out.append(delta)
        if stopped:
            break
    assert out == ["Hello", " wor", "ld", "", ""] and stopped
    assert "".join(out) == "Hello world"
    s2 = _Sequence(req, 0, None)
    s2.text = "a<|e"
    assert Engine._stop_strings(s2, s2.text, ["<|end|>"]) == ("a", False)
    s2.text += "x"
    assert Engine._stop_strings(s2, s2.text, ["<|end|>"]) == ("<|ex", False)


def test_limits_are_checked_before_any_work(model_and_tokenizer):
    model, tok = model_and_tokenizer
    engine = Engine(model, tok, max_batch=2, max_queue=1, block_size=8, num_blocks=4)
    ctx = model.config.max_context_length
    with pytest.raises(RequestTooLargeError, match="maximum context length"):
        engine.submit([5] * ctx, SamplingOptions(max_tokens=1), lambda u: None)
    with pytest.raises(RequestTooLargeError, match="cache blocks"):
        engine.submit([5] * 30, SamplingOptions(max_tokens=10), lambda u: None)
    engine.check_request(3, 10, n=1)
    with pytest.raises(RequestTooLargeError, match="n=3"):        # n choices reserve n times the blocks
        engine.check_request(3, 10, n=3)
    assert engine.default_max_tokens(3) == 4 * 8 // 2 - 3        # one sequence's share of the cache
    engine.submit([5] * 3, SamplingOptions(max_tokens=2), lambda u: None)
    with pytest.raises(QueueFullError, match="max-queue"):
        engine.submit([5] * 3, SamplingOptions(max_tokens=2), lambda u: None)
    assert engine.steps == 0


def test_chunked_prefill_does_not_stall_running_decodes(model_and_tokenizer):
    """While a long prompt is prefilled in budget-sized chunks, the running sequence gets a token every step."""
    model, tok = model_and_tokenizer
    engine = Engine(model, tok, max_batch=4, block_size=4, token_budget=8)
    running: list = []
    engine.submit(tok(TEXTS[0])["input_ids"], SamplingOptions(max_tokens=30, temperature=0.0, ignore_eos=True),
                  running.append)
    engine.step()                                           # its prefill (6 tokens) and first token
    assert len(running) == 1
    long: list = []
    long_ids = tok(TEXTS[2] * 2)["input_ids"]
    assert len(long_ids) > 5 * 7
    engine.submit(long_ids, SamplingOptions(max_tokens=1, temperature=0.0, ignore_eos=True), long.append)
    steps = 0
    while not long:
        before = len(running)
        engine.step()
        steps += 1
        assert len(running) == before + 1                   # one decode token per step, prefill or not
    assert steps >= len(long_ids) // 7                      # the prompt took several chunked steps


def test_mtp_speculation_in_the_batch_equals_plain_greedy(model_and_tokenizer, references):
    """--speculative mtp: greedy rows verify an MTP draft per step (rows accept different counts, so their
    lengths diverge inside one batch); the answers equal offline generate, and drafts were accepted."""
    model, tok = model_and_tokenizer
    assert model.mtp is not None
    engine = Engine(model, tok, max_batch=8, block_size=4, token_budget=9, speculative="mtp")
    greedy = SamplingOptions(max_tokens=NEW, temperature=0.0, ignore_eos=True)
    sampled: list = []
    results: dict[str, list] = {t: [] for t in TEXTS}
    for text in TEXTS[:3]:
        engine.submit(tok(text)["input_ids"], greedy, results[text].append)
    engine.submit(tok(TEXTS[0])["input_ids"], SamplingOptions(max_tokens=NEW, temperature=1.0, seed=3,
                                                               ignore_eos=True), sampled.append)
    engine.step()
    engine.step()
    for text in TEXTS[3:]:
        engine.submit(tok(text)["input_ids"], greedy, results[text].append)
    while engine.has_work:
        engine.step()
    for text in TEXTS:
        assert tokens(results[text]) == references[text], text
    stats = engine.stats()
    assert 0 < stats.accepted_drafts <= stats.drafts
    assert len(tokens(sampled)) == NEW and stats.blocks_in_use == 0
    assert stats.drafts <= len(TEXTS) * NEW                     # only greedy rows speculate
    with pytest.raises(ValueError, match="MTP module"):
        no_mtp = AutoModelForCausalLM.from_pretrained(SHIPPED, torch_dtype=torch.float32, load_mtp=False)
        Engine(no_mtp, tok, speculative="mtp")


def test_padded_prefill_never_runs_past_the_context(model_and_tokenizer):
    """Prefill chunks share a right-padded forward; a chunk that ends at the context limit must not be padded
    beyond it by a longer chunk of another sequence (the model would refuse the positions)."""
    model, tok = model_and_tokenizer
    ctx = model.config.max_context_length
    budget = 409
    assert (ctx - 2) % budget < 20                             # the near prompt's last chunk is short
    engine = Engine(model, tok, max_batch=4, block_size=64, token_budget=budget)
    greedy = SamplingOptions(max_tokens=2, temperature=0.0, ignore_eos=True)
    near: list = []
    engine.submit([5 + i % 50 for i in range(ctx - 2)], greedy, near.append)
    while engine._running[0].pending > 100 if engine._running else True:
        engine.step()
    other: list = []
    assert engine._running[0].pending < 20
    engine.submit(tok(TEXTS[2] * 4)["input_ids"], greedy, other.append)   # its chunk pads the near one's
    while engine.has_work:
        engine.step()
    assert near[-1].finish_reason == "length" and len(tokens(near)) == 2
    alone = collect(Engine(model, tok, block_size=64), [tok(TEXTS[2] * 4)["input_ids"]], greedy)[0]
    assert tokens(other) == tokens(alone)


def _wait_until(condition, message, timeout: float = 30.0) -> None:
    """Poll `condition` (the engine runs in its thread) until it holds; fail with `message()` after `timeout` s."""
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, message()
        time.sleep(0.01)


def _wait_final(updates: list, n: int = 1, timeout: float = 60.0) -> list:
    """The updates of a request once n sequences have sent their final update."""
    _wait_until(lambda: sum(u.finish_reason is not None for u in list(updates)) >= n,
                lambda: f"request never finished: {updates}", timeout)
    return updates


@pytest.mark.parametrize("where", ["forward", "admit", "abort"])
def test_a_failing_step_fails_its_requests_and_the_engine_lives_on(model_and_tokenizer, monkeypatch, where):
    """A step that raises (in the model, while admitting, or even while aborting) ends every affected request
    with an error update — none is left waiting forever — and the next request runs normally."""
    model, tok = model_and_tokenizer
    engine = Engine(model, tok, max_batch=4, block_size=4, num_blocks=32)
    # "admit": the failure comes after the request left the queue, before its sequences run
    owner, target = (engine.blocks, "acquire") if where == "admit" else (engine, "_forward")
    real = getattr(owner, target)
    calls = {"n": 0}

    def broken(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, target, broken)
    if where == "abort":   # the abort path itself fails once: the engine must still answer every request
        real_finish = engine._finish
        finish_calls = {"n": 0}

        def broken_finish(s, reason):
            finish_calls["n"] += 1
            if reason == "abort" and finish_calls["n"] == 1:
                raise RuntimeError("injected failure while aborting")
            return real_finish(s, reason)

        monkeypatch.setattr(engine, "_finish", broken_finish)
    engine.start()
    try:
        greedy = SamplingOptions(max_tokens=3, temperature=0.0, ignore_eos=True)
        first: list = []
        engine.submit(tok(TEXTS[0])["input_ids"], greedy, first.append, n=2)
        _wait_final(first, n=2)
        assert all(u.error and "injected failure" in u.error for u in first if u.finish_reason is not None)
        assert {u.finish_reason for u in first if u.finish_reason is not None} == {"abort"}
        assert engine.alive
        second: list = []
        engine.submit(tok(TEXTS[3])["input_ids"], greedy, second.append)
        _wait_final(second)
        assert second[-1].error is None and second[-1].finish_reason == "length"
        assert len(tokens(second)) == 3
        # the client hears its final token inside the step; that step frees the blocks when it ends
        _wait_until(lambda: engine.blocks.in_use == 0, lambda: f"blocks still in use: {engine.blocks.in_use}")
    finally:
        engine.stop(drain=False, timeout=30)
