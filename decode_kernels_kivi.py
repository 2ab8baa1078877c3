"""The Triton flash-decoding kernel for KIVI bodies (int4 / int2): one launch for the body's
splits of packed codes and the exact slots' behind it (kivi_and_exact_partial_kernel), launched
by decode_kernels (which combines the splits).

Planar packing (kv_quant): byte j of a token holds channels j, j + DP, ... at bit offsets 0, BITS,
...; plane i = channels [i*DP, (i+1)*DP). Each tile is loaded once as dense bytes ([DP, BLOCK_N]
keys, [BLOCK_N, NGP, GV] values) and unpacked per plane in registers; the dots run per plane over
DP channels, one fp32 accumulator [M, DP] per plane. A tile never spans two key groups (BLOCK_N <=
G, the key group, and splits start on tile boundaries), so its key scales and zeros are one row
of D per tile; VG is the value group (per token, a scale and zero per VG channels). The scales
and zeros are loaded one tile ahead (PREFETCH), as the 8-bit kernel's scales.

Codes become a float f built from their bits (exact): F16 values f = 1 + code / 2**BITS in fp16
(the code under the top of the mantissa), F16 keys f = 1024 + code * 2**(plane * BITS) (the
plane's bits left where they are, under the exponent of 1024: no shift), else f = 128 + code in
bf16 (under the exponent of 128).

Keys are never dequantized: a key group's scale and zero are per channel, so its scale is folded
into q once per group (q * a, a the step of f: scale / 2**(plane * BITS) in F16, else scale), and
the offset of f and the zeros into one [M] term added to the group's scores (_fold_key_plane); the
dots then read the unpacked codes as they are, in the layout the dot wants (docs/kernels.md has
the timings).

Values keep one scale and zero per token and VG channels, dequantized per element: value = f * a
+ b, one FMA, with a = 2**BITS * scale and b = zero - a rounded to fp16 once per group (F16; q and
P are fp16 too; fp16's 11 bits keep b's rounding below the bf16 path's error); bf16: (f - 128)
exactly, then one FMA with scale and zero, two per element (one FMA f * scale + (zero - 128 *
scale) would round zero - 128 * scale, an error of a quarter step, to bf16).
KIVI_ASM does the unpack and the values' FMAs in packed-register PTX (unpack about one instruction
per code, one fma.rn.f16x2 or two fma.rn.bf16x2 per value pair); without it (other dtypes in bf16
mode, the interpreter) the same arithmetic is written with plain ops in fp32.
"""
import triton
import triton.language as tl

import pdl
from decode_kernels import exact_partial, finish_split, online_softmax_lazy, split_bounds, tile_order, tile_start


def _unpack_asm(bits, f16):
    """PTX for four packed bytes (one register) -> every plane of them as f (module docstring),
    two per output register: PRMT orders the bytes (b0, b2, b1, b3) so that a shift and one LOP3
    (mask, then OR the exponent) yield the pair (byte i, byte i + 1) of a plane; about one
    instruction per code. Outputs $0, $1 are plane 0's elements (0, 1) and (2, 3), $2, $3 plane
    1's, ..."""
    n = 8 // bits
    top = 10 - bits if f16 else 0  # where the code goes in each 16-bit half
    mask = ((1 << bits) - 1) << top
    exponent = 0x3C003C00 if f16 else 0x43004300  # fp16 1.0 / bf16 128.0, twice
    lines = ["{", ".reg .b32 t, u;", f"prmt.b32 t, ${2 * n}, 0, 0x3120;"]
    for plane in range(n):
        for half in range(2):
            shift = 8 * half + plane * bits - top  # > 0: right
            src = "t"
            if shift:
                lines.append(f"{'shr' if shift > 0 else 'shl'}.b32 u, t, {abs(shift)};")
                src = "u"
            lines.append(f"lop3.b32 ${2 * plane + half}, {src}, 0x{mask | mask << 16:08x}, 0x{exponent:08x}, 0xea;")
    return "\n".join(lines + ["}"])


def _unpack_keys_asm(bits):
    """PTX for four packed key bytes -> every plane as fp16 1024 + code * 2**(plane * bits): two
    PRMTs put bytes (0, 1) and (2, 3) under the halves' low bytes, then one LOP3 per output pair
    keeps a plane's bits in place and ORs the exponent of 1024, no shift (the key fold divides
    that plane's scale by 2**(plane * bits)). Outputs as _unpack_asm's."""
    packed = f"${8 // bits * 2}"
    lines = ["{", ".reg .b32 t, u;", f"prmt.b32 t, {packed}, 0, 0x4140;", f"prmt.b32 u, {packed}, 0, 0x4342;"]
    for plane in range(8 // bits):
        mask = ((1 << bits) - 1) << (plane * bits)
        for half, src in enumerate("tu"):
            lines.append(f"lop3.b32 ${2 * plane + half}, {src}, 0x{mask | mask << 16:08x}, 0x64006400, 0xea;")
    return "\n".join(lines + ["}"])


_DEQUANT_BF16_PTX = "\n".join([
    "{", ".reg .b32 c, one, off;", "mov.b32 one, 0x3f803f80;", "mov.b32 off, 0xc300c300;",
    "fma.rn.bf16x2 c, $1, one, off;", "fma.rn.bf16x2 $0, c, $2, $3;", "}",
])


_UNPACK4_ASM = tl.constexpr(_unpack_asm(4, False))
_UNPACK2_ASM = tl.constexpr(_unpack_asm(2, False))
_UNPACK4_F16_ASM = tl.constexpr(_unpack_asm(4, True))
_UNPACK2_F16_ASM = tl.constexpr(_unpack_asm(2, True))
_UNPACK4_KEYS_ASM = tl.constexpr(_unpack_keys_asm(4))
_UNPACK2_KEYS_ASM = tl.constexpr(_unpack_keys_asm(2))
_DEQUANT_BF16_ASM = tl.constexpr(_DEQUANT_BF16_PTX)
_DEQUANT_F16_ASM = tl.constexpr("fma.rn.f16x2 $0, $1, $2, $3;")


@triton.jit
def _affine(scale, zero, BITS: tl.constexpr, F16: tl.constexpr):
    """What the dequantization multiplies and adds (module docstring): F16 (a, b) =
    (2**BITS * scale, zero - 2**BITS * scale) rounded to fp16 once, else (scale, zero)."""
    if F16:
        a = scale.to(tl.float32) * (1 << BITS)
        return a.to(tl.float16), (zero.to(tl.float32) - a).to(tl.float16)
    else:
        return scale, zero


@triton.jit
def _key_params_plane(KS, KZ, row, I: tl.constexpr, DP: tl.constexpr):
    """The key scales and zeros of plane I's channels in the key group at offset `row`, [DP] each."""
    offs = row + I * DP + tl.arange(0, DP)
    return tl.load(KS + offs), tl.load(KZ + offs)


@triton.jit
def _key_params(KS, KZ, n, cap, sksn, G: tl.constexpr, DP: tl.constexpr, NPL: tl.constexpr):
    """The key scales and zeros of the group holding token n: a tuple of NPL (scale, zero) pairs,
    one per plane. A token past the capacity (an empty split's start) reads the last group
    instead, unused: no mask."""
    row = (tl.minimum(n, cap - 1) // G) * sksn
    p0 = _key_params_plane(KS, KZ, row, 0, DP)
    p1 = _key_params_plane(KS, KZ, row, 1, DP)
    if NPL == 2:
        return p0, p1
    else:
        return p0, p1, _key_params_plane(KS, KZ, row, 2, DP), _key_params_plane(KS, KZ, row, 3, DP)


@triton.jit
def _fold_key_plane(q_i, params, I: tl.constexpr, BITS: tl.constexpr, F16: tl.constexpr):
    """A key group's scales and zeros folded into q (module docstring), for plane I: q_i [M, DP]
    in the dots' dtype and the plane's (scale, zero) [DP] -> (q_i * a rounded to that dtype once,
    [M] fp32: what the codes' offset and the zeros add to every score of the group). With
    k = a * (f - OFF) + zero + scale * MID per channel, MID the middle code and OFF the f of MID,
    q . k = (q * a) . f - OFF * sum(q * a) + q . (zero + scale * MID): the rounding of q * a is
    multiplied by f - OFF, at most half the codes' range (OFF = f of code 0 would double it)."""
    qf = q_i.to(tl.float32)
    scale = params[0].to(tl.float32)
    mid = ((1 << BITS) - 1) / 2
    if F16:
        w = 1 << (I * BITS)  # key f = 1024 + code * w (_unpack_key_planes)
        a = scale / w
        offset = 1024.0 + mid * w
    else:
        a = scale  # f = 128 + code
        offset = 128.0 + mid
    qa = (qf * a[None, :]).to(q_i.dtype)
    zeros = params[1].to(tl.float32) + scale * mid
    return qa, tl.sum(qf * zeros[None, :] - offset * qa.to(tl.float32), axis=1)


@triton.jit
def _value_params_plane(VS, VZ, rows, ok, I: tl.constexpr, DP: tl.constexpr, VG: tl.constexpr, NGP: tl.constexpr,
                        BITS: tl.constexpr, F16: tl.constexpr):
    """_affine of plane I's value groups for the tokens at offsets `rows` [BLOCK_N]: [BLOCK_N,
    NGP] each, part j of the plane (GV channels) in group I * DP // VG + j."""
    offs = rows[:, None] + (I * DP // VG + tl.arange(0, NGP))[None, :]
    return _affine(tl.load(VS + offs, mask=ok[:, None], other=0.0), tl.load(VZ + offs, mask=ok[:, None], other=0.0),
                   BITS, F16)


@triton.jit
def _value_params(VS, VZ, offs_n, ok, svsn, DP: tl.constexpr, VG: tl.constexpr, NGP: tl.constexpr,
                  NPL: tl.constexpr, BITS: tl.constexpr, F16: tl.constexpr):
    """The value parameters of tokens offs_n [BLOCK_N]: a tuple of NPL (a, b) pairs, one per
    plane, [BLOCK_N, NGP] each."""
    rows = offs_n * svsn
    p0 = _value_params_plane(VS, VZ, rows, ok, 0, DP, VG, NGP, BITS, F16)
    p1 = _value_params_plane(VS, VZ, rows, ok, 1, DP, VG, NGP, BITS, F16)
    if NPL == 2:
        return p0, p1
    else:
        return (p0, p1, _value_params_plane(VS, VZ, rows, ok, 2, DP, VG, NGP, BITS, F16),
                _value_params_plane(VS, VZ, rows, ok, 3, DP, VG, NGP, BITS, F16))


# ---- portable path (plain ops in fp32; the interpreter's) ----
@triton.jit
def _plane_codes(packed, I: tl.constexpr, BITS: tl.constexpr, F16: tl.constexpr):
    """Plane I of a packed uint8 tile as fp32 f, exact, from bits (shift, mask, or; no int ->
    float conversion): F16 1 + code / 2**BITS (under the top of the mantissa), else 128 + code."""
    c = (packed.to(tl.int32) >> (I * BITS)) & ((1 << BITS) - 1)
    if F16:
        return ((c << (23 - BITS)) | 0x3F800000).to(tl.float32, bitcast=True)
    else:
        return ((c << 16) | 0x43000000).to(tl.float32, bitcast=True)


@triton.jit
def _dequant(f, a, b, F16: tl.constexpr):
    """Values in fp32 from f (_plane_codes) and _affine's (a, b), broadcast against f."""
    if F16:
        return f * a.to(tl.float32) + b.to(tl.float32)
    else:
        return (f - 128.0) * a.to(tl.float32) + b.to(tl.float32)


@triton.jit
def _fold_keys(q0, q1, q2, q3, kp, NPL: tl.constexpr, BITS: tl.constexpr, F16: tl.constexpr):
    """_fold_key_plane of every plane: (q0 * a0, q1 * a1, q2 * a2, q3 * a3, the summed [M] term);
    with two planes, q2 and q3 are passed through unused."""
    qa0, c = _fold_key_plane(q0, kp[0], 0, BITS, F16)
    qa1, c_i = _fold_key_plane(q1, kp[1], 1, BITS, F16)
    c += c_i
    if NPL == 4:
        qa2, c_i = _fold_key_plane(q2, kp[2], 2, BITS, F16)
        c += c_i
        qa3, c_i = _fold_key_plane(q3, kp[3], 3, BITS, F16)
        c += c_i
    else:
        qa2, qa3 = q2, q3
    return qa0, qa1, qa2, qa3, c


@triton.jit
def _key_plane_codes(packed, I: tl.constexpr, BITS: tl.constexpr, F16: tl.constexpr):
    """Plane I of a packed key tile as fp32 f, exact: F16 1024 + code * 2**(I * BITS) (the
    plane's bits left in place under the exponent of 1024, as _unpack_key_planes), else as
    _plane_codes."""
    if F16:
        c = packed.to(tl.int32) & (((1 << BITS) - 1) << (I * BITS))
        return ((c << 13) | 0x44800000).to(tl.float32, bitcast=True)
    else:
        return _plane_codes(packed, I, BITS, F16)


@triton.jit
def _key_codes(kb, BITS: tl.constexpr, F16: tl.constexpr, dtype: tl.constexpr):
    """Every plane of a key tile kb [DP, BLOCK_N] as f in the dots' dtype (exact), a tuple."""
    f0 = _key_plane_codes(kb, 0, BITS, F16).to(dtype)
    f1 = _key_plane_codes(kb, 1, BITS, F16).to(dtype)
    if BITS == 4:
        return f0, f1
    else:
        return f0, f1, _key_plane_codes(kb, 2, BITS, F16).to(dtype), _key_plane_codes(kb, 3, BITS, F16).to(dtype)


@triton.jit
def _kivi_value_plane(vb3, params, I: tl.constexpr, BITS: tl.constexpr, F16: tl.constexpr, BLOCK_N: tl.constexpr,
                      DP: tl.constexpr):
    """Plane I of a value tile in fp32, [BLOCK_N, DP], from vb3 [BLOCK_N, NGP, GV] packed bytes
    and the per-token (a, b) [BLOCK_N, NGP] of each part of the plane, broadcast over its GV
    channels."""
    v = _dequant(_plane_codes(vb3, I, BITS, F16), params[0][:, :, None], params[1][:, :, None], F16)
    return tl.reshape(v, [BLOCK_N, DP])


# ---- KIVI_ASM: packed-register PTX ----
@triton.jit
def _unpack_with(ASM: tl.constexpr, packed, BITS: tl.constexpr, F16: tl.constexpr):
    """Run an unpacking PTX (_unpack_asm, _unpack_keys_asm) on a packed uint8 tile: a tuple of
    8 // BITS planes, fp16 (F16) or bf16."""
    ty = tl.float16 if F16 else tl.bfloat16
    if BITS == 4:
        return tl.inline_asm_elementwise(ASM, "=r,=r,=r,=r,r", [packed], dtype=(ty, ty), is_pure=True, pack=4)
    else:
        return tl.inline_asm_elementwise(ASM, "=r,=r,=r,=r,=r,=r,=r,=r,r", [packed], dtype=(ty, ty, ty, ty),
                                         is_pure=True, pack=4)


@triton.jit
def _unpack_planes(packed, BITS: tl.constexpr, F16: tl.constexpr):
    """Every plane of a packed uint8 tile as f (exact; fp16 or bf16), a tuple of 8 // BITS."""
    if F16:
        return _unpack_with(_UNPACK4_F16_ASM if BITS == 4 else _UNPACK2_F16_ASM, packed, BITS, True)
    else:
        return _unpack_with(_UNPACK4_ASM if BITS == 4 else _UNPACK2_ASM, packed, BITS, False)


@triton.jit
def _unpack_key_planes(packed, BITS: tl.constexpr):
    """Every plane of a packed uint8 key tile as fp16 1024 + code * 2**(plane * BITS), exact, a
    tuple of 8 // BITS: about 0.6 instructions per code where _unpack_planes takes 1.1 (keys need
    no small f: nothing multiplies them element by element, the fold scales q)."""
    return _unpack_with(_UNPACK4_KEYS_ASM if BITS == 4 else _UNPACK2_KEYS_ASM, packed, BITS, True)


@triton.jit
def _dequant_asm(f, a, b, F16: tl.constexpr):
    """f (a plane from _unpack_planes) -> its values in f's dtype, with _affine's (a, b)
    broadcastable against f. F16: f * a + b, one fma.rn.f16x2 per pair of elements; bf16:
    (f - 128) exactly, then code * scale + zero rounded once, two fma.rn.bf16x2.

    is_pure=False pins it where it is written: a pure op is moved past the layout conversion
    into the dot operand's layout, where each thread holds codes of many tokens and loads a
    scale and zero for each (sm_90 SASS per 32-token int4 tile, G 32: 776 instructions, 64
    loads; pinned in the load layout, whose 16 codes per thread share one group: 414)."""
    if F16:
        return tl.inline_asm_elementwise(_DEQUANT_F16_ASM, "=r,r,r,r", [f, a, b], dtype=tl.float16, is_pure=False,
                                         pack=2)
    else:
        return tl.inline_asm_elementwise(_DEQUANT_BF16_ASM, "=r,r,r,r", [f, a, b], dtype=tl.bfloat16, is_pure=False,
                                         pack=2)


@triton.jit
def _kivi_value_plane_asm(f, params, F16: tl.constexpr, BLOCK_N: tl.constexpr, DP: tl.constexpr):
    """Values of a plane, [BLOCK_N, DP], from f [BLOCK_N, NGP, GV] and the plane's per-token
    (a, b) [BLOCK_N, NGP]."""
    return tl.reshape(_dequant_asm(f, params[0][:, :, None], params[1][:, :, None], F16), [BLOCK_N, DP])


@triton.jit
def _load_q(ptrs, row_ok, qk_scale, F16: tl.constexpr):
    """A plane of q, [M, DP], in the dots' dtype: F16 prescaled (softmax scale, log2 e) and
    rounded to fp16 once, so that the scores leave the dots in log2 units; else as stored."""
    q = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
    if F16:
        return (q.to(tl.float32) * qk_scale).to(tl.float16)
    else:
        return q


@triton.jit
def kivi_partial(
    Q, sqb, sqh,
    K, skb, skh, skn,  # packed codes [B, Hkv, L, DP]
    V, svb, svh, svn,
    KS, KZ, sksb, sksh, sksn,  # key scale / zero [B, Hkv, L / G, D] (same strides)
    VS, VZ, svsb, svsh, svsn,  # value scale / zero [B, Hkv, L, D / VG] (same strides)
    LEN,  # valid length [1]
    O, LSE, so_b, so_h, so_s,  # partial out [B, Hq, S_total, D] fp32, lse [B, Hq, S_total]
    sl_b, sl_h,
    qk_scale, Hkv,
    split, sp, n_splits, cap,  # this program's split of the body, its index in O and LSE, the body's splits
    N_REP: tl.constexpr, M: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr,
    G: tl.constexpr, VG: tl.constexpr, BLOCK_N: tl.constexpr,
    KIVI_ASM: tl.constexpr, F16: tl.constexpr, PREFETCH: tl.constexpr, PDL: tl.constexpr,
):
    """One program's split of a KIVI body for one KV head: its partial output and log2-sum-exp,
    written at split index sp."""
    b = tl.program_id(0) // Hkv
    h = tl.program_id(0) % Hkv
    start, end = split_bounds(split, LEN, cap, n_splits, True, BLOCK_N)

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
    q0 = _load_q(q_base[:, None] + offs_p[None, :], row_ok, qk_scale, F16)  # [M, DP], the dots' dtype
    q1 = _load_q(q_base[:, None] + DP + offs_p[None, :], row_ok, qk_scale, F16)
    acc0 = tl.zeros([M, DP], tl.float32)
    acc1 = tl.zeros([M, DP], tl.float32)
    if NPL == 4:
        q2 = _load_q(q_base[:, None] + 2 * DP + offs_p[None, :], row_ok, qk_scale, F16)
        q3 = _load_q(q_base[:, None] + 3 * DP + offs_p[None, :], row_ok, qk_scale, F16)
        acc2 = tl.zeros([M, DP], tl.float32)
        acc3 = tl.zeros([M, DP], tl.float32)
    else:
        q2, q3 = q0, q1  # (unused)
    # Values load as [BLOCK_N, NGP, GV]: GV channels of a plane share one value group, so each
    # token's (scale, zero) broadcasts along the last axis in registers; a reshape to
    # [BLOCK_N, DP] then feeds the dot.
    GV: tl.constexpr = VG if VG < DP else DP
    NGP: tl.constexpr = DP // GV
    offs_v3 = tl.arange(0, NGP)[None, :, None] * GV + tl.arange(0, GV)[None, None, :]  # [1, NGP, GV]
    ks_base = KS + b * sksb + h * sksh
    kz_base = KZ + b * sksb + h * sksh
    vs_base = VS + b * svsb + h * svsh
    vz_base = VZ + b * svsb + h * svsh

    n_tiles, first = tile_order(split, start, end, BLOCK_N)  # tiles visited from `first` on, wrapping
    n_first = tile_start(0, first, n_tiles, start, BLOCK_N)
    if PREFETCH:
        # The scales and zeros are loaded one tile ahead: the pipeliner stages only the code
        # tiles the dots read, so a parameter loaded where it is used exposes a whole memory
        # latency every tile.
        kp_next = _key_params(ks_base, kz_base, n_first, cap, sksn, G, DP, NPL)
        vp_next = _value_params(vs_base, vz_base, n_first + offs_n0, (n_first + offs_n0) < end, svsn,
                                DP, VG, NGP, NPL, BITS, F16)
    if G != BLOCK_N:
        # The key group's scales and zeros folded into q once per group (below: where a tile
        # starts one), not once per tile.
        qa0, qa1, qa2, qa3, c = _fold_keys(q0, q1, q2, q3, _key_params(ks_base, kz_base, n_first, cap, sksn, G, DP,
                                                                       NPL), NPL, BITS, F16)
    for t in range(0, n_tiles):
        n0 = tile_start(t, first, n_tiles, start, BLOCK_N)
        offs_n = n0 + offs_n0
        ok_n = offs_n < end
        if PREFETCH:
            kp, vp = kp_next, vp_next
            n_next = tile_start(t + 1, first, n_tiles, start, BLOCK_N)
            kp_next = _key_params(ks_base, kz_base, n_next, cap, sksn, G, DP, NPL)
            ok_next = (n_next + offs_n0) < tl.where(t + 1 < n_tiles, end, 0)  # none after the last
            vp_next = _value_params(vs_base, vz_base, n_next + offs_n0, ok_next, svsn, DP, VG, NGP, NPL, BITS, F16)
        else:
            kp = _key_params(ks_base, kz_base, n0, cap, sksn, G, DP, NPL)
            vp = _value_params(vs_base, vz_base, offs_n, ok_n, svsn, DP, VG, NGP, NPL, BITS, F16)
        # ---- scores [M, BLOCK_N] ----
        kb = tl.load(k_base + offs_n[None, :] * skn + offs_p[:, None], mask=ok_n[None, :], other=0)  # [DP, BLOCK_N]
        if KIVI_ASM:
            fk = _unpack_key_planes(kb, BITS) if F16 else _unpack_planes(kb, BITS, F16)
        else:
            fk = _key_codes(kb, BITS, F16, q0.dtype)
        if G == BLOCK_N:
            qa0, qa1, qa2, qa3, c = _fold_keys(q0, q1, q2, q3, kp, NPL, BITS, F16)
        elif ((n0 % G == 0) | (n0 == start)) & (t != 0):
            # a group's first tile, or the wrap back to start (which may be inside a group)
            qa0, qa1, qa2, qa3, c = _fold_keys(q0, q1, q2, q3, kp, NPL, BITS, F16)
        s = tl.dot(qa0, fk[0])
        s = tl.dot(qa1, fk[1], s)
        if NPL == 4:
            s = tl.dot(qa2, fk[2], s)
            s = tl.dot(qa3, fk[3], s)
        s += c[:, None]
        if not F16:
            s = s * qk_scale
        s = tl.where(ok_n[None, :], s, float("-inf"))
        p, grew, alpha, m_i, l_i = online_softmax_lazy(s, m_i, l_i)
        if grew:
            acc0 = acc0 * alpha[:, None]
            acc1 = acc1 * alpha[:, None]
            if NPL == 4:
                acc2 = acc2 * alpha[:, None]
                acc3 = acc3 * alpha[:, None]
        # ---- values ----
        pq = p.to(q0.dtype)
        vb3 = tl.load(v_base + offs_n[:, None, None] * svn + offs_v3, mask=ok_n[:, None, None],
                      other=0)  # [BLOCK_N, NGP, GV]
        if KIVI_ASM:
            fv = _unpack_planes(vb3, BITS, F16)
            acc0 = tl.dot(pq, _kivi_value_plane_asm(fv[0], vp[0], F16, BLOCK_N, DP), acc0)
            acc1 = tl.dot(pq, _kivi_value_plane_asm(fv[1], vp[1], F16, BLOCK_N, DP), acc1)
            if NPL == 4:
                acc2 = tl.dot(pq, _kivi_value_plane_asm(fv[2], vp[2], F16, BLOCK_N, DP), acc2)
                acc3 = tl.dot(pq, _kivi_value_plane_asm(fv[3], vp[3], F16, BLOCK_N, DP), acc3)
        else:
            acc0 = tl.dot(pq, _kivi_value_plane(vb3, vp[0], 0, BITS, F16, BLOCK_N, DP).to(q0.dtype), acc0)
            acc1 = tl.dot(pq, _kivi_value_plane(vb3, vp[1], 1, BITS, F16, BLOCK_N, DP).to(q0.dtype), acc1)
            if NPL == 4:
                acc2 = tl.dot(pq, _kivi_value_plane(vb3, vp[2], 2, BITS, F16, BLOCK_N, DP).to(q0.dtype), acc2)
                acc3 = tl.dot(pq, _kivi_value_plane(vb3, vp[3], 3, BITS, F16, BLOCK_N, DP).to(q0.dtype), acc3)

    # ---- this split's normalized output and log2-sum-exp ----
    pdl.let_dependents_launch(PDL)
    inv_l, out_ok = finish_split(m_i, l_i, LSE, b * sl_b + heads * sl_h + sp, start, end, N_REP, M)
    o_row = O + b * so_b + heads * so_h + sp * so_s  # [M]
    o_p = o_row[:, None] + offs_p[None, :]  # plane i -> channels [i*DP, (i+1)*DP)
    tl.store(o_p, acc0 * inv_l[:, None], mask=out_ok[:, None])
    tl.store(o_p + DP, acc1 * inv_l[:, None], mask=out_ok[:, None])
    if NPL == 4:
        tl.store(o_p + 2 * DP, acc2 * inv_l[:, None], mask=out_ok[:, None])
        tl.store(o_p + 3 * DP, acc3 * inv_l[:, None], mask=out_ok[:, None])


@triton.jit
def kivi_and_exact_partial_kernel(
    Q, sqb, sqh,
    K, skb, skh, skn, V, svb, svh, svn,  # the KIVI body, as kivi_partial's
    KS, KZ, sksb, sksh, sksn, VS, VZ, svsb, svsh, svsn, BODY_LEN,
    EK, sekb, sekh, sekn, EV, sevb, sevh, sevn, EXACT_LEN, EXACT_MASK,  # the exact slots behind it
    O, LSE, so_b, so_h, so_s, sl_b, sl_h,
    qk_scale, Hkv, body_splits, body_cap, exact_splits, exact_cap,
    N_REP: tl.constexpr, M: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr,
    G: tl.constexpr, VG: tl.constexpr, BLOCK_N: tl.constexpr, HAS_EXACT_LEN: tl.constexpr,
    HAS_EXACT_MASK: tl.constexpr, KIVI_ASM: tl.constexpr, F16: tl.constexpr, PREFETCH: tl.constexpr,
    PDL: tl.constexpr, EXACT_BLOCK_N: tl.constexpr,
):
    """Grid (B * Hkv, body_splits + exact_splits): a KIVI body and the exact slots behind it in
    one launch, as decode_kernels.body_and_exact_partial_kernel does for 8-bit bodies (it says
    why)."""
    pdl.wait_for_inputs(PDL)
    split = tl.program_id(1)
    if split < body_splits:
        kivi_partial(Q, sqb, sqh, K, skb, skh, skn, V, svb, svh, svn, KS, KZ, sksb, sksh, sksn,
                     VS, VZ, svsb, svsh, svsn, BODY_LEN, O, LSE, so_b, so_h, so_s, sl_b, sl_h, qk_scale, Hkv,
                     split, split, body_splits, body_cap, N_REP, M, D, BITS, G, VG, BLOCK_N, KIVI_ASM, F16,
                     PREFETCH, PDL)
    else:
        exact_partial(Q, sqb, sqh, EK, sekb, sekh, sekn, EV, sevb, sevh, sevn, EXACT_LEN, EXACT_MASK,
                      O, LSE, so_b, so_h, so_s, sl_b, sl_h, qk_scale, Hkv, split - body_splits, split, exact_splits,
                      exact_cap, N_REP, M, D, EXACT_BLOCK_N, HAS_EXACT_LEN, HAS_EXACT_MASK, PDL, 1)
