"""Generate text with a static KV cache whose strategy is chosen on the command line.

    python generate.py --prompt "Once upon a time," --max_new_tokens 200
    python generate.py --prompt "..." compress_kv --sink_size 16 --window_size 32
    python generate.py --prompt "..." quantize_kv --sink_size 16 --window_size 32 --bits 4

Global options are accepted before or after the subcommand. With no --checkpoint_path the
embedded default model (SmolLM2-135M-Instruct) is prepared on first use.
"""
import argparse
import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

import tp
from default_model import DEFAULT_CHECKPOINT, prepare_default
from kv_cache import full_cache_nbytes
from model import ModelArgs, Transformer
from strategies import add_strategy_options, cache_factory, check_settings, strategy_settings

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class UserError(Exception):
    """Something the user can fix; printed as one line, exit status 1."""


# -- loading (shared with the scripts) ----------------------------------------------------------
def pick_device(name: Optional[str]) -> str:
    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for, but no CUDA GPU is visible; use --device cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise UserError(f"unknown --device '{name}'; use cpu, cuda or cuda:N")
    return name


def pick_dtype(precision: str, device: str) -> torch.dtype:
    if precision == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return PRECISIONS[precision]


def resolve_checkpoint(path: Optional[Path]) -> Path:
    if path is None:
        try:
            return prepare_default(DEFAULT_CHECKPOINT)
        except RuntimeError as e:
            raise UserError(f"could not prepare the default model: {e}")
    if path.is_dir():
        path = path / "model.pth"
    if not path.exists():
        raise UserError(f"checkpoint {path} not found; make it with `python -m scripts.convert_hf_checkpoint "
                        f"--checkpoint_dir {path.parent}` (or omit --checkpoint_path for the default model)")
    return path


def load_model(checkpoint: Path, device: str, dtype: torch.dtype, model_name: Optional[str] = None) -> Transformer:
    """Build on the meta device, then assign the (memory-mapped) weights: no double copy."""
    try:
        config = ModelArgs.from_name(model_name or checkpoint.parent.name)
    except ValueError as e:
        raise UserError(f"{e} (the checkpoint folder's name picks the preset; pass --model_name)")
    with torch.device("meta"):
        model = Transformer(config)
    try:
        state = torch.load(checkpoint, mmap=True, weights_only=True, map_location="cpu")
    except Exception as e:  # a truncated or foreign file: pickle / zip errors of many kinds
        raise UserError(f"{checkpoint} could not be read ({type(e).__name__}: {str(e)[:150]}); delete it and re-create it")
    try:
        model.load_state_dict(state, assign=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise UserError(f"{checkpoint} does not fit preset '{model_name or checkpoint.parent.name}' ({first[:200]}); "
                        f"pass the right --model_name or re-create it with the conversion script")
    if tp.world_size() > 1:  # each rank copies only its slices out of the memory-mapped file
        try:
            tp.shard(model, device)
        except ValueError as e:
            raise UserError(str(e))
    return model.to(device=device, dtype=dtype).eval()


def load_tokenizer(checkpoint: Path):
    from tokenizer import get_tokenizer

    try:
        return get_tokenizer(checkpoint.parent)
    except FileNotFoundError as e:
        raise UserError(str(e))


# -- sampling (no host sync) ----------------------------------------------------------------
def logits_to_probs(logits: torch.Tensor, temperature: float, top_k: Optional[int]) -> torch.Tensor:
    logits = logits / max(temperature, 1e-5)
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[..., -1:]
        logits = torch.where(logits < kth, -float("inf"), logits)
    return torch.softmax(logits, dim=-1)


def sample(logits: torch.Tensor, temperature: float, top_k: Optional[int]) -> torch.Tensor:
    """logits [B, V] -> token ids [B, 1]. Greedy at temperature 0; otherwise the exponential-race
    trick (argmax of p / Exp(1) noise is a sample of p) instead of multinomial's host sync."""
    if temperature <= 0:
        return logits.argmax(dim=-1, keepdim=True)
    probs = logits_to_probs(logits, temperature, top_k)
    noise = torch.empty_like(probs).exponential_(1)
    return torch.argmax(probs / noise, dim=-1, keepdim=True)


# -- the two phases -------------------------------------------------------------------------
def prefill(model: Transformer, tokens: torch.Tensor, chunk: int, start: int = 0) -> torch.Tensor:
    """tokens [B, T] -> logits of the last position [B, V]; the cache is filled chunk by chunk."""
    logits = None
    for s in range(0, tokens.shape[1], chunk):
        piece = tokens[:, s : s + chunk]
        input_pos = torch.arange(start + s, start + s + piece.shape[1], device=tokens.device)
        logits = model(piece, input_pos, last_only=True)
    return logits[:, -1]


def decode_one_token(model: Transformer, x: torch.Tensor, input_pos: torch.Tensor, temperature: float, top_k: Optional[int]):
    logits = model(x, input_pos)[:, -1]
    return sample(logits, temperature, top_k)


def generate(
    model: Transformer,
    prompt: torch.Tensor,
    max_new_tokens: int,
    step: Callable,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    prefill_chunk: int = 512,
    prefill_fn: Callable = prefill,
    stop_ids: frozenset = frozenset(),
    on_token: Optional[Callable] = None,
) -> dict:
    """prompt [B, T]; returns tokens [B, T + n] and timings. The cache must be set up already."""
    device = prompt.device
    sync = torch.cuda.synchronize if prompt.is_cuda else (lambda: None)
    t0 = time.perf_counter()
    first = sample(prefill_fn(model, prompt, prefill_chunk), temperature, top_k)
    sync()
    ttft = time.perf_counter() - t0
    out = [first]
    if on_token:
        on_token(first)
    input_pos = torch.tensor([prompt.shape[1]], device=device, dtype=torch.long)
    t1 = time.perf_counter()
    cur = first
    for _ in range(max_new_tokens - 1):
        if stop_ids and prompt.shape[0] == 1 and int(cur[0, 0]) in stop_ids:
            break
        # A CUDA-graph replay overwrites its output buffer: keep a copy of each token.
        cur = step(model, cur, input_pos, temperature, top_k).clone()
        input_pos += 1
        out.append(cur)
        if on_token:
            on_token(cur)
    sync()
    decode_s = time.perf_counter() - t1
    return {"tokens": torch.cat([prompt, *out], dim=1), "ttft_s": ttft, "decode_s": decode_s, "decode_tokens": len(out) - 1}


def compiled_step(device: str, compile_decode: bool, batch_size: int) -> Callable:
    if not compile_decode:
        return decode_one_token
    if not device.startswith("cuda"):
        return torch.compile(decode_one_token, fullgraph=True)
    # CUDA graphs (what mode="reduce-overhead" sets) need a static step: the caches guarantee it.
    # At batch 1, coordinate-descent tuning makes inductor write the matrix-vector products as
    # tuned Triton reductions fused with the RMSNorm before them (w1/w3 as one, w2 with the SiLU
    # product): 10% faster than cuBLAS's GEMVs per step on an H100. Past batch 1 it cannot rewrite
    # the GEMMs; it only doubled the compile time and re-tuned small kernels slower
    # (notes/kernel.md, session 3).
    options = {"triton.cudagraphs": True, "coordinate_descent_tuning": batch_size == 1}
    return torch.compile(decode_one_token, fullgraph=True, options=options)


# -- command line ---------------------------------------------------------------------------
def add_global_options(p: argparse.ArgumentParser, suppress: bool = False) -> None:
    """The same options on the main parser and on each subcommand, so they work on either side.
    On subcommands the defaults are suppressed so they never overwrite what came before."""
    d = (lambda v: argparse.SUPPRESS) if suppress else (lambda v: v)
    p.add_argument("--checkpoint_path", type=Path, default=d(None), help="model.pth (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--model_name", default=d(None), help="preset name when the checkpoint folder's name does not say it")
    p.add_argument("--prompt", default=d("Once upon a time,"), help="input text")
    p.add_argument("--prompt_file", type=Path, default=d(None), help="read the prompt from a file")
    p.add_argument("--chat", action="store_true", default=d(False), help="apply the model's chat template (instruct models)")
    p.add_argument("--max_new_tokens", type=int, default=d(200))
    p.add_argument("--num_samples", type=int, default=d(1))
    p.add_argument("--batch_size", type=int, default=d(1))
    p.add_argument("--temperature", type=float, default=d(0.8), help="0 for greedy")
    p.add_argument("--top_k", type=int, default=d(200))
    p.add_argument("--seed", type=int, default=d(1234))
    p.add_argument("--device", default=d(None), help="cuda when available, else cpu")
    p.add_argument("--precision", choices=["auto", *PRECISIONS], default=d("auto"), help="auto: bf16 on cuda, fp32 on cpu")
    p.add_argument("--compile", action="store_true", default=d(False), help="torch.compile the decode step (CUDA graphs on GPU)")
    p.add_argument("--compile_prefill", action="store_true", default=d(False), help="torch.compile prefill too (dynamic shapes)")
    p.add_argument("--prefill_chunk", type=int, default=d(512), help="prompt tokens per prefill forward")
    p.add_argument("--profile", default=d(None), metavar="NAME", help="run under torch.profiler; writes outputs/NAME.*")
    p.add_argument("--overwrite", action="store_true", default=d(False), help="let --profile replace existing outputs")
    p.add_argument("--dist_timeout", type=float, default=d(600),
                   help="under torchrun: seconds a collective may wait for the other ranks before failing")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_global_options(parser)
    subs = parser.add_subparsers(dest="strategy", metavar="{compress_kv,quantize_kv}",
                                 help="KV-cache strategy (default: the full bf16 cache)")
    for name, help_text in (("compress_kv", "keep sink + sliding window, drop the middle (StreamingLLM)"),
                            ("quantize_kv", "keep sink + window exact, quantize older tokens")):
        sub = subs.add_parser(name, help=help_text)
        add_strategy_options(sub, name)
        add_global_options(sub, suppress=True)
    return parser


def check_args(args: argparse.Namespace) -> None:
    for name in ("max_new_tokens", "num_samples", "batch_size", "prefill_chunk"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name} must be positive, got {getattr(args, name)}")
    if args.top_k is not None and args.top_k <= 0:
        raise UserError(f"--top_k must be positive, got {args.top_k}")
    if args.profile is not None:
        check_profile_name(args.profile)


def check_profile_name(name: str) -> None:
    from profiling import output_dir

    if name.endswith(("/", ".")) or (output_dir() / name).is_dir():
        raise UserError(f"--profile takes a name for the files it writes (NAME.json, NAME.txt, ...), not a folder "
                        f"('{name}'); e.g. --profile {Path(name.rstrip('/.') or 'outputs') / 'run1'}")


def encode_prompt(args, tokenizer) -> list[int]:
    text = args.prompt
    if args.prompt_file is not None:
        if not args.prompt_file.exists():
            raise UserError(f"--prompt_file {args.prompt_file} not found")
        text = args.prompt_file.read_text()
    if args.chat:
        from tokenizer import chat_prompt

        try:
            return chat_prompt(tokenizer, text)
        except ValueError as e:
            raise UserError(str(e))
    return tokenizer.encode(text, bos=tokenizer.add_bos)


def setup(model: Transformer, settings: dict, batch_size: int, max_seq_length: int) -> None:
    """Cache set-up with the user-facing checks (context limit, strategy options)."""
    config = model.config
    if settings["strategy"] != "compress_kv" and max_seq_length > config.block_size:
        raise UserError(f"prompt + --max_new_tokens = {max_seq_length} tokens exceeds the model's context of "
                        f"{config.block_size}; shorten the prompt or use compress_kv (fixed memory at any length)")
    try:
        check_settings(settings, config.head_dim, max_seq_length, model.tok_embeddings.weight.device.type)
    except ValueError as e:
        raise UserError(str(e))
    model.setup_caches(batch_size, max_seq_length, cache_factory(settings))


def kv_stats(model: Transformer, batch_size: int, n_tokens: int) -> dict:
    """Bytes the caches hold vs a full cache of the same length in bf16 (fp32 on a CPU run, so
    the ratio measures the strategy, not the precision)."""
    c = model.config
    device = model.tok_embeddings.weight.device
    held = tp.sum_over_ranks(sum(cache.nbytes() for cache in model.caches()), device)  # all ranks' shards
    dtype = torch.float32 if model.tok_embeddings.weight.dtype == torch.float32 else torch.bfloat16
    n_kv_heads = c.n_local_heads * getattr(model, "tp_world_size", 1)
    full = full_cache_nbytes(batch_size, n_tokens, n_kv_heads, c.head_dim, c.n_layer, dtype)
    return {"kv_bytes": held, "kv_bytes_full": full, "kv_full_dtype": str(dtype).removeprefix("torch."), "kv_ratio": held / full}


def format_stats(r: dict) -> str:
    mem = f", peak memory {r['peak_memory_bytes'] / 2**30:.2f} GiB" if r.get("peak_memory_bytes") else ""
    return (f"time to first token {r['ttft_s'] * 1000:.1f} ms, decode {r['tokens_per_s']:.1f} tokens/s "
            f"({r['decode_tokens']} tokens x batch {r['batch_size']}), KV cache {r['kv_bytes'] / 2**20:.2f} MiB = "
            f"{r['kv_ratio']:.2f}x a full {r['kv_full_dtype']} cache of {r['n_tokens']} tokens{mem}")


def run(args: argparse.Namespace) -> list[dict]:
    check_args(args)
    device = pick_device(args.device)
    try:
        device = tp.init(device, args.dist_timeout)  # under torchrun/srun: join the group, cuda:LOCAL_RANK
    except ValueError as e:
        raise UserError(str(e))
    dtype = pick_dtype(args.precision, device)
    checkpoint = resolve_checkpoint(args.checkpoint_path)
    model = load_model(checkpoint, device, dtype, args.model_name)
    tokenizer = load_tokenizer(checkpoint)
    settings = strategy_settings(args)

    ids = encode_prompt(args, tokenizer)
    if not ids:
        raise UserError("the prompt is empty; pass --prompt TEXT")
    prompt = torch.tensor([ids] * args.batch_size, device=device)
    max_seq_length = len(ids) + args.max_new_tokens
    setup(model, settings, args.batch_size, max_seq_length)
    step = compiled_step(device, args.compile, args.batch_size)
    prefill_fn = torch.compile(prefill, dynamic=True) if args.compile_prefill else prefill
    if args.compile or args.compile_prefill or args.profile:
        # Compilation, CUDA-graph recording and first-call costs (cuBLAS, Triton JIT) happen here,
        # not inside the timed samples or the profiled window.
        with torch.no_grad():
            generate(model, prompt, min(args.max_new_tokens, 16), step, args.temperature, args.top_k, args.prefill_chunk, prefill_fn)

    torch.manual_seed(args.seed)
    results = []
    for i in range(args.num_samples):
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        stream = tokenizer.stream() if args.batch_size == 1 else None
        if stream is not None and not args.chat:
            print(tokenizer.decode(ids), end="", flush=True)

        def show(tok):
            if stream is not None and int(tok[0, 0]) not in tokenizer.eos_ids:
                print(stream.push(int(tok[0, 0])), end="", flush=True)

        profiler = contextlib.nullcontext()
        if args.profile and i == args.num_samples - 1:
            from profiling import profile_run

            name = args.profile if tp.world_size() == 1 else f"{args.profile}_rank{tp.rank()}"
            profiler = profile_run(name, quiet=not tp.is_main(), overwrite=args.overwrite, device=device, model=model, settings=settings)
        with torch.no_grad(), profiler:
            r = generate(model, prompt, args.max_new_tokens, step, args.temperature, args.top_k,
                         args.prefill_chunk, prefill_fn, frozenset(tokenizer.eos_ids), show)
        if stream is not None:
            print(stream.flush())
        else:
            for row in r["tokens"].tolist():
                print(tokenizer.decode(row))
                print("-" * 40)
        n_tokens = r["tokens"].shape[1]
        stats = {
            "sample": i, "batch_size": args.batch_size, "n_tokens": n_tokens, "ttft_s": r["ttft_s"],
            "decode_tokens": r["decode_tokens"], "tokens_per_s": r["decode_tokens"] * args.batch_size / max(r["decode_s"], 1e-9),
            **kv_stats(model, args.batch_size, n_tokens),
            "peak_memory_bytes": torch.cuda.max_memory_allocated() if device.startswith("cuda") else None,
            **settings,
        }
        if tp.is_main():
            print(format_stats(stats), file=sys.stderr)
        results.append(stats)
    return results


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    # Under torchrun only rank 0 prints (text, stats, errors); the other ranks exit with the same
    # status a moment later, so that torchrun (which stops every rank when one exits) lets rank 0 speak.
    fail = (lambda message: sys.exit(message)) if tp.is_main() else (lambda message: (time.sleep(2), sys.exit(1)))
    quiet = contextlib.nullcontext() if tp.is_main() else contextlib.redirect_stdout(open(os.devnull, "w"))
    try:
        with quiet:
            run(args)
    except UserError as e:
        fail(f"error: {e}")
    except torch.cuda.OutOfMemoryError:
        fail("error: out of GPU memory; lower --batch_size, the prompt length or --max_new_tokens, or use quantize_kv/compress_kv")
    except RuntimeError as e:
        if not tp.is_collective_failure(e):
            raise
        # Rank 0 may be the one that died: every survivor says why it stops.
        sys.exit(f"error: rank {tp.rank()}: a collective failed or timed out (another rank died or hung; "
                 f"--dist_timeout {args.dist_timeout:g} s): {str(e).strip().splitlines()[0][:200]}")
    except KeyboardInterrupt:
        sys.exit(130)
    finally:
        tp.shutdown()


if __name__ == "__main__":
    main()
