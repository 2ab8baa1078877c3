"""Tensor parallelism on the CPU with gloo: N ranks compute what one rank computes.

Ranks are launched the way users launch them, `torchrun --standalone --nproc_per_node N`, on
either generate.py or this file's workers (`python -m tests.test_tp`, run by torchrun), which
write each rank's logits and tokens to a file. The rank-death test starts the ranks itself with
the environment srun/torchrun would give them, since torchrun would stop the survivors on its own.
"""
import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import tp
from generate import build_parser, decode_one_token, load_model, sample
from model import PRESETS, ModelArgs, Transformer
from strategies import cache_factory
from weight_quant import use_int8_linears

ROOT = Path(__file__).resolve().parents[1]
PROMPT_LEN, PREFILL_CHUNK, DECODE_STEPS = 40, 16, 50
# Small sink/window so tokens are evicted (compress_kv) or quantized (quantize_kv) within the
# 90 positions; KIVI groups of 8 divide the tiny model's head_dim 16.
STRATEGIES = {
    "full": {"strategy": "full"},
    "compress_kv": {"strategy": "compress_kv", "sink_size": 4, "window_size": 8, "rope": "streaming"},
    "int8": {"strategy": "quantize_kv", "sink_size": 4, "window_size": 8, "bits": 8},
    "int4": {"strategy": "quantize_kv", "sink_size": 4, "window_size": 8, "bits": 4, "key_group": 8, "value_group": 8},
}
# Models built in place rather than from a preset's checkpoint, with a vocabulary that 2 does not
# divide (rank 1 holds 127 of 255 rows and pads its logits): tied embeddings (SmolLM2-style), and
# int8 weights (the output layer's codes and scales split by rows). Full cache only: the output
# layer does not depend on the cache.
CONFIGS = {
    "tied-odd": dict(PRESETS["tiny"], tie_embeddings=True, vocab_size=255),
    "odd-int8": dict(PRESETS["tiny"], vocab_size=255),
}
# fp32 throughout; TP changes only the order of summation (each rank's partial wo/w2 products,
# then the all-reduce), so the logits agree to a few ulps of their size: 1e-5 absolute for the
# presets' (~2), plus 1e-6 relative (8 ulps) for the tied model's (~70: nn.Embedding's table is
# N(0, 1)).
ATOL, RTOL = 1e-5, 1e-6


def torchrun(n: int, *args, timeout=300) -> subprocess.CompletedProcess:
    cmd = ["torchrun", "--standalone", "--nproc_per_node", str(n), *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


# -- the worker: teacher-forced logits of every strategy ------------------------------------
def logits_trace(model: Transformer, settings: dict, compile_step: bool = False) -> dict:
    """A fixed random prompt prefilled in chunks, then DECODE_STEPS one-token steps fed fixed
    tokens (so the inputs never depend on the logits). Returns the logits [steps + 1, V] of the
    whole vocabulary (gathered from the ranks' slices) and the token each decode step chooses
    from its rank's slice: greedy, and sampled at temperature 0.8 among the top 50 with the same
    seed on every rank. With compile_step, the compiled step's greedy tokens instead."""
    tokens = torch.randint(0, model.config.vocab_size, (1, PROMPT_LEN + DECODE_STEPS), generator=torch.Generator().manual_seed(0))
    model.setup_caches(1, PROMPT_LEN + DECODE_STEPS, cache_factory(settings))
    shard = tp.vocab_shard(model)
    step = torch.compile(decode_one_token, fullgraph=True) if compile_step else None
    torch.manual_seed(1234)
    logits, greedy, sampled = [], [], []
    with torch.no_grad():
        for s in range(0, PROMPT_LEN, PREFILL_CHUNK):
            end = min(s + PREFILL_CHUNK, PROMPT_LEN)
            logits.append(model(tokens[:, s:end], torch.arange(s, end), last_only=True)[:, -1])
        for p in range(PROMPT_LEN, PROMPT_LEN + DECODE_STEPS):
            x, pos = tokens[:, p : p + 1], torch.tensor([p])
            if step is not None:
                greedy.append(step(model, x, pos, 0.0, None))
                continue
            local = model(x, pos, gather=False)[:, -1]  # [1, V/W]: this rank's slice
            logits.append(local if shard is None else shard.gather(local))
            greedy.append(sample(local, 0.0, None, shard))
            sampled.append(sample(local, 0.8, 50, shard))
    kv = tp.sum_over_ranks(sum(c.nbytes() for c in model.caches()), "cpu")
    return {"logits": torch.cat(logits), "greedy": torch.cat(greedy), "sampled": torch.cat(sampled) if sampled else None,
            "kv_bytes": kv}


def config_model(name: str) -> Transformer:
    """CONFIGS[name] with random weights (the same on every rank), sharded under torchrun."""
    torch.manual_seed(0)
    model = Transformer(ModelArgs(**CONFIGS[name])).eval()
    if name.endswith("int8"):
        use_int8_linears(model, quantize=True)
    return tp.shard(model)


def worker(checkpoints: list[Path], strategies: list[str], configs: list[str], out: Path, compile_step: bool) -> None:
    tp.init("cpu", timeout_s=120)
    result = {}
    for ckpt in checkpoints:
        model = load_model(ckpt, "cpu", torch.float32)
        for name in strategies:
            result[(ckpt.parent.name, name)] = logits_trace(model, STRATEGIES[name], compile_step)
    for name in configs:
        result[(name, "full")] = logits_trace(config_model(name), STRATEGIES["full"], compile_step)
    finish(result, out)


def finish(result: dict, out: Path) -> None:
    torch.save(result, out / f"rank{tp.rank()}.pt")
    tp.shutdown()
    # Threads of a group that outlives shutdown() race the interpreter's exit (tp.init says why).
    # A leaked group's threads never end; gloo's transport loop was once seen still ending right
    # after shutdown() (1 of about 20 runs), so they get a few seconds before this fails.
    deadline = time.monotonic() + 5
    while (left := gloo_threads()) and time.monotonic() < deadline:
        time.sleep(0.01)
    if left:
        sys.exit(f"error: gloo threads outlived shutdown(): {left}")


def gloo_threads() -> list[str]:
    names = [(t / "comm").read_text().strip() for t in Path("/proc/self/task").glob("*")]
    return [name for name in names if "gloo" in name]


# -- the sampler worker: draws from fixed logits --------------------------------------------
# 11 tokens over 2 ranks: rank 0 holds ids 0-5, rank 1 ids 6-10 and a padding entry. The 5
# largest (ids 1, 3 | 7, 9, 10) lie on both ranks, two pairs at the same place in their slices
# (1 and 7, 3 and 9), where noise drawn alike by both ranks would show.
SAMPLER_LOGITS = torch.tensor([0.3, 2.0, -1.0, 1.2, 0.5, -0.3, 0.0, 1.9, -2.0, 1.5, 1.7])
TEMPERATURE, TOP_K, DRAWS = 0.8, 5, 50_000
# Greedy: a tie across the ranks (ids 2 and 7), a tie on rank 1 (ids 7 and 9), the largest at the
# last id (next to the padding), at the first, and all below 0 (where a padding of 0 would win).
TIES = torch.zeros(5, 11)
TIES[0, [2, 7]] = TIES[1, [7, 9]] = TIES[2, 10] = TIES[3, 0] = 1.0
TIES[4] = -1.0 - torch.arange(11.0)


def draws(logits: torch.Tensor, ties: torch.Tensor, shard) -> dict:
    """generate.sample on a rank's slices (or the whole rows, shard None): DRAWS tokens from
    `logits` [1, V], and the greedy tokens of `ties`; eagerly, and a few compiled."""
    rows = logits.expand(DRAWS, -1)
    torch.manual_seed(0)
    compiled = torch.compile(sample, fullgraph=True)
    return {"sampled": sample(rows, TEMPERATURE, TOP_K, shard)[:, 0], "greedy": sample(ties, 0.0, None, shard)[:, 0],
            "compiled_sampled": compiled(rows[:64], TEMPERATURE, TOP_K, shard)[:, 0],
            "compiled_greedy": compiled(ties, 0.0, None, shard)[:, 0]}


def sampler_worker(out: Path) -> None:
    tp.init("cpu", timeout_s=120)
    shard = tp.VocabShard(SAMPLER_LOGITS.numel(), tp.world_size(), tp.rank(), dist.group.WORLD.group_name)

    def local(full: torch.Tensor) -> torch.Tensor:  # [N, V] -> this rank's [N, share], as the model gives it
        return shard.pad(full[:, shard.start : shard.start + shard.size])

    with torch.no_grad():
        finish(draws(local(SAMPLER_LOGITS[None]), local(TIES), shard), out)


def write_random_checkpoint(folder: Path) -> Path:
    """A random fp32 model whose folder name picks its preset."""
    folder.mkdir(parents=True)
    torch.manual_seed(0)
    model = Transformer(ModelArgs.from_name(folder.name))
    torch.save(model.state_dict(), folder / "model.pth")
    return folder / "model.pth"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


def run_worker(n: int, out: Path, *args: str) -> list[dict]:
    r = torchrun(n, "-m", "tests.test_tp", "--out", str(out), *args)
    assert r.returncode == 0, r.stderr[-3000:]
    return [torch.load(out / f"rank{i}.pt") for i in range(n)]


# -- tests ----------------------------------------------------------------------------------
def test_two_ranks_match_one_rank_for_every_strategy(tiny, tmp_path):
    # tiny: 4 heads, 2 KV heads (GQA); tiny-mha: 4 KV heads and a qkv bias (Qwen-style), full cache.
    mha = write_random_checkpoint(tmp_path / "tiny-mha")
    strategies = list(STRATEGIES)
    # The reference: one process, no process group (the model is not sharded).
    ref = {}
    for ckpt in (tiny, mha):
        model = load_model(ckpt, "cpu", torch.float32)
        for name in strategies:
            ref[(ckpt.parent.name, name)] = logits_trace(model, STRATEGIES[name])
    for name in CONFIGS:
        ref[(name, "full")] = logits_trace(config_model(name), STRATEGIES["full"])
    ranks = run_worker(2, tmp_path, "--strategies", *strategies, "--checkpoints", str(tiny), str(mha),
                       "--configs", *CONFIGS)
    for key, one in ref.items():
        r0, r1 = ranks[0][key], ranks[1][key]
        vocab = one["logits"].shape[1]
        assert one["logits"].shape[0] == PROMPT_LEN // PREFILL_CHUNK + 1 + DECODE_STEPS
        torch.testing.assert_close(r0["logits"], one["logits"], atol=ATOL, rtol=RTOL, msg=lambda m: f"{key}: {m}")
        # Every rank gathers the same logits, and chooses the same tokens from its own slice.
        assert torch.equal(r0["logits"], r1["logits"]), key
        assert torch.equal(r0["greedy"], r1["greedy"]) and torch.equal(r0["sampled"], r1["sampled"]), key
        assert torch.equal(r0["greedy"], one["greedy"]), key
        if vocab % 2 == 0:
            # Each rank keeps its slice of the noise one process draws for the whole vocabulary
            # (same seed), so it samples what one process samples, given logits this close.
            assert torch.equal(r0["sampled"], one["sampled"]), key
        # Each rank holds half of every cache; the sum over ranks is the single-process size.
        assert r0["kv_bytes"] == one["kv_bytes"], key


def test_compiled_step_traces_the_collectives(tiny, tmp_path):
    """torch.compile(fullgraph=True) of the decode step under TP (functional collectives: the
    all-reduces and the greedy choice's gather): greedy tokens of the compiled 2-rank step equal
    the eager 1-rank ones (the GPU adds CUDA graphs)."""
    model = load_model(tiny, "cpu", torch.float32)
    eager = logits_trace(model, STRATEGIES["int4"])
    ranks = run_worker(2, tmp_path, "--strategies", "int4", "--checkpoints", str(tiny), "--compile")
    for r in ranks:
        assert torch.equal(r[("tiny", "int4")]["greedy"], eager["greedy"])


def chi_square(tokens: torch.Tensor) -> float:
    """Pearson's statistic of DRAWS tokens against the distribution sample() draws from: softmax
    of SAMPLER_LOGITS / TEMPERATURE over its TOP_K largest, none elsewhere."""
    kth = SAMPLER_LOGITS.topk(TOP_K).values[-1]
    p = torch.softmax(torch.where(SAMPLER_LOGITS < kth, -float("inf"), SAMPLER_LOGITS) / TEMPERATURE, dim=-1)
    counts = torch.bincount(tokens, minlength=p.numel()).double()
    assert counts[p == 0].sum() == 0, "a token outside the top k"
    expected = DRAWS * p[p > 0].double()
    return float(((counts[p > 0] - expected) ** 2 / expected).sum())


# chi-square with TOP_K - 1 = 4 degrees of freedom exceeds 23.51 with probability 1e-4: a correct
# sampler fails for about one seed in 10^4 (the seeds are fixed, so a run's result never changes).
# A wrong one fails: with 50,000 draws, the top token's probability (0.29) off by 5% of itself
# adds ~40 to the statistic (whose mean is 4), and noise shared by two tokens (each rank drawing
# the same numbers for its slice) adds thousands.
CHI2_LIMIT = 23.51


def test_sharded_sampling_draws_what_one_process_draws(tmp_path):
    """generate.sample on 2 ranks' slices of fixed logits (11 tokens: uneven slices, the top 5 on
    both ranks): every rank draws the same tokens, from the distribution one process draws from;
    greedy picks the lowest id among ties, as torch.argmax does; the compiled sampler agrees."""
    whole = draws(SAMPLER_LOGITS[None], TIES, None)
    ranks = run_worker(2, tmp_path, "--sampler")
    for key in whole:
        assert torch.equal(ranks[0][key], ranks[1][key]), key
    for result in (whole, ranks[0]):
        assert torch.equal(result["greedy"], TIES.argmax(dim=-1)) and torch.equal(result["compiled_greedy"], result["greedy"])
        assert chi_square(result["sampled"]) < CHI2_LIMIT
        assert set(result["compiled_sampled"].tolist()) <= {1, 3, 7, 9, 10}


@pytest.mark.slow
def test_three_ranks_generate_what_one_rank_does():
    """The default model (9 heads, 3 KV heads, intermediate 1536) over 3 ranks: same greedy text,
    same KV-cache size in the stats line (the total over ranks), printed once."""
    from default_model import prepare_default

    prepare_default()
    args = ["generate.py", "--temperature", "0", "--max_new_tokens", "20", "--prompt", "The three primary colors are"]
    one = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    three = torchrun(3, *args)
    assert one.returncode == 0 and three.returncode == 0, three.stderr[-3000:]
    assert three.stdout == one.stdout and len(one.stdout) > len("The three primary colors are") + 20
    kv = re.compile(r"KV cache ([\d.]+ MiB held .*? = [\d.]+x)")
    assert kv.findall(three.stderr) == kv.findall(one.stderr) and len(kv.findall(one.stderr)) == 1


def test_init_on_gpus(monkeypatch):
    """tp.init's CUDA branch, on a machine without GPUs: a fake count of two, and the group's
    creation recorded instead of made. (This branch once failed on every GPU launch while the
    CPU tests passed.)"""
    joined = {}
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: joined.setdefault("device", device))
    monkeypatch.setattr(tp.dist, "init_process_group", lambda backend, timeout: joined.setdefault("backend", backend))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    # NVLink multicast stays off even where the user's environment turns it on.
    monkeypatch.setenv("NCCL_NVLS_ENABLE", "1")
    monkeypatch.setenv("TORCH_SYMM_MEM_DISABLE_MULTICAST", "0")
    assert tp.init("cuda", timeout_s=5) == "cuda:1"
    assert joined == {"device": "cuda:1", "backend": "nccl"}
    assert os.environ["NCCL_NVLS_ENABLE"] == "0" and os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] == "1"
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    with pytest.raises(ValueError, match="4 ranks on this node but 2 GPU"):
        tp.init("cuda", timeout_s=5)


def test_shutdown_frees_cuda_graphs_before_the_nccl_group(monkeypatch):
    """tp.shutdown's NCCL branch, on a machine without GPUs: torch.compile's CUDA graphs are freed
    before the group is destroyed (NCCL waits for every graph that captured a collective: the
    compiled runs on two H200s hung there after their output), and the compiled code with them
    (the next call compiles again)."""
    compiled = torch.compile(lambda x: x * 2, fullgraph=True)
    compiled(torch.ones(2))
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    calls = []
    monkeypatch.setattr(tp.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(tp.dist, "get_backend", lambda: "nccl")
    monkeypatch.setattr(tp.dist, "destroy_process_group", lambda: calls.append("destroy"))
    reset = torch._dynamo.reset
    monkeypatch.setattr(torch._dynamo, "reset", lambda: (calls.append("reset"), reset()))
    tp.shutdown()
    assert calls == ["reset", "destroy"]
    compiled(torch.ones(2))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs + 1


def test_world_size_not_dividing_the_heads(tiny):
    r = torchrun(3, "generate.py", "--checkpoint_path", str(tiny), "--max_new_tokens", "4")
    assert r.returncode != 0
    lines = error_lines(r.stderr)
    assert len(lines) == 1, r.stderr[-3000:]
    assert "KV heads (2)" in lines[0] and "--nproc_per_node in [1, 2]" in lines[0]


def test_all_reduce_option():
    parser = build_parser()
    assert parser.parse_args([]).all_reduce == "nccl"
    assert parser.parse_args(["quantize_kv", "--all_reduce", "symm_mem"]).all_reduce == "symm_mem"
    with pytest.raises(SystemExit):
        parser.parse_args(["--all_reduce", "mpi"])


def test_symm_mem_off_cuda_is_one_error_line(tmp_path):
    """generate.py under torchrun on the CPU (gloo), and the benchmark: one `error:` line that
    says what works; the benchmark writes nothing."""
    gen = torchrun(2, "generate.py", "--device", "cpu", "--all_reduce", "symm_mem")
    out = tmp_path / "b.json"
    bench = subprocess.run([sys.executable, "-m", "scripts.benchmark", "--model", "tiny", "--device", "cpu",
                            "--all_reduce", "symm_mem", "--out", str(out)], cwd=ROOT, capture_output=True, text=True)
    for r in (gen, bench):
        lines = error_lines(r.stderr)
        assert r.returncode != 0 and len(lines) == 1, r.stderr[-3000:]
        assert "needs CUDA GPUs" in lines[0] and "--all_reduce nccl" in lines[0], lines
    # (torchrun prints a traceback of its own when a rank fails.)
    assert 'generate.py", line' not in gen.stderr and "Traceback" not in bench.stderr
    assert not out.exists()


def test_benchmark_records_the_all_reduce(tmp_path):
    out = tmp_path / "b.json"
    r = subprocess.run([sys.executable, "-m", "scripts.benchmark", "--model", "tiny", "--layers", "1", "--strategies", "full",
                        "--batch_sizes", "1", "--contexts", "32", "--long_context", "0", "--steps", "2", "--repeats", "1",
                        "--no_compile", "--out", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(out.read_text())["all_reduce"] == "nccl"


def test_all_reduce_stages_small_messages_in_symmetric_memory(monkeypatch):
    """tp.all_reduce's branch, on the CPU: a message that fits the group's staging buffer (a
    decode step's) goes to the one-shot op with a view of that buffer in the message's shape and
    dtype, also from a compiled graph (the buffer never enters it); a larger message (prefill's)
    or a dtype the kernel does not take goes through NCCL. The op is a fake CPU kernel standing
    for two ranks (it doubles), funcol.all_reduce a fake that triples."""
    calls = []

    def one_shot(symm_buffer, local_input, reduce_op, group_name):
        calls.append((symm_buffer.untyped_storage().data_ptr(), tuple(symm_buffer.shape), symm_buffer.dtype))
        return local_input * 2

    buffer = torch.empty(128, dtype=torch.uint8)  # 32 fp32 or 64 bf16
    monkeypatch.setitem(tp._symm_mem_buffers, "g", buffer)
    monkeypatch.setattr(tp.funcol, "all_reduce", lambda x, op, group: x * 3)
    with torch.library._scoped_library("symm_mem", "IMPL") as lib:
        lib.impl("one_shot_all_reduce_copy", one_shot, "CPU")
        for shape, dtype, symm in [((2, 1, 16), torch.float32, True), ((2, 1, 16), torch.bfloat16, True),
                                   ((2, 4, 16), torch.float32, False), ((2, 1, 16), torch.float16, False)]:
            x = torch.randn(shape).to(dtype)
            assert torch.equal(tp.all_reduce(x, "g", buffer.numel()), x * (2 if symm else 3)), (shape, dtype)
            assert calls == ([(buffer.data_ptr(), shape, dtype)] if symm else []), (shape, dtype)
            calls.clear()
        x = torch.randn(2, 1, 16)
        assert torch.equal(tp.all_reduce(x, "g", 0), x * 3) and not calls  # --all_reduce nccl: no buffer
        compiled = torch.compile(lambda x: tp.all_reduce(x + 1, "g", buffer.numel()), fullgraph=True)
        assert torch.equal(compiled(x), (x + 1) * 2)
        assert calls == [(buffer.data_ptr(), (2, 1, 16), torch.float32)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "stopped"])
def test_a_rank_dies_mid_run(tmp_path, how):
    """A rank killed (or frozen) mid-generation: the others stop with a one-line error within the
    collective timeout instead of hanging. Ranks started as srun would start them, without torchrun
    (which would stop the survivors itself)."""
    from default_model import prepare_default

    prepare_default()
    timeout = 10
    env = dict(os.environ, WORLD_SIZE="3", LOCAL_WORLD_SIZE="3", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, "generate.py", "--temperature", "0", "--max_new_tokens", "4000", "--dist_timeout", str(timeout)]
    procs = []
    for r in range(3):
        out, err = open(tmp_path / f"{r}.out", "w"), open(tmp_path / f"{r}.err", "w")
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), stdout=out, stderr=err))
    try:
        start = time.monotonic()
        while (tmp_path / "0.out").stat().st_size < 60:  # rank 0 streams the prompt, then tokens
            assert time.monotonic() - start < 180 and procs[0].poll() is None, (tmp_path / "0.err").read_text()
            time.sleep(0.2)
        procs[2].send_signal(how)
        killed = time.monotonic()
        for p in procs[:2]:
            p.wait(timeout=timeout + 30)
        assert time.monotonic() - killed < timeout + 10
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for r in (0, 1):
        assert procs[r].returncode != 0
        stderr = (tmp_path / f"{r}.err").read_text()
        lines = error_lines(stderr)
        assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
        assert f"rank {r}: a collective failed or timed out" in lines[0]


if __name__ == "__main__":
    # torchrun --standalone --nproc_per_node N -m tests.test_tp --out DIR --checkpoints A/model.pth ...
    # torchrun --standalone --nproc_per_node 2 -m tests.test_tp --out DIR --sampler
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoints", type=Path, nargs="*", default=[])
    p.add_argument("--strategies", nargs="+", choices=list(STRATEGIES), default=list(STRATEGIES))
    p.add_argument("--configs", nargs="*", choices=list(CONFIGS), default=[])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--sampler", action="store_true", help="the sampler worker instead")
    a = p.parse_args()
    if a.sampler:
        sampler_worker(a.out)
    else:
        worker(a.checkpoints, a.strategies, a.configs, a.out, a.compile)
