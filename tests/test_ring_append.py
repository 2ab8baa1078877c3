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

import compress_kv
import kv_cache
import quantize_kv
import ring_append
import sink_window
from strategies import cache_factory
from tests.test_caches import VOCAB, compress, quantize, run, tiny_model

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def snapshot(cache):
    return {name: buf.clone() for name, buf in cache.named_buffers()}


@pytest.mark.parametrize("settings", [compress(4, 8), quantize(4, 8, 8), quantize(3, 5, 8)], ids=["compress", "int8", "int8-s3w5"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_equals_cache_update(settings, dtype):
    """Each decode step, from the cache's real state: the reference's buffers and validity are the
    PyTorch update's exactly."""
    torch.manual_seed(0)
    model = tiny_model().to(dtype)
    model.setup_caches(2, 64, cache_factory(settings))
    cache = model.layers[0].attention.kv_cache
    h, d = cache.exact_k.shape[1], cache.exact_k.shape[3]
    cache.update(torch.arange(3), torch.randn(2, h, 3, d, dtype=dtype), torch.randn(2, h, 3, d, dtype=dtype))
    for p in range(3, 60):
        pos = torch.tensor([p])
        k, v = torch.randn(2, h, 1, d, dtype=dtype), torch.randn(2, h, 1, d, dtype=dtype)
        bufs = snapshot(cache)
        cache.update(pos, k, v)
        body = None
        if "k_codes" in bufs:
            body = (bufs["k_codes"], bufs["k_scale"], bufs["v_codes"], bufs["v_scale"])
        valid, body_len = ring_append.ring_append(pos, k[:, :, 0], v[:, :, 0], bufs["exact_k"], bufs["exact_v"],
                                                  cache.sink_size, cache.window_size, cache.evict_block, body)
        for name, buf in cache.named_buffers():  # the trash slot / group is never read
            n = cache.trash_slot if name.startswith("exact") else cache.n_groups * cache.evict_block
            assert torch.equal(bufs[name][:, :, :n], buf[:, :, :n]), (p, name)
        assert torch.equal(valid, cache.exact_slot_positions(pos[0]) >= 0), p
        assert int(body_len) == int(cache.n_evicted(pos)), p


def use_kernel_path(monkeypatch):
    """The caches' GPU decode path on the CPU: ring_append and decode_attention run their
    references."""
    for module in (kv_cache, sink_window, compress_kv, quantize_kv):
        monkeypatch.setattr(module, "use_decode_kernel", lambda x: x.shape[2] == 1)


@pytest.mark.parametrize("settings", [compress(4, 8), compress(4, 8, "original"), quantize(4, 8, 8), quantize(4, 8, 4)],
                         ids=lambda s: "-".join(map(str, s.values())))
def test_kernel_path_equals_pytorch_path(settings, monkeypatch):
    """Tolerance: fp32 both ways; they differ in summation order only (fp32 einsum softmax vs
    SDPA), ~1e-6 on logits of size ~1."""
    model = tiny_model()
    tokens = torch.randint(0, VOCAB, (2, 90))
    chunks = [20] + [1] * 70
    want = run(model, tokens, settings, chunks)
    use_kernel_path(monkeypatch)
    got = run(model, tokens, settings, chunks)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_compiled_kernel_path_is_one_graph(monkeypatch):
    """The mutating custom op compiles fullgraph, once, and the compiled steps match eager."""
    use_kernel_path(monkeypatch)
    model = tiny_model()
    settings = quantize(4, 8, 8)
    tokens = torch.randint(0, VOCAB, (1, 40))
    want = run(model, tokens, settings, [4] + [1] * 36)

    model.setup_caches(1, 40, cache_factory(settings))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    step = torch.compile(lambda x, pos: model(x, pos), fullgraph=True)
    got = []
    with torch.no_grad():
        got.append(model(tokens[:, :4], torch.arange(4)))
        pos = torch.tensor([4])
        for p in range(4, 40):
            got.append(step(tokens[:, p : p + 1], pos).clone())
            pos += 1
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    torch.testing.assert_close(torch.cat(got, dim=1), want, atol=1e-4, rtol=0)


@cuda
@pytest.mark.parametrize("with_body", [True, False], ids=["int8", "exact-only"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("B,Hkv,D,sink,window,evict_block", [(1, 8, 128, 4, 32, 1), (3, 2, 64, 16, 24, 1), (2, 4, 128, 4, 24, 32)])
def test_triton_equals_reference(with_body, dtype, B, Hkv, D, sink, window, evict_block):
    if with_body and evict_block != 1:
        pytest.skip("the kernel quantizes int8 bodies only")
    torch.manual_seed(1)
    n = sink + window + evict_block
    L = 400
    bufs = {
        "ek": torch.randn(B, Hkv, n, D, dtype=dtype, device="cuda") * 3,
        "ev": torch.randn(B, Hkv, n, D, dtype=dtype, device="cuda"),
        "kc": torch.randint(-127, 128, (B, Hkv, L, D), dtype=torch.int8, device="cuda"),
        "ks": torch.rand(B, Hkv, L, 1, device="cuda").to(dtype),
        "vc": torch.randint(-127, 128, (B, Hkv, L, D), dtype=torch.int8, device="cuda"),
        "vs": torch.rand(B, Hkv, L, 1, device="cuda").to(dtype),
    }
    bufs["ek"][0, 0, sink + 1] = 0  # an all-zero row: scale 1, codes 0
    for p in list(range(0, sink + window + 3)) + list(range(300, 300 + 3 * n, 7)):
        pos = torch.tensor([p], device="cuda")
        k = torch.randn(B, Hkv, D, dtype=dtype, device="cuda")
        v = torch.randn(B, Hkv, D, dtype=dtype, device="cuda")
        ref = {n_: t.clone() for n_, t in bufs.items()}
        body = (ref["kc"], ref["ks"], ref["vc"], ref["vs"]) if with_body else None
        want = ring_append.ring_append_reference(pos, k, v, ref["ek"], ref["ev"], sink, window, evict_block, *(body or (None,) * 4))
        body = (bufs["kc"], bufs["ks"], bufs["vc"], bufs["vs"]) if with_body else None
        got = ring_append.ring_append(pos, k, v, bufs["ek"], bufs["ev"], sink, window, evict_block, body)
        for name in bufs:
            assert torch.equal(bufs[name], ref[name]), (p, name)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), p


def test_bad_arguments():
    ek = torch.zeros(1, 2, 4 + 8 + 1, 16)
    k = torch.zeros(1, 2, 16)
    with pytest.raises(ValueError, match="must be"):
        ring_append.ring_append(torch.tensor([0]), k[:, :1], k[:, :1], ek, ek.clone(), 4, 8, 1)
    with pytest.raises(ValueError, match="exact slots"):
        ring_append.ring_append(torch.tensor([0]), k, k, ek, ek.clone(), 4, 9, 1)
    with pytest.raises(ValueError, match="int8 body"):
        ring_append.ring_append(torch.tensor([0]), k, k, torch.zeros(1, 2, 4 + 8 + 4, 16), torch.zeros(1, 2, 16, 16), 4, 8, 4,
                                (None,) * 4)


def test_custom_op_registration():
    """The op declares what it mutates and has a fake (meta) implementation for torch.compile."""
    B, H, D, sink, window = 2, 2, 16, 4, 8
    ek, ev = torch.randn(B, H, sink + window + 1, D), torch.randn(B, H, sink + window + 1, D)
    body = (torch.zeros(B, H, 40, D, dtype=torch.int8), torch.ones(B, H, 40, 1),
            torch.zeros(B, H, 40, D, dtype=torch.int8), torch.ones(B, H, 40, 1))
    args = (torch.tensor([20]), torch.randn(B, H, D), torch.randn(B, H, D), ek, ev, sink, window, 1, *body)
    torch.library.opcheck(torch.ops.kvcache.ring_append.default, args, test_utils=("test_schema", "test_faketensor"))
