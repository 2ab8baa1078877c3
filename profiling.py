"""`--profile NAME`: run a generation under torch.profiler and say where the time and memory went.

    with profile_run("quant4", device="cuda", model=model):
        generate(model, prompt, ...)

writes to outputs/ (or $ENGINE_OUTPUTS, or `out_dir`):
  NAME.json            Chrome/Perfetto trace (open in ui.perfetto.dev); our figures under "engine_profile"
  NAME.txt             key_averages tables (by op, by op and input shape), sorted by device time on
                       CUDA and CPU time on the CPU, with FLOPs and memory columns, then the summary
  NAME_memory.pickle   CUDA only: allocator history for https://pytorch.org/memory_viz
  NAME_summary.json    the summary's numbers
and prints a one-paragraph summary (scripts/summarize_profile.py computes it from the trace, so the
same command reproduces it later). Existing files are never replaced: NAME_1, NAME_2, ... are used
unless overwrite=True.

The profiler runs one warm-up step before the recorded window (a small op, so CUPTI/Kineto
start-up is not charged to the run). First-call costs of the model itself (cuBLAS handles, Triton
JIT, torch.compile) must be paid before entering: generate.py runs a short warm-up generation when
--profile is given, as it does for --compile.
"""
import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import torch
from torch.profiler import ProfilerActivity, profile, schedule

from scripts.summarize_profile import METADATA_KEY, format_summary, summarize

OUTPUT_DIR_ENV = "ENGINE_OUTPUTS"
SUFFIXES = (".json", ".txt", "_memory.pickle", "_summary.json")


def output_dir(out_dir=None) -> Path:
    return Path(out_dir or os.environ.get(OUTPUT_DIR_ENV) or "outputs")


def free_stem(out_dir: Path, name: str, overwrite: bool = False) -> Path:
    """out_dir/name, or out_dir/name_N with the first N that no existing output uses."""
    stem = out_dir / name
    n = 0
    while not overwrite and any(Path(f"{stem}{s}").exists() for s in SUFFIXES):
        n += 1
        stem = out_dir / f"{name}_{n}"
    return stem


def git_commit() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def model_bytes(model) -> dict:
    """Parameter bytes and the bytes every KV cache holds (cache.nbytes())."""
    if model is None:
        return {}
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    caches = [c for c in model.caches() if c is not None] if hasattr(model, "caches") else []
    return {"param_bytes": params, "kv_bytes": sum(c.nbytes() for c in caches) if caches else None}


@contextlib.contextmanager
def profile_run(name: str, overwrite: bool = False, device: str = "cpu", model=None, settings: Optional[dict] = None,
                out_dir=None, quiet: bool = False):
    """Profile the body of the `with` block; yields the torch.profiler.profile object.

    model: the Transformer whose caches are set up (for the KV-cache share of memory).
    settings: the strategy's options, shown in the summary and saved with the trace.
    """
    stem = free_stem(output_dir(out_dir), name, overwrite)  # a name with a folder in it is fine too
    stem.parent.mkdir(parents=True, exist_ok=True)
    cuda = str(device).startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    trace_path = Path(f"{stem}.json")

    prof = profile(
        activities=activities,
        # Step 0 is the profiler's warm-up (discarded), step 1 the recorded window: the whole block.
        schedule=schedule(wait=0, warmup=1, active=1, repeat=1),
        on_trace_ready=lambda p: p.export_chrome_trace(str(trace_path)),
        record_shapes=True,
        profile_memory=True,
        with_flops=True,
    )
    if cuda:
        torch.cuda.memory._record_memory_history(max_entries=200_000)
    prof.start()
    try:
        x = torch.ones(64, 64, device=device)
        (x @ x).sum().item()
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        prof.step()
        yield prof
        sync()
        meta = {"name": stem.name, "device": torch.cuda.get_device_name(device) if cuda else "cpu",
                "settings": settings or {}, "command": sys.argv, "git_commit": git_commit(), **model_bytes(model),
                "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if cuda else None}
        prof.add_metadata_json(METADATA_KEY, json.dumps(meta))
    finally:
        prof.stop()  # exports the trace (an exception in the block still leaves it behind)
        if cuda:
            torch.cuda.memory._dump_snapshot(f"{stem}_memory.pickle")
            torch.cuda.memory._record_memory_history(enabled=None)

    with open(trace_path) as f:
        summary = summarize(json.load(f))
    paragraph = format_summary(summary)
    sort_by = "self_device_time_total" if cuda else "self_cpu_time_total"
    averages = prof.key_averages()
    tables = [
        f"torch.profiler key averages, sorted by {sort_by}\n",
        averages.table(sort_by=sort_by, row_limit=60, max_name_column_width=70),
        f"\nby input shape (top 40), sorted by {sort_by}\n",
        prof.key_averages(group_by_input_shape=True).table(sort_by=sort_by, row_limit=40, max_name_column_width=50,
                                                           max_shapes_column_width=70),
        "\n" + paragraph + "\n",
    ]
    Path(f"{stem}.txt").write_text("\n".join(tables))
    Path(f"{stem}_summary.json").write_text(json.dumps(summary, indent=1))
    if not quiet:
        written = [f"{stem}{s}" for s in SUFFIXES if Path(f"{stem}{s}").exists()]
        print(f"profile written to {', '.join(written)}", file=sys.stderr)
        print(paragraph, file=sys.stderr)
