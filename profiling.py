"""`--profile NAME`: record the prefill and the first decode steps of a generation under torch.profiler
and say where the time and memory went.

    with profile_run("quant4", steps=8, device="cuda", model=model) as recorder:
        generate(model, prompt, ..., on_token=lambda tok: recorder.step())

The recorded window is the prefill with the first token, then `steps` decode steps (recorder.step()
is called after each token); recording then stops while the generation goes on, so the trace and the
time to write it stay small however many tokens are generated (the default model on the CPU: about
1.8 MB of trace and 0.8 s of writing per recorded step; decode steps are alike, so a few of them say
where the time goes). detail=True also records input shapes, memory, Python stacks and FLOPs, and on
CUDA the allocator's history: a trace about 3x larger and 3x slower to write, for a closer look.

Writes to outputs/ next to this file (or $ENGINE_OUTPUTS, or `out_dir`):
  NAME.json            Chrome/Perfetto trace (open in ui.perfetto.dev); our figures under "engine_profile"
  NAME.txt             key_averages table by op (with detail: FLOPs and memory columns, and a table by
                       op and input shape), sorted by device time on CUDA and CPU time on the CPU, then
                       the summary
  NAME_memory.pickle   CUDA with detail only: allocator history for https://pytorch.org/memory_viz
  NAME_summary.json    the summary's numbers
and prints a one-paragraph summary (profile_summary.py computes it from the trace, so the
same command reproduces it later). Existing files are never replaced: NAME_1, NAME_2, ... are used
unless overwrite=True. Progress and results go to stderr: stdout is the generated text's.

The profiler runs one warm-up step before the recorded window (a small op, so CUPTI/Kineto
start-up is not charged to the run). First-call costs of the model itself (cuBLAS handles, Triton
JIT, torch.compile) must be paid before entering: generate.py runs a short warm-up generation when
--profile is given, as it does for --compile.
"""
import contextlib
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Callable, Optional

import torch
from torch.profiler import ProfilerActivity, profile, schedule

from profile_summary import METADATA_KEY, format_summary, summarize

# Kineto logs to stderr, and at its default level still prints a line when recording starts and
# when it stops (its highest level, USDT); the stop comes mid-generation and lands inside the text
# streamed to the terminal. Set above every level unless the user chose one (KINETO_LOG_LEVEL=4
# shows Kineto's errors). Kineto reads it when a profiler first starts, so setting it here is in time.
os.environ.setdefault("KINETO_LOG_LEVEL", "6")

OUTPUT_DIR_ENV = "ENGINE_OUTPUTS"
DEFAULT_OUTPUT_DIR = Path(__file__).resolve().parent / "outputs"  # the repository's, wherever the command runs
SUFFIXES = (".json", ".txt", "_memory.pickle", "_summary.json")


def profiler_range(name: str):
    """A torch.profiler range in eager runs, named as profiling.py's summary sorts time
    ("kv_attend", "kv_quantize", "kv_dequantize"); nothing inside a compiled graph."""
    if torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return torch.profiler.record_function(name)


def output_dir(out_dir=None) -> Path:
    return Path(out_dir or os.environ.get(OUTPUT_DIR_ENV) or DEFAULT_OUTPUT_DIR)


def check_profile_name(name: str, out_dir=None) -> None:
    """Raise ValueError, one line saying what to do, unless NAME.* can be written inside the outputs
    folder. Called before the model is loaded, so a bad name costs nothing."""
    out = output_dir(out_dir)
    path = Path(name)
    if path.is_absolute():
        where, stem = (path, "run1") if path.is_dir() else (path.parent, path.name)
        raise ValueError(f"--profile takes a name inside the outputs folder ({out}), not an absolute path ('{name}'); "
                         f"to write into {where}, set {OUTPUT_DIR_ENV}={where} and pass --profile {stem}")
    if ".." in path.parts:
        inside = "/".join(p for p in path.parts if p != "..") or "run1"
        raise ValueError(f"--profile takes a name inside the outputs folder ({out}), without '..' ('{name}'); "
                         f"e.g. --profile {inside}, or set {OUTPUT_DIR_ENV} to write elsewhere")
    if not name or name.endswith(("/", ".")) or (out / name).is_dir():
        raise ValueError(f"--profile takes a name for the files it writes (NAME.json, NAME.txt, ...), not a folder "
                         f"('{name}'); e.g. --profile {Path(name.rstrip('/.')) / 'run1'}")
    for folder in reversed(path.parents[:-1]):  # outermost first; parents[-1] is "."
        if (out / folder).exists() and not (out / folder).is_dir():
            raise ValueError(f"--profile {name} needs {out / folder} to be a folder, but it is a file; "
                             f"pick another name, e.g. --profile {name.replace('/', '_')}")


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


class Recorder:
    """What profile_run yields: call step() after the prefill's first token and after each further token."""

    def __init__(self, prof: profile, steps: int, on_close: Callable[[int], None]):
        self.prof, self.steps, self.on_close = prof, steps, on_close
        self.tokens = 0

    def step(self) -> None:
        self.tokens += 1
        if self.tokens == self.steps + 1:  # this step() ends the window: the schedule stops recording
            self.on_close(self.steps)
        self.prof.step()

    def stop(self) -> None:
        if self.tokens <= self.steps:  # the generation ended first (EOS, few tokens, an error)
            self.on_close(max(self.tokens - 1, 0))
        self.prof.stop()


@contextlib.contextmanager
def profile_run(name: str, steps: int, overwrite: bool = False, device: str = "cpu", model=None,
                settings: Optional[dict] = None, out_dir=None, quiet: bool = False, detail: bool = False):
    """Profile the prefill and the first `steps` decode steps of the generation in the `with` block;
    yields a Recorder, whose step() the generation calls after each token.

    model: the Transformer whose caches are set up (for the KV-cache share of memory).
    settings: the strategy's options, shown in the summary and saved with the trace.
    detail: also record shapes, memory, stacks and FLOPs (and the CUDA allocator history).
    """
    check_profile_name(name, out_dir)  # never write outside the outputs folder, whoever calls
    stem = free_stem(output_dir(out_dir), name, overwrite)
    stem.parent.mkdir(parents=True, exist_ok=True)
    cuda = str(device).startswith("cuda")
    history = cuda and detail  # a stack trace per allocation: large, so only on request
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    say = (lambda message: None) if quiet else (lambda message: print(message, file=sys.stderr, flush=True))
    trace_path = Path(f"{stem}.json")

    prof = profile(
        activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []),
        # Step 0 is the profiler's warm-up (discarded); steps 1 .. steps + 1 are recorded: the
        # prefill with the first token, then one decode step per Recorder.step(). Then it stops.
        schedule=schedule(wait=0, warmup=1, active=steps + 1, repeat=1),
        # Measured on the default model, CPU: each of these makes the trace 1.6-1.8x larger and
        # the profiled steps slower (stacks also double the time to build the tables); all four:
        # 3x the trace and 3x the time to write it.
        record_shapes=detail,
        profile_memory=detail,
        with_stack=detail,
        with_flops=detail,
    )
    # Gathered now, as the window's own time must not include a git call.
    meta = {"name": stem.name, "device": torch.cuda.get_device_name(device) if cuda else "cpu",
            "settings": settings or {}, "command": sys.argv, "git_commit": git_commit(), **model_bytes(model)}
    snapshot = []  # the allocator history at the window's end (CUDA, detail)

    def close_window(decode_steps: int) -> None:
        # Runs just before the window's last step ends: Kineto keeps only the metadata added while
        # it records, and the peak memory is the window's.
        sync()
        meta["decode_steps"] = decode_steps
        meta["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device) if cuda else None
        prof.add_metadata_json(METADATA_KEY, json.dumps(meta))
        if history:
            snapshot.append(torch.cuda.memory._snapshot())
            torch.cuda.memory._record_memory_history(enabled=None)

    if history:
        torch.cuda.memory._record_memory_history(max_entries=200_000)
    prof.start()
    x = torch.ones(64, 64, device=device)
    (x @ x).sum().item()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    prof.step()
    recorder = Recorder(prof, steps, close_window)
    try:
        yield recorder
    finally:
        recorder.stop()
        # The trace (and the allocator history) are written even when the block failed: they may say why.
        say(f"writing profile ({len(prof.profiler.kineto_results.events())} events) to {stem}.* ...")
        prof.export_chrome_trace(str(trace_path))
        if snapshot:
            with open(f"{stem}_memory.pickle", "wb") as f:
                pickle.dump(snapshot[0], f)

    with open(trace_path) as f:
        summary = summarize(json.load(f))
    paragraph = format_summary(summary)
    sort_by = "self_device_time_total" if cuda else "self_cpu_time_total"
    tables = [f"torch.profiler key averages, sorted by {sort_by}\n",
              prof.key_averages().table(sort_by=sort_by, row_limit=60, max_name_column_width=70)]
    if detail:
        by_shape = prof.key_averages(group_by_input_shape=True)
        tables += [f"\nby input shape (top 40), sorted by {sort_by}\n",
                   by_shape.table(sort_by=sort_by, row_limit=40, max_name_column_width=50, max_shapes_column_width=70)]
    Path(f"{stem}.txt").write_text("\n".join([*tables, "\n" + paragraph + "\n"]))
    Path(f"{stem}_summary.json").write_text(json.dumps(summary, indent=1))
    written = [f"{stem}{s}" for s in SUFFIXES if s != "_memory.pickle" or snapshot]
    say(f"profile written to {', '.join(written)}")
    say(paragraph)
