"""The model's linear layers: y = x @ W^T (* scales) (+ bias), W in the model's dtype or int8
codes with one scale per output channel (weight_quant.py).

CUDA tensors go through one custom op to the Triton kernel (linear_kernels.py), except
prefill-sized inputs of model-dtype weights, which cuBLAS serves best; CPU tensors go straight to
`linear_reference`, the PyTorch definition the kernel is tested against (no custom op in between:
its dispatch cost about 50 µs a call on the CPU, and inductor fuses the plain ops). Triton is
imported only when the kernel runs, so this module imports where triton is not installed.
"""

import torch
import torch.nn.functional as F

DECODE_ROWS = 16  # linear_kernels.DECODE_ROWS: the most rows the kernel's decode configs take


def linear_reference(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor | None,
                     bias: torch.Tensor | None) -> torch.Tensor:
    """The layer in PyTorch: the codes (or weights) in x's dtype, the scale applied per output."""
    y = F.linear(x, weight.to(x.dtype))
    if scales is not None:
        y = y * scales.to(x.dtype)
    return y if bias is None else y + bias


# One custom op, so torch.compile(fullgraph=True) keeps the kernel call whole.
@torch.library.custom_op("weights::linear", mutates_args=())
def _linear_op(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor | None,
               bias: torch.Tensor | None) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1])  # [M, K]
    if rows.shape[0] > DECODE_ROWS and weight.dtype != torch.int8:
        return linear_reference(x, weight, scales, bias)
    from linear_kernels import triton_linear

    return triton_linear(rows.contiguous(), weight, scales, bias).reshape(*x.shape[:-1], weight.shape[0])


@_linear_op.register_fake
def _(x, weight, scales, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor | None = None,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] -> [..., N]: x @ weight^T, times scales [N] if given, plus bias [N] if given.
    weight [N, K] in x's dtype or int8 codes, contiguous along K."""
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"linear: x {tuple(x.shape)} does not match weight {tuple(weight.shape)}")
    if weight.stride(1) != 1:
        raise ValueError("linear: weight must be contiguous along its input dimension")
    if not x.is_cuda:
        return linear_reference(x, weight, scales, bias)
    return _linear_op(x, weight, scales, bias)
