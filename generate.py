"""Generate text with a static KV cache whose strategy is chosen on the command line.

    python generate.py --prompt "Once upon a time," --max_new_tokens 200
    python generate.py --prompt "..." compress_kv --sink_size 16 --window_size 32
    python generate.py --prompt "..." quantize_kv --sink_size 16 --window_size 32 --bits 4

Global options are accepted before or after the subcommand. With no --checkpoint_path the
embedded default model (SmolLM2-135M-Instruct) is prepared on first use.
"""
import argparse
import contextlib
import math
import os
import pickle
import sys
import time
import zipfile
from pathlib import Path
from typing import Callable, Optional

import torch

import tp
from argmax import argmax
from default_model import DEFAULT_CHECKPOINT, DefaultModelUnavailable, prepare_default
from kv_cache import full_cache_nbytes
from model import ModelArgs, Transformer
from strategies import STRATEGIES, cache_factory, check_settings, strategy_settings
from tokenizer import CheckpointFileError, make_command
from weight_quant import FORMAT_KEY, WEIGHT_FORMATS, quantized_source, use_int8_linears

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
        except DefaultModelUnavailable as e:
            raise UserError(f"could not prepare the default model: {e}")
        except CheckpointFileError as e:
            raise UserError(str(e))
    if path.is_dir():
        path = path / "model.pth"
    if not path.exists():
        raise UserError(f"checkpoint {path} not found; make it with `{remake_command(path)}` "
                        f"(or omit --checkpoint_path for the default model)")
    return path


def remake_command(checkpoint: Path) -> str:
    """The command that makes this checkpoint file: scripts.quantize for a `<stem>_<format>.pth` it
    writes (from the `<stem>.pth` beside it), else the one that makes its folder."""
    source = quantized_source(checkpoint)
    if source is not None:
        return f"python -m scripts.quantize --checkpoint_path {source[0]} --mode {source[1]}"
    return make_command(checkpoint.parent)


def load_model(checkpoint: Path, device: str, dtype: torch.dtype, model_name: Optional[str] = None,
               all_reduce: str = "nccl", max_batch_size: int = 1) -> Transformer:
    """Build on the meta device, then assign the (memory-mapped) weights: no double copy. Under
    tensor parallelism all_reduce and max_batch_size go to tp.shard."""
    try:
        config = ModelArgs.from_name(model_name or checkpoint.parent.name)
    except ValueError as e:
        raise UserError(f"{e} (the checkpoint folder's name picks the preset; pass --model_name)")
    with torch.device("meta"):
        model = Transformer(config)
    state = read_state_dict(checkpoint)
    weight_format = state.pop(FORMAT_KEY, None)  # absent: the model's dtype
    if weight_format is not None and weight_format not in WEIGHT_FORMATS:
        raise UserError(f"{checkpoint} holds weights in format '{weight_format}', which this engine does not read "
                        f"(it reads {', '.join(WEIGHT_FORMATS)} and plain checkpoints)")
    if weight_format == "int8":
        use_int8_linears(model)
    mismatch = state_dict_mismatch(model, state)
    if mismatch:
        raise UserError(f"{checkpoint} does not fit preset '{model_name or checkpoint.parent.name}' ({mismatch}); "
                        f"pass the right --model_name, or re-create the checkpoint with `{remake_command(checkpoint)}`")
    model.load_state_dict(state, assign=True)
    if tp.world_size() > 1:  # each rank copies only its slices out of the memory-mapped file
        try:
            tp.shard(model, device, all_reduce=all_reduce, max_batch_size=max_batch_size)
        except ValueError as e:
            raise UserError(str(e))
    return model.to(device=device, dtype=dtype).eval()


def read_state_dict(checkpoint: Path) -> dict:
    """The memory-mapped state dict; a damaged or foreign file is a UserError that says how to
    re-create it (only the errors a bad file raises are caught: anything else is a bug)."""
    damaged = (f"{checkpoint} is damaged or not a PyTorch checkpoint ({{}}); delete it and re-create it with "
               f"`{make_command(checkpoint.parent)}`")
    # torch.load's errors on a truncated file are obscure ("mmap can only be used with ..."); a
    # checkpoint is a zip archive whose directory sits at the end, so truncation shows here first.
    if not zipfile.is_zipfile(checkpoint):
        raise UserError(damaged.format("not a complete zip archive: truncated?"))
    try:
        return torch.load(checkpoint, mmap=True, weights_only=True, map_location="cpu")
    except (pickle.UnpicklingError, EOFError, OSError, zipfile.BadZipFile) as e:
        raise UserError(damaged.format(f"{type(e).__name__}: {str(e).strip().splitlines()[0][:120]}"))
    except RuntimeError as e:
        if "PytorchStreamReader" not in str(e):  # the zip reader's damaged-archive errors
            raise
        raise UserError(damaged.format(str(e).strip().splitlines()[0][:120]))


def state_dict_mismatch(model: Transformer, state: dict) -> Optional[str]:
    """The first difference between the checkpoint's tensors and the model's, in words; None if
    they fit."""
    expected = model.state_dict()
    for k, want in expected.items():
        got = state.get(k)
        if got is not None and not isinstance(got, torch.Tensor):
            return f"{k} is a {type(got).__name__}, not a tensor"
        if got is not None and got.shape != want.shape:
            return f"{k} is {list(got.shape)} in the file, {list(want.shape)} in the preset"
    missing = [k for k in expected if k not in state]
    if missing:
        return f"no tensor {missing[0]}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
    extra = [k for k in state if k not in expected]
    if extra:
        return f"unexpected tensor {extra[0]}" + (f" and {len(extra) - 1} more" if len(extra) > 1 else "")
    return None


def load_tokenizer(checkpoint: Path):
    from tokenizer import get_tokenizer

    try:
        return get_tokenizer(checkpoint.parent)
    except (FileNotFoundError, CheckpointFileError) as e:
        raise UserError(str(e))


# -- sampling (no host sync) ----------------------------------------------------------------
def sample(logits: torch.Tensor, temperature: float, top_k: Optional[int], shard: Optional[tp.VocabShard] = None) -> torch.Tensor:
    """logits [B, V] -> token ids [B, 1]. Under tensor parallelism `logits` is this rank's slice
    [B, V/W] and `shard` (tp.vocab_shard) gathers from the other ranks what the choice needs.
    Greedy at temperature 0; otherwise the exponential race: argmax(p / E) with E ~ Exp(1) drawn
    for every token is a sample of p (no multinomial and its host sync), and it equals
    argmax(logits / T - log E): log is increasing, and softmax's normalizer is the same for every
    token, so no softmax either."""
    if temperature > 0:
        logits = race_scores(logits, temperature, top_k, shard)
    return argmax(logits) if shard is None else shard.argmax(logits)


def race_scores(logits: torch.Tensor, temperature: float, top_k: Optional[int], shard: Optional[tp.VocabShard]) -> torch.Tensor:
    """logits / T - log E, -inf below the top_k-th largest logit."""
    if top_k is not None:
        if shard is None:
            kth = torch.topk(logits, min(top_k, logits.size(-1))).values[..., -1:]  # [B, 1]
        else:
            kth = shard.kth_largest(logits, top_k)
        logits = torch.where(logits < kth, -float("inf"), logits)
    # Every rank draws the whole vocabulary's noise and keeps its slice: the same seed gives every
    # rank the same draws, so the slices hold independent noise, as one process would draw it.
    # (Each rank drawing only its slice's would give every rank the same numbers.)
    width = logits.size(-1) if shard is None else shard.world * shard.share
    noise = torch.empty(logits.size(0), width, dtype=logits.dtype, device=logits.device).exponential_(1)
    if shard is not None:
        noise = noise[:, shard.start : shard.start + shard.share]
    return logits / max(temperature, 1e-5) - torch.log(noise)


# -- the two phases -------------------------------------------------------------------------
def prefill(model: Transformer, tokens: torch.Tensor, chunk: int, start: int = 0) -> torch.Tensor:
    """tokens [B, T] -> logits of the last position [B, V] (this rank's slice [B, V/W] of them
    under tensor parallelism, for sample); the cache is filled chunk by chunk."""
    logits = None
    for s in range(0, tokens.shape[1], chunk):
        piece = tokens[:, s : s + chunk]
        input_pos = torch.arange(start + s, start + s + piece.shape[1], device=tokens.device)
        logits = model(piece, input_pos, last_only=True, gather=False)
    return logits[:, -1]


def decode_one_token(model: Transformer, x: torch.Tensor, input_pos: torch.Tensor, temperature: float, top_k: Optional[int]):
    logits = model(x, input_pos, gather=False)[:, -1]  # [B, V/W] under tensor parallelism
    return sample(logits, temperature, top_k, tp.vocab_shard(model))


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
    first = sample(prefill_fn(model, prompt, prefill_chunk), temperature, top_k, tp.vocab_shard(model))
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


def compiled_step(device: str, compile_decode: bool) -> Callable:
    if not compile_decode:
        return decode_one_token
    if not device.startswith("cuda"):
        return torch.compile(decode_one_token, fullgraph=True)
    # CUDA graphs (what mode="reduce-overhead" sets) need a static step: the caches guarantee it.
    # The weight products are the Triton kernel with committed configs (linear_kernels.py), so no
    # tuning runs while compiling: inductor's coordinate-descent tuning, which wrote them as tuned
    # reductions before, timed candidates on a noisy GPU and kept whichever won, and the same
    # step took 1.0 to 1.8 ms more or less from one compile to the next (docs/linear.md).
    return torch.compile(decode_one_token, fullgraph=True, options={"triton.cudagraphs": True})


# -- command line ---------------------------------------------------------------------------
def add_global_options(p: argparse.ArgumentParser, suppress: bool = False) -> None:
    """The same options on the main parser and on each subcommand, so they work on either side.
    On subcommands the defaults are suppressed so they never overwrite what came before."""
    d = (lambda v: argparse.SUPPRESS) if suppress else (lambda v: v)
    p.add_argument("--checkpoint_path", type=Path, default=d(None),
                   help="model.pth, or its folder (default: the embedded SmolLM2-135M-Instruct, prepared on first use)")
    p.add_argument("--model_name", default=d(None), help="preset name when the checkpoint folder's name does not say it")
    p.add_argument("--prompt", default=d("Once upon a time,"), help="input text")
    p.add_argument("--prompt_file", type=Path, default=d(None), help="read the prompt from a UTF-8 text file")
    p.add_argument("--chat", action="store_true", default=d(False), help="apply the model's chat template (instruct models)")
    p.add_argument("--max_new_tokens", type=int, default=d(200), help="tokens to generate (fewer if the model ends its text)")
    p.add_argument("--num_samples", type=int, default=d(1), help="generations in a row, each with its stats line")
    p.add_argument("--batch_size", type=int, default=d(1), help="copies of the prompt decoded together")
    p.add_argument("--temperature", type=float, default=d(0.8), help="sampling temperature; 0 for greedy")
    p.add_argument("--top_k", type=int, default=d(200), help="sample among the k most likely tokens")
    p.add_argument("--seed", type=int, default=d(1234), help="random seed of the sampling")
    p.add_argument("--device", default=d(None), help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    p.add_argument("--precision", choices=["auto", *PRECISIONS], default=d("auto"), help="auto: bf16 on cuda, fp32 on cpu")
    p.add_argument("--compile", action="store_true", default=d(False), help="torch.compile the decode step (CUDA graphs on GPU)")
    p.add_argument("--compile_prefill", action="store_true", default=d(False), help="torch.compile prefill too (dynamic shapes)")
    p.add_argument("--prefill_chunk", type=int, default=d(512), help="prompt tokens per prefill forward")
    p.add_argument("--profile", default=d(None), metavar="NAME",
                   help="run under torch.profiler; writes outputs/NAME.* (NAME may name a subfolder of outputs/)")
    p.add_argument("--profile_steps", type=int, default=d(4), help="with --profile: decode steps recorded after the prefill")
    p.add_argument("--profile_detail", action="store_true", default=d(False),
                   help="with --profile: also record input shapes, memory, stacks and FLOPs (and the CUDA allocator's "
                        "history): a trace about 3x larger and slower to write")
    p.add_argument("--overwrite", action="store_true", default=d(False), help="let --profile replace existing outputs")
    p.add_argument("--dist_timeout", type=float, default=d(600),
                   help="under torchrun: seconds a collective may wait for the other ranks before failing")
    p.add_argument("--all_reduce", choices=tp.ALL_REDUCES, default=d("nccl"),
                   help="under torchrun: the per-layer all-reduces through NCCL, or one-shot through symmetric memory "
                        "(CUDA GPUs; the decode step's messages, prefill's larger ones still through NCCL)")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The module docstring as written, and each option's default after its help (unless the
    help already says it, or there is none to show: a flag, or an option that is off when unset)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """A mistake on the command line is one `error:` line (argparse prints its usage block first)."""

    def error(self, message):
        self.exit(2, f"error: {message}; see `{self.prog} --help`\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(description=__doc__, formatter_class=HelpFormatter)
    add_global_options(parser)
    subs = parser.add_subparsers(dest="strategy", metavar="{" + ",".join(STRATEGIES) + "}",
                                 help="KV-cache strategy (default: full); `STRATEGY --help` lists its options")
    for name, strategy in STRATEGIES.items():
        sub = subs.add_parser(name, help=strategy.help, description=strategy.help, formatter_class=HelpFormatter)
        strategy.add_options(sub)
        add_global_options(sub, suppress=True)
    return parser


def check_args(args: argparse.Namespace) -> None:
    for name in ("max_new_tokens", "num_samples", "batch_size", "prefill_chunk"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name} must be positive, got {getattr(args, name)}")
    if args.top_k is not None and args.top_k <= 0:
        raise UserError(f"--top_k must be positive, got {args.top_k}")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise UserError(f"--temperature must be a number >= 0 (0 for greedy), got {args.temperature}")
    if args.profile is not None:
        from profiling import check_profile_name

        if args.profile_steps <= 0:
            raise UserError(f"--profile_steps must be positive, got {args.profile_steps}")
        try:
            check_profile_name(args.profile)
        except ValueError as e:
            raise UserError(str(e))


def encode_prompt(text: str, chat: bool, tokenizer) -> list[int]:
    if chat:
        from tokenizer import chat_prompt

        try:
            return chat_prompt(tokenizer, text)
        except ValueError as e:
            raise UserError(str(e))
    return tokenizer.encode(text, bos=tokenizer.add_bos)


def read_prompt_file(path: Path) -> str:
    if not path.exists():
        raise UserError(f"--prompt_file {path} not found")
    if not path.is_file():
        raise UserError(f"--prompt_file {path} is not a file; give the path of a text file")
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"--prompt_file {path} is not UTF-8 text (a binary file?); give a text file")
    except OSError as e:
        raise UserError(f"--prompt_file {path} could not be read ({e.strerror})")


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


def kv_stats(model: Transformer, batch_size: int, allocated_tokens: int) -> dict:
    """Bytes the caches hold, and their ratio to a full cache allocated for the same number of
    tokens, in bf16 (fp32 on a CPU run, so the ratio measures the strategy, not the precision)."""
    c = model.config
    device = model.tok_embeddings.weight.device
    held = tp.sum_over_ranks(sum(cache.nbytes() for cache in model.caches()), device)  # all ranks' shards
    dtype = torch.float32 if model.tok_embeddings.weight.dtype == torch.float32 else torch.bfloat16
    n_kv_heads = c.n_local_heads * getattr(model, "tp_world_size", 1)
    full = full_cache_nbytes(batch_size, allocated_tokens, n_kv_heads, c.head_dim, c.n_layer, dtype)
    return {"kv_bytes": held, "kv_bytes_full": full, "kv_full_dtype": str(dtype).removeprefix("torch."),
            "kv_allocated_tokens": allocated_tokens, "kv_ratio": held / full}


def format_stats(r: dict) -> str:
    mem = f", peak memory {r['peak_memory_bytes'] / 2**30:.2f} GiB" if r.get("peak_memory_bytes") else ""
    return (f"time to first token {r['ttft_s'] * 1000:.1f} ms, decode {r['tokens_per_s']:.1f} tokens/s "
            f"({r['decode_tokens']} tokens x batch {r['batch_size']}), KV cache {r['kv_bytes'] / 2**20:.2f} MiB held "
            f"for {r['kv_allocated_tokens']} tokens (prompt + --max_new_tokens) = {r['kv_ratio']:.2f}x a full "
            f"{r['kv_full_dtype']} cache of that length{mem}")


def run(args: argparse.Namespace) -> list[dict]:
    check_args(args)
    try:
        settings = strategy_settings(args)
    except ValueError as e:
        raise UserError(str(e))
    text = args.prompt if args.prompt_file is None else read_prompt_file(args.prompt_file)
    device = pick_device(args.device)
    try:
        device = tp.init(device, args.dist_timeout)  # under torchrun/srun: join the group, cuda:LOCAL_RANK
        tp.check_all_reduce(args.all_reduce, device)
    except ValueError as e:
        raise UserError(str(e))
    dtype = pick_dtype(args.precision, device)
    checkpoint = resolve_checkpoint(args.checkpoint_path)
    model = load_model(checkpoint, device, dtype, args.model_name, args.all_reduce, args.batch_size)
    tokenizer = load_tokenizer(checkpoint)

    ids = encode_prompt(text, args.chat, tokenizer)
    if not ids:
        raise UserError("the prompt is empty; pass --prompt TEXT")
    prompt = torch.tensor([ids] * args.batch_size, device=device)
    max_seq_length = len(ids) + args.max_new_tokens
    setup(model, settings, args.batch_size, max_seq_length)
    step = compiled_step(device, args.compile)
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

        profiler = contextlib.nullcontext()
        if args.profile and i == args.num_samples - 1:
            from profiling import profile_run

            name = args.profile if tp.world_size() == 1 else f"{args.profile}_rank{tp.rank()}"
            profiler = profile_run(name, steps=args.profile_steps, detail=args.profile_detail, quiet=not tp.is_main(),
                                   overwrite=args.overwrite, device=device, model=model, settings=settings)
        with torch.no_grad(), profiler as recorder:

            def on_token(tok):
                if stream is not None and int(tok[0, 0]) not in tokenizer.eos_ids:
                    print(stream.push(int(tok[0, 0])), end="", flush=True)
                if recorder is not None:  # the profiler records prefill + the first --profile_steps steps
                    recorder.step()

            r = generate(model, prompt, args.max_new_tokens, step, args.temperature, args.top_k,
                         args.prefill_chunk, prefill_fn, frozenset(tokenizer.eos_ids), on_token)
            if stream is not None:  # the text's last line ends before the profiler says anything
                print(stream.flush())
        if stream is None:
            for row in r["tokens"].tolist():
                print(tokenizer.decode(row))
                print("-" * 40)
        stats = {
            "sample": i, "batch_size": args.batch_size, "n_tokens": r["tokens"].shape[1], "ttft_s": r["ttft_s"],
            "decode_tokens": r["decode_tokens"], "tokens_per_s": r["decode_tokens"] * args.batch_size / max(r["decode_s"], 1e-9),
            **kv_stats(model, args.batch_size, max_seq_length),
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
