"""Streaming decoded text while `generate()` runs, with transformers' `TextStreamer` protocol.

`generate()` calls `put(token_ids)` once with the prompt and then once per step with the new token(s),
and `end()` when it stops. The streamer keeps the ids of the current line, decodes them all again on
every `put` (decoding a lone token is wrong for byte-level BPE, where one character can span several
tokens), and emits only text that can no longer change:

    text ends with "\n"            → emit the rest and start a new line (the id cache is cleared)
    last char is a CJK ideograph   → emit the rest (such scripts have no spaces between words)
    otherwise                      → emit up to and including the last space

An incomplete UTF-8 sequence at the end decodes to U+FFFD, which is neither a newline, nor CJK, nor a
space, so it stays buffered until the next token completes it. `end()` flushes whatever is left.

`TextStreamer` writes to a text stream (stdout by default); `TextIteratorStreamer` puts the pieces on
a queue and is iterated by a consumer thread (server, CLI) while `generate()` runs in another.
Batch size 1 only: a line of text has one writer.
"""

from __future__ import annotations

import queue
import sys
from collections.abc import Sequence
from typing import Any, Protocol, TextIO

import torch


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
        self.token_cache: list[int] = []
        self.print_len = 0
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
        self.token_cache.extend(ids)
        text = self.tokenizer.decode(self.token_cache, **self.decode_kwargs)
        if text.endswith("\n"):
            printable = text[self.print_len :]
            self.token_cache = []
            self.print_len = 0
        elif text and _is_cjk(ord(text[-1])):
            printable = text[self.print_len :]
            self.print_len += len(printable)
        else:
            # Words may still change with the next token (and U+FFFD may still become a character).
            printable = text[self.print_len : text.rfind(" ") + 1]
            self.print_len += len(printable)
        self.on_finalized_text(printable)

    def end(self) -> None:
        """Flush what is left, then signal the end of the stream; ready for the next prompt."""
        printable = ""
        if self.token_cache:
            text = self.tokenizer.decode(self.token_cache, **self.decode_kwargs)
            printable = text[self.print_len :]
        self.token_cache = []
        self.print_len = 0
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
        self.token_cache = []
        self.print_len = 0
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
