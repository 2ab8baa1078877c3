"""The linear layers' Triton kernel: y = x @ W^T (* one scale per output channel) (+ bias), with W
in the model's dtype or int8 codes converted in registers (no dequantized copy of the weights ever
exists in memory). Called through linear_op.linear, which holds the PyTorch reference.

A decode step multiplies a few rows (the batch) by every weight matrix once: it is a stream of
the weights, and its floor is their bytes over the copy bandwidth. The kernel is one program per
BLOCK_N output channels (and per K split) streaming its [BLOCK_N, K] slab of W in
[BLOCK_N, BLOCK_K] tiles: with BLOCK_M = 1 (batch 1) the products run on the CUDA cores, with
BLOCK_M = 16 on the tensor cores, the rows padded to the 16 a dot needs. The configs come from a
committed sweep (scripts/bench_linear.py; docs/linear.md has its table), looked up by the
matrix's shape and row count, so every compile runs the same kernels: nothing is tuned while a
model compiles.
"""

import torch
import triton
import triton.language as tl

import pdl

# (weight kind, N, K, rows) -> (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, split_k) for
# decode-sized inputs: rows 1 (batch 1) or DECODE_ROWS (2 to 16 rows). Chosen on an H200 by
# scripts/bench_linear.py (docs/linear.md).
CONFIGS: dict[tuple[str, int, int, int], tuple[int, int, int, int, int, int]] = {
    # Llama-3-8B / 3.1-8B, one GPU
    ("bf16", 6144, 4096, 1): (1, 8, 512, 4, 3, 1),  # wqkv
    ("bf16", 6144, 4096, 16): (16, 64, 128, 4, 3, 4),  # re-timed after the split sums moved into a kernel (docs/linear.md)
    ("bf16", 4096, 4096, 1): (1, 8, 512, 4, 1, 1),  # wo
    ("bf16", 4096, 4096, 16): (16, 32, 128, 4, 3, 4),
    ("bf16", 14336, 4096, 1): (1, 16, 256, 4, 3, 1),  # w1, w3
    ("bf16", 14336, 4096, 16): (16, 32, 128, 4, 3, 1),
    ("bf16", 4096, 14336, 1): (1, 8, 512, 4, 3, 1),  # w2
    ("bf16", 4096, 14336, 16): (16, 32, 128, 4, 3, 4),
    ("bf16", 128256, 4096, 1): (16, 64, 128, 4, 4, 1),  # output
    ("bf16", 128256, 4096, 16): (16, 64, 128, 4, 4, 1),
    ("int8", 6144, 4096, 1): (1, 8, 512, 4, 3, 1),
    ("int8", 6144, 4096, 16): (16, 64, 128, 4, 4, 4),
    ("int8", 4096, 4096, 1): (1, 8, 1024, 4, 3, 1),
    ("int8", 4096, 4096, 16): (16, 32, 128, 4, 4, 4),
    ("int8", 14336, 4096, 1): (1, 16, 256, 4, 1, 1),
    ("int8", 14336, 4096, 16): (16, 32, 256, 4, 3, 1),
    ("int8", 4096, 14336, 1): (1, 8, 1024, 4, 1, 1),
    ("int8", 4096, 14336, 16): (16, 32, 256, 4, 3, 4),
    ("int8", 128256, 4096, 1): (16, 128, 256, 4, 3, 1),
    ("int8", 128256, 4096, 16): (16, 128, 256, 4, 3, 1),
    # The MLP's gate and up (w1, w3) in one kernel: silu(x w1^T) * (x w3^T)
    ("bf16 gated", 14336, 4096, 1): (16, 32, 128, 4, 3, 1),
    ("bf16 gated", 14336, 4096, 16): (16, 32, 128, 4, 3, 1),
    ("int8 gated", 14336, 4096, 1): (16, 32, 128, 4, 4, 1),
    ("int8 gated", 14336, 4096, 16): (16, 32, 256, 4, 3, 1),
    # Llama-3-8B / 3.1-8B, one rank of two (tensor parallel: --tp 2)
    ("bf16", 3072, 4096, 1): (1, 8, 1024, 8, 1, 1),  # wqkv
    ("bf16", 3072, 4096, 16): (16, 32, 128, 4, 4, 4),
    ("bf16", 4096, 2048, 1): (1, 8, 512, 4, 3, 1),  # wo
    ("bf16", 4096, 2048, 16): (16, 32, 128, 4, 3, 4),
    ("bf16", 7168, 4096, 1): (1, 16, 1024, 8, 1, 1),  # w1, w3
    ("bf16", 7168, 4096, 16): (16, 16, 256, 4, 3, 1),
    ("bf16", 4096, 7168, 1): (1, 8, 512, 4, 1, 1),  # w2
    ("bf16", 4096, 7168, 16): (16, 32, 128, 4, 3, 4),
    ("bf16", 64128, 4096, 1): (1, 16, 1024, 8, 1, 1),  # output (vocabulary half)
    ("bf16", 64128, 4096, 16): (16, 128, 128, 4, 4, 1),
    ("bf16 gated", 7168, 4096, 1): (16, 32, 128, 4, 4, 1),
    ("bf16 gated", 7168, 4096, 16): (16, 32, 128, 4, 4, 1),
    ("int8", 3072, 4096, 1): (1, 8, 1024, 4, 3, 1),
    ("int8", 3072, 4096, 16): (16, 32, 128, 4, 4, 4),
    ("int8", 4096, 2048, 1): (1, 8, 512, 4, 1, 1),
    ("int8", 4096, 2048, 16): (16, 32, 128, 4, 4, 4),
    ("int8", 7168, 4096, 1): (1, 8, 512, 4, 1, 1),
    ("int8", 7168, 4096, 16): (16, 64, 128, 4, 3, 4),
    ("int8", 4096, 7168, 1): (1, 8, 1024, 4, 1, 1),
    ("int8", 4096, 7168, 16): (16, 32, 128, 4, 4, 4),
    ("int8", 64128, 4096, 1): (16, 128, 256, 4, 3, 1),
    ("int8", 64128, 4096, 16): (16, 128, 256, 4, 3, 1),
    ("int8 gated", 7168, 4096, 1): (16, 32, 512, 4, 3, 1),
    ("int8 gated", 7168, 4096, 16): (16, 32, 256, 4, 3, 1),
}
DECODE_ROWS = 16  # the most rows of a decode-sized call: one tensor-core dot's M
# (weight kind, rows) -> the config for a shape the sweep did not see (tensor-parallel shards,
# other models): of the configs the sweep timed on all of wqkv, wo, w1/w3 and w2 (three of them for
# 16 rows), the one furthest from the best by the smallest margin: within 6% (bf16, batch 1), 13%
# (bf16, 2-16 rows), 16% (int8, batch 1, PTX conversion) and 6% (int8, 2-16 rows).
DEFAULT_CONFIGS = {
    ("bf16", 1): (1, 8, 512, 4, 1, 1),
    ("bf16", DECODE_ROWS): (16, 32, 128, 4, 3, 4),
    ("int8", 1): (1, 8, 1024, 4, 1, 1),
    ("int8", DECODE_ROWS): (16, 32, 128, 4, 4, 4),
    ("bf16 gated", 1): (16, 32, 128, 4, 3, 1),
    ("bf16 gated", DECODE_ROWS): (16, 32, 128, 4, 3, 1),
    ("int8 gated", 1): (16, 32, 128, 4, 4, 1),
    ("int8 gated", DECODE_ROWS): (16, 32, 256, 4, 3, 1),
}
PREFILL_CONFIG = (64, 64, 64, 4, 3, 1)  # larger inputs (prefill of int8 weights)
SPLIT_SUM_BLOCK = 512  # outputs per program of the split sum (4 warps: 4 fp32 a thread and split)
INT8_ASM = True  # batch-1 CUDA-core path: int8 codes converted with the PTX below (else plain casts)

# Four int8 codes (one register) -> four fp32 2**23 + 128 + code: the sign bit flipped (code + 128
# as a byte), then each byte placed under the exponent of 2**23 by one PRMT. One integer op per
# code where a cast is a quarter-rate conversion; the kernel subtracts 2**23 + 128 (exact).
_INT8_TO_F32_ASM = tl.constexpr("""{
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
def _to_f32(w, CONVERT_ASM: tl.constexpr):
    if CONVERT_ASM:
        return tl.inline_asm_elementwise(_INT8_TO_F32_ASM, "=r,=r,=r,=r,r", [w], dtype=tl.float32,
                                         is_pure=True, pack=4) - 8388736.0
    return w.to(tl.float32)


@triton.jit
def linear_kernel(
    X, W, SCALE, BIAS, W_UP, SCALE_UP, Y, M, N, K, stride_xm, stride_wn, stride_ys, stride_ym, k_per_split,
    HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, GATED: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, CONVERT_ASM: tl.constexpr, PDL: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_N] block of y over the K range [pid_k * k_per_split, + k_per_split):
    written to Y[pid_k] (fp32 partial sums when K is split, the output itself when not).
    GATED (run unsplit): y = silu(x W^T) * (x W_UP^T), the MLP's gate and up, both [BLOCK_N, K]
    slabs streamed in the same loop."""
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
        # One row: products on the CUDA cores into a [BLOCK_N, BLOCK_K] tile of partial sums,
        # reduced once after the loop; the weights go from memory straight to registers.
        acc_nk = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        up_nk = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, k_per_split, BLOCK_K):
            x, w = _load_tiles(x_ptrs, w_ptrs, ks, k0, K, row_ok, col_ok, EVEN_N, EVEN_K)
            xf = x.to(tl.float32)
            acc_nk += _to_f32(w, CONVERT_ASM) * xf  # [BLOCK_N, BLOCK_K] * [1, BLOCK_K]
            if GATED:
                u = _load_w(u_ptrs, ks, k0, K, col_ok, EVEN_N, EVEN_K)
                up_nk += _to_f32(u, CONVERT_ASM) * xf
                u_ptrs += BLOCK_K
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
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
            acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc)
            if GATED:
                u = _load_w(u_ptrs, ks, k0, K, col_ok, EVEN_N, EVEN_K)
                up = tl.dot(x, tl.trans(u.to(x.dtype)), up)
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


def config(weight: torch.Tensor, m: int, gated: bool = False) -> tuple[int, int, int, int, int, int]:
    """The launch config for m rows times this weight (gated: the gate and up pair's kernel, whose
    silu needs each row's whole K in one program: never split)."""
    if m > DECODE_ROWS:
        return PREFILL_CONFIG
    n, k = weight.shape
    kind, rows = weight_kind(weight) + (" gated" if gated else ""), 1 if m == 1 else DECODE_ROWS
    cfg = CONFIGS.get((kind, n, k, rows), DEFAULT_CONFIGS[(kind, rows)])
    return cfg[:5] + (1,) if gated else cfg


def triton_linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor | None,
                  bias: torch.Tensor | None, up: torch.Tensor | None = None,
                  up_scales: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] (rows contiguous) times weight [N, K]^T with the shape's committed config; with
    `up` (the gated pair, no bias) silu(x weight^T) * (x up^T). Split K sums its fp32 partials in
    a fixed order."""
    m, k = x.shape
    n = weight.shape[0]
    gated = up is not None
    block_m, block_n, block_k, warps, stages, split = config(weight, m, gated)
    k_per_split = triton.cdiv(triton.cdiv(k, split), block_k) * block_k
    split = triton.cdiv(k, k_per_split)
    y = torch.empty(split, m, n, device=x.device, dtype=x.dtype if split == 1 else torch.float32)  # [S, M, N]
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m), split)
    linear_kernel[grid](
        x, weight, x if scales is None else scales, x if bias is None else bias,
        weight if up is None else up, x if up_scales is None else up_scales, y, m, n, k,
        x.stride(0), weight.stride(0), y.stride(0), y.stride(1), k_per_split,
        HAS_SCALE=scales is not None, HAS_BIAS=bias is not None, GATED=gated, EVEN_N=n % block_n == 0,
        EVEN_K=k % k_per_split == 0, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        CONVERT_ASM=INT8_ASM and weight.dtype == torch.int8 and x.is_cuda, num_warps=warps, num_stages=stages,
        **pdl.options(x),
    )
    if split == 1:
        return y[0]
    # The partial sums added by a kernel of our own rather than y.sum(0).to(dtype): those were
    # two eager launches per split product (a reduction and a cast) that could not launch early,
    # 128 launches per batch-8 step of the 8B model.
    out = torch.empty(m, n, device=x.device, dtype=x.dtype)
    split_sum_kernel[(triton.cdiv(m * n, SPLIT_SUM_BLOCK),)](
        y, out, m * n, y.stride(0), S=split, BLOCK=SPLIT_SUM_BLOCK, num_warps=4, **pdl.options(x))
    return out
