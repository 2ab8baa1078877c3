"""Property tests of the pure quantization functions.

Bound: every element's round-trip error is within half of its own quantization step (the
stored scale), plus fp32 arithmetic rounding of the dequantization (1e-6 relative to |x|).
"""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import kv_quant as kq

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
F16_MAX = 65504.0

finite = st.floats(-F16_MAX, F16_MAX, allow_nan=False, allow_infinity=False, width=32)
special = st.sampled_from([0.0, -0.0, F16_MAX, -F16_MAX, 6e-8, -6e-8, 1e-30, 1e4, -3e4])
element = st.one_of(finite, special, st.floats(-1, 1, width=32))


def tensors(shape):
    return arrays(np.float32, shape, elements=element).map(torch.from_numpy)


def within_half_step(x, deq, step):
    err = (deq.float() - x.float()).abs()
    bound = step.float() / 2 + 1e-6 * x.float().abs() + 1e-30
    return bool((err <= bound).all()), float((err - bound).max())


@settings(max_examples=150, deadline=None)
@given(x=tensors((3, 4, 16)), dtype=st.sampled_from(DTYPES))
def test_int8_per_token_round_trip(x, dtype):
    codes, scale = kq.quantize_symmetric_per_token(x, dtype)
    assert codes.dtype == torch.int8 and scale.dtype == dtype and scale.shape == (3, 4, 1)
    deq = kq.dequantize_symmetric_per_token(codes, scale, torch.float32)
    assert not deq.isnan().any()
    ok, excess = within_half_step(x, deq, scale.expand_as(x))
    assert ok, excess


@settings(max_examples=150, deadline=None)
@given(x=tensors((2, 8, 16)), bits=st.sampled_from([4, 2]), dtype=st.sampled_from(DTYPES))
def test_kivi_keys_per_channel_round_trip(x, bits, dtype):
    codes, scale, zero = kq.quantize_asymmetric_per_channel(x, bits, dtype)
    assert scale.shape == zero.shape == (2, 1, 16) and int(codes.max()) < 2**bits
    deq = kq.dequantize_asymmetric(codes, scale, zero, torch.float32)
    assert not deq.isnan().any()
    ok, excess = within_half_step(x, deq, scale.expand_as(x))
    assert ok, excess


@settings(max_examples=150, deadline=None)
@given(x=tensors((3, 5, 16)), bits=st.sampled_from([4, 2]), group=st.sampled_from([4, 8, 16]), dtype=st.sampled_from(DTYPES))
def test_kivi_values_per_token_group_round_trip(x, bits, group, dtype):
    codes, scale, zero = kq.quantize_asymmetric_per_token_group(x, bits, group, dtype)
    assert scale.shape == (3, 5, 16 // group)
    deq = kq.dequantize_asymmetric(codes, kq.expand_per_token_group(scale, group), kq.expand_per_token_group(zero, group), torch.float32)
    assert not deq.isnan().any()
    ok, excess = within_half_step(x, deq, kq.expand_per_token_group(scale, group))
    assert ok, excess


@pytest.mark.parametrize("quant", ["int8", "keys", "values"])
def test_all_zero_vectors_give_zeros(quant):
    x = torch.zeros(2, 4, 32)
    if quant == "int8":
        deq = kq.dequantize_symmetric_per_token(*kq.quantize_symmetric_per_token(x, torch.bfloat16), torch.float32)
    elif quant == "keys":
        deq = kq.dequantize_asymmetric(*kq.quantize_asymmetric_per_channel(x, 4, torch.bfloat16), torch.float32)
    else:
        c, s, z = kq.quantize_asymmetric_per_token_group(x, 2, 8, torch.bfloat16)
        deq = kq.dequantize_asymmetric(c, kq.expand_per_token_group(s, 8), kq.expand_per_token_group(z, 8), torch.float32)
    assert torch.equal(deq, x)


@settings(max_examples=100, deadline=None)
@given(bits=st.sampled_from([4, 2]), d=st.sampled_from([8, 16, 64, 128]), seed=st.integers(0, 2**31 - 1))
def test_pack_unpack_bit_exact(bits, d, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (3, 2, d), generator=g, dtype=torch.uint8)
    packed = kq.pack_codes(codes, bits)
    assert packed.shape == (3, 2, d * bits // 8) and packed.dtype == torch.uint8
    assert torch.equal(kq.unpack_codes(packed, bits), codes)


def test_packing_is_planar():
    codes = torch.tensor([[1, 2, 3, 0, 3, 3, 1, 2]], dtype=torch.uint8)  # D = 8, bits 2: 4 planes of 2
    packed = kq.pack_codes(codes, 2)
    # byte j holds codes j, j+2, j+4, j+6 at bits 0, 2, 4, 6
    assert packed.tolist() == [[1 | 3 << 2 | 3 << 4 | 1 << 6, 2 | 0 << 2 | 3 << 4 | 2 << 6]]
