"""Quantize / dequantize KV-cache tensors: pure functions, granularity in the name, and the
format of a cache's quantized body.

Formats: int8 and fp8 (e4m3, the "fp8 KV cache" of vLLM / SGLang / TensorRT-LLM) keep one
symmetric scale per token and head; int4 / int2 are KIVI's asymmetric groups (keys per channel
over a group of tokens, values per token over a group of channels).

Scales and zero points are stored in the cache's dtype (bf16 on the GPU). The codes are computed
from the *stored* (rounded) parameters, and the parameters are nudged one ulp outward when
rounding would leave part of the range uncovered, so every int element's round-trip error stays
within half of its quantization step (fp8: within half a unit of the e4m3 code it rounds to).
fp8 codes are kept as their bit patterns in uint8 tensors (PyTorch's CPU kernels cannot yet
index_copy_ a float8 tensor); `fp8_codes_as_float` reads them.

Packing (bits 4 and 2) is planar along the last axis: with n = 8 // bits codes per byte, byte j
holds codes j, j + D/n, j + 2D/n, ... in increasing bit positions. A kernel unpacks it with a
shift and a mask per plane and never has to interleave.
"""
from typing import NamedTuple, Optional

import torch

INT8_MAX = 127
FP8_MAX = 448.0  # the largest finite float8_e4m3fn


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


def quantize_fp8_per_token(x: torch.Tensor, dtype: torch.dtype):
    """fp8 e4m3, one absmax scale per vector along the last axis, mapping the absmax to 448.

    x: [..., D] -> codes uint8 [..., D] (e4m3 bit patterns), scale [..., 1] in `dtype`. Each
    element is x / scale rounded to the nearest e4m3 value (ties to even): a relative error of at
    most 2**-4 for normal codes, an absolute one of at most 2**-10 * scale for subnormal ones.
    """
    x32 = x.float()
    absmax = x32.abs().amax(dim=-1, keepdim=True)
    scale = (absmax * (1.0 / FP8_MAX)).to(dtype)  # times the fp32 reciprocal, as int8's
    scale = torch.where(scale.float() * FP8_MAX < absmax, _next_up(scale), scale)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    codes = (x32 / scale.float()).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return codes.view(torch.uint8), scale


def fp8_codes_as_float(codes: torch.Tensor) -> torch.Tensor:
    """uint8 e4m3 bit patterns -> their fp32 values."""
    return codes.view(torch.float8_e4m3fn).float()


def dequantize_fp8_per_token(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype):
    return (fp8_codes_as_float(codes) * scale.float()).to(dtype)


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


# Tokens per block of value codes (every format; KIVI blocks its packed bytes). The decode
# kernels' P.V dot reduces over tokens, so it wants each channel's tokens side by side: from
# token-major rows its operand is gathered out of shared memory byte by byte (on an H200, 128
# one-byte loads per thread per 32-token int8 tile), and with a fully channel-major layout each
# channel of a tile is a 32-byte piece of its own DRAM page. A block of 32 tokens, channel-major
# inside, is one contiguous tile (4 KB for int8 at D = 128) and both.
VALUE_BLOCK = 32


def block_value_codes(codes: torch.Tensor) -> torch.Tensor:
    """codes [B, H, L, X] (L a multiple of VALUE_BLOCK; X channels, or KIVI's packed bytes) ->
    [B, H, L / VALUE_BLOCK, X, VALUE_BLOCK]."""
    b, h, n, d = codes.shape
    return codes.reshape(b, h, n // VALUE_BLOCK, VALUE_BLOCK, d).transpose(3, 4).contiguous()


def unblock_value_codes(blocked: torch.Tensor) -> torch.Tensor:
    """block_value_codes undone: [B, H, L / VALUE_BLOCK, D, VALUE_BLOCK] -> [B, H, L, D]."""
    b, h, n, d, t = blocked.shape
    return blocked.transpose(3, 4).reshape(b, h, n * t, d)


def token_rows(buf: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows `index` [n] of a QuantizedBody tensor: [B, H, n, X], from token-indexed rows
    [B, H, L, X] or from blocked value codes (5 dims, block_value_codes)."""
    if buf.dim() == 5:
        return buf[:, :, index // VALUE_BLOCK, :, index % VALUE_BLOCK].permute(1, 2, 0, 3)  # from [n, B, H, D]
    return buf[:, :, index]


def write_token_rows(buf: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> None:
    """token_rows' rows set to rows [B, H, n, X], in place."""
    if buf.dim() == 5:
        buf[:, :, index // VALUE_BLOCK, :, index % VALUE_BLOCK] = rows.permute(2, 0, 1, 3)  # [n, B, H, D]
    else:
        buf.index_copy_(2, index, rows)


class QuantizedBody(NamedTuple):
    """The quantized part of a cache, tokens [0, body_len) of capacity L.

    bits 8: k_codes [B, Hkv, L, D] int8 (or uint8 e4m3 bit patterns when fp8), v_codes the same
    codes in blocks of VALUE_BLOCK tokens, channel-major inside a block,
    [B, Hkv, L / VALUE_BLOCK, D, VALUE_BLOCK] (block_value_codes), k/v_scale [B, Hkv, L, 1], zeros
    None. Every code must be a valid one, also past body_len (fp8: no NaN pattern): the kernel
    reads a tile's value codes past the length and weights them by zero.
    bits 4/2 (KIVI): k_codes uint8 [B, Hkv, L, D*bits/8] (planar, pack_codes), v_codes the
    same packed bytes in blocks, [B, Hkv, L / VALUE_BLOCK, D*bits/8, VALUE_BLOCK], k_scale/k_zero
    [B, Hkv, L/key_group, D] (per channel over groups of key_group tokens), v_scale/v_zero
    [B, Hkv, L, D/value_group] (per token over groups of value_group channels). L is a multiple
    of VALUE_BLOCK for every format.
    """
    bits: int
    key_group: int  # KIVI: tokens per key group; 0 for int8/fp8 (no groups)
    value_group: int  # KIVI: channels per value group; 0 for int8/fp8
    k_codes: torch.Tensor
    k_scale: torch.Tensor
    k_zero: Optional[torch.Tensor]
    v_codes: torch.Tensor
    v_scale: torch.Tensor
    v_zero: Optional[torch.Tensor]
    fp8: bool = False

    @property
    def format(self) -> str:
        """int8, fp8, int4 or int2: what a user asks for and a kernel dispatches on."""
        return "fp8" if self.fp8 else f"int{self.bits}"

    def tensors(self) -> tuple:
        return self.k_codes, self.k_scale, self.k_zero, self.v_codes, self.v_scale, self.v_zero

    def with_tensors(self, tensors) -> "QuantizedBody":
        return QuantizedBody(self.bits, self.key_group, self.value_group, *tensors, fp8=self.fp8)


def quantize_blocks(k: torch.Tensor, v: torch.Tensor, bits: int, key_group: int, value_group: int, fp8: bool,
                    dtype: torch.dtype) -> tuple:
    """What leaves the window, quantized: k, v [B, H, n * G, D] (n blocks of G tokens; G = 1 for
    int8/fp8, the KIVI key group otherwise) -> the six QuantizedBody tensors' new rows, in its layout:
    token-indexed ones [B, H, n * G, X] (8-bit value codes as rows too: write_token_rows puts them
    into their blocks), KIVI key scale/zero [B, H, n, D], zeros None for 8-bit.
    The one eviction of the engine: the cache's PyTorch path and ring_append's reference call it."""
    if bits == 8:
        quantize = quantize_fp8_per_token if fp8 else quantize_symmetric_per_token
        (kc, ks), (vc, vs) = quantize(k, dtype), quantize(v, dtype)
        return kc, ks, None, vc, vs, None
    b, h, t, d = k.shape
    kc, ks, kz = quantize_asymmetric_per_channel(k.view(b, h, t // key_group, key_group, d), bits, dtype)
    vc, vs, vz = quantize_asymmetric_per_token_group(v, bits, value_group, dtype)
    return (pack_codes(kc.view(b, h, t, d), bits), ks.squeeze(-2), kz.squeeze(-2), pack_codes(vc, bits), vs, vz)


def dequantize_body(body: QuantizedBody, dtype=torch.float32):
    """QuantizedBody -> (k, v), each [B, Hkv, L, D] in `dtype`."""
    if body.bits == 8:
        dequantize = dequantize_fp8_per_token if body.fp8 else dequantize_symmetric_per_token
        return (dequantize(body.k_codes, body.k_scale, dtype),
                dequantize(unblock_value_codes(body.v_codes), body.v_scale, dtype))
    kg, vg = body.key_group, body.value_group
    k = dequantize_asymmetric(unpack_codes(body.k_codes, body.bits), expand_per_channel(body.k_scale, kg),
                              expand_per_channel(body.k_zero, kg), dtype)
    v_codes = unpack_codes(unblock_value_codes(body.v_codes), body.bits)
    v = dequantize_asymmetric(v_codes, expand_per_token_group(body.v_scale, vg), expand_per_token_group(body.v_zero, vg),
                              dtype)
    return k, v
