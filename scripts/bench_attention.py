"""One-layer decode-attention micro-benchmark and correctness sweep (GPU).

For Llama-3-8B attention shapes (Hq=32, Hkv=8, D=128) it times, per cache format (bf16 exact
slots, int8, fp8, KIVI int4/int2), the Triton kernel against F.scaled_dot_product_attention over
a bf16 cache of the same length, next to the floor: bytes the call must read over the measured
copy bandwidth. Every timed configuration is also checked against decode_attention_reference.

    python3 -m scripts.bench_attention [--sweep] [--variants] [--splits] [--fill] [--capacity C] [--sass] [--out DIR]

The KIVI modes int4 and int2 use the shipped groups (strategies.KIVI_GROUPS). --sweep times other
(BLOCK_N, warps, stages) and split counts at batch 8 / 32K; --variants times each format with one
of decode_kernels' switches flipped at a time (VARIANTS: the 8-bit conversions as plain casts,
KIVI's unpacking without PTX), to see what each stage costs;
--sass writes each compiled kernel's SASS next to the JSON. --splits times every case with
its split minimum (decode_kernels.MIN_SPLIT; EXACT_MIN_SPLIT for bf16) at each of SPLIT_SWEEP,
--fill with FILL_WARPS_PER_SM at each of FILL_SWEEP. --capacity C sizes every cache for C
tokens with each case's S valid, as the whole-step benchmark sizes its caches for the longest
context (the kernels plan their splits for the capacity): at batch 1 a short context then runs
in other splits than a cache of its own length. Writes bench_attention.json (and prints a table)
to $OUT, else outputs/.
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
import decode_kernels as dk
import kv_quant
from strategies import KIVI_GROUPS

HQ, HKV, D = 32, 8, 128
# (BLOCK_N, num_warps, num_stages, waves) tried per format (decode_kernels.CONFIGS), the shipped
# one first. The 8-bit formats near their chosen one-warp config (the wider sweep is in
# docs/kernels.md); KIVI one-warp programs on 32-token tiles (a tile lies in one block of value
# codes, kv_quant.VALUE_BLOCK) at other pipeline depths and programs per SM.
SWEEP = {
    "bf16": [(64, 4, 3, 8), (64, 4, 4, 8), (128, 4, 3, 8), (128, 8, 3, 8), (64, 4, 4, 16)],
    **{m: [(32, 1, 3, 16), (32, 1, 2, 16), (32, 1, 3, 8)] for m in ("int8", "fp8")},
    **{m: [(32, 1, 3, 16), (32, 1, 2, 16), (32, 1, 4, 16), (32, 1, 3, 8), (32, 1, 3, 12)] for m in ("int4", "int2")},
}
RESIDUAL = 64  # exact slots after a quantized body (valid of 128)
# mode -> (bits, (key group, value group)): the KIVI modes with their shipped groups.
MODE_BITS = {"int8": (8, None), "fp8": ("fp8", None), "int4": (4, KIVI_GROUPS[4]), "int2": (2, KIVI_GROUPS[2])}
MODE_FORMAT = {"bf16": "exact"}  # else the mode is the format
# What --splits sets the format's split minimum to (tokens of capacity per split at least:
# decode_kernels.MIN_SPLIT, shipped 1024, or EXACT_MIN_SPLIT for bf16, 2048; the split count is
# also capped by the config's waves and raised by the fill rule of plan_splits), at every case.
SPLIT_SWEEP = (256, 512, 1024, 2048, 4096)
# What --fill sets decode_kernels.FILL_WARPS_PER_SM to (the fewest warps per SM the split grid
# keeps, shipped 8), at every case.
FILL_SWEEP = (4, 8, 16, 32)
# What --variants flips per format, one at a time (module switches of decode_kernels).
VARIANTS = {"int8": ("CONVERT_ASM",), "fp8": ("CONVERT_ASM",),
            **{m: ("KIVI_ASM",) for m in ("int4", "int2")}}
MODES = ("bf16", *MODE_BITS)
REL_TOL = 1e-2  # kernel vs reference in bf16 (tests/test_decode_attention.py says why)
L2_ROTATE_BYTES = 256 << 20  # rotate input sets until this many bytes: timings past the 50 MB L2
SETS_MAX_BYTES = 40 << 30  # ... as long as the sets held stay below this (a --capacity far past the length)


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


def rel_err(out, ref) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def make_body(B, L, bits, groups) -> kv_quant.QuantizedBody:
    """Fresh random keys (with channel offsets) and values quantized with kv_quant."""
    k, v = randn(B, HKV, L, D).float() * 2 + 0.5, randn(B, HKV, L, D).float()
    if bits in (8, "fp8"):
        quantize = kv_quant.quantize_fp8_per_token if bits == "fp8" else kv_quant.quantize_symmetric_per_token
        (kc, ks), (vc, vs) = quantize(k, torch.bfloat16), quantize(v, torch.bfloat16)
        return kv_quant.QuantizedBody(8, 0, 0, kc, ks, None, kv_quant.block_value_codes(vc), vs, None, fp8=bits == "fp8")
    kg, vg = groups
    kc, ks, kz = kv_quant.quantize_asymmetric_per_channel(k.reshape(B, HKV, L // kg, kg, D), bits, torch.bfloat16)
    vc, vs, vz = kv_quant.quantize_asymmetric_per_token_group(v, bits, vg, torch.bfloat16)
    return kv_quant.QuantizedBody(bits, kg, vg, kv_quant.pack_codes(kc.reshape(B, HKV, L, D), bits), ks.squeeze(-2),
                                  kz.squeeze(-2), kv_quant.block_value_codes(kv_quant.pack_codes(vc, bits)), vs, vz)


def make_inputs(B, S, mode, capacity=None):
    """One input set: (args for decode_attention, bytes the call must read, bytes it holds).
    The cache holds `capacity` tokens (default S) of which the first S are valid: the kernels
    plan their splits for the capacity, as in the whole step, whose caches are sized once for
    the longest context."""
    C = capacity or S
    q = randn(B, HQ, D)
    if mode == "bf16":
        k, v = randn(B, HKV, C, D), randn(B, HKV, C, D)
        el = torch.tensor([S], device="cuda", dtype=torch.int32)
        return (q, k, v, el, None, None, None), 2 * B * HKV * S * D * 2, 2 * k.numel() * 2
    bits, groups = MODE_BITS[mode]
    body = make_body(B, C, bits, groups)
    k, v = randn(B, HKV, 128, D), randn(B, HKV, 128, D)
    el = torch.tensor([RESIDUAL], device="cuda", dtype=torch.int32)
    bl = torch.tensor([S], device="cuda", dtype=torch.int32)
    held = sum(t.numel() * t.element_size() for t in body.tensors() if t is not None)
    exact = 2 * B * HKV * RESIDUAL * D * 2
    return (q, k, v, el, None, body, bl), held * S // C + exact, held + 2 * k.numel() * 2


def clone_set(args):
    q, k, v, el, mask, body, bl = args
    c = lambda t: None if t is None else t.clone()  # noqa: E731
    body = None if body is None else body.with_tensors(c(t) for t in body.tensors())
    return (c(q), c(k), c(v), el, mask, body, bl)


def rotating(sets, call):
    i = [0]

    def fn():
        a = sets[i[0] % len(sets)]
        i[0] += 1
        return call(a)

    return fn


def kernel_call(a):
    q, k, v, el, mask, body, bl = a
    return dk.flash_decode(q, k, v, el, None, body, bl, D ** -0.5)


class Switched:
    """decode_kernels' tuning switches set for a while: a format's config (BLOCK_N, warps,
    stages, waves), a module switch flipped from its shipped value, the format's split minimum
    (MIN_SPLIT, or EXACT_MIN_SPLIT for bf16, whose grid is the exact slots alone),
    FILL_WARPS_PER_SM."""

    def __init__(self, mode, config=None, flip=None, min_split=None, fill=None):
        self.key = (MODE_FORMAT.get(mode, mode), D)
        self.config, self.flip, self.min_split, self.fill = config, flip, min_split, fill
        self.split_name = "EXACT_MIN_SPLIT" if self.key[0] == "exact" else "MIN_SPLIT"

    def __enter__(self):
        self.saved_config, self.saved_min_split = dk.CONFIGS[self.key], getattr(dk, self.split_name)
        self.saved_fill = dk.FILL_WARPS_PER_SM
        if self.fill:
            dk.FILL_WARPS_PER_SM = self.fill
        if self.config:
            dk.CONFIGS[self.key] = tuple(self.config)
        if self.flip:
            self.saved_switch = getattr(dk, self.flip)
            setattr(dk, self.flip, not self.saved_switch)
        if self.min_split:
            setattr(dk, self.split_name, self.min_split)

    def __exit__(self, *exc):
        dk.CONFIGS[self.key] = self.saved_config
        setattr(dk, self.split_name, self.saved_min_split)
        dk.FILL_WARPS_PER_SM = self.saved_fill
        if self.flip:
            setattr(dk, self.flip, self.saved_switch)


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
        except RuntimeError as e:
            if "no available kernel" not in str(e).lower():  # this backend cannot take these shapes
                raise
    raise RuntimeError("no SDPA backend ran")


def too_large_errors() -> tuple:
    """What a configuration too large for this GPU raises: out of device memory, or more shared
    memory or registers than an SM has (a swept kernel configuration)."""
    from triton.runtime.errors import OutOfResources

    return torch.cuda.OutOfMemoryError, OutOfResources


def check_and_time(entry, a0, sets, ref, switched, too_large=(torch.cuda.OutOfMemoryError,)):
    """The kernel's error against the reference and its time, into entry, with decode_kernels'
    switches set as `switched` says. What a case or configuration too large for the GPU raises
    (too_large) becomes the entry's error, so that the other formats still run; anything else is
    a bug of ours and ends the run with its traceback."""
    try:
        with switched:
            out = kernel_call(a0)
            entry["rel_err"] = rel_err(out, ref)
            entry["ms"] = bench(rotating(sets, kernel_call))
    except too_large as e:
        entry["error"] = repr(e)[:300]


def wrong(entry) -> bool:
    """A result past the tolerance (NaN included: it compares false)."""
    return "rel_err" in entry and not entry["rel_err"] <= REL_TOL


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sweep", action="store_true", help="also sweep (BLOCK_N, warps, stages) and waves")
    p.add_argument("--budget-s", type=float, default=300,
                   help="start no config sweep after this many seconds (default: %(default)s)")
    p.add_argument("--out", default=os.environ.get("OUT", "outputs"),
                   help="folder for bench_attention.json (default: $OUT when set, else outputs; now %(default)s)")
    p.add_argument("--cases", default="8x32768,1x1024,1x32768,1x131072",
                   help="BxS list (batch x cache length), comma separated (default: %(default)s)")
    p.add_argument("--capacity", type=int, default=None,
                   help="tokens every cache holds, of which each case's S are valid (default: S): the whole "
                        "step's condition, whose caches are sized once for the longest context")
    p.add_argument("--modes", default=",".join(MODES),
                   help=f"cache formats, comma separated, from {', '.join(MODES)} (default: %(default)s)")
    p.add_argument("--splits", action="store_true",
                   help=f"also time each case with its split minimum (decode_kernels.MIN_SPLIT, "
                        f"EXACT_MIN_SPLIT for bf16) at each of {SPLIT_SWEEP}")
    p.add_argument("--fill", action="store_true",
                   help=f"also time each case with decode_kernels.FILL_WARPS_PER_SM at each of {FILL_SWEEP}")
    p.add_argument("--variants", action="store_true",
                   help="also time each format with each of its switches flipped (VARIANTS)")
    p.add_argument("--sass", action="store_true", help="write every compiled kernel's SASS next to the JSON")
    return p


def write_sass(out_dir: str) -> None:
    """The SASS of every compiled partial kernel (one file per kernel, its launch constants in
    the name's order), to count instructions per tile offline."""
    from triton.tools.disasm import get_sass

    from decode_kernels_kivi import kivi_and_exact_partial_kernel

    for fn in (dk.token_partial_kernel, dk.body_and_exact_partial_kernel, kivi_and_exact_partial_kernel):
        for kernels in fn.device_caches.values():
            for i, compiled in enumerate(kernels[0].values()):
                consts = {k: v for k, v in compiled.src.constants.items()} if hasattr(compiled.src, "constants") else {}
                name = f"{fn.__name__}_{i}.sass"
                with open(os.path.join(out_dir, name), "w") as f:
                    f.write(f"// {consts}\n" + get_sass(compiled.asm["cubin"]))


def print_against_shipped(pairs, label, setting) -> None:
    """The table of (row, entry) pairs: each entry timed with one setting changed (entry[setting],
    the column `label`), against its row's time with the shipped settings."""
    if not pairs:
        return
    print(f"\n| B | S | capacity | format | shipped ms | {label} | ms | x shipped | rel err |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r, e in pairs:
        shipped = f"{r['ms']:.4f}" if "ms" in r else ""
        head = f"| {r['B']} | {r['S']} | {r['capacity']} | {r['mode']} | {shipped} | {e[setting]} |"
        if "ms" in e and "ms" in r:
            print(f"{head} {e['ms']:.4f} | {e['ms'] / r['ms']:.2f} | {e['rel_err']:.1e} |")
        else:
            print(f"{head} error: {e.get('error', r.get('error', ''))[:60]} | | |")


def parse_cases(text: str) -> list[tuple[int, int]]:
    try:
        cases = [tuple(int(x) for x in c.split("x")) for c in text.split(",")]
    except ValueError:
        cases = []
    if not cases or any(len(c) != 2 or min(c) <= 0 for c in cases):
        sys.exit(f"error: --cases takes BxS pairs of positive numbers, comma separated (e.g. 8x32768,1x1024), got '{text}'")
    return cases


def parse_modes(text: str) -> list[str]:
    modes = text.split(",")
    if unknown := [m for m in modes if m not in MODES]:
        sys.exit(f"error: unknown --modes {', '.join(unknown)}; pick from {', '.join(MODES)}")
    return modes


def main(argv=None):
    args = build_parser().parse_args(argv)
    cases, modes = parse_cases(args.cases), parse_modes(args.modes)
    if args.capacity is not None and (args.capacity < max(S for _, S in cases) or args.capacity % 128):
        sys.exit(f"error: --capacity takes a multiple of 128 (whole KIVI key groups) no smaller than the longest "
                 f"case ({max(S for _, S in cases)} tokens), got {args.capacity}; or leave it out")
    if not torch.cuda.is_available():
        sys.exit("error: bench_attention times the Triton kernel on a CUDA GPU and none is visible; run it on a GPU machine")
    os.makedirs(args.out, exist_ok=True)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = "unknown"
    result = {
        "command": " ".join(sys.argv), "commit": commit, "device": torch.cuda.get_device_name(),
        "torch": torch.__version__, "configs": {str(k): v for k, v in dk.CONFIGS.items()},
    }
    out_path = os.path.join(args.out, "bench_attention.json")

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
    for B, S in cases:
        n_sets = None
        sdpa_name, sdpa_ms = None, None
        for mode in modes:
            t0 = time.time()
            a0, nbytes, held = make_inputs(B, S, mode, args.capacity)
            n_sets = max(1, min(256, math.ceil(L2_ROTATE_BYTES / nbytes), SETS_MAX_BYTES // held))
            sets = [a0] + [clone_set(a0) for _ in range(n_sets - 1)]
            if sdpa_ms is None:
                s_sets, s_call, sdpa_name = sdpa_sets(B, S, max(1, min(256, math.ceil(L2_ROTATE_BYTES / (4 * B * HKV * S * D)))))
                sdpa_ms = bench(rotating(s_sets, s_call))
                del s_sets
            ref = da.decode_attention_reference(*a0)
            row = {"B": B, "S": S, "capacity": args.capacity or S, "mode": mode, "bytes": nbytes, "floor_ms": nbytes / bw / 1e9,
                   "sdpa_ms": sdpa_ms, "sdpa_backend": sdpa_name, "sets": n_sets}
            check_and_time(row, a0, sets, ref, Switched(mode))
            if "ms" in row:
                row["TBps"] = nbytes / row["ms"] / 1e9
            # row key: (the Switched setting, its values, asked for)
            for key, (setting, values, asked) in {"splits": ("min_split", SPLIT_SWEEP, args.splits),
                                                  "fill": ("fill", FILL_SWEEP, args.fill)}.items():
                if asked:
                    row[key] = [{setting: value} for value in values]
                    for entry in row[key]:
                        check_and_time(entry, a0, sets, ref, Switched(mode, **entry))
            if args.variants:
                row["variants"] = []
                for switch in VARIANTS.get(MODE_FORMAT.get(mode, mode), ()):
                    variant = {"flipped": f"{switch}={not getattr(dk, switch)}"}
                    check_and_time(variant, a0, sets, ref, Switched(mode, flip=switch))
                    row["variants"].append(variant)
            if args.sweep and (B, S) in ((8, 32768), (1, 32768)):
                configs = SWEEP.get(mode, []) if B == 8 else []
                if time.time() - t_start > args.budget_s:
                    configs = []
                for cfg in configs:
                    entry = {"B": B, "S": S, "mode": mode, "config": cfg}
                    check_and_time(entry, a0, sets, ref, Switched(mode, config=cfg), too_large=too_large_errors())
                    sweep.append(entry)
                save()
            rows.append(row)
            print(f"B={B:2d} S={S:6d} {mode:9s} " + (
                f"{row['ms']:.4f} ms {row['TBps']:.2f} TB/s (floor {row['floor_ms']:.4f}) err {row['rel_err']:.1e}"
                if "ms" in row else row.get("error", "")
            ) + "".join(f"; {v['flipped']} {v['ms']:.4f} ms" for v in row.get("variants", []) if "ms" in v)
                + f"  [{time.time() - t0:.0f}s]", flush=True)
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
                    print(f"  B={B} S={S} {mode:9s} {best['ms']:.4f} ms config {best['config']}")
        bad = [e for e in sweep if "error" in e or wrong(e)]
        print(f"  {len(bad)} sweep entries too large for this GPU or past {REL_TOL}")
        print("\n| mode | config (BLOCK_N, warps, stages, waves) | ms at 8 x 32768 | rel err |\n|---|---|---|---|")
        for e in sweep:
            print(f"| {e['mode']} | {tuple(e['config'])} | " + (f"{e['ms']:.4f} | {e['rel_err']:.1e} |" if "ms" in e
                                                                else f"error: {e.get('error', '')[:60]} | |"))
    print(f"\n| B | S | format | kernel ms | TB/s | floor ms | SDPA bf16 ms ({rows[0]['sdpa_backend']}) | rel err |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "ms" in r:
            print(f"| {r['B']} | {r['S']} | {r['mode']} | {r['ms']:.4f} | {r['TBps']:.2f} | {r['floor_ms']:.4f} "
                  f"| {r['sdpa_ms']:.4f} | {r['rel_err']:.1e} |")
        else:
            print(f"| {r['B']} | {r['S']} | {r['mode']} | error: {r['error'][:80]} |")
    split_rows = [(r, e) for r in rows for e in r.get("splits", [])]
    fill_rows = [(r, e) for r in rows for e in r.get("fill", [])]
    variants = [(r, v) for r in rows for v in r.get("variants", [])]
    print_against_shipped(split_rows, "MIN_SPLIT", "min_split")
    print_against_shipped(fill_rows, "FILL_WARPS_PER_SM", "fill")
    print_against_shipped(variants, "flipped", "flipped")
    if args.sass:
        write_sass(args.out)
    save()
    print(f"wrote {out_path}")
    if n_wrong := sum(map(wrong, rows + sweep + [v for _, v in variants] + [e for _, e in split_rows + fill_rows])):
        sys.exit(f"error: {n_wrong} kernel results differ from decode_attention_reference by more than {REL_TOL} "
                 f"(rel_err in {out_path}): a kernel bug; run tests/test_decode_attention.py on this GPU")


if __name__ == "__main__":
    main()
