"""The cache strategies by name: their command-line options, their checks, and the factory that
setup_caches() calls per layer. generate.py builds one subcommand per entry of STRATEGIES, so a new
strategy is its cache module plus one entry here."""
import argparse
import dataclasses
import functools
from typing import Callable, Optional

from compress_kv import ROPE_MODES, CompressedCache
from kv_cache import FullCache
from quantize_kv import BITS, QuantizedCache

# KIVI groups per bit width: (tokens per key group, channels per value group), chosen on the default
# model's perplexity and one attention layer's time (docs/results.md, "KIVI groups"). int4 is best
# with keys over 128 tokens (+0.30% against +0.48% at 32), which the kernel also reads as whole
# 128-token tiles; int2 loses far more with longer key groups (+37% at 128 against +17% at 32), so
# it keeps 32. Values over 64 channels: the kernel's loop then runs 10% fewer instructions and
# reads 5% (int4) or 8% (int2) fewer bytes, one layer is 7-8% faster, and the perplexity moves
# +0.02% (int4) and +1.3% (int2) against 32 channels.
KIVI_GROUPS = {4: (128, 64), 2: (32, 64)}
BIT_CHOICES = [str(b) for b in BITS] + ["fp8"]  # --bits fp8: 8-bit codes in e4m3 instead of int8


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


def _sink_and_window(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--sink_size", type=_positive("--sink_size"), default=16, help="first tokens kept forever")
    sub.add_argument("--window_size", type=_positive("--window_size"), default=32, help="most recent tokens kept exact")


def _compress_options(sub: argparse.ArgumentParser) -> None:
    _sink_and_window(sub)
    sub.add_argument("--rope", choices=ROPE_MODES, default="streaming",
                     help="streaming: positions by order in the cache (StreamingLLM); original: absolute positions")


def _quantize_options(sub: argparse.ArgumentParser) -> None:
    _sink_and_window(sub)
    sub.add_argument("--bits", choices=BIT_CHOICES, default="8",
                     help="8: int8 and fp8: fp8 e4m3 (the fp8 KV cache of vLLM and TensorRT-LLM), each with one "
                          "scale per token and head; 4/2: KIVI (keys per channel, values per token)")
    # No defaults here: they depend on --bits, and --bits 8 has no groups to set.
    defaults = {name: " and ".join(f"{groups[i]} for int{b}" for b, groups in KIVI_GROUPS.items())
                for i, name in enumerate(("key", "value"))}
    sub.add_argument("--key_group", type=_positive("--key_group"), default=None,
                     help=f"bits 4/2 only: tokens per key group (default: {defaults['key']})")
    sub.add_argument("--value_group", type=_positive("--value_group"), default=None,
                     help=f"bits 4/2 only: channels per value group (default: {defaults['value']})")
    sub.add_argument("--group_size", type=_positive("--group_size"), default=None,
                     help="bits 4/2 only: sets both --key_group and --value_group")


@dataclasses.dataclass(frozen=True)
class Strategy:
    help: str
    cache: type
    add_options: Callable[[argparse.ArgumentParser], None]
    options: tuple  # the option names saved in the settings dict


STRATEGIES = {
    "full": Strategy("every token, in the model's dtype (the default)", FullCache, lambda sub: None, ()),
    "compress_kv": Strategy("keep sink + sliding window, drop the middle (StreamingLLM)", CompressedCache,
                            _compress_options, ("sink_size", "window_size", "rope")),
    "quantize_kv": Strategy("keep sink + window exact, quantize older tokens (int8, fp8, KIVI int4/int2)", QuantizedCache,
                            _quantize_options, ("sink_size", "window_size", "bits", "key_group", "value_group", "group_size")),
}


def strategy_settings(args: argparse.Namespace) -> dict:
    """The options of the chosen strategy, as a plain dict (saved with every result). Raises
    ValueError for options that contradict each other."""
    name = getattr(args, "strategy", None) or "full"
    settings = {"strategy": name, **{n: getattr(args, n) for n in STRATEGIES[name].options}}
    if name == "quantize_kv":
        if settings["bits"] == "fp8":
            settings.update(bits=8, fp8=True)
        settings["bits"] = int(settings["bits"])
        shorthand = settings.pop("group_size")
        groups = {"key_group": settings.pop("key_group"), "value_group": settings.pop("value_group")}
        if settings["bits"] == 8:
            if shorthand is not None or any(v is not None for v in groups.values()):
                raise ValueError("--group_size, --key_group and --value_group set the KIVI groups of --bits 4 and 2; "
                                 "--bits 8 and fp8 keep one scale per token and head, so drop them or pick --bits 4/2")
        else:
            if shorthand is not None and any(v is not None for v in groups.values()):
                raise ValueError("--group_size sets both --key_group and --value_group; give either it or them")
            defaults = dict(zip(groups, KIVI_GROUPS[settings["bits"]]))
            settings.update({k: v if v is not None else shorthand or defaults[k] for k, v in groups.items()})
    return settings


def check_settings(settings: dict, head_dim: int, max_seq_length: int, device: str = "cpu") -> None:
    """Errors a user can cause, in words that say what to change (raised as ValueError)."""
    if settings["strategy"] == "full":
        return
    sink, window = settings["sink_size"], settings["window_size"]
    # Past the run's length nothing would ever be dropped or quantized: the strategy would be a
    # full cache under another name (and a huge window allocates for tokens that never come).
    if sink + window > max_seq_length:
        what = "nothing would be dropped" if settings["strategy"] == "compress_kv" else "nothing would be quantized"
        raise ValueError(f"--sink_size + --window_size ({sink + window}) exceed the cache length "
                         f"({max_seq_length} tokens: prompt + --max_new_tokens), so {what}; make them smaller, "
                         f"or use the full cache")
    if settings["strategy"] == "quantize_kv" and settings["bits"] != 8:
        # The fused kernels need power-of-two groups of at least 16 tokens / channels on the GPU.
        smallest = 1 if device == "cpu" else 16
        for name, group, of_channels in (("--value_group", settings["value_group"], True),
                                         ("--key_group", settings["key_group"], False)):
            sizes = [g for g in (8, 16, 32, 64, 128, 256) if g >= smallest and (not of_channels or head_dim % g == 0)]
            if group not in sizes:
                what = f"does not fit the head dimension ({head_dim})" if of_channels else "must be a power of two"
                raise ValueError(f"{name} {group} {what} on {device}; use one of {sizes}")


def cache_factory(settings: dict, decode_kernels: Optional[bool] = None):
    """What model.setup_caches calls per layer. decode_kernels: one-token steps through the decode
    kernels' custom ops (True on the CPU runs their PyTorch references, as tests do); None: on
    CUDA devices."""
    opts = {k: v for k, v in settings.items() if k != "strategy"}
    return functools.partial(STRATEGIES[settings["strategy"]].cache, decode_kernels=decode_kernels, **opts)
