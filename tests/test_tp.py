"""Tensor parallelism on the CPU with gloo: N ranks compute what one rank computes.

Ranks are launched the way users launch them, `torchrun --standalone --nproc_per_node N`, on
either generate.py or this file's worker (`python -m tests.test_tp`, run by torchrun), which
writes each rank's logits to a file. The rank-death test starts the ranks itself with the
environment srun/torchrun would give them, since torchrun would stop the survivors on its own.
"""
import argparse
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

import tp
from generate import decode_one_token, load_model, sample
from model import ModelArgs, Transformer
from strategies import cache_factory

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
# fp32 throughout; TP changes only the order of summation (each rank's partial wo/w2 products,
# then the all-reduce), so the logits agree to a few ulps of their size (~2): 1e-5 absolute.
ATOL = 1e-5


def torchrun(n: int, *args, timeout=300) -> subprocess.CompletedProcess:
    cmd = ["torchrun", "--standalone", "--nproc_per_node", str(n), *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


# -- the worker: teacher-forced logits of every strategy ------------------------------------
def logits_trace(model: Transformer, settings: dict, compile_step: bool = False) -> dict:
    """A fixed random prompt prefilled in chunks, then DECODE_STEPS one-token steps fed fixed
    tokens (so the inputs never depend on the logits): logits [steps + 1, V] and the token each
    step samples at temperature 0.8 with the same seed on every rank."""
    tokens = torch.randint(0, model.config.vocab_size, (1, PROMPT_LEN + DECODE_STEPS), generator=torch.Generator().manual_seed(0))
    model.setup_caches(1, PROMPT_LEN + DECODE_STEPS, cache_factory(settings))
    step = torch.compile(decode_one_token, fullgraph=True) if compile_step else None
    torch.manual_seed(1234)
    logits, samples = [], []
    with torch.no_grad():
        for s in range(0, PROMPT_LEN, PREFILL_CHUNK):
            end = min(s + PREFILL_CHUNK, PROMPT_LEN)
            logits.append(model(tokens[:, s:end], torch.arange(s, end), last_only=True)[:, -1])
        for p in range(PROMPT_LEN, PROMPT_LEN + DECODE_STEPS):
            x, pos = tokens[:, p : p + 1], torch.tensor([p])
            if step is not None:
                samples.append(step(model, x, pos, 0.0, None))
                continue
            logits.append(model(x, pos)[:, -1])
            samples.append(sample(logits[-1], 0.8, 50))
    kv = tp.sum_over_ranks(sum(c.nbytes() for c in model.caches()), "cpu")
    return {"logits": torch.cat(logits) if logits else None, "samples": torch.cat(samples), "kv_bytes": kv}


def worker(checkpoints: list[Path], strategies: list[str], out: Path, compile_step: bool) -> None:
    tp.init("cpu", timeout_s=120)
    result = {}
    for ckpt in checkpoints:
        model = load_model(ckpt, "cpu", torch.float32)
        for name in strategies:
            result[(ckpt.parent.name, name)] = logits_trace(model, STRATEGIES[name], compile_step)
    torch.save(result, out / f"rank{tp.rank()}.pt")
    tp.shutdown()
    # Threads of a group that outlives shutdown() race the interpreter's exit (tp.init says why).
    left = [(t / "comm").read_text().strip() for t in Path("/proc/self/task").glob("*")]
    if any("gloo" in name for name in left):
        sys.exit(f"error: gloo threads outlived shutdown(): {left}")


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


def run_worker(n: int, checkpoints: list[Path], strategies: list[str], out: Path, compile_step: bool = False) -> list[dict]:
    args = ["-m", "tests.test_tp", "--out", str(out), "--strategies", *strategies, "--checkpoints", *map(str, checkpoints)]
    r = torchrun(n, *args, *(["--compile"] if compile_step else []))
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
    ranks = run_worker(2, [tiny, mha], strategies, tmp_path)
    for key, one in ref.items():
        r0, r1 = ranks[0][key], ranks[1][key]
        assert one["logits"].shape == (PROMPT_LEN // PREFILL_CHUNK + 1 + DECODE_STEPS, ModelArgs.from_name(key[0]).vocab_size)
        torch.testing.assert_close(r0["logits"], one["logits"], atol=ATOL, rtol=0, msg=lambda m: f"{key}: {m}")
        # Every rank holds the same logits bit for bit, so the same seed samples the same tokens.
        assert torch.equal(r0["logits"], r1["logits"]), key
        assert torch.equal(r0["samples"], r1["samples"]), key
        # Each rank holds half of every cache; the sum over ranks is the single-process size.
        assert r0["kv_bytes"] == one["kv_bytes"], key


def test_compiled_step_traces_the_all_reduces(tiny, tmp_path):
    """torch.compile(fullgraph=True) of the decode step under TP (functional collectives): greedy
    tokens of the compiled 2-rank step equal the eager 1-rank ones (the GPU adds CUDA graphs)."""
    model = load_model(tiny, "cpu", torch.float32)
    eager = logits_trace(model, STRATEGIES["int4"])
    greedy = torch.stack([l.argmax() for l in eager["logits"][-DECODE_STEPS:]])
    ranks = run_worker(2, [tiny], ["int4"], tmp_path, compile_step=True)
    for r in ranks:
        assert torch.equal(r[("tiny", "int4")]["samples"].flatten(), greedy)


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
    assert tp.init("cuda", timeout_s=5) == "cuda:1"
    assert joined == {"device": "cuda:1", "backend": "nccl"}
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    with pytest.raises(ValueError, match="4 ranks on this node but 2 GPU"):
        tp.init("cuda", timeout_s=5)


def test_world_size_not_dividing_the_heads(tiny):
    r = torchrun(3, "generate.py", "--checkpoint_path", str(tiny), "--max_new_tokens", "4")
    assert r.returncode != 0
    lines = error_lines(r.stderr)
    assert len(lines) == 1, r.stderr[-3000:]
    assert "KV heads (2)" in lines[0] and "--nproc_per_node in [1, 2]" in lines[0]


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
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoints", type=Path, nargs="+", required=True)
    p.add_argument("--strategies", nargs="+", choices=list(STRATEGIES), default=list(STRATEGIES))
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--compile", action="store_true")
    a = p.parse_args()
    worker(a.checkpoints, a.strategies, a.out, a.compile)
