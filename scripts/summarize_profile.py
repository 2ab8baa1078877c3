"""Where the time went in saved `--profile` traces, and two traces side by side.

    python -m scripts.summarize_profile outputs/full.json
    python -m scripts.summarize_profile outputs/full.json outputs/int4.json   # e.g. full vs quantize_kv

A trace may be gzipped (TRACE.json.gz).

profile_summary.py says how the time is split. With GPU kernels in the trace it also lists them
by launch shape (name, grid, block): calls, time in all and per call, and each shape's advance.
"""
import argparse
import gzip
import json
import sys
from pathlib import Path

from atomic_write import write_atomically
from profile_summary import format_comparison, format_launches, format_summary, summarize


def load(path: Path) -> dict:
    """A Chrome trace, plain or gzipped (traces are often compressed to move them)."""
    try:
        with open(path, "rb") as f:
            gzipped = f.read(2) == b"\x1f\x8b"
        with (gzip.open(path, "rt") if gzipped else open(path)) as f:
            return json.load(f)
    except FileNotFoundError:
        raise SystemExit(f"error: {path} not found; make one with `python generate.py ... --profile NAME`")
    except IsADirectoryError:
        raise SystemExit(f"error: {path} is a folder; pass the trace file in it (TRACE.json or TRACE.json.gz)")
    except (json.JSONDecodeError, UnicodeDecodeError, EOFError, gzip.BadGzipFile) as e:
        raise SystemExit(f"error: {path} is not a JSON trace ({e}); was the profiled run interrupted?")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("traces", type=Path, nargs="+", help="one trace to summarize, two (or more) to compare")
    p.add_argument("--json", type=Path, default=None, help="also save the summaries here")
    args = p.parse_args(argv)
    if args.json is not None and args.json.exists():
        raise SystemExit(f"error: {args.json} exists; give --json a new file name (it is never overwritten)")
    if args.json is not None and not args.json.parent.is_dir():
        raise SystemExit(f"error: {args.json.parent} is not a folder; give --json a path in an existing folder")
    summaries = [summarize(load(t)) for t in args.traces]
    for t, s in zip(args.traces, summaries):
        print(f"{t}: {format_summary(s)}\n")
        if s["launches"]:
            print(f"kernels of {t.name} by launch shape (GPU time):\n{format_launches(s)}\n")
    if len(summaries) > 1:
        print(format_comparison([t.stem for t in args.traces], summaries))
    if args.json is not None:
        text = json.dumps({str(t): s for t, s in zip(args.traces, summaries)}, indent=1)
        try:
            write_atomically(args.json, lambda tmp: tmp.write_text(text))
        except OSError as e:
            raise SystemExit(f"error: cannot write {args.json} ({e.strerror}); give --json a path in an existing folder")


if __name__ == "__main__":
    sys.exit(main())
