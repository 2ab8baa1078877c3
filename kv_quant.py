"""Quantize / dequantize KV-cache tensors: pure functions, granularity in the name.

Scales and zero points are stored in the cache's dtype (bf16 on the GPU). The codes are computed
from the *stored* (rounded) parameters, and the parameters are nudged one ulp outward when
rounding would leave part of the range uncovered, so every element's round-trip error stays
within half of its quantization step.

Packing (bits 4 and 2) is planar along the last axis: with n = 8 // bits codes per byte, byte j
holds codes j, j + D/n, j + 2D/n, ... in increasing bit positions. A kernel unpacks it with a
shift and a mask per plane and never has to interleave.
"""
import torch

INT8_MAX = 127


def _next_up(x: torch.Tensor) -> torch.Tensor:
    return torch.nextafter(x, torch.full_like(x, float("inf")))


def _next_down(x: torch.Tensor) -> torch.Tensor:
    return torch.nextafter(x, torch.full_like(x, float("-inf")))


def quantize_symmetric_per_token(x: torch.Tensor, dtype: torch.dtype):
    """int8, one absmax scale per vector along the last axis (per token, per head).

    x: [..., D] -> codes int8 [..., D], scale [..., 1] in `dtype`.
    """
    x32 = x.float()
    absmax = x32.abs().amax(dim=-1, keepdim=True)
    # A multiply by the fp32 reciprocal, not a division: PyTorch's CUDA kernels divide by a scalar
    # that way, so this rounds alike on every device (and in ring_append's kernel).
    scale = (absmax * (1.0 / INT8_MAX)).to(dtype)
    scale = torch.where(scale.float() * INT8_MAX < absmax, _next_up(scale), scale)
    # An all-zero vector gets scale 1 and codes 0 instead of 0/0.
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    codes = torch.round(x32 / scale.float()).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return codes, scale


def dequantize_symmetric_per_token(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype):
    return (codes.float() * scale.float()).to(dtype)


def _asymmetric(x32: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int, dtype: torch.dtype):
    """Shared body of the two KIVI granularities: lo/hi broadcast against x32."""
    qmax = (1 << bits) - 1
    zero = lo.to(dtype)
    zero = torch.where(zero.float() > lo, _next_down(zero), zero)
    # Times the fp32 reciprocal, as the int8 scale: the same rounding on every device.
    scale = ((hi - zero.float()) * (1.0 / qmax)).to(dtype)
    scale = torch.where(zero.float() + scale.float() * qmax < hi, _next_up(scale), scale)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    codes = torch.round((x32 - zero.float()) / scale.float()).clamp_(0, qmax).to(torch.uint8)
    return codes, scale, zero


def quantize_asymmetric_per_channel(x: torch.Tensor, bits: int, dtype: torch.dtype):
    """KIVI keys: one (scale, zero) per channel over a group of tokens.

    x: [..., G, D] (G tokens of one group) -> codes uint8 [..., G, D], scale/zero [..., 1, D].
    """
    x32 = x.float()
    return _asymmetric(x32, x32.amin(dim=-2, keepdim=True), x32.amax(dim=-2, keepdim=True), bits, dtype)


def quantize_asymmetric_per_token_group(x: torch.Tensor, bits: int, group_size: int, dtype: torch.dtype):
    """KIVI values: one (scale, zero) per token over groups of `group_size` channels.

    x: [..., D] -> codes uint8 [..., D], scale/zero [..., D // group_size].
    """
    *lead, d = x.shape
    x32 = x.float().reshape(*lead, d // group_size, group_size)  # [..., D/g, g]
    codes, scale, zero = _asymmetric(
        x32, x32.amin(dim=-1, keepdim=True), x32.amax(dim=-1, keepdim=True), bits, dtype
    )
    return codes.reshape(*lead, d), scale.squeeze(-1), zero.squeeze(-1)


def dequantize_asymmetric(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype):
    """codes, scale and zero already broadcast to one another (see the two helpers below)."""
    return (zero.float() + codes.float() * scale.float()).to(dtype)


def expand_per_token_group(p: torch.Tensor, group_size: int) -> torch.Tensor:
    """[..., D/g] -> [..., D]: a per-channel-group parameter spread over its channels."""
    return p.repeat_interleave(group_size, dim=-1)


def expand_per_channel(p: torch.Tensor, group_size: int) -> torch.Tensor:
    """[..., T/G, D] -> [..., T, D]: a per-token-group parameter spread over its tokens."""
    return p.repeat_interleave(group_size, dim=-2)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes < 2**bits, [..., D] -> packed uint8 [..., D * bits / 8] (planar)."""
    n = 8 // bits
    d = codes.shape[-1]
    planes = codes.reshape(*codes.shape[:-1], n, d // n).to(torch.int32)  # [..., n, D/n]
    shifts = torch.arange(n, device=codes.device, dtype=torch.int32) * bits
    return (planes << shifts[:, None]).sum(dim=-2).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """packed uint8 [..., D * bits / 8] -> uint8 codes [..., D]."""
    n = 8 // bits
    shifts = torch.arange(n, device=packed.device, dtype=torch.int32) * bits
    planes = (packed.to(torch.int32)[..., None, :] >> shifts[:, None]) & ((1 << bits) - 1)  # [..., n, D/n]
    return planes.reshape(*packed.shape[:-1], -1).to(torch.uint8)
