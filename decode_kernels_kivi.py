"""The Triton flash-decoding kernel for KIVI bodies (int4 / int2): one launch for the body's
splits of packed codes and the exact slots' behind it (kivi_and_exact_partial_kernel), launched
by decode_kernels (which combines the splits).

Planar packing (kv_quant): byte j of a token holds channels j, j + DP, ... at bit offsets 0, BITS,
...; plane i = channels [i*DP, (i+1)*DP). Key codes are token-major rows of DP bytes; value codes
come in blocks of VB = 32 tokens, channel-major inside (kv_quant.VALUE_BLOCK). A tile of
BLOCK_N tokens lies in one key group (G) and one block of value codes; its codes are loaded once
and unpacked per plane in registers, in the layout the dots read. A split holds whole key groups
and loops over them, and over each group's tiles inside (one fused, pipelined loop).

Tokens are the rows of every dot, the query heads its columns (NH: the GQA group padded to the 8
columns of a tensor-core tile, where rows would pad it to 16): scores [BLOCK_N, NH] = keys
[BLOCK_N, DP] . q [DP, NH] per plane, and outputs [GV, NH] += values [GV, BLOCK_N] . P [BLOCK_N,
NH] per plane and value group (GV channels of it). So the softmax works on half the padding and
the accumulators are a quarter of [16, D].

Codes become a float f built from their bits (exact, fp16): keys f = 1024 + code * 2**(plane *
BITS) (the plane's bits left where they are, under the exponent of 1024: no shift), values f = 1
+ code / 2**BITS (the code under the top of the mantissa). No value is dequantized, and no key of
a group longer than a tile:
- a key group's scale and zero are per channel: its scale is folded into q once per group (q * a,
  a = scale / 2**(plane * BITS)), and the offset of f and the zeros into one [NH] term added to
  the group's scores (_fold_keys). A group of one tile (int2's 32 tokens) would fold on every
  tile, which costs more than one fp16 FMA per key code: its keys are unpacked as values are and
  dequantized, k = f * a + b (a = 2**BITS * scale, b = zero - a), and q stays as it is;
- a value's scale and zero are per token and value group: value = f * a + b (a = 2**BITS * scale,
  b = zero - a), so P . V = (P * a) . f + P . b, with P * a rounded to fp16 for each group (its
  rounding multiplied by f < 2); P . b, and the softmax's sum of P, are summed per element of the
  score tile in fp32 and over its tokens once, after the loop.
KIVI_ASM unpacks in packed-register PTX (keys about 0.6 instructions per code, values 1.1);
without it (the interpreter) the same arithmetic is written with plain ops in fp32.
"""
import triton
import triton.language as tl

import pdl
from decode_kernels import RESCALE_LOG2, exact_partial, finish_split, split_bounds, tile_order, tile_start


def _unpack_values_asm(bits):
    """PTX for four packed value bytes (one register) -> every plane of them as fp16 1 + code /
    2**bits, two per output register: PRMT orders the bytes (b0, b2, b1, b3) so that a shift and
    one LOP3 (mask, then OR the exponent of 1.0) yield the pair (byte i, byte i + 1) of a plane;
    about one instruction per code. Outputs $0, $1 are plane 0's elements (0, 1) and (2, 3), $2,
    $3 plane 1's, ..."""
    n = 8 // bits
    top = 10 - bits  # where the code goes in each 16-bit half: under the top of the mantissa
    mask = ((1 << bits) - 1) << top
    lines = ["{", ".reg .b32 t, u;", f"prmt.b32 t, ${2 * n}, 0, 0x3120;"]
    for plane in range(n):
        for half in range(2):
            shift = 8 * half + plane * bits - top  # > 0: right
            src = "t"
            if shift:
                lines.append(f"{'shr' if shift > 0 else 'shl'}.b32 u, t, {abs(shift)};")
                src = "u"
            lines.append(f"lop3.b32 ${2 * plane + half}, {src}, 0x{mask | mask << 16:08x}, 0x3c003c00, 0xea;")
    return "\n".join(lines + ["}"])


def _unpack_keys_asm(bits):
    """PTX for four packed key bytes -> every plane as fp16 1024 + code * 2**(plane * bits): two
    PRMTs put bytes (0, 1) and (2, 3) under the halves' low bytes, then one LOP3 per output pair
    keeps a plane's bits in place and ORs the exponent of 1024, no shift (the key fold divides
    that plane's scale by 2**(plane * bits)). Outputs as _unpack_values_asm's."""
    packed = f"${8 // bits * 2}"
    lines = ["{", ".reg .b32 t, u;", f"prmt.b32 t, {packed}, 0, 0x4140;", f"prmt.b32 u, {packed}, 0, 0x4342;"]
    for plane in range(8 // bits):
        mask = ((1 << bits) - 1) << (plane * bits)
        for half, src in enumerate("tu"):
            lines.append(f"lop3.b32 ${2 * plane + half}, {src}, 0x{mask | mask << 16:08x}, 0x64006400, 0xea;")
    return "\n".join(lines + ["}"])


_UNPACK4_VALUES_ASM = tl.constexpr(_unpack_values_asm(4))
_UNPACK2_VALUES_ASM = tl.constexpr(_unpack_values_asm(2))
_UNPACK4_KEYS_ASM = tl.constexpr(_unpack_keys_asm(4))
_UNPACK2_KEYS_ASM = tl.constexpr(_unpack_keys_asm(2))


@triton.jit
def _replace(items, k: tl.constexpr, new):
    """The tuple `items` with item k replaced by `new`."""
    if k == 0:
        return (new,) + items[1:]
    else:
        return items[:k] + (new,) + items[k + 1:]


@triton.jit
def _load_q_planes(q_cols, h_ok, qk_scale, DP: tl.constexpr, NPL: tl.constexpr):
    """q transposed, one [DP, NH] fp16 tensor per plane (plane i: channels [i * DP, (i + 1) * DP)),
    prescaled (softmax scale, log2 e) and rounded once, so that the scores leave the dots in log2
    units. q_cols [NH] points at each query head's row."""
    offs_p = tl.arange(0, DP)
    planes = ()
    for i in tl.static_range(NPL):
        q = tl.load(q_cols[None, :] + (i * DP + offs_p)[:, None], mask=h_ok[None, :], other=0.0)
        planes = planes + ((q.to(tl.float32) * qk_scale).to(tl.float16),)
    return planes


@triton.jit
def _key_params(KS, KZ, n, cap, sksn, G: tl.constexpr, DP: tl.constexpr, NPL: tl.constexpr,
                WORDS: tl.constexpr):
    """The key scales and zeros of the group holding token n: one ([DP], [DP]) pair per plane, or
    with WORDS and bf16 parameters one ([DP / 2], [DP / 2]) pair of int32 words, two bf16 each
    (_param_f32 reads either). A token past the capacity (an empty split's start) reads the last
    group instead, unused: no mask.

    WORDS is for the groups folded into q, whose parameters are loaded a group ahead: loaded as
    bf16, each thread's two channels came in one 32-bit load and the compiler split it right
    there, so the fold's branch waited for the load it had just issued (a profile put 4% of the
    warps' stall samples on those splits); words are carried as loaded and split in the next
    group's fold."""
    row = (tl.minimum(n, cap - 1) // G) * sksn
    params = ()
    if WORDS and KS.dtype.element_ty == tl.bfloat16:
        offs_w = tl.arange(0, DP // 2)
        ks = KS.to(tl.pointer_type(tl.int32))
        kz = KZ.to(tl.pointer_type(tl.int32))
        for i in tl.static_range(NPL):
            params = params + ((tl.load(ks + (row + i * DP) // 2 + offs_w),
                                tl.load(kz + (row + i * DP) // 2 + offs_w)),)
    else:
        offs_p = tl.arange(0, DP)
        for i in tl.static_range(NPL):
            params = params + ((tl.load(KS + row + i * DP + offs_p), tl.load(KZ + row + i * DP + offs_p)),)
    return params


@triton.jit
def _param_f32(x):
    """_key_params' [DP] vector, or its int32 words of two bf16 each [DP / 2], as fp32 [DP] in
    memory order (a word's low half first), exact: a bf16 is the top half of its fp32."""
    if x.dtype == tl.int32:
        lo = (x << 16).to(tl.float32, bitcast=True)
        hi = (x & -65536).to(tl.float32, bitcast=True)
        return tl.reshape(tl.join(lo, hi), [2 * x.shape[0]])
    else:
        return x.to(tl.float32)


@triton.jit
def _fold_keys(q_planes, params, BITS: tl.constexpr):
    """A key group's scales and zeros folded into q (module docstring): the planes of q [DP, NH]
    and the group's (scale, zero) per plane -> (q * a per plane, rounded to fp16 once; [NH] fp32:
    what the codes' offset and the zeros add to every score of the group). A key plane's f is
    1024 + code * w, w = 2**(plane * BITS), so a = scale / w. With k = a * (f - OFF) + zero +
    scale * MID per channel, MID the middle code and OFF the f of MID,
    q . k = (q * a) . f - OFF * sum(q * a) + q . (zero + scale * MID): the rounding of q * a is
    multiplied by f - OFF, at most half the codes' range (OFF = f of code 0 would double it)."""
    mid = ((1 << BITS) - 1) / 2
    folded = ()
    c = tl.zeros([q_planes[0].shape[1]], tl.float32)
    for i in tl.static_range(len(q_planes)):
        qf = q_planes[i].to(tl.float32)
        scale = _param_f32(params[i][0])
        w = 1 << (i * BITS)
        qa = (qf * (scale / w)[:, None]).to(tl.float16)
        zeros = _param_f32(params[i][1]) + scale * mid
        c += tl.sum(qf * zeros[:, None] - (1024.0 + mid * w) * qa.to(tl.float32), axis=0)
        folded = folded + (qa,)
    return folded, c


@triton.jit
def _dequant_key_params(params, BITS: tl.constexpr):
    """A one-tile key group's (scale, zero) per plane -> (a, b) per plane in fp16, for k = f * a +
    b (f = 1 + code / 2**BITS, a = 2**BITS * scale, b = zero - a). Taken where the parameters are
    loaded, one value per thread: in the loop, after the conversion to the key tile's layout, each
    thread would do it for its 8 channels of every plane, and a quarter of int2's loop was that
    (docs/kernels.md)."""
    out = ()
    for i in tl.static_range(len(params)):
        a = params[i][0].to(tl.float32) * (1 << BITS)
        out = out + ((a.to(tl.float16), (params[i][1].to(tl.float32) - a).to(tl.float16)),)
    return out


@triton.jit
def _load_value_params(VS, VZ, offs_n, ok, svsn, NG: tl.constexpr):
    """The value scales and zeros of tokens offs_n [BLOCK_N] as stored: two tuples of NG
    [BLOCK_N] (_value_terms turns them into what P.V takes). Each group's is a load of its own:
    in a tile of all groups they would lie in different threads, and taking a column out of it
    costs a reduction across the warp."""
    s = ()
    z = ()
    for g in tl.static_range(NG):
        s = s + (tl.load(VS + offs_n * svsn + g, mask=ok, other=0.0),)
        z = z + (tl.load(VZ + offs_n * svsn + g, mask=ok, other=0.0),)
    return s, z


@triton.jit
def _value_terms(params, BITS: tl.constexpr):
    """Loaded value scales and zeros -> P.V's terms (value = f * a + b, f = 1 + code / 2**BITS):
    two tuples of [BLOCK_N] fp32, a = 2**BITS * scale and b = zero - a per group."""
    a = ()
    b = ()
    for g in tl.static_range(len(params[0])):
        a_g = params[0][g].to(tl.float32) * (1 << BITS)
        a = a + (a_g,)
        b = b + (params[1][g].to(tl.float32) - a_g,)
    return a, b


# ---- portable path (plain ops in fp32; the interpreter's) ----
@triton.jit
def _plane_codes(packed, I: tl.constexpr, BITS: tl.constexpr):
    """Plane I of a packed uint8 tile as fp32 1 + code / 2**BITS, exact, from bits (shift, mask,
    or; no int -> float conversion): the code under the top of the mantissa."""
    c = (packed.to(tl.int32) >> (I * BITS)) & ((1 << BITS) - 1)
    return ((c << (23 - BITS)) | 0x3F800000).to(tl.float32, bitcast=True)


@triton.jit
def _key_plane_codes(packed, I: tl.constexpr, BITS: tl.constexpr):
    """Plane I of a packed key tile as fp32 1024 + code * 2**(I * BITS), exact: the plane's bits
    left in place under the exponent of 1024, as _unpack's PTX for keys."""
    c = packed.to(tl.int32) & (((1 << BITS) - 1) << (I * BITS))
    return ((c << 13) | 0x44800000).to(tl.float32, bitcast=True)


@triton.jit
def _unpack(packed, BITS: tl.constexpr, KEYS: tl.constexpr, KIVI_ASM: tl.constexpr):
    """Every plane of a packed uint8 tile as fp16 f, exact, a tuple of 8 // BITS: keys 1024 +
    code * 2**(plane * BITS), values 1 + code / 2**BITS. KIVI_ASM: packed-register PTX (keys about
    0.6 instructions per code, values 1.1: nothing multiplies a key of a folded group element by
    element, the fold scales q, so its bits may stay where they are); else plain ops in fp32."""
    if KIVI_ASM:
        if KEYS:
            asm: tl.constexpr = _UNPACK4_KEYS_ASM if BITS == 4 else _UNPACK2_KEYS_ASM
        else:
            asm: tl.constexpr = _UNPACK4_VALUES_ASM if BITS == 4 else _UNPACK2_VALUES_ASM
        if BITS == 4:
            return tl.inline_asm_elementwise(asm, "=r,=r,=r,=r,r", [packed], dtype=(tl.float16, tl.float16),
                                             is_pure=True, pack=4)
        else:
            return tl.inline_asm_elementwise(asm, "=r,=r,=r,=r,=r,=r,=r,=r,r", [packed],
                                             dtype=(tl.float16, tl.float16, tl.float16, tl.float16), is_pure=True,
                                             pack=4)
    else:
        planes = ()
        for i in tl.static_range(8 // BITS):
            if KEYS:
                planes = planes + (_key_plane_codes(packed, i, BITS).to(tl.float16),)
            else:
                planes = planes + (_plane_codes(packed, i, BITS).to(tl.float16),)
        return planes


@triton.jit
def kivi_partial(
    Q, sqb, sqh,
    K, skb, skh, skn,  # packed key codes [B, Hkv, L, DP]
    V, svb, svh, svn,  # packed value codes in blocks [B, Hkv, L / VB, DP, VB], svn per block
    KS, KZ, sksb, sksh, sksn,  # key scale / zero [B, Hkv, L / G, D] (same strides)
    VS, VZ, svsb, svsh, svsn,  # value scale / zero [B, Hkv, L, D / VG] (same strides)
    LEN,  # valid length [1]
    O, LSE, so_b, so_h, so_s,  # partial out [B, Hq, S_total, D] fp32, lse [B, Hq, S_total]
    sl_b, sl_h,
    qk_scale, Hkv,
    split, sp, n_splits, cap,  # this program's split of the body, its index in O and LSE, the body's splits
    N_REP: tl.constexpr, NH: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr,
    G: tl.constexpr, VG: tl.constexpr, BLOCK_N: tl.constexpr, VB: tl.constexpr,
    KIVI_ASM: tl.constexpr, PDL: tl.constexpr,
):
    """One program's split of a KIVI body for one KV head: its partial output and log2-sum-exp,
    written at split index sp. Tokens are the rows of every dot (module docstring)."""
    b = tl.program_id(0) // Hkv
    h = tl.program_id(0) % Hkv
    start, end = split_bounds(split, LEN, cap, n_splits, True, G)

    DP: tl.constexpr = D * BITS // 8  # bytes per token
    NPL: tl.constexpr = 8 // BITS  # planes
    NG: tl.constexpr = D // VG  # value groups
    GV: tl.constexpr = VG if VG < DP else DP  # channels of one value group within one plane
    NGP: tl.constexpr = DP // GV  # value groups per plane
    # The NH columns hold NC copies of the GQA group (column = copy * N_REP + head), so that P
    # times the value scales of NC groups at once is one tensor: one trip through shared memory
    # into the value dots' operand layout per NC groups.
    NC: tl.constexpr = NH // N_REP
    NPK: tl.constexpr = (NG + NC - 1) // NC  # packs of NC value groups
    cols = tl.arange(0, NH)
    copy = cols // N_REP
    h_ok = cols < NC * N_REP
    heads = h * N_REP + cols % N_REP  # the query head of each column
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_p = tl.arange(0, DP)
    offs_gv = tl.arange(0, GV)
    q_planes = _load_q_planes(Q + b * sqb + heads * sqh, h_ok, qk_scale, DP, NPL)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    ks_base = KS + b * sksb + h * sksh
    kz_base = KZ + b * sksb + h * sksh
    vs_base = VS + b * svsb + h * svsh
    vz_base = VZ + b * svsb + h * svsh

    m_i = tl.full([NH], float("-inf"), tl.float32)
    accs = (tl.zeros([GV, NH], tl.float32),) * (NPL * NGP)  # plane i, part j: channels i * DP + j * GV + [0, GV)
    # Sums over tokens per query head of p (the softmax's denominator) and of p * b for each value
    # group, kept per element of the score tile and summed over its tokens once, after the loop:
    # a sum over the tile's tokens every tile is a reduction across the warp, and a dot for them
    # (a row of ones beside b) needs P in another layout, through shared memory (one layer, int4
    # at batch 8 / 32K: 0.1268 ms with that dot, 0.1149 without; docs/kernels.md).
    l_part = tl.zeros([BLOCK_N, NH], tl.float32)
    b_parts = (tl.zeros([BLOCK_N, NH], tl.float32),) * NPK

    # A loop over key groups (a split holds whole ones, visited from `first` on, wrapping) and,
    # inside, over a group's tiles, which the compiler fuses into one pipelined loop (flatten).
    # The group's fold is the outer body, so the folded q stays in the score dots' operand
    # registers for the group's tiles; folded in a loop over tiles it was carried in another
    # layout and went through shared memory every tile (docs/kernels.md). The tiles' addresses
    # come from a count of tiles, t, not from the outer loop's index: in the fused loop that index
    # is set in a branch, and loads whose addresses depend on it are not pipelined.
    n_groups, first = tile_order(split, start, end, G)
    TPG: tl.constexpr = G // BLOCK_N  # tiles per key group
    n_tiles = n_groups * TPG
    g_first = tile_start(0, first, n_groups, start, G)
    # The scales and zeros are loaded ahead: the pipeliner stages only the code tiles the dots
    # read, so a parameter loaded where it is used exposes a whole memory latency. Value ones are
    # loaded two tiles ahead (v_raw) and turned into P.V's terms one tile ahead (vp_next): turned
    # in the iteration that loaded them, the arithmetic waited for the load about 300
    # instructions after it was issued (a profile put 3.4% of int4's stall samples there; one
    # layer 4-6% faster with both this and _key_params' words). Key ones are loaded a group ahead.
    vp_next = _value_terms(_load_value_params(vs_base, vz_base, g_first + offs_n0, (g_first + offs_n0) < end,
                                              svsn, NG), BITS)
    n_1 = tile_start(1, first * TPG, n_tiles, start, BLOCK_N)
    v_raw = _load_value_params(vs_base, vz_base, n_1 + offs_n0, (n_1 + offs_n0) < tl.where(1 < n_tiles, end, 0),
                               svsn, NG)
    kp_next = _key_params(ks_base, kz_base, g_first, cap, sksn, G, DP, NPL, G != BLOCK_N)
    if G == BLOCK_N:
        kp_next = _dequant_key_params(kp_next, BITS)
        # Where every tile's key dots start: zeros, made by dots of every plane of q with a
        # loaded key tile times 0, so that q's conversion to the dots' operand layout has a user
        # outside the loop and stays there (decode_kernels.score_start says why).
        kb0 = tl.load(k_base + offs_n0[:, None] * skn + offs_p[None, :], mask=offs_n0[:, None] < cap, other=0)
        f0 = _unpack(kb0, BITS, False, KIVI_ASM)
        s_start = tl.zeros([BLOCK_N, NH], tl.float32)
        for i in tl.static_range(NPL):
            s_start = tl.dot(f0[i] * 0.0, q_planes[i], s_start)
    t = 0
    for gi in tl.range(0, n_groups, flatten=True):
        kp = kp_next
        kp_next = _key_params(ks_base, kz_base, tile_start(gi + 1, first, n_groups, start, G), cap, sksn, G, DP, NPL,
                              G != BLOCK_N)
        if G == BLOCK_N:
            kp_next = _dequant_key_params(kp_next, BITS)
        else:
            folded, c = _fold_keys(q_planes, kp, BITS)
        for u in range(0, TPG):
            n0 = tl.multiple_of(tile_start(t, first * TPG, n_tiles, start, BLOCK_N), BLOCK_N)
            offs_n = n0 + offs_n0
            ok_n = offs_n < end
            va, vb = vp_next
            t += 1
            # the next tile (none after the last)
            vp_next = _value_terms(v_raw, BITS)
            # the tile after the next (none past the last; its start may then lie past the
            # split, masked)
            n_2 = tile_start(t + 1, first * TPG, n_tiles, start, BLOCK_N)
            ok_2 = (n_2 + offs_n0) < tl.where(t + 1 < n_tiles, end, 0)
            v_raw = _load_value_params(vs_base, vz_base, n_2 + offs_n0, ok_2, svsn, NG)
            # ---- scores [BLOCK_N, NH], base 2 ----
            kb = tl.load(k_base + offs_n[:, None] * skn + offs_p[None, :], mask=ok_n[:, None], other=0)  # [BLOCK_N, DP]
            if G == BLOCK_N:
                # A key group of one tile: its keys dequantized, k = f * a + b per channel, one
                # fp16 FMA per code (kp holds (a, b), _dequant_key_params); q stays as it is.
                fk = _unpack(kb, BITS, False, KIVI_ASM)
                s = s_start
                for i in tl.static_range(NPL):
                    s = tl.dot(fk[i] * kp[i][0][None, :] + kp[i][1][None, :], q_planes[i], s)
            else:
                fk = _unpack(kb, BITS, True, KIVI_ASM)
                s = tl.dot(fk[0], folded[0], c[None, :] + tl.zeros([BLOCK_N, NH], tl.float32))
                for i in tl.static_range(1, NPL):
                    s = tl.dot(fk[i], folded[i], s)
            s = tl.where(ok_n[:, None], s, float("-inf"))
            # A lazy running max: it moves only when some score passes it by more than RESCALE_LOG2,
            # so p stays below 2**RESCALE_LOG2 (fp16 holds it) and most tiles of a long split skip
            # the accumulators' rescale and the max's reductions: one warp-wide test of the scores.
            over = tl.reshape((s > (m_i + RESCALE_LOG2)[None, :]).to(tl.int32), [BLOCK_N * NH])
            if tl.max(over, axis=0) > 0:
                m_new = tl.maximum(m_i, tl.max(s, axis=0))  # a -inf max always moves
                alpha = tl.exp2(m_i - tl.where(m_new == float("-inf"), 0.0, m_new))
                for k in tl.static_range(NPL * NGP):
                    accs = _replace(accs, k, accs[k] * alpha[None, :])
                l_part = l_part * alpha[None, :]
                for k in tl.static_range(NPK):
                    b_parts = _replace(b_parts, k, b_parts[k] * alpha[None, :])
                m_i = m_new
            p = tl.exp2(s - tl.where(m_i == float("-inf"), 0.0, m_i)[None, :])
            # ---- values: value = f * a + b per token and group, a folded into P ----
            l_part += p
            p_packs = ()
            for k in tl.static_range(NPK):
                a_k = tl.zeros([BLOCK_N, NH], tl.float32)
                b_k = tl.zeros([BLOCK_N, NH], tl.float32)
                for r in tl.static_range(NC):
                    if k * NC + r < NG:
                        a_k = tl.where((copy == r)[None, :], va[k * NC + r][:, None], a_k)
                        b_k = tl.where((copy == r)[None, :], vb[k * NC + r][:, None], b_k)
                b_parts = _replace(b_parts, k, b_parts[k] + p * b_k)
                p_packs = p_packs + ((p * a_k).to(tl.float16),)
            # The tile lies in one block of value codes, channel-major: part j of it holds rows
            # [j * GV, (j + 1) * GV) of its bytes, channels j * GV + [0, GV) of every plane.
            # Unmasked: a tile never passes the capacity (a multiple of the key group), codes past
            # the split's end are valid codes and their probabilities are 0.
            block = v_base + (n0 // VB) * svn + tl.multiple_of(n0 % VB, BLOCK_N)
            for j in tl.static_range(NGP):
                fv = _unpack(tl.load(block + (j * GV + offs_gv)[:, None] * VB + offs_n0[None, :]), BITS, False, KIVI_ASM)
                for i in tl.static_range(NPL):
                    accs = _replace(accs, i * NGP + j, tl.dot(fv[i], p_packs[(i * DP + j * GV) // VG // NC], accs[i * NGP + j]))

    # ---- this split's normalized output and log2-sum-exp ----
    pdl.let_dependents_launch(PDL)
    inv_l, _ = finish_split(m_i, tl.sum(l_part, axis=0), LSE, b * sl_b + heads * sl_h + sp, start, end, N_REP, NH)
    o_cols = O + b * so_b + heads * so_h + sp * so_s  # [NH]
    for i in tl.static_range(NPL):
        for j in tl.static_range(NGP):
            # value group (i * DP + j * GV) // VG: its pack and its copy in the columns
            o = (accs[i * NGP + j] + tl.sum(b_parts[(i * DP + j * GV) // VG // NC], axis=0)[None, :]) * inv_l[None, :]
            ok = h_ok & (copy == (i * DP + j * GV) // VG % NC) & (cols < tl.where(end > start, NH, 0))
            tl.store(o_cols[None, :] + (i * DP + j * GV + offs_gv)[:, None], o, mask=ok[None, :])


@triton.jit
def kivi_and_exact_partial_kernel(
    Q, sqb, sqh,
    K, skb, skh, skn, V, svb, svh, svn,  # the KIVI body, as kivi_partial's
    KS, KZ, sksb, sksh, sksn, VS, VZ, svsb, svsh, svsn, BODY_LEN,
    EK, sekb, sekh, sekn, EV, sevb, sevh, sevn, EXACT_LEN, EXACT_MASK,  # the exact slots behind it
    O, LSE, so_b, so_h, so_s, sl_b, sl_h,
    qk_scale, Hkv, body_splits, body_cap, exact_splits, exact_cap,
    N_REP: tl.constexpr, M: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr,
    G: tl.constexpr, VG: tl.constexpr, BLOCK_N: tl.constexpr, VB: tl.constexpr, HAS_EXACT_LEN: tl.constexpr,
    HAS_EXACT_MASK: tl.constexpr, KIVI_ASM: tl.constexpr, PDL: tl.constexpr, EXACT_BLOCK_N: tl.constexpr,
):
    """Grid (B * Hkv, body_splits + exact_splits): a KIVI body and the exact slots behind it in
    one launch, as decode_kernels.body_and_exact_partial_kernel does for 8-bit bodies (it says
    why)."""
    pdl.wait_for_inputs(PDL)
    split = tl.program_id(1)
    if split < body_splits:
        kivi_partial(Q, sqb, sqh, K, skb, skh, skn, V, svb, svh, svn, KS, KZ, sksb, sksh, sksn,
                     VS, VZ, svsb, svsh, svsn, BODY_LEN, O, LSE, so_b, so_h, so_s, sl_b, sl_h, qk_scale, Hkv,
                     split, split, body_splits, body_cap, N_REP, triton.next_power_of_2(max(8, N_REP)), D, BITS, G, VG,
                     BLOCK_N, VB, KIVI_ASM, PDL)
    else:
        exact_partial(Q, sqb, sqh, EK, sekb, sekh, sekn, EV, sevb, sevh, sevn, EXACT_LEN, EXACT_MASK,
                      O, LSE, so_b, so_h, so_s, sl_b, sl_h, qk_scale, Hkv, split - body_splits, split, exact_splits,
                      exact_cap, N_REP, M, D, EXACT_BLOCK_N, HAS_EXACT_LEN, HAS_EXACT_MASK, PDL, 1)
