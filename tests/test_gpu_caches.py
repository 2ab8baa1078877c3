"""Every cache strategy on the GPU: the fused decode kernel (compiled, CUDA graphs) against the
PyTorch path of the same cache, through prefill and decode steps that wrap the ring and evict
into the body. Skipped without CUDA (CI); run on the device.

Tolerance: both paths run the model in bf16; they differ in the attention's summation order and
in where bf16 rounding happens (the kernel keeps fp32 partials, the reference rounds the
dequantized keys to bf16), ~1e-2 relative on logits after a few layers. 3e-2 relative norm per
step leaves room for that; a wrong mask, slot or scale gives O(1).
"""
import pytest
import torch

from generate import decode_one_token
from model import ModelArgs, Transformer
from strategies import cache_factory

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SETTINGS = [
    {"strategy": "full"},
    {"strategy": "compress_kv", "sink_size": 4, "window_size": 24, "rope": "streaming"},
    {"strategy": "quantize_kv", "sink_size": 4, "window_size": 24, "bits": 8},
    {"strategy": "quantize_kv", "sink_size": 4, "window_size": 24, "bits": 4, "key_group": 32, "value_group": 32},
    {"strategy": "quantize_kv", "sink_size": 4, "window_size": 24, "bits": 2, "key_group": 32, "value_group": 32},
    {"strategy": "quantize_kv", "sink_size": 4, "window_size": 24, "bits": 8, "fp8": True},
    # the shipped KIVI groups (strategies.KIVI_GROUPS; a 64-channel value group is the whole head here)
    {"strategy": "quantize_kv", "sink_size": 4, "window_size": 24, "bits": 4, "key_group": 128, "value_group": 64},
    {"strategy": "quantize_kv", "sink_size": 4, "window_size": 24, "bits": 2, "key_group": 32, "value_group": 64},
]


def model_on_gpu():
    torch.manual_seed(0)
    config = ModelArgs(block_size=1024, n_layer=2, n_head=8, n_local_heads=2, dim=512, intermediate_size=1024, vocab_size=512)
    return Transformer(config).to("cuda", torch.bfloat16).eval()


def decode_logits(model, settings, tokens, prompt_len, step, decode_kernels=None):
    model.setup_caches(tokens.shape[0], tokens.shape[1] + 8, cache_factory(settings, decode_kernels))
    out = []
    with torch.no_grad():
        model(tokens[:, :prompt_len], torch.arange(prompt_len, device="cuda"))
        pos = torch.tensor([prompt_len], device="cuda")
        for p in range(prompt_len, tokens.shape[1]):
            out.append(step(model, tokens[:, p : p + 1], pos).float().clone())
            pos += 1
    return torch.stack(out)


def logits_step(model, x, input_pos):
    return model(x, input_pos)[:, -1]


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: "-".join(map(str, s.values())))
@pytest.mark.parametrize("batch", [1, 3])
def test_kernel_path_matches_pytorch_path(settings, batch):
    model = model_on_gpu()
    tokens = torch.randint(0, 512, (batch, 300), device="cuda")
    torch._dynamo.reset()
    compiled = torch.compile(logits_step, mode="reduce-overhead", fullgraph=True)
    got = decode_logits(model, settings, tokens, 100, compiled)
    want = decode_logits(model, settings, tokens, 100, logits_step, decode_kernels=False)
    err = (got - want).flatten(1).norm(dim=1) / want.flatten(1).norm(dim=1)
    assert err.max() < 3e-2, err.max()


def test_compiled_decode_step_is_one_graph():
    """The sampling step of generate.py compiles once and serves every position."""
    model = model_on_gpu()
    model.setup_caches(1, 512, cache_factory(SETTINGS[2]))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    step = torch.compile(decode_one_token, mode="reduce-overhead", fullgraph=True)
    x = torch.tensor([[1]], device="cuda")
    pos = torch.tensor([0], device="cuda")
    with torch.no_grad():
        for _ in range(200):
            x = step(model, x.clone(), pos, 0.0, None)
            pos += 1
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
