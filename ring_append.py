"""One decode step's write into a sink + ring cache (sink_window.py), as one kernel per layer; the
same kernel writes the full cache's decode step (rotate_and_write: RoPE, then the token at slot
= position).

A decode step of compress_kv or quantize_kv writes the new token into its exact slot (applying
RoPE to it and to the step's queries on the way, when called as rotate_and_append) and, for
quantize_kv, first quantizes into the body what leaves the window at this step: int8, the one
token that leaves (evict_block 1); KIVI (bits 4/2, evict_block = the key group G), once every G
steps, the group whose last token leaves. In PyTorch that is a gather, the reductions and the
scatters per layer (KIVI: on every step, the write masked to a trash group), and inductor clones
the ring buffer to keep the reads of the leaving slots before the write that reuses one of them
(the ring holds window + G - 1 tokens, so the new token takes the slot of the oldest one). Here
one program per (sequence, kv head) reads what leaves, quantizes it, writes it to the body, then
writes the new token. The call also returns what decode_attention needs to know about the ring
after the write, so no layer computes it again: which exact slots hold a valid token, and how
many tokens the body holds.

CUDA tensors go to the Triton kernel, CPU tensors to `ring_append_reference`, the same function
in PyTorch (the test oracle). The quantization is kv_quant's, bit for bit: scales are a range
times the fp32 reciprocal of qmax (no multiply-add contraction anywhere), the elements are
divided by the scale with IEEE division and rounded half to even, and scales (zeros) rounded to
the cache's dtype are nudged one ulp out when they would leave part of the range uncovered.
"""
import functools
from typing import Optional

import torch

import kv_quant
from ring_layout import n_evicted, slot_of, slot_positions
from rope import apply_rotary_emb

KIVI_CHUNK = 16  # tokens of a completed KIVI group the kernel quantizes at a time


def ring_append_reference(pos, q, k, v, freqs, exact_k, exact_v, sink, window, evict_block,
                          k_codes=None, k_scale=None, k_zero=None, v_codes=None, v_scale=None, v_zero=None, bits=8,
                          fp8=False, value_group=0):
    """PyTorch definition (in place on the buffers). pos: [1]; k, v: [B, Hkv, D]; exact_k/v:
    [B, Hkv, sink + ring + 1, D]; the body, if any, laid out as in kv_quant.QuantizedBody (zeros
    None for int8 and fp8). With freqs (pos's RoPE rows [1, D/2, 2]) q [B, Hq, D] and k come
    unrotated and are rotated here; without, k comes rotated and q is None. Returns (q rotated
    [B, Hq, D] or an empty tensor without freqs, exact slot valid [N] bool, body length [1])."""
    p = pos.reshape(())
    ring = window + evict_block - 1
    q_rot = k.new_empty(0)
    if freqs is not None:
        q_rot = apply_rotary_emb(q[:, None], freqs)[:, 0]
        k = apply_rotary_emb(k[:, None], freqs)[:, 0]
    if k_codes is not None:
        _quantize_leaving_block(p, exact_k, exact_v, sink, window, evict_block, value_group, bits, fp8,
                                (k_codes, k_scale, k_zero, v_codes, v_scale, v_zero))
    slot = slot_of(p, sink, ring)
    exact_k[:, :, slot] = k
    exact_v[:, :, slot] = v
    held = slot_positions(p, exact_k.shape[2], sink, window, evict_block)
    return q_rot, held >= 0, n_evicted(pos, sink, window, evict_block)


def _quantize_leaving_block(p, exact_k, exact_v, sink, window, g, value_group, bits, fp8, body):
    """The block whose last token leaves the window at this step, if one does, quantized into
    the body (kv_quant.quantize_blocks, as the cache's own eviction): block j is body rows
    j * g + [0, g), its KIVI key scale and zero row j. int8/fp8 blocks are single tokens (g = 1)."""
    past = p - sink - window + 1  # non-sink tokens that have left the window
    complete = (past >= g) & (torch.remainder(past, g) == 0)
    j = (torch.div(past, g, rounding_mode="floor") - 1).clamp(min=0).reshape(1)
    rows = j * g + torch.arange(g, device=p.device)  # [G]
    slots = slot_of(sink + rows, sink, window + g - 1)  # the block's tokens, still in the ring
    new = kv_quant.quantize_blocks(exact_k[:, :, slots], exact_v[:, :, slots], bits, g, value_group, fp8, body[1].dtype)
    per_group = j if bits != 8 else rows
    for buf, idx, value in zip(body, (rows, per_group, per_group, rows, rows, rows), new):
        if buf is not None:
            kv_quant.write_token_rows(buf, idx, torch.where(complete, value, kv_quant.token_rows(buf, idx)))


@functools.lru_cache(maxsize=None)
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def _next_up(x, SCALE_BITS: tl.constexpr):
        """torch.nextafter(x, inf) for x >= +0: one more in the bit pattern."""
        return (x.to(tl.int16 if SCALE_BITS == 16 else tl.int32, bitcast=True) + 1).to(x.dtype, bitcast=True)

    @triton.jit
    def _next_down(x, SCALE_BITS: tl.constexpr):
        """torch.nextafter(x, -inf) for finite x: toward zero if x > 0; otherwise away from it, as
        from -0 (both zeros go to the smallest negative subnormal)."""
        b = x.to(tl.int16 if SCALE_BITS == 16 else tl.int32, bitcast=True)
        return tl.where(x > 0, b - 1, (b | -(1 << (SCALE_BITS - 1))) + 1).to(x.dtype, bitcast=True)

    @triton.jit
    def _scale_zero(lo, hi, DTYPE: tl.constexpr, BITS: tl.constexpr, SCALE_BITS: tl.constexpr):
        """kv_quant._asymmetric's scale and zero (in DTYPE) of the range [lo, hi] (fp32)."""
        qmax = (1 << BITS) - 1
        zero = lo.to(DTYPE)
        zero = tl.where(zero.to(tl.float32) > lo, _next_down(zero, SCALE_BITS), zero)
        scale = ((hi - zero.to(tl.float32)) * (1.0 / qmax)).to(DTYPE)
        scale = tl.where(zero.to(tl.float32) + scale.to(tl.float32) * qmax < hi, _next_up(scale, SCALE_BITS), scale)
        scale = tl.where(scale.to(tl.float32) == 0.0, 1.0, scale.to(tl.float32)).to(DTYPE)
        return scale, zero

    @triton.jit
    def _codes(x, scale, zero, BITS: tl.constexpr):
        """kv_quant._asymmetric's codes (int32) of x (fp32) for that scale and zero."""
        # Round half to even: (x - zero) / scale is in [0, ~qmax], far inside the range where adding
        # and taking away 1.5 * 2**23 leaves the fp32 adder to round it.
        c = (tl.math.div_rn(x - zero.to(tl.float32), scale.to(tl.float32)) + 12582912.0) - 12582912.0
        return tl.minimum(tl.maximum(c, 0.0), (1 << BITS) - 1).to(tl.int32)

    @triton.jit
    def _asymmetric(x, lo, hi, DTYPE: tl.constexpr, BITS: tl.constexpr, SCALE_BITS: tl.constexpr):
        """kv_quant._asymmetric: x, lo, hi fp32, broadcast alike -> (codes int32, scale, zero in DTYPE)."""
        scale, zero = _scale_zero(lo, hi, DTYPE, BITS, SCALE_BITS)
        return _codes(x, scale, zero, BITS), scale, zero

    @triton.jit
    def _pack(c, BITS: tl.constexpr):
        """kv_quant.pack_codes: c [T, 8 // BITS, D * BITS / 8] (axis 1 the plane) -> uint8 [T, D * BITS / 8]."""
        shift = tl.arange(0, 8 // BITS) * BITS
        return tl.sum(c << shift[None, :, None], axis=1).to(tl.uint8)

    # Triton resolves the helpers a kernel calls among the module's globals, not this closure.
    import pdl

    globals().update(_next_up=_next_up, _next_down=_next_down, _scale_zero=_scale_zero, _codes=_codes,
                     _asymmetric=_asymmetric, _pack=_pack, pdl=pdl, tl=tl)

    @triton.jit
    def _ring_append_kernel(
        POS, K, skb, skh, V, svb, svh,  # new token [B, Hkv, D]
        Q, sqb, sqh, QO, F,  # ROPE: query [B, Hq, D], its rotated copy (contiguous), RoPE rows [D/2, 2]
        EK, EV, seb, seh, sen,  # exact slots [B, Hkv, N, D] (k and v alike)
        KC, scb, sch, scn,  # key codes [B, Hkv, L, D] int8 or [B, Hkv, L, D * BITS / 8] packed
        VC, svcb, svch, svcn,  # value codes in blocks [B, Hkv, L / VB, D or packed bytes, VB], svcn per block
        KS, KZ, kpb, kph, kpn,  # key scale [B, Hkv, L, 1] int8; key scale and zero [B, Hkv, L / G, D] KIVI
        VS, VZ, vpb, vph, vpn,  # value scale [B, Hkv, L, 1] int8; value scale and zero [B, Hkv, L, D / G] KIVI
        VALID, BODY_LEN,
        Hkv, N, sink, window, ring,
        D: tl.constexpr, G: tl.constexpr, CHUNK: tl.constexpr, VG: tl.constexpr, VB: tl.constexpr, HAS_BODY: tl.constexpr,
        BITS: tl.constexpr,
        SCALE_BITS: tl.constexpr,
        N_PAD: tl.constexpr, FP8: tl.constexpr, ROPE: tl.constexpr, N_REP: tl.constexpr, N_REP_PAD: tl.constexpr,
        RING: tl.constexpr, PDL: tl.constexpr,
    ):
        """RING: a sink + ring cache (slots, eviction, validity as above); else a full cache, the
        token at slot `pos` and its valid length pos + 1 (BODY_LEN) written."""
        pdl.wait_for_inputs(PDL)
        # One short wave (a program per sequence and KV head): the attention kernel after it may
        # launch now and wait on the SMs, its launch hidden behind this kernel's dependent loads.
        pdl.let_dependents_launch(PDL)
        bh = tl.program_id(0)
        b = bh // Hkv
        h = bh % Hkv
        # Every load before the first store: the compiler cannot reorder a load past a store that
        # may alias it, so loads written between the stores would be serial memory round trips.
        pos = tl.load(POS)
        offs = tl.arange(0, D)
        pair = 2 * tl.arange(0, D // 2)  # the even channel of each RoPE pair (2i, 2i + 1)
        k_even = tl.load(K + b * skb + h * skh + pair)
        k_odd = tl.load(K + b * skb + h * skh + pair + 1)
        v_new = tl.load(V + b * svb + h * svh + offs)
        if ROPE:
            # rope.apply_rotary_emb in fp32, products and differences rounded one by one (no
            # contraction: enable_fp_fusion=False), as PyTorch computes it: bit for bit.
            cos, sin = tl.load(F + pair), tl.load(F + pair + 1)
            x0, x1 = k_even.to(tl.float32), k_odd.to(tl.float32)
            k_even = (x0 * cos - x1 * sin).to(k_even.dtype)
            k_odd = (x1 * cos + x0 * sin).to(k_odd.dtype)
            rep = tl.arange(0, N_REP_PAD)[:, None]
            q_rows = b * sqb + (h * N_REP + rep) * sqh + pair[None, :]  # [N_REP_PAD, D/2], this kv head's queries
            q_ok = rep < N_REP
            q0 = tl.load(Q + q_rows, mask=q_ok).to(tl.float32)
            q1 = tl.load(Q + q_rows + 1, mask=q_ok).to(tl.float32)
        if HAS_BODY and BITS == 8:
            leaving = pos - window
            if leaving >= sink:
                # kv_quant.quantize_symmetric_per_token (or quantize_fp8_per_token) of the leaving
                # key row, then value row.
                src = b * seb + h * seh + (sink + (leaving - sink) % ring) * sen
                row = leaving - sink
                QMAX: tl.constexpr = 448.0 if FP8 else 127.0  # kv_quant.FP8_MAX, INT8_MAX
                xk, xv = tl.load(EK + src + offs), tl.load(EV + src + offs)
                for i in tl.static_range(2):
                    x = (xk if i == 0 else xv).to(tl.float32)
                    scale_ptr = (KS + b * kpb + h * kph + row * kpn) if i == 0 else (VS + b * vpb + h * vph + row * vpn)
                    absmax = tl.max(tl.abs(x), axis=0)
                    s = (absmax * (1.0 / QMAX)).to(scale_ptr.dtype.element_ty)
                    if s.to(tl.float32) * QMAX < absmax:
                        s = _next_up(s, SCALE_BITS)
                    s = tl.where(s.to(tl.float32) == 0.0, 1.0, s.to(tl.float32)).to(scale_ptr.dtype.element_ty)
                    c = tl.math.div_rn(x, s.to(tl.float32))
                    if FP8:  # the nearest e4m3 value, ties to even, as PyTorch's cast; stored as its bits
                        c = tl.minimum(tl.maximum(c, -QMAX), QMAX).to(tl.float8e4nv).to(tl.uint8, bitcast=True)
                    else:
                        # Round half to even (torch.round): |x / s| <= 127.5, so adding and taking
                        # away 1.5 * 2**23 leaves the fp32 adder to round it.
                        c = (c + 12582912.0) - 12582912.0
                        c = tl.minimum(tl.maximum(c, -QMAX), QMAX).to(tl.int8)
                    if i == 0:
                        tl.store(KC + b * scb + h * sch + row * scn + offs, c)
                    else:  # kv_quant.write_token_rows: token row % VB of block row // VB
                        tl.store(VC + b * svcb + h * svch + (row // VB) * svcn + row % VB + offs * VB, c)
                    tl.store(scale_ptr, s)
        if HAS_BODY and BITS != 8:
            past = pos - sink - window + 1  # non-sink tokens that have left the window
            if (past >= G) & (past % G == 0):
                # Group j's last token leaves now: kv_quant's KIVI quantization of its G tokens,
                # CHUNK tokens at a time so that the kernel stays small in registers (a CTA that
                # held the whole [G, D] group took all of an SM's registers, so it could start
                # only on an empty SM, on every step, the group's or not).
                j = past // G - 1
                rows0 = j * G + tl.arange(0, CHUNK)  # body rows of the group's first chunk
                exact_rows = b * seb + h * seh
                W: tl.constexpr = D * BITS // 8  # packed bytes per token
                byte = tl.arange(0, W)
                # Keys, per channel over the group's tokens, loaded as x[t, p, i] = channel p * W + i
                # (the planes of kv_quant.pack_codes along axis 1): the range over every chunk,
                # then the codes chunk by chunk.
                ch = tl.arange(0, 8 // BITS)[:, None] * W + byte[None, :]  # [planes, W]
                lo = tl.full([1, 8 // BITS, W], float("inf"), tl.float32)
                hi = tl.full([1, 8 // BITS, W], float("-inf"), tl.float32)
                for c0 in range(0, G, CHUNK):
                    src = exact_rows + (sink + (c0 + rows0) % ring) * sen  # [CHUNK] exact rows
                    x = tl.load(EK + src[:, None, None] + ch[None, :, :]).to(tl.float32)  # [CHUNK, planes, W]
                    lo = tl.minimum(lo, tl.min(x, axis=0, keep_dims=True))
                    hi = tl.maximum(hi, tl.max(x, axis=0, keep_dims=True))
                s, z = _scale_zero(lo, hi, KS.dtype.element_ty, BITS, SCALE_BITS)  # [1, planes, W]
                for c0 in range(0, G, CHUNK):
                    src = exact_rows + (sink + (c0 + rows0) % ring) * sen
                    x = tl.load(EK + src[:, None, None] + ch[None, :, :]).to(tl.float32)
                    c = _codes(x, s, z, BITS)
                    tl.store(KC + (b * scb + h * sch + (c0 + rows0) * scn)[:, None] + byte[None, :], _pack(c, BITS))
                par = b * kpb + h * kph + j * kpn + ch[None, :, :]
                tl.store(KS + par, s)
                tl.store(KZ + par, z)
                # Values, per token over groups of VG channels: xv[t, g, i] = channel g * VG + i.
                grp = tl.arange(0, D // VG)
                for c0 in range(0, G, CHUNK):
                    src = exact_rows + (sink + (c0 + rows0) % ring) * sen
                    x = tl.load(EV + src[:, None, None] + (grp[:, None] * VG + tl.arange(0, VG)[None, :])[None, :, :])
                    x = x.to(tl.float32)
                    lo_v, hi_v = tl.min(x, axis=2, keep_dims=True), tl.max(x, axis=2, keep_dims=True)  # [CHUNK, D / VG, 1]
                    c, s_v, z_v = _asymmetric(x, lo_v, hi_v, VS.dtype.element_ty, BITS, SCALE_BITS)
                    c = tl.reshape(c, (CHUNK, 8 // BITS, W))  # channel order [CHUNK, D], split into planes
                    rows = c0 + rows0
                    # kv_quant.write_token_rows: token row % VB of block row // VB, byte by byte
                    blk = b * svcb + h * svch + (rows // VB) * svcn + rows % VB
                    tl.store(VC + blk[:, None] + byte[None, :] * VB, _pack(c, BITS))
                    par_v = b * vpb + h * vph + rows[:, None, None] * vpn + grp[None, :, None]
                    tl.store(VS + par_v, s_v)
                    tl.store(VZ + par_v, z_v)
        if HAS_BODY:
            tl.debug_barrier()  # every thread has read the leaving rows before one is overwritten
        if RING:
            slot = tl.where(pos < sink, pos, sink + (pos - sink) % ring)
        else:
            slot = pos
        dst = b * seb + h * seh + slot * sen
        tl.store(EK + dst + pair, k_even)
        tl.store(EK + dst + pair + 1, k_odd)
        tl.store(EV + dst + offs, v_new)
        if ROPE:
            q_out = b * Hkv * N_REP * D + (h * N_REP + rep) * D + pair[None, :]
            tl.store(QO + q_out, (q0 * cos[None, :] - q1 * sin[None, :]).to(QO.dtype.element_ty), mask=q_ok)
            tl.store(QO + q_out + 1, (q1 * cos[None, :] + q0 * sin[None, :]).to(QO.dtype.element_ty), mask=q_ok)
        if RING and bh == 0:
            past = tl.maximum(pos - sink - window + 1, 0)
            evicted = (past // G) * G
            tl.store(BODY_LEN, evicted)
            j = tl.arange(0, N_PAD)
            held = tl.where(j < sink, j, pos - ((pos - j) % ring + ring) % ring)
            ok = (held <= pos) & (held >= 0) & (j < N - 1) & ((j < sink) | (held >= sink + evicted))
            tl.store(VALID + j, ok.to(tl.uint8), mask=j < N)
        if not RING and bh == 0:
            tl.store(BODY_LEN, pos + 1)

    return triton, _ring_append_kernel


def _ring_append_triton(pos, q, k, v, freqs, exact_k, exact_v, sink, window, evict_block,
                        k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, bits, fp8, value_group, ring=True):
    """The kernel's launch; ring=False writes a full cache (exact_k/v its k/v cache, slot = pos,
    no body, an empty validity output and the cache's length pos + 1 in place of body_len)."""
    import pdl

    triton, kernel = _kernel()
    B, Hkv, N, D = exact_k.shape
    rope = freqs is not None
    if not rope:  # unused pointers
        q = freqs = k
    q, k, v = (x if x.stride(2) == 1 else x.contiguous() for x in (q, k, v))  # layouts inductor chose
    n_rep = q.shape[1] // Hkv
    q_rot = torch.empty(q.shape if rope else 0, dtype=q.dtype, device=q.device)
    freqs = freqs.contiguous()
    valid = torch.empty(N if ring else 0, dtype=torch.bool, device=k.device)
    body_len = torch.empty_like(pos)
    has_body = k_codes is not None
    if not has_body:  # unused pointers
        k_codes = k_scale = k_zero = v_codes = v_scale = v_zero = exact_k
    elif bits == 8:
        k_zero, v_zero = k_scale, v_scale
    kernel[(B * Hkv,)](
        pos, k, k.stride(0), k.stride(1), v, v.stride(0), v.stride(1),
        q, q.stride(0), q.stride(1), q_rot, freqs,
        exact_k, exact_v, *exact_k.stride()[:3],
        k_codes, *k_codes.stride()[:3], v_codes, *v_codes.stride()[:3],
        k_scale, k_zero, *k_scale.stride()[:3],
        v_scale, v_zero, *v_scale.stride()[:3],
        valid.view(torch.uint8), body_len,
        Hkv, N, sink, window, window + evict_block - 1,
        D=D, G=evict_block, CHUNK=min(evict_block, KIVI_CHUNK), VG=max(value_group, 1), VB=kv_quant.VALUE_BLOCK,
        HAS_BODY=has_body, BITS=bits, SCALE_BITS=k_scale.element_size() * 8,
        N_PAD=triton.next_power_of_2(N) if ring else 1, FP8=fp8, ROPE=rope, N_REP=n_rep,
        N_REP_PAD=triton.next_power_of_2(n_rep), RING=ring,
        num_warps=4 if has_body and bits != 8 else 1,  # KIVI: a [KIVI_CHUNK, D] tile at a time
        # No multiply-add contraction: zero + scale * qmax, and RoPE's products and sums, must
        # round one by one, as in PyTorch.
        enable_fp_fusion=False,
        **pdl.options(k),
    )
    return q_rot, valid, body_len


@torch.library.custom_op(
    "kvcache::ring_append", mutates_args=("exact_k", "exact_v", "k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero"))
def _ring_append_op(
    pos: torch.Tensor, q: Optional[torch.Tensor], k: torch.Tensor, v: torch.Tensor, freqs: Optional[torch.Tensor],
    exact_k: torch.Tensor, exact_v: torch.Tensor, sink: int, window: int, evict_block: int,
    k_codes: Optional[torch.Tensor], k_scale: Optional[torch.Tensor], k_zero: Optional[torch.Tensor],
    v_codes: Optional[torch.Tensor], v_scale: Optional[torch.Tensor], v_zero: Optional[torch.Tensor], bits: int,
    fp8: bool, value_group: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # Triton converts to e4m3 with the hardware's cvt, which an A100 (sm_80) does not have: there
    # the fp8 write takes the PyTorch path (device ops only, so it still captures in a CUDA graph).
    kernel = k.is_cuda and not (fp8 and torch.cuda.get_device_capability(k.device) < (8, 9))
    fn = _ring_append_triton if kernel else ring_append_reference
    return fn(pos, q, k, v, freqs, exact_k, exact_v, sink, window, evict_block, k_codes, k_scale, k_zero, v_codes,
              v_scale, v_zero, bits, fp8, value_group)


@_ring_append_op.register_fake
def _(pos, q, k, v, freqs, exact_k, exact_v, sink, window, evict_block, k_codes, k_scale, k_zero, v_codes, v_scale,
      v_zero, bits, fp8, value_group):
    q_rot = k.new_empty(0) if freqs is None else torch.empty_like(q, memory_format=torch.contiguous_format)
    return q_rot, exact_k.new_empty(exact_k.shape[2], dtype=torch.bool), torch.empty_like(pos)


def ring_append(pos, k, v, exact_k, exact_v, sink, window, evict_block, body=None):
    """Write one new token per sequence (k, v [B, Hkv, D], RoPE applied to k) at position `pos`
    ([1], on the device) into the exact slots; with body (a kv_quant.QuantizedBody whose buffers
    it writes), first quantize what leaves the window at this step: the leaving token (int8/fp8,
    evict_block 1) or the key group it completes (KIVI, evict_block = key_group). Returns
    (valid [N] bool, body_len [1])."""
    _, valid, body_len = _checked_op(pos, None, k, v, None, exact_k, exact_v, sink, window, evict_block, body)
    return valid, body_len


def rotate_and_append(pos, q, k, v, freqs, exact_k, exact_v, sink, window, evict_block, body=None):
    """ring_append of k and v with RoPE applied in the same kernel, to k and to q [B, Hq, D]
    (unrotated both, freqs pos's rows [1, D/2, 2] of the RoPE table): one launch where the
    rotations would be two more. Returns (q rotated [B, Hq, D], valid [N] bool, body_len [1])."""
    _check_rope(q, k, freqs)
    return _checked_op(pos, q, k, v, freqs, exact_k, exact_v, sink, window, evict_block, body)


def rotate_and_write_reference(pos, q, k, v, freqs, k_cache, v_cache):
    """A full cache's decode-step write in PyTorch (in place): RoPE on q [B, Hq, D] and k
    [B, Hkv, D] (freqs: pos's rows [1, D/2, 2]), k and v stored at slot pos of k_cache/v_cache
    [B, Hkv, L, D]. Returns (q rotated, the cache's valid length pos + 1 [1])."""
    p = pos.reshape(())
    k_cache[:, :, p] = apply_rotary_emb(k[:, None], freqs)[:, 0]
    v_cache[:, :, p] = v
    return apply_rotary_emb(q[:, None], freqs)[:, 0], pos + 1


@torch.library.custom_op("kvcache::rotate_and_write", mutates_args=("k_cache", "v_cache"))
def _rotate_and_write_op(pos: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, freqs: torch.Tensor,
                         k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if not k.is_cuda:
        return rotate_and_write_reference(pos, q, k, v, freqs, k_cache, v_cache)
    q_rot, _, length = _ring_append_triton(pos, q, k, v, freqs, k_cache, v_cache, 0, 0, 1, *(None,) * 6, 8, False, 0,
                                           ring=False)
    return q_rot, length


@_rotate_and_write_op.register_fake
def _(pos, q, k, v, freqs, k_cache, v_cache):
    return torch.empty_like(q, memory_format=torch.contiguous_format), torch.empty_like(pos)


def rotate_and_write(pos, q, k, v, freqs, k_cache, v_cache):
    """A full cache's decode-step write as one kernel: rotate_and_append's RoPE on q and k, then k
    and v [B, Hkv, D] stored at slot pos ([1], on the device) of k_cache/v_cache [B, Hkv, L, D].
    Returns (q rotated [B, Hq, D], the cache's valid length pos + 1 [1]): the length comes out of
    the same kernel, where computing it apart cost each layer a kernel of its own."""
    _check_rope(q, k, freqs)
    B, Hkv, _, D = k_cache.shape
    if k.shape != (B, Hkv, D) or v.shape != k.shape:
        raise ValueError(f"rotate_and_write: k, v must be [{B}, {Hkv}, {D}], got {tuple(k.shape)}, {tuple(v.shape)}")
    if k.is_cuda and (k_cache.stride(3) != 1 or v_cache.stride() != k_cache.stride() or D & (D - 1)):
        raise ValueError("rotate_and_write: the kernel needs k/v caches alike with contiguous rows, and a power-of-two "
                         "head dim")
    return _rotate_and_write_op(pos, q, k, v, freqs, k_cache, v_cache)


def _check_rope(q, k, freqs):
    if q.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2] or q.shape[1] % k.shape[1]:
        raise ValueError(f"RoPE in the cache write: q {tuple(q.shape)} must be [B, Hq, D] with Hq a multiple of k's "
                         f"heads, k {tuple(k.shape)}")
    if freqs.shape != (1, k.shape[2] // 2, 2) or freqs.dtype != torch.float32:
        raise ValueError(f"RoPE in the cache write: freqs must be one position's fp32 rows [1, {k.shape[2] // 2}, 2], "
                         f"got {tuple(freqs.shape)} {freqs.dtype}")


def _checked_op(pos, q, k, v, freqs, exact_k, exact_v, sink, window, evict_block, body):
    B, Hkv, N, D = exact_k.shape
    if k.shape != (B, Hkv, D) or v.shape != k.shape:
        raise ValueError(f"ring_append: k, v must be [{B}, {Hkv}, {D}], got {tuple(k.shape)}, {tuple(v.shape)}")
    if N != sink + window + evict_block:
        raise ValueError(f"ring_append: {N} exact slots, expected sink + ring + 1 = {sink + window + evict_block}")
    if body is not None and evict_block != (1 if body.bits == 8 else body.key_group):
        raise ValueError(f"ring_append: evict_block {evict_block} must be 1 for int8/fp8 (single tokens) and the "
                         f"KIVI key group for int4/int2 (whole groups; this body's: {body.key_group})")
    if k.is_cuda and (exact_k.stride(3) != 1 or exact_v.stride() != exact_k.stride() or D & (D - 1)):
        raise ValueError("ring_append: the kernel needs exact_k/v alike with contiguous rows, and a power-of-two head dim")
    if k.is_cuda and body is not None and not _kernel_takes(body, D):
        raise ValueError("ring_append: the kernel needs rows contiguous and value codes in whole blocks; KIVI scales "
                         "each like its zero, and groups that are powers of two dividing the head dim")
    args = (None,) * 6 + (8, False, 0) if body is None else (*body.tensors(), body.bits, body.fp8, body.value_group)
    return _ring_append_op(pos, q, k, v, freqs, exact_k, exact_v, sink, window, evict_block, *args)


def _kernel_takes(body, D: int) -> bool:
    # value codes in whole contiguous blocks (kv_quant.block_value_codes)
    blocks = body.v_codes.stride()[3:] == (kv_quant.VALUE_BLOCK, 1)
    if body.bits == 8:
        return blocks and all(t.stride(3) == 1 for t in (body.k_codes, body.k_scale, body.v_scale))
    tensors = [t for t in body.tensors() if t is not None]
    alike = blocks and all(t.stride(-1) == 1 for t in tensors)
    powers_of_two = all(g & (g - 1) == 0 for g in (body.key_group, body.value_group))
    return (alike and body.k_zero.stride() == body.k_scale.stride() and body.v_zero.stride() == body.v_scale.stride()
            and powers_of_two and D % body.value_group == 0)
