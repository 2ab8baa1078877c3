"""Flash-decoding attention over a KV cache: exact slots plus an optional quantized body.

One new query token per sequence attends to two segments of its cache at once, under one
softmax: the *body* (int8 per-token or KIVI int4/int2, see kv_quant.py) and the *exact* slots
(unquantized, q's dtype). Decode is memory-bound, so the kernel's job is to read every valid
byte once and nothing past the current length:

- grid (B * Hkv, splits): each program owns one kv head and one chunk of the sequence; it loads
  each K/V tile once for all n_rep query heads that share it (GQA) and keeps an online softmax;
- the current length is read on the device and the chunk size derived from it inside the
  kernel, so the grid is static and a CUDA graph replay sees the cache grow;
- quantized tiles are dequantized in registers: int8 scales multiply the scores and P (the cheap
  side of the product); KIVI tiles are loaded once as packed bytes and unpacked per bit plane
  into bf16 keys and values (bf16 caches: a few packed-register PTX instructions per code pair,
  KIVI_ASM);
- a second small kernel combines the splits' partial outputs with their log-sum-exps.

CUDA tensors go to the Triton kernels, CPU tensors to `decode_attention_reference`, the
dequantize-then-attend PyTorch definition the kernels are tested against. Triton is imported
lazily: the module imports (and the reference runs) where triton is not installed.
"""
import functools
import math
from typing import NamedTuple, Optional

import torch

import kv_quant


class QuantizedBody(NamedTuple):
    """The quantized part of a cache, tokens [0, body_len) of capacity L; layouts in kv_quant.

    bits 8: k/v_codes int8 [B, Hkv, L, D], k/v_scale [B, Hkv, L, 1], zeros None.
    bits 4/2 (KIVI): k/v_codes uint8 [B, Hkv, L, D*bits/8] (planar), k_scale/k_zero
    [B, Hkv, L/group_size, D] (per channel over token groups), v_scale/v_zero
    [B, Hkv, L, D/group_size] (per token over channel groups).
    """
    bits: int
    group_size: int
    k_codes: torch.Tensor
    k_scale: torch.Tensor
    k_zero: Optional[torch.Tensor]
    v_codes: torch.Tensor
    v_scale: torch.Tensor
    v_zero: Optional[torch.Tensor]


# ----------------------------------------------------------------------------------------------
# Reference (CPU path and test oracle)
# ----------------------------------------------------------------------------------------------

def dequantize_body(body: QuantizedBody, dtype=torch.float32):
    """QuantizedBody -> (k, v), each [B, Hkv, L, D] in `dtype`, with kv_quant's functions."""
    if body.bits == 8:
        k = kv_quant.dequantize_symmetric_per_token(body.k_codes, body.k_scale, dtype)
        v = kv_quant.dequantize_symmetric_per_token(body.v_codes, body.v_scale, dtype)
        return k, v
    g = body.group_size
    k = kv_quant.dequantize_asymmetric(
        kv_quant.unpack_codes(body.k_codes, body.bits),
        kv_quant.expand_per_channel(body.k_scale, g),
        kv_quant.expand_per_channel(body.k_zero, g),
        dtype,
    )
    v = kv_quant.dequantize_asymmetric(
        kv_quant.unpack_codes(body.v_codes, body.bits),
        kv_quant.expand_per_token_group(body.v_scale, g),
        kv_quant.expand_per_token_group(body.v_zero, g),
        dtype,
    )
    return k, v


def decode_attention_reference(q, k, v, exact_len, exact_mask=None, body=None, body_len=None, sm_scale=None):
    """PyTorch definition: dequantize, concatenate [body; exact], masked softmax in fp32.

    No host syncs (lengths stay on the device), so it also runs inside a CUDA graph.
    """
    B, Hq, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    n_rep = Hq // Hkv
    scale = D ** -0.5 if sm_scale is None else sm_scale
    keys, values = [k.float()], [v.float()]
    valid = torch.ones(N, dtype=torch.bool, device=k.device)  # [N]
    if exact_len is not None:
        valid &= torch.arange(N, device=k.device) < exact_len.reshape(())
    if exact_mask is not None:
        valid = valid & exact_mask
    valids = [valid]
    if body is not None:
        kb, vb = dequantize_body(body, torch.float32)
        L = kb.shape[2]
        keys.insert(0, kb)
        values.insert(0, vb)
        valids.insert(0, torch.arange(L, device=k.device) < body_len.reshape(()))
    keys = torch.cat(keys, dim=2).repeat_interleave(n_rep, dim=1)  # [B, Hq, L+N, D]
    values = torch.cat(values, dim=2).repeat_interleave(n_rep, dim=1)
    valid = torch.cat(valids)  # [L+N]
    scores = torch.einsum("bhd,bhnd->bhn", q.float(), keys) * scale
    scores = scores.masked_fill(~valid, float("-inf"))
    # With no valid slot every score is -inf; softmax would give NaN, we give zeros.
    p = torch.softmax(scores.masked_fill(~valid.any(), 0.0), dim=-1) * valid
    out = torch.einsum("bhn,bhnd->bhd", p, values.masked_fill(~valid[:, None], 0.0))
    return out.to(q.dtype)


# ----------------------------------------------------------------------------------------------
# Triton kernels (defined on first use: triton is optional)
# ----------------------------------------------------------------------------------------------

# (bits, D) -> (BLOCK_N, num_warps, num_stages); bits 16 = exact slots. Chosen with
# scripts/bench_attention.py on an H100 (notes/kernel.md).
CONFIGS = {
    (16, 64): (64, 4, 4),
    (16, 128): (64, 4, 4),
    (8, 64): (64, 4, 3),
    (8, 128): (64, 4, 3),
    (4, 64): (64, 4, 3),
    (4, 128): (64, 4, 3),
    (2, 64): (64, 4, 3),
    (2, 128): (64, 4, 3),
}
# bf16 KIVI tiles unpacked and dequantized with inline PTX (other dtypes, and the interpreter,
# take the portable path).
KIVI_ASM = True
WAVES = 8  # programs per SM the split grid aims for (partial splits idle when len < capacity)
MIN_SPLIT = 512  # tokens of capacity per split at least (batch 1 at 32K ran best near 1K)


def _unpack_asm(bits):
    """PTX for four packed bytes (one register) -> every plane of them as bf16 128 + code, two per
    output register: PRMT orders the bytes (b0, b2, b1, b3) so that one LOP3 (mask, then OR the
    bf16 exponent of 128) yields the pair (byte i, byte i + 1) of a plane; about one instruction
    per code. Outputs $0, $1 are plane 0's elements (0, 1) and (2, 3), $2, $3 plane 1's, ..."""
    n = 8 // bits
    mask = (1 << bits) - 1
    lines = ["{", ".reg .b32 t, u;", f"prmt.b32 t, ${2 * n}, 0, 0x3120;"]
    for plane in range(n):
        for half in range(2):
            shift = 8 * half + plane * bits
            src = "t"
            if shift:
                lines.append(f"shr.u32 u, t, {shift};")
                src = "u"
            lines.append(f"lop3.b32 ${2 * plane + half}, {src}, 0x{mask | mask << 16:08x}, 0x43004300, 0xea;")
    return "\n".join(lines + ["}"])


_DEQUANT_PTX = "\n".join([
    "{", ".reg .b32 c, one, off;", "mov.b32 one, 0x3f803f80;", "mov.b32 off, 0xc300c300;",
    "fma.rn.bf16x2 c, $1, one, off;", "fma.rn.bf16x2 $0, c, $2, $3;", "}",
])


@functools.lru_cache(maxsize=None)
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def _plane_codes(packed, I: tl.constexpr, BITS: tl.constexpr):
        """Plane I of a packed uint8 tile as fp32 128 + code, exact: the code goes into the
        mantissa under the exponent of 128.0 (shift, mask, or; no int -> float conversion)."""
        c = (packed.to(tl.int32) >> (I * BITS)) & ((1 << BITS) - 1)
        return ((c << 16) | 0x43000000).to(tl.float32, bitcast=True)

    @triton.jit
    def _kivi_key_plane(q_i, kb, ks_row, kz_row, I: tl.constexpr, DP: tl.constexpr, BITS: tl.constexpr):
        """Scores of plane I (channels [I*DP, (I+1)*DP)) of a key tile within one token group.

        q_i [M, DP] in q's dtype, kb [DP, BLOCK_N] packed bytes. key = code * scale + zero
        dequantized in fp32 and rounded to q's dtype (as precise as a cache of that dtype), then
        q_i . key.
        """
        offs = I * DP + tl.arange(0, DP)
        ks = tl.load(ks_row + offs).to(tl.float32)
        kz = tl.load(kz_row + offs).to(tl.float32)
        kt = _plane_codes(kb, I, BITS) * ks[:, None] + (kz - 128.0 * ks)[:, None]  # one FMA: zero + code * scale
        return tl.dot(q_i, kt.to(q_i.dtype))

    @triton.jit
    def _kivi_value_plane(vb, vs_row, vz_row, ok_n, I: tl.constexpr, DP: tl.constexpr, G: tl.constexpr,
                          BITS: tl.constexpr, BLOCK_N: tl.constexpr):
        """Plane I of a value tile dequantized in fp32, [BLOCK_N, DP]: zero + code * scale with
        the per-token (scale, zero) of each channel's group (G >= DP: one group for the plane;
        else DP/G groups, loaded once per token and broadcast over their G channels)."""
        f = _plane_codes(vb, I, BITS)  # 128 + code
        if G >= DP:
            g = I * DP // G
            vs = tl.load(vs_row + g, mask=ok_n, other=0.0).to(tl.float32)  # [BLOCK_N]
            vz = tl.load(vz_row + g, mask=ok_n, other=0.0).to(tl.float32)
            return f * vs[:, None] + (vz - 128.0 * vs)[:, None]
        else:
            NGP: tl.constexpr = DP // G
            offs_g = I * NGP + tl.arange(0, NGP)
            vs = tl.load(vs_row[:, None] + offs_g[None, :], mask=ok_n[:, None], other=0.0).to(tl.float32)
            vz = tl.load(vz_row[:, None] + offs_g[None, :], mask=ok_n[:, None], other=0.0).to(tl.float32)
            vs_c = tl.reshape(tl.broadcast_to(vs[:, :, None], [BLOCK_N, NGP, G]), [BLOCK_N, DP])
            vz_c = tl.reshape(tl.broadcast_to((vz - 128.0 * vs)[:, :, None], [BLOCK_N, NGP, G]), [BLOCK_N, DP])
            return f * vs_c + vz_c

    # bf16 caches (KIVI_ASM): codes unpacked and dequantized with packed-register PTX, about 2
    # instructions per code instead of ~6 (shift, mask, or, fp32 FMA, convert per element).
    @triton.jit
    def _unpack_planes(packed, BITS: tl.constexpr):
        """Every plane of a packed uint8 tile as bf16 128 + code (exact), a tuple of 8 // BITS."""
        if BITS == 4:
            return tl.inline_asm_elementwise(_UNPACK4_ASM, "=r,=r,=r,=r,r", [packed],
                                             dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)
        else:
            return tl.inline_asm_elementwise(_UNPACK2_ASM, "=r,=r,=r,=r,=r,=r,=r,=r,r", [packed],
                                             dtype=(tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16),
                                             is_pure=True, pack=4)

    @triton.jit
    def _dequant_bf16(f, scale, zero):
        """(128 + code) - 128 (exact), then code * scale + zero rounded once: two bf16x2 FMAs
        per pair of elements; scale and zero bf16, broadcast against f.

        is_pure=False pins it where it is written: a pure op is moved past the layout conversion
        into the dot operand's layout, where each thread holds codes of many tokens and loads a
        scale and zero for each (sm_90 SASS per 32-token int4 tile, G 32: 776 instructions, 64
        loads; pinned in the load layout, whose 16 codes per thread share one group: 414)."""
        return tl.inline_asm_elementwise(_DEQUANT_ASM, "=r,r,r,r", [f, scale, zero], dtype=tl.bfloat16,
                                         is_pure=False, pack=2)

    @triton.jit
    def _kivi_key_plane_bf16(f, ks_row, kz_row, I: tl.constexpr, DP: tl.constexpr):
        """Keys of plane I, [DP, BLOCK_N] bf16, from f = 128 + code and the group's channel params."""
        offs = I * DP + tl.arange(0, DP)
        return _dequant_bf16(f, tl.load(ks_row + offs)[:, None], tl.load(kz_row + offs)[:, None])

    @triton.jit
    def _kivi_value_plane_bf16(f, vs_row, vz_row, ok_n, I: tl.constexpr, DP: tl.constexpr, G: tl.constexpr,
                               NGP: tl.constexpr, BLOCK_N: tl.constexpr):
        """Values of plane I as bf16 [BLOCK_N, DP] from f = 128 + code [BLOCK_N, NGP, DP / NGP]:
        part j of the plane is in value group (I * DP + j * DP / NGP) // G."""
        groups = (I * DP + tl.arange(0, NGP) * (DP // NGP)) // G
        vs = tl.load(vs_row[:, None] + groups[None, :], mask=ok_n[:, None], other=0.0)  # [BLOCK_N, NGP]
        vz = tl.load(vz_row[:, None] + groups[None, :], mask=ok_n[:, None], other=0.0)
        return tl.reshape(_dequant_bf16(f, vs[:, :, None], vz[:, :, None]), [BLOCK_N, DP])

    # Triton resolves the helpers a kernel calls among the module's globals, not this closure.
    globals().update(_plane_codes=_plane_codes, _kivi_key_plane=_kivi_key_plane,
                     _kivi_value_plane=_kivi_value_plane, _unpack_planes=_unpack_planes,
                     _dequant_bf16=_dequant_bf16, _kivi_key_plane_bf16=_kivi_key_plane_bf16,
                     _kivi_value_plane_bf16=_kivi_value_plane_bf16,
                     _UNPACK4_ASM=tl.constexpr(_unpack_asm(4)), _UNPACK2_ASM=tl.constexpr(_unpack_asm(2)),
                     _DEQUANT_ASM=tl.constexpr(_DEQUANT_PTX))

    @triton.jit
    def _partial_kernel(
        Q, sqb, sqh,
        K, skb, skh, skn,  # codes (or exact slots)
        V, svb, svh, svn,
        KS, KZ, sksb, sksh, sksn,  # key scale / zero (same strides)
        VS, VZ, svsb, svsh, svsn,  # value scale / zero (same strides)
        LEN, MASK,
        O, LSE, so_b, so_h, so_s,  # partial out [B, Hq, S_total, D] fp32, lse [B, Hq, S_total]
        sl_b, sl_h,
        qk_scale, Hkv, split_offset, n_splits, cap,
        N_REP: tl.constexpr, M: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr,
        G: tl.constexpr, BLOCK_N: tl.constexpr, HAS_LEN: tl.constexpr, HAS_MASK: tl.constexpr,
        KIVI_ASM: tl.constexpr,
    ):
        bh = tl.program_id(0)
        split = tl.program_id(1)
        b = bh // Hkv
        h = bh % Hkv
        if HAS_LEN:
            seg_len = tl.minimum(tl.load(LEN).to(tl.int32), cap)  # never past the buffer
        else:
            seg_len = cap
        # Static grid, dynamic work: chunk of the *current* length, rounded up to the tile.
        chunk = tl.cdiv(tl.cdiv(seg_len, n_splits), BLOCK_N) * BLOCK_N
        start = split * chunk
        end = tl.minimum(start + chunk, seg_len)

        offs_m = tl.arange(0, M)
        row_ok = offs_m < N_REP
        heads = h * N_REP + offs_m  # query heads of this kv head
        offs_d = tl.arange(0, D)
        offs_n0 = tl.arange(0, BLOCK_N)
        m_i = tl.full([M], float("-inf"), tl.float32)
        l_i = tl.zeros([M], tl.float32)
        q_base = Q + b * sqb + heads * sqh  # [M]
        k_base = K + b * skb + h * skh
        v_base = V + b * svb + h * svh

        q = tl.load(q_base[:, None] + offs_d[None, :], mask=row_ok[:, None], other=0.0)  # [M, D]
        if BITS >= 8:
            acc = tl.zeros([M, D], tl.float32)
        else:
            # KIVI, planar (kv_quant): byte j of a token holds channels j, j + DP, ... at bit
            # offsets 0, BITS, ...; plane i = channels [i*DP, (i+1)*DP). Each tile is loaded
            # once as dense [BLOCK_N, DP] bytes and unpacked per plane in registers; the dots
            # run per plane over DP channels, one fp32 accumulator [M, DP] per plane.
            # BLOCK_N <= G and splits start on tile boundaries: a tile is within one key group.
            DP: tl.constexpr = D * BITS // 8  # bytes per token
            NPL: tl.constexpr = 8 // BITS  # planes
            offs_p = tl.arange(0, DP)
            q0 = tl.load(q_base[:, None] + offs_p[None, :], mask=row_ok[:, None], other=0.0)
            q1 = tl.load(q_base[:, None] + DP + offs_p[None, :], mask=row_ok[:, None], other=0.0)
            acc0 = tl.zeros([M, DP], tl.float32)
            acc1 = tl.zeros([M, DP], tl.float32)
            # Values of a bf16 cache (KIVI_ASM) load as [BLOCK_N, NGP, GV]: GV channels of a
            # plane share one value group, so each token's (scale, zero) broadcasts along the
            # last axis in registers; a reshape to [BLOCK_N, DP] then feeds the dot.
            GV: tl.constexpr = G if G < DP else DP
            NGP: tl.constexpr = DP // GV
            offs_v3 = tl.arange(0, NGP)[None, :, None] * GV + tl.arange(0, GV)[None, None, :]  # [1, NGP, GV]
            if NPL == 4:
                q2 = tl.load(q_base[:, None] + 2 * DP + offs_p[None, :], mask=row_ok[:, None], other=0.0)
                q3 = tl.load(q_base[:, None] + 3 * DP + offs_p[None, :], mask=row_ok[:, None], other=0.0)
                acc2 = tl.zeros([M, DP], tl.float32)
                acc3 = tl.zeros([M, DP], tl.float32)
        ks_base = KS + b * sksb + h * sksh
        kz_base = KZ + b * sksb + h * sksh
        vs_base = VS + b * svsb + h * svsh
        vz_base = VZ + b * svsb + h * svsh

        for n0 in range(start, end, BLOCK_N):
            offs_n = n0 + offs_n0
            ok_n = offs_n < end
            if HAS_MASK:
                ok_n = ok_n & (tl.load(MASK + offs_n, mask=ok_n, other=0) != 0)
            # ---- scores [M, BLOCK_N] ----
            if BITS == 16:
                kt = tl.load(k_base + offs_n[None, :] * skn + offs_d[:, None], mask=ok_n[None, :], other=0.0)
                s = tl.dot(q, kt)
            elif BITS == 8:
                kt = tl.load(k_base + offs_n[None, :] * skn + offs_d[:, None], mask=ok_n[None, :], other=0)
                ks = tl.load(ks_base + offs_n * sksn, mask=ok_n, other=0.0).to(tl.float32)
                s = tl.dot(q, kt.to(q.dtype)) * ks[None, :]
            else:
                kb = tl.load(k_base + offs_n[None, :] * skn + offs_p[:, None], mask=ok_n[None, :], other=0)  # [DP, BLOCK_N]
                ks_row = ks_base + (n0 // G) * sksn  # the tile's key group
                kz_row = kz_base + (n0 // G) * sksn
                if KIVI_ASM:
                    if NPL == 2:
                        f0, f1 = _unpack_planes(kb, BITS)
                    else:
                        f0, f1, f2, f3 = _unpack_planes(kb, BITS)
                    s = tl.dot(q0, _kivi_key_plane_bf16(f0, ks_row, kz_row, 0, DP))
                    s = tl.dot(q1, _kivi_key_plane_bf16(f1, ks_row, kz_row, 1, DP), s)
                    if NPL == 4:
                        s = tl.dot(q2, _kivi_key_plane_bf16(f2, ks_row, kz_row, 2, DP), s)
                        s = tl.dot(q3, _kivi_key_plane_bf16(f3, ks_row, kz_row, 3, DP), s)
                else:
                    s = _kivi_key_plane(q0, kb, ks_row, kz_row, 0, DP, BITS)
                    s += _kivi_key_plane(q1, kb, ks_row, kz_row, 1, DP, BITS)
                    if NPL == 4:
                        s += _kivi_key_plane(q2, kb, ks_row, kz_row, 2, DP, BITS)
                        s += _kivi_key_plane(q3, kb, ks_row, kz_row, 3, DP, BITS)
            s = tl.where(ok_n[None, :], s * qk_scale, float("-inf"))
            # ---- online softmax (base 2); a fully masked row keeps m = -inf, p = 0 ----
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_use)
            p = tl.exp2(s - m_use[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            m_i = m_new
            # ---- values ----
            if BITS == 16:
                vt = tl.load(v_base + offs_n[:, None] * svn + offs_d[None, :], mask=ok_n[:, None], other=0.0)
                acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt)
            elif BITS == 8:
                vt = tl.load(v_base + offs_n[:, None] * svn + offs_d[None, :], mask=ok_n[:, None], other=0)
                vsc = tl.load(vs_base + offs_n * svsn, mask=ok_n, other=0.0).to(tl.float32)
                acc = acc * alpha[:, None] + tl.dot((p * vsc[None, :]).to(q.dtype), vt.to(q.dtype))
            else:
                vs_row = vs_base + offs_n * svsn  # [BLOCK_N]
                vz_row = vz_base + offs_n * svsn
                pq = p.to(q.dtype)
                if KIVI_ASM:
                    vb3 = tl.load(v_base + offs_n[:, None, None] * svn + offs_v3, mask=ok_n[:, None, None], other=0)
                    if NPL == 2:
                        f0, f1 = _unpack_planes(vb3, BITS)
                    else:
                        f0, f1, f2, f3 = _unpack_planes(vb3, BITS)
                    acc0 = tl.dot(pq, _kivi_value_plane_bf16(f0, vs_row, vz_row, ok_n, 0, DP, G, NGP, BLOCK_N), acc0 * alpha[:, None])
                    acc1 = tl.dot(pq, _kivi_value_plane_bf16(f1, vs_row, vz_row, ok_n, 1, DP, G, NGP, BLOCK_N), acc1 * alpha[:, None])
                    if NPL == 4:
                        acc2 = tl.dot(pq, _kivi_value_plane_bf16(f2, vs_row, vz_row, ok_n, 2, DP, G, NGP, BLOCK_N),
                                      acc2 * alpha[:, None])
                        acc3 = tl.dot(pq, _kivi_value_plane_bf16(f3, vs_row, vz_row, ok_n, 3, DP, G, NGP, BLOCK_N),
                                      acc3 * alpha[:, None])
                else:
                    vb = tl.load(v_base + offs_n[:, None] * svn + offs_p[None, :], mask=ok_n[:, None], other=0)  # [BLOCK_N, DP]
                    v0 = _kivi_value_plane(vb, vs_row, vz_row, ok_n, 0, DP, G, BITS, BLOCK_N).to(q.dtype)
                    acc0 = tl.dot(pq, v0, acc0 * alpha[:, None])
                    v1 = _kivi_value_plane(vb, vs_row, vz_row, ok_n, 1, DP, G, BITS, BLOCK_N).to(q.dtype)
                    acc1 = tl.dot(pq, v1, acc1 * alpha[:, None])
                    if NPL == 4:
                        v2 = _kivi_value_plane(vb, vs_row, vz_row, ok_n, 2, DP, G, BITS, BLOCK_N).to(q.dtype)
                        acc2 = tl.dot(pq, v2, acc2 * alpha[:, None])
                        v3 = _kivi_value_plane(vb, vs_row, vz_row, ok_n, 3, DP, G, BITS, BLOCK_N).to(q.dtype)
                        acc3 = tl.dot(pq, v3, acc3 * alpha[:, None])

        # ---- partial result of this split: normalized out and log2-sum-exp ----
        has = l_i > 0
        inv_l = tl.where(has, 1.0 / tl.where(has, l_i, 1.0), 0.0)
        lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
        sp = split_offset + split
        o_row = O + b * so_b + heads * so_h + sp * so_s  # [M]
        # An empty split (past the current length) writes only its lse: the combine skips its out.
        row_ok = row_ok & (start < end)
        tl.store(LSE + b * sl_b + heads * sl_h + sp, lse, mask=offs_m < N_REP)
        if BITS >= 8:
            tl.store(o_row[:, None] + offs_d[None, :], acc * inv_l[:, None], mask=row_ok[:, None])
        else:  # plane i -> channels [i*DP, (i+1)*DP)
            o_p = o_row[:, None] + offs_p[None, :]
            tl.store(o_p, acc0 * inv_l[:, None], mask=row_ok[:, None])
            tl.store(o_p + DP, acc1 * inv_l[:, None], mask=row_ok[:, None])
            if NPL == 4:
                tl.store(o_p + 2 * DP, acc2 * inv_l[:, None], mask=row_ok[:, None])
                tl.store(o_p + 3 * DP, acc3 * inv_l[:, None], mask=row_ok[:, None])

    @triton.jit
    def _combine_kernel(
        O, LSE, so_bh, so_s, sl_bh, OUT, sout_b, sout_h, Hq, S,
        S_PAD: tl.constexpr, D: tl.constexpr,
    ):
        bh = tl.program_id(0)
        b = bh // Hq
        hq = bh % Hq
        offs_s = tl.arange(0, S_PAD)
        offs_d = tl.arange(0, D)
        lse = tl.load(LSE + bh * sl_bh + offs_s, mask=offs_s < S, other=float("-inf"))
        m = tl.max(lse, axis=0)
        m = tl.where(m == float("-inf"), 0.0, m)
        w = tl.exp2(lse - m)  # 0 for empty splits
        # An empty split's out was never written: not read (at short lengths most splits are empty).
        o = tl.load(O + bh * so_bh + offs_s[:, None] * so_s + offs_d[None, :], mask=(lse > float("-inf"))[:, None],
                    other=0.0)
        den = tl.sum(w, axis=0)
        out = tl.sum(o * w[:, None], axis=0) / tl.where(den > 0, den, 1.0)
        tl.store(OUT + b * sout_b + hq * sout_h + offs_d, out.to(OUT.dtype.element_ty))

    return triton, _partial_kernel, _combine_kernel


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def plan_splits(bh, capacities, block_ns, sm_count, waves=WAVES):
    """Static split counts per segment from shapes only: ~waves programs per SM in all,
    shared by capacity, at least MIN_SPLIT tokens (and one tile) per split."""
    target = max(1, math.ceil(waves * sm_count / bh))
    total = sum(capacities)
    splits = []
    for cap, bn in zip(capacities, block_ns):
        s = max(1, round(target * cap / max(total, 1)))
        splits.append(max(1, min(s, math.ceil(cap / max(bn, MIN_SPLIT)))))
    return splits


def _decode_attention_triton(q, k, v, exact_len, exact_mask, bits, group_size,
                             k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, body_len, sm_scale,
                             config=None, waves=WAVES, out=None, kivi_asm=None):
    """Launch: one partial kernel per segment into one buffer, then one combine.

    `config` overrides (BLOCK_N, num_warps, num_stages) for every segment (benchmark only);
    `out` is written in place if given (tests pass a poisoned one); `kivi_asm` overrides
    KIVI_ASM. A KIVI tile never spans two key groups: its BLOCK_N is at most group_size.
    """
    triton, partial_kernel, combine_kernel = _kernels()
    B, Hq, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    n_rep = Hq // Hkv
    M = max(16, triton.next_power_of_2(n_rep))
    qk_scale = sm_scale * 1.4426950408889634  # log2(e): the kernels use exp2
    segments = []  # (bits, capacity, BLOCK_N, warps, stages)
    has_body = k_codes is not None
    if has_body:
        bn, w, st = config or CONFIGS[(bits, D)]
        if bits in (4, 2):
            bn = min(bn, group_size)
        segments.append((bits, k_codes.shape[2], bn, w, st))
    bn, w, st = config or CONFIGS[(16, D)]
    segments.append((16, N, bn, w, st))
    # (CPU tensors reach here only under TRITON_INTERPRET=1, in local checks.)
    sm = _sm_count(q.device.index if q.device.index is not None else torch.cuda.current_device()) if q.is_cuda else 132
    splits = plan_splits(B * Hkv, [s[1] for s in segments], [s[2] for s in segments], sm, waves)
    s_total = sum(splits)
    o_part = torch.empty(B, Hq, s_total, D, device=q.device, dtype=torch.float32)
    lse = torch.empty(B, Hq, s_total, device=q.device, dtype=torch.float32)
    offset = 0
    for (seg_bits, cap, bn, w, st), n_splits in zip(segments, splits):
        if seg_bits == 16:
            K, V, LEN, mask = k, v, exact_len, exact_mask
            KS = KZ = VS = VZ = k  # unused
            ks_strides = vs_strides = (0, 0, 0)
        else:
            K, V, LEN, mask = k_codes, v_codes, body_len, None
            KS, VS = k_scale, v_scale
            KZ = k_zero if k_zero is not None else k_scale
            VZ = v_zero if v_zero is not None else v_scale
            ks_strides = k_scale.stride()[:3]
            vs_strides = v_scale.stride()[:3]
        partial_kernel[(B * Hkv, n_splits)](
            q, q.stride(0), q.stride(1),
            K, K.stride(0), K.stride(1), K.stride(2),
            V, V.stride(0), V.stride(1), V.stride(2),
            KS, KZ, *ks_strides,
            VS, VZ, *vs_strides,
            LEN if LEN is not None else q, mask if mask is not None else q,
            o_part, lse, o_part.stride(0), o_part.stride(1), o_part.stride(2),
            lse.stride(0), lse.stride(1),
            qk_scale, Hkv, offset, n_splits, cap,
            N_REP=n_rep, M=M, D=D, BITS=seg_bits, G=group_size if seg_bits in (4, 2) else 1,
            BLOCK_N=bn, HAS_LEN=LEN is not None, HAS_MASK=mask is not None,
            KIVI_ASM=bool(KIVI_ASM if kivi_asm is None else kivi_asm) and seg_bits in (4, 2) and q.dtype == torch.bfloat16
            and q.is_cuda,
            num_warps=w, num_stages=st,
        )
        offset += n_splits
    if out is None:
        out = torch.empty_like(q)
    s_pad = triton.next_power_of_2(s_total)
    combine_kernel[(B * Hq,)](
        o_part, lse, o_part.stride(1), o_part.stride(2), lse.stride(1),
        out, out.stride(0), out.stride(1), Hq, s_total,
        S_PAD=s_pad, D=D, num_warps=min(16, max(4, s_pad * D // 2048)),  # <= 64 fp32 of the tile per thread
    )
    return out


# ----------------------------------------------------------------------------------------------
# Custom op (flat arguments) and the public wrapper
# ----------------------------------------------------------------------------------------------

@torch.library.custom_op("kvcache::decode_attention", mutates_args=())
def _decode_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, exact_len: Optional[torch.Tensor],
    exact_mask: Optional[torch.Tensor], bits: int, group_size: int,
    k_codes: Optional[torch.Tensor], k_scale: Optional[torch.Tensor], k_zero: Optional[torch.Tensor],
    v_codes: Optional[torch.Tensor], v_scale: Optional[torch.Tensor], v_zero: Optional[torch.Tensor],
    body_len: Optional[torch.Tensor], sm_scale: float,
) -> torch.Tensor:
    if q.is_cuda:
        mask = exact_mask.view(torch.uint8) if exact_mask is not None else None
        return _decode_attention_triton(q, k, v, exact_len, mask, bits, group_size,
                                        k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, body_len, sm_scale)
    body = None
    if k_codes is not None:
        body = QuantizedBody(bits, group_size, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero)
    return decode_attention_reference(q, k, v, exact_len, exact_mask, body, body_len, sm_scale)


@_decode_attention_op.register_fake
def _(q, k, v, exact_len, exact_mask, bits, group_size, k_codes, k_scale, k_zero,
      v_codes, v_scale, v_zero, body_len, sm_scale):
    return torch.empty_like(q)


def _check(cond, msg):
    if not cond:
        raise ValueError(f"decode_attention: {msg}")


def _check_args(q, k, v, exact_len, exact_mask, body, body_len):
    _check(q.dim() == 3, f"q must be [B, Hq, D], got {tuple(q.shape)}")
    B, Hq, D = q.shape
    _check(k.dim() == 4 and k.shape == v.shape, f"k, v must be [B, Hkv, N, D] alike, got {tuple(k.shape)}, {tuple(v.shape)}")
    _check(k.shape[0] == B and k.shape[3] == D, f"k {tuple(k.shape)} does not match q {tuple(q.shape)}")
    Hkv, N = k.shape[1], k.shape[2]
    _check(Hq % Hkv == 0, f"Hq={Hq} is not a multiple of Hkv={Hkv}")
    _check(k.dtype == q.dtype and v.dtype == q.dtype, f"k/v dtype {k.dtype}/{v.dtype} != q dtype {q.dtype}")
    _check(q.stride(2) == 1 and k.stride(3) == 1 and v.stride(3) == 1, "q, k, v must be contiguous in the last dim")
    _check(exact_len is None or (exact_len.numel() == 1 and not exact_len.dtype.is_floating_point),
           "exact_len must be None or a one-element int tensor")
    if exact_mask is not None:
        _check(exact_mask.dtype == torch.bool and exact_mask.shape == (N,), f"exact_mask must be bool [{N}]")
    if q.is_cuda:
        _check(D >= 16 and D & (D - 1) == 0, f"head dim {D} must be a power of two >= 16 for the kernel")
        _check((16, D) in CONFIGS, f"no kernel config for head dim {D}")
    if body is None:
        return
    _check(body_len is not None and body_len.numel() == 1, "body needs body_len, a one-element int tensor")
    L = body.k_codes.shape[2]
    want = (B, Hkv, L)
    for name in ("k_codes", "v_codes", "k_scale", "v_scale"):
        t = getattr(body, name)
        _check(t.dim() == 4 and t.shape[:2] == want[:2], f"body.{name} must be [B={B}, Hkv={Hkv}, ...], got {tuple(t.shape)}")
        _check(t.stride(3) == 1, f"body.{name} must be contiguous in the last dim")
    _check(body.k_scale.dtype == q.dtype and body.v_scale.dtype == q.dtype, "body scales must be in q's dtype")
    if body.bits == 8:
        _check(body.k_codes.dtype == torch.int8 and body.v_codes.dtype == torch.int8, "bits 8 codes must be int8")
        _check(body.k_codes.shape == want + (D,) and body.v_codes.shape == want + (D,), "bits 8 codes must be [B, Hkv, L, D]")
        _check(body.k_scale.shape == want + (1,) and body.v_scale.shape == want + (1,), "bits 8 scales must be [B, Hkv, L, 1]")
        return
    _check(body.bits in (4, 2), f"body.bits must be 8, 4 or 2, got {body.bits}")
    g = body.group_size
    _check(g >= 16 and g & (g - 1) == 0 and D % g == 0, f"group_size {g} must be a power of two >= 16 dividing D={D}")
    _check(L % g == 0, f"body capacity {L} must be a multiple of group_size {g}")
    dp = D * body.bits // 8
    _check(body.k_codes.dtype == torch.uint8 and body.v_codes.dtype == torch.uint8, "bits 4/2 codes must be uint8")
    _check(body.k_codes.shape == want + (dp,) and body.v_codes.shape == want + (dp,), f"packed codes must be [B, Hkv, L, {dp}]")
    _check(dp >= 16 or not q.is_cuda, f"packed rows of {dp} bytes are too narrow for the kernel (D={D}, bits={body.bits})")
    _check(body.k_zero is not None and body.v_zero is not None, "bits 4/2 need k_zero and v_zero")
    _check(body.k_scale.shape == (B, Hkv, L // g, D) and body.k_zero.shape == body.k_scale.shape,
           f"k_scale/k_zero must be [B, Hkv, L/{g}, D]")
    _check(body.v_scale.shape == want + (D // g,) and body.v_zero.shape == body.v_scale.shape,
           f"v_scale/v_zero must be [B, Hkv, L, D/{g}]")
    _check(body.k_zero.stride() == body.k_scale.stride() and body.v_zero.stride() == body.v_scale.stride(),
           "zeros must have the same strides as their scales")


def decode_attention(q, k, v, exact_len, exact_mask=None, body=None, body_len=None, sm_scale=None):
    """Attention of one new token per sequence over [body; exact slots] with one softmax.

    q [B, Hq, D]; k, v [B, Hkv, N, D] exact slots (slot >= exact_len or exact_mask False ignored;
    exact_len None: all N slots count);
    body: QuantizedBody or None, tokens >= body_len ignored. Returns [B, Hq, D] in q's dtype.
    """
    _check_args(q, k, v, exact_len, exact_mask, body, body_len)
    scale = float(q.shape[-1] ** -0.5 if sm_scale is None else sm_scale)
    if body is None:
        return _decode_attention_op(q, k, v, exact_len, exact_mask, 16, 1,
                                    None, None, None, None, None, None, None, scale)
    return _decode_attention_op(q, k, v, exact_len, exact_mask, body.bits, body.group_size,
                                body.k_codes, body.k_scale, body.k_zero, body.v_codes, body.v_scale,
                                body.v_zero, body_len, scale)
