"""Property tests of the pure quantization functions.

The bound each element's round trip x -> code c -> x' must meet, derived from the arithmetic.
In exact arithmetic the codes are round((x - z) / s) with parameters that cover the range, so
|x' - x| <= s / 2. The functions compute in fp32 (unit roundoff u = 2**-24), and each rounded
operation adds at most u times its result's magnitude, or half the smallest subnormal, 2**-150,
where the result is subnormal:
  quantize:    d = fl(x - z), then q = fl(d / s), c = round(q) (clamping only moves c towards x):
               q = (x - z)(1 + e1)(1 + e2) / s, so c s is off from x - z by at most
               s / 2 + (2u + u**2) |x - z|, plus 2**-150 for d and s * 2**-150 for q;
  dequantize:  fl(c * s), then fl(z + fl(c * s)): u |c s| + u |x'|, plus 2 * 2**-150.
So |x' - x| <= s / 2 + (2u + u**2) |x - z| + u |c s| + u |x'| + (3 + s) 2**-150, checked in
float64 (exact to far below these terms). Symmetric int8 is the same with z = 0.
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


U = 2.0**-24
SUBNORMAL_HALF_ULP = 2.0**-150


def within_half_step(x, deq, codes, scale, zero=None):
    """The module docstring's bound; scale, zero and codes already broadcast against x."""
    x, deq, s = x.double(), deq.double(), scale.double()
    z = torch.zeros_like(x) if zero is None else zero.double()
    err = (deq - x).abs()
    rounding = (2 * U + U * U) * (x - z).abs() + U * ((codes.double() * s).abs() + deq.abs()) + (3 + s) * SUBNORMAL_HALF_ULP
    bound = s / 2 + rounding
    return bool((err <= bound).all()), float((err - bound).max())


@settings(max_examples=150, deadline=None)
@given(x=tensors((3, 4, 16)), dtype=st.sampled_from(DTYPES))
def test_int8_per_token_round_trip(x, dtype):
    codes, scale = kq.quantize_symmetric_per_token(x, dtype)
    assert codes.dtype == torch.int8 and scale.dtype == dtype and scale.shape == (3, 4, 1)
    deq = kq.dequantize_symmetric_per_token(codes, scale, torch.float32)
    assert not deq.isnan().any()
    ok, excess = within_half_step(x, deq, codes, scale.expand_as(x))
    assert ok, excess


@settings(max_examples=150, deadline=None)
@given(x=tensors((2, 8, 16)), bits=st.sampled_from([4, 2]), dtype=st.sampled_from(DTYPES))
def test_kivi_keys_per_channel_round_trip(x, bits, dtype):
    codes, scale, zero = kq.quantize_asymmetric_per_channel(x, bits, dtype)
    assert scale.shape == zero.shape == (2, 1, 16) and int(codes.max()) < 2**bits
    deq = kq.dequantize_asymmetric(codes, scale, zero, torch.float32)
    assert not deq.isnan().any()
    ok, excess = within_half_step(x, deq, codes, scale.expand_as(x), zero.expand_as(x))
    assert ok, excess


@settings(max_examples=150, deadline=None)
@given(x=tensors((3, 5, 16)), bits=st.sampled_from([4, 2]), group=st.sampled_from([4, 8, 16]), dtype=st.sampled_from(DTYPES))
def test_kivi_values_per_token_group_round_trip(x, bits, group, dtype):
    codes, scale, zero = kq.quantize_asymmetric_per_token_group(x, bits, group, dtype)
    assert scale.shape == (3, 5, 16 // group)
    deq = kq.dequantize_asymmetric(codes, kq.expand_per_token_group(scale, group), kq.expand_per_token_group(zero, group), torch.float32)
    assert not deq.isnan().any()
    ok, excess = within_half_step(x, deq, codes, kq.expand_per_token_group(scale, group), kq.expand_per_token_group(zero, group))
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


@settings(max_examples=50, deadline=None)
@given(blocks=st.integers(1, 4), d=st.sampled_from([8, 64]), seed=st.integers(0, 2**31 - 1))
def test_value_code_blocks(blocks, d, seed):
    """8-bit value codes in blocks of VALUE_BLOCK tokens, channel-major inside: token t, channel c
    at [t // VALUE_BLOCK, c, t % VALUE_BLOCK]; rows read and written by token index."""
    g = torch.Generator().manual_seed(seed)
    vb = kq.VALUE_BLOCK
    codes = torch.randint(-127, 128, (2, 3, blocks * vb, d), generator=g, dtype=torch.int8)
    blocked = kq.block_value_codes(codes)
    assert blocked.shape == (2, 3, blocks, d, vb) and blocked.is_contiguous()
    t, c = int(torch.randint(blocks * vb, (1,), generator=g)), int(torch.randint(d, (1,), generator=g))
    assert blocked[1, 2, t // vb, c, t % vb] == codes[1, 2, t, c]
    assert torch.equal(kq.unblock_value_codes(blocked), codes)
    index = torch.randperm(blocks * vb, generator=g)[:5]
    assert torch.equal(kq.token_rows(blocked, index), codes[:, :, index])
    rows = torch.randint(-127, 128, (2, 3, 5, d), generator=g, dtype=torch.int8)
    kq.write_token_rows(blocked, index, rows)
    codes[:, :, index] = rows
    assert torch.equal(kq.unblock_value_codes(blocked), codes)
