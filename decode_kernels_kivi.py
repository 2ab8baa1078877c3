"""The Triton flash-decoding kernel for KIVI bodies (int4 / int2): the partial kernel over one
segment of packed codes, launched by decode_kernels (which combines the splits).

Planar packing (kv_quant): byte j of a token holds channels j, j + DP, ... at bit offsets 0, BITS,
...; plane i = channels [i*DP, (i+1)*DP). Each tile is loaded once as dense [BLOCK_N, DP] bytes and
unpacked per plane in registers; the dots run per plane over DP channels, one fp32 accumulator
[M, DP] per plane. A tile never spans two key groups (BLOCK_N <= G, the key group, and splits
start on tile boundaries); VG is the value group. bf16 caches (KIVI_ASM) unpack and dequantize with packed-register PTX, a few
instructions per code pair; other dtypes and the interpreter take the portable path.
"""
import triton
import triton.language as tl

from decode_kernels import finish_split, online_softmax, split_bounds


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


_UNPACK4_ASM = tl.constexpr(_unpack_asm(4))
_UNPACK2_ASM = tl.constexpr(_unpack_asm(2))
_DEQUANT_ASM = tl.constexpr(_DEQUANT_PTX)


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


@triton.jit
def kivi_partial_kernel(
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
    G: tl.constexpr, VG: tl.constexpr, BLOCK_N: tl.constexpr, HAS_LEN: tl.constexpr, HAS_MASK: tl.constexpr,
    KIVI_ASM: tl.constexpr,
):
    b = tl.program_id(0) // Hkv
    h = tl.program_id(0) % Hkv
    start, end = split_bounds(LEN, cap, n_splits, HAS_LEN, BLOCK_N)

    offs_m = tl.arange(0, M)
    row_ok = offs_m < N_REP
    heads = h * N_REP + offs_m  # query heads of this kv head
    offs_n0 = tl.arange(0, BLOCK_N)
    m_i = tl.full([M], float("-inf"), tl.float32)
    l_i = tl.zeros([M], tl.float32)
    q_base = Q + b * sqb + heads * sqh  # [M]
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh

    DP: tl.constexpr = D * BITS // 8  # bytes per token
    NPL: tl.constexpr = 8 // BITS  # planes
    offs_p = tl.arange(0, DP)
    q0 = tl.load(q_base[:, None] + offs_p[None, :], mask=row_ok[:, None], other=0.0)
    q1 = tl.load(q_base[:, None] + DP + offs_p[None, :], mask=row_ok[:, None], other=0.0)
    acc0 = tl.zeros([M, DP], tl.float32)
    acc1 = tl.zeros([M, DP], tl.float32)
    # Values of a bf16 cache (KIVI_ASM) load as [BLOCK_N, NGP, GV]: GV channels of a plane
    # share one value group, so each token's (scale, zero) broadcasts along the last axis in
    # registers; a reshape to [BLOCK_N, DP] then feeds the dot.
    GV: tl.constexpr = VG if VG < DP else DP
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
        p, alpha, m_i, l_i = online_softmax(s, m_i, l_i)
        # ---- values ----
        vs_row = vs_base + offs_n * svsn  # [BLOCK_N]
        vz_row = vz_base + offs_n * svsn
        pq = p.to(q0.dtype)
        if KIVI_ASM:
            vb3 = tl.load(v_base + offs_n[:, None, None] * svn + offs_v3, mask=ok_n[:, None, None], other=0)
            if NPL == 2:
                f0, f1 = _unpack_planes(vb3, BITS)
            else:
                f0, f1, f2, f3 = _unpack_planes(vb3, BITS)
            acc0 = tl.dot(pq, _kivi_value_plane_bf16(f0, vs_row, vz_row, ok_n, 0, DP, VG, NGP, BLOCK_N), acc0 * alpha[:, None])
            acc1 = tl.dot(pq, _kivi_value_plane_bf16(f1, vs_row, vz_row, ok_n, 1, DP, VG, NGP, BLOCK_N), acc1 * alpha[:, None])
            if NPL == 4:
                acc2 = tl.dot(pq, _kivi_value_plane_bf16(f2, vs_row, vz_row, ok_n, 2, DP, VG, NGP, BLOCK_N),
                              acc2 * alpha[:, None])
                acc3 = tl.dot(pq, _kivi_value_plane_bf16(f3, vs_row, vz_row, ok_n, 3, DP, VG, NGP, BLOCK_N),
                              acc3 * alpha[:, None])
        else:
            vb = tl.load(v_base + offs_n[:, None] * svn + offs_p[None, :], mask=ok_n[:, None], other=0)  # [BLOCK_N, DP]
            v0 = _kivi_value_plane(vb, vs_row, vz_row, ok_n, 0, DP, VG, BITS, BLOCK_N).to(q0.dtype)
            acc0 = tl.dot(pq, v0, acc0 * alpha[:, None])
            v1 = _kivi_value_plane(vb, vs_row, vz_row, ok_n, 1, DP, VG, BITS, BLOCK_N).to(q0.dtype)
            acc1 = tl.dot(pq, v1, acc1 * alpha[:, None])
            if NPL == 4:
                v2 = _kivi_value_plane(vb, vs_row, vz_row, ok_n, 2, DP, VG, BITS, BLOCK_N).to(q0.dtype)
                acc2 = tl.dot(pq, v2, acc2 * alpha[:, None])
                v3 = _kivi_value_plane(vb, vs_row, vz_row, ok_n, 3, DP, VG, BITS, BLOCK_N).to(q0.dtype)
                acc3 = tl.dot(pq, v3, acc3 * alpha[:, None])

    # ---- this split's normalized output and log2-sum-exp ----
    sp = split_offset + tl.program_id(1)
    inv_l, out_ok = finish_split(m_i, l_i, LSE, b * sl_b + heads * sl_h + sp, start, end, N_REP, M)
    o_row = O + b * so_b + heads * so_h + sp * so_s  # [M]
    o_p = o_row[:, None] + offs_p[None, :]  # plane i -> channels [i*DP, (i+1)*DP)
    tl.store(o_p, acc0 * inv_l[:, None], mask=out_ok[:, None])
    tl.store(o_p + DP, acc1 * inv_l[:, None], mask=out_ok[:, None])
    if NPL == 4:
        tl.store(o_p + 2 * DP, acc2 * inv_l[:, None], mask=out_ok[:, None])
        tl.store(o_p + 3 * DP, acc3 * inv_l[:, None], mask=out_ok[:, None])
