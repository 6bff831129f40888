"""Streaming decoded text while `generate()` runs, with transformers' `TextStreamer` protocol.

`generate()` calls `put(token_ids)` once with the prompt and then once per step with the new token(s),
and `end()` when it stops. Text is decoded *incrementally*: each token costs a bounded amount of work,
however long the line (transformers' TextStreamer re-decodes the whole current line on every token, which
is quadratic in the line length — and a server streams many lines at once):

* a tokenizer with a Rust backend (`tokenizers.Tokenizer`, or `.backend_tokenizer` as dsv3's and
  transformers' fast tokenizers have) is fed to `tokenizers.decoders.DecodeStream`;
* any other object with `decode(ids, **kwargs)`, or decode kwargs other than `skip_special_tokens`, uses the
  same algorithm in Python: decode a short window `ids[prefix:]` and its head `ids[prefix:read]`, emit the
  difference once it does not end in U+FFFD (an incomplete UTF-8 sequence), then slide the window.

Of the decoded text the streamer emits, exactly as transformers' TextStreamer does, only what can no
longer change:

    text ends with "\n"            → emit the rest and start a new line
    last char is a CJK ideograph   → emit the rest (such scripts have no spaces between words)
    otherwise                      → emit up to and including the last space

Only the not-yet-emitted tail of the line is kept (`pending`), plus the few ids an incomplete character
holds back: their provisional text (complete characters, then U+FFFD) takes part in the rules above as
it does in a full decode, so a space before a split character is emitted at the same step; `end()`
flushes it all (U+FFFD included, as transformers prints it).

`TextStreamer` writes to a text stream (stdout by default); `TextIteratorStreamer` puts the pieces on
a queue and is iterated by a consumer thread (server, CLI) while `generate()` runs in another.
Batch size 1 only: a line of text has one writer.
"""

from __future__ import annotations

import logging
import queue
import sys
from collections.abc import Sequence
from typing import Any, Protocol, TextIO

import torch
from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

logger = logging.getLogger(__name__)


class SupportsDecode(Protocol):
    def decode(self, ids: list[int], **kwargs: Any) -> str: ...


def _is_cjk(cp: int) -> bool:
    """CJK Unified Ideographs (and extensions, compatibility blocks), as transformers' TextStreamer."""
    return (
        0x4E00 <= cp <= 0x9FFF
        or 0x3400 <= cp <= 0x4DBF
        or 0x20000 <= cp <= 0x2A6DF
        or 0x2A700 <= cp <= 0x2B73F
        or 0x2B740 <= cp <= 0x2B81F
        or 0x2B820 <= cp <= 0x2CEAF
        or 0xF900 <= cp <= 0xFAFF
        or 0x2F800 <= cp <= 0x2FA1F
    )


class IncrementalDecoder:
    """Token ids in, newly final text out, with bounded work per token (see the module docstring)."""

    def __init__(self, tokenizer: Any, **decode_kwargs: Any) -> None:
        backend = tokenizer if isinstance(tokenizer, Tokenizer) else getattr(tokenizer, "backend_tokenizer", None)
        rust_kwargs = set(decode_kwargs) <= {"skip_special_tokens", "clean_up_tokenization_spaces"}
        self.backend: Tokenizer | None = backend if isinstance(backend, Tokenizer) and rust_kwargs else None
        self.tokenizer = tokenizer
        self.decode_kwargs = decode_kwargs
        self.skip_special_tokens = bool(decode_kwargs.get("skip_special_tokens", False))
        logger.debug("streaming with %s", "tokenizers.DecodeStream" if self.backend is not None else
                     f"windowed {type(tokenizer).__name__}.decode")
        self.reset()

    def reset(self) -> None:
        self.stream = DecodeStream(skip_special_tokens=self.skip_special_tokens) if self.backend is not None else None
        self.ids: list[int] = []        # window of the Python path: ids[prefix:] are still needed
        self.prefix = self.read = 0
        self.held: list[int] = []        # ids whose text an incomplete character holds back

    def step(self, token_id: int) -> str | None:
        if self.stream is not None:
            chunk = self.stream.step(self.backend, token_id)
        else:
            self.ids.append(token_id)
            head = self.tokenizer.decode(self.ids[self.prefix:self.read], **self.decode_kwargs)
            text = self.tokenizer.decode(self.ids[self.prefix:], **self.decode_kwargs)
            chunk = None
            if len(text) > len(head) and not text.endswith("\ufffd"):
                chunk = text[len(head):]
                del self.ids[:self.read]                 # keep ids[read:] as the next window's head
                self.prefix, self.read = 0, len(self.ids)
        if chunk is None:
            self.held.append(token_id)
        else:
            self.held.clear()
        return chunk

    def held_text(self) -> str:
        """Provisional text of the held-back ids: complete characters, then U+FFFD for the incomplete one
        (what a full decode shows at this point). Bounded: a character spans at most a few tokens."""
        return self.tokenizer.decode(self.held, **self.decode_kwargs) if self.held else ""


class TextStreamer:
    """Write text to `file` (default: sys.stdout at write time) as soon as whole words are decoded.

    `skip_prompt=True` drops the first `put` after construction or `end()` (the prompt).
    `decode_kwargs` go to `tokenizer.decode` (e.g. skip_special_tokens=True).
    """

    def __init__(
        self,
        tokenizer: SupportsDecode,
        skip_prompt: bool = False,
        *,
        file: TextIO | None = None,
        **decode_kwargs: Any,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_prompt = skip_prompt
        self.decode_kwargs = decode_kwargs
        self.file = file
        self.decoder = IncrementalDecoder(tokenizer, **decode_kwargs)
        self.pending = ""                   # decoded text of the current line not yet emitted
        self.ahead = 0                      # chars of the held-back text already emitted
        self.next_tokens_are_prompt = True

    @staticmethod
    def _as_id_list(value: torch.Tensor | Sequence[int] | int) -> list[int]:
        if isinstance(value, torch.Tensor):
            if value.dim() > 1:
                if value.shape[0] != 1 or value.dim() > 2:
                    raise ValueError(
                        f"TextStreamer supports batch size 1 only, got token ids of shape "
                        f"{tuple(value.shape)}; stream one sequence, or decode batched output afterwards"
                    )
                value = value[0]
            # One host copy per step is inherent to printing; it is not in the sampling path.
            return [int(t) for t in value.reshape(-1).tolist()]
        if isinstance(value, int):
            return [value]
        ids = list(value)
        if ids and not isinstance(ids[0], int):
            raise ValueError("TextStreamer supports batch size 1 only; got a nested sequence of token ids")
        return ids

    def put(self, value: torch.Tensor | Sequence[int] | int) -> None:
        """Receive token ids ([T], [1, T] or a scalar) and emit the text that is now final."""
        ids = self._as_id_list(value)
        if self.skip_prompt and self.next_tokens_are_prompt:
            self.next_tokens_are_prompt = False
            return
        self.next_tokens_are_prompt = False
        seen = len(self.pending)               # `pending` never holds a space: search only what is new
        for token_id in ids:
            chunk = self.decoder.step(token_id)
            if chunk is not None:
                self.pending += chunk[self.ahead:]
                self.ahead = 0
        tail = self.decoder.held_text()[self.ahead:]
        text = self.pending + tail
        if text.endswith("\n") or (text and _is_cjk(ord(text[-1]))):
            cut = len(text)
        else:
            cut = text.rfind(" ", seen) + 1    # words may still change with the next token
        # Text emitted out of `tail` (a space before an incomplete character, as a full decode shows it) is
        # skipped when the completed chunk arrives.
        self.ahead += max(0, cut - len(self.pending))
        self.pending = self.pending[cut:]
        self.on_finalized_text(text[:cut])

    def end(self) -> None:
        """Flush what is left, then signal the end of the stream; ready for the next prompt."""
        printable = self.pending + self.decoder.held_text()[self.ahead:]
        self.decoder.reset()
        self.pending, self.ahead = "", 0
        self.next_tokens_are_prompt = True
        self.on_finalized_text(printable, stream_end=True)

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        """Write `text`; a newline ends the stream (as transformers' TextStreamer prints it)."""
        out = self.file if self.file is not None else sys.stdout
        out.write(text + ("\n" if stream_end else ""))
        out.flush()


_STOP = object()


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


class TextIteratorStreamer(TextStreamer):
    """Queue the final text pieces for a consumer that iterates over the streamer.

    `generate()` runs in another thread; `for piece in streamer` yields pieces until `end()`.
    With `timeout` (seconds), waiting longer for a piece raises `queue.Empty`, as in transformers; the
    producer can instead call `abort(error)` so that the consumer re-raises `error` at once.
    Unlike TextStreamer, `end()` adds no newline.
    """

    def __init__(
        self,
        tokenizer: SupportsDecode,
        skip_prompt: bool = False,
        timeout: float | None = None,
        **decode_kwargs: Any,
    ) -> None:
        super().__init__(tokenizer, skip_prompt, **decode_kwargs)
        self.text_queue: queue.Queue[object] = queue.Queue()
        self.timeout = timeout

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self.text_queue.put(text, timeout=self.timeout)
        if stream_end:
            self.text_queue.put(_STOP, timeout=self.timeout)

    def abort(self, error: BaseException) -> None:
        """Make the consumer raise `error` (e.g. the exception that stopped `generate()`)."""
        self.decoder.reset()
        self.pending, self.ahead = "", 0
        self.next_tokens_are_prompt = True
        self.text_queue.put(_Failure(error), timeout=self.timeout)

    def __iter__(self) -> TextIteratorStreamer:
        return self

    def __next__(self) -> str:
        item = self.text_queue.get(timeout=self.timeout)
        if item is _STOP:
            raise StopIteration
        if isinstance(item, _Failure):
            raise item.error
        assert isinstance(item, str)
        return item
