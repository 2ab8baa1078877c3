"""The linear layers' Triton kernel: y = x @ W^T (* one scale per output channel) (+ bias), with W
in the model's dtype or int8 codes converted in registers (no dequantized copy of the weights ever
exists in memory). Called through linear_op.linear, which holds the PyTorch reference.

A decode step multiplies a few rows (the batch) by every weight matrix once: it is a stream of
the weights, and its floor is their bytes over the copy bandwidth. The kernel is one program per
BLOCK_N output channels (and per K split) streaming its [BLOCK_N, K] slab of W in
[BLOCK_N, BLOCK_K] tiles: with BLOCK_M = 1 (batch 1) the products run on the CUDA cores, reading
bf16 activations and int8 or bf16 weights as 32-bit words, with BLOCK_M = 16 on the tensor cores,
the rows padded to the 16 a dot needs. The configs come from a
committed sweep (scripts/bench_linear.py; docs/linear.md has its table), looked up by the
matrix's shape and row count, so every compile runs the same kernels: nothing is tuned while a
model compiles.
"""

import torch
import triton
import triton.language as tl

import pdl

# (weight kind, N, K, rows) -> (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, split_k) for
# decode-sized inputs: rows 1 (batch 1) or DECODE_ROWS (2 to 16 rows). With BLOCK_M 1 num_stages
# is the tiles in flight per program, 1 or 2 (triton_linear). Chosen on an H200 by
# scripts/bench_linear.py (docs/linear.md).
CONFIGS: dict[tuple[str, int, int, int], tuple[int, int, int, int, int, int]] = {
    # Llama-3-8B / 3.1-8B, one GPU
    ("bf16", 6144, 4096, 1): (1, 8, 512, 4, 1, 1),  # wqkv
    ("bf16", 6144, 4096, 16): (16, 64, 128, 4, 3, 4),  # re-timed after the split sums moved into a kernel (docs/linear.md)
    ("bf16", 4096, 4096, 1): (1, 8, 1024, 8, 1, 1),  # wo
    ("bf16", 4096, 4096, 16): (16, 32, 128, 4, 3, 4),
    ("bf16", 14336, 4096, 1): (1, 8, 512, 4, 1, 1),  # w1, w3
    ("bf16", 14336, 4096, 16): (16, 32, 128, 4, 3, 1),
    ("bf16", 4096, 14336, 1): (1, 8, 1024, 8, 1, 1),  # w2
    ("bf16", 4096, 14336, 16): (16, 32, 128, 4, 3, 4),
    ("bf16", 128256, 4096, 1): (1, 32, 256, 8, 1, 1),  # output
    ("bf16", 128256, 4096, 16): (16, 64, 128, 4, 4, 1),
    ("int8", 6144, 4096, 1): (1, 8, 256, 8, 1, 1),
    ("int8", 6144, 4096, 16): (16, 64, 128, 4, 4, 4),
    ("int8", 4096, 4096, 1): (1, 8, 1024, 4, 2, 1),
    ("int8", 4096, 4096, 16): (16, 32, 128, 4, 4, 4),
    ("int8", 14336, 4096, 1): (1, 16, 512, 4, 1, 1),
    ("int8", 14336, 4096, 16): (16, 32, 256, 4, 3, 1),
    ("int8", 4096, 14336, 1): (1, 8, 1024, 4, 2, 1),
    ("int8", 4096, 14336, 16): (16, 32, 256, 4, 3, 4),
    ("int8", 128256, 4096, 1): (1, 32, 512, 8, 1, 1),
    ("int8", 128256, 4096, 16): (16, 128, 256, 4, 3, 1),
    # The MLP's gate and up (w1, w3) in one kernel: silu(x w1^T) * (x w3^T)
    ("bf16 gated", 14336, 4096, 1): (1, 8, 512, 4, 1, 1),
    ("bf16 gated", 14336, 4096, 16): (16, 32, 128, 4, 3, 1),
    ("int8 gated", 14336, 4096, 1): (1, 16, 256, 4, 2, 1),
    ("int8 gated", 14336, 4096, 16): (16, 32, 256, 4, 3, 1),
    # Llama-3-8B / 3.1-8B, one rank of two (tensor parallel: --tp 2)
    ("bf16", 3072, 4096, 1): (1, 8, 1024, 4, 2, 1),  # wqkv
    ("bf16", 3072, 4096, 16): (16, 32, 128, 4, 4, 4),
    ("bf16", 4096, 2048, 1): (1, 8, 512, 4, 2, 1),  # wo
    ("bf16", 4096, 2048, 16): (16, 32, 128, 4, 3, 4),
    ("bf16", 7168, 4096, 1): (1, 8, 512, 4, 1, 1),  # w1, w3
    ("bf16", 7168, 4096, 16): (16, 16, 256, 4, 3, 1),
    ("bf16", 4096, 7168, 1): (1, 8, 1024, 8, 1, 1),  # w2
    ("bf16", 4096, 7168, 16): (16, 32, 128, 4, 3, 4),
    ("bf16", 64128, 4096, 1): (1, 16, 512, 8, 1, 1),  # output (vocabulary half)
    ("bf16", 64128, 4096, 16): (16, 128, 128, 4, 4, 1),
    ("bf16 gated", 7168, 4096, 1): (1, 16, 256, 8, 2, 1),
    ("bf16 gated", 7168, 4096, 16): (16, 32, 128, 4, 4, 1),
    ("int8", 3072, 4096, 1): (1, 8, 1024, 4, 2, 1),
    ("int8", 3072, 4096, 16): (16, 32, 128, 4, 4, 4),
    ("int8", 4096, 2048, 1): (1, 8, 512, 8, 2, 1),
    ("int8", 4096, 2048, 16): (16, 32, 128, 4, 4, 4),
    ("int8", 7168, 4096, 1): (1, 8, 256, 8, 1, 1),
    ("int8", 7168, 4096, 16): (16, 64, 128, 4, 3, 4),
    ("int8", 4096, 7168, 1): (1, 8, 1024, 4, 2, 1),
    ("int8", 4096, 7168, 16): (16, 32, 128, 4, 4, 4),
    ("int8", 64128, 4096, 1): (1, 32, 256, 4, 2, 1),
    ("int8", 64128, 4096, 16): (16, 128, 256, 4, 3, 1),
    ("int8 gated", 7168, 4096, 1): (1, 8, 512, 4, 1, 1),
    ("int8 gated", 7168, 4096, 16): (16, 32, 256, 4, 3, 1),
}
DECODE_ROWS = 16  # the most rows of a decode-sized call: one tensor-core dot's M
# (weight kind, rows) -> the config for a shape the sweep did not see (other models): of the configs
# the sweep timed on all of the one-GPU wqkv, wo, w1/w3 and w2 (three of them for 16 rows), the one
# furthest from the best by the smallest margin: within 2% (bf16, batch 1), 13% (bf16, 2-16 rows),
# 11% (int8, batch 1) and 6% (int8, 2-16 rows). The gated pair's batch-1 default is the best config
# of the one-GPU shape (bf16), and of the TP=2 shard, 4% off the best of the one-GPU shape (int8).
DEFAULT_CONFIGS = {
    ("bf16", 1): (1, 8, 1024, 8, 1, 1),
    ("bf16", DECODE_ROWS): (16, 32, 128, 4, 3, 4),
    ("int8", 1): (1, 8, 1024, 4, 1, 1),
    ("int8", DECODE_ROWS): (16, 32, 128, 4, 4, 4),
    ("bf16 gated", 1): (1, 8, 512, 4, 1, 1),
    ("bf16 gated", DECODE_ROWS): (16, 32, 128, 4, 3, 1),
    ("int8 gated", 1): (1, 8, 512, 4, 1, 1),
    ("int8 gated", DECODE_ROWS): (16, 32, 256, 4, 3, 1),
}
PREFILL_CONFIG = (64, 64, 64, 4, 3, 1)  # larger inputs (prefill of int8 weights)
SPLIT_SUM_BLOCK = 512  # outputs per program of the split sum (4 warps: 4 fp32 a thread and split)
INT8_ASM = True  # batch-1 CUDA-core path: int8 codes converted with the PTX below (else shifts and casts)

# One 32-bit word of four int8 codes -> four fp32 2**23 + 128 + code: the sign bits flipped (code +
# 128 as a byte), then each byte placed under the exponent of 2**23 by one PRMT. One integer op per
# code where a cast is a quarter-rate conversion; the kernel subtracts 2**23 + 128 (exact).
_INT8_WORD_TO_F32_ASM = tl.constexpr("""{
.reg .b32 t;
xor.b32 t, $4, 0x80808080;
prmt.b32 $0, t, 0x4B000000, 0x7440;
prmt.b32 $1, t, 0x4B000000, 0x7441;
prmt.b32 $2, t, 0x4B000000, 0x7442;
prmt.b32 $3, t, 0x4B000000, 0x7443;
}""")


@triton.jit
def _load_w(w_ptrs, ks, k0, K, col_ok, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr):
    """The weights' [BLOCK_N, BLOCK_K] tile at k0, masked only where the blocks do not divide the shape."""
    if EVEN_K:
        return tl.load(w_ptrs) if EVEN_N else tl.load(w_ptrs, mask=col_ok, other=0)
    return tl.load(w_ptrs, mask=col_ok & (ks[None, :] + k0 < K), other=0)


@triton.jit
def _load_tiles(x_ptrs, w_ptrs, ks, k0, K, row_ok, col_ok, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr):
    """The activations' [BLOCK_M, BLOCK_K] and the weights' [BLOCK_N, BLOCK_K] tiles at k0."""
    x_ok = row_ok if EVEN_K else row_ok & (ks[None, :] + k0 < K)
    return tl.load(x_ptrs, mask=x_ok, other=0.0), _load_w(w_ptrs, ks, k0, K, col_ok, EVEN_N, EVEN_K)


@triton.jit
def _bf16_pair(words):
    """32-bit words of two bf16 -> the two as fp32 tensors, the lower half first (a bf16 is the top
    half of its fp32: a shift or a mask, no conversion)."""
    return (words << 16).to(tl.float32, bitcast=True), (words & -65536).to(tl.float32, bitcast=True)


@triton.jit
def _int8_quad(words, CONVERT_ASM: tl.constexpr):
    """32-bit words of four int8 codes -> the four as fp32 tensors, the lowest byte first."""
    if CONVERT_ASM:
        c0, c1, c2, c3 = tl.inline_asm_elementwise(_INT8_WORD_TO_F32_ASM, "=r,=r,=r,=r,r", [words],
                                                   dtype=(tl.float32, tl.float32, tl.float32, tl.float32),
                                                   is_pure=True, pack=1)
        return c0 - 8388736.0, c1 - 8388736.0, c2 - 8388736.0, c3 - 8388736.0
    return (((words << 24) >> 24).to(tl.float32), ((words << 16) >> 24).to(tl.float32),
            ((words << 8) >> 24).to(tl.float32), (words >> 24).to(tl.float32))


@triton.jit
def _word_products(acc, x, w, CODES_PER_WORD: tl.constexpr, CONVERT_ASM: tl.constexpr):
    """acc [BLOCK_N, BLOCK_KW] += each weight word's products with its activations: w [BLOCK_N,
    BLOCK_KW] words of CODES_PER_WORD weights (4 int8 codes or 2 bf16), x [1, BLOCK_KW] the same
    columns' bf16 activations (64-bit words of four, or 32-bit words of two). One fp32 partial sum
    per word, not per weight: a quarter (int8) of the registers, so more programs fit an SM."""
    if CODES_PER_WORD == 4:
        x0, x1 = _bf16_pair(x.to(tl.int32))
        x2, x3 = _bf16_pair((x >> 32).to(tl.int32))
        w0, w1, w2, w3 = _int8_quad(w, CONVERT_ASM)
        acc += w0 * x0
        acc += w1 * x1
        acc += w2 * x2
        acc += w3 * x3
    else:
        x0, x1 = _bf16_pair(x)
        w0, w1 = _bf16_pair(w)
        acc += w0 * x0
        acc += w1 * x1
    return acc


@triton.jit
def linear_kernel(
    X, W, SCALE, BIAS, W_UP, SCALE_UP, Y, M, N, K, stride_xm, stride_wn, stride_ys, stride_ym, k_per_split,
    HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, GATED: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, CODES_PER_WORD: tl.constexpr,
    PREFETCH: tl.constexpr, CONVERT_ASM: tl.constexpr, FP32_DOT: tl.constexpr, PDL: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_N] block of y over the K range [pid_k * k_per_split, + k_per_split):
    written to Y[pid_k] (fp32 partial sums when K is split, the output itself when not).
    GATED (run unsplit): y = silu(x W^T) * (x W_UP^T), the MLP's gate and up, both [BLOCK_N, K]
    slabs streamed in the same loop.
    BLOCK_M = 1 reads X, W and W_UP as words (CODES_PER_WORD values each; K, strides, k_per_split
    and BLOCK_K count words) and loads each tile PREFETCH tiles ahead (0 or 1)."""
    pdl.wait_for_inputs(PDL)
    pid_n, pid_m, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = pid_k * k_per_split + tl.arange(0, BLOCK_K)
    x_ptrs = X + rows[:, None] * stride_xm + ks[None, :]  # [BLOCK_M, BLOCK_K]
    w_ptrs = W + cols[:, None] * stride_wn + ks[None, :]  # [BLOCK_N, BLOCK_K]
    u_ptrs = W_UP + cols[:, None] * stride_wn + ks[None, :]  # [BLOCK_N, BLOCK_K], used when GATED
    row_ok = rows[:, None] < M
    col_ok = cols[:, None] < N
    if BLOCK_M == 1:
        # One row on the CUDA cores: [BLOCK_N, BLOCK_K] fp32 partial sums, one per weight word,
        # reduced once after the loop; the tiles go from memory straight to registers. A tile
        # loaded one iteration ahead keeps two in flight per program: the last iteration loads
        # the last tile again (step 0) rather than masking its loads.
        acc_nk = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        up_nk = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        last = (k_per_split - 1) // BLOCK_K * BLOCK_K
        if PREFETCH:
            x, w = _load_tiles(x_ptrs, w_ptrs, ks, 0, K, row_ok, col_ok, EVEN_N, EVEN_K)
            if GATED:
                u = _load_w(u_ptrs, ks, 0, K, col_ok, EVEN_N, EVEN_K)
        for k0 in range(0, k_per_split, BLOCK_K):
            step = tl.minimum(k0 + BLOCK_K, last) - k0 if PREFETCH else BLOCK_K
            if PREFETCH:
                x_next, w_next = _load_tiles(x_ptrs + step, w_ptrs + step, ks, k0 + step, K, row_ok, col_ok,
                                             EVEN_N, EVEN_K)
                if GATED:
                    u_next = _load_w(u_ptrs + step, ks, k0 + step, K, col_ok, EVEN_N, EVEN_K)
            else:
                x, w = _load_tiles(x_ptrs, w_ptrs, ks, k0, K, row_ok, col_ok, EVEN_N, EVEN_K)
                if GATED:
                    u = _load_w(u_ptrs, ks, k0, K, col_ok, EVEN_N, EVEN_K)
            acc_nk = _word_products(acc_nk, x, w, CODES_PER_WORD, CONVERT_ASM)
            if GATED:
                up_nk = _word_products(up_nk, x, u, CODES_PER_WORD, CONVERT_ASM)
                u_ptrs += step
            x_ptrs += step
            w_ptrs += step
            if PREFETCH:
                x, w = x_next, w_next
                if GATED:
                    u = u_next
        acc = tl.sum(acc_nk, axis=1)[None, :]  # [1, BLOCK_N]
        up = tl.sum(up_nk, axis=1)[None, :]
    else:
        # Up to BLOCK_M rows on the tensor cores, padded to the 16 a dot needs (free next to the
        # tile's bytes); the tiles reach the dot through the software pipeline's shared memory.
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, k_per_split, BLOCK_K):
            x, w = _load_tiles(x_ptrs, w_ptrs, ks, k0, K, row_ok, col_ok, EVEN_N, EVEN_K)
            # int8 codes convert exactly to the activations' dtype; the scale waits for the output.
            acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc, input_precision="ieee" if FP32_DOT else None)
            if GATED:
                u = _load_w(u_ptrs, ks, k0, K, col_ok, EVEN_N, EVEN_K)
                up = tl.dot(x, tl.trans(u.to(x.dtype)), up, input_precision="ieee" if FP32_DOT else None)
                u_ptrs += BLOCK_K
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
    pdl.let_dependents_launch(PDL)
    if HAS_SCALE:
        acc *= tl.load(SCALE + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        if GATED:
            up *= tl.load(SCALE_UP + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    if GATED:
        acc = acc * tl.sigmoid(acc) * up
    if HAS_BIAS and pid_k == 0:  # once, in the first split's partial sums
        acc += tl.load(BIAS + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    y_ptrs = Y + pid_k * stride_ys + rows[:, None] * stride_ym + cols[None, :]
    tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=row_ok & (cols[None, :] < N))


@triton.jit
def split_sum_kernel(Y, OUT, n_elements, stride_s, S: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """OUT (flat) = the K splits' fp32 partial sums Y [S, ...] added in split order, rounded once to
    OUT's dtype. One short wave: it lets the next kernel launch at its start (pdl.py)."""
    pdl.let_dependents_launch(PDL)
    pdl.wait_for_inputs(PDL)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n_elements
    acc = tl.load(Y + offs, mask=ok, other=0.0)
    for i in tl.static_range(1, S):
        acc += tl.load(Y + i * stride_s + offs, mask=ok, other=0.0)
    tl.store(OUT + offs, acc.to(OUT.dtype.element_ty), mask=ok)


def weight_kind(weight: torch.Tensor) -> str:
    return "int8" if weight.dtype == torch.int8 else "bf16"


def codes_per_word(weight: torch.Tensor) -> int:
    """Weights per 32-bit word on the batch-1 CUDA-core path (int8 codes or bf16 weights)."""
    return 4 if weight.dtype == torch.int8 else 2


def config(weight: torch.Tensor, m: int, up: torch.Tensor | None = None,
           dtype: torch.dtype = torch.bfloat16) -> tuple[int, int, int, int, int, int]:
    """The launch config for m rows of `dtype` activations times this weight (with `up`: the gate
    and up pair's kernel, whose silu needs each row's whole K in one program: never split). The
    CUDA-core path (BLOCK_M 1) reads bf16 activations and int8 or bf16 weights as 32-bit words;
    other dtypes, a K of part words or a weight that does not start on a word take the
    tensor-core config."""
    if m > DECODE_ROWS:
        return PREFILL_CONFIG
    n, k = weight.shape
    gated = up is not None
    kind, rows = weight_kind(weight) + (" gated" if gated else ""), 1 if m == 1 else DECODE_ROWS
    cfg = CONFIGS.get((kind, n, k, rows), DEFAULT_CONFIGS[(kind, rows)])
    per_word = codes_per_word(weight)
    words_fit = (dtype == torch.bfloat16 and weight.dtype in (torch.bfloat16, torch.int8) and k % per_word == 0
                 and all(w.storage_offset() % per_word == 0 for w in (weight, up) if w is not None))
    if cfg[0] == 1 and not words_fit:
        cfg = DEFAULT_CONFIGS[(kind, DECODE_ROWS)]
    return cfg[:5] + (1,) if gated else cfg


def triton_linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor | None,
                  bias: torch.Tensor | None, up: torch.Tensor | None = None,
                  up_scales: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] (rows contiguous) times weight [N, K]^T with the shape's committed config; with
    `up` (the gated pair, no bias) silu(x weight^T) * (x up^T). Split K sums its fp32 partials in
    a fixed order."""
    m, k = x.shape
    n, dtype = weight.shape[0], x.dtype
    gated = up is not None
    block_m, block_n, block_k, warps, stages, split = config(weight, m, up, dtype)
    convert_asm = INT8_ASM and weight.dtype == torch.int8 and x.is_cuda
    per_word, prefetch = 1, 0
    if block_m == 1:
        # The CUDA-core path reads words: int8 codes 4 to a 32-bit word with the activations 4 to
        # a 64-bit word, bf16 weights and activations 2 to a 32-bit word (K, strides and blocks
        # then count words). Its `stages` are the tiles in flight per program: the loads run
        # stages - 1 tiles ahead.
        per_word, prefetch, stages = codes_per_word(weight), stages - 1, 1
        if x.storage_offset() % per_word or x.stride(0) % per_word:  # a row off a word: a copy on one
            x = torch.empty(m, k, device=x.device, dtype=dtype).copy_(x)
        x = x.view(torch.int64 if per_word == 4 else torch.int32)
        weight = weight.view(torch.int32)
        up = None if up is None else up.view(torch.int32)
    k, block_k = k // per_word, block_k // per_word
    k_per_split = triton.cdiv(triton.cdiv(k, split), block_k) * block_k
    split = triton.cdiv(k, k_per_split)
    y = torch.empty(split, m, n, device=x.device, dtype=dtype if split == 1 else torch.float32)  # [S, M, N]
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m), split)
    linear_kernel[grid](
        x, weight, x if scales is None else scales, x if bias is None else bias,
        weight if up is None else up, x if up_scales is None else up_scales, y, m, n, k,
        x.stride(0), weight.stride(0), y.stride(0), y.stride(1), k_per_split,
        HAS_SCALE=scales is not None, HAS_BIAS=bias is not None, GATED=gated, EVEN_N=n % block_n == 0,
        EVEN_K=k % k_per_split == 0, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, CODES_PER_WORD=per_word,
        PREFETCH=prefetch, CONVERT_ASM=convert_asm, FP32_DOT=dtype == torch.float32, num_warps=warps,
        num_stages=stages, **pdl.options(x),
    )
    if split == 1:
        return y[0]
    # The partial sums added by a kernel of our own rather than y.sum(0).to(dtype): those were
    # two eager launches per split product (a reduction and a cast) that could not launch early,
    # 128 launches per batch-8 step of the 8B model.
    out = torch.empty(m, n, device=x.device, dtype=dtype)
    split_sum_kernel[(triton.cdiv(m * n, SPLIT_SUM_BLOCK),)](
        y, out, m * n, y.stride(0), S=split, BLOCK=SPLIT_SUM_BLOCK, num_warps=4, **pdl.options(x))
    return out
