"""A token-stream dataset: text files -> one token stream -> fixed-length blocks -> random batches.

    stream = encode(file_1) EOS encode(file_2) EOS ...        (special tokens as the tokenizer adds them)
    blocks = stream cut into non-overlapping [block_len] pieces (the tail that does not fill one is dropped)
    split  = a seeded permutation of the blocks; the first ceil(eval_fraction·N) are held out

Each block is both input and label (causal_lm_loss shifts); batches are drawn with a torch.Generator, so
a run (and a resumed run, whose generator state is restored) sees the same batches.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255 and EOS = 256: a dependency-free tokenizer for smoke tests and toys."""

    eos_token_id = 256
    bos_token_id = None
    vocab_size = 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def __len__(self) -> int:
        return self.vocab_size


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """tokenizer.encode(text) as a list of ints, whether it returns a list, a tensor or an Encoding (.ids)."""
    ids = tokenizer.encode(text)
    if hasattr(ids, "ids"):                        # tokenizers.Encoding
        ids = ids.ids
    if isinstance(ids, torch.Tensor):
        ids = ids.reshape(-1).tolist()
    return [int(i) for i in ids]


def tokenize_files(paths: Sequence[str | os.PathLike], tokenizer: Any, eos_token_id: int | None = None
                   ) -> torch.Tensor:
    """Concatenate the files' tokens, each followed by EOS: a 1-D int64 stream."""
    if eos_token_id is None:
        eos_token_id = getattr(tokenizer, "eos_token_id", None)
        if eos_token_id is None:
            raise ValueError("the tokenizer has no eos_token_id; pass eos_token_id= to separate the documents")
    stream: list[int] = []
    for path in paths:
        path = Path(path)
        if path.is_dir():
            raise ValueError(f"{path} is a directory; training data are UTF-8 text files (pass the files in it)")
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no such training text file") from None
        except UnicodeDecodeError as e:
            raise ValueError(f"{path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}): "
                             "training data must be UTF-8 text files; is it a binary file?") from None
        stream.extend(encode_text(tokenizer, text))
        stream.append(int(eos_token_id))
    return torch.tensor(stream, dtype=torch.long)


class TokenBlocks:
    """Fixed-length blocks [N, block_len] of token ids."""

    def __init__(self, blocks: torch.Tensor) -> None:
        if blocks.dim() != 2 or blocks.shape[0] == 0:
            raise ValueError(f"blocks has shape {tuple(blocks.shape)}: expected [num_blocks > 0, block_len]")
        self.blocks = blocks.long()

    def __len__(self) -> int:
        return self.blocks.shape[0]

    @property
    def block_len(self) -> int:
        return self.blocks.shape[1]

    @property
    def num_tokens(self) -> int:
        return self.blocks.numel()

    def sample(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """batch_size blocks drawn uniformly with replacement: [B, block_len]."""
        index = torch.randint(len(self), (batch_size,), generator=generator)
        return self.blocks[index]

    def batches(self, batch_size: int, max_batches: int | None = None) -> Iterator[torch.Tensor]:
        """The blocks in order, batch_size at a time (the last batch may be smaller)."""
        for i, start in enumerate(range(0, len(self), batch_size)):
            if max_batches is not None and i >= max_batches:
                return
            yield self.blocks[start: start + batch_size]


def split_blocks(stream: torch.Tensor, block_len: int, eval_fraction: float = 0.1,
                 seed: int = 0) -> tuple[TokenBlocks, TokenBlocks | None]:
    """Cut a token stream into blocks and split them (seeded, deterministic) into train and held-out."""
    if block_len < 2:
        raise ValueError(f"block_len={block_len}: a block needs at least 2 tokens (input and next token)")
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction={eval_fraction}: must be in [0, 1)")
    n = stream.numel() // block_len
    if n == 0:
        raise ValueError(f"the corpus has {stream.numel()} tokens, fewer than one block of {block_len}; "
                         "add text or lower the block length")
    blocks = stream[: n * block_len].view(n, block_len)
    n_eval = math.ceil(eval_fraction * n) if eval_fraction > 0 else 0
    if n_eval >= n:
        raise ValueError(f"{n} block(s) of {block_len} tokens cannot be split with eval_fraction={eval_fraction}: "
                         "no training block would remain; add text, lower the block length or the fraction")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    train = TokenBlocks(blocks[order[n_eval:].sort().values])
    held_out = TokenBlocks(blocks[order[:n_eval].sort().values]) if n_eval else None
    return train, held_out


def load_text_dataset(paths: Sequence[str | os.PathLike], tokenizer: Any, block_len: int,
                      eval_fraction: float = 0.1, seed: int = 0, eos_token_id: int | None = None,
                      ) -> tuple[TokenBlocks, TokenBlocks | None]:
    """Tokenize text files and return (train blocks, held-out blocks or None)."""
    return split_blocks(tokenize_files(paths, tokenizer, eos_token_id), block_len, eval_fraction, seed)
