"""The evaluation sweep: quality against memory for every KV-cache strategy, on one model.

    python -m scripts.evaluate [--checkpoint_path ...] [--device cpu] [--quick] [--out outputs/eval.json]

Strategies: full; compress_kv (sink 16; windows 32, --large_window, 512; streaming and original
RoPE at window 32); quantize_kv int8/fp8/int4/int2 (sink 16; windows 32, --large_window, 512). Cells:
  ppl     streaming perplexity over the first --ppl_tokens tokens of the text (+ top-1 agreement
          with the full cache under teacher forcing, from the same pass)
  long    compress_kv over --long_tokens tokens, past the model's context, per --segment tokens
          (the full cache as far as its context reaches, for reference)
  cont    greedy continuations (--new_tokens) of --passages held-out passages: ROUGE-L vs the true
          text and vs the full cache's continuation; CPU/GPU decode tokens/s
  needle  needle in a haystack, --needle_lengths x --needle_depths x --needles
Every cell is saved to --out as it finishes, keyed by its settings; a rerun skips finished cells.
Then: figures in the same JSON, PNG plots and the Markdown table (<out>_table.md, e.g.
outputs/eval_table.md) next to it. --quick is a smoke run of a few seconds per cell.
"""
import argparse
import hashlib
import json
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

from atomic_write import write_atomically
import evaluation as ev
from generate import UserError, kv_stats, load_model, load_tokenizer, pick_device, pick_dtype, resolve_checkpoint, setup
from kv_cache import full_cache_nbytes
from strategies import KIVI_GROUPS

SINK = 16
FULL = {"strategy": "full"}
DEFAULT_OUT = Path("outputs/eval.json")
# The known answers (docs/design.md): default model, fp32, default text, first 2048 tokens, no BOS.
KNOWN_PPL_2048 = {"full": 11.8832, "quantize_kv int8 s16 w32": 11.8889, "quantize_kv int4 s16 w32 k32 v32": 11.94}


def compress(window: int, rope: str = "streaming") -> dict:
    return {"strategy": "compress_kv", "sink_size": SINK, "window_size": window, "rope": rope}


def quantize(window: int, bits, groups: Optional[tuple] = None) -> dict:
    """bits 8, 4, 2 or "fp8"; KIVI groups (key, value), default generate.py's."""
    settings = {"strategy": "quantize_kv", "sink_size": SINK, "window_size": window, "bits": 8 if bits == "fp8" else bits}
    if bits == "fp8":
        settings["fp8"] = True
    elif bits != 8:
        settings.update(zip(("key_group", "value_group"), groups or KIVI_GROUPS[bits]))
    return settings


def format_name(s: dict) -> str:
    return "fp8" if s.get("fp8") else f"int{s['bits']}"


def label(s: dict) -> str:
    if s["strategy"] == "full":
        return "full"
    if s["strategy"] == "compress_kv":
        rope = "" if s["rope"] == "streaming" else " rope=original"
        return f"compress_kv s{s['sink_size']} w{s['window_size']}{rope}"
    groups = f" k{s['key_group']} v{s['value_group']}" if "key_group" in s else ""
    return f"quantize_kv {format_name(s)} s{s['sink_size']} w{s['window_size']}{groups}"


def row_name(s: dict) -> str:
    return {"full": "Full", "compress_kv": "Compressed"}.get(s["strategy"]) or f"Quantized {format_name(s)}"


def generate_options(s: dict) -> str:
    """The generate.py subcommand that selects this cache."""
    if s["strategy"] == "full":
        return "(none)"
    opts = {k: v for k, v in s.items() if k not in ("strategy", "fp8")}
    if s.get("fp8"):
        opts["bits"] = "fp8"
    return f"{s['strategy']} " + " ".join(f"--{k} {v}" for k, v in opts.items())


def cell_key(kind: str, settings: dict, **params) -> str:
    return " | ".join([kind, label(settings), " ".join(f"{k}={v}" for k, v in params.items())])


# -- sizes ----------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint_path", type=Path, default=None,
                   help="model.pth (default: the embedded SmolLM2-135M-Instruct, in checkpoints/ next to the code)")
    p.add_argument("--model_name", default=None,
                   help="preset name when the checkpoint folder's name does not say it (default: the folder's name)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    p.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                   help="weights and caches (default: %(default)s = bf16 on cuda, fp32 on cpu)")
    p.add_argument("--text_file", type=Path, default=None,
                   help="UTF-8 evaluation text (default: Python's documentation, pydoc_data.topics)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help="results JSON; plots and the table go next to it (default: %(default)s)")
    p.add_argument("--fresh", action="store_true", help="ignore finished cells in --out and redo everything")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny sizes (overrides the size options)")
    p.add_argument("--large_window", type=int, default=128, help="the table's second window size (default: %(default)s)")
    p.add_argument("--chunk", type=int, default=256, help="tokens per forward for perplexity and prefill (default: %(default)s)")
    p.add_argument("--ppl_tokens", type=int, default=2048, help="perplexity text length for the table (default: %(default)s)")
    p.add_argument("--long_tokens", type=int, default=16384,
                   help="compress_kv text length past the context, 0 to skip (default: %(default)s)")
    p.add_argument("--segment", type=int, default=1024, help="tokens per perplexity segment of the long run (default: %(default)s)")
    p.add_argument("--passages", type=int, default=3, help="held-out passages for continuations (default: %(default)s)")
    p.add_argument("--prompt_tokens", type=int, default=512, help="passage prompt length (default: %(default)s)")
    p.add_argument("--new_tokens", type=int, default=200, help="greedy tokens per continuation (default: %(default)s)")
    p.add_argument("--needle_lengths", default="512,1024,2048", help="comma-separated context lengths (default: %(default)s)")
    p.add_argument("--needle_depths", default="0,0.25,0.5,0.75,1", help="comma-separated depths in [0, 1] (default: %(default)s)")
    p.add_argument("--needles", type=int, default=2, help="needles per (length, depth) cell (default: %(default)s)")
    p.add_argument("--needle_digits", type=int, default=7, help="digits of the magic number, RULER uses 7 (default: %(default)s)")
    return p


# Long enough that every strategy holds less than a full cache (int4's 128-token key groups keep up
# to 127 more exact tokens than its window: below ~300 tokens it holds more).
QUICK = dict(large_window=64, chunk=64, ppl_tokens=384, long_tokens=384, segment=64, passages=1, prompt_tokens=80,
             new_tokens=8, needle_lengths="80", needle_depths="1", needles=1)


def parse_sizes(args: argparse.Namespace) -> argparse.Namespace:
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
    try:
        args.needle_lengths = [int(x) for x in str(args.needle_lengths).split(",") if x.strip()]
        args.needle_depths = [float(x) for x in str(args.needle_depths).split(",") if x.strip()]
    except ValueError:
        raise UserError("--needle_lengths takes whole numbers and --needle_depths numbers in [0, 1], comma-separated")
    if any(not 0 <= d <= 1 for d in args.needle_depths):
        raise UserError(f"--needle_depths must lie in [0, 1], got {args.needle_depths}")
    for name in ("chunk", "ppl_tokens", "segment", "passages", "prompt_tokens", "new_tokens", "needles", "large_window"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name} must be positive, got {getattr(args, name)}")
    if not 4 <= args.needle_digits <= 12:
        raise UserError(f"--needle_digits must be 4..12, got {args.needle_digits}")
    return args


# -- resumable store --------------------------------------------------------------------------------
def read_results(path: Path, fresh: bool) -> Optional[dict]:
    """What an earlier run left in --out (None: a new file, or --fresh). Checked before the model
    is loaded, so a wrong --out fails at once; the folder it goes in is made here."""
    if path.is_dir():
        raise UserError(f"--out {path} is a folder; pass a file name, e.g. --out {path / 'eval.json'}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file where a folder should be, no permission
        raise UserError(f"cannot make the folder {path.parent} for --out ({e.strerror}); pass another --out")
    if fresh or not path.exists():
        return None
    not_results = UserError(f"{path} is not a results file of this script; pass --fresh to overwrite it or another --out")
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:  # JSONDecodeError, UnicodeDecodeError
        raise not_results from None
    except OSError as e:
        raise UserError(f"{path} cannot be read ({e.strerror}); pass another --out") from None
    if not (isinstance(old, dict) and isinstance(old.get("cells"), dict) and isinstance(old.get("runs", []), list)):
        raise not_results
    return old


class CellStore:
    """Finished cells in one JSON file, rewritten atomically after each cell."""

    def __init__(self, path: Path, context: dict, old: Optional[dict]) -> None:
        """old: read_results(path); its cells are reused when they come from the same context."""
        self.path, self.context = path, context
        self.data = {"context": context, "cells": {}}
        if old is not None:
            if old.get("context") != context:
                raise UserError(f"{path} holds results of another model, text, device or precision; "
                                f"pass --fresh to redo them or another --out")
            self.data = old
        self.data.setdefault("runs", [])
        self.computed = self.skipped = 0

    def get_or_run(self, key: str, fn):
        if key in self.data["cells"]:
            self.skipped += 1
            return self.data["cells"][key]
        value = fn()
        self.data["cells"][key] = value
        self.computed += 1
        self.save()
        return value

    def save(self) -> None:
        text = json.dumps(self.data, indent=1)
        write_atomically(self.path, lambda tmp: tmp.write_text(text))


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


# -- the cells --------------------------------------------------------------------------------------
class Evaluator:
    def __init__(self, args, model, tokenizer, ids: list[int], device: str, store: CellStore) -> None:
        self.args, self.model, self.tok, self.ids, self.device, self.store = args, model, tokenizer, ids, device, store
        self.cuda = device.startswith("cuda")

    def tensor(self, ids) -> torch.Tensor:
        return torch.tensor(ids, device=self.device)

    def _peak(self):
        return torch.cuda.max_memory_allocated() if self.cuda else None

    def _reset_peak(self):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def ppl(self, settings: dict) -> dict:
        n, chunk = self.args.ppl_tokens, self.args.chunk

        def run():
            tokens = self.tensor(self.ids[:n])
            setup(self.model, settings, 1, n)
            self._reset_peak()
            t0 = time.perf_counter()
            with tqdm(total=n - 1, desc=f"ppl {label(settings)}", leave=False, unit="tok") as bar:
                nll, top1 = ev.streaming_nll(self.model, tokens, chunk, bar.update)
            return {"settings": settings, "tokens": n, "chunk": chunk, "ppl": ev.perplexity(nll),
                    "seconds": time.perf_counter() - t0, "top1": top1.tolist(),
                    "peak_memory_bytes": self._peak(), **kv_stats(self.model, 1, n)}

        return self.store.get_or_run(cell_key("ppl", settings, tokens=n, chunk=chunk), run)

    def long(self, settings: dict, n: int) -> dict:
        chunk, segment = self.args.chunk, self.args.segment

        def run():
            tokens = self.tensor(self.ids[:n])
            setup(self.model, settings, 1, n)
            t0 = time.perf_counter()
            with tqdm(total=n - 1, desc=f"long {label(settings)}", leave=False, unit="tok") as bar:
                nll, _ = ev.streaming_nll(self.model, tokens, chunk, bar.update)
            return {"settings": settings, "tokens": n, "ppl": ev.perplexity(nll), "seconds": time.perf_counter() - t0,
                    "segments": ev.segment_perplexities(nll, segment), **kv_stats(self.model, 1, n)}

        return self.store.get_or_run(cell_key("long", settings, tokens=n, chunk=chunk, segment=segment), run)

    def passage_offsets(self) -> list[int]:
        """Held out from the perplexity and long texts: evenly spread over the rest of the corpus."""
        a = self.args
        span = a.prompt_tokens + a.new_tokens
        lo = max(a.ppl_tokens, a.long_tokens)
        hi = len(self.ids) - span
        if hi < lo:
            lo = 0
        if hi < 0:
            raise UserError(f"the text has {len(self.ids)} tokens; passages need {span}: lower --prompt_tokens/--new_tokens")
        step = (hi - lo) // a.passages
        return [lo + step * i + step // 2 for i in range(a.passages)]

    def continuation(self, settings: dict, i: int, offset: int) -> dict:
        a = self.args

        def run():
            bos = [self.tok.bos_id] if self.tok.add_bos else []
            prompt = bos + self.ids[offset : offset + a.prompt_tokens]
            reference = self.tok.decode(self.ids[offset + a.prompt_tokens : offset + a.prompt_tokens + a.new_tokens])
            setup(self.model, settings, 1, len(prompt) + a.new_tokens)
            r = ev.greedy_continuation(self.model, prompt, a.new_tokens, a.chunk, self.device)
            text = self.tok.decode(r["ids"])
            return {"settings": settings, "offset": offset, "ids": r["ids"], "text": text, "reference": reference,
                    "rouge_l_vs_reference": ev.rouge_l_f1(text, reference),
                    "decode_tokens_per_s": r["decode_tokens"] / max(r["decode_s"], 1e-9), "ttft_s": r["ttft_s"]}

        return self.store.get_or_run(cell_key("cont", settings, passage=i, offset=offset, prompt=a.prompt_tokens,
                                              new=a.new_tokens, chunk=a.chunk), run)

    def needle(self, settings: dict, length: int, depth: float, i: int) -> dict:
        a = self.args

        def run():
            seed = hash_seed(length, depth, i)
            number = ev.needle_number(seed, a.needle_digits)
            bos = [self.tok.bos_id] if self.tok.add_bos else []
            # Filler from a spread of places in the text, the same for every strategy.
            start = seed % max(len(self.ids) - length, 1)
            ids, at = ev.needle_prompt(self.tok.encode, self.ids[start : start + length], length - len(bos), depth, number)
            ids = bos + ids
            n_new = a.needle_digits + 4
            setup(self.model, settings, 1, len(ids) + n_new)
            r = ev.greedy_continuation(self.model, ids, n_new, a.chunk, self.device)
            completion = self.tok.decode(r["ids"])
            return {"settings": settings, "number": number, "needle_at": at + len(bos), "filler_start": start,
                    "completion": completion, "found": ev.needle_found(completion, number)}

        return self.store.get_or_run(cell_key("needle", settings, length=length, depth=depth, i=i,
                                              digits=a.needle_digits), run)


def hash_seed(*parts) -> int:
    return int(hashlib.sha256(repr(parts).encode()).hexdigest()[:12], 16)


# -- figures ----------------------------------------------------------------------------------------
def mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None


def build_figures(args, config, cells: dict, table_rows, ppl_rows, long_rows) -> dict:
    by = {}  # (kind, label) -> [cell]
    for key, cell in cells.items():
        kind = key.split(" | ")[0]
        by.setdefault((kind, label(cell["settings"])), []).append((key, cell))

    def one(kind, s, **params):
        return cells.get(cell_key(kind, s, **params))

    full_ppl = one("ppl", FULL, tokens=args.ppl_tokens, chunk=args.chunk)
    full_cont = {c["offset"]: c["text"] for _, c in by.get(("cont", "full"), [])}
    n = args.ppl_tokens
    full_bytes = full_cache_nbytes(1, n, config.n_local_heads, config.head_dim, config.n_layer)

    table = []
    for s in table_rows:
        p = one("ppl", s, tokens=n, chunk=args.chunk)
        conts = [c for _, c in by.get(("cont", label(s)), [])]
        needles = [c for k, c in by.get(("needle", label(s)), []) if _needle_in_grid(k, args)]
        table.append({
            "row": row_name(s), "settings": s, "label": label(s), "generate_options": generate_options(s),
            "ppl": p and p["ppl"], "ppl_ratio": p and full_ppl and p["ppl"] / full_ppl["ppl"],
            "rouge_l_vs_reference": mean(c["rouge_l_vs_reference"] for c in conts),
            "rouge_l_vs_full": mean(ev.rouge_l_f1(c["text"], full_cont[c["offset"]]) for c in conts if c["offset"] in full_cont),
            "top1_agreement": p and full_ppl and ev.top1_agreement(p["top1"], full_ppl["top1"]),
            "needle_accuracy": mean(float(c["found"]) for c in needles),
            "kv_ratio_bf16": ev.cache_nbytes(config, s, n) / full_bytes,
            "decode_tokens_per_s": mean(c["decode_tokens_per_s"] for c in conts),
        })

    ppl_vs_window = {}
    for s in ppl_rows:
        p = one("ppl", s, tokens=n, chunk=args.chunk)
        if p and s["strategy"] != "full":
            name = label({**s, "window_size": "*"}).replace(" w*", "")
            ppl_vs_window.setdefault(name, {})[s["window_size"]] = p["ppl"]

    lengths = sorted({256 * 2**k for k in range(8)} | {config.block_size})
    memory = {label(s): {str(t): ev.cache_nbytes(config, s, t) for t in lengths} for s in table_rows}
    memory["full"] = {str(t): full_cache_nbytes(1, t, config.n_local_heads, config.head_dim, config.n_layer) for t in lengths}

    needle = {}
    for s in table_rows:
        grid = {}
        for length in args.needle_lengths:
            for depth in args.needle_depths:
                hits = [one("needle", s, length=length, depth=depth, i=i, digits=args.needle_digits) for i in range(args.needles)]
                hits = [h["found"] for h in hits if h]
                grid.setdefault(str(length), {})[str(depth)] = mean(map(float, hits))
        needle[label(s)] = grid

    long = {}
    for s, t in long_rows:
        c = one("long", s, tokens=t, chunk=args.chunk, segment=args.segment)
        if c:
            long[label(s)] = {"tokens": t, "ppl": c["ppl"], "segments": c["segments"]}

    figures = {"table": table, "ppl_tokens": n, "ppl_vs_window": ppl_vs_window, "memory_bytes_vs_tokens_bf16": memory,
               "needle_accuracy": needle, "long": long, "full_ppl": full_ppl and full_ppl["ppl"]}
    figures["known_answers"] = known_answers(args, table, full_ppl)
    return figures


def _needle_in_grid(key: str, args) -> bool:
    params = dict(kv.split("=") for kv in key.split(" | ")[2].split())
    return (int(params["length"]) in args.needle_lengths and float(params["depth"]) in args.needle_depths
            and int(params["i"]) < args.needles and int(params["digits"]) == args.needle_digits)


def known_answers(args, table, full_ppl) -> dict:
    """The known answers of docs/design.md, checked when this run is the setting they were made in."""
    if not (args.checkpoint_path is None and args.text_file is None and args.ppl_tokens == 2048 and args.dtype == "torch.float32"):
        return {}
    got = {r["label"]: r["ppl"] for r in table}
    got["full"] = full_ppl and full_ppl["ppl"]
    return {name: {"expected": want, "got": got.get(name)} for name, want in KNOWN_PPL_2048.items()}


# -- outputs ----------------------------------------------------------------------------------------
def fmt(x, spec=".3f", none="-"):
    return none if x is None else format(x, spec)


def markdown_table(figures: dict, meta: dict) -> str:
    n = figures["ppl_tokens"]
    lines = [
        f"Made by `{meta['command']}` (commit {meta['git_commit'][:12]}, {meta['device']}, torch {meta['torch']}, {meta['dtype']}).",
        f"Perplexity over the first {n} tokens of the text (streaming, each token predicted from what the cache holds); "
        f"ROUGE-L F1 over words of {meta['sizes']['new_tokens']}-token greedy continuations of "
        f"{meta['sizes']['passages']} held-out passages ({meta['sizes']['prompt_tokens']}-token prompts); "
        f"top-1 agreement with the full cache under teacher forcing on the perplexity text; needle accuracy over "
        f"lengths {meta['sizes']['needle_lengths']} x depths {meta['sizes']['needle_depths']} x {meta['sizes']['needles']} needles; "
        f"KV memory from the caches' nbytes() in bf16 at {n} tokens, as a fraction of a full bf16 cache. "
        f"Decode tokens/s measured on {meta['device']} with the uncompiled step (GPU figures: scripts/benchmark.py).",
        "",
        "| Strategy | generate.py options | Perplexity (x full) | ROUGE-L vs ref | ROUGE-L vs full | Top-1 agree | Needle acc | KV memory (x full) | Decode tok/s (" + meta["device_kind"] + ") |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in figures["table"]:
        ppl = "-" if r["ppl"] is None else f"{r['ppl']:.4f} ({r['ppl_ratio']:.4f}x)"
        where = f" s{r['settings']['sink_size']} w{r['settings']['window_size']}" if "sink_size" in r["settings"] else ""
        lines.append(f"| {r['row']}{where} "
                     f"| `{r['generate_options']}` | {ppl} | {fmt(r['rouge_l_vs_reference'])} | {fmt(r['rouge_l_vs_full'])} "
                     f"| {fmt(r['top1_agreement'])} | {fmt(r['needle_accuracy'], '.2f')} | {fmt(r['kv_ratio_bf16'])} "
                     f"| {fmt(r['decode_tokens_per_s'], '.1f')} |")
    long = figures["long"]
    if long:
        lines += ["", f"Perplexity per {meta['sizes']['segment']}-token segment as the text grows "
                  f"(model context {meta['block_size']}):", ""]
        names = list(long)
        lines.append("| Tokens | " + " | ".join(names) + " |")
        lines.append("|---" * (len(names) + 1) + "|")
        segs = max(long.values(), key=lambda v: len(v["segments"]))["segments"]
        for j, seg in enumerate(segs):
            vals = [fmt(long[k]["segments"][j]["ppl"], ".2f") if j < len(long[k]["segments"]) else "-" for k in names]
            lines.append(f"| {seg['start'] + 1}-{seg['end']} | " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"


def plot(figures: dict, stem: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []

    def save(fig, name):
        path = stem.with_name(f"{stem.name}_{name}.png")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(str(path))

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, pts in figures["ppl_vs_window"].items():
        pts = {int(w): v for w, v in pts.items()}  # JSON turns the keys into strings
        xs = sorted(pts)
        ax.plot(xs, [pts[x] for x in xs], marker="o", label=name)
    if figures["full_ppl"]:
        ax.axhline(figures["full_ppl"], color="k", ls="--", label="full")
    windows = sorted({int(w) for pts in figures["ppl_vs_window"].values() for w in pts})
    ax.set_xscale("log", base=2)
    ax.set_xticks(windows, [str(w) for w in windows])
    ax.minorticks_off()
    ax.set(xlabel="window size (tokens)", ylabel="perplexity", title=f"Perplexity vs window ({figures['ppl_tokens']} tokens, sink {SINK})")
    ax.legend(fontsize=7)
    save(fig, "ppl_vs_window")

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, pts in figures["memory_bytes_vs_tokens_bf16"].items():
        xs = sorted(pts, key=int)
        ax.plot([int(x) for x in xs], [pts[x] / 2**20 for x in xs], marker=".", label=name)
    ax.set(xscale="log", yscale="log", xlabel="tokens", ylabel="KV cache (MiB, bf16)", title="KV memory vs tokens (nbytes)")
    ax.legend(fontsize=6)
    save(fig, "memory")

    grids = figures["needle_accuracy"]
    if grids:
        ncols = min(5, len(grids))
        nrows = -(-len(grids) // ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(2.4 * ncols, 2.4 * nrows), squeeze=False)
        for ax in axes.flat[len(grids):]:
            ax.axis("off")
        for ax, (name, grid) in zip(axes.flat, grids.items()):
            lengths = list(grid)
            depths = list(next(iter(grid.values()))) if grid else []
            data = [[float("nan") if grid[ln][d] is None else grid[ln][d] for d in depths] for ln in lengths]
            ax.imshow(data, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
            for y, row in enumerate(data):
                for x, acc in enumerate(row):
                    ax.text(x, y, "-" if acc != acc else f"{acc:.2f}", ha="center", va="center", fontsize=6)
            ax.set_xticks(range(len(depths)), depths, fontsize=6)
            ax.set_yticks(range(len(lengths)), lengths, fontsize=6)
            ax.set_title(name, fontsize=7)
            ax.set_xlabel("needle depth", fontsize=6)
            ax.set_ylabel("context length", fontsize=6)
        save(fig, "needle")

    if figures["long"]:
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, v in figures["long"].items():
            ax.plot([s["end"] for s in v["segments"]], [s["ppl"] for s in v["segments"]], marker="o", label=name)
        ax.set(yscale="log", xlabel="tokens", ylabel="segment perplexity", title="Perplexity as the text grows")
        ax.legend(fontsize=7)
        save(fig, "long")
    return written


# -- main -------------------------------------------------------------------------------------------
def sweep(args) -> tuple[list, list, list]:
    windows = [32, args.large_window]
    table_rows = [FULL]
    for w in windows:
        table_rows += [compress(w), quantize(w, 8), quantize(w, "fp8"), quantize(w, 4), quantize(w, 2)]
    extra = [compress(32, "original")] + [quantize(32, b, (k, 32)) for b in (4, 2) for k in (32, 64, 128)]
    if not args.quick:
        extra += [compress(512)] + [quantize(512, b) for b in (8, "fp8", 4, 2)]
    ppl_rows = table_rows + [s for s in extra if s not in table_rows]
    long_rows = []
    if args.long_tokens > 0:
        long_rows = [(compress(32), args.long_tokens), (compress(32, "original"), args.long_tokens)]
    return table_rows, ppl_rows, long_rows


def run(args: argparse.Namespace) -> dict:
    args = parse_sizes(args)
    old_results = read_results(args.out, args.fresh)
    if args.text_file is not None and not args.text_file.is_file():
        raise UserError(f"--text_file {args.text_file} not found")
    try:
        text = ev.load_corpus(args.text_file)
    except UnicodeDecodeError as e:
        raise UserError(f"--text_file {args.text_file} is not UTF-8 text ({e.reason} at byte {e.start}); convert it to UTF-8")
    device = pick_device(args.device)
    dtype = pick_dtype(args.precision, device)
    args.dtype = str(dtype)
    checkpoint = resolve_checkpoint(args.checkpoint_path)
    tokenizer = load_tokenizer(checkpoint)
    model = load_model(checkpoint, device, dtype, args.model_name)
    config = model.config
    ids = tokenizer.encode(text)
    need = max(args.ppl_tokens, args.long_tokens, max(args.needle_lengths))
    if len(ids) < need:
        raise UserError(f"the text has {len(ids)} tokens; this sweep needs {need}: lower the sizes or pass a longer --text_file")
    if args.ppl_tokens > config.block_size:
        raise UserError(f"--ppl_tokens {args.ppl_tokens} exceeds the model's context ({config.block_size}); "
                        f"the long run (--long_tokens) covers longer texts")

    context = {"checkpoint": str(checkpoint), "text": str(args.text_file or "pydoc_data.topics"),
               "text_sha256": hashlib.sha256(text.encode()).hexdigest(), "device": device, "dtype": args.dtype}
    store = CellStore(args.out, context, old_results)
    evaluator = Evaluator(args, model, tokenizer, ids, device, store)
    table_rows, ppl_rows, long_rows = sweep(args)

    started = time.time()
    for s in tqdm(ppl_rows, desc="perplexity"):
        evaluator.ppl(s)
    long_rows += [(FULL, min(args.long_tokens, config.block_size))] if long_rows else []
    for s, t in tqdm(long_rows, desc="long text"):
        evaluator.long(s, t)
    # Passage / needle index outermost: an interrupted sweep has every strategy at the same count,
    # so a rerun with a smaller --passages / --needles reuses what is done and makes the table.
    offsets = evaluator.passage_offsets()
    cont_cells = [(i, off, s) for i, off in enumerate(offsets) for s in table_rows]
    for i, off, s in tqdm(cont_cells, desc="continuations"):
        evaluator.continuation(s, i, off)
    needle_cells = [(i, s, length, depth) for i in range(args.needles) for s in table_rows
                    for length in args.needle_lengths for depth in args.needle_depths]
    for i, s, length, depth in tqdm(needle_cells, desc="needles"):
        evaluator.needle(s, length, depth, i)

    figures = build_figures(args, config, store.data["cells"], table_rows, ppl_rows, long_rows)
    sizes = {k: getattr(args, k) for k in ("large_window", "chunk", "ppl_tokens", "long_tokens", "segment", "passages",
                                           "prompt_tokens", "new_tokens", "needle_lengths", "needle_depths", "needles",
                                           "needle_digits", "quick")}
    argv = sys.argv[1:] if args.argv is None else args.argv
    meta = {"command": " ".join(["python -m scripts.evaluate", shlex.join(argv)]).strip(),
            "git_commit": git_commit(), "device": device_name(device), "device_kind": "GPU" if device.startswith("cuda") else "CPU",
            "torch": torch.__version__, "python": platform.python_version(), "dtype": args.dtype,
            "checkpoint": str(checkpoint), "block_size": config.block_size, "text_tokens": len(ids), "sizes": sizes}
    store.data["runs"].append({**meta, "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
                               "seconds": time.time() - started, "cells_computed": store.computed, "cells_skipped": store.skipped})
    store.data["meta"] = meta
    store.data["figures"] = figures
    stem = args.out.with_suffix("")
    store.data["plots"] = plot(figures, stem)
    table_md = markdown_table(figures, meta)
    table_path = stem.with_name(f"{stem.name}_table.md")
    table_path.write_text(table_md)
    store.data["table_markdown"] = str(table_path)
    store.save()
    print(table_md)
    for name, k in figures["known_answers"].items():
        print(f"known answer {name}: expected {k['expected']}, got {fmt(k['got'], '.4f')}", file=sys.stderr)
    print(f"{store.computed} cells computed, {store.skipped} reused; results in {args.out}, table in {table_path}", file=sys.stderr)
    return store.data


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return run(args)
    except UserError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
