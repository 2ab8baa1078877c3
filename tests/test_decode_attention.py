"""decode_attention: the reference against float64 (CPU, CI) and the kernel against the reference (GPU).

Tolerances (relative norm ||out - ref|| / ||ref||):
- reference vs float64 on fp32 inputs: 1e-5. Both compute the same sums; fp32 accumulation over
  at most a few thousand terms stays near 1e-6.
- reference vs float64 on bf16 inputs: 1e-2. The reference rounds its output to bf16 (2**-9
  relative per element).
- kernel vs reference (GPU, bf16): 1e-2. The kernel feeds P to the tensor cores in bf16, or for
  int8/fp8 and KIVI q and P in fp16 (2**-11; KIVI's q and P times a key or value scale rounded
  once to fp16, the scale's error times a code of at most 2**BITS steps), and rounds the output
  to bf16; each is a 2**-9 relative rounding at worst, and they average out over the sum.
"""
import math

import pytest
import torch

import kv_quant
from decode_attention import decode_attention, decode_attention_reference
from kv_quant import QuantizedBody
from tests.helpers import triton_missing

CUDA = torch.cuda.is_available()


def make_body(B, Hkv, L, D, bits, groups, dtype, device="cpu", gen=None):
    """Quantize fresh random keys/values ([B, Hkv, L, D]) into a QuantizedBody with kv_quant.

    gen: a CPU generator (reproducible), or None to draw on `device` directly (fast, for big shapes).
    """
    def randn(*shape):
        return torch.randn(*shape, device=device) if gen is None else torch.randn(*shape, generator=gen).to(device)

    k = randn(B, Hkv, L, D) * 2 + 0.5  # keys: channel offsets
    v = randn(B, Hkv, L, D)
    if bits in (8, "fp8"):
        quantize = kv_quant.quantize_fp8_per_token if bits == "fp8" else kv_quant.quantize_symmetric_per_token
        (kc, ks), (vc, vs) = quantize(k, dtype), quantize(v, dtype)
        return QuantizedBody(8, 0, 0, kc, ks, None, kv_quant.block_value_codes(vc), vs, None, fp8=bits == "fp8")
    kg, vg = groups if isinstance(groups, tuple) else (groups, groups)  # (key group, value group), or one for both
    return quantize_kivi(k, v, bits, kg, vg, dtype)


def quantize_kivi(k, v, bits, kg, vg, dtype):
    """k, v [B, Hkv, L, D] -> a KIVI QuantizedBody (key groups of kg tokens, value groups of vg channels)."""
    B, Hkv, L, D = k.shape
    kc, ks, kz = kv_quant.quantize_asymmetric_per_channel(k.reshape(B, Hkv, L // kg, kg, D), bits, dtype)
    kc = kv_quant.pack_codes(kc.reshape(B, Hkv, L, D), bits)
    vc, vs, vz = kv_quant.quantize_asymmetric_per_token_group(v, bits, vg, dtype)
    vc = kv_quant.block_value_codes(kv_quant.pack_codes(vc, bits))
    return QuantizedBody(bits, kg, vg, kc, ks.squeeze(-2), kz.squeeze(-2), vc, vs, vz)


# ---------------------------------------------------------------------------------------------
# An independent float64 oracle: its own unpacking and scale expansion, explicit index lists.
# ---------------------------------------------------------------------------------------------

def _unpack64(packed, bits):
    n = 8 // bits
    p = packed.to(torch.int64)
    planes = [(p >> (i * bits)) & ((1 << bits) - 1) for i in range(n)]  # plane i = channels i*D/n...
    return torch.cat(planes, dim=-1).double()


def _dequant64(body):
    # Value codes out of their blocks ([L / 32, D or packed bytes, 32]: block, channel, token) by
    # explicit indexing.
    t = torch.arange(body.k_codes.shape[2])
    v_codes = body.v_codes[:, :, t // 32, :, t % 32].permute(1, 2, 0, 3)  # [L, B, Hkv, X] -> [B, Hkv, L, X]
    if body.bits == 8:
        codes = (body.k_codes, v_codes)
        k, v = (kv_quant.fp8_codes_as_float(c).double() if body.fp8 else c.double() for c in codes)
        return k * body.k_scale.double(), v * body.v_scale.double()
    kc, vc = _unpack64(body.k_codes, body.bits), _unpack64(v_codes, body.bits)
    L, D = kc.shape[2], kc.shape[3]
    tok_group = torch.arange(L) // body.key_group
    ch_group = torch.arange(D) // body.value_group
    k = body.k_zero.double()[:, :, tok_group] + kc * body.k_scale.double()[:, :, tok_group]
    v = body.v_zero.double()[..., ch_group] + vc * body.v_scale.double()[..., ch_group]
    return k, v


def oracle(q, k, v, exact_len, exact_mask, body, body_len, sm_scale=None):
    B, Hq, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    scale = D ** -0.5 if sm_scale is None else sm_scale
    exact_idx = [i for i in range(N) if i < int(exact_len) and (exact_mask is None or bool(exact_mask[i]))]
    keys = [k.double()[:, :, exact_idx]]
    values = [v.double()[:, :, exact_idx]]
    if body is not None:
        kb, vb = _dequant64(body)
        keys.append(kb[:, :, : int(body_len)])
        values.append(vb[:, :, : int(body_len)])
    keys, values = torch.cat(keys, 2), torch.cat(values, 2)  # [B, Hkv, T, D]
    out = torch.zeros(B, Hq, D, dtype=torch.float64)
    if keys.shape[2] == 0:
        return out
    for h in range(Hq):
        kv = h // (Hq // Hkv)
        s = torch.einsum("bd,btd->bt", q[:, h].double(), keys[:, kv]) * scale
        out[:, h] = torch.einsum("bt,btd->bd", torch.softmax(s, -1), values[:, kv])
    return out


def rel_err(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def _case(seed, B, Hkv, n_rep, D, N, exact_len, use_mask, bits, groups, L, body_len, dtype, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hkv * n_rep, D, generator=gen).to(device, dtype)
    # The exact slots are a view of a bigger buffer along N, as the caches pass them.
    kbuf = torch.randn(B, Hkv, N + 5, D, generator=gen).to(device, dtype)
    vbuf = torch.randn(B, Hkv, N + 5, D, generator=gen).to(device, dtype)
    k, v = kbuf[:, :, 2 : N + 2], vbuf[:, :, 2 : N + 2]
    mask = (torch.rand(N, generator=gen) > 0.3).to(device) if use_mask else None
    el = torch.tensor([exact_len], dtype=torch.int32, device=device)
    body = bl = None
    if bits is not None:
        body = make_body(B, Hkv, L, D, bits, groups, dtype, device, gen)
        bl = torch.tensor([body_len], dtype=torch.int64, device=device)
    return q, k, v, el, mask, body, bl


CPU_CASES = [
    # B, Hkv, n_rep, D, N, exact_len, mask, bits, groups (key, value; one number: both), L, body_len
    (2, 2, 1, 64, 50, 37, False, None, 0, 0, 0),
    (1, 3, 3, 64, 100, 100, True, None, 0, 0, 0),
    (2, 2, 4, 128, 70, 61, True, 8, 32, 96, 77),
    (1, 2, 4, 64, 30, 30, False, 4, (64, 16), 192, 150),
    (1, 2, 4, 64, 30, 30, False, "fp8", 1, 96, 61),
    (1, 3, 3, 64, 33, 5, False, 4, 32, 128, 96),
    (2, 1, 4, 128, 20, 20, True, 4, 16, 64, 50),
    (1, 2, 1, 128, 40, 0, False, 2, 64, 192, 130),
    (1, 1, 3, 64, 10, 3, True, 2, 32, 64, 64),
]


@pytest.mark.parametrize("case", CPU_CASES)
def test_reference_matches_float64(case):
    args = _case(CPU_CASES.index(case), *case, dtype=torch.float32)
    out = decode_attention_reference(*args)
    assert out.dtype == torch.float32 and out.shape == args[0].shape
    assert rel_err(out, oracle(*args)) < 1e-5


@pytest.mark.parametrize("case", CPU_CASES[2:4])
def test_wrapper_on_cpu_is_reference_bf16(case):
    args = _case(7, *case, dtype=torch.bfloat16)
    out = decode_attention(*args)  # CPU dispatch -> reference, through the custom op
    assert out.dtype == torch.bfloat16
    assert rel_err(out, oracle(*args)) < 1e-2


def test_sm_scale_and_nothing_valid():
    q, k, v, el, mask, body, bl = _case(3, 1, 2, 3, 64, 16, 9, False, 8, 0, 32, 20, torch.float32)
    out = decode_attention(q, k, v, el, None, body, bl, sm_scale=0.3)
    assert rel_err(out, oracle(q, k, v, el, None, body, bl, 0.3)) < 1e-5
    k[:, :, 0] = float("nan")  # an ignored slot must not leak NaN
    empty = decode_attention(q, k, v, torch.tensor([0]), torch.zeros(16, dtype=torch.bool))
    assert torch.isfinite(empty).all()


def test_no_exact_len_means_every_slot():
    """exact_len None (the sink/window caches: the mask alone says which slots count)."""
    q, k, v, el, mask, body, bl = _case(6, 2, 2, 2, 64, 24, 24, True, 8, 0, 32, 20, torch.float32)
    out = decode_attention(q, k, v, None, mask, body, bl)
    assert rel_err(out, oracle(q, k, v, torch.tensor([24]), mask, body, bl)) < 1e-5


def test_bad_arguments_are_reported():
    q, k, v, el, mask, body, bl = _case(4, 1, 2, 2, 64, 16, 9, False, 4, 32, 64, 40, torch.float32)
    with pytest.raises(ValueError, match="Hq"):
        decode_attention(q[:, :3], k, v, el)
    with pytest.raises(ValueError, match="body_len"):
        decode_attention(q, k, v, el, None, body, None)
    with pytest.raises(ValueError, match="exact_mask"):
        decode_attention(q, k, v, el, torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="v_scale"):
        decode_attention(q, k, v, el, None, body._replace(v_scale=body.v_scale[..., :1]), bl)
    with pytest.raises(ValueError, match="whole blocks of 32 tokens"):  # KIVI's packed bytes token-major
        decode_attention(q, k, v, el, None, body._replace(v_codes=kv_quant.unblock_value_codes(body.v_codes)), bl)
    q, k, v, el, mask, body, bl = _case(4, 1, 2, 2, 64, 16, 9, False, 8, 1, 64, 40, torch.float32)
    with pytest.raises(ValueError, match="whole blocks of 32 tokens"):  # token-major rows, not blocks
        decode_attention(q, k, v, el, None, body._replace(v_codes=kv_quant.unblock_value_codes(body.v_codes)), bl)


def test_custom_op_registration():
    q, k, v, el, mask, body, bl = _case(5, 1, 2, 2, 64, 16, 9, True, 4, 32, 64, 40, torch.float32)
    args = (q, k, v, el, mask, 4, 32, 32, False, *body.tensors(), bl, 0.125)
    torch.library.opcheck(torch.ops.kvcache.decode_attention.default, args,
                          test_utils=("test_schema", "test_faketensor"))


# ---------------------------------------------------------------------------------------------
# CPU: the kernels under the Triton interpreter (TRITON_INTERPRET=1, set by conftest.py), where
# triton is installed and there is no GPU; CI runs these. The 8-bit formats run their portable
# conversions (the interpreter cannot run inline PTX); the triton_interpreter fixture patches the
# interpreter's arithmetic to the GPU's.
# ---------------------------------------------------------------------------------------------

interp = pytest.mark.skipif(CUDA or triton_missing(), reason="interpreter check: CPU only, needs triton")


INTERP_CASES = [
    # B, Hkv, n_rep, D, N, exact_len, mask, bits, groups (key, value; one number: both), L, body_len
    (2, 2, 4, 128, 300, 201, False, None, 0, 0, 0),
    (1, 2, 4, 128, 40, 33, True, 4, (128, 32), 384, 300),
    (1, 1, 3, 64, 20, 9, False, 2, (64, 16), 256, 200),
    (1, 3, 3, 64, 100, 100, True, None, 0, 0, 0),
    (2, 2, 4, 128, 40, 33, True, 8, 1, 256, 203),
    (1, 1, 3, 64, 20, 20, False, 8, 1, 128, 1),
    (2, 2, 4, 128, 40, 33, True, "fp8", 1, 256, 203),
    (1, 1, 1, 64, 20, 0, False, "fp8", 1, 192, 130),
    (1, 2, 4, 128, 40, 33, True, 4, 32, 256, 203),
    (2, 1, 3, 64, 20, 20, False, 4, 32, 128, 97),
    (1, 2, 1, 128, 24, 17, True, 2, 32, 192, 150),
    (1, 1, 4, 64, 20, 9, False, 2, 64, 256, 229),
    (1, 1, 4, 128, 20, 9, True, 4, 128, 384, 301),
    (1, 2, 4, 128, 40, 33, True, 4, (256, 32), 768, 600),  # key groups of 8 tiles: the fold every eighth
    (1, 2, 3, 128, 20, 11, False, 2, 128, 256, 255),
    (1, 1, 4, 128, 20, 9, False, 4, 16, 128, 77),
    (1, 1, 3, 128, 20, 9, True, 2, 16, 128, 113),
    (1, 1, 4, 64, 20, 9, False, 2, 16, 96, 45),
    (1, 1, 12, 64, 20, 9, False, 4, (128, 32), 256, 200),  # a GQA group of 12: 16 columns in the KIVI kernel
]


@interp
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("case", INTERP_CASES)
def test_kernels_interpreted(triton_interpreter, case, dtype):
    """Every format's kernel against the reference, on fresh inputs, output poisoned first."""
    q, k, v, el, mask, body, bl = _case(100 + INTERP_CASES.index(case), *case, dtype=dtype)
    ref = decode_attention_reference(q, k, v, el, mask, body, bl)
    out = torch.full_like(q, float("nan"))
    from decode_kernels import flash_decode

    flash_decode(q, k, v, el, None if mask is None else mask.view(torch.uint8), body, bl,
                             q.shape[-1] ** -0.5, out=out)
    assert torch.isfinite(out).all()
    # fp32 inputs: the dots run in tf32 (as on the GPU), or fp16 for the 8-bit codes, so not 1e-5.
    assert rel_err(out, ref) < 1e-2


@interp
@pytest.mark.parametrize("bits", [None, 8, "fp8", 4])
def test_kernels_interpreted_with_nothing_valid(triton_interpreter, bits):
    """No valid slot and an empty body: zeros, as the reference gives (not just finite values)."""
    q, k, v, el, mask, body, bl = _case(7, 1, 2, 4, 64, 32, 0, False, bits, 32 if bits == 4 else 1, 64, 0, torch.float32)
    out = torch.full_like(q, float("nan"))
    from decode_kernels import flash_decode

    flash_decode(q, k, v, el, None, body, bl, 0.125, out=out)
    ref = decode_attention_reference(q, k, v, el, None, body, bl)
    assert torch.equal(ref, torch.zeros_like(ref)) and torch.equal(out, ref)


def test_split_plan():
    """The static split counts (plan_splits, llama-3-8b's 8 KV heads, an H200's 132 SMs): at
    least MIN_SPLIT (a quantized body) or EXACT_MIN_SPLIT (the exact slots alone) tokens of
    capacity per split, unless that leaves the GPU under FILL_WARPS_PER_SM warps per SM; never
    more than the waves' target, never less than a tile."""
    from decode_kernels import EXACT_MIN_SPLIT, FILL_WARPS_PER_SM, MIN_SPLIT, plan_splits

    assert (MIN_SPLIT, EXACT_MIN_SPLIT, FILL_WARPS_PER_SM) == (1024, 2048, 8)  # the values the figures below assume
    # int8 (one-warp programs, 16 waves), batch 1: 1024-token splits of a 128K body would be 1024
    # one-warp programs, under eight per SM: the fill rule makes it 132 splits of ~993 tokens
    # (the waves' target is 264); the 49 exact slots behind it (EXACT_BLOCK_N = 16-token tiles in
    # the body's launch) one tile per split.
    assert plan_splits(8, [131072, 49], [32, 16], 1, 132, 16, MIN_SPLIT) == [132, 4]
    # batch 1, an 8K body: 1024-token splits would be 8 programs per KV head, 64 one-warp
    # programs on 132 SMs; the fill rule cuts 8K into 132 splits of ~62 tokens (1056 warps in all).
    assert plan_splits(8, [8192, 49], [32, 16], 1, 132, 16, MIN_SPLIT) == [132, 4]
    # batch 8 / 32K: the waves' target (33) and MIN_SPLIT (32) agree.
    assert plan_splits(64, [32768, 49], [32, 16], 1, 132, 16, MIN_SPLIT) == [32, 4]
    # bf16 alone (four-warp programs, 8 waves): batch 1 / 128K 64 splits of 2048 tokens (with
    # MIN_SPLIT, 128); batch 8 / 32K 16 (the waves' target is 17; 4096-token splits, 8, ran the
    # whole step 4% slower).
    assert plan_splits(8, [131072], [64], 4, 132, 8, EXACT_MIN_SPLIT) == [64]
    assert plan_splits(8, [131072], [64], 4, 132, 8, MIN_SPLIT) == [128]
    assert plan_splits(64, [32768], [64], 4, 132, 8, EXACT_MIN_SPLIT) == [16]
    # A cache sized for its own length (generate.py): the fill rule decides, as before.
    assert plan_splits(8, [8192], [64], 4, 132, 8, EXACT_MIN_SPLIT) == plan_splits(8, [8192], [64], 4, 132, 8, MIN_SPLIT) == [33]
    # A few tokens: one tile per split at the least.
    assert plan_splits(8, [64], [32], 1, 132, 16, MIN_SPLIT) == [2]
    # The exact slots behind a body: one tile per split, at most EXACT_SPLITS (int4's 176 would be
    # 11 tiles, int2's 80 five).
    assert plan_splits(8, [131072, 176], [32, 16], 1, 132, 16, MIN_SPLIT) == [132, 8]
    assert plan_splits(64, [32768, 80], [32, 16], 1, 132, 16, MIN_SPLIT) == [32, 5]


@interp
@pytest.mark.parametrize("bits", [None, 8, 4])
def test_many_splits_for_a_short_length_interpreted(triton_interpreter, monkeypatch, bits):
    """A grid planned for many more splits than the current length fills (the cache sized for
    more than it holds, as in the decode step): the splits cut the length, those past it stay
    empty, and the combine skips them."""
    import decode_kernels
    from decode_kernels import flash_decode

    monkeypatch.setattr(decode_kernels, "MIN_SPLIT", 32)  # 16 one-tile splits planned for 512 tokens
    monkeypatch.setattr(decode_kernels, "EXACT_MIN_SPLIT", 32)
    monkeypatch.setattr(decode_kernels, "FILL_WARPS_PER_SM", 0)
    q, k, v, el, mask, body, bl = _case(21, 1, 2, 4, 128, 512, 45, False, bits, 32 if bits == 4 else 1, 512, 301,
                                        torch.float32)
    ref = decode_attention_reference(q, k, v, el, mask, body, bl)
    out = torch.full_like(q, float("nan"))
    flash_decode(q, k, v, el, None, body, bl, q.shape[-1] ** -0.5, out=out)
    assert rel_err(out, ref) < 1e-2


@interp
@pytest.mark.parametrize("bits,groups", [(8, 1), ("fp8", 1), (4, (128, 32)), (4, (64, 32)), (2, 32)])
def test_tiles_in_a_rotated_order_interpreted(triton_interpreter, monkeypatch, bits, groups):
    """Each program visits its tiles from a hashed start and wraps around (tile_order): 160-token
    splits of a 1000-token body, five tiles each, for the 8-bit formats and int2's one-tile key
    groups; a KIVI split of longer key groups holds whole groups (two of 128 tokens, three of 64)
    and visits them from a hashed one, each group's tiles in order and its scales folded into q
    once, the wrap included; the last group ends inside a tile."""
    import decode_kernels
    from decode_kernels import flash_decode

    monkeypatch.setattr(decode_kernels, "MIN_SPLIT", 160)  # 7 splits of the 1024-token capacity
    monkeypatch.setattr(decode_kernels, "FILL_WARPS_PER_SM", 0)
    q, k, v, el, mask, body, bl = _case(5, 1, 2, 4, 64, 40, 33, False, bits, groups, 1024, 1000, torch.float32)
    ref = decode_attention_reference(q, k, v, el, mask, body, bl)
    out = torch.full_like(q, float("nan"))
    flash_decode(q, k, v, el, None, body, bl, q.shape[-1] ** -0.5, out=out)
    assert rel_err(out, ref) < 1e-2


class GridSpy:
    """Stands in for a Triton kernel and records the grid of each launch."""

    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


@interp
@pytest.mark.parametrize("bits,N,exact_len,use_mask,kernel,grid", [
    # One launch: the body's one split (its 256 tokens of capacity), then 8 splits of the exact
    # slots (one EXACT_BLOCK_N-token tile each would be 38 and 19)
    (8, 600, 590, True, "decode_kernels.body_and_exact_partial_kernel", (2, 1 + 8)),
    (4, 300, 70, False, "decode_kernels_kivi.kivi_and_exact_partial_kernel", (2, 1 + 8)),
])
def test_exact_slots_behind_a_body_one_tile_per_split_interpreted(triton_interpreter, monkeypatch, bits, N, exact_len,
                                                                   use_mask, kernel, grid):
    """The exact slots behind a body run one tile per split, at most EXACT_SPLITS (the plan alone,
    sized by the body's capacity, gives them one split here), as the last splits of the body's
    launch; splits past the exact length stay empty."""
    import decode_kernels
    import decode_kernels_kivi
    from decode_kernels import flash_decode

    monkeypatch.setattr(decode_kernels, "FILL_WARPS_PER_SM", 0)
    modules = {"decode_kernels": decode_kernels, "decode_kernels_kivi": decode_kernels_kivi}
    spies = {}
    for name in ("decode_kernels.token_partial_kernel", "decode_kernels.body_and_exact_partial_kernel",
                 "decode_kernels_kivi.kivi_and_exact_partial_kernel"):
        module, fn = name.split(".")
        spies[name] = GridSpy(getattr(modules[module], fn))
        monkeypatch.setattr(modules[module], fn, spies[name])
    q, k, v, el, mask, body, bl = _case(22 + bits, 1, 2, 4, 64, N, exact_len, use_mask, bits, 32 if bits == 4 else 1,
                                        256, 201, torch.float32)
    ref = decode_attention_reference(q, k, v, el, mask, body, bl)
    out = torch.full_like(q, float("nan"))
    flash_decode(q, k, v, el, None if mask is None else mask.view(torch.uint8), body, bl, q.shape[-1] ** -0.5, out=out)
    assert {name: spy.grids for name, spy in spies.items()} == {name: [grid] if name == kernel else [] for name in spies}
    assert rel_err(out, ref) < 1e-2


KIVI_TILES = [
    # bits, (key group, value group), (BLOCK_N, num_warps): the earlier 32-channel value groups and
    # the shipped 64-channel ones on the shipped tile, the tile across warps, value groups wider
    # than a plane and four to a plane, key groups of half a tile (a tile of 16 tokens: half a
    # block of value codes)
    (4, (128, 32), (32, 1)),
    (4, (128, 64), (32, 1)),
    (4, (128, 32), (32, 4)),
    (2, (32, 32), (32, 1)),
    (2, (32, 64), (32, 1)),
    (2, (64, 64), (32, 2)),
    (4, (32, 16), (32, 1)),
    (4, (16, 128), (16, 1)),
]


def skewed_kivi_body(gen, B, Hkv, L, D, bits, kg, vg, dtype):
    """A KIVI body whose key scales and zeros differ widely from key group to key group and whose
    value scales and zeros differ from token to token: parameters read for the wrong tile, group
    or token move the output far past the tolerance."""
    n_groups = L // kg
    k_mul = (torch.rand(n_groups, generator=gen) * 3 + 0.2).repeat_interleave(kg)[:, None]  # [L, 1]
    k_add = (torch.randn(B, Hkv, n_groups, D, generator=gen) * 3).repeat_interleave(kg, dim=2)  # [B, Hkv, L, D]
    k = torch.randn(B, Hkv, L, D, generator=gen) * k_mul + k_add
    v_mul = torch.rand(L, 1, generator=gen) * 3 + 0.1
    v_add = (torch.randn(B, Hkv, L, D // vg, generator=gen) * 2).repeat_interleave(vg, dim=-1)
    v = torch.randn(B, Hkv, L, D, generator=gen) * v_mul + v_add
    return quantize_kivi(k, v, bits, kg, vg, dtype)


def _check_kivi_tiles(monkeypatch, kivi, device):
    """The KIVI kernel with a tile (BLOCK_N, warps) against the reference on a skewed body (NaN
    value parameters past the length)."""
    import decode_kernels
    from decode_kernels import flash_decode

    bits, (kg, vg), (block_n, warps) = kivi
    # Four splits of 192 tokens (of whole key groups: 256 with 128-token groups, so three), each
    # crossing a key group boundary; the last ends inside a group and inside a tile.
    D, L, body_len = 128, 768, 700
    monkeypatch.setitem(decode_kernels.CONFIGS, (f"int{bits}", D), (block_n, warps, 3, 16))
    monkeypatch.setattr(decode_kernels, "MIN_SPLIT", 192)
    monkeypatch.setattr(decode_kernels, "FILL_WARPS_PER_SM", 0)  # splits of MIN_SPLIT, however few
    monkeypatch.setattr(decode_kernels, "_sm_count", lambda device: 132)  # the same splits on every GPU
    gen = torch.Generator().manual_seed(KIVI_TILES.index(kivi))
    q = torch.randn(1, 8, D, generator=gen).to(device, torch.bfloat16)
    k, v = (torch.randn(1, 2, 16, D, generator=gen).to(device, torch.bfloat16) for _ in range(2))
    body = skewed_kivi_body(gen, 1, 2, L, D, bits, kg, vg, torch.bfloat16)
    body.v_scale[:, :, body_len:] = float("nan")  # past the length: never to be read unmasked
    body.v_zero[:, :, body_len:] = float("nan")
    body = body.with_tensors(t.to(device) for t in body.tensors())
    el = torch.tensor([9], dtype=torch.int32, device=device)
    bl = torch.tensor([body_len], device=device)
    ref = decode_attention_reference(q, k, v, el, None, body, bl)
    out = torch.full_like(q, float("nan"))
    flash_decode(q, k, v, el, None, body, bl, D ** -0.5, out=out)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < 1e-2


def kivi_tile_id(case):
    bits, (kg, vg), (block_n, warps) = case
    return f"int{bits}-g{kg}x{vg}-n{block_n}w{warps}"


@interp
@pytest.mark.parametrize("kivi", KIVI_TILES, ids=kivi_tile_id)
def test_kivi_tiles_interpreted(triton_interpreter, monkeypatch, kivi):
    """Each KIVI tile under the interpreter (the portable arithmetic)."""
    _check_kivi_tiles(monkeypatch, kivi, "cpu")


def _check_rising_scores(monkeypatch, bits, groups, device):
    """A body whose scores rise along the tokens, slowly (a few units per tile, below KIVI's
    lazy-rescale threshold until they add up) and then in one jump of about 40, and, for the 8-bit
    formats, whose values grow 1e5-fold and then shrink to 1e-5 of their start (the 8-bit
    kernel's product scale must follow them, or fp16 overflows), read by one split per head: KIVI's
    running max moves late and seldom (the lazy max of decode_kernels_kivi.kivi_partial), and the
    output must still match the float64 oracle on the same codes."""
    import decode_kernels
    from decode_kernels import flash_decode

    monkeypatch.setattr(decode_kernels, "MIN_SPLIT", 1 << 30)  # one split per KV head
    monkeypatch.setattr(decode_kernels, "EXACT_MIN_SPLIT", 1 << 30)
    monkeypatch.setattr(decode_kernels, "FILL_WARPS_PER_SM", 0)
    gen = torch.Generator().manual_seed(31)
    B, Hkv, n_rep, D, L, body_len = 1, 2, 4, 128, 512, 480
    q = torch.randn(B, Hkv * n_rep, D, generator=gen)
    u = q.view(B, Hkv, n_rep, D).sum(2)  # [B, Hkv, D]: raises every query head's score of its KV head
    u = u / u.norm(dim=-1, keepdim=True)
    t = torch.arange(L, dtype=torch.float32)
    rise = 0.6 * t / 32 + 40.0 * (t >= 400)  # in units of q.u / sqrt(D): roughly log2 units per tile
    k = torch.randn(B, Hkv, L, D, generator=gen) * 0.5 + rise[None, None, :, None] * u[:, :, None, :] * 2.5
    v = torch.randn(B, Hkv, L, D, generator=gen)
    if bits in (8, "fp8"):  # (KIVI's P times a value scale is fp16: no such range there)
        v = v * torch.where(t < 160, 1.0, torch.where(t < 320, 1e5, 1e-5))[None, None, :, None]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if bits in (8, "fp8"):
        quantize = kv_quant.quantize_fp8_per_token if bits == "fp8" else kv_quant.quantize_symmetric_per_token
        (kc, ks), (vc, vs) = quantize(k, dtype), quantize(v, dtype)
        body = QuantizedBody(8, 0, 0, kc, ks, None, kv_quant.block_value_codes(vc), vs, None, fp8=bits == "fp8")
    else:
        body = quantize_kivi(k, v, bits, *groups, dtype)
    q, ek, ev = (x.to(dtype) for x in (q, torch.randn(B, Hkv, 16, D, generator=gen), torch.randn(B, Hkv, 16, D, generator=gen)))
    el = torch.tensor([16], dtype=torch.int32)
    bl = torch.tensor([body_len])
    ref = oracle(q, ek, ev, el, None, body, bl)
    body = body._replace(**{f: getattr(body, f).to(device) for f in ("k_codes", "k_scale", "v_codes", "v_scale")},
                         **{f: getattr(body, f).to(device) for f in ("k_zero", "v_zero") if getattr(body, f) is not None})
    q, ek, ev, el, bl = (x.to(device) for x in (q, ek, ev, el, bl))
    out = torch.full_like(q, float("nan"))
    flash_decode(q, ek, ev, el, None, body, bl, D ** -0.5, out=out)
    assert rel_err(out.cpu(), ref) < 1e-2


RISING = [(8, 0), ("fp8", 0), (4, (128, 64)), (2, (32, 64))]  # (bits, KIVI groups)


@interp
@pytest.mark.parametrize("bits,groups", RISING)
def test_scores_rising_late_interpreted(triton_interpreter, monkeypatch, bits, groups):
    _check_rising_scores(monkeypatch, bits, groups, "cpu")


# ---------------------------------------------------------------------------------------------
# GPU: the Triton kernel against the reference
# ---------------------------------------------------------------------------------------------

gpu = pytest.mark.skipif(not CUDA, reason="needs CUDA (the Triton kernel)")

GPU_SHAPES = [(3, 3, 64), (8, 4, 128)]  # (Hkv, n_rep, D): the default model, Llama-3-8B
GPU_BODY = [(None, 0), (8, 1), ("fp8", 1), (4, 32), (4, 128), (4, (128, 32)), (4, (128, 64)), (2, 32), (2, 64), (2, (32, 64))]  # (bits, groups)


def fit_groups(groups, D):
    """(key group, value group) with the value group no wider than the head."""
    kg, vg = groups if isinstance(groups, tuple) else (groups, groups)
    return kg, min(vg, D)


def _gpu_compare(case):
    from decode_kernels import flash_decode

    torch.manual_seed(0)
    q, k, v, el, mask, body, bl = _case(*case, dtype=torch.bfloat16, device="cuda")
    ref = decode_attention_reference(q, k, v, el, mask, body, bl)
    out = torch.full_like(q, float("nan"))  # poisoned: every element must be written
    flash_decode(q, k, v, el, None if mask is None else mask.view(torch.uint8), body, bl, q.shape[-1] ** -0.5, out=out)
    assert torch.isfinite(out).all()
    err = rel_err(out, ref)
    assert err < 1e-2, err
    public = decode_attention(q, k, v, el, mask, body, bl)  # the dispatching op, same launches
    assert public.dtype == q.dtype and torch.equal(public, out)
    return err


@gpu
@pytest.mark.parametrize("B", [1, 8])
@pytest.mark.parametrize("length", [1, 37, 1000, 4097])
@pytest.mark.parametrize("shape", GPU_SHAPES)
@pytest.mark.parametrize("use_mask", [False, True])
def test_kernel_exact_only(B, length, shape, use_mask):
    Hkv, n_rep, D = shape
    N = length + 100 if not use_mask else max(length, 64)
    el = length if not use_mask else N
    _gpu_compare((length, B, Hkv, n_rep, D, N, el, use_mask, None, 0, 0, 0))


@gpu
@pytest.mark.parametrize("B", [1, 8])
@pytest.mark.parametrize("length", [1, 37, 1000, 4097])
@pytest.mark.parametrize("shape", GPU_SHAPES)
@pytest.mark.parametrize("body", GPU_BODY[1:])
def test_kernel_with_body(B, length, shape, body):
    Hkv, n_rep, D = shape
    bits, g = body
    L = math.ceil((length + 1) / 128) * 128 + 128  # capacity past the valid prefix
    use_mask = length % 2 == 1
    _gpu_compare((length, B, Hkv, n_rep, D, 96, 45 if use_mask else 96, use_mask, bits, fit_groups(g, D), L, length))


@gpu
@pytest.mark.parametrize("switch", ["KIVI_ASM", "CONVERT_ASM"])
@pytest.mark.parametrize("body", [(4, 32), (2, 32), (4, 128), (2, 128), (4, 64), (4, 16), (4, (128, 32)), (8, 1),
                                  ("fp8", 1)])
@pytest.mark.parametrize("shape", GPU_SHAPES)
def test_kernel_portable_paths(shape, body, switch, monkeypatch):
    """Each switch off: the plain-cast paths (the interpreter's, an A100's fp8), KIVI's unpacking
    with plain ops."""
    import decode_kernels

    monkeypatch.setattr(decode_kernels, switch, False)
    if switch == "CONVERT_ASM" or body[0] in (4, 2):
        Hkv, n_rep, D = shape
        bits, g = body
        _gpu_compare((3, 8, Hkv, n_rep, D, 96, 45, True, bits, fit_groups(g, D), 4224, 4097))


@gpu
@pytest.mark.parametrize("kivi", KIVI_TILES, ids=kivi_tile_id)
def test_kivi_tiles(monkeypatch, kivi):
    """Each KIVI tile on the GPU (the PTX)."""
    _check_kivi_tiles(monkeypatch, kivi, "cuda")


@gpu
@pytest.mark.parametrize("bits,groups", RISING)
def test_scores_rising_late(monkeypatch, bits, groups):
    _check_rising_scores(monkeypatch, bits, groups, "cuda")


@gpu
@pytest.mark.parametrize("bits", [8, "fp8", 4])
def test_kernel_ignores_slots_past_length(bits):
    g = 32 if bits == 4 else 1
    q, k, v, el, mask, body, bl = _case(11, 2, 8, 4, 128, 512, 300, False, bits, g, 1024, 500, torch.bfloat16, "cuda")
    ref = decode_attention_reference(q, k, v, el, mask, body, bl)
    k[:, :, 300:] = float("nan")
    v[:, :, 300:] = float("nan")
    body.v_scale[:, :, 500:] = float("nan")
    body.k_scale[:, :, 500 // g:] = float("nan") if bits != 4 else body.k_scale[:, :, 500 // g:]
    out = decode_attention(q, k, v, el, mask, body, bl)
    assert rel_err(out, ref) < 1e-2
    nothing = decode_attention(q, k, v, torch.zeros_like(el), None)
    assert torch.equal(nothing, torch.zeros_like(nothing))


@gpu
@pytest.mark.parametrize("bits", [None, 8, "fp8", 2])
def test_cuda_graph_replay_sees_length_grow(bits):
    q, k, v, el, mask, body, bl = _case(12, 8, 8, 4, 128, 4096, 100, False, bits, 32, 8192, 1000, torch.bfloat16, "cuda")
    if bl is None:
        bl = torch.zeros(1, dtype=torch.int64, device="cuda")
    static_out = decode_attention(q, k, v, el, None, body, bl if body else None)  # warm up / compile
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = decode_attention(q, k, v, el, None, body, bl if body else None)
    for e, b in [(100, 1000), (1001, 4500), (4096, 8192)]:
        el.fill_(e)
        bl.fill_(b)
        q.copy_(torch.randn_like(q))
        graph.replay()
        ref = decode_attention_reference(q, k, v, el, None, body, bl if body else None)
        assert rel_err(static_out, ref) < 1e-2, (e, b)


@gpu
def test_torch_compile_reduce_overhead():
    q, k, v, el, mask, body, bl = _case(13, 4, 3, 3, 64, 2048, 10, False, 4, 32, 4096, 64, torch.bfloat16, "cuda")

    @torch.compile(fullgraph=True, mode="reduce-overhead")
    def step(q, el, bl):
        return decode_attention(q * 1.0, k, v, el, None, body, bl) + 0.0

    for e, b in [(10, 64), (11, 96), (700, 2048), (2048, 4095), (5, 4096)]:
        el.fill_(e)
        bl.fill_(b)
        out = step(q, el, bl).clone()
        ref = decode_attention_reference(q, k, v, el, None, body, bl)
        assert rel_err(out, ref) < 1e-2, (e, b)
