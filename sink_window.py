"""Shared machinery of the sink + sliding-window caches (compress_kv, quantize_kv).

Token at position p lives in:
  - the sink, slot p, if p < sink_size (kept exact forever);
  - the ring buffer, slot sink_size + (p - sink_size) % ring_size, while it is still exact;
  - nowhere (compress_kv) or the quantized body (quantize_kv) once it has been evicted.
Eviction happens in blocks of `evict_block` tokens (1 for compress_kv and int8; the KIVI group
size for int4/int2, whose keys are quantized per channel over a whole group): a block is
evicted once all of its tokens are older than the `window_size` most recent ones. So at
position P the exact tokens are the sink plus positions [sink + n_evicted(P), P], at least
`window_size` of them, at most window_size + evict_block - 1: the ring's size.

Sink and ring share one buffer `exact_k/exact_v` [B, H, sink + ring + 1, D]; the last slot is a
trash slot that absorbs writes which must not land (a masked write without a host sync).

A decode step through the decode kernels writes with one ring_append call per layer (from the
model's rotate_and_update, which rotates q and k in that same kernel); prefill
chunks, and caches built without the decode kernels, take the PyTorch path below (the slot rules
of ring_layout and the quantization of kv_quant.quantize_blocks, as ring_append's reference).
"""
import torch

import ring_append
import ring_layout
from kv_cache import KVCache, batch_rows


def floor_div(a: torch.Tensor, b: int) -> torch.Tensor:
    return torch.div(a, b, rounding_mode="floor")


class SinkWindowCache(KVCache):
    def __init__(self, batch_size, n_kv_heads, head_dim, dtype, device, sink_size, window_size, evict_block, decode_kernels):
        super().__init__(device, decode_kernels)
        self.sink_size, self.window_size, self.evict_block = sink_size, window_size, evict_block
        self.ring_size = window_size + evict_block - 1
        self.trash_slot = sink_size + self.ring_size
        shape = (batch_size, n_kv_heads, self.trash_slot + 1, head_dim)
        self.register_buffer("exact_k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("exact_v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self._recent = None
        self._decode_validity = None

    # -- positions -------------------------------------------------------------------------
    def n_evicted(self, pos: torch.Tensor) -> torch.Tensor:
        """Non-sink tokens no longer exact once the token at `pos` is in (elementwise)."""
        return ring_layout.n_evicted(pos, self.sink_size, self.window_size, self.evict_block)

    def slot_of(self, pos: torch.Tensor) -> torch.Tensor:
        return ring_layout.slot_of(pos, self.sink_size, self.ring_size)

    def exact_slot_positions(self, pos: torch.Tensor) -> torch.Tensor:
        """Position held by each exact slot once the token at scalar-tensor `pos` is written ([N]);
        -1 where a slot holds nothing valid."""
        return ring_layout.slot_positions(pos, self.trash_slot + 1, self.sink_size, self.window_size, self.evict_block)

    def take_decode_validity(self):
        """(exact slot valid [N] bool, body length [1]) from this decode step's ring_append: what
        decode_attention needs (every slot counts, the mask says which hold a token). Taken, not
        kept: a tensor left on the module would become an output of the compiled step, which
        CUDA-graph replays then track and which costs host time on every step."""
        validity, self._decode_validity = self._decode_validity, None
        return validity

    # -- writes ----------------------------------------------------------------------------
    def rotate_and_update(self, input_pos, freqs_cis, q, k, v):
        if not self.kernel_step(k):
            return super().rotate_and_update(input_pos, freqs_cis, q, k, v)
        bsz = k.shape[0]
        self._recent = None
        q, valid, body_len = ring_append.rotate_and_append(
            input_pos, q[:, :, 0], k[:, :, 0], v[:, :, 0], freqs_cis, batch_rows(self.exact_k, bsz),
            batch_rows(self.exact_v, bsz), self.sink_size, self.window_size, self.evict_block, self.body(bsz))
        self._decode_validity = valid, body_len
        return q[:, :, None]

    def update(self, input_pos, k, v):
        bsz, _, t, _ = k.shape
        if self.kernel_step(k):
            self._recent = None
            self._decode_validity = ring_append.ring_append(
                input_pos, k[:, :, 0], v[:, :, 0], batch_rows(self.exact_k, bsz), batch_rows(self.exact_v, bsz),
                self.sink_size, self.window_size, self.evict_block, self.body(bsz))
            return
        if t == 1:
            # A decode step: the tokens leaving the window are still in their ring slots, and
            # once the new token is written the buffer holds everything the query sees.
            self._recent = None
        else:
            # A chunk may overwrite ring slots its own queries still need: keep the exact tokens
            # before it, in position order, then the chunk: positions [P0 - ring, P1].
            recent_pos = input_pos[0] - self.ring_size + torch.arange(self.ring_size + t, device=k.device)
            ring_slots = self.slot_of(recent_pos[: self.ring_size].clamp(min=self.sink_size))
            recent_k = torch.cat([self.exact_k[:bsz, :, ring_slots], k], dim=2)  # [B, H, ring + T, D]
            recent_v = torch.cat([self.exact_v[:bsz, :, ring_slots], v], dim=2)
            self._recent = (recent_pos, recent_k, recent_v)
        self.evict(input_pos, bsz)

        # Only the last `ring` chunk tokens (and sink tokens) are written: no duplicate slots.
        keep = (input_pos < self.sink_size) | (torch.arange(t, device=k.device) >= t - self.ring_size)
        slots = torch.where(keep, self.slot_of(input_pos), torch.full_like(input_pos, self.trash_slot))
        batch_rows(self.exact_k, bsz).index_copy_(2, slots, k)
        batch_rows(self.exact_v, bsz).index_copy_(2, slots, v)

    def evict(self, input_pos, bsz) -> None:
        """PyTorch path: called before the new tokens are written; compress_kv drops, quantize_kv
        quantizes (reading the leaving tokens with exact_tokens). A GPU decode step's ring_append
        does it in its kernel."""

    def body(self, bsz: int):
        """The quantized body (kv_quant.QuantizedBody) that a decode step's ring_append
        quantizes what leaves the window into; None when nothing is kept past it (compress_kv)."""
        return None

    def exact_tokens(self, pos: torch.Tensor, bsz: int):
        """Keys and values [B, H, n, D] of positions `pos` [n] that are still exact before this
        update's writes (positions outside that range give unspecified rows)."""
        if self._recent is None:
            slots = self.slot_of(pos.clamp(min=self.sink_size))
            return self.exact_k[:bsz, :, slots], self.exact_v[:bsz, :, slots]
        recent_pos, recent_k, recent_v = self._recent
        src = (pos - recent_pos[0]).clamp(0, recent_pos.shape[0] - 1)
        return recent_k[:, :, src], recent_v[:, :, src]

    # -- attention masks -------------------------------------------------------------------
    def sink_mask(self, input_pos: torch.Tensor) -> torch.Tensor:
        """[T, sink]: sink slot j is visible to the query at P iff j <= P."""
        return torch.arange(self.sink_size, device=input_pos.device)[None, :] <= input_pos[:, None]

    def recent_mask(self, input_pos: torch.Tensor, recent_pos: torch.Tensor) -> torch.Tensor:
        """[T, ring + T]: a recent token is visible iff it is past the sink, not in the future,
        and still exact at the query's position."""
        first_exact = self.sink_size + self.n_evicted(input_pos)  # [T]
        return (recent_pos[None, :] <= input_pos[:, None]) & (recent_pos[None, :] >= first_exact[:, None])

    def attention_inputs(self, input_pos: torch.Tensor, bsz: int):
        """What T queries attend to, as (k, v, mask [T, n]) for the sink and for the window (the
        exact tokens past the sink): after a decode step straight from the buffer, after a chunk
        from the recent tokens kept by update()."""
        s = self.sink_size
        sink = (self.exact_k[:bsz, :, :s], self.exact_v[:bsz, :, :s], self.sink_mask(input_pos))
        if self._recent is None:
            held = self.exact_slot_positions(input_pos[0])[s:]  # [ring + 1]
            return sink, (self.exact_k[:bsz, :, s:], self.exact_v[:bsz, :, s:], (held >= 0)[None])
        recent_pos, recent_k, recent_v = self._recent
        return sink, (recent_k, recent_v, self.recent_mask(input_pos, recent_pos))
