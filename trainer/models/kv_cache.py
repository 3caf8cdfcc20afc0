"""KVCache: the keys and values of the positions seen so far, so that generation runs each new token alone.

The model takes it as an optional keyword, `Transformer.forward(tokens, cache=cache)`; without it the model runs
exactly its training code path. A forward with a cache continues the cached sequence: its tokens sit at positions
`cache.start` onwards (a prompt first, "prefill", then one token per step, "decode"). Each layer's buffers are
allocated at its first write from the shapes of the keys written, so the cache holds whatever heads this rank's
attention computes (all of them in one process, this rank's share under tensor parallel) in the compute dtype.
"""

import torch
from torch import Tensor


class LayerKVCache:
    """One attention layer's keys and values, [batch, max_len, kv_heads, head_dim], filled left to right."""

    def __init__(self, parent: "KVCache"):
        self._parent = parent
        self.k: Tensor | None = None
        self.v: Tensor | None = None

    @property
    def start(self) -> int:
        """Position of the first token of the current forward (tokens cached before it)."""
        return self._parent.start

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store the keys and values [batch, seq, kv_heads, head_dim] of the current tokens; return those of every
        position so far, [batch, start + seq, kv_heads, head_dim]."""
        start, end = self.start, self.start + k.shape[1]
        if end > self._parent.max_len:
            raise ValueError(f"KVCache holds {self._parent.max_len} positions; cannot write positions {start}..{end - 1}")
        if self.k is None:
            shape = (k.shape[0], self._parent.max_len, *k.shape[2:])
            self.k = torch.zeros(shape, dtype=k.dtype, device=k.device)
            self.v = torch.zeros(shape, dtype=v.dtype, device=v.device)
        self.k[:, start:end] = k
        self.v[:, start:end] = v
        return self.k[:, :end], self.v[:, :end]


class KVCache:
    """Keys and values of every layer for a batch of sequences of the same length, up to `max_len` positions."""

    def __init__(self, max_len: int):
        self.max_len = max_len
        self.start = 0
        self._layers: dict[str, LayerKVCache] = {}

    def layer(self, name: str) -> LayerKVCache:
        """The cache of the layer called `name` (its key in Transformer.layers)."""
        if name not in self._layers:
            self._layers[name] = LayerKVCache(self)
        return self._layers[name]

    def advance(self, n: int) -> None:
        """Mark the `n` tokens of the forward that just ran as cached; the next forward starts after them."""
        self.start += n
