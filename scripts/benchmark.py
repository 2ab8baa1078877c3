r"""Decode-step speed of every cache strategy against the memory roofline.

    python -m scripts.benchmark --model llama-3.1-8b --batch_sizes 1 8 --contexts 1024 8192 32768 \
        --long_context 131072 --out outputs/benchmark_8b.json

Random bf16 weights of the preset's shapes (decode speed does not depend on the values) and
caches filled with random data up to each context length. One compiled decode step
(CUDA graphs) per (batch, strategy) serves every context: the cache is sized once for the longest
and the step reads the current position from a device tensor. For each context:
  - ms_per_step: the median step time over --steps steps, each waited for, repeated --repeats
    times (the median of the repeats' medians); it includes the host's work per step;
  - ms_per_step_back_to_back: --steps steps queued without waiting, timed as a whole (median of
    --repeats), as a generation loop runs;
  - floor: the bytes the step must read (every weight once plus the valid part of every cache
    buffer) over the copy bandwidth measured here;
  - on CUDA, every kernel of the step with its calls and microseconds (busy_ms: their sum).
Writes JSON (every figure, the command, commit and device) and a PNG of step time vs context
next to it; neither ever replaces an existing file. --trace also writes each row's profiler trace
(10 steps) beside them, OUT.b{batch}.{strategy}.{context}.trace.json, for `python -m
scripts.summarize_profile` (the time per kernel category, and how long the GPU sat idle between
kernels, with the boundaries the idle time fell on). --layers N keeps N of the preset's layers, for
quick kernel studies. On the CPU (fp32) no bandwidth is measured, so there is no floor.

Tensor parallel: `torchrun --standalone --nproc_per_node 2 -m scripts.benchmark ...` shards the
random model with tp.py; every rank times its own step (they run in lockstep), rank 0 writes. The
bytes, floor and kv_bytes of each row are per rank.
"""
import argparse
import dataclasses
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from atomic_write import write_atomically
import tp
from profile_summary import METADATA_KEY
from generate import UserError, compiled_step, pick_device
from model import PRESETS, ModelArgs, Transformer
from strategies import KIVI_GROUPS, cache_factory, check_settings
from weight_quant import WEIGHT_FORMATS, use_int8_linears

STRATEGY_SETTINGS = {
    "full": {"strategy": "full"},
    "compress_kv": {"strategy": "compress_kv", "rope": "streaming"},
    "int8": {"strategy": "quantize_kv", "bits": 8},
    "fp8": {"strategy": "quantize_kv", "bits": 8, "fp8": True},
    "int4": {"strategy": "quantize_kv", "bits": 4},
    "int2": {"strategy": "quantize_kv", "bits": 2},
}
BODY_BUFFERS = ("k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero")
CACHE_MARGIN = 8  # cache positions beyond the longest context (each timed step writes at its context)


def random_model(preset: str, device: str, dtype: torch.dtype, n_layer: int = 0) -> Transformer:
    """The preset's shapes with random weights; n_layer > 0 keeps only that many layers."""
    config = ModelArgs.from_name(preset)
    if n_layer:
        config = dataclasses.replace(config, n_layer=n_layer)
    with torch.device("meta"):
        model = Transformer(config)
    model = model.to(dtype).to_empty(device=device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0, 0.02)
    return model.eval()


def fill_caches(model: Transformer) -> None:
    """Random contents everywhere: the step's cost must not depend on zeros."""
    with torch.no_grad():
        for cache in model.caches():
            for name, buf in cache.named_buffers():
                if "scale" in name:
                    buf.uniform_(0.01, 0.05)
                elif buf.dtype == torch.int8:
                    buf.random_(-127, 128)
                elif getattr(cache, "fp8", False) and name.endswith("codes"):  # e4m3 bits: no NaN patterns
                    buf.copy_(torch.randn(buf.shape, device=buf.device).mul_(64).to(torch.float8_e4m3fn).view(torch.uint8))
                elif buf.dtype == torch.uint8:
                    buf.random_(0, 256)
                else:
                    buf.normal_(0, 1)


def bytes_read(model: Transformer, batch: int, pos: int) -> int:
    """What one decode step at position `pos` must read from device memory: every weight once
    (only `batch` rows of an untied embedding table) plus the valid part of every cache buffer."""
    c = model.config
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    if not c.tie_embeddings:
        emb = model.tok_embeddings.weight
        weights -= emb.numel() * emb.element_size() - batch * c.dim * emb.element_size()
    kv = 0
    for cache in model.caches():
        for name, buf in cache.named_buffers():
            size = buf.numel() * buf.element_size()
            if name in ("k_cache", "v_cache"):
                size = size * (pos + 1) // buf.shape[2]
            elif name in BODY_BUFFERS:
                body_tokens = cache.n_groups * cache.evict_block
                size = size * int(cache.n_quantized(torch.tensor(pos))) // body_tokens
            kv += size
    return weights + kv


def copy_bandwidth(device: str) -> float:
    """Bytes read + written per second by a large device-to-device copy (median of 20)."""
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device=device).random_(0, 256)
    dst = torch.empty_like(src)
    times = []
    for _ in range(25):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    del src, dst
    return 2 * n / statistics.median(times[5:])


def elapsed_ms(run, cuda: bool) -> float:
    """Milliseconds that run() takes: CUDA events on the GPU, the host clock elsewhere."""
    if not cuda:
        t = time.perf_counter()
        run()
        return (time.perf_counter() - t) * 1000
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    run()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def time_steps(step, model, x, input_pos, n: int, cuda: bool) -> list[float]:
    """Per-step milliseconds of n decode steps, each waited for."""
    return [elapsed_ms(lambda: step(model, x, input_pos, 0.0, None), cuda) for _ in range(n)]


def time_back_to_back(step, model, x, input_pos, n: int, cuda: bool) -> float:
    """Milliseconds per step of n steps queued back to back, timed as a whole: the host's work
    for each step (guards, graph launch) overlaps the GPU's, as in a generation loop that does
    not wait for every token. The per-step figures of time_steps wait, so they include it."""
    def run():
        for _ in range(n):
            step(model, x, input_pos, 0.0, None)

    return elapsed_ms(run, cuda) / n


def kernel_table(step, model, x, input_pos, n_steps: int = 10) -> dict:
    """Every GPU kernel of one decode step, heaviest first, from the profiler over n_steps
    replays: calls and microseconds per step. busy_ms (the kernels' summed time per step) against
    the step's wall time shows how much of the step is launch gaps rather than work."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n_steps):
            step(model, x, input_pos, 0.0, None)
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    events.sort(key=lambda e: e.device_time_total, reverse=True)
    busy_us = sum(e.device_time_total for e in events) / n_steps
    kernels = [{"name": e.key[:160], "calls_per_step": e.count / n_steps, "us_per_step": e.device_time_total / n_steps,
                "share": e.device_time_total / n_steps / busy_us} for e in events]
    return {"busy_ms": busy_us / 1000, "kernels": kernels}


def write_trace(step, model, x, input_pos, path: Path, meta: dict, cuda: bool, n_steps: int = 10) -> None:
    """The profiler's Chrome trace of n_steps steps (host ops; on CUDA also every kernel, copy
    and memset), with `meta` and the step count under profile_summary's key, written whole or not
    at all."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(n_steps):
            step(model, x, input_pos, 0.0, None)
        if cuda:
            torch.cuda.synchronize()
        prof.add_metadata_json(METADATA_KEY, json.dumps({**meta, "steps": n_steps}))  # (kept only while it records)
    write_atomically(path, lambda tmp: prof.export_chrome_trace(str(tmp)))


def trace_paths(args) -> list[Path]:
    """Where --trace writes each row's trace: OUT.b{batch}.{strategy}.{context}.trace.json."""
    return [trace_path(args.out, batch, name, ctx) for batch in args.batch_sizes for name in args.strategies
            for ctx in row_contexts(args, batch)]


def trace_path(out: Path, batch: int, name: str, ctx: int) -> Path:
    return out.with_name(f"{out.stem}.b{batch}.{name}.{ctx}.trace.json")


def row_contexts(args, batch: int) -> list[int]:
    return list(args.contexts) + ([args.long_context] if batch == 1 and args.long_context else [])


def strategy_settings(name: str, args) -> dict:
    settings = dict(STRATEGY_SETTINGS[name])
    if settings["strategy"] != "full":
        settings.update(sink_size=args.sink_size, window_size=args.window_size)
    if settings["strategy"] == "quantize_kv" and settings["bits"] != 8:
        settings.update(zip(("key_group", "value_group"), KIVI_GROUPS[settings["bits"]]))  # generate.py's defaults
    return settings


def run_config(model, batch, name, args, device, bandwidth) -> tuple[list[dict], Optional[str]]:
    """bench_config's rows, or why this (batch, strategy) was skipped: settings that do not fit
    the model, or caches too large for the device. Anything else is a bug and propagates."""
    contexts = row_contexts(args, batch)
    settings = strategy_settings(name, args)
    try:
        check_settings(settings, model.config.head_dim, max(contexts) + CACHE_MARGIN, device.split(":")[0])
    except ValueError as e:
        return [], str(e)
    try:
        return bench_config(model, batch, name, settings, contexts, args, device, bandwidth), None
    except torch.cuda.OutOfMemoryError as e:
        torch._dynamo.reset()
        gc.collect()
        torch.cuda.empty_cache()
        return [], f"out of memory: {e}"[:300]


def bench_config(model, batch, name, settings, contexts, args, device, bandwidth) -> list[dict]:
    cuda = device.startswith("cuda")
    max_seq = max(contexts) + CACHE_MARGIN
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    model.setup_caches(batch, max_seq, cache_factory(settings))
    fill_caches(model)
    kv_bytes = sum(c.nbytes() for c in model.caches())
    step = compiled_step(device, args.compile)
    x = torch.randint(0, model.config.vocab_size, (batch, 1), device=device)
    input_pos = torch.tensor([contexts[0]], device=device)
    t = time.perf_counter()
    with torch.no_grad():
        for _ in range(3):
            step(model, x, input_pos, 0.0, None)
        if cuda:
            torch.cuda.synchronize()
        compile_s = time.perf_counter() - t
        rows = []
        for ctx in contexts:
            input_pos.fill_(ctx)
            time_steps(step, model, x, input_pos, 5, cuda)
            medians = [statistics.median(time_steps(step, model, x, input_pos, args.steps, cuda)) for _ in range(args.repeats)]
            ms = statistics.median(medians)
            back_to_back = [time_back_to_back(step, model, x, input_pos, args.steps, cuda) for _ in range(args.repeats)]
            need = bytes_read(model, batch, ctx)
            row = {
                "batch": batch, "context": ctx, "strategy": name, "settings": settings, "ms_per_step": ms,
                "ms_repeat_medians": medians, "ms_per_step_back_to_back": statistics.median(back_to_back),
                "ms_back_to_back_repeats": back_to_back, "tokens_per_s": batch * 1000 / ms, "bytes_read": need,
                "floor_ms": need / bandwidth * 1000 if bandwidth else None, "kv_bytes": kv_bytes,
                "compile_s": compile_s,
            }
            row["roofline_fraction"] = row["floor_ms"] / ms if bandwidth else None
            if cuda:
                row.update(kernel_table(step, model, x, input_pos))
            if args.trace and tp.is_main():
                meta = {"settings": {"batch": batch, "strategy": name, "context": ctx, "weights": args.weights},
                        "device": device}
                write_trace(step, model, x, input_pos, trace_path(args.out, batch, name, ctx), meta, cuda)
            rows.append(row)
            floor = f"floor {row['floor_ms']:7.3f} ms  ({row['roofline_fraction']:.0%} of roofline)" if bandwidth else "floor n/a"
            busy = f"  kernels busy {row['busy_ms']:.3f} ms" if cuda else ""
            print(f"  batch {batch:2d} ctx {ctx:6d} {name:11s} {ms:8.3f} ms/step  back to back "
                  f"{row['ms_per_step_back_to_back']:8.3f}  {floor}{busy}", flush=True)
        if cuda:
            peak = torch.cuda.max_memory_allocated()
            for row in rows:
                row["peak_memory_bytes"] = peak
    del step
    torch._dynamo.reset()
    model.setup_caches(1, 8, cache_factory({"strategy": "full"}))  # release the big caches
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches), 4.5), squeeze=False)
    for ax, b in zip(axes[0], batches):
        for name in STRATEGY_SETTINGS:
            pts = sorted((r["context"], r["ms_per_step"]) for r in rows if r["batch"] == b and r["strategy"] == name)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("ms per decode step")
        ax.set_title(f"batch {b}")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def git_commit() -> str:
    """ENGINE_COMMIT when set (code copied to another machine, where a .git may be stale or
    missing), else the checkout's commit."""
    if os.environ.get("ENGINE_COMMIT"):
        return os.environ["ENGINE_COMMIT"]
    r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return r.stdout.strip() or "unknown"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-3.1-8b",
                   help=f"preset whose shapes are benchmarked: {', '.join(PRESETS)} (default: %(default)s)")
    p.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 8], help="batch sizes (default: 1 8)")
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 8192, 32768],
                   help="context lengths timed at every batch size (default: 1024 8192 32768)")
    p.add_argument("--long_context", type=int, default=131072, help="extra context at batch 1, 0 to skip (default: %(default)s)")
    p.add_argument("--weights", choices=["bf16", *WEIGHT_FORMATS], default="bf16",
                   help="weight format of the random model (weight_quant.py; default: %(default)s)")
    p.add_argument("--layers", type=int, default=0,
                   help="keep only this many of the preset's layers, for kernel studies; 0 = all (default: %(default)s)")
    p.add_argument("--strategies", nargs="+", choices=list(STRATEGY_SETTINGS), default=list(STRATEGY_SETTINGS),
                   help=f"cache strategies (default: {' '.join(STRATEGY_SETTINGS)})")
    p.add_argument("--sink_size", type=int, default=16, help="compress_kv and int* sink tokens (default: %(default)s)")
    p.add_argument("--window_size", type=int, default=32, help="compress_kv and int* window tokens (default: %(default)s)")
    p.add_argument("--steps", type=int, default=50, help="decode steps per timing (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="timings per context; the median is reported (default: %(default)s)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    p.add_argument("--all_reduce", choices=tp.ALL_REDUCES, default="nccl",
                   help="under torchrun: the per-layer all-reduces through NCCL or symmetric memory (default: %(default)s)")
    p.add_argument("--no_compile", dest="compile", action="store_false",
                   help="eager decode step, for CPU smoke runs (default: compiled, with CUDA graphs on the GPU)")
    p.add_argument("--out", type=Path, default=Path("outputs/benchmark.json"),
                   help="results JSON, never overwritten; the PNG goes next to it (default: %(default)s)")
    p.add_argument("--trace", action="store_true",
                   help="also write each row's profiler trace of 10 steps beside --out, "
                        "OUT.b{batch}.{strategy}.{context}.trace.json, for scripts.summarize_profile")
    return p


def check_args(args) -> None:
    """Bad input as one line, before anything is allocated."""
    try:
        ModelArgs.from_name(args.model)
    except ValueError as e:
        raise UserError(f"{e}; pass one of them as --model")
    smallest = {"batch_sizes": min(args.batch_sizes), "contexts": min(args.contexts), "steps": args.steps,
                "repeats": args.repeats}
    for name, value in smallest.items():
        if value <= 0:
            raise UserError(f"--{name} must be positive, got {getattr(args, name)}")
    for name in ("long_context", "layers"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name} must be 0 or more, got {getattr(args, name)}")


def check_out(out: Path, traces: list[Path]) -> None:
    """Results are never overwritten: neither the JSON, the PNG beside it nor a --trace file may
    exist yet."""
    for path in (out, out.with_suffix(".png"), *traces):
        if path.exists():
            raise UserError(f"{path} exists; pass another --out (results are never overwritten)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file where the folder should be, no permission
        raise UserError(f"cannot make the folder {out.parent} for --out ({e.strerror}); pass another --out")


def join_launch(device: str) -> str:
    """tp.init: under torchrun, cuda:LOCAL_RANK with the process group joined. Its ValueError (a
    launch that cannot work: more ranks than GPUs) is the user's; anything else is a bug of ours."""
    try:
        return tp.init(device)
    except ValueError as e:
        raise UserError(str(e)) from None


def main(argv: Optional[list[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
        device = join_launch(pick_device(args.device))
        if tp.is_main():
            check_out(args.out, trace_paths(args) if args.trace else [])
    except UserError as e:
        sys.exit(f"error: {e}")
    if not tp.is_main():
        sys.stdout = open(os.devnull, "w")

    cuda = device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    bandwidth = copy_bandwidth(device) if cuda else None
    if bandwidth:
        print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s", flush=True)
    model = random_model(args.model, device, dtype, args.layers)
    if args.weights == "int8":
        use_int8_linears(model, quantize=True)
    try:
        tp.shard(model, all_reduce=args.all_reduce, max_batch_size=max(args.batch_sizes))
    except ValueError as e:
        sys.exit(f"error: {e}" if tp.is_main() else 1)
    result = {
        "command": " ".join(sys.argv), "commit": git_commit(), "model": args.model, "weights": args.weights, "layers": model.config.n_layer, "device": torch.cuda.get_device_name() if cuda else "cpu",
        "tp": tp.world_size(), "all_reduce": args.all_reduce,
        "torch": torch.__version__, "copy_bandwidth_bytes_per_s": bandwidth, "rows": [], "errors": [],
    }
    for batch in args.batch_sizes:
        for name in args.strategies:
            rows, error = run_config(model, batch, name, args, device, bandwidth)
            result["rows"] += rows
            if error:
                result["errors"].append({"batch": batch, "strategy": name, "error": error})
                print(f"  batch {batch} {name}: skipped: {error}", flush=True)
            if tp.is_main():
                text = json.dumps(result, indent=1)
                write_atomically(args.out, lambda tmp: tmp.write_text(text))
    if tp.is_main():
        plot(result["rows"], args.out.with_suffix(".png"))
        print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    tp.shutdown()


if __name__ == "__main__":
    main()
