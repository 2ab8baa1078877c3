"""One decode step's write into a sink + ring cache (sink_window.py), as one kernel per layer.

A decode step of compress_kv or quantize_kv writes the new token into its exact slot and, for
int8 quantize_kv, first quantizes the token that leaves the window into the body. In PyTorch that
is a gather, two absmax reductions and six scatters per layer, and inductor clones the ring
buffer to keep the read of the leaving slot before the write that reuses it (the slot is the
same one: the ring holds exactly `window` tokens when evict_block is 1). Here one program per
(sequence, kv head) reads the leaving token, quantizes it, writes it to the body, then writes
the new token. The call also returns what decode_attention needs to know about the ring after
the write, so no layer computes it again: which exact slots hold a valid token, and how many
tokens the body holds.

CUDA tensors go to the Triton kernel, CPU tensors to `ring_append_reference`, the same function
in PyTorch (the test oracle). The quantization is kv_quant.quantize_symmetric_per_token's, bit
for bit: absmax times the fp32 reciprocal of 127, IEEE division of the elements by the scale,
round half to even, the scale nudged one ulp up when rounding it to the cache's dtype would leave
the largest element out of range.
"""
import functools
from typing import Optional

import torch

import kv_quant


def slot_of(pos: torch.Tensor, sink: int, ring: int) -> torch.Tensor:
    """Exact slot of the token at `pos` (elementwise): the sink keeps slot p, the ring wraps."""
    return torch.where(pos < sink, pos, sink + torch.remainder(pos - sink, ring))


def slot_positions(pos: torch.Tensor, n_slots: int, sink: int, window: int, evict_block: int) -> torch.Tensor:
    """Position held by each exact slot once the token at scalar-tensor `pos` is written ([n_slots],
    the last one being the trash slot); -1 where a slot holds nothing valid."""
    ring = window + evict_block - 1
    slots = torch.arange(n_slots, device=pos.device)
    ring_pos = pos - torch.remainder(pos - slots, ring)
    held = torch.where(slots < sink, slots, ring_pos)
    valid = (held <= pos) & (held >= 0) & (slots < n_slots - 1)
    valid &= (slots < sink) | (held >= sink + n_evicted(pos, sink, window, evict_block))
    return torch.where(valid, held, torch.full_like(held, -1))


def n_evicted(pos: torch.Tensor, sink: int, window: int, evict_block: int) -> torch.Tensor:
    """Non-sink tokens no longer exact once the token at `pos` is in (elementwise)."""
    past_window = (pos - sink - window + 1).clamp(min=0)
    return torch.div(past_window, evict_block, rounding_mode="floor") * evict_block


def ring_append_reference(pos, k, v, exact_k, exact_v, sink, window, evict_block,
                          k_codes=None, k_scale=None, v_codes=None, v_scale=None):
    """PyTorch definition (in place on the buffers). pos: [1]; k, v: [B, Hkv, D] (RoPE applied);
    exact_k/v: [B, Hkv, sink + ring + 1, D]; body (int8, evict_block 1 only): codes [B, Hkv, L, D],
    scales [B, Hkv, L, 1]. Returns (exact slot valid [N] bool, body length [1])."""
    p = pos.reshape(())
    ring = window + evict_block - 1
    if k_codes is not None:
        leaving = p - window  # the token that leaves the window at this step
        slot = slot_of(leaving.clamp(min=sink), sink, ring)
        row = (leaving - sink).clamp(min=0)
        keep = (leaving >= sink).reshape(1, 1, 1)
        for src, codes, scale in ((exact_k, k_codes, k_scale), (exact_v, v_codes, v_scale)):
            c, s = kv_quant.quantize_symmetric_per_token(src[:, :, slot], scale.dtype)
            codes[:, :, row] = torch.where(keep, c, codes[:, :, row])
            scale[:, :, row] = torch.where(keep, s, scale[:, :, row])
    slot = slot_of(p, sink, ring)
    exact_k[:, :, slot] = k
    exact_v[:, :, slot] = v
    held = slot_positions(p, exact_k.shape[2], sink, window, evict_block)
    return held >= 0, n_evicted(pos, sink, window, evict_block)


@functools.lru_cache(maxsize=None)
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def _ring_append_kernel(
        POS, K, skb, skh, V, svb, svh,  # new token [B, Hkv, D]
        EK, EV, seb, seh, sen,  # exact slots [B, Hkv, N, D] (k and v alike)
        KC, VC, scb, sch, scn,  # int8 codes [B, Hkv, L, D] (k and v alike)
        KS, VS, ssb, ssh, ssn,  # scales [B, Hkv, L, 1]
        VALID, BODY_LEN,
        Hkv, N, sink, window, ring, evict_block,
        D: tl.constexpr, HAS_BODY: tl.constexpr, SCALE_BITS: tl.constexpr, N_PAD: tl.constexpr,
    ):
        bh = tl.program_id(0)
        b = bh // Hkv
        h = bh % Hkv
        pos = tl.load(POS)
        offs = tl.arange(0, D)
        if HAS_BODY:
            leaving = pos - window
            if leaving >= sink:
                # kv_quant.quantize_symmetric_per_token of the leaving key row, then value row.
                src = b * seb + h * seh + (sink + (leaving - sink) % ring) * sen
                row = leaving - sink
                for i in tl.static_range(2):
                    x = tl.load((EK if i == 0 else EV) + src + offs).to(tl.float32)
                    scale_ptr = (KS if i == 0 else VS) + b * ssb + h * ssh + row * ssn
                    absmax = tl.max(tl.abs(x), axis=0)
                    s = (absmax * (1.0 / 127.0)).to(scale_ptr.dtype.element_ty)  # 127: kv_quant.INT8_MAX
                    if s.to(tl.float32) * 127.0 < absmax:  # one ulp up (s > 0 here)
                        if SCALE_BITS == 16:
                            s = (s.to(tl.int16, bitcast=True) + 1).to(scale_ptr.dtype.element_ty, bitcast=True)
                        else:
                            s = (s.to(tl.int32, bitcast=True) + 1).to(scale_ptr.dtype.element_ty, bitcast=True)
                    s = tl.where(s.to(tl.float32) == 0.0, 1.0, s.to(tl.float32)).to(scale_ptr.dtype.element_ty)
                    # Round half to even (torch.round): |x / s| <= 127.5, so adding and taking away
                    # 1.5 * 2**23 leaves the fp32 adder to round it.
                    c = (tl.math.div_rn(x, s.to(tl.float32)) + 12582912.0) - 12582912.0
                    c = tl.minimum(tl.maximum(c, -127.0), 127.0)
                    tl.store((KC if i == 0 else VC) + b * scb + h * sch + row * scn + offs, c.to(tl.int8))
                    tl.store(scale_ptr, s)
            tl.debug_barrier()  # every thread has read the leaving row before it is overwritten
        slot = tl.where(pos < sink, pos, sink + (pos - sink) % ring)
        dst = b * seb + h * seh + slot * sen
        tl.store(EK + dst + offs, tl.load(K + b * skb + h * skh + offs))
        tl.store(EV + dst + offs, tl.load(V + b * svb + h * svh + offs))
        if bh == 0:
            past = tl.maximum(pos - sink - window + 1, 0)
            evicted = (past // evict_block) * evict_block
            tl.store(BODY_LEN, evicted)
            j = tl.arange(0, N_PAD)
            held = tl.where(j < sink, j, pos - ((pos - j) % ring + ring) % ring)
            ok = (held <= pos) & (held >= 0) & (j < N - 1) & ((j < sink) | (held >= sink + evicted))
            tl.store(VALID + j, ok.to(tl.uint8), mask=j < N)

    return triton, _ring_append_kernel


def _ring_append_triton(pos, k, v, exact_k, exact_v, sink, window, evict_block, k_codes, k_scale, v_codes, v_scale):
    triton, kernel = _kernel()
    B, Hkv, N, D = exact_k.shape
    k, v = (x if x.stride(2) == 1 else x.contiguous() for x in (k, v))  # layouts inductor chose
    valid = torch.empty(N, dtype=torch.bool, device=k.device)
    body_len = torch.empty_like(pos)
    has_body = k_codes is not None
    kc, vc, ks, vs = (k_codes, v_codes, k_scale, v_scale) if has_body else (exact_k, exact_v, exact_k, exact_v)
    kernel[(B * Hkv,)](
        pos, k, k.stride(0), k.stride(1), v, v.stride(0), v.stride(1),
        exact_k, exact_v, *exact_k.stride()[:3],
        kc, vc, *kc.stride()[:3],
        ks, vs, *ks.stride()[:3],
        valid.view(torch.uint8), body_len,
        Hkv, N, sink, window, window + evict_block - 1, evict_block,
        D=D, HAS_BODY=has_body, SCALE_BITS=ks.element_size() * 8, N_PAD=triton.next_power_of_2(N), num_warps=1,
    )
    return valid, body_len


@torch.library.custom_op("kvcache::ring_append", mutates_args=("exact_k", "exact_v", "k_codes", "k_scale", "v_codes", "v_scale"))
def _ring_append_op(
    pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, exact_k: torch.Tensor, exact_v: torch.Tensor,
    sink: int, window: int, evict_block: int,
    k_codes: Optional[torch.Tensor], k_scale: Optional[torch.Tensor],
    v_codes: Optional[torch.Tensor], v_scale: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    fn = _ring_append_triton if k.is_cuda else ring_append_reference
    return fn(pos, k, v, exact_k, exact_v, sink, window, evict_block, k_codes, k_scale, v_codes, v_scale)


@_ring_append_op.register_fake
def _(pos, k, v, exact_k, exact_v, sink, window, evict_block, k_codes, k_scale, v_codes, v_scale):
    return exact_k.new_empty(exact_k.shape[2], dtype=torch.bool), torch.empty_like(pos)


def ring_append(pos, k, v, exact_k, exact_v, sink, window, evict_block, body=None):
    """Write one new token per sequence (k, v [B, Hkv, D]) at position `pos` ([1], on the device)
    into the exact slots; with body = (k_codes, k_scale, v_codes, v_scale) of an int8 cache, first
    quantize the token leaving the window. Returns (valid [N] bool, body_len [1])."""
    B, Hkv, N, D = exact_k.shape
    if k.shape != (B, Hkv, D) or v.shape != k.shape:
        raise ValueError(f"ring_append: k, v must be [{B}, {Hkv}, {D}], got {tuple(k.shape)}, {tuple(v.shape)}")
    if N != sink + window + evict_block:
        raise ValueError(f"ring_append: {N} exact slots, expected sink + ring + 1 = {sink + window + evict_block}")
    if body is not None and evict_block != 1:
        raise ValueError("ring_append: only an int8 body (evict_block 1) is quantized here")
    if k.is_cuda and (exact_k.stride(3) != 1 or exact_v.stride() != exact_k.stride() or D & (D - 1)):
        raise ValueError("ring_append: the kernel needs exact_k/v alike with contiguous rows, and a power-of-two head dim")
    if k.is_cuda and body is not None and (body[0].stride() != body[2].stride() or body[1].stride() != body[3].stride()
                                           or body[0].stride(3) != 1):
        raise ValueError("ring_append: k and v codes (and scales) must have the same layout, rows contiguous")
    return _ring_append_op(pos, k, v, exact_k, exact_v, sink, window, evict_block, *(body or (None,) * 4))
