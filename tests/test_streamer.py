"""The streamer against transformers' TextStreamer on DeepSeek's real tokenizer, piece for piece, on both
decoding paths (tokenizers' DecodeStream and the windowed Python decode), and its per-token work: bounded,
not growing with the length of the line as a re-decode of the whole line does."""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch

from dsv3.generation.streamer import TextIteratorStreamer, TextStreamer
from dsv3.tokenizer import AutoTokenizer, DeepseekTokenizer, default_tokenizer_dir

transformers = pytest.importorskip("transformers")

TEXT = ("def f(x):\n    return x ** 2  # square\n\n你好，世界！深度求索的大模型支持中文。 emoji 🚀🔥👩‍💻 café "
        "naïve Ünïcödé ß\n<think>\nreasoning here\n</think>\n\nanswer: 日本語のテキスト、한국어도 ok"
        "<｜end▁of▁sentence｜> trailing  spaces   \n\n\nlast")


@pytest.fixture(scope="module")
def ours() -> DeepseekTokenizer:
    return AutoTokenizer.from_pretrained()


@pytest.fixture(scope="module")
def ref() -> Any:
    return transformers.AutoTokenizer.from_pretrained(str(default_tokenizer_dir()))


class DecodeOnly:
    """Just `decode` (no Rust backend): forces the windowed path. Counts what it decodes."""

    def __init__(self, tok: DeepseekTokenizer) -> None:
        self.tok = tok
        self.calls: list[int] = []

    def decode(self, ids: list[int], **kwargs: Any) -> str:
        self.calls.append(len(ids))
        return self.tok.decode(ids, **kwargs)


class Counting(DecodeOnly):
    """`decode` counted, plus the Rust backend (the DecodeStream path)."""

    @property
    def backend_tokenizer(self) -> Any:
        return self.tok.backend_tokenizer


def pieces(streamer_cls: type, tokenizer: Any, prompt: list[int], steps: list[list[int]], **kw: Any
           ) -> tuple[list[str], Any]:
    out: list[str] = []

    class Capture(streamer_cls):  # type: ignore[misc, valid-type]
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            out.append(text + ("<END>" if stream_end else ""))

    s = Capture(tokenizer, **kw)
    s.put(torch.tensor([prompt]))
    for step in steps:
        s.put(torch.tensor(step))
    s.end()
    return out, s


def _steps(ids: list[int], seed: int) -> list[list[int]]:
    """1-3 tokens per put, as speculative decoding delivers them."""
    rng, steps, i = random.Random(seed), [], 0
    while i < len(ids):
        n = rng.choice((1, 1, 2, 3))
        steps.append(ids[i: i + n])
        i += n
    return steps


@pytest.mark.parametrize("path", ["decode_stream", "windowed"])
@pytest.mark.parametrize("skip_prompt", [True, False])
@pytest.mark.parametrize("skip_special_tokens", [False, True])
def test_pieces_match_transformers(ours: DeepseekTokenizer, ref: Any, path: str, skip_prompt: bool,
                                   skip_special_tokens: bool) -> None:
    ids = ours.encode(TEXT, add_special_tokens=False)
    prompt = ours.encode("<｜begin▁of▁sentence｜>Write:", add_special_tokens=False)
    tok = ours if path == "decode_stream" else DecodeOnly(ours)
    for seed in range(3):
        steps = _steps(ids, seed)
        got, streamer = pieces(TextStreamer, tok, prompt, steps, skip_prompt=skip_prompt,
                               skip_special_tokens=skip_special_tokens)
        want, _ = pieces(transformers.TextStreamer, ref, prompt, steps, skip_prompt=skip_prompt,
                         skip_special_tokens=skip_special_tokens)
        assert got == want, next((i, a, b) for i, (a, b) in enumerate(zip(got, want)) if a != b)
        assert (streamer.decoder.backend is not None) == (path == "decode_stream")    # which path ran
    assert any("\ufffd" in ours.decode(ids[:i]) for i in range(len(ids))), "no split character in the test"


def test_iterator_streamer_on_decode_stream(ours: DeepseekTokenizer) -> None:
    ids = ours.encode(TEXT, add_special_tokens=False)
    s = TextIteratorStreamer(ours, skip_prompt=True, timeout=5.0)
    s.put(torch.tensor([ids[:2]]))
    for i in ids:
        s.put(torch.tensor([i]))
    s.end()
    assert "".join(s) == ours.decode(ids) and s.decoder.backend is not None


@pytest.mark.parametrize("path", ["decode_stream", "windowed"])
def test_work_per_token_does_not_grow_with_the_line(ours: DeepseekTokenizer, path: str) -> None:
    """2000+ tokens on one line: the ids handed to Python-side decode calls per token stay bounded (the old
    streamer decoded the whole line on every token: ~n²/2 ids in all)."""
    ids = ours.encode("the quick brown fox jumps over the lazy dog, 你好世界 café 🚀 " * 150, add_special_tokens=False)
    n = len(ids)
    assert n > 2000
    tok = Counting(ours) if path == "decode_stream" else DecodeOnly(ours)
    out, streamer = pieces(TextStreamer, tok, [], [[i] for i in ids], skip_prompt=True)
    assert "".join(out).removesuffix("<END>") == ours.decode(ids)
    first, last = tok.calls[: len(tok.calls) // 2], tok.calls[len(tok.calls) // 2:]
    print(f"{path}: {n} tokens, {len(tok.calls)} decode calls, {sum(tok.calls)} ids decoded, "
          f"largest call {max(tok.calls, default=0)}")
    assert max(tok.calls, default=0) <= 8                     # a character spans at most a few tokens
    assert sum(tok.calls) <= 4 * n                            # linear in the length
    assert sum(last) <= 2 * sum(first) + 8                    # late tokens cost what early ones cost
    assert len(streamer.pending) < 64                         # only the unfinished word is kept
