"""Key/value caches of the Florence-2 decoder: one interface, two implementations.

A transformer decoder that writes one token at a time recomputes nothing for the tokens before it
if it keeps, per layer, the keys and values of its self-attention (they grow by one token a step)
and of its cross-attention (computed once from the encoder states). `KeyValueCache` is what the
decoder (`language_model.Decoder.forward`) asks of a cache; two caches implement it:
- `KVCache`: lists of tensors that grow by concatenation (teacher forcing, the tests, the ONNX
  decoder step, whose inputs and outputs are exactly these tensors);
- `StaticKVCache`: buffers of their final size, written in place (generation: every step has the
  same shapes, so one compiled graph serves all of them, and nothing is reallocated).

Legend: B rows (samples, or samples x beams), h heads, d head width, S decoder tokens so far, t new
tokens, T encoder tokens, L capacity of a static cache.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch
from torch import Tensor


def causal_mask(t: int, past: int, device: torch.device) -> Tensor | None:
    """New query i (at position past + i) may see keys 0 .. past + i: boolean (1, 1, t, past + t)."""
    if t == 1:
        return None  # a single new token may see everything before it
    query_pos = torch.arange(t, device=device)[:, None] + past  # (t, 1)
    key_pos = torch.arange(past + t, device=device)[None, :]  # (1, past + t)
    return (key_pos <= query_pos)[None, None]  # (1, 1, t, past + t)


class KeyValueCache(ABC):
    """What the decoder needs from a cache. One step of the decoder calls, in this order:
    `start()` once, `self_attention_mask(start, t, device)` once, `append(layer, k, v)` and reads
    `cross_kv[layer]` for every layer, and `advance(t)` once. Beam search calls `reorder` between
    steps.

    Attributes:
        cross_kv: per layer, the cross-attention keys and values (B, h, T, d), computed once from
            the encoder states and never changed.
    """

    cross_kv: list[tuple[Tensor, Tensor]]

    @abstractmethod
    def start(self) -> int | Tensor:
        """The position of the first new token: the number of tokens cached (an int, or a 0-dim
        tensor on the model's device when the position must not need the host)."""

    @abstractmethod
    def append(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store a layer's keys/values of the t new tokens, each (B, h, t, d); return the keys/values
        that layer's self-attention reads, new ones included, each (B, h, S', d)."""

    @abstractmethod
    def self_attention_mask(self, start: int | Tensor, t: int, device: torch.device) -> Tensor | None:
        """Boolean mask broadcastable to (B, h, t, S'), True where the new query i (at position
        start + i) may attend: every cached token up to its own position. None = attend to all."""

    @abstractmethod
    def advance(self, t: int) -> None:
        """Count the t new tokens as cached (called once per step, after every layer appended)."""

    @abstractmethod
    def reorder(self, beam_index: Tensor, length: int | None = None) -> None:
        """Keep row beam_index[i] of the self-attention cache as row i (beam search), the first
        `length` positions at least (all when None). The cross-attention keys/values stay: beam
        search moves rows only between the beams of one sample, which share their encoder states
        (the original `_reorder_cache` does the same)."""


@dataclass
class KVCache(KeyValueCache):
    """Per decoder layer: self-attention keys/values (growing) and cross-attention keys/values (fixed).

    Each entry is (B, h, S, d) for self-attention and (B, h, T, d) for cross-attention. Every step
    concatenates the new keys/values to the old ones: the plain form, used by teacher forcing, the
    tests and the ONNX decoder step. Generation uses `StaticKVCache`, whose buffers never move.
    """

    self_kv: list[tuple[Tensor, Tensor]] = field(default_factory=list)
    cross_kv: list[tuple[Tensor, Tensor]] = field(default_factory=list)

    @property
    def length(self) -> int:
        """How many decoder tokens are cached (the position of the next token)."""
        return self.self_kv[0][0].shape[2] if self.self_kv else 0

    def start(self) -> int:
        return self.length

    def append(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if len(self.self_kv) > layer:  # a zero-length cache appends too (as in ONNX graphs)
            k = torch.cat([self.self_kv[layer][0], k], dim=2)  # (B, h, S, d)
            v = torch.cat([self.self_kv[layer][1], v], dim=2)  # (B, h, S, d)
            self.self_kv[layer] = (k, v)
        else:
            self.self_kv.append((k, v))
        return k, v

    def self_attention_mask(self, start: int, t: int, device: torch.device) -> Tensor | None:  # type: ignore[override]
        return causal_mask(t, start, device)  # (1, 1, t, S) or None for one new token

    def advance(self, t: int) -> None:
        """Nothing to do: the length is that of the stored keys."""

    def reorder(self, beam_index: Tensor, length: int | None = None) -> None:
        self.self_kv = [(k.index_select(0, beam_index), v.index_select(0, beam_index)) for k, v in self.self_kv]


class StaticKVCache(KeyValueCache):
    """A preallocated key/value cache for generation: every buffer has its final size from the start.

    Self-attention keys/values of all layers live in two tensors (layers, B, h, L, d) with room for L
    tokens; step n writes slot n in place and attends to all L slots, the ones not yet written
    masked out (so every step has the same shapes: one compiled graph serves them all, and no
    tensor is reallocated or concatenated). The next position is a 0-dim tensor on the model's
    device, advanced in place: a step needs no value from the host.

    Args:
        cross_kv: per layer, the cross-attention keys/values (B, h, T, d), computed once.
        capacity: L, the most decoder tokens this cache will hold (decoder start token included).
    """

    def __init__(self, cross_kv: list[tuple[Tensor, Tensor]], capacity: int) -> None:
        B, h, _, d = cross_kv[0][0].shape
        k0 = cross_kv[0][0]
        self.cross_kv = cross_kv
        self.keys = k0.new_zeros(len(cross_kv), B, h, capacity, d)  # (layers, B, h, L, d)
        self.values = torch.zeros_like(self.keys)  # (layers, B, h, L, d)
        self.position = torch.zeros((), dtype=torch.long, device=k0.device)  # next slot to write
        self.slots = torch.arange(capacity, device=k0.device)  # (L,)

    @property
    def capacity(self) -> int:
        return self.keys.shape[3]

    def start(self) -> Tensor:
        return self.position  # a 0-dim tensor

    def append(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write the new keys/values at the next t slots -> all L slots (B, h, L, d)."""
        new_slots = self.position + self.slots[: k.shape[2]]  # (t,)
        self.keys[layer].index_copy_(2, new_slots, k)
        self.values[layer].index_copy_(2, new_slots, v)
        return self.keys[layer], self.values[layer]

    def self_attention_mask(self, start: Tensor, t: int, device: torch.device) -> Tensor:  # type: ignore[override]
        """Slots not yet written are masked too: boolean (1, 1, t, L)."""
        query_pos = start + self.slots[:t, None]  # (t, 1)
        return (self.slots[None, :] <= query_pos)[None, None]  # (1, 1, t, L)

    def advance(self, t: int) -> None:
        self.position += t  # in place: the tensor a compiled step reads stays the same object

    def reorder(self, beam_index: Tensor, length: int | None = None) -> None:
        """Copies only the first `length` slots (all when None): the buffers stay where they are."""
        filled = slice(None, length)
        self.keys[:, :, :, filled] = self.keys[:, beam_index, :, filled]
        self.values[:, :, :, filled] = self.values[:, beam_index, :, filled]
