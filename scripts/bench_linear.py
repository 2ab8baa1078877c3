"""The sweep that chose linear_kernels.CONFIGS: every weight matrix of a preset's decode step (GPU).

For each matrix shape (wqkv, wo, w1/w3, w2, output, and the MLP's gate and up pair w1+w3 as the
gated kernel computes them, silu(x w1^T) * (x w3^T)) and weight kind (the model's bf16 and int8
codes with per-channel scales) it times the Triton kernel in every config of a fixed grid at
batch 1 (the CUDA-core and tensor-core paths) and at batch 8 (the tensor-core path, the config
for 2 to 16 rows), and keeps the fastest of each; beside it cuBLAS (F.linear over
bf16 weights; for int8 the codes converted to bf16 first, the reference's path) and, with
--inductor, what torch.compile with coordinate-descent tuning makes of the same product at
batch 1 (the path the decode step took before). Every timed config is checked against
linear_op.linear_reference. Time is the median of triton.testing.do_bench_cudagraph over weight
copies rotated past the L2; bandwidth is bytes read (weights, scales, activations) over time.

    python3 -m scripts.bench_linear [--model llama-3.1-8b] [--tp 1] [--matrices wqkv ...] [--rows 1 16]
        [--grid all|cuda-cores] [--inductor] [--out DIR]

Writes bench_linear.json to the --out folder (never over an existing one) and prints the table and
the CONFIGS entries to commit.
"""
import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

import linear_kernels as lk
import tp
from atomic_write import write_atomically
from linear_op import gated_reference, linear_reference
from model import ModelArgs
from scripts.benchmark import copy_bandwidth

ROTATE_BYTES = 256 << 20  # weight copies until this many bytes: timings past the 50 MB L2
REL_TOL = 1e-2  # bf16 output against the fp32-accumulated reference: a few bf16 ulps
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, split_k): the tensor-core path (BLOCK_M 16)
# for every row count, the CUDA-core path (BLOCK_M 1) for batch 1, whose stages are its tiles in
# flight per program (1, or 2: the loads one tile ahead).
DOT_GRID = [(16, bn, bk, w, st, sp) for bn in (16, 32, 64, 128) for bk in (128, 256, 512)
            for w in ((4,) if bn <= 32 else (4, 8)) for st in (3, 4) for sp in (1, 2, 4)]
FMA_GRID = [(1, bn, bk, w, st, sp) for bn in (8, 16, 32) for bk in (256, 512, 1024, 2048) for w in (4, 8)
            for st in (1, 2) for sp in (1, 2)]


GATED = "w1+w3"  # the gate and up pair: two [N, K] matrices in one kernel


def matrices(preset: str, tp: int) -> dict[str, tuple[int, int]]:
    """name -> (N, K) of one rank's weight matrices (w1 and w3 share a shape; GATED is the pair)."""
    c = ModelArgs.from_name(preset)
    hd = c.head_dim
    return {
        "wqkv": ((c.n_head + 2 * c.n_local_heads) * hd // tp, c.dim),
        "wo": (c.dim, c.n_head * hd // tp),
        "w1/w3": (c.intermediate_size // tp, c.dim),
        "w2": (c.dim, c.intermediate_size // tp),
        GATED: (c.intermediate_size // tp, c.dim),
        "output": (-(-c.vocab_size // tp), c.dim),  # tp.VocabShard: ceil(V / tp) rows a rank
    }


def candidates(n: int, k: int, esize: int, rows: int, gated: bool, grid: str = "all") -> list[tuple]:
    """The grids' configs that fit a shape: 2 to 31 programs per SM of an H200's 132 (K split only
    where whole rows give fewer), at least four tiles per split; on the tensor cores 16 to 128 KB
    of tiles in flight, on the CUDA cores at most 64 fp32 partial sums (one per 32-bit word of
    weights) per thread. The gated kernel streams two slabs per program, unsplit, so it counts
    from one program per SM. grid "cuda-cores": only the CUDA-core configs (batch 1)."""
    slabs = 2 if gated else 1
    fewest = 132 if gated else 264
    keep = []
    for cfg in (DOT_GRID if grid == "all" else []) + (FMA_GRID if rows == 1 else []):
        bm, bn, bk, w, st, sp = cfg
        programs = n // bn * sp
        if n % bn or (sp > 1 and (n // bn >= 264 or gated)) or not fewest <= programs <= 4096 or k // sp < 4 * bk:
            continue
        if bm > 1 and not 16 << 10 <= bn * bk * esize * st * slabs <= 128 << 10:
            continue
        if bm == 1 and bn * bk * esize // 4 * slabs > 64 * 32 * w:
            continue
        keep.append(cfg)
    return keep


def bench(fn) -> float:
    import triton

    return triton.testing.do_bench_cudagraph(fn, rep=20, return_mode="median")


def make_weights(n: int, k: int, kind: str, slabs: int) -> list[tuple]:
    """Copies of (weight, scales) (slabs 1) or (gate, scales, up, scales) (slabs 2) filling
    ROTATE_BYTES (at least one)."""
    esize = 1 if kind == "int8" else 2
    copies = max(1, ROTATE_BYTES // (n * k * esize * slabs))

    def one():
        if kind == "int8":
            return (torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8),
                    torch.rand(n, device="cuda", dtype=torch.bfloat16) * 0.002)
        return torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02, None

    return [sum((one() for _ in range(slabs)), ()) for _ in range(copies)]


def per_copy_ms(weights, x, call) -> float:
    def run():
        for args in weights:
            call(x, *args)
    return bench(run) / len(weights)


def rel_err(out, ref) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def kernel(x, w, s, up=None, up_scales=None):
    return lk.triton_linear(x, w, s, None, up=up, up_scales=up_scales)


def reference(x, w, s, up=None, up_scales=None):
    """The product (or the gated pair) in PyTorch, the activations' dtype."""
    if up is None:
        return linear_reference(x, w, s)
    return gated_reference(x, w, up, s, up_scales)


def float64(x, w, s, up=None, up_scales=None):
    y = x.double() @ w.double().T * (1 if s is None else s.double())
    return y if up is None else torch.nn.functional.silu(y) * float64(x, up, up_scales)


def sweep_rows(entry, weights, x, rows, esize, grid):
    """Every candidate config for `rows` (1, or DECODE_ROWS timed at x's rows) and the committed
    one, checked against the reference and timed; entry gets them and the fastest."""
    from triton.runtime.errors import OutOfResources

    n, k = entry["N"], entry["K"]
    ref = float64(x, *weights[0])
    gated = entry["matrix"] == GATED
    key = (entry["kind"] + (" gated" if gated else ""), n, k, rows)
    committed = lk.CONFIGS.get(key)
    timed = []
    configs = candidates(n, k, esize, rows, gated, grid)
    for cfg in configs + ([committed] if committed and committed not in configs else []):
        lk.CONFIGS[key] = cfg
        try:
            err = rel_err(kernel(x, *weights[0]), ref)
            ms = per_copy_ms(weights, x, kernel)
        except OutOfResources as e:
            entry["configs"].append({"rows": rows, "config": cfg, "error": repr(e)[:200]})
            continue
        if not err <= REL_TOL:
            sys.exit(f"wrong result: {entry['matrix']} {entry['kind']} config {cfg}: rel err {err:.3g}")
        timed.append({"rows": rows, "config": cfg, "ms": ms, "rel_err": err})
    if not timed:
        sys.exit(f"error: no config of the grid fits {entry['kind']} {entry['matrix']} ({n} x {k}) at {rows} row(s) "
                 "and none is committed; leave it out with --matrices")
    best = min(timed, key=lambda c: c["ms"])
    if committed is None:
        lk.CONFIGS.pop(key)
    else:
        lk.CONFIGS[key] = committed
    entry["configs"] += timed
    entry[f"best_rows{rows}"] = best


def sweep_shape(name, n, k, kind, args) -> dict:
    esize = 1 if kind == "int8" else 2
    slabs = 2 if name == GATED else 1
    weights = make_weights(n, k, kind, slabs)
    x1 = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    x8 = torch.randn(8, k, device="cuda", dtype=torch.bfloat16)
    nbytes = (n * k * esize + (n * 2 if kind == "int8" else 0)) * slabs
    entry = {"matrix": name, "N": n, "K": k, "kind": kind, "bytes": nbytes, "configs": []}
    entry["cublas_ms_b1"] = per_copy_ms(weights, x1, reference)
    entry["cublas_ms_b8"] = per_copy_ms(weights, x8, reference)
    if args.inductor:
        import torch._inductor.config as icfg

        torch._dynamo.reset()
        with icfg.patch(coordinate_descent_tuning=True):
            compiled = torch.compile(reference, fullgraph=True)
            compiled(x1, *weights[0])
        entry["inductor_ms_b1"] = per_copy_ms(weights, x1, compiled)
    for rows in args.rows:
        sweep_rows(entry, weights, x1 if rows == 1 else x8, rows, esize, args.grid)
    del weights
    torch.cuda.empty_cache()
    return entry


def check_args(args) -> tuple[dict, Path]:
    """The matrices to sweep and the results' path, or ValueError saying what to pass instead:
    before any GPU work, and an existing result is never overwritten."""
    config = ModelArgs.from_name(args.model)  # ValueError names the presets
    if args.tp not in tp.valid_world_sizes(config):
        raise ValueError(f"--tp {args.tp} does not divide {args.model}'s heads and MLP; use one of {tp.valid_world_sizes(config)}")
    if args.grid == "cuda-cores" and args.rows != [1]:
        raise ValueError("--grid cuda-cores sweeps batch-1 configs only; pass --rows 1")
    path = Path(args.out) / "bench_linear.json"
    if path.exists():
        raise ValueError(f"{path} exists; pass another --out (results are never overwritten)")
    if path.parent.exists() and not path.parent.is_dir():
        raise ValueError(f"--out {path.parent} is a file; pass a folder")
    return matrices(args.model, args.tp), path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-3.1-8b", help="preset whose matrices are swept (default: %(default)s)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks: sweep one rank's shards (default: %(default)s)")
    p.add_argument("--kinds", nargs="+", choices=["bf16", "int8"], default=["bf16", "int8"],
                   help="weight kinds (default: bf16 int8)")
    p.add_argument("--matrices", nargs="+", choices=["wqkv", "wo", "w1/w3", "w2", "output", GATED],
                   help="sweep only these (default: all)")
    p.add_argument("--rows", nargs="+", type=int, choices=[1, lk.DECODE_ROWS], default=[1, lk.DECODE_ROWS],
                   help="sweep the configs for batch 1 and/or 2-16 rows (default: both)")
    p.add_argument("--grid", choices=["all", "cuda-cores"], default="all",
                   help="all configs, or only the batch-1 CUDA-core ones beside the committed config "
                        "(to re-sweep that path; default: %(default)s)")
    p.add_argument("--inductor", action="store_true", help="also time torch.compile's product at batch 1")
    p.add_argument("--out", default=os.environ.get("OUT", "outputs"),
                   help="folder for bench_linear.json (default: $OUT when set, else outputs; now %(default)s)")
    args = p.parse_args(argv)
    try:
        shapes, path = check_args(args)
    except ValueError as e:
        sys.exit(f"error: {e}")
    if not torch.cuda.is_available():
        sys.exit("error: bench_linear times GPU kernels and no CUDA GPU is visible; run it on a GPU machine")
    path.parent.mkdir(parents=True, exist_ok=True)
    copy = copy_bandwidth("cuda") / 1e12
    print(f"{torch.cuda.get_device_name()}  copy {copy:.2f} TB/s", flush=True)
    result = {"command": " ".join(sys.argv), "device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "copy_tb_s": copy, "entries": []}
    t0 = time.time()
    for kind in args.kinds:
        for name, (n, k) in shapes.items():
            if args.matrices and name not in args.matrices:
                continue
            e = sweep_shape(name, n, k, kind, args)
            result["entries"].append(e)
            ind = f"  inductor {e['inductor_ms_b1'] * 1e3:6.1f}" if "inductor_ms_b1" in e else ""
            best = ""
            for rows in args.rows:
                b = e[f"best_rows{rows}"]
                tb = e["bytes"] / b["ms"] / 1e9
                best += (f"{'b1' if rows == 1 else 'b8'} {b['ms'] * 1e3:6.1f} us {b['config']!s:24s} "
                         f"({tb:.2f} TB/s, {tb / copy:.0%} of copy)  ")
            print(f"{kind:4s} {name:6s} {n:6d}x{k:<5d} {best}"
                  f"cuBLAS b1 {e['cublas_ms_b1'] * 1e3:6.1f} b8 {e['cublas_ms_b8'] * 1e3:6.1f}{ind}  "
                  f"[{len(e['configs'])} configs, {time.time() - t0:.0f} s]", flush=True)
    print("CONFIGS = {")
    for e in result["entries"]:
        for rows in args.rows:
            kind = e["kind"] + (" gated" if e["matrix"] == GATED else "")
            print(f"    ({kind!r}, {e['N']}, {e['K']}, {rows}): {tuple(e[f'best_rows{rows}']['config'])},  # {e['matrix']}")
    print("}")
    text = json.dumps(result, indent=1)
    write_atomically(path, lambda tmp: tmp.write_text(text))
    rows = args.rows[0]
    print(f"wrote {path}; median of the chosen configs' fraction of copy bandwidth at {rows} row(s): "
          f"{statistics.median(e['bytes'] / e[f'best_rows{rows}']['ms'] / 1e9 / copy for e in result['entries']):.0%}")


if __name__ == "__main__":
    main()
