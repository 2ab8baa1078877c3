"""RMSNorm with the residual add before it fused in: (stream, normed) = (x + delta,
rmsnorm(x + delta) * weight), or (x, rmsnorm(x) * weight) without delta.

The model adds each block's attention and MLP output to the residual stream inside the next
norm's call, so on a GPU the add and the norm are one kernel (norm_kernels.py, through one custom
op); CPU tensors go straight to the PyTorch definition below, which the kernel is tested against.
Triton is imported only when the kernel runs, so this module imports where triton is not
installed.
"""
from typing import Optional

import torch


def add_rms_norm_reference(x: torch.Tensor, delta: Optional[torch.Tensor], weight: torch.Tensor,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The PyTorch definition: the sum rounded to x's dtype, the norm in fp32 rounded back to
    x's dtype before the weight multiplies it (Llama's reference order)."""
    stream = x if delta is None else x + delta
    s32 = stream.float()
    normed = s32 * torch.rsqrt(s32.pow(2).mean(-1, keepdim=True) + eps)
    return stream, normed.type_as(stream) * weight


# One custom op, so torch.compile(fullgraph=True) keeps the kernel call whole. Without delta the
# stream is x itself, which an op may not return: it returns an empty tensor in its place.
@torch.library.custom_op("norms::add_rms_norm", mutates_args=())
def _add_rms_norm_op(x: torch.Tensor, delta: Optional[torch.Tensor], weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    from norm_kernels import triton_add_rms_norm

    rows = x.reshape(-1, x.shape[-1]).contiguous()  # [M, N]
    deltas = None if delta is None else delta.reshape(rows.shape).contiguous()
    stream, out = triton_add_rms_norm(rows, deltas, weight, eps, torch.promote_types(x.dtype, weight.dtype))
    return (stream if delta is None else stream.view(x.shape)), out.view(x.shape)


@_add_rms_norm_op.register_fake
def _(x, delta, weight, eps):
    stream = x.new_empty(0) if delta is None else torch.empty_like(x)
    return stream, x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype))


def add_rms_norm(x: torch.Tensor, delta: Optional[torch.Tensor], weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x, delta [..., N] alike (delta may be None), weight [N] -> (x + delta, rmsnorm(x + delta) * weight)."""
    if x.shape[-1] != weight.shape[0] or (delta is not None and (delta.shape != x.shape or delta.dtype != x.dtype)):
        raise ValueError(f"add_rms_norm: x {tuple(x.shape)} {x.dtype}, delta "
                         f"{None if delta is None else (tuple(delta.shape), delta.dtype)} and weight {tuple(weight.shape)} do not match")
    if not x.is_cuda:
        return add_rms_norm_reference(x, delta, weight, eps)
    stream, normed = _add_rms_norm_op(x, delta, weight, eps)
    return (x if delta is None else stream), normed
