"""The model's linear layers: y = x @ W^T (* scales) (+ bias), W in the model's dtype or int8
codes with one scale per output channel (weight_quant.py); and the MLP's gate and up pair,
silu(x W1^T) * (x W3^T), as one product over both weights.

CUDA tensors go through one custom op to the Triton kernel (linear_kernels.py), except
prefill-sized inputs of model-dtype weights, which cuBLAS serves best; CPU tensors go straight to
the PyTorch definitions below, which the kernel is tested against (no custom op in between: its
dispatch cost about 50 µs a call on the CPU, and inductor fuses the plain ops). Triton is
imported only when the kernel runs, so this module imports where triton is not installed.
"""
from typing import Optional

import torch
import torch.nn.functional as F

DECODE_ROWS = 16  # linear_kernels.DECODE_ROWS: the most rows the kernel's decode configs take


def linear_reference(x: torch.Tensor, weight: torch.Tensor, scales: Optional[torch.Tensor] = None,
                     bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The layer in PyTorch: the codes (or weights) in x's dtype, the scale applied per output."""
    y = F.linear(x, weight.to(x.dtype))
    if scales is not None:
        y = y * scales.to(x.dtype)
    return y if bias is None else y + bias


def gated_reference(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, gate_scales: Optional[torch.Tensor] = None,
                    up_scales: Optional[torch.Tensor] = None) -> torch.Tensor:
    """silu(x gate^T) * (x up^T) in PyTorch: the unfused layers' arithmetic."""
    return F.silu(linear_reference(x, gate, gate_scales)) * linear_reference(x, up, up_scales)


# One custom op, so torch.compile(fullgraph=True) keeps the kernel call whole. `up` given: the
# gated pair (no bias).
@torch.library.custom_op("weights::linear", mutates_args=())
def _linear_op(x: torch.Tensor, weight: torch.Tensor, scales: Optional[torch.Tensor], bias: Optional[torch.Tensor],
               up: Optional[torch.Tensor], up_scales: Optional[torch.Tensor]) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1])  # [M, K]
    if rows.shape[0] > DECODE_ROWS and weight.dtype != torch.int8:
        if up is not None:
            return gated_reference(x, weight, up, scales, up_scales)
        return linear_reference(x, weight, scales, bias)
    from linear_kernels import triton_linear

    y = triton_linear(rows.contiguous(), weight, scales, bias, up, up_scales)
    return y.reshape(*x.shape[:-1], weight.shape[0])


@_linear_op.register_fake
def _(x, weight, scales, bias, up, up_scales):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _check(x: torch.Tensor, weight: torch.Tensor) -> None:
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"linear: x {tuple(x.shape)} does not match weight {tuple(weight.shape)}")
    if weight.stride(1) != 1:
        raise ValueError("linear: weight must be contiguous along its input dimension")


def linear(x: torch.Tensor, weight: torch.Tensor, scales: Optional[torch.Tensor] = None,
           bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x [..., K] -> [..., N]: x @ weight^T, times scales [N] if given, plus bias [N] if given.
    weight [N, K] in x's dtype or int8 codes, contiguous along K."""
    _check(x, weight)
    if not x.is_cuda:
        return linear_reference(x, weight, scales, bias)
    return _linear_op(x, weight, scales, bias, None, None)


def gated_linear(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, gate_scales: Optional[torch.Tensor] = None,
                 up_scales: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x [..., K] -> [..., N]: silu(x gate^T) * (x up^T), Llama's MLP before w2. gate and up [N, K]
    alike (dtype, layout, scales or none). On a GPU one kernel streams both weights, where the
    unfused layers run three (two products, then silu * mul)."""
    _check(x, gate)
    if up.shape != gate.shape or up.dtype != gate.dtype or up.stride() != gate.stride() or \
            (gate_scales is None) != (up_scales is None):
        raise ValueError(f"gated_linear: gate {tuple(gate.shape)} {gate.dtype} and up {tuple(up.shape)} {up.dtype} differ")
    if not x.is_cuda:
        return gated_reference(x, gate, up, gate_scales, up_scales)
    return _linear_op(x, gate, gate_scales, None, up, up_scales)
