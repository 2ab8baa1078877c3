"""Attention of one new token per sequence over a KV cache: exact slots plus an optional
quantized body, under one softmax.

`decode_attention` is what the caches call. CUDA tensors go to the Triton flash-decoding kernels
(decode_kernels.py: exact, int8 and fp8 slots; decode_kernels_kivi.py: KIVI int4/int2), CPU
tensors to `decode_attention_reference`, the dequantize-then-attend PyTorch definition the
kernels are tested against. Triton is imported only when a kernel runs, so the module imports
(and the reference runs) where triton is not installed.
"""
from typing import Optional

import torch

import kv_quant
from kv_quant import QuantizedBody, dequantize_body


def attention_reference(segments: list[tuple], sm_scale: Optional[float] = None) -> torch.Tensor:
    """The engine's one PyTorch attention: one softmax, in fp32, over key segments that each see
    their own query (the same q, or StreamingLLM's sink query, rotated differently).

    segments: (q [B, Hq, T, D], k [B, Hkv, N_i, D], v [B, Hkv, N_i, D], valid [T, N_i] bool) each;
    GQA by grouping the query heads of a KV head. A query row that sees nothing gets zeros. No
    host syncs, so it also runs inside a CUDA graph (the CPU and prefill paths of the caches, and
    the decode kernels' reference).
    """
    q0 = segments[0][0]
    bsz, n_head, t, d = q0.shape
    n_kv = segments[0][1].shape[1]
    scale = d**-0.5 if sm_scale is None else sm_scale
    scores, values, valids = [], [], []
    for q, k, v, valid in segments:
        qg = q.float().reshape(bsz, n_kv, n_head // n_kv, t, d)  # [B, Hkv, rep, T, D]
        scores.append(torch.einsum("bgrtd,bgnd->bgrtn", qg, k.float()) * scale)
        values.append(v.float().masked_fill(~valid.any(0)[:, None], 0.0))  # an unseen slot may hold NaN
        valids.append(valid)
    valid = torch.cat(valids, dim=-1)  # [T, N]
    s = torch.cat(scores, dim=-1).masked_fill(~valid, float("-inf"))
    # A row with nothing valid would softmax to NaN: give it zeros instead.
    p = torch.softmax(s.masked_fill(~valid.any(-1, keepdim=True), 0.0), dim=-1) * valid
    y = torch.einsum("bgrtn,bgnd->bgrtd", p, torch.cat(values, dim=2))
    return y.reshape(bsz, n_head, t, d).to(q0.dtype)


def decode_attention_reference(q, k, v, exact_len, exact_mask=None, body=None, body_len=None, sm_scale=None):
    """decode_attention in PyTorch: the body dequantized with kv_quant, then attention_reference
    over [body; exact slots]."""
    n = k.shape[2]
    valid = torch.ones(n, dtype=torch.bool, device=k.device)  # [N]
    if exact_len is not None:
        valid &= torch.arange(n, device=k.device) < exact_len.reshape(())
    if exact_mask is not None:
        valid = valid & exact_mask
    segments = [(q[:, :, None], k, v, valid[None])]
    if body is not None:
        kb, vb = dequantize_body(body, torch.float32)
        body_valid = torch.arange(kb.shape[2], device=k.device) < body_len.reshape(())
        segments.insert(0, (q[:, :, None], kb, vb, body_valid[None]))
    return attention_reference(segments, sm_scale)[:, :, 0]


# The kernels as one custom op (flat arguments), so torch.compile(fullgraph=True) keeps the call.
@torch.library.custom_op("kvcache::decode_attention", mutates_args=())
def _decode_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, exact_len: Optional[torch.Tensor],
    exact_mask: Optional[torch.Tensor], bits: int, key_group: int, value_group: int, fp8: bool,
    k_codes: Optional[torch.Tensor], k_scale: Optional[torch.Tensor], k_zero: Optional[torch.Tensor],
    v_codes: Optional[torch.Tensor], v_scale: Optional[torch.Tensor], v_zero: Optional[torch.Tensor],
    body_len: Optional[torch.Tensor], sm_scale: float,
) -> torch.Tensor:
    body = None if k_codes is None else QuantizedBody(bits, key_group, value_group, k_codes, k_scale, k_zero, v_codes,
                                                      v_scale, v_zero, fp8)
    if q.is_cuda:
        from decode_kernels import flash_decode

        mask = exact_mask.view(torch.uint8) if exact_mask is not None else None
        return flash_decode(q, k, v, exact_len, mask, body, body_len, sm_scale)
    return decode_attention_reference(q, k, v, exact_len, exact_mask, body, body_len, sm_scale)


@_decode_attention_op.register_fake
def _(q, k, v, exact_len, exact_mask, bits, key_group, value_group, fp8, k_codes, k_scale, k_zero,
      v_codes, v_scale, v_zero, body_len, sm_scale):
    return torch.empty_like(q)


def _check(cond, msg):
    if not cond:
        raise ValueError(f"decode_attention: {msg}")


def _check_args(q, k, v, exact_len, exact_mask, body, body_len):
    _check(q.dim() == 3, f"q must be [B, Hq, D], got {tuple(q.shape)}")
    B, Hq, D = q.shape
    _check(k.dim() == 4 and k.shape == v.shape, f"k, v must be [B, Hkv, N, D] alike, got {tuple(k.shape)}, {tuple(v.shape)}")
    _check(k.shape[0] == B and k.shape[3] == D, f"k {tuple(k.shape)} does not match q {tuple(q.shape)}")
    Hkv, N = k.shape[1], k.shape[2]
    _check(Hq % Hkv == 0, f"Hq={Hq} is not a multiple of Hkv={Hkv}")
    _check(k.dtype == q.dtype and v.dtype == q.dtype, f"k/v dtype {k.dtype}/{v.dtype} != q dtype {q.dtype}")
    _check(q.stride(2) == 1 and k.stride(3) == 1 and v.stride(3) == 1, "q, k, v must be contiguous in the last dim")
    _check(exact_len is None or (exact_len.numel() == 1 and not exact_len.dtype.is_floating_point),
           "exact_len must be None or a one-element int tensor")
    if exact_mask is not None:
        _check(exact_mask.dtype == torch.bool and exact_mask.shape == (N,), f"exact_mask must be bool [{N}]")
    if q.is_cuda:
        _check(D >= 16 and D & (D - 1) == 0, f"head dim {D} must be a power of two >= 16 for the kernel")
        _check(D in (64, 128), f"no kernel config for head dim {D} (the kernels take 64 and 128)")
    if body is None:
        return
    _check(body_len is not None and body_len.numel() == 1, "body needs body_len, a one-element int tensor")
    L = body.k_codes.shape[2]
    want = (B, Hkv, L)
    for name in ("k_codes", "v_codes", "k_scale", "v_scale"):
        t = getattr(body, name)
        blocks = name == "v_codes"
        _check(t.dim() == (5 if blocks else 4) and t.shape[:2] == want[:2],
               f"body.{name} must be [B={B}, Hkv={Hkv}, ...]"
               + (f" in whole blocks of {kv_quant.VALUE_BLOCK} tokens (kv_quant.block_value_codes)" if blocks else "")
               + f", got {tuple(t.shape)}")
        _check(t.stride(-1) == 1, f"body.{name} must be contiguous in the last dim")
    _check(body.k_scale.dtype == q.dtype and body.v_scale.dtype == q.dtype, "body scales must be in q's dtype")
    _check(body.bits in (8, 4, 2), f"body.bits must be 8, 4 or 2, got {body.bits}")
    # Bytes per token: a code per channel, or KIVI's packed codes (kv_quant.pack_codes).
    row = D if body.bits == 8 else D * body.bits // 8
    vb = kv_quant.VALUE_BLOCK
    _check(body.k_codes.shape == want + (row,), f"{body.format} key codes must be [B, Hkv, L, {row}]")
    _check(L % vb == 0 and body.v_codes.shape == (B, Hkv, L // vb, row, vb) and body.v_codes.stride(3) == vb,
           f"{body.format} value codes must be whole blocks of {vb} tokens, [B, Hkv, L / {vb}, {row}, {vb}] "
           f"(kv_quant.block_value_codes), with L = {L} a multiple of {vb}")
    if body.bits == 8:
        code_dtype = torch.uint8 if body.fp8 else torch.int8
        _check(body.k_codes.dtype == code_dtype and body.v_codes.dtype == code_dtype,
               f"{body.format} codes must be {code_dtype} ({'e4m3 bit patterns' if body.fp8 else 'int8'})")
        _check(body.k_scale.shape == want + (1,) and body.v_scale.shape == want + (1,), "bits 8 scales must be [B, Hkv, L, 1]")
        return
    kg, vg = body.key_group, body.value_group
    _check(kg >= 16 and kg & (kg - 1) == 0, f"key_group {kg} must be a power of two >= 16")
    _check(vg >= 16 and vg & (vg - 1) == 0 and D % vg == 0, f"value_group {vg} must be a power of two >= 16 dividing D={D}")
    _check(L % kg == 0, f"body capacity {L} must be a multiple of key_group {kg}")
    _check(body.k_codes.dtype == torch.uint8 and body.v_codes.dtype == torch.uint8, "bits 4/2 codes must be uint8")
    _check(row >= 16 or not q.is_cuda, f"packed rows of {row} bytes are too narrow for the kernel (D={D}, bits={body.bits})")
    _check(body.k_zero is not None and body.v_zero is not None, "bits 4/2 need k_zero and v_zero")
    _check(body.k_scale.shape == (B, Hkv, L // kg, D) and body.k_zero.shape == body.k_scale.shape,
           f"k_scale/k_zero must be [B, Hkv, L/{kg}, D]")
    _check(body.v_scale.shape == want + (D // vg,) and body.v_zero.shape == body.v_scale.shape,
           f"v_scale/v_zero must be [B, Hkv, L, D/{vg}]")
    _check(body.k_zero.stride() == body.k_scale.stride() and body.v_zero.stride() == body.v_scale.stride(),
           "zeros must have the same strides as their scales")


def decode_attention(q, k, v, exact_len, exact_mask=None, body=None, body_len=None, sm_scale=None):
    """Attention of one new token per sequence over [body; exact slots] with one softmax.

    q [B, Hq, D]; k, v [B, Hkv, N, D] exact slots (slot >= exact_len or exact_mask False ignored;
    exact_len None: all N slots count);
    body: QuantizedBody or None, tokens >= body_len ignored. Returns [B, Hq, D] in q's dtype.
    """
    _check_args(q, k, v, exact_len, exact_mask, body, body_len)
    scale = float(q.shape[-1] ** -0.5 if sm_scale is None else sm_scale)
    if body is None:
        return _decode_attention_op(q, k, v, exact_len, exact_mask, 16, 0, 0, False, *(None,) * 7, scale)
    return _decode_attention_op(q, k, v, exact_len, exact_mask, body.bits, body.key_group, body.value_group, body.fp8,
                                *body.tensors(), body_len, scale)
