"""generate.py from the command line: options on either side of the subcommand, and every error
a user can cause reported in one line with a non-zero exit and no traceback."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from generate import build_parser
from default_model import DEFAULT_CHECKPOINT, prepare_default

ROOT = Path(__file__).resolve().parents[1]


def cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "generate.py", *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def assert_one_line_error(r, *fragments):
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = [l for l in r.stderr.strip().splitlines() if l.startswith("error:")]
    assert len(lines) == 1, r.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


def test_global_options_before_and_after_subcommand():
    p = build_parser()
    a = p.parse_args(["--max_new_tokens", "7", "quantize_kv", "--bits", "4", "--temperature", "0"])
    b = p.parse_args(["quantize_kv", "--max_new_tokens", "7", "--bits", "4", "--temperature", "0"])
    for args in (a, b):
        assert (args.max_new_tokens, args.bits, args.temperature, args.strategy) == (7, 4, 0.0, "quantize_kv")
    # A subcommand must not reset what came before it to the defaults.
    c = p.parse_args(["--prompt", "hi", "compress_kv"])
    assert c.prompt == "hi" and c.rope == "streaming"


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["quantize_kv", "--bits", "3"], ["invalid choice: 3"]),
        (["compress_kv", "--window_size", "0"], ["--window_size must be positive"]),
        (["quantize_kv", "--sink_size", "-4"], ["--sink_size must be positive"]),
        (["--max_new_tokens", "0"], ["--max_new_tokens must be positive"]),
        (["--device", "tpu"], ["unknown --device"]),
        (["--profile", "/tmp"], ["--profile takes a name", "--profile /tmp/run1"]),
    ],
)
def test_bad_options(args, fragments):
    r = cli(*args)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert all(f in r.stderr for f in fragments), r.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_gpu():
    assert_one_line_error(cli("--device", "cuda"), "no CUDA GPU", "--device cpu")


def test_missing_checkpoint(tmp_path):
    assert_one_line_error(cli("--checkpoint_path", str(tmp_path / "nope" / "model.pth")), "not found", "convert_hf_checkpoint")


def test_unknown_model_name(tmp_path):
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "model.pth").write_bytes(b"x")
    assert_one_line_error(cli("--checkpoint_path", str(folder / "model.pth")), "unknown model", "smollm2-135m")


@pytest.fixture(scope="module")
def default_dir():
    return prepare_default(DEFAULT_CHECKPOINT).parent.resolve()


def test_corrupt_checkpoint(tmp_path, default_dir):
    folder = tmp_path / "SmolLM2-135M-Instruct"
    folder.mkdir()
    (folder / "model.pth").write_bytes(b"not a checkpoint at all")
    for f in default_dir.glob("*.gguf"):
        (folder / f.name).symlink_to(f)
    assert_one_line_error(cli("--checkpoint_path", str(folder / "model.pth")), "could not be read")


def test_missing_tokenizer(tmp_path, default_dir):
    folder = tmp_path / "SmolLM2-135M-Instruct"
    folder.mkdir()
    (folder / "model.pth").symlink_to(default_dir / "model.pth")
    assert_one_line_error(cli("--checkpoint_path", str(folder / "model.pth")), "prepare_default")


@pytest.mark.slow
def test_prompt_longer_than_context(default_dir):
    r = cli("--prompt", "hello " * 9000, "--max_new_tokens", "4", "--device", "cpu")
    assert_one_line_error(r, "exceeds the model's context of 8192")


@pytest.mark.slow
def test_group_size_that_does_not_fit(default_dir):
    r = cli("--max_new_tokens", "200", "--device", "cpu", "quantize_kv", "--bits", "4", "--group_size", "48")
    assert_one_line_error(r, "does not fit the head dimension (64)")


@pytest.mark.slow
def test_sink_and_window_larger_than_cache(default_dir):
    r = cli("--max_new_tokens", "5", "--device", "cpu", "quantize_kv", "--sink_size", "16", "--window_size", "32")
    assert_one_line_error(r, "exceed the cache length")


@pytest.mark.slow
@pytest.mark.parametrize("strategy", [[], ["compress_kv", "--window_size", "8", "--sink_size", "4"], ["quantize_kv", "--window_size", "8", "--sink_size", "4", "--bits", "4", "--group_size", "16"]])
def test_generates_text_and_stats(strategy):
    r = cli("--prompt", "The capital of France is", "--max_new_tokens", "40", "--temperature", "0", "--device", "cpu", *strategy)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("The capital of France is") and len(r.stdout) > len("The capital of France is") + 10
    assert "tokens/s" in r.stderr and "KV cache" in r.stderr
