"""RMSNorm with the residual add fused in (norm_op.py): the Triton kernel (norm_kernels.py)
against float64 and against the PyTorch definition, under the interpreter on the CPU and on a
GPU; and the model's CPU path, which is the definition itself."""
import pytest
import torch

import norm_op
from model import RMSNorm

# The kernel rounds twice, as the definition does: the normalized row to the activations' dtype,
# then its product with the weight (bf16: 2**-8 relative each at most). Against the definition
# only the order of the sum of squares differs, which can move a rounding by one unit.
BF16_ROUNDINGS = 2 * 2**-8


def float64_norm(x, delta, weight, eps):
    s = (x if delta is None else x + delta).double()  # the sum itself is rounded as the kernel does
    return s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + eps) * weight.double()


def check(stream, normed, x, delta, weight, eps):
    want_stream, want = norm_op.add_rms_norm_reference(x.cpu(), None if delta is None else delta.cpu(), weight.cpu(), eps)
    assert normed.dtype == want.dtype and normed.shape == want.shape
    assert torch.equal(stream.cpu(), want_stream)  # one add, rounded once: bit for bit
    exact = float64_norm(want_stream, None, weight.cpu(), eps)
    err = (normed.cpu().double() - exact).abs()
    assert (err <= BF16_ROUNDINGS * exact.abs() + 1e-30).all(), err.max()
    ulp = (want.double().abs() * 2**-7).clamp_min(1e-30)  # one bf16 unit (or less) near each value
    assert ((normed.cpu().double() - want.double()).abs() <= ulp).all()


# (rows, width, with delta, activation dtype, weight dtype)
CASES = [
    (1, 4096, True, torch.bfloat16, torch.bfloat16),  # a batch-1 decode step of Llama-3-8B
    (3, 576, True, torch.bfloat16, torch.bfloat16),  # SmolLM2's width: not a power of two
    (5, 64, False, torch.bfloat16, torch.bfloat16),  # the first block: no delta
    (2, 96, True, torch.bfloat16, torch.float32),  # an fp32 weight: the output promotes to fp32
    (4, 200, True, torch.float32, torch.float32),
]


@pytest.mark.parametrize("m,n,has_delta,dtype,wdtype", CASES)
def test_kernel_matches_definition(triton_interpreter, m, n, has_delta, dtype, wdtype):
    from norm_kernels import triton_add_rms_norm

    g = torch.Generator().manual_seed(m * 1000 + n)
    x = (torch.randn(m, n, generator=g) * 3).to(dtype)
    delta = torch.randn(m, n, generator=g).to(dtype) if has_delta else None
    weight = (torch.rand(n, generator=g) + 0.5).to(wdtype)
    stream, normed = triton_add_rms_norm(x, delta, weight, 1e-5, torch.promote_types(dtype, wdtype))
    check(x if delta is None else stream, normed, x, delta, weight, 1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the interpreted test covers the CPU)")
@pytest.mark.parametrize("m,n,has_delta,dtype,wdtype", CASES + [(40, 4096, True, torch.bfloat16, torch.bfloat16)])
def test_op_on_gpu(m, n, has_delta, dtype, wdtype):
    """Through the op as the model calls it ([B, T, N]), launched with PDL on Hopper."""
    g = torch.Generator(device="cuda").manual_seed(m + n)
    x = (torch.randn(1, m, n, device="cuda", generator=g) * 3).to(dtype)
    delta = torch.randn(1, m, n, device="cuda", generator=g).to(dtype) if has_delta else None
    weight = (torch.rand(n, device="cuda", generator=g) + 0.5).to(wdtype)
    stream, normed = norm_op.add_rms_norm(x, delta, weight, 1e-5)
    assert delta is not None or stream is x
    check(stream, normed, x, delta, weight, 1e-5)


def test_cpu_module_is_the_textbook_arithmetic():
    """On the CPU RMSNorm is bit for bit Llama's x + delta then norm (so CPU results do not move);
    compiled, within a unit (inductor keeps the normalized row in fp32 before the weight)."""
    torch.manual_seed(2)
    norm = RMSNorm(48)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(48) + 0.5)
    x, delta = torch.randn(2, 3, 48).bfloat16(), torch.randn(2, 3, 48).bfloat16()
    norm = norm.bfloat16()
    s = x + delta
    s32 = s.float()
    want = (s32 * torch.rsqrt(s32.pow(2).mean(-1, keepdim=True) + norm.eps)).bfloat16() * norm.weight
    with torch.no_grad():
        stream, normed = norm(x, delta)
        assert torch.equal(stream, s) and torch.equal(normed, want)
        stream, normed = torch.compile(norm, fullgraph=True)(x, delta)
        assert torch.equal(stream, s)
        torch.testing.assert_close(normed, want, rtol=2**-7, atol=0)
        stream, normed = norm(x)
        assert stream is x


def test_mismatched_inputs_are_one_line_errors():
    with pytest.raises(ValueError, match="do not match"):
        norm_op.add_rms_norm(torch.randn(2, 8), torch.randn(2, 6), torch.ones(8), 1e-5)
    with pytest.raises(ValueError, match="do not match"):
        norm_op.add_rms_norm(torch.randn(2, 8), None, torch.ones(6), 1e-5)
