"""RMSNorm with the residual add before it, as one Triton kernel: stream = x + delta, then
out = rmsnorm(stream) * weight. Called through norm_op.add_rms_norm, which holds the PyTorch
reference; the kernel rounds where the reference does (the sum and the normalized row to the
activations' dtype), so the two differ only by the order of the sum of squares.

Why a kernel of our own, where inductor fuses the same arithmetic: each of a decode step's norms
sits between two weight products, and at batch 1 it is one program reading 16 KB, so its cost is
latency: its launch after the product before, the product's launch after it. Launched with
programmatic dependent launch (pdl.py), it waits for the product before only where it first reads
its output, and lets the next product launch as soon as it starts, so that product's programs are
on the SMs, waiting, when the norm ends. Inductor's kernels do neither.
"""
import torch
import triton
import triton.language as tl

import pdl


@triton.jit
def add_rms_norm_kernel(X, DELTA, W, STREAM, OUT, N, stride_x, stride_d, stride_s, stride_o, eps,
                        HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """One row: STREAM = X + DELTA (when HAS_DELTA; the norm then reads the sum), OUT = the norm."""
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    ok = cols < N
    w = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)  # nobody's output: read before the wait
    # The next kernel (a weight product) may launch now. A norm is one program per row: its
    # programs are all on the SMs already, so the product's cannot crowd them out.
    pdl.let_dependents_launch(PDL)
    pdl.wait_for_inputs(PDL)
    x = tl.load(X + row * stride_x + cols, mask=ok, other=0.0)
    if HAS_DELTA:
        x = (x.to(tl.float32) + tl.load(DELTA + row * stride_d + cols, mask=ok, other=0.0).to(tl.float32)).to(x.dtype)
        tl.store(STREAM + row * stride_s + cols, x, mask=ok)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / N + eps)
    normed = (xf * rstd).to(x.dtype).to(tl.float32)
    tl.store(OUT + row * stride_o + cols, (normed * w).to(OUT.dtype.element_ty), mask=ok)


def triton_add_rms_norm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float,
                        out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """x, delta [M, N] (rows contiguous) -> (x + delta [M, N], or an empty tensor without delta;
    the norm [M, N] in out_dtype)."""
    m, n = x.shape
    stream = torch.empty_like(x) if delta is not None else x.new_empty(0)
    out = torch.empty(m, n, device=x.device, dtype=out_dtype)
    block = triton.next_power_of_2(n)
    add_rms_norm_kernel[(m,)](
        x, x if delta is None else delta, weight, x if delta is None else stream, out, n, x.stride(0),
        0 if delta is None else delta.stride(0), 0 if delta is None else stream.stride(0), out.stride(0), eps,
        HAS_DELTA=delta is not None, BLOCK=block, num_warps=max(1, min(16, block // 512)), **pdl.options(x),
    )
    return stream, out
