"""ring_append: the GPU decode step's cache write (one kernel per layer).

On the CPU (CI): the PyTorch reference equals what the caches' own PyTorch update does, bit for
bit, and the caches' kernel path (ring_append + decode_attention, served on the CPU by their
references) gives the same logits as the PyTorch path, eager and compiled. On CUDA (the
device): the Triton kernel equals the reference bit for bit (the same IEEE divisions and
round-half-even; no tolerance needed) on fresh random buffers, through the sink, the first
eviction and many ring wraps.
"""
import pytest
import torch

import kv_quant
import ring_append
from kv_quant import QuantizedBody
from model import PRESETS
from rope import precompute_freqs_cis
from strategies import cache_factory
from tests.helpers import VOCAB, compress, quantize, run, tiny_model, triton_missing

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def snapshot(cache):
    return {name: buf.clone() for name, buf in cache.named_buffers()}


def read_rows(cache, name, buf):
    """What a cache buffer holds that is ever read: not the trash slot, the trash group (of tokens,
    or of KIVI key parameter rows) or the rows that round a body up to whole blocks of value codes."""
    if name.startswith("exact"):
        return buf[:, :, :cache.trash_slot]
    if name in ("k_scale", "k_zero") and cache.bits != 8:
        return buf[:, :, :cache.n_groups]
    return kv_quant.token_rows(buf, torch.arange(cache.n_groups * cache.evict_block))


REFERENCE_SETTINGS = {
    "compress": compress(4, 8), "int8": quantize(4, 8, 8), "int8-s3w5": quantize(3, 5, 8), "fp8": quantize(4, 8, "fp8"),
    "int4-g4": quantize(4, 8, 4, 4), "int4-s3w5-g8": quantize(3, 5, 4, 8), "int2-g8": quantize(4, 8, 2, 8),
    "int2-g16": quantize(4, 8, 2, 16), "int4-k8-v4": quantize(4, 8, 4, 8, 4), "int2-k4-v8": quantize(3, 5, 2, 4, 8),
}


@pytest.mark.parametrize("settings", REFERENCE_SETTINGS.values(), ids=REFERENCE_SETTINGS.keys())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_equals_cache_update(settings, dtype):
    """Each decode step, from the cache's real state: the reference's buffers and validity are the
    PyTorch update's exactly (through many completed KIVI groups and ring wraps)."""
    torch.manual_seed(0)
    model = tiny_model().to(dtype)
    model.setup_caches(2, 128, cache_factory(settings))
    cache = model.layers[0].attention.kv_cache
    h, d = cache.exact_k.shape[1], cache.exact_k.shape[3]
    cache.update(torch.arange(3), torch.randn(2, h, 3, d, dtype=dtype), torch.randn(2, h, 3, d, dtype=dtype))
    for p in range(3, 128):
        pos = torch.tensor([p])
        k, v = torch.randn(2, h, 1, d, dtype=dtype), torch.randn(2, h, 1, d, dtype=dtype)
        bufs = snapshot(cache)
        cache.update(pos, k, v)
        body = None
        if "k_codes" in bufs:
            body = cache.body(2).with_tensors(bufs.get(n) for n in ("k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero"))
        valid, body_len = ring_append.ring_append(pos, k[:, :, 0], v[:, :, 0], bufs["exact_k"], bufs["exact_v"],
                                                  cache.sink_size, cache.window_size, cache.evict_block, body)
        for name, buf in cache.named_buffers():
            assert torch.equal(read_rows(cache, name, bufs[name]), read_rows(cache, name, buf)), (p, name)
        assert torch.equal(valid, cache.exact_slot_positions(pos[0]) >= 0), p
        assert int(body_len) == int(cache.n_evicted(pos)), p


@pytest.mark.parametrize("settings", [{"strategy": "full"}, compress(4, 8), compress(4, 8, "original"), quantize(4, 8, 8),
                                      quantize(4, 8, "fp8"),
                                      quantize(4, 8, 4), quantize(4, 8, 2), quantize(3, 5, 2, 16)],
                         ids=lambda s: "-".join(map(str, s.values())))
def test_kernel_path_equals_pytorch_path(settings):
    """The caches' GPU decode path on the CPU (ring_append, rotate_and_write and decode_attention
    serve it with their references). Tolerance: fp32 both ways; they differ in summation order only (fp32 einsum
    softmax vs SDPA), ~1e-6 on logits of size ~1."""
    model = tiny_model()
    tokens = torch.randint(0, VOCAB, (2, 90))
    chunks = [20] + [1] * 70
    want = run(model, tokens, settings, chunks, decode_kernels=False)
    got = run(model, tokens, settings, chunks, decode_kernels=True)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("settings", [{"strategy": "full"}, quantize(4, 8, 8), quantize(4, 8, 4, 16)],
                         ids=["full", "int8", "int4"])
def test_compiled_kernel_path_is_one_graph(settings):
    """The mutating custom op compiles fullgraph, once, and the compiled steps match eager."""
    model = tiny_model()
    tokens = torch.randint(0, VOCAB, (1, 64))  # int4: three groups complete
    want = run(model, tokens, settings, [4] + [1] * 60, decode_kernels=True)

    model.setup_caches(1, 64, cache_factory(settings, decode_kernels=True))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    step = torch.compile(lambda x, pos: model(x, pos), fullgraph=True)
    got = []
    with torch.no_grad():
        got.append(model(tokens[:, :4], torch.arange(4)))
        pos = torch.tensor([4])
        for p in range(4, 64):
            got.append(step(tokens[:, p : p + 1], pos).clone())
            pos += 1
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    torch.testing.assert_close(torch.cat(got, dim=1), want, atol=1e-4, rtol=0)


def random_body(bits, B, Hkv, L, D, G, dtype, device):
    """A body of L tokens with random contents (what the kernel must leave alone is poisoned too)."""
    if bits in (8, "fp8"):
        if bits == "fp8":
            codes = lambda: torch.randn(B, Hkv, L, D, device=device).mul(50).to(torch.float8_e4m3fn).view(torch.uint8)  # noqa: E731
        else:
            codes = lambda: torch.randint(-127, 128, (B, Hkv, L, D), dtype=torch.int8, device=device)  # noqa: E731
        scales = lambda: torch.rand(B, Hkv, L, 1, device=device).to(dtype)  # noqa: E731
        return QuantizedBody(8, 0, 0, codes(), scales(), None, kv_quant.block_value_codes(codes()), scales(), None,
                             fp8=bits == "fp8")
    codes = lambda: torch.randint(0, 256, (B, Hkv, L, D * bits // 8), dtype=torch.uint8, device=device)  # noqa: E731
    param = lambda n, x: torch.randn(B, Hkv, n, x, device=device).to(dtype)  # noqa: E731
    VG = G // 2 if G >= 8 else G  # values grouped apart from keys
    return QuantizedBody(bits, G, VG, codes(), param(L // G, D), param(L // G, D), kv_quant.block_value_codes(codes()),
                         param(L, D // VG), param(L, D // VG))


@cuda
@pytest.mark.parametrize("n_rep", [None, 4, 3], ids=["rotated", "rope-gqa4", "rope-gqa3"])
@pytest.mark.parametrize("bits", [8, "fp8", 4, 2, None], ids=["int8", "fp8", "int4", "int2", "exact-only"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("B,Hkv,D,sink,window,evict_block",
                         [(1, 8, 128, 4, 32, 1), (3, 2, 64, 16, 24, 1), (2, 4, 128, 4, 24, 32), (3, 2, 64, 16, 24, 16),
                          (1, 8, 128, 16, 32, 128), (1, 8, 128, 16, 32, 256)])
def test_triton_equals_reference(bits, dtype, B, Hkv, D, sink, window, evict_block, n_rep):
    if bits is not None and (bits in (8, "fp8")) != (evict_block == 1):
        pytest.skip("int8 and fp8 evict single tokens, KIVI groups of evict_block")
    check_kernel_against_reference(ring_append._ring_append_op, bits, dtype, B, Hkv, D, sink, window, evict_block, "cuda",
                                   n_rep=n_rep)


def check_kernel_against_reference(kernel, bits, dtype, B, Hkv, D, sink, window, evict_block, device, positions=None,
                                   n_rep=None):
    """Drive `kernel` (ring_append's Triton launch) and the reference from the same fresh random
    buffers through the sink, the first evictions (KIVI: the first groups), ring wraps and later
    groups; every buffer and every output must agree bit for bit. n_rep: queries per kv head, each
    step's q and k rotated in the kernel (at a position's rows of a Llama-3.1-scaled RoPE table);
    None: k comes rotated, no q."""
    torch.manual_seed(1)
    table = precompute_freqs_cis(2048, D, 500000.0, PRESETS["llama-3.1-8b"]["rope_scaling"]).to(device)
    n = sink + window + evict_block
    ek = torch.randn(B, Hkv, n, D, dtype=dtype, device=device) * 3
    ev = torch.randn(B, Hkv, n, D, dtype=dtype, device=device)
    capacity = 1024  # body tokens: the positions below complete no group past it
    body = bits and random_body(bits, B, Hkv, capacity, D, evict_block, dtype, device)
    ek[0, 0, sink + 1] = 0  # an all-zero row: scale 1, codes 0
    first = sink + window + evict_block - 1
    if positions is None:
        positions = list(range(0, first + evict_block + 3)) + list(range(300, 300 + 3 * n, 7))
        positions += [first + m * evict_block for m in range(3, 20) if (m + 1) * evict_block <= capacity]
    for p in positions:
        pos = torch.tensor([p], device=device)
        k = torch.randn(B, Hkv, D, dtype=dtype, device=device)
        v = torch.randn(B, Hkv, D, dtype=dtype, device=device)
        k[0, 0, 0] = v[0, 0, :evict_block] = 0  # keep a zero key channel and value group: scale 1, codes 0
        q = None if n_rep is None else torch.randn(B, Hkv * n_rep, D, dtype=dtype, device=device)
        freqs = None if n_rep is None else table[pos]
        ref_ek, ref_ev = ek.clone(), ev.clone()
        ref_body = body and body.with_tensors(t if t is None else t.clone() for t in body.tensors())
        args = (None,) * 6 + (8, False, 0) if body is None else (*ref_body.tensors(), ref_body.bits, ref_body.fp8,
                                                                  ref_body.value_group)
        want = ring_append.ring_append_reference(pos, q, k, v, freqs, ref_ek, ref_ev, sink, window, evict_block, *args)
        args = (None,) * 6 + (8, False, 0) if body is None else (*body.tensors(), body.bits, body.fp8, body.value_group)
        got = kernel(pos, q, k, v, freqs, ek, ev, sink, window, evict_block, *args)
        assert torch.equal(ek, ref_ek) and torch.equal(ev, ref_ev), p
        for got_t, want_t in zip(body.tensors(), ref_body.tensors()) if body else ():
            assert got_t is None or torch.equal(got_t, want_t), p
        assert all(torch.equal(g, w) for g, w in zip(got, want)), p
        assert n_rep is None or got[0].shape == q.shape, p


@pytest.mark.skipif(torch.cuda.is_available() or triton_missing(), reason="interpreter check: CPU only, needs triton")
@pytest.mark.parametrize("bits,evict_block", [(8, 1), ("fp8", 1), (4, 8), (2, 16), (None, 1)],
                         ids=["int8", "fp8", "int4", "int2", "exact-only"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n_rep", [None, 3], ids=["rotated", "rope-gqa3"])
def test_kernel_interpreted(triton_interpreter, bits, evict_block, dtype, n_rep):
    """The Triton kernel under the interpreter (CI has no GPU), bit for bit as on the GPU."""
    n = 4 + 8 + evict_block
    positions = list(range(0, 4 + 8 + 2 * evict_block + 2)) + [200 + 3 * i for i in range(n)]
    check_kernel_against_reference(ring_append._ring_append_triton, bits, dtype, 2, 2, 32, 4, 8, evict_block, "cpu",
                                   positions, n_rep)


@pytest.mark.skipif(torch.cuda.is_available() or triton_missing(), reason="interpreter check: CPU only, needs triton")
@pytest.mark.parametrize("bits,evict_block", [(4, 16), (2, 8)], ids=["int4", "int2"])
def test_kernel_interpreted_in_chunks(triton_interpreter, monkeypatch, bits, evict_block):
    """A KIVI group quantized a few tokens at a time (ring_append.KIVI_CHUNK below the group: the
    range over every chunk first, then the codes), bit for bit as in one piece."""
    monkeypatch.setattr(ring_append, "KIVI_CHUNK", 4)
    n = 4 + 8 + evict_block
    positions = list(range(0, 4 + 8 + 2 * evict_block + 2)) + [200 + 3 * i for i in range(n)]
    check_kernel_against_reference(ring_append._ring_append_triton, bits, torch.bfloat16, 2, 2, 32, 4, 8, evict_block,
                                   "cpu", positions, 3)


def check_full_write_against_reference(write, dtype, B, Hkv, n_rep, D, L, device):
    """rotate_and_write's kernel launch `write` against its reference from the same fresh random
    caches, at the first and last slots and between, bit for bit (the same roundings)."""
    torch.manual_seed(2)
    table = precompute_freqs_cis(L, D, 500000.0, PRESETS["llama-3.1-8b"]["rope_scaling"]).to(device)
    kc, vc = torch.randn(B, Hkv, L, D, dtype=dtype, device=device), torch.randn(B, Hkv, L, D, dtype=dtype, device=device)
    for p in (0, 1, L // 3, L - 1):
        pos = torch.tensor([p], device=device)
        q = torch.randn(B, Hkv * n_rep, D, dtype=dtype, device=device)
        k, v = torch.randn(B, Hkv, D, dtype=dtype, device=device), torch.randn(B, Hkv, D, dtype=dtype, device=device)
        ref_kc, ref_vc = kc.clone(), vc.clone()
        want, want_len = ring_append.rotate_and_write_reference(pos, q, k, v, table[pos], ref_kc, ref_vc)
        got, got_len = write(pos, q, k, v, table[pos], kc, vc)
        assert torch.equal(got, want) and torch.equal(kc, ref_kc) and torch.equal(vc, ref_vc), p
        assert int(want_len) == int(got_len) == p + 1 and got_len.device == pos.device, p


def full_write_kernel(pos, q, k, v, freqs, kc, vc):
    q_rot, _, length = ring_append._ring_append_triton(pos, q, k, v, freqs, kc, vc, 0, 0, 1, *(None,) * 6, 8, False, 0,
                                                       ring=False)
    return q_rot, length


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("B,Hkv,n_rep,D,L", [(1, 8, 4, 128, 4096), (3, 3, 3, 64, 100)])
def test_full_write_triton_equals_reference(dtype, B, Hkv, n_rep, D, L):
    check_full_write_against_reference(ring_append.rotate_and_write, dtype, B, Hkv, n_rep, D, L, "cuda")


@pytest.mark.skipif(torch.cuda.is_available() or triton_missing(), reason="interpreter check: CPU only, needs triton")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_full_write_interpreted(triton_interpreter, dtype):
    check_full_write_against_reference(full_write_kernel, dtype, 2, 2, 3, 32, 40, "cpu")


def test_bad_arguments():
    ek = torch.zeros(1, 2, 4 + 8 + 1, 16)
    k = torch.zeros(1, 2, 16)
    with pytest.raises(ValueError, match="must be"):
        ring_append.ring_append(torch.tensor([0]), k[:, :1], k[:, :1], ek, ek.clone(), 4, 8, 1)
    with pytest.raises(ValueError, match="exact slots"):
        ring_append.ring_append(torch.tensor([0]), k, k, ek, ek.clone(), 4, 9, 1)
    table = precompute_freqs_cis(8, 16, 10000.0)
    with pytest.raises(ValueError, match="freqs must be one position's fp32 rows"):
        ring_append.rotate_and_append(torch.tensor([0]), torch.zeros(1, 4, 16), k, k, table, ek, ek.clone(), 4, 8, 1)
    with pytest.raises(ValueError, match="Hq a multiple"):
        ring_append.rotate_and_write(torch.tensor([0]), torch.zeros(1, 3, 16), k, k, table[:1], ek, ek.clone())
    ek4 = torch.zeros(1, 2, 4 + 8 + 4, 16)
    for bits, group in ((8, 1), (4, 8)):
        body = random_body(bits, 1, 2, 32, 16, group, torch.float32, "cpu")
        with pytest.raises(ValueError, match="evict_block 4 must be 1 for int8/fp8"):
            ring_append.ring_append(torch.tensor([0]), k, k, ek4, ek4.clone(), 4, 8, 4, body)


@pytest.mark.parametrize("bits,evict_block", [(8, 1), ("fp8", 1), (4, 4), (2, 8)])
def test_custom_op_registration(bits, evict_block):
    """The op declares what it mutates and has a fake (meta) implementation for torch.compile."""
    B, H, D, sink, window = 2, 2, 16, 4, 8
    n = sink + window + evict_block
    ek, ev = torch.randn(B, H, n, D), torch.randn(B, H, n, D)
    body = random_body(bits, B, H, 64, D, evict_block, torch.float32, "cpu")
    table = precompute_freqs_cis(64, D, 10000.0)
    for q, freqs in ((None, None), (torch.randn(B, 2 * H, D), table[27:28])):
        args = (torch.tensor([27]), q, torch.randn(B, H, D), torch.randn(B, H, D), freqs, ek, ev, sink, window,
                evict_block, *body.tensors(), body.bits, body.fp8, body.value_group)
        torch.library.opcheck(torch.ops.kvcache.ring_append.default, args, test_utils=("test_schema", "test_faketensor"))
    args = (torch.tensor([27]), torch.randn(B, 2 * H, D), torch.randn(B, H, D), torch.randn(B, H, D), table[27:28],
            torch.randn(B, H, 40, D), torch.randn(B, H, 40, D))
    torch.library.opcheck(torch.ops.kvcache.rotate_and_write.default, args, test_utils=("test_schema", "test_faketensor"))
