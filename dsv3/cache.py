"""Latent KV caches for Multi-head Latent Attention.

MLA needs only, per layer and token, the normalised latent c_kv (kv_lora_rank values) and the
roped shared key k_pe (qk_rope_head_dim values): 576 values = 1152 bytes in bf16 for V3, where a
per-head K/V cache would hold 128·(192+128) = 40960. Both are kept side by side in one tensor
`[B, T, r_kv + dr]` per layer, so the absorbed attention path can use the whole row as a key and its
first r_kv values as the value without any copy.

All rows of a batch share the write position (left padding keeps prompts aligned), so the
filled length is a Python int: no host sync to know how much of the cache to read.

- `DynamicLatentCache` grows by doubling its capacity (amortised O(1) appends).
- `StaticLatentCache` preallocates `max_cache_len` once; addresses never change, which is what a
  compiled decode step wants. Reads return only the filled prefix, so a step costs what is
  filled, not what was reserved.

`crop(n)` rolls back to n tokens (speculative decoding rejects draft tokens this way).
"""

from __future__ import annotations

import torch

from dsv3.config import DeepseekV3Config


class LatentCache:
    """Common interface: `update(layer, latent_new) -> latent_all`, `get_seq_length()`, `crop(n)`."""

    def __init__(self, num_layers: int) -> None:
        self.num_layers = num_layers
        self.layers: list[torch.Tensor | None] = [None] * num_layers
        self._length = 0        # tokens committed by completed forward passes
        self._pending = 0       # tokens being written by the forward pass in progress

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._length

    def begin(self, num_new: int) -> int:
        """Start a forward pass that appends num_new tokens; returns the write position."""
        self._pending = num_new
        return self._length

    def end(self) -> None:
        self._length += self._pending
        self._pending = 0

    def crop(self, length: int) -> None:
        if length < 0:
            length = self._length + length
        if not 0 <= length <= self._length:
            raise ValueError(f"crop({length}): cache holds {self._length} tokens")
        self._length = length

    def check(self, batch_size: int, dtype: torch.dtype) -> None:
        """Raise a ValueError naming the fix when this cache cannot hold a batch of this size and dtype."""

    def update(self, layer_idx: int, latent: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def max_cache_len(self) -> int | None:
        return None

    def reorder(self, index: torch.Tensor) -> None:
        """Keep batch rows `index` (e.g. drop finished sequences)."""
        self.layers = [None if t is None else t.index_select(0, index) for t in self.layers]

    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.layers if t is not None)


class DynamicLatentCache(LatentCache):
    """Grows on demand; capacity doubles so appends are amortised O(1)."""

    def __init__(self, num_layers: int) -> None:
        super().__init__(num_layers)

    @classmethod
    def for_config(cls, config: DeepseekV3Config) -> DynamicLatentCache:
        return cls(config.num_hidden_layers)

    def update(self, layer_idx: int, latent: torch.Tensor) -> torch.Tensor:
        # latent: [B, S, r_kv + dr]
        start, s = self._length, latent.shape[1]
        end = start + s
        buf = self.layers[layer_idx]
        if buf is None or buf.shape[1] < end or buf.shape[0] != latent.shape[0]:
            cap = max(end, 2 * (buf.shape[1] if buf is not None else 0), 16)
            new = latent.new_empty(latent.shape[0], cap, latent.shape[2])
            if buf is not None and start > 0:
                new[:, :start] = buf[:, :start]
            buf = self.layers[layer_idx] = new
        buf[:, start:end] = latent
        return buf[:, :end]


class StaticLatentCache(LatentCache):
    """Preallocated [B, max_cache_len, r_kv + dr] per layer."""

    def __init__(self, config: DeepseekV3Config, batch_size: int, max_cache_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                 num_layers: int | None = None) -> None:
        super().__init__(config.num_hidden_layers if num_layers is None else num_layers)
        self._max = max_cache_len
        self.layers = [torch.zeros(batch_size, max_cache_len, config.kv_cache_dim, dtype=dtype, device=device)
                       for _ in range(self.num_layers)]

    @property
    def max_cache_len(self) -> int:
        return self._max

    def begin(self, num_new: int) -> int:
        if self._length + num_new > self._max:
            raise ValueError(f"StaticLatentCache holds {self._max} tokens; {self._length} are filled and "
                             f"{num_new} more were given. Allocate a larger max_cache_len.")
        return super().begin(num_new)

    def check(self, batch_size: int, dtype: torch.dtype) -> None:
        buf = self.layers[0]
        assert buf is not None
        if buf.shape[0] != batch_size or buf.dtype != dtype:
            raise ValueError(f"StaticLatentCache holds batch {buf.shape[0]} in {buf.dtype} but the model runs batch "
                             f"{batch_size} in {dtype}; create it with StaticLatentCache(config, batch_size="
                             f"{batch_size}, max_cache_len, dtype={dtype})")

    def update(self, layer_idx: int, latent: torch.Tensor) -> torch.Tensor:
        start = self._length
        end = start + latent.shape[1]
        buf = self.layers[layer_idx]
        assert buf is not None and buf.shape[0] == latent.shape[0], "batch size differs from the cache's"
        buf[:, start:end] = latent
        return buf[:, :end]
