"""A KV cache that writes into buffers allocated once, so decoding N tokens copies O(N), not O(N^2).

transformers' `DynamicCache` grows by `torch.cat([old, new])`: every decode step copies the whole cache of
every layer. At 256 new tokens that copying is most of a tiny model's decode time. `PreallocatedLayer` is a
`DynamicLayer` that allocates (batch, heads, capacity, head_dim) once and writes each step's keys and values
in place; `keys`/`values` are views of the filled part, so the model, its attention masks and the sampler's
row dropping (`batch_select_indices`) see exactly what a `DynamicLayer` shows them.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedModel

__all__ = ["PreallocatedLayer", "preallocated_cache"]

try:  # transformers >= 4.56 builds caches from layers
    from transformers.cache_utils import DynamicCache, DynamicLayer
except ImportError:  # pragma: no cover - older transformers: the sampler keeps the model's own cache
    DynamicCache = DynamicLayer = None


def _with_room(buffer: torch.Tensor | None, states: torch.Tensor, size: int) -> torch.Tensor:
    """`buffer` (B, H, positions, D) with room for `size` positions: allocated on first use, doubled when a
    rollout runs longer than planned (as a list grows)."""
    if buffer is None:
        return states.new_empty((*states.shape[:2], size, states.shape[3]))
    if size <= buffer.shape[2]:
        return buffer
    extra = max(size, 2 * buffer.shape[2]) - buffer.shape[2]
    return torch.cat([buffer, buffer.new_empty((*buffer.shape[:2], extra, buffer.shape[3]))], dim=2)


class PreallocatedLayer(DynamicLayer or object):  # type: ignore[misc]
    """One layer's keys and values in buffers of `capacity` positions (grown by doubling if exceeded)."""

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity, self.length = int(capacity), 0
        self._keys = self._values = None  # (B, H, capacity, D) buffers once the first update arrives

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self._keys is None:
            self.is_initialized, self.device = True, key_states.device
        end = self.length + key_states.shape[-2]
        self._keys = _with_room(self._keys, key_states, max(end, self.capacity))
        self._values = _with_room(self._values, value_states, max(end, self.capacity))
        self._keys[:, :, self.length : end] = key_states
        self._values[:, :, self.length : end] = value_states
        self.length = end
        self._expose()
        return self.keys, self.values

    def _expose(self) -> None:
        self.keys, self.values = self._keys[:, :, : self.length], self._values[:, :, : self.length]

    def get_seq_length(self) -> int:
        return self.length

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self._keys is not None:
            self._keys, self._values = self._rows(self._keys, indices), self._rows(self._values, indices)
            self._expose()

    def _rows(self, buffer: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """The buffer's `indices` rows in a new buffer of the same capacity; only the filled positions are
        copied (the sampler drops ended rows early, while most of the capacity is still empty)."""
        out = buffer.new_empty((len(indices), *buffer.shape[1:]))
        torch.index_select(buffer[:, :, : self.length], 0, indices, out=out[:, :, : self.length])
        return out

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self._keys is not None:
            self._keys = self._keys.repeat_interleave(repeats, dim=0)
            self._values = self._values.repeat_interleave(repeats, dim=0)
            self._expose()

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative count of tokens to remove, got {tokens_to_remove}")
        if self._keys is not None:
            self.length = max(0, self.length + tokens_to_remove)
            self._expose()

    def reset(self) -> None:
        self._keys = self._values = None
        self.length = 0
        super().reset()


def preallocated_cache(model: PreTrainedModel, capacity: int) -> Any:
    """A `DynamicCache` for `model` whose full-attention layers are `PreallocatedLayer`s of `capacity`.

    Returns None where this transformers release cannot build one; the model then makes its own cache.
    Sliding-window and other special layers keep transformers' own classes.
    """
    if DynamicCache is None:
        return None
    try:
        cache = DynamicCache(config=model.config)
    except Exception:  # noqa: BLE001 - any config this release cannot map: fall back to the model's own
        return None
    if not cache.layers:  # layers are created lazily: make them all ours
        n = model.config.get_text_config(decoder=True).num_hidden_layers
        cache.layers = [PreallocatedLayer(capacity) for _ in range(n)]
        cache.layer_class_to_replicate = None
        return cache
    cache.layers = [
        PreallocatedLayer(capacity) if type(layer) is DynamicLayer else layer for layer in cache.layers
    ]
    return cache
