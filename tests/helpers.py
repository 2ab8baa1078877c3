"""What several test files build: a tiny random model, strategy settings, and a chunked run."""
import torch

from model import ModelArgs, Transformer
from strategies import cache_factory

VOCAB = 256  # the tiny presets' vocabulary


def tiny_model(name="tiny", seed=0):
    torch.manual_seed(seed)
    return Transformer(ModelArgs.from_name(name)).eval()


def run(model, tokens, settings, chunks, max_seq=None, decode_kernels=None):
    """Feed tokens [B, L] in chunks of the given sizes; logits for every position [B, L, V].
    decode_kernels as strategies.cache_factory takes it."""
    model.setup_caches(tokens.shape[0], max_seq or tokens.shape[1], cache_factory(settings, decode_kernels))
    out, pos = [], 0
    with torch.no_grad():
        for c in chunks:
            out.append(model(tokens[:, pos : pos + c], torch.arange(pos, pos + c)))
            pos += c
    assert pos == tokens.shape[1]
    return torch.cat(out, dim=1)


def compress(sink, window, rope="streaming"):
    return {"strategy": "compress_kv", "sink_size": sink, "window_size": window, "rope": rope}


def quantize(sink, window, bits=8, group=16, value_group=None):
    """bits 8, 4, 2 or "fp8"; KIVI keys over `group` tokens, values over `value_group` channels
    (default: `group`)."""
    settings = {"strategy": "quantize_kv", "sink_size": sink, "window_size": window, "bits": 8 if bits == "fp8" else bits}
    if bits == "fp8":
        settings["fp8"] = True
    elif bits != 8:
        settings.update(key_group=group, value_group=value_group or group)
    return settings


def triton_missing() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return True
    return False
