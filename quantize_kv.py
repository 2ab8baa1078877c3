"""quantize_kv: sink and recent window exact, every older token quantized into a preallocated body.

  bits 8    symmetric, one absmax scale per token per KV head; a token is quantized the step it
            leaves the window (evict_block 1).
  bits 4/2  KIVI: keys asymmetric per channel over groups of `group_size` tokens (a group is
            quantized once all of its tokens have left the window, so up to group_size - 1 extra
            tokens stay exact), values asymmetric per token over groups of `group_size` channels;
            codes packed planar (kv_quant.pack_codes).
The most recent tokens are always the exact ones: nothing is quantized before it leaves the window.
A decode step on the GPU quantizes what leaves (a token, or a completed group) in the same
ring_append kernel that writes the new token; prefill chunks and the CPU do it in evict() below.

Body layout: token-indexed tensors are [B, H, (n_groups + 1) * G, X] (G = evict_block, the +1
group is a trash group for masked writes); per-group key parameters are [B, H, n_groups + 1, D].
"""
import torch

import kv_quant as kq
from decode_attention import QuantizedBody, decode_attention
from kv_cache import batch_rows, masked_attention, profiler_range, use_decode_kernel
from sink_window import SinkWindowCache, floor_div

BITS = (8, 4, 2)


class QuantizedCache(SinkWindowCache):
    def __init__(self, batch_size, max_seq_length, n_kv_heads, head_dim, dtype, device, sink_size, window_size, bits=8, group_size=32, **_):
        assert bits in BITS
        block = 1 if bits == 8 else group_size
        super().__init__(batch_size, n_kv_heads, head_dim, dtype, device, sink_size, window_size, evict_block=block)
        assert bits == 8 or head_dim % group_size == 0, "group_size must divide head_dim"
        self.bits, self.group_size = bits, group_size
        self.n_groups = -(-max(max_seq_length - sink_size, 1) // block)
        tokens = (self.n_groups + 1) * block
        b, h, d = batch_size, n_kv_heads, head_dim
        zeros = lambda *shape, dt=dtype: torch.zeros(shape, dtype=dt, device=device)  # noqa: E731
        if bits == 8:
            buffers = dict(
                k_codes=zeros(b, h, tokens, d, dt=torch.int8), k_scale=zeros(b, h, tokens, 1),
                v_codes=zeros(b, h, tokens, d, dt=torch.int8), v_scale=zeros(b, h, tokens, 1),
            )
        else:
            packed = d * bits // 8
            buffers = dict(
                k_codes=zeros(b, h, tokens, packed, dt=torch.uint8),
                k_scale=zeros(b, h, self.n_groups + 1, d), k_zero=zeros(b, h, self.n_groups + 1, d),
                v_codes=zeros(b, h, tokens, packed, dt=torch.uint8),
                v_scale=zeros(b, h, tokens, d // group_size), v_zero=zeros(b, h, tokens, d // group_size),
            )
        for name, buf in buffers.items():
            self.register_buffer(name, buf, persistent=False)

    # -- eviction: quantize the blocks that leave the window during this chunk --------------
    def evict(self, input_pos, bsz):
        g, s, w = self.evict_block, self.sink_size, self.window_size
        t = input_pos.shape[0]
        n_cand = (t - 1) // g + 1  # most blocks one chunk can complete
        first = floor_div(input_pos[0] - w - s, g)
        blocks = first + torch.arange(n_cand, device=input_pos.device)  # [n_cand]
        done = (blocks >= 0) & (s + (blocks + 1) * g - 1 <= input_pos[-1] - w)
        dest = torch.where(done, blocks, torch.full_like(blocks, self.n_groups))
        token_pos = s + blocks[:, None] * g + torch.arange(g, device=input_pos.device)  # [n_cand, G]
        k, v = self.exact_tokens(token_pos.flatten(), bsz)  # [B, H, n_cand * G, D]
        with profiler_range("kv_quantize"):
            self._write_blocks(dest, k, v, n_cand)

    def _write_blocks(self, dest, k, v, n_cand):
        bsz, h, _, d = k.shape
        g, dt = self.evict_block, self.exact_k.dtype
        # Index the buffers as they are (tokens, or key groups): a write through a reshaped view
        # of a buffer makes the compiled step copy the whole buffer every step.
        token_dest = (dest[:, None] * g + torch.arange(g, device=dest.device)).flatten()  # [n_cand * G]

        def put_tokens(buf, value):  # value [B, H, n_cand * G, X]
            batch_rows(buf, bsz).index_copy_(2, token_dest, value.reshape(bsz, h, n_cand * g, -1))

        def put_groups(buf, value):  # value [B, H, n_cand, X]
            batch_rows(buf, bsz).index_copy_(2, dest, value.reshape(bsz, h, n_cand, -1))

        if self.bits == 8:
            for name, x in (("k", k), ("v", v)):
                codes, scale = kq.quantize_symmetric_per_token(x, dt)
                put_tokens(getattr(self, f"{name}_codes"), codes)
                put_tokens(getattr(self, f"{name}_scale"), scale)
            return
        kc, ks, kz = kq.quantize_asymmetric_per_channel(k.view(bsz, h, n_cand, g, d), self.bits, dt)
        put_tokens(self.k_codes, kq.pack_codes(kc, self.bits))
        put_groups(self.k_scale, ks)
        put_groups(self.k_zero, kz)
        vc, vs, vz = kq.quantize_asymmetric_per_token_group(v, self.bits, self.group_size, dt)
        put_tokens(self.v_codes, kq.pack_codes(vc, self.bits))
        put_tokens(self.v_scale, vs)
        put_tokens(self.v_zero, vz)

    # -- reads ----------------------------------------------------------------------------
    def body(self, bsz: int):
        """The quantized body as decode_attention.QuantizedBody (rows taken with batch_rows: a decode
        step's ring_append writes through them)."""
        kz = batch_rows(self.k_zero, bsz) if self.bits != 8 else None
        vz = batch_rows(self.v_zero, bsz) if self.bits != 8 else None
        return QuantizedBody(self.bits, self.evict_block, batch_rows(self.k_codes, bsz), batch_rows(self.k_scale, bsz), kz,
                             batch_rows(self.v_codes, bsz), batch_rows(self.v_scale, bsz), vz)

    def dequantized_body(self, bsz: int, dtype):
        """[B, H, n_groups * G, D] keys and values (the trash block left out)."""
        n = self.n_groups * self.evict_block
        if self.bits == 8:
            k = kq.dequantize_symmetric_per_token(self.k_codes[:bsz, :, :n], self.k_scale[:bsz, :, :n], dtype)
            v = kq.dequantize_symmetric_per_token(self.v_codes[:bsz, :, :n], self.v_scale[:bsz, :, :n], dtype)
            return k, v
        g, ng = self.group_size, self.n_groups
        kc = kq.unpack_codes(self.k_codes[:bsz, :, :n], self.bits)
        k = kq.dequantize_asymmetric(kc, kq.expand_per_channel(self.k_scale[:bsz, :, :ng], g),
                                     kq.expand_per_channel(self.k_zero[:bsz, :, :ng], g), dtype)
        vc = kq.unpack_codes(self.v_codes[:bsz, :, :n], self.bits)
        v = kq.dequantize_asymmetric(vc, kq.expand_per_token_group(self.v_scale[:bsz, :, :n], g),
                                     kq.expand_per_token_group(self.v_zero[:bsz, :, :n], g), dtype)
        return k, v

    def n_quantized(self, pos: torch.Tensor) -> torch.Tensor:
        return self.n_evicted(pos)

    def attend(self, q, input_pos):
        bsz = q.shape[0]
        if use_decode_kernel(q):
            mask, body_len = self.take_decode_validity()
            return decode_attention(q[:, :, 0], self.exact_k[:bsz], self.exact_v[:bsz], exact_len=None, exact_mask=mask,
                                    body=self.body(bsz), body_len=body_len)[:, :, None]

        # PyTorch path (CPU, prefill, and the kernel's reference): dequantize, then one softmax
        # over sink + body + recent exact tokens, each masked by what the query's moment holds.
        (sink_k, sink_v, sink_mask), (win_k, win_v, win_mask) = self.attention_inputs(input_pos, bsz)
        with profiler_range("kv_dequantize"):
            body_k, body_v = self.dequantized_body(bsz, q.dtype)
        body_mask = torch.arange(body_k.shape[2], device=q.device)[None, :] < self.n_quantized(input_pos)[:, None]
        k = torch.cat([sink_k, body_k, win_k.to(q.dtype)], dim=2)
        v = torch.cat([sink_v, body_v, win_v.to(q.dtype)], dim=2)
        return masked_attention(q, k, v, torch.cat([sink_mask, body_mask, win_mask], dim=1))
