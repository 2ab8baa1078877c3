"""The cache strategies by name, their options, and the factory setup_caches() calls per layer."""
import argparse
import functools

from compress_kv import ROPE_MODES, CompressedCache
from kv_cache import FullCache
from quantize_kv import BITS, QuantizedCache

STRATEGIES = ("full", "compress_kv", "quantize_kv")


def _positive(name: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a whole number, got '{text}'")
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{name} must be positive, got {value}")
        return value

    return parse


def add_strategy_options(sub: argparse.ArgumentParser, strategy: str) -> None:
    sub.add_argument("--sink_size", type=_positive("--sink_size"), default=16, help="first tokens kept forever (default 16)")
    sub.add_argument("--window_size", type=_positive("--window_size"), default=32, help="most recent tokens kept exact (default 32)")
    if strategy == "compress_kv":
        sub.add_argument("--rope", choices=ROPE_MODES, default="streaming",
                         help="streaming: positions by order in the cache (StreamingLLM); original: absolute positions")
    else:
        sub.add_argument("--bits", type=int, choices=BITS, default=8, help="8: int8 per token; 4/2: KIVI-style (default 8)")
        sub.add_argument("--group_size", type=_positive("--group_size"), default=32,
                         help="KIVI group: tokens per key group, channels per value group (bits 4/2; default 32)")


def strategy_settings(args: argparse.Namespace) -> dict:
    """The options of the chosen strategy, as a plain dict (saved with every result)."""
    strategy = getattr(args, "strategy", None) or "full"
    names = {"full": (), "compress_kv": ("sink_size", "window_size", "rope"),
             "quantize_kv": ("sink_size", "window_size", "bits", "group_size")}[strategy]
    return {"strategy": strategy, **{n: getattr(args, n) for n in names}}


def check_settings(settings: dict, head_dim: int, max_seq_length: int, device: str = "cpu") -> None:
    """Errors a user can cause, in words that say what to change (raised as ValueError)."""
    if settings["strategy"] == "full":
        return
    sink, window = settings["sink_size"], settings["window_size"]
    if settings["strategy"] == "quantize_kv":
        if sink + window > max_seq_length:
            raise ValueError(f"--sink_size + --window_size ({sink + window}) exceed the cache length "
                             f"({max_seq_length} tokens: prompt + --max_new_tokens); make them smaller")
        group = settings["group_size"]
        # The fused kernel's KIVI tiles need a power-of-two group of at least 16 channels/tokens.
        fits = head_dim % group == 0 and group & (group - 1) == 0 and (group >= 16 or device == "cpu")
        if settings["bits"] != 8 and not fits:
            sizes = [g for g in (8, 16, 32, 64, 128) if head_dim % g == 0 and (g >= 16 or device == "cpu")]
            raise ValueError(f"--group_size {group} does not fit the head dimension ({head_dim}) on {device}; "
                             f"use one of {sizes}")


def cache_factory(settings: dict):
    strategy = settings["strategy"]
    opts = {k: v for k, v in settings.items() if k != "strategy"}
    cls = {"full": FullCache, "compress_kv": CompressedCache, "quantize_kv": QuantizedCache}[strategy]
    return functools.partial(cls, **opts)
