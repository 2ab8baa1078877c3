"""The linear layers' Triton kernel (linear_kernels.py) against a float64 reference, under the Triton
interpreter on the CPU (on a GPU, scripts/bench_linear.py checks every config it times), and the
custom op's dispatch (linear_op.py)."""
import pytest
import torch

import linear_op
from model import Linear

# The kernel's dots take bf16 operands (exact: bf16 activations, int8 codes convert exactly) and
# sum in fp32 (relative ~K * 2**-24); the output is rounded once to bf16 (2**-9 relative per
# element at most). A wrong tile, mask, split or scale is off by O(1).
BF16_TOL = 4e-3


def reference(x, w, scales, bias):
    y = x.double() @ w.double().T
    if scales is not None:
        y = y * scales.double()
    return y if bias is None else y + bias.double()


def rel_err(out, ref) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


# (M, N, K, config (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, split) or None for the default)
CASES = [
    (1, 64, 256, (1, 16, 64, 4, 1, 1)),  # batch 1 on the CUDA cores
    (1, 80, 320, (1, 32, 128, 4, 1, 2)),  # the same, N and K the blocks do not divide, K split
    (1, 64, 256, (1, 16, 64, 4, 2, 1)),  # the loads one tile ahead
    (1, 80, 328, (1, 32, 128, 4, 2, 2)),  # ahead, with masked tiles and a K split
    (1, 72, 198, (1, 16, 64, 4, 2, 1)),  # K of part words for int8 (the tensor-core default runs)
    (1, 64, 256, (16, 32, 64, 4, 2, 1)),  # batch 1 on the tensor cores
    (8, 96, 384, (16, 32, 64, 4, 2, 2)),  # batch 8, K split in two
    (3, 80, 320, (16, 32, 128, 4, 2, 3)),  # masked tiles and splits on the tensor cores
    (16, 64, 512, (16, 16, 128, 4, 2, 4)),  # the most rows a decode config takes
    (1, 88, 200, None),  # a shape without a committed config: the batch-1 default
    (5, 88, 200, None),  # the 2-16 rows default
    (40, 72, 200, None),  # prefill-sized: PREFILL_CONFIG, M in several blocks
]


@pytest.mark.parametrize("kind", ["bf16", "int8"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("m,n,k,config", CASES)
def test_kernel_matches_float64(triton_interpreter, monkeypatch, kind, bias, m, n, k, config):
    import linear_kernels as lk

    g = torch.Generator().manual_seed(m * 1000 + n + k)
    x = torch.randn(m, k, generator=g).to(torch.bfloat16)
    if kind == "int8":
        w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
        scales = (torch.rand(n, generator=g) * 0.01 + 1e-3).to(torch.bfloat16)
    else:
        w, scales = (torch.randn(n, k, generator=g) * 0.05).to(torch.bfloat16), None
    b = torch.randn(n, generator=g).to(torch.bfloat16) if bias else None
    if config is not None:
        monkeypatch.setitem(lk.CONFIGS, (kind, n, k, 1 if m == 1 else lk.DECODE_ROWS), config)
    out = lk.triton_linear(x, w, scales, b)
    assert out.shape == (m, n) and out.dtype == torch.bfloat16
    assert rel_err(out, reference(x, w, scales, b)) < BF16_TOL


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_other_activation_dtypes_take_the_tensor_core_path(triton_interpreter, dtype):
    """The CUDA-core path reads bf16 activations as words; fp16 and fp32 (--precision) at batch 1
    take the tensor-core config instead, fp32 with full-precision products (not TF32)."""
    import linear_kernels as lk

    g = torch.Generator().manual_seed(7)
    x, w = torch.randn(1, 256, generator=g).to(dtype), (torch.randn(64, 256, generator=g) * 0.05).to(dtype)
    assert lk.config(w, 1, dtype=dtype)[0] == lk.DECODE_ROWS
    out = lk.triton_linear(x, w, None, None)
    assert out.dtype == dtype
    assert rel_err(out, reference(x, w, None, None)) < (1e-5 if dtype == torch.float32 else 2e-3)


@pytest.mark.parametrize("kind", ["bf16", "int8"])
def test_tensors_that_do_not_start_on_a_word(triton_interpreter, kind):
    """The CUDA-core path views rows and weights as 32-bit words: activations one element past a
    word are copied first, a weight one element past a word takes the tensor-core config."""
    import linear_kernels as lk

    g = torch.Generator().manual_seed(11)
    n, k = 64, 256
    x = torch.randn(1, k + 1, generator=g).to(torch.bfloat16)[:, 1:]  # storage offset 1
    if kind == "int8":
        flat = torch.randint(-127, 128, (n * k + 1,), generator=g, dtype=torch.int8)
        scales = (torch.rand(n, generator=g) * 0.01 + 1e-3).to(torch.bfloat16)
    else:
        flat, scales = (torch.randn(n * k + 1, generator=g) * 0.05).to(torch.bfloat16), None
    aligned, shifted = flat[:-1].view(n, k), flat[1:].view(n, k)
    assert lk.config(aligned, 1)[0] == 1 and lk.config(shifted, 1)[0] == lk.DECODE_ROWS
    for w in (aligned, shifted):
        assert rel_err(lk.triton_linear(x, w, scales, None), reference(x, w, scales, None)) < BF16_TOL


def gated_float64(x, w, scales, up, up_scales):
    return torch.nn.functional.silu(reference(x, w, scales, None)) * reference(x, up, up_scales, None)


# (M, N, K, config) for the gated pair: the CUDA-core and tensor-core paths, N and K the blocks do
# not divide, a split config (the gated kernel runs it unsplit), the prefill config.
GATED_CASES = [
    (1, 64, 256, (1, 16, 64, 4, 1, 1)),
    (1, 80, 320, (1, 32, 128, 4, 1, 2)),
    (1, 80, 328, (1, 16, 64, 4, 2, 1)),
    (1, 64, 256, (16, 32, 64, 4, 2, 1)),
    (6, 96, 384, (16, 32, 64, 4, 2, 2)),
    (40, 72, 200, None),
]


def random_weights(kind, n, k, g, device="cpu"):
    """(weights, scales): bf16 weights, or int8 codes with bf16 per-channel scales."""
    if kind == "int8":
        return (torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8, device=device),
                (torch.rand(n, generator=g, device=device) * 0.002 + 2e-4).to(torch.bfloat16))
    return (torch.randn(n, k, generator=g, device=device) * 0.02).to(torch.bfloat16), None


@pytest.mark.parametrize("kind", ["bf16", "int8"])
@pytest.mark.parametrize("m,n,k,config", GATED_CASES)
def test_gated_kernel_matches_float64(triton_interpreter, monkeypatch, kind, m, n, k, config):
    """silu(x gate^T) * (x up^T) in one kernel against float64. Each product is as accurate as
    above; silu and the product in fp32 add a few 2**-24, the output rounding 2**-9."""
    import linear_kernels as lk

    g = torch.Generator().manual_seed(m * 1000 + n + k)
    x = torch.randn(m, k, generator=g).to(torch.bfloat16)
    (w, s), (u, us) = random_weights(kind, n, k, g), random_weights(kind, n, k, g)
    if config is not None:
        monkeypatch.setitem(lk.CONFIGS, (kind + " gated", n, k, 1 if m == 1 else lk.DECODE_ROWS), config)
    out = lk.triton_linear(x, w, s, None, u, us)
    assert out.shape == (m, n) and out.dtype == torch.bfloat16
    assert rel_err(out, gated_float64(x, w, s, u, us)) < BF16_TOL


def test_committed_configs_fit_their_shapes():
    """Every committed config serves its row count, divides its matrix's N (unmasked weight loads)
    and keeps at least one tile per K split."""
    import linear_kernels as lk

    kinds = ("bf16", "int8", "bf16 gated", "int8 gated")
    for (kind, n, k, rows), (block_m, block_n, block_k, warps, stages, split) in lk.CONFIGS.items():
        assert kind in kinds and rows in (1, lk.DECODE_ROWS) and block_m >= rows, (kind, n, k, rows)
        assert n % block_n == 0 and k // split >= block_k, (kind, n, k, rows)
        assert all(v & (v - 1) == 0 for v in (block_m, block_n, block_k, warps)), (kind, n, k, rows)
        assert split == 1 or "gated" not in kind, (kind, n, k, rows)  # the gate needs whole rows
        assert block_m > 1 or stages in (1, 2), (kind, n, k, rows)  # tiles in flight on the CUDA cores
    assert set(lk.DEFAULT_CONFIGS) == {(kind, rows) for kind in kinds for rows in (1, lk.DECODE_ROWS)}
    assert all(cfg[0] >= rows for (_, rows), cfg in lk.DEFAULT_CONFIGS.items())
    assert all(cfg[0] > 1 or cfg[4] in (1, 2) for cfg in lk.DEFAULT_CONFIGS.values())


def test_cpu_layer_is_the_reference_and_compiles():
    """On the CPU a Linear is linear_reference, eager and under torch.compile(fullgraph=True)."""
    torch.manual_seed(0)
    layer = Linear(32, 24, bias=True)
    x = torch.randn(2, 3, 32)
    with torch.no_grad():
        want = torch.nn.functional.linear(x, layer.weight, layer.bias)
        torch.testing.assert_close(layer(x), want)
        torch.testing.assert_close(torch.compile(layer, fullgraph=True)(x), want)


def test_cpu_gated_pair_is_the_textbook_arithmetic():
    """On the CPU gated_linear is bit for bit silu(w1(x)) * w3(x), so CPU results do not move."""
    torch.manual_seed(1)
    gate, up = Linear(32, 24, bias=False), Linear(32, 24, bias=False)
    x = torch.randn(2, 3, 32)
    with torch.no_grad():
        want = torch.nn.functional.silu(gate(x)) * up(x)
        assert torch.equal(linear_op.gated_linear(x, gate.weight, up.weight), want)


def test_bad_shapes_are_one_line_errors():
    with pytest.raises(ValueError, match="does not match weight"):
        linear_op.linear(torch.randn(2, 8), torch.randn(4, 6))
    with pytest.raises(ValueError, match="contiguous"):
        linear_op.linear(torch.randn(2, 8), torch.randn(8, 4).T)
    with pytest.raises(ValueError, match="differ"):
        linear_op.gated_linear(torch.randn(2, 8), torch.randn(4, 8), torch.randn(5, 8))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the interpreted test covers the CPU)")
@pytest.mark.parametrize("kind", ["bf16", "int8"])
@pytest.mark.parametrize("m", [1, 8, 40])
def test_kernel_on_gpu_with_committed_configs(kind, m):
    """Llama-3-8B's matrices (each with its committed config, or the default) at decode and
    prefill sizes, through the op as the model calls it."""
    import linear_kernels as lk

    g = torch.Generator(device="cuda").manual_seed(m)
    for n, k in [(6144, 4096), (4096, 4096), (14336, 4096), (4096, 14336), (128256, 4096), (96, 200)]:
        x = torch.randn(m, k, device="cuda", generator=g).to(torch.bfloat16)
        if kind == "int8":
            w = torch.randint(-127, 128, (n, k), device="cuda", generator=g, dtype=torch.int8)
            scales = (torch.rand(n, device="cuda", generator=g) * 0.01 + 1e-3).to(torch.bfloat16)
        else:
            w, scales = (torch.randn(n, k, device="cuda", generator=g) * 0.05).to(torch.bfloat16), None
        out = linear_op.linear(x, w, scales)
        assert rel_err(out, reference(x, w, scales, None)) < BF16_TOL, (kind, m, n, k, lk.config(w, m))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the interpreted test covers the CPU)")
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("m", [1, 8])
def test_other_activation_dtypes_on_gpu(dtype, m):
    """fp16 and fp32 activations (--precision) on the tensor-core path: fp16 products summed in
    fp32, then one fp16 rounding (2**-11); fp32 in full precision (TF32 would be ~1e-3 off)."""
    g = torch.Generator(device="cuda").manual_seed(m)
    x = torch.randn(m, 4096, device="cuda", generator=g).to(dtype)
    w = (torch.randn(6144, 4096, device="cuda", generator=g) * 0.05).to(dtype)
    out = linear_op.linear(x, w)
    assert out.dtype == dtype
    assert rel_err(out, reference(x, w, None, None)) < (1e-5 if dtype == torch.float32 else 2e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the interpreted test covers the CPU)")
@pytest.mark.parametrize("kind", ["bf16", "int8"])
@pytest.mark.parametrize("m", [1, 8, 40])
def test_gated_kernel_on_gpu_with_committed_configs(kind, m):
    """The gate and up pair at Llama-3-8B's shape with the committed configs, and a shape without
    one, through the op as the model calls it. Prefill-sized bf16 inputs run the PyTorch path,
    whose bf16 rounding of each product, of silu and of the product is about 2**-9 each."""
    g = torch.Generator(device="cuda").manual_seed(100 + m)
    tol = 2 * BF16_TOL if m > 16 and kind == "bf16" else BF16_TOL
    for n, k in [(14336, 4096), (96, 200)]:
        x = torch.randn(m, k, device="cuda", generator=g).to(torch.bfloat16)
        (w, s), (u, us) = random_weights(kind, n, k, g, "cuda"), random_weights(kind, n, k, g, "cuda")
        out = linear_op.gated_linear(x, w, u, s, us)
        assert rel_err(out, gated_float64(x, w, s, u, us)) < tol, (kind, m, n, k)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (inline PTX; the interpreter runs the casts)")
@pytest.mark.parametrize("config", [(1, 8, 512, 4, 2, 1), (1, 32, 256, 8, 1, 2), (1, 16, 128, 4, 2, 1)])
def test_int8_ptx_conversion_equals_the_casts(monkeypatch, config):
    """The batch-1 CUDA-core path's PTX conversion (linear_kernels.INT8_ASM) gives the very codes
    the plain shifts and casts give, so the outputs are bit-identical; every code, -128 included,
    with N and K the blocks do not divide, the loads one tile ahead or not."""
    import linear_kernels as lk

    g = torch.Generator(device="cuda").manual_seed(sum(config))
    for n, k in [(6144, 4096), (200, 1000)]:
        x = torch.randn(1, k, device="cuda", generator=g).to(torch.bfloat16)
        w = torch.randint(-128, 128, (n, k), device="cuda", generator=g, dtype=torch.int8)
        scales = (torch.rand(n, device="cuda", generator=g) * 0.01 + 1e-3).to(torch.bfloat16)
        monkeypatch.setitem(lk.CONFIGS, ("int8", n, k, 1), config)
        monkeypatch.setattr(lk, "INT8_ASM", True)
        ptx = lk.triton_linear(x, w, scales, None)
        monkeypatch.setattr(lk, "INT8_ASM", False)
        casts = lk.triton_linear(x, w, scales, None)
        assert torch.equal(ptx, casts), (n, k)
        assert rel_err(ptx, reference(x, w, scales, None)) < BF16_TOL


def test_cpu_tensors_never_ask_for_dependent_launch():
    """pdl.options: the interpreter gets the constexpr off and no launch attribute it would reject."""
    pytest.importorskip("triton")
    import pdl

    assert pdl.options(torch.zeros(1)) == {"PDL": False}
