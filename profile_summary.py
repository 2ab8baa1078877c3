"""Where the time went in a `--profile` trace: what profiling.py prints after a run and
`python -m scripts.summarize_profile` prints for saved traces, side by side.

Reads the Chrome trace that torch.profiler writes (no torch needed) and splits the time into
attention, matmuls, KV quantize/dequantize and the rest; the shares add up to 100%.

Which time: with device events (CUDA kernels, copies, memsets) the split is of GPU busy time, each
kernel charged to the op that launched it; without, of the host's time inside the recorded window,
each op's *self* time (its duration minus its children's), so nothing is counted twice and the
time between ops (Python, dispatch) shows up under "other".

With device events it also says how long the GPU sat idle (no kernel, copy or memset running on
any stream) between the first device event and the last, and between which kernels the longest
idle stretches fell: the launch gaps and host waits that a faster kernel cannot remove; and the
kernels by launch shape (name, grid, block), so that one kernel's calls on different matrices
(the engine's linear_kernel: wqkv, wo, the MLP's pair, w2, the output layer) are told apart where
their grids or blocks differ (two matrices launched alike share a row: the 8B model's wo and w2
at batch 1), each with its GPU time and its advance (the busy time no earlier event covers).

Categories, for an event and its ancestors on the same thread:
  1. the innermost enclosing profiler range named kv_quantize / kv_dequantize / kv_attend
     (torch.profiler.record_function labels that the caches may set) decides;
  2. else the outermost enclosing op with a known name: SDPA, flash attention and our decode
     kernel `kvcache::decode_attention` are attention; aten::linear/mm/addmm/bmm/matmul/einsum
     are matmuls (an outermost SDPA swallows the bmm's of its math path);
  3. else, for a GPU kernel, its own name (gemm/gemv and the engine's linear_kernel -> matmul;
     flash/fmha and the engine's decode-attention kernels -> attention); else "other".
"""
from collections import defaultdict

CATEGORIES = ("attention", "matmul", "kv_quant", "other")
LABELS = {"attention": "attention", "matmul": "matmuls", "kv_quant": "KV quantize/dequantize", "other": "other"}
# record_function range names -> category (rule 1).
RANGES = {"kv_quantize": "kv_quant", "kv_dequantize": "kv_quant", "kv_attend": "attention"}
ATTENTION_OPS = ("scaled_dot_product", "flash_attention", "efficient_attention", "cudnn_attention", "decode_attention")
MATMUL_OPS = {"aten::linear", "aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul",
              "aten::einsum", "aten::_addmm_activation", "aten::addmv", "aten::mv", "aten::dot"}
ATTENTION_KERNELS = ("flash", "fmha", "attention", "attn")
MATMUL_KERNELS = ("gemm", "gemv", "cublas", "cutlass", "xmma", "nvjet", "matmul", "_mm_", "splitk")
# The decode-attention Triton kernels (decode_kernels*.py): named here because CUDA-graph replays
# (--compile on CUDA) hide the op that launched them.
DECODE_KERNELS = {"token_partial_kernel", "body_and_exact_partial_kernel", "kivi_and_exact_partial_kernel",
                  "combine_kernel"}
LINEAR_KERNELS = {"linear_kernel"}  # the products' Triton kernel (linear_kernels.py), for the same reason
DEVICE_CATS = {"kernel", "gpu_memcpy", "gpu_memset"}
HOST_CATS = {"cpu_op", "user_annotation", "cuda_runtime", "cuda_driver"}
METADATA_KEY = "engine_profile"
BETWEEN_OPS = "(between ops: Python, dispatch)"


def op_category(name: str):
    if any(p in name for p in ATTENTION_OPS):
        return "attention"
    if name in MATMUL_OPS:
        return "matmul"
    return None


def kernel_category(name: str) -> str:
    low = name.lower()
    if name in DECODE_KERNELS or "decode_attention" in low or any(p in low for p in ATTENTION_KERNELS):
        return "attention"
    if name in LINEAR_KERNELS or any(p in low for p in MATMUL_KERNELS):
        return "matmul"
    return "other"


def _host_tree(events: list[dict]) -> tuple[dict, dict]:
    """Self time and category of every host event (by index), from the nesting on each thread."""
    by_thread = defaultdict(list)
    for i, e in enumerate(events):
        by_thread[(e.get("pid"), e.get("tid"))].append(i)
    self_us, category = {}, {}
    for idx in by_thread.values():
        idx.sort(key=lambda i: (events[i]["ts"], -events[i]["dur"]))
        stack = []  # (index, end, range category or None, op category or None)
        for i in idx:
            e = events[i]
            start, end = e["ts"], e["ts"] + e["dur"]
            while stack and stack[-1][1] <= start:
                stack.pop()
            parent = stack[-1] if stack else None
            if parent is not None:
                # Timestamps are rounded: a child may end a hair after its parent. Clip it, so
                # every microsecond is counted once and the self times add up to the root's.
                end = min(end, parent[1])
                self_us[parent[0]] -= end - start
            in_range = RANGES.get(e["name"]) or (parent[2] if parent else None)  # innermost range
            in_op = (parent[3] if parent else None) or op_category(e["name"])  # outermost op
            category[i] = in_range or in_op or "other"
            self_us[i] = end - start
            stack.append((i, end, in_range, in_op))
    return self_us, category


def device_idle(device: list[dict], top: int = 5) -> dict:
    """The GPU's idle time in the window from the first device event's start to the last one's
    end (events on every stream together; overlapping ones, as with programmatic dependent launch,
    count once), and the `top` boundaries with the most of it: for each, the event that ended last
    before the gap and the one that started it, with the summed gap (us), how often it came and its
    longest single gap (a trace's first step can wait hundreds of us on the host's first graph
    launch, a one-off that the steps after it do not repeat)."""
    events = sorted(device, key=lambda e: e["ts"])
    if not events:
        return {}
    first = events[0]
    window_start, run_start = first["ts"], first["ts"]
    run_end, last_name = first["ts"] + first["dur"], first["name"]
    busy = idle = 0.0
    gaps = defaultdict(lambda: [0.0, 0, 0.0])
    for e in events[1:]:
        start, end = e["ts"], e["ts"] + e["dur"]
        if start > run_end:
            busy += run_end - run_start
            idle += start - run_end
            gap = gaps[(last_name, e["name"])]
            gap[0] += start - run_end
            gap[1] += 1
            gap[2] = max(gap[2], start - run_end)
            run_start = start
        if end >= run_end:
            run_end, last_name = end, e["name"]
    busy += run_end - run_start
    window = run_end - window_start
    largest = sorted(gaps.items(), key=lambda kv: -kv[1][0])[:top]
    return {"window_us": window, "busy_us": busy, "idle_us": idle, "idle_share": idle / window if window else 0.0,
            "gaps": [{"before": a, "after": b, "us": us, "count": n, "longest_us": longest}
                     for (a, b), (us, n, longest) in largest]}


def kernel_launches(device: list[dict], top: int = 12) -> list[dict]:
    """The `top` kernels by summed time, one row per launch shape: name, grid, block, calls, us in
    all and per call, and their advance: the time each call kept the GPU busy past every event that
    started before it. Durations overlap where programmatic dependent launch starts a kernel while
    the one before still runs (its early programs wait, and that wait is in its duration), so they
    add up to more than the run; the advances add up to the GPU's busy time, so in a chain of
    kernels that each wait for the one before (a batch-1 decode step) they split the step's
    critical path by kernel. (Copies and memsets have no shape; they keep one row per name.)"""
    shapes = defaultdict(lambda: [0.0, 0, 0.0])
    run_end = float("-inf")
    for e in sorted(device, key=lambda e: e["ts"]):
        args = e.get("args", {})
        shape = shapes[(e["name"], str(args.get("grid", "")), str(args.get("block", "")))]
        end = e["ts"] + e["dur"]
        shape[0] += e["dur"]
        shape[1] += 1
        shape[2] += max(0.0, end - max(e["ts"], run_end))
        run_end = max(run_end, end)
    largest = sorted(shapes.items(), key=lambda kv: -kv[1][0])[:top]
    return [{"name": n, "grid": g, "block": b, "calls": c, "us": us, "us_per_call": us / c, "advance_us": adv}
            for (n, g, b), (us, c, adv) in largest]


def format_launches(s: dict) -> str:
    """The kernels-by-launch-shape table of a summary with device events ("" without)."""
    if not s.get("launches"):
        return ""
    lines = [f"{'ms':>9} {'advance':>9} {'calls':>6} {'us/call':>8}  kernel, grid, block"]
    lines += [f"{k['us'] / 1000:9.3f} {k['advance_us'] / 1000:9.3f} {k['calls']:6d} {k['us_per_call']:8.2f}  "
              f"{k['name'][:70]}, {k['grid']}, {k['block']}" for k in s["launches"]]
    return "\n".join(lines)


def summarize(trace: dict) -> dict:
    """Per-category time (us) and share, the top ops, and the memory figures saved with the trace."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and "dur" in e]
    host = [e for e in events if e.get("cat") in HOST_CATS]
    device = [e for e in events if e.get("cat") in DEVICE_CATS]
    self_us, category = _host_tree(host)

    times = dict.fromkeys(CATEGORIES, 0.0)
    ops = defaultdict(float)
    if device:
        # A kernel belongs to the op that launched it: same "External id", else via the runtime
        # call's "correlation".
        by_ext, by_corr = {}, {}
        for i, e in enumerate(host):
            args = e.get("args", {})
            if e.get("cat") in ("cpu_op", "user_annotation") and "External id" in args:
                by_ext.setdefault(args["External id"], category[i])
            if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in args:
                by_corr[args["correlation"]] = category[i]
        for e in device:
            args = e.get("args", {})
            cat = by_corr.get(args.get("correlation")) or by_ext.get(args.get("External id")) or "other"
            if cat == "other":
                cat = kernel_category(e["name"])
            times[cat] += e["dur"]
            ops[e["name"]] += e["dur"]
        basis = "GPU time (kernels, copies, memsets)"
    else:
        for i, e in enumerate(host):
            times[category[i]] += self_us[i]
            # The recorded window's own self time is the time outside every op.
            name = BETWEEN_OPS if e["name"].startswith("ProfilerStep#") else e["name"]
            ops[name] += self_us[i]
        basis = "CPU time (self time of each op; time between ops counted as other)"
    total = sum(times.values())
    top = sorted(ops.items(), key=lambda kv: -kv[1])[:10]
    return {
        "basis": basis,
        "total_us": total,
        "times_us": times,
        "shares": {c: (t / total if total else 0.0) for c, t in times.items()},
        "top_ops": [{"name": n, "us": t, "share": t / total if total else 0.0} for n, t in top],
        "ranges_seen": sorted({e["name"] for e in host if e["name"] in RANGES}),
        "idle": device_idle(device),
        "launches": kernel_launches(device),
        "meta": trace.get(METADATA_KEY, {}),
    }


def memory_sentence(meta: dict) -> str:
    kv = meta.get("kv_bytes")
    if kv is None:
        return "KV-cache share of memory: unknown (no model was given to the profiler)."
    mib = kv / 2**20
    if meta.get("peak_memory_bytes"):
        peak = meta["peak_memory_bytes"]
        return (f"KV cache {mib:.2f} MiB = {kv / peak:.1%} of peak GPU memory allocated "
                f"({peak / 2**20:.1f} MiB, torch.cuda.max_memory_allocated).")
    params = meta.get("param_bytes", 0)
    return (f"KV cache {mib:.2f} MiB = {kv / (params + kv):.1%} of model parameters + KV cache "
            f"({(params + kv) / 2**20:.1f} MiB; on the CPU there is no allocator peak to compare with).")


def format_summary(s: dict) -> str:
    """The one-paragraph summary printed after a profiled run."""
    meta = s["meta"]
    what = ", ".join(f"{k}={v}" for k, v in meta.get("settings", {}).items()) or "run"
    parts = ", ".join(f"{LABELS[c]} {s['shares'][c]:.1%}" for c in CATEGORIES)
    top = "; ".join(f"{o['name']} {o['share']:.1%}" for o in s["top_ops"][:3])
    where = meta.get("device", "?")
    if "decode_steps" in meta:  # traces from profiling.py: the window it recorded
        where += f", prefill + {meta['decode_steps']} decode steps"
    ranges = ("" if s["ranges_seen"] else
              " (no kv_quantize/kv_dequantize/kv_attend ranges in this trace: quantize/dequantize "
              "ops are counted by their enclosing op, mostly as other)")
    return (f"Profile summary ({what}, {where}): of {s['total_us'] / 1000:.1f} ms {s['basis']}, "
            f"{parts}{ranges}. Top ops: {top}. {idle_sentence(s.get('idle'))}{memory_sentence(meta)}")


def idle_sentence(idle) -> str:
    """The GPU's idle time and its largest boundary, or nothing for a trace without device events."""
    if not idle:
        return ""
    text = (f"GPU idle {idle['idle_us'] / 1000:.2f} ms of the {idle['window_us'] / 1000:.2f} ms from its first "
            f"kernel to its last ({idle['idle_share']:.1%})")
    if idle["gaps"]:
        g = idle["gaps"][0]
        text += (f", most of it after {g['before'][:60]} before {g['after'][:60]} "
                 f"({g['us'] / 1000:.2f} ms, {_gaps(g)})")
    return text + ". "


def _gaps(g) -> str:
    if g["count"] == 1:
        return "1 gap"
    return f"{g['count']} gaps, the longest {g['longest_us'] / 1000:.2f} ms"


def format_comparison(names: list[str], summaries: list[dict]) -> str:
    width = max(24, *(len(n) for n in names))
    lines = [f"{'category':<24}" + "".join(f"{n:>{width}}" for n in names)]
    for c in CATEGORIES:
        row = "".join(f"{s['times_us'][c] / 1000:>{width - 9}.2f} ms {s['shares'][c]:>5.1%}" for s in summaries)
        lines.append(f"{LABELS[c]:<24}{row}")
    lines.append(f"{'total':<24}" + "".join(f"{s['total_us'] / 1000:>{width - 9}.2f} ms {1:>5.0%}" for s in summaries))
    kv = "".join(f"{(s['meta'].get('kv_bytes') or 0) / 2**20:>{width - 4}.2f} MiB" for s in summaries)
    lines.append(f"{'KV cache':<24}{kv}")
    if any(s.get("idle") for s in summaries):
        idle = "".join(f"{s['idle']['idle_us'] / 1000:>{width - 9}.2f} ms {s['idle']['idle_share']:>5.1%}" if s.get("idle")
                       else f"{'-':>{width}}" for s in summaries)
        lines.append(f"{'GPU idle (of window)':<24}{idle}")
    for n, s in zip(names, summaries):
        lines.append(f"\ntop ops of {n} ({s['basis']}):")
        lines += [f"  {o['us'] / 1000:10.2f} ms {o['share']:6.1%}  {o['name'][:90]}" for o in s["top_ops"]]
        if s.get("idle", {}).get("gaps"):
            lines.append(f"largest GPU idle gaps of {n} (the event before, the one after):")
            lines += [f"  {g['us'] / 1000:10.3f} ms in {g['count']:5d} (longest {g['longest_us'] / 1000:.3f})  "
                      f"{g['before'][:50]} -> {g['after'][:50]}" for g in s["idle"]["gaps"]]
    return "\n".join(lines)
