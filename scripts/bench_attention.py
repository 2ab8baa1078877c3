"""One-layer decode-attention micro-benchmark and correctness sweep (GPU).

For Llama-3-8B attention shapes (Hq=32, Hkv=8, D=128) it times, per cache format (bf16 exact
slots, int8, KIVI int4/int2), the Triton kernel against F.scaled_dot_product_attention over a
bf16 cache of the same length, next to the floor: bytes the call must read over the measured
copy bandwidth. Every timed configuration is also checked against decode_attention_reference.

    python3 -m scripts.bench_attention [--sweep] [--out DIR]

Writes bench_attention.json (and prints a table) to $OUT, else outputs/.
"""
import argparse
import json
import math
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import decode_attention as da
from tests.test_decode_attention import make_body, rel_err

HQ, HKV, D = 32, 8, 128
# (BLOCK_N, num_warps, num_stages) tried per format at B=8; run 1 (notes/kernel.md) settled bf16/int8.
SWEEP = {
    "bf16": [(64, 4, 3), (64, 4, 4), (128, 4, 4)],
    "int8": [(64, 4, 3), (128, 4, 3), (128, 4, 4), (128, 8, 3)],
    **{m: [(bn, w, st) for bn in (32, 64, 128) for w in (4, 8) for st in (2, 3)]
       for m in ("int4", "int2", "int4g128", "int2g128")},
}
RESIDUAL = 64  # exact slots after a quantized body (valid of 128)
L2_ROTATE_BYTES = 256 << 20  # rotate input sets until this many bytes: timings past the 50 MB L2


def bench(fn):
    import triton

    return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")


def bandwidths():
    """(copy, read) TB/s over 1 GiB: copy counts read + write; read is a sum (attention reads)."""
    x = torch.randn(1 << 29, device="cuda", dtype=torch.bfloat16)
    y = torch.empty_like(x)
    copy = 2 * x.numel() * 2 / bench(lambda: y.copy_(x)) / 1e9
    read = x.numel() * 2 / bench(lambda: x.sum(dtype=torch.float32)) / 1e9
    return copy, read


def randn(*shape):
    return torch.randn(*shape, device="cuda", dtype=torch.bfloat16)


def make_inputs(B, S, mode):
    """One input set: (args for decode_attention, bytes the call must read)."""
    q = randn(B, HQ, D)
    if mode == "bf16":
        k, v = randn(B, HKV, S, D), randn(B, HKV, S, D)
        el = torch.tensor([S], device="cuda", dtype=torch.int32)
        return (q, k, v, el, None, None, None), 2 * k.numel() * 2
    bits, g = {"int8": (8, 0), "int4": (4, 32), "int2": (2, 32), "int4g128": (4, 128), "int2g128": (2, 128)}[mode]
    body = make_body(B, HKV, S, D, bits, g, torch.bfloat16, "cuda")
    k, v = randn(B, HKV, 128, D), randn(B, HKV, 128, D)
    el = torch.tensor([RESIDUAL], device="cuda", dtype=torch.int32)
    bl = torch.tensor([S], device="cuda", dtype=torch.int32)
    nbytes = sum(t.numel() * t.element_size() for t in body[2:] if t is not None) + 2 * B * HKV * RESIDUAL * D * 2
    return (q, k, v, el, None, body, bl), nbytes


def clone_set(args):
    q, k, v, el, mask, body, bl = args
    c = lambda t: None if t is None else t.clone()  # noqa: E731
    body = None if body is None else da.QuantizedBody(body.bits, body.group_size, *[c(t) for t in body[2:]])
    return (c(q), c(k), c(v), el, mask, body, bl)


def rotating(sets, call):
    i = [0]

    def fn():
        a = sets[i[0] % len(sets)]
        i[0] += 1
        return call(a)

    return fn


def kernel_call(config=None, waves=da.WAVES):
    def call(a):
        q, k, v, el, mask, body, bl = a
        if body is None:
            return da._decode_attention_triton(q, k, v, el, None, 16, 1, *(None,) * 6, None, D ** -0.5, config, waves)
        return da._decode_attention_triton(q, k, v, el, None, body.bits, body.group_size, *body[2:], bl,
                                           D ** -0.5, config, waves)

    return call


def sdpa_sets(B, S, n_sets):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    sets = []
    for _ in range(n_sets):
        sets.append((randn(B, HQ, 1, D), randn(B, HKV, S, D), randn(B, HKV, S, D)))
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH):
        def call(a, backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(*a, enable_gqa=True)
        try:
            call(sets[0])
            return sets, call, str(backend).split(".")[-1]
        except RuntimeError:
            continue
    raise RuntimeError("no SDPA backend ran")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sweep", action="store_true", help="also sweep (BLOCK_N, warps, stages) and waves")
    p.add_argument("--budget-s", type=float, default=300, help="start no config sweep after this many seconds")
    p.add_argument("--out", default=os.environ.get("OUT", "outputs"))
    p.add_argument("--cases", default="8x32768,1x1024,1x32768,1x131072", help="BxS list, comma separated")
    p.add_argument("--modes", default="bf16,int8,int4,int2,int4g128,int2g128")
    p.add_argument("--kivi-asm", type=int, choices=(0, 1), default=None,
                   help="override decode_attention.KIVI_ASM (bf16 KIVI tiles through inline PTX vs the portable path)")
    args = p.parse_args()
    if args.kivi_asm is not None:
        da.KIVI_ASM = bool(args.kivi_asm)
    if not torch.cuda.is_available():
        sys.exit("bench_attention: needs a CUDA GPU")
    os.makedirs(args.out, exist_ok=True)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = "unknown"
    result = {
        "command": " ".join(sys.argv), "commit": commit, "device": torch.cuda.get_device_name(),
        "torch": torch.__version__, "configs": {str(k): v for k, v in da.CONFIGS.items()}, "waves": da.WAVES,
        "kivi_asm": da.KIVI_ASM,
    }
    out_path = os.path.join(args.out, "bench_attention.json" if args.kivi_asm is None
                            else f"bench_attention_asm_{args.kivi_asm}.json")

    def save():
        with open(out_path, "w") as f:
            json.dump(result, f, indent=1)

    copy_bw, read_bw = bandwidths()
    bw = max(copy_bw, read_bw)  # the floor uses the better of the two
    result["copy_TBps"], result["read_TBps"] = copy_bw, read_bw
    print(f"device {result['device']}, copy {copy_bw:.2f} TB/s, read (sum) {read_bw:.2f} TB/s", flush=True)
    torch.manual_seed(0)
    t_start = time.time()
    rows = []
    result["rows"] = rows
    sweep = result["sweep"] = []
    cases = [tuple(int(x) for x in c.split("x")) for c in args.cases.split(",")]
    modes = args.modes.split(",")
    for B, S in cases:
        n_sets = None
        base, sdpa_name, sdpa_ms = None, None, None
        for mode in modes:
            t0 = time.time()
            a0, nbytes = make_inputs(B, S, mode)
            n_sets = max(1, min(256, math.ceil(L2_ROTATE_BYTES / nbytes)))
            sets = [a0] + [clone_set(a0) for _ in range(n_sets - 1)]
            if sdpa_ms is None:
                s_sets, s_call, sdpa_name = sdpa_sets(B, S, max(1, min(256, math.ceil(L2_ROTATE_BYTES / (4 * B * HKV * S * D)))))
                sdpa_ms = bench(rotating(s_sets, s_call))
                del s_sets
            ref = da.decode_attention_reference(*a0)
            row = {"B": B, "S": S, "mode": mode, "bytes": nbytes, "floor_ms": nbytes / bw / 1e9,
                   "sdpa_ms": sdpa_ms, "sdpa_backend": sdpa_name, "sets": n_sets}
            try:
                out = kernel_call()(a0)
                row["rel_err"] = rel_err(out, ref)
                row["ms"] = bench(rotating(sets, kernel_call()))
                row["TBps"] = nbytes / row["ms"] / 1e9
            except Exception as e:  # keep going: one failing format must not hide the others
                row["error"] = repr(e)[:500]
            if args.sweep and (B, S) in ((8, 32768), (1, 32768)):
                configs = SWEEP.get(mode, []) if B == 8 else []
                if time.time() - t_start > args.budget_s:
                    configs = []
                for cfg in configs:
                    entry = {"B": B, "S": S, "mode": mode, "config": cfg, "waves": da.WAVES}
                    try:
                        out = kernel_call(cfg)(a0)
                        entry["rel_err"] = rel_err(out, ref)
                        entry["ms"] = bench(rotating(sets, kernel_call(cfg)))
                    except Exception as e:
                        entry["error"] = repr(e)[:300]
                    sweep.append(entry)
                for waves in (1, 2, 4, 8, 16):
                    entry = {"B": B, "S": S, "mode": mode, "config": None, "waves": waves}
                    try:
                        entry["ms"] = bench(rotating(sets, kernel_call(None, waves)))
                    except Exception as e:
                        entry["error"] = repr(e)[:300]
                    sweep.append(entry)
                save()
            rows.append(row)
            print(f"B={B:2d} S={S:6d} {mode:9s} " + (
                f"{row['ms']:.4f} ms {row['TBps']:.2f} TB/s err {row['rel_err']:.1e}" if "ms" in row else row.get("error", "")
            ) + f"  [{time.time() - t0:.0f}s]", flush=True)
            del sets, a0, ref
            torch.cuda.empty_cache()
            save()

    if sweep:
        print("\nsweep: best config per (B, S, mode)")
        for B, S in ((8, 32768), (1, 32768)):
            for mode in modes:
                ok = [e for e in sweep if e["B"] == B and e["S"] == S and e["mode"] == mode and "ms" in e]
                if ok:
                    best = min(ok, key=lambda e: e["ms"])
                    print(f"  B={B} S={S} {mode:9s} {best['ms']:.4f} ms config {best['config']} waves {best['waves']}")
        bad = [e for e in sweep if "error" in e or e.get("rel_err", 0) > 1e-2]
        print(f"  {len(bad)} sweep entries failed or exceeded 1e-2")
    print(f"\n| B | S | format | kernel ms | TB/s | floor ms | SDPA bf16 ms ({rows[0]['sdpa_backend']}) | rel err |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "ms" in r:
            print(f"| {r['B']} | {r['S']} | {r['mode']} | {r['ms']:.4f} | {r['TBps']:.2f} | {r['floor_ms']:.4f} "
                  f"| {r['sdpa_ms']:.4f} | {r['rel_err']:.1e} |")
        else:
            print(f"| {r['B']} | {r['S']} | {r['mode']} | error: {r['error'][:80]} |")
    save()
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
