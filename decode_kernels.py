"""Triton flash-decoding kernels for caches with one scale per token: exact slots (the model's
dtype), int8 and fp8 (e4m3) codes; and the launcher shared with the KIVI kernel
(decode_kernels_kivi.py). decode_attention.py is the public entry and holds the PyTorch reference.

Decode is memory-bound: each step must read every valid byte of the cache once. The grid is
(B * Hkv, splits): a program owns one KV head and one chunk of the sequence, loads each tile of
keys and values once for the n_rep query heads that share it (GQA: the group padded to the 16
rows a tensor-core dot needs) and keeps an online softmax; a second kernel combines the splits
by their log-sum-exps. A quantized body and the exact slots behind it are one grid
(body_and_exact_partial_kernel; KIVI's in decode_kernels_kivi). The current length is read on
the device and each split's chunk derived from it inside the kernel, so the grid is static and a
CUDA-graph replay sees the cache grow. Each program visits its chunk's tiles from a hashed start
and wraps around (tile_order), so that programs running together do not read in lockstep.

The 8-bit formats do no per-element multiply. Both dots run in fp16 on the codes themselves: the
key scale (one per token) multiplies the scores, the value scale the probabilities before P.V.
What is left per element is the conversion of a code to fp16, done in registers from the packed
bytes (CONVERT_ASM, sm_80+):
  int8  x -> fp16 1152 + x: an XOR flips the sign bit (x + 128 as a byte), and one PRMT per two
        codes places the byte under the exponent of 1024; the key dot starts from
        -1152 * sum(q) (score_start) and the 1152 * sum(p) this adds to each output row is
        subtracted once per row and tile;
  fp8   e4m3 -> fp16 with one cvt.rn.f16x2.e4m3x2 per two codes on sm_89+ (FP8_CVT); on sm_80
        the bits are moved into an fp16 of 1/256 the value (sign, then exponent and mantissa
        shifted by 7), and the 256 goes into the scale.
Both are exact. The value codes come in blocks of 32 tokens, channel-major inside a block
(kv_quant.VALUE_BLOCK): the P.V dot reduces over tokens and reads each channel's tokens side by
side (one layer at batch 8 / 32K on an H200: int8 0.169 -> 0.145 ms, fp8 0.160 -> 0.142).
The values' probabilities are divided by the tile's largest value scale before
they are rounded to fp16 (so no product of a small probability and a small scale underflows) and
the tile's sum is multiplied by it after the dot. Under the Triton interpreter the conversions
are written with plain casts (CONVERT_ASM off).
"""
import functools
import math

import torch
import triton
import triton.language as tl

import kv_quant
import pdl


# (format, D) -> (BLOCK_N, num_warps, num_stages, waves): waves = programs per SM the split grid
# aims for. Chosen with scripts/bench_attention.py on an H200 (docs/kernels.md has the sweep): the
# 8-bit formats run best as one-warp programs on 32-token tiles, twice as many of them, so that
# every reduction of the online softmax stays inside a warp (no shared-memory round trip and
# barrier per tile) and many independent programs hide each other's latency. KIVI takes the same
# shape: within 2% of the best of its sweep (bench_attention.SWEEP; docs/kernels.md).
CONFIGS = {
    ("exact", 64): (64, 4, 4, 8),
    ("exact", 128): (64, 4, 4, 8),
    ("int8", 64): (32, 1, 3, 16),
    ("int8", 128): (32, 1, 3, 16),
    ("fp8", 64): (32, 1, 3, 16),
    ("fp8", 128): (32, 1, 3, 16),
    ("int4", 64): (32, 1, 3, 16),
    ("int4", 128): (32, 1, 3, 16),
    ("int2", 64): (32, 1, 3, 16),
    ("int2", 128): (32, 1, 3, 16),
}
FORMAT_IDS = {"exact": 0, "int8": 1, "fp8": 2}
# Tuning switches, module-level so the benchmark can sweep them (and CONFIGS) without widening
# the launch API.
CONVERT_ASM = True  # 8-bit codes converted with the PTX below (else plain casts, as under the interpreter)
KIVI_ASM = True  # KIVI tiles unpacked with PTX (decode_kernels_kivi; else plain ops, as under the interpreter)
MIN_SPLIT = 1024  # tokens of capacity per split at least, a quantized body's grid (plan_splits) ...
EXACT_MIN_SPLIT = 2048  # ... the exact slots' alone (full cache, compress_kv) ...
FILL_WARPS_PER_SM = 8  # ... unless that leaves the grid fewer warps than this per SM
EXACT_SPLITS = 8  # the exact slots behind a body: one tile per split, up to this many splits
# Tokens per tile of the exact slots in a body's launch. A one-warp program loads a bf16
# tile into registers before the dot: 32-token tiles made the kernel 252 registers a thread
# (8 warps per SM, where the body alone runs 9); 16-token tiles keep it at the body's 224
# (Triton 3.6, sm_90). The tiles are not pipelined (STAGES 1): most splits hold one.
EXACT_BLOCK_N = 16
COMBINE_BLOCK_D = 32  # channels per combine program
INT8_OFFSET = 1152.0  # 1024 (the fp16 exponent the bytes sit under) + 128 (the flipped sign bit)
INT8_OFFSET_T = tl.constexpr(INT8_OFFSET)  # the kernels read it as a global
# How far (log2) a head's scores may pass the running max before the accumulators are rescaled
# (KIVI's lazy running max, decode_kernels_kivi): probabilities stay below 2**8, far inside fp16.
RESCALE_LOG2 = tl.constexpr(8.0)

# Four int8 codes (one register) -> four fp16 1152 + code, two per output register.
_INT8_TO_F16_ASM = tl.constexpr("""{
.reg .b32 t;
xor.b32 t, $2, 0x80808080;
prmt.b32 $0, t, 0x64646464, 0x4140;
prmt.b32 $1, t, 0x64646464, 0x4342;
}""")
# Four codes (ignored) -> four fp16 -INT8_OFFSET (0xE480): the int8 score offset's operand in
# score_start.
_MINUS_INT8_OFFSET_ASM = tl.constexpr("mov.b32 $0, 0xE480E480; mov.b32 $1, 0xE480E480;")
# Four e4m3 codes -> four fp16 of the same value (sm_89+).
_FP8_TO_F16_ASM = tl.constexpr("""{
.reg .b16 lo, hi;
mov.b32 {lo, hi}, $2;
cvt.rn.f16x2.e4m3x2 $0, lo;
cvt.rn.f16x2.e4m3x2 $1, hi;
}""")


@triton.jit
def int8_codes_to_f16(x, CONVERT_ASM: tl.constexpr):
    """int8 codes -> fp16 INT8_OFFSET + code, exact."""
    if CONVERT_ASM:
        return tl.inline_asm_elementwise(_INT8_TO_F16_ASM, "=r,=r,r", [x], dtype=tl.float16, is_pure=True, pack=4)
    else:
        return x.to(tl.float16) + 1152.0


@triton.jit
def fp8_codes_to_f16(x, CONVERT_ASM: tl.constexpr, FP8_CVT: tl.constexpr):
    """uint8 e4m3 bit patterns -> fp16: the value (FP8_CVT), else the value / 256. Exact."""
    if CONVERT_ASM and FP8_CVT:
        return tl.inline_asm_elementwise(_FP8_TO_F16_ASM, "=r,=r,r", [x], dtype=tl.float16, is_pure=True, pack=4)
    else:
        # s eeee mmm -> s 0 eeee mmm 0000000: an fp16 whose exponent bias (15) is 8 more than
        # e4m3's (7); subnormals line up too (fp16's are 2**-24 * m * 2**7 = e4m3's / 256).
        b = x.to(tl.int16)
        return (((b & 0x7F) << 7) | ((b & 0x80) << 8)).to(tl.float16, bitcast=True)


@triton.jit
def score_start(q, codes, FORMAT: tl.constexpr, CONVERT_ASM: tl.constexpr):
    """[M, BLOCK_N] what the key dot adds its products to: -INT8_OFFSET * sum(q) per row for int8
    (the offset its conversion adds to every key code), 0 for fp8. codes: any [D, BLOCK_N] tile
    of key codes, loaded (its values are not used).

    Computed with a dot of q so that q's conversion to the dot's operand layout has a second
    user outside the loop: Triton 3.6 sinks a conversion with one user into the loop
    (ReorderInstructions), which then reloads q from shared memory and regroups its registers
    every tile (16 loads and about 115 moves of the 8-bit loop's 945 instructions, sm_90). The
    operand must come from a loaded 8-bit tile: Triton picks the operands' register layout
    (kWidth) from the bit width of the loads they come from, and only equal layouts are shared."""
    if FORMAT == 1 and CONVERT_ASM:
        minus_offset = tl.inline_asm_elementwise(_MINUS_INT8_OFFSET_ASM, "=r,=r,r", [codes], dtype=tl.float16,
                                                 is_pure=True, pack=4)
    elif FORMAT == 2 and CONVERT_ASM:
        minus_offset = tl.inline_asm_elementwise("mov.b32 $0, 0; mov.b32 $1, 0;", "=r,=r,r", [codes],
                                                 dtype=tl.float16, is_pure=True, pack=4)
    else:
        minus_offset = tl.full(codes.shape, -INT8_OFFSET_T if FORMAT == 1 else 0.0, tl.float16)
    return tl.dot(q, minus_offset)


@triton.jit
def split_bounds(split, LEN, cap, n_splits, HAS_LEN: tl.constexpr, BLOCK_N: tl.constexpr):
    """[start, end) of split number `split`: a chunk of the *current* length (read on the device,
    never past the buffer's capacity), rounded up to BLOCK_N (a tile; KIVI: a key group). Static
    grid, dynamic work."""
    if HAS_LEN:
        seg_len = tl.minimum(tl.load(LEN).to(tl.int32), cap)
    else:
        seg_len = cap
    chunk = tl.cdiv(tl.cdiv(seg_len, n_splits), BLOCK_N) * BLOCK_N
    start = split * chunk
    return start, tl.minimum(start + chunk, seg_len)


@triton.jit
def tile_order(split, start, end, BLOCK_N: tl.constexpr):
    """(the number of tiles in [start, end), the one this program visits first). A program visits
    its tiles from that one to the end and then wraps around to start. Each program starts at
    another tile (a hash of its split and its (batch, head)), because programs that run at the
    same time and read their chunks in the same order all stand at the same offset inside their
    own chunk (int8 at batch 1 / 128K: chunks 128 KB apart, for K and for V). The DRAM served
    those lockstep reads slower: one layer on an H200, int8 at batch 1 / 128K took 0.0755 ms in
    order and 0.0705 rotated (docs/kernels.md)."""
    n_tiles = tl.cdiv(end - start, BLOCK_N)
    return n_tiles, (split * 7 + tl.program_id(0) * 13) % tl.maximum(n_tiles, 1)


@triton.jit
def tile_start(t, first, n_tiles, start, BLOCK_N: tl.constexpr):
    """The first token of the t-th tile a program visits (tile_order), t in [0, n_tiles]."""
    i = t + first
    return start + tl.where(i >= n_tiles, i - n_tiles, i) * BLOCK_N


@triton.jit
def online_softmax(s, m_i, l_i):
    """One tile of scores s [M, BLOCK_N] (base 2, -inf where invalid) into the running max and
    sum: (p, alpha to rescale what came before, new max, new sum). A row with nothing valid yet
    keeps m = -inf and gets p = 0."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(s - m_use[:, None])
    return p, alpha, m_new, l_i * alpha + tl.sum(p, axis=1)


@triton.jit
def finish_split(m_i, l_i, LSE, lse_row, start, end, N_REP: tl.constexpr, M: tl.constexpr):
    """Store this split's log2-sum-exp per row (lse_row [M] pointers) and return (1 / sum per row,
    the rows whose output to store): an empty split (past the current length) stores only its
    lse, which tells the combine to skip its output."""
    offs_m = tl.arange(0, M)
    has = l_i > 0
    tl.store(LSE + lse_row, tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf")), mask=offs_m < N_REP)
    inv_l = tl.where(has, 1.0 / tl.where(has, l_i, 1.0), 0.0)
    return inv_l, offs_m < tl.where(end > start, N_REP, 0)  # (not a & (end > start): the interpreter rejects that mask)


@triton.jit
def token_partial(
    Q, sqb, sqh,
    K, skb, skh, skn,  # exact slots [B, Hkv, N, D] or codes [B, Hkv, L, D]
    V, svb, svh, svn,  # exact slots as K; 8-bit value codes in blocks [B, Hkv, L / VB, D, VB], svn per block
    KS, VS, ssb, ssh, ssn,  # per-token scales [B, Hkv, L, 1] (8-bit formats; keys and values alike)
    LEN, MASK,  # valid length [1] (HAS_LEN), valid slots [N] uint8 (HAS_MASK)
    O, LSE, so_b, so_h, so_s,  # partial out [B, Hq, splits, D] fp32, log2-sum-exp [B, Hq, splits]
    sl_b, sl_h,
    qk_scale, Hkv,
    split, sp, n_splits, cap,  # this program's split of the segment, its index in O and LSE, the segment's splits
    N_REP: tl.constexpr, M: tl.constexpr, D: tl.constexpr, FORMAT: tl.constexpr, BLOCK_N: tl.constexpr, VB: tl.constexpr,
    HAS_LEN: tl.constexpr, HAS_MASK: tl.constexpr, CONVERT_ASM: tl.constexpr, FP8_CVT: tl.constexpr,
    FP8_UNIT: tl.constexpr,  # what fp8_codes_to_f16 returns times this is the value (1 or 256)
    PDL: tl.constexpr,
    STAGES: tl.constexpr,  # the loop's pipeline depth (None: the launch's num_stages)
):
    """One program's split of one segment of token slots (exact, int8 or fp8: FORMAT 0, 1, 2)
    for one KV head: its partial output and log2-sum-exp, written at split index sp."""
    b = tl.program_id(0) // Hkv
    h = tl.program_id(0) % Hkv
    start, end = split_bounds(split, LEN, cap, n_splits, HAS_LEN, BLOCK_N)
    offs_m = tl.arange(0, M)
    row_ok = offs_m < N_REP
    heads = h * N_REP + offs_m  # the query heads of this KV head, padded to M rows
    offs_d = tl.arange(0, D)
    offs_n0 = tl.arange(0, BLOCK_N)
    q = tl.load(Q + b * sqb + heads[:, None] * sqh + offs_d[None, :], mask=row_ok[:, None], other=0.0)  # [M, D]
    if FORMAT != 0:
        # fp16 operands for the codes; q prescaled (softmax scale, log2 e) so it stays far from
        # fp16's range limit.
        q = (q.to(tl.float32) * qk_scale).to(tl.float16)
    k_base = K + b * skb + h * skh
    if FORMAT != 0:
        # The head's first tile of codes (masked: an empty body has none).
        codes0 = tl.load(k_base + offs_n0[None, :] * skn + offs_d[:, None], mask=offs_n0[None, :] < cap, other=0)
        s_start = score_start(q, codes0, FORMAT, CONVERT_ASM)  # [M, BLOCK_N]
    v_base = V + b * svb + h * svh
    ks_base = KS + b * ssb + h * ssh
    vs_base = VS + b * ssb + h * ssh

    m_i = tl.full([M], float("-inf"), tl.float32)
    l_i = tl.zeros([M], tl.float32)
    acc = tl.zeros([M, D], tl.float32)
    unit = tl.full([], 1.0, tl.float32)  # 8-bit formats: what one unit of acc is worth (below)
    n_tiles, first = tile_order(split, start, end, BLOCK_N)
    if FORMAT != 0:
        # The scales are loaded one tile ahead: the pipeliner stages only the tiles the dots read,
        # so a scale loaded where it is used exposes a whole memory latency every tile.
        n_next = tile_start(0, first, n_tiles, start, BLOCK_N)
        ok_next = (n_next + offs_n0) < end
        ks_next = tl.load(ks_base + (n_next + offs_n0) * ssn, mask=ok_next, other=0.0)
        vs_next = tl.load(vs_base + (n_next + offs_n0) * ssn, mask=ok_next, other=0.0)
    for t in tl.range(0, n_tiles, num_stages=STAGES):
        n0 = tl.multiple_of(tile_start(t, first, n_tiles, start, BLOCK_N), BLOCK_N)
        offs_n = n0 + offs_n0
        ok_n = offs_n < end
        if HAS_MASK:
            ok_n = ok_n & (tl.load(MASK + offs_n, mask=ok_n, other=0) != 0)
        # ---- scores [M, BLOCK_N], base 2 ----
        kt = tl.load(k_base + offs_n[None, :] * skn + offs_d[:, None], mask=ok_n[None, :], other=0)  # [D, BLOCK_N]
        if FORMAT == 0:
            s = tl.dot(q, kt) * qk_scale
        else:
            ks, vs = ks_next.to(tl.float32), vs_next.to(tl.float32)
            n_next = tile_start(t + 1, first, n_tiles, start, BLOCK_N)
            ok_next = (n_next + offs_n0) < tl.where(t + 1 < n_tiles, end, 0)  # none after the last
            ks_next = tl.load(ks_base + (n_next + offs_n0) * ssn, mask=ok_next, other=0.0)
            vs_next = tl.load(vs_base + (n_next + offs_n0) * ssn, mask=ok_next, other=0.0)
            if FORMAT == 1:
                s = tl.dot(q, int8_codes_to_f16(kt, CONVERT_ASM), s_start) * ks[None, :]
            else:
                s = tl.dot(q, fp8_codes_to_f16(kt, CONVERT_ASM, FP8_CVT), s_start) * (ks * FP8_UNIT)[None, :]
        s = tl.where(ok_n[None, :], s, float("-inf"))
        p, alpha, m_i, l_i = online_softmax(s, m_i, l_i)
        # ---- values ----
        if FORMAT == 0:
            vt = tl.load(v_base + offs_n[:, None] * svn + offs_d[None, :], mask=ok_n[:, None], other=0)  # [BLOCK_N, D]
            acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt)
        else:
            # The tile lies in one block of codes (BLOCK_N divides VB), channel-major: a contiguous
            # [D, BLOCK_N] piece whose rows the P.V dot reads whole (kv_quant.VALUE_BLOCK says
            # why). Unmasked: a tile never passes the capacity (a multiple of VB), codes past the
            # split's end are valid codes (QuantizedBody) and their probabilities are 0. Without
            # the multiple_of hint Triton 3.6 loads the tile byte by byte (1.3x slower kernel).
            in_block = tl.multiple_of(n0 % VB, BLOCK_N)
            vt = tl.load(v_base + (n0 // VB) * svn + in_block + offs_d[None, :] * VB + offs_n0[:, None])  # [BLOCK_N, D]
            v_top = tl.max(vs, axis=0)
            v_top = tl.where(v_top > 0, v_top, 1.0)
            pv = (p * (vs / v_top)[None, :]).to(tl.float16)
            # acc is kept in units of this tile's product scale (v_top, times FP8_UNIT for fp8):
            # the online softmax's rescale, the change of unit and the int8 offset all go into
            # the accumulator the dot adds to, one FMA per element of [M, D] where they were three.
            tile_unit = v_top * FP8_UNIT if FORMAT == 2 else v_top
            acc = acc * (alpha * (unit / tile_unit))[:, None]
            if FORMAT == 1:
                pv_offset = INT8_OFFSET_T * tl.sum(pv.to(tl.float32), axis=1)  # [M]
                acc = tl.dot(pv, int8_codes_to_f16(vt, CONVERT_ASM), acc - pv_offset[:, None])
            else:
                acc = tl.dot(pv, fp8_codes_to_f16(vt, CONVERT_ASM, FP8_CVT), acc)
            unit = tile_unit

    # ---- this split's normalized output and log2-sum-exp ----
    pdl.let_dependents_launch(PDL)
    inv_l, out_ok = finish_split(m_i, l_i, LSE, b * sl_b + heads * sl_h + sp, start, end, N_REP, M)
    tl.store(O + b * so_b + heads[:, None] * so_h + sp * so_s + offs_d[None, :], acc * (inv_l * unit)[:, None],
             mask=out_ok[:, None])


@triton.jit
def exact_partial(
    Q, sqb, sqh, K, skb, skh, skn, V, svb, svh, svn, LEN, MASK,  # exact slots, as token_partial's
    O, LSE, so_b, so_h, so_s, sl_b, sl_h,
    qk_scale, Hkv, split, sp, n_splits, cap,
    N_REP: tl.constexpr, M: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_LEN: tl.constexpr, HAS_MASK: tl.constexpr, PDL: tl.constexpr, STAGES: tl.constexpr,
):
    """token_partial over exact slots (no codes, no scales)."""
    token_partial(Q, sqb, sqh, K, skb, skh, skn, V, svb, svh, svn, K, K, 0, 0, 0, LEN, MASK,
                  O, LSE, so_b, so_h, so_s, sl_b, sl_h, qk_scale, Hkv, split, sp, n_splits, cap,
                  N_REP, M, D, 0, BLOCK_N, 1, HAS_LEN, HAS_MASK, False, False, 1.0, PDL, STAGES)


@triton.jit
def token_partial_kernel(
    Q, sqb, sqh, K, skb, skh, skn, V, svb, svh, svn, LEN, MASK,  # exact slots, as token_partial's
    O, LSE, so_b, so_h, so_s, sl_b, sl_h,
    qk_scale, Hkv, n_splits, cap,
    N_REP: tl.constexpr, M: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_LEN: tl.constexpr, HAS_MASK: tl.constexpr, PDL: tl.constexpr,
):
    """Grid (B * Hkv, n_splits): exact slots alone (the full and compress_kv caches)."""
    pdl.wait_for_inputs(PDL)
    split = tl.program_id(1)
    exact_partial(Q, sqb, sqh, K, skb, skh, skn, V, svb, svh, svn, LEN, MASK, O, LSE, so_b, so_h, so_s, sl_b, sl_h,
                  qk_scale, Hkv, split, split, n_splits, cap, N_REP, M, D, BLOCK_N, HAS_LEN, HAS_MASK, PDL, None)


@triton.jit
def body_and_exact_partial_kernel(
    Q, sqb, sqh,
    K, skb, skh, skn, V, svb, svh, svn, KS, VS, ssb, ssh, ssn, BODY_LEN,  # the int8/fp8 body, as token_partial's
    EK, sekb, sekh, sekn, EV, sevb, sevh, sevn, EXACT_LEN, EXACT_MASK,  # the exact slots behind it
    O, LSE, so_b, so_h, so_s, sl_b, sl_h,
    qk_scale, Hkv, body_splits, body_cap, exact_splits, exact_cap,
    N_REP: tl.constexpr, M: tl.constexpr, D: tl.constexpr, FORMAT: tl.constexpr, BLOCK_N: tl.constexpr, VB: tl.constexpr,
    HAS_EXACT_LEN: tl.constexpr, HAS_EXACT_MASK: tl.constexpr, CONVERT_ASM: tl.constexpr, FP8_CVT: tl.constexpr,
    FP8_UNIT: tl.constexpr, PDL: tl.constexpr, EXACT_BLOCK_N: tl.constexpr,
):
    """Grid (B * Hkv, body_splits + exact_splits): an int8 or fp8 body and the exact slots behind
    it in one launch. As two launches the exact slots' few tiles ran only after the body's last
    program, a latency of their own on every layer; here their programs come last in the grid and
    run beside the body's last wave (one layer on an H200, batch 1 / 8K of a 128K cache: int8
    14.0 -> 11.9 us, fp8 13.4 -> 11.3; docs/kernels.md)."""
    pdl.wait_for_inputs(PDL)
    split = tl.program_id(1)
    if split < body_splits:
        token_partial(Q, sqb, sqh, K, skb, skh, skn, V, svb, svh, svn, KS, VS, ssb, ssh, ssn, BODY_LEN, BODY_LEN,
                      O, LSE, so_b, so_h, so_s, sl_b, sl_h, qk_scale, Hkv, split, split, body_splits, body_cap,
                      N_REP, M, D, FORMAT, BLOCK_N, VB, True, False, CONVERT_ASM, FP8_CVT, FP8_UNIT, PDL, None)
    else:
        exact_partial(Q, sqb, sqh, EK, sekb, sekh, sekn, EV, sevb, sevh, sevn, EXACT_LEN, EXACT_MASK,
                      O, LSE, so_b, so_h, so_s, sl_b, sl_h, qk_scale, Hkv, split - body_splits, split, exact_splits,
                      exact_cap, N_REP, M, D, EXACT_BLOCK_N, HAS_EXACT_LEN, HAS_EXACT_MASK, PDL, 1)


@triton.jit
def combine_kernel(O, LSE, so_bh, so_s, sl_bh, OUT, sout_b, sout_h, Hq, S, S_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
                   PDL: tl.constexpr):
    """out [B, Hq, D] = the splits' outputs weighted by their share of the softmax mass, one
    program per (query head, BLOCK_D channels): at batch 1 the 32 heads alone would leave most
    SMs idle while each program's loads wait on its lse. It lets the next kernel (the output
    projection) launch at once: its programs are one wave, all on the SMs already."""
    pdl.let_dependents_launch(PDL)
    pdl.wait_for_inputs(PDL)
    bh = tl.program_id(0)
    b = bh // Hq
    hq = bh % Hq
    offs_s = tl.arange(0, S_PAD)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    lse = tl.load(LSE + bh * sl_bh + offs_s, mask=offs_s < S, other=float("-inf"))
    m = tl.max(lse, axis=0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m)  # 0 for empty splits
    # An empty split's out was never written: not read (at short lengths most splits are empty).
    o = tl.load(O + bh * so_bh + offs_s[:, None] * so_s + offs_d[None, :], mask=(lse > float("-inf"))[:, None], other=0.0)
    den = tl.sum(w, axis=0)
    out = tl.sum(o * w[:, None], axis=0) / tl.where(den > 0, den, 1.0)
    tl.store(OUT + b * sout_b + hq * sout_h + offs_d, out.to(OUT.dtype.element_ty))



def plan_splits(bh: int, capacities: list[int], block_ns: list[int], warps: int, sm_count: int, waves: int,
                min_split: int) -> list[int]:
    """Static split counts per segment from shapes only: ~waves programs per SM in all, shared by
    capacity, at least min_split tokens of capacity (and one tile) per split, or fewer tokens where
    min_split would leave the grid fewer than FILL_WARPS_PER_SM warps (of `warps` per program) per
    SM. The split count is fixed for the capacity, while the splits cut the current length: at
    batch 1 a quantized body sized for 128K runs 132 splits per KV head (about 1000 tokens each,
    MIN_SPLIT), not 256, because a split costs its program, its partial output and its share of
    the combine even when it holds one tile or none (on an H200, one layer, 8K tokens of a 128K
    int8 cache: 19.6 us against 23.2; 128K: 89 against 94). Eight warps per SM, not four: one
    layer at batch 1 / 32K, int8 29.7 us against 45.9 (docs/kernels.md). The exact slots alone
    (EXACT_MIN_SPLIT) take 2048 tokens at the least: their four-warp programs hold a deep
    pipeline of bf16 tiles in shared memory, two to an SM, so the empty splits of a short length
    run in waves of their own (one layer at batch 1 in a 128K cache, 1024 -> 2048 -> 4096: 1K
    10.0 -> 7.0 -> 6.0 us, 8K 18.4 -> 15.2 -> 14.0, 128K 131.5 -> 129.6 -> 126.7). 4096 made the
    whole step at batch 8 / 32K 4% slower (8 splits per KV head where the waves ask for 17); 2048
    gives 16 and ran it as fast as 1024.
    The exact slots behind a body (the segments after the first: sink, window, a pending KIVI
    group, usually a few hundred) take one tile per split, up to EXACT_SPLITS: they are the last
    programs of the body's grid, and at batch 1 their tiles one after another in a few programs
    were a latency of their own (int4, 4-layer step, when they were a launch after the body's:
    27 -> 16 us)."""
    target = max(1, math.ceil(waves * sm_count / bh))
    total = sum(capacities)
    fill = FILL_WARPS_PER_SM * sm_count / (warps * bh)  # splits in all that give the grid that many warps
    per_split = min(min_split, total / max(fill, 1))
    splits = []
    for cap, bn in zip(capacities, block_ns):
        s = max(1, round(target * cap / max(total, 1)))
        splits.append(max(1, min(s, math.ceil(cap / max(bn, per_split)))))
    for i in range(1, len(splits)):
        splits[i] = max(splits[i], min(math.ceil(capacities[i] / block_ns[i]), EXACT_SPLITS))
    return splits


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.lru_cache(maxsize=None)
def _has_fp8_cvt(device_index: int) -> bool:
    """cvt.rn.f16x2.e4m3x2 exists from sm_89 (Ada, Hopper); an A100 (sm_80) converts in software."""
    return torch.cuda.get_device_capability(device_index) >= (8, 9)


def flash_decode(q, k, v, exact_len, exact_mask, body, body_len, sm_scale, out=None):
    """Launch the partial kernel of the segments (the quantized body, if any, then the exact slots,
    in one grid) into one buffer of splits, then the combine. Arguments as decode_attention's
    (checked there; exact_mask as uint8); `out` [B, Hq, D] is written in place if given."""
    from decode_kernels_kivi import kivi_and_exact_partial_kernel  # (it imports this module's helpers)

    B, Hq, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    n_rep = Hq // Hkv
    device = q.device.index if q.device.index is not None else (torch.cuda.current_device() if q.is_cuda else 0)
    segments = []  # (format, capacity, BLOCK_N, num_warps, num_stages)
    if body is not None:
        block_n, warps, stages, waves = CONFIGS[(body.format, D)]
        # A tile within one block of value codes, and a KIVI tile within one key group.
        block_n = min(block_n, kv_quant.VALUE_BLOCK, body.key_group or block_n)
        segments.append((body.format, body.k_codes.shape[2], block_n, warps, stages))
    block_n, warps, stages, exact_waves = CONFIGS[("exact", D)]
    if body is not None:
        block_n = EXACT_BLOCK_N  # the exact slots run in the body's launch
    segments.append(("exact", N, block_n, warps, stages))
    # (CPU tensors reach here only under TRITON_INTERPRET=1, in tests.)
    sm_count = _sm_count(device) if q.is_cuda else 132
    # The body, when there is one, is nearly all the work: its config's waves and warps plan the grid.
    waves = waves if body is not None else exact_waves
    min_split = MIN_SPLIT if body is not None else EXACT_MIN_SPLIT
    splits = plan_splits(B * Hkv, [s[1] for s in segments], [s[2] for s in segments], segments[0][3], sm_count, waves,
                         min_split)
    o_part = torch.empty(B, Hq, sum(splits), D, device=q.device, dtype=torch.float32)
    lse = torch.empty(B, Hq, sum(splits), device=q.device, dtype=torch.float32)
    launch_pdl = pdl.options(q)
    common = dict(M=max(16, triton.next_power_of_2(n_rep)), N_REP=n_rep, D=D, **launch_pdl)
    qk_scale = sm_scale * math.log2(math.e)  # the kernels use exp2
    exact_args = (k, *k.stride()[:3], v, *v.stride()[:3])
    exact_len_arg = exact_len if exact_len is not None else q  # (pointers the kernel never reads without HAS_*)
    exact_mask_arg = exact_mask if exact_mask is not None else q
    if body is None:
        token_partial_kernel[(B * Hkv, splits[0])](
            q, q.stride(0), q.stride(1), *exact_args, exact_len_arg, exact_mask_arg,
            o_part, lse, *o_part.stride()[:3], *lse.stride()[:2], qk_scale, Hkv, splits[0], N,
            BLOCK_N=segments[0][2], HAS_LEN=exact_len is not None, HAS_MASK=exact_mask is not None,
            num_warps=segments[0][3], num_stages=segments[0][4], **common)
    else:
        # One launch for the body and the exact slots behind it (body_and_exact_partial_kernel
        # says why), in the body's config.
        (fmt, body_cap, block_n, warps, stages), (_, exact_cap, *_) = segments
        grid = (B * Hkv, sum(splits))
        tail = (*exact_args, exact_len_arg, exact_mask_arg, o_part, lse, *o_part.stride()[:3], *lse.stride()[:2],
                qk_scale, Hkv, splits[0], body_cap, splits[1], exact_cap)
        launch = dict(BLOCK_N=block_n, HAS_EXACT_LEN=exact_len is not None, HAS_EXACT_MASK=exact_mask is not None,
                      EXACT_BLOCK_N=EXACT_BLOCK_N, num_warps=warps, num_stages=stages, **common)
        if body.bits == 8:
            convert_asm = CONVERT_ASM and q.is_cuda
            fp8_cvt = q.is_cuda and _has_fp8_cvt(device)
            body_and_exact_partial_kernel[grid](
                q, q.stride(0), q.stride(1), body.k_codes, *body.k_codes.stride()[:3],
                body.v_codes, *body.v_codes.stride()[:3], body.k_scale, body.v_scale, *body.k_scale.stride()[:3],
                body_len, *tail, FORMAT=FORMAT_IDS[fmt], VB=kv_quant.VALUE_BLOCK, CONVERT_ASM=convert_asm,
                FP8_CVT=fp8_cvt, FP8_UNIT=1.0 if convert_asm and fp8_cvt else 256.0, **launch)
        else:
            kivi_and_exact_partial_kernel[grid](
                q, q.stride(0), q.stride(1), body.k_codes, *body.k_codes.stride()[:3],
                body.v_codes, *body.v_codes.stride()[:3], body.k_scale, body.k_zero, *body.k_scale.stride()[:3],
                body.v_scale, body.v_zero, *body.v_scale.stride()[:3], body_len, *tail,
                BITS=body.bits, G=body.key_group, VG=body.value_group,
                VB=kv_quant.VALUE_BLOCK, KIVI_ASM=KIVI_ASM and q.is_cuda, **launch)
    if out is None:
        out = torch.empty_like(q)
    s_pad = triton.next_power_of_2(sum(splits))
    block_d = min(D, COMBINE_BLOCK_D)
    combine_kernel[(B * Hq, D // block_d)](
        o_part, lse, o_part.stride(1), o_part.stride(2), lse.stride(1), out, out.stride(0), out.stride(1), Hq, sum(splits),
        S_PAD=s_pad, BLOCK_D=block_d, num_warps=min(8, max(1, s_pad * block_d // 2048)),  # <= 64 fp32 of the tile per thread
        **launch_pdl,
    )
    return out
