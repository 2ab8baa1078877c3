"""The KV-cache interface and the full (uncompressed) cache.

A cache is an nn.Module whose buffers are all allocated in __init__. Its two calls are
    cache.update(input_pos, k, v)   # k, v: [B, H_kv, T, D], RoPE already applied to k
    y = cache.attend(q, input_pos)  # q: [B, H_q, T, D] -> y: [B, H_q, T, D]
with input_pos [T] the (contiguous, shared across the batch) positions of the new tokens.
Attention reaches update through rotate_and_update, which applies RoPE to q and k first: the
caches here do both in one kernel on a decode step (ring_append.py), others rotate in PyTorch
and call update.
Neither call may sync with the host or change a shape on the decode path (T == 1), so the
decode step captures as a CUDA graph; validity is a length or a mask computed from input_pos.
"""
from typing import Optional

import torch
import torch.nn as nn

import ring_append
from decode_attention import attention_reference, decode_attention
from rope import apply_rotary_emb


class KVCache(nn.Module):
    def __init__(self, device, decode_kernels: Optional[bool]):
        """decode_kernels: one-token steps through the decode kernels (custom ops: the Triton
        kernels on CUDA, their PyTorch references elsewhere); None: on CUDA devices only."""
        super().__init__()
        self.decode_kernels = torch.device(device or "cpu").type == "cuda" if decode_kernels is None else decode_kernels

    def kernel_step(self, x: torch.Tensor) -> bool:
        """x [B, H, T, D] is one decode step that the decode kernels serve."""
        return self.decode_kernels and x.shape[2] == 1

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        raise NotImplementedError

    def rotate_and_update(self, input_pos: torch.Tensor, freqs_cis: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                          v: torch.Tensor) -> torch.Tensor:
        """RoPE on q [B, H_q, T, D] and k [B, H_kv, T, D] (freqs_cis: input_pos's rows [T, D/2, 2]),
        then update(input_pos, k, v); returns q rotated."""
        q = apply_rotary_emb(q.transpose(1, 2), freqs_cis).transpose(1, 2)
        k = apply_rotary_emb(k.transpose(1, 2), freqs_cis).transpose(1, 2)
        self.update(input_pos, k, v)
        return q

    def attend(self, q: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def nbytes(self) -> int:
        """Bytes this cache holds on its device (every buffer, as allocated)."""
        return sum(b.numel() * b.element_size() for b in self.buffers())


def batch_rows(buf: torch.Tensor, bsz: int) -> torch.Tensor:
    """The first bsz rows of a cache buffer, or the buffer itself when the batch is full: writing
    through a slice puts a slice_scatter of the whole buffer into the compiled graph."""
    return buf if buf.shape[0] == bsz else buf[:bsz]


def full_cache_nbytes(batch_size: int, n_tokens: int, n_kv_heads: int, head_dim: int, n_layers: int, dtype=torch.bfloat16) -> int:
    """What a full cache of this many tokens would hold: the baseline memory ratios are taken to."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * batch_size * n_tokens * n_kv_heads * head_dim * n_layers * itemsize


class FullCache(KVCache):
    """Static preallocated cache of max_seq_length tokens in the model's dtype (gpt-fast's)."""

    def __init__(self, batch_size: int, max_seq_length: int, n_kv_heads: int, head_dim: int, dtype, device=None,
                 decode_kernels: Optional[bool] = None, **_):
        super().__init__(device, decode_kernels)
        shape = (batch_size, n_kv_heads, max_seq_length, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self._decode_len = None  # the valid length [1] rotate_and_write gave this step's attend

    def rotate_and_update(self, input_pos, freqs_cis, q, k, v):
        if not self.kernel_step(k):
            return super().rotate_and_update(input_pos, freqs_cis, q, k, v)
        bsz = k.shape[0]
        q, self._decode_len = ring_append.rotate_and_write(input_pos, q[:, :, 0], k[:, :, 0], v[:, :, 0], freqs_cis,
                                                           batch_rows(self.k_cache, bsz), batch_rows(self.v_cache, bsz))
        return q[:, :, None]

    def update(self, input_pos, k, v):
        self._decode_len = None
        batch_rows(self.k_cache, k.shape[0]).index_copy_(2, input_pos, k)
        batch_rows(self.v_cache, v.shape[0]).index_copy_(2, input_pos, v)

    def attend(self, q, input_pos):
        bsz = q.shape[0]
        k, v = self.k_cache[:bsz], self.v_cache[:bsz]
        if self.kernel_step(q):
            length, self._decode_len = self._decode_len, None
            return decode_attention(q[:, :, 0], k, v, exact_len=input_pos + 1 if length is None else length)[:, :, None]
        # Prefill chunks read keys [0, last position] only (one host sync per chunk, off the decode
        # graph); a CPU decode step masks the whole capacity so it stays sync-free. Either way the
        # mask is [T, N], never [max_seq, max_seq].
        if q.shape[2] > 1:
            n = int(input_pos[-1]) + 1
            k, v = k[:, :, :n], v[:, :, :n]
        mask = torch.arange(k.shape[2], device=q.device)[None, :] <= input_pos[:, None]
        return attention_reference([(q, k, v, mask)])
