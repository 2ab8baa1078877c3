"""quantize_kv: sink and recent window exact, every older token quantized into a preallocated body.

  bits 8    symmetric, one absmax scale per token per KV head, int8 codes (or fp8 e4m3 codes with
            fp8=True); a token is quantized the step it leaves the window (evict_block 1).
  bits 4/2  KIVI: keys asymmetric per channel over groups of `key_group` tokens (a group is
            quantized once all of its tokens have left the window, so up to key_group - 1 extra
            tokens stay exact), values asymmetric per token over groups of `value_group` channels;
            codes packed planar (kv_quant.pack_codes).
The most recent tokens are always the exact ones: nothing is quantized before it leaves the window.
A decode step on the GPU quantizes what leaves (a token, or a completed group) in the same
ring_append kernel that writes the new token; prefill chunks and the CPU do it in evict() below.

Body layout: token-indexed tensors are [B, H, rows, X], rows = (n_groups + 1) * G (G =
evict_block, the +1 group is a trash group for masked writes) rounded up to whole blocks of
value codes, which are [B, H, rows / VALUE_BLOCK, X, VALUE_BLOCK] (kv_quant.block_value_codes;
X = D, or the packed bytes of KIVI); KIVI's per-group key parameters are [B, H, rows / G, D].
"""
import torch

import kv_quant as kq
from decode_attention import attention_reference, decode_attention
from kv_cache import batch_rows
from kv_quant import QuantizedBody
from profiling import profiler_range
from sink_window import SinkWindowCache, floor_div

BITS = (8, 4, 2)


class QuantizedCache(SinkWindowCache):
    def __init__(self, batch_size, max_seq_length, n_kv_heads, head_dim, dtype, device, sink_size, window_size, bits=8,
                 key_group=0, value_group=0, fp8=False, decode_kernels=None, **_):
        assert bits in BITS and (bits == 8 or not fp8)
        assert bits == 8 or (key_group > 0 and value_group > 0 and head_dim % value_group == 0), "KIVI needs its groups"
        if bits == 8:
            key_group = value_group = 0  # one scale per token: no groups
        block = 1 if bits == 8 else key_group
        super().__init__(batch_size, n_kv_heads, head_dim, dtype, device, sink_size, window_size, evict_block=block,
                         decode_kernels=decode_kernels)
        self.bits, self.key_group, self.value_group, self.fp8 = bits, key_group, value_group, fp8
        self.n_groups = -(-max(max_seq_length - sink_size, 1) // block)
        tokens = (self.n_groups + 1) * block
        tokens = -(-tokens // kq.VALUE_BLOCK) * kq.VALUE_BLOCK  # whole blocks of value codes (kv_quant.VALUE_BLOCK)
        b, h, d = batch_size, n_kv_heads, head_dim
        zeros = lambda *shape, dt=dtype: torch.zeros(shape, dtype=dt, device=device)  # noqa: E731
        if bits == 8:
            code_dtype = torch.uint8 if fp8 else torch.int8  # fp8: e4m3 bit patterns (kv_quant)
            buffers = dict(
                k_codes=zeros(b, h, tokens, d, dt=code_dtype), k_scale=zeros(b, h, tokens, 1),
                v_codes=zeros(b, h, tokens // kq.VALUE_BLOCK, d, kq.VALUE_BLOCK, dt=code_dtype),
                v_scale=zeros(b, h, tokens, 1),
            )
        else:
            packed = d * bits // 8
            buffers = dict(
                k_codes=zeros(b, h, tokens, packed, dt=torch.uint8),
                k_scale=zeros(b, h, tokens // key_group, d), k_zero=zeros(b, h, tokens // key_group, d),
                v_codes=zeros(b, h, tokens // kq.VALUE_BLOCK, packed, kq.VALUE_BLOCK, dt=torch.uint8),
                v_scale=zeros(b, h, tokens, d // value_group), v_zero=zeros(b, h, tokens, d // value_group),
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
        bsz = k.shape[0]
        g = self.evict_block
        rows = kq.quantize_blocks(k, v, self.bits, self.key_group, self.value_group, self.fp8, self.exact_k.dtype)
        # Index the buffers as they are (tokens, or key groups): a write through a reshaped view
        # of a buffer makes the compiled step copy the whole buffer every step.
        token_dest = (dest[:, None] * g + torch.arange(g, device=dest.device)).flatten()  # [n_cand * G]
        key_group_dest = dest if self.bits != 8 else token_dest  # KIVI key scale/zero: one row per group
        dests = (token_dest, key_group_dest, key_group_dest, token_dest, token_dest, token_dest)
        for buf, index, new in zip(self._body_buffers(), dests, rows):
            if buf is not None:
                kq.write_token_rows(batch_rows(buf, bsz), index, new)

    # -- reads ----------------------------------------------------------------------------
    def body(self, bsz: int) -> QuantizedBody:
        """The quantized body (rows taken with batch_rows: a decode step's ring_append writes
        through them)."""
        tensors = [None if t is None else batch_rows(t, bsz) for t in self._body_buffers()]
        return QuantizedBody(self.bits, self.key_group, self.value_group, *tensors, fp8=self.fp8)

    def _body_buffers(self) -> tuple:
        zeros = (self.k_zero, self.v_zero) if self.bits != 8 else (None, None)
        return self.k_codes, self.k_scale, zeros[0], self.v_codes, self.v_scale, zeros[1]

    def dequantized_body(self, bsz: int, dtype):
        """[B, H, n_groups * G, D] keys and values (the trash block, and 8-bit rows that round the
        value codes up to whole blocks, left out)."""
        n = self.n_groups * self.evict_block
        k, v = kq.dequantize_body(self.body(bsz), dtype)
        return k[:, :, :n], v[:, :, :n]

    def n_quantized(self, pos: torch.Tensor) -> torch.Tensor:
        return self.n_evicted(pos)

    def attend(self, q, input_pos):
        bsz = q.shape[0]
        if self.kernel_step(q):
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
        return attention_reference([(q, k, v, torch.cat([sink_mask, body_mask, win_mask], dim=1))])
