"""Cache strategies on a tiny random model in fp32.

Tolerances: two fp32 computations of the same function that differ only in summation order
(chunked vs one-shot attention, SDPA vs einsum) agree to ~1e-6 on logits of size ~1; 1e-4
absolute leaves room for that and nothing else (a wrong mask or position moves logits by >1e-2).
"""
import math

import pytest
import torch

from kv_cache import KVCache
from strategies import cache_factory
from tests.helpers import VOCAB, compress, quantize, run, tiny_model

TOL = 1e-4


FULL = {"strategy": "full"}
ALL_SMALL = [compress(4, 8), compress(4, 8, "original"), quantize(4, 8, 8), quantize(4, 8, "fp8"), quantize(4, 8, 4),
             quantize(4, 8, 2)]


@pytest.mark.parametrize("name", ["tiny", "tiny-mha"])
def test_incremental_decode_matches_one_forward(name):
    model = tiny_model(name)
    tokens = torch.randint(0, VOCAB, (2, 150))
    ref = run(model, tokens, FULL, [150])
    inc = run(model, tokens, FULL, [37] + [1] * 80 + [33])
    torch.testing.assert_close(inc, ref, atol=TOL, rtol=0)


@pytest.mark.parametrize("settings", [compress(4, 200), compress(4, 200, "original"), quantize(4, 200, 8), quantize(4, 200, 4), quantize(4, 200, 2)])
def test_strategies_equal_full_while_text_fits(settings):
    """Nothing is dropped or quantized while length <= sink + window."""
    model = tiny_model()
    tokens = torch.randint(0, VOCAB, (2, 180))
    ref = run(model, tokens, FULL, [180])
    for chunks in ([180], [50] + [1] * 130):
        torch.testing.assert_close(run(model, tokens, settings, chunks, max_seq=256), ref, atol=TOL, rtol=0)


@pytest.mark.parametrize("settings", ALL_SMALL, ids=lambda s: "-".join(map(str, s.values())))
def test_chunked_prefill_equals_token_by_token(settings):
    model = tiny_model()
    tokens = torch.randint(0, VOCAB, (2, 120))
    one_by_one = run(model, tokens, settings, [1] * 120)
    for chunks in ([120], [7] * 17 + [1], [3, 50, 1, 1, 65]):
        torch.testing.assert_close(run(model, tokens, settings, chunks), one_by_one, atol=TOL, rtol=0)


class BruteForceStreamingCache(KVCache):
    """Keeps every token; each query attends to sink + the last `window` tokens only, with
    positions renumbered by cache order as StreamingLLM does (keys un-rotated and re-rotated
    from scratch with complex arithmetic in float64). Independent of sink_window.py: only
    update and attend, as a strategy of one's own would be written."""

    def __init__(self, sink, window, streaming, max_seq, head_dim, base, **_):
        super().__init__("cpu", decode_kernels=False)
        self.sink, self.window, self.streaming = sink, window, streaming
        self.k, self.v = {}, {}
        freqs = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        self.angles = freqs  # [D/2]

    def rot(self, x, pos):
        """Rotate interleaved pairs of x [..., D] by position pos (float64 complex)."""
        xc = torch.view_as_complex(x.double().reshape(*x.shape[:-1], -1, 2).contiguous())
        r = torch.polar(torch.ones_like(self.angles), pos * self.angles)
        return torch.view_as_real(xc * r).flatten(-2)

    def update(self, input_pos, k, v):
        for t, p in enumerate(input_pos.tolist()):
            self.k[p], self.v[p] = k[:, :, t], v[:, :, t]

    def attend(self, q, input_pos):
        out = []
        for t, p in enumerate(input_pos.tolist()):
            held = [j for j in range(p + 1) if j < self.sink or j > p - self.window]
            order = {j: (i if self.streaming else j) for i, j in enumerate(held)}
            qp = self.rot(self.rot(q[:, :, t], -p), order[p])  # [B, Hq, D]
            ks = torch.stack([self.rot(self.rot(self.k[j], -j), order[j]) for j in held], dim=2)
            vs = torch.stack([self.v[j].double() for j in held], dim=2)
            rep = q.shape[1] // ks.shape[1]
            ks, vs = ks.repeat_interleave(rep, 1), vs.repeat_interleave(rep, 1)
            s = torch.einsum("bhd,bhnd->bhn", qp, ks) / math.sqrt(q.shape[-1])
            out.append(torch.einsum("bhn,bhnd->bhd", s.softmax(-1), vs))
        return torch.stack(out, dim=2).to(q.dtype)


@pytest.mark.parametrize("rope", ["streaming", "original"])
def test_ring_wraparound_matches_brute_force(rope):
    sink, window = 3, 6
    model = tiny_model()
    tokens = torch.randint(0, VOCAB, (1, sink + 10 * window))
    n = tokens.shape[1]
    got = run(model, tokens, compress(sink, window, rope), [5] + [1] * (n - 5))
    cfg = model.config

    def brute(**kw):
        return BruteForceStreamingCache(sink, window, rope == "streaming", n, cfg.head_dim, cfg.rope_base)

    model.setup_caches(1, n, brute)
    with torch.no_grad():
        want = torch.cat([model(tokens[:, p : p + 1], torch.tensor([p])) for p in range(n)], dim=1)
    torch.testing.assert_close(got, want, atol=TOL, rtol=0)


def test_compress_memory_is_fixed():
    model = tiny_model()
    model.setup_caches(1, 100, cache_factory(compress(4, 8)))
    small = sum(c.nbytes() for c in model.caches())
    model.setup_caches(1, 10_000, cache_factory(compress(4, 8)))
    assert sum(c.nbytes() for c in model.caches()) == small


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_quantized_token_count_and_recent_tokens_exact(bits):
    sink, window, group, prompt, steps = 4, 8, 16, 30, 57
    model = tiny_model()
    tokens = torch.randint(0, VOCAB, (1, prompt + steps))
    run(model, tokens, quantize(sink, window, bits, group), [prompt] + [1] * steps)
    cache = model.caches()[0]
    n = prompt + steps
    expected = n - sink - window if bits == 8 else (n - sink - window) // group * group
    assert int(cache.n_quantized(torch.tensor(n - 1))) == expected
    # Written body rows have a nonzero scale; nothing past the count was written.
    scale = cache.k_scale if bits == 8 else cache.v_scale
    written = (scale[0, 0] != 0).any(-1)
    assert written[:expected].all() and not written[expected:cache.n_groups * cache.evict_block].any()  # (trash group after)
    # Layer 0's keys depend only on the embeddings: its exact slots hold the full cache's keys, bit for bit.
    held = cache.exact_slot_positions(torch.tensor(n - 1))
    assert (held[held >= sink] >= sink + expected).all() and (held >= 0).sum() == sink + n - sink - expected
    run(model, tokens, FULL, [prompt] + [1] * steps)  # same chunks: same arithmetic
    full_k = model.caches()[0].k_cache
    valid = held >= 0
    assert torch.equal(cache.exact_k[:, :, valid], full_k[:, :, held[valid]])
