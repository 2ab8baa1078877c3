"""generate.py from the command line: options on either side of the subcommand, and every error
a user can cause reported in one line with a non-zero exit and no traceback."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import generate
import tp
from default_model import GGUF_NAME
from generate import build_parser
from strategies import strategy_settings

ROOT = Path(__file__).resolve().parents[1]


def cli(*args, cwd=ROOT, env=None):
    return subprocess.run([sys.executable, str(ROOT / "generate.py"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env=None if env is None else dict(os.environ, **env))


def main_in_process(*args, capsys) -> subprocess.CompletedProcess:
    """generate.main(args) as a CompletedProcess, without a new interpreter (seconds saved per
    test); what sys.exit(message) would print at exit goes to stderr, as it would."""
    try:
        generate.main(list(args))
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    if isinstance(code, str):
        err, code = err + code + "\n", 1
    return subprocess.CompletedProcess(args, code, out, err)


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
        assert (args.max_new_tokens, args.bits, args.temperature, args.strategy) == (7, "4", 0.0, "quantize_kv")
        assert strategy_settings(args)["bits"] == 4
    # A subcommand must not reset what came before it to the defaults.
    c = p.parse_args(["--prompt", "hi", "compress_kv"])
    assert c.prompt == "hi" and c.rope == "streaming"


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["quantize_kv", "--bits", "3"], ["invalid choice: '3'"]),
        (["compress_kv", "--window_size", "0"], ["--window_size must be positive"]),
        (["quantize_kv", "--sink_size", "-4"], ["--sink_size must be positive"]),
        (["--max_new_tokens", "0"], ["--max_new_tokens must be positive"]),
        (["--device", "tpu"], ["unknown --device"]),
        (["--profile", "runs/"], ["--profile takes a name", "--profile runs/run1"]),
        (["--temperature", "nan"], ["--temperature must be a number >= 0"]),
        (["--temperature", "-1"], ["--temperature must be a number >= 0"]),
        (["quantize_kv", "--bits", "8", "--group_size", "7"], ["--group_size, --key_group and --value_group set the KIVI groups"]),
        (["--profile", "x", "--profile_steps", "0"], ["--profile_steps must be positive"]),
    ],
)
def test_bad_options(args, fragments, capsys):
    assert_one_line_error(main_in_process(*args, capsys=capsys), *fragments)


def test_bad_option_from_the_shell():
    assert_one_line_error(cli("quantize_kv", "--bits", "3"), "invalid choice: '3'")


@pytest.mark.parametrize("name", ["../escape", "/tmp/x/run", "afile/run", "a/../../b"])
def test_profile_names_that_leave_the_outputs_folder(tmp_path, name, monkeypatch, capsys):
    """Checked before anything is loaded; nothing is written anywhere."""
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    (outputs / "afile").write_text("a file, not a folder")
    before = sorted(tmp_path.rglob("*"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ENGINE_OUTPUTS", str(outputs))
    assert_one_line_error(main_in_process("--profile", name, capsys=capsys), "--profile")
    assert sorted(tmp_path.rglob("*")) == before


def test_prompt_file_that_is_not_text(tmp_path, capsys):
    assert_one_line_error(main_in_process("--prompt_file", str(tmp_path), capsys=capsys), "is not a file")
    binary = tmp_path / "blob.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    assert_one_line_error(main_in_process("--prompt_file", str(binary), capsys=capsys), "is not UTF-8 text")


def test_full_is_a_subcommand():
    args = build_parser().parse_args(["full", "--max_new_tokens", "3"])
    assert (args.strategy, args.max_new_tokens) == ("full", 3)


def test_help_shows_defaults(capsys):
    r = main_in_process("--help", capsys=capsys)
    for fragment in ("--max_new_tokens", "(default: 200)", "--num_samples", "--batch_size", "--top_k", "--seed",
                     "{full,compress_kv,quantize_kv}"):
        assert fragment in r.stdout
    assert "bf16 cache" not in r.stdout  # the full cache is in the model's dtype (fp32 on a CPU)
    r = main_in_process("quantize_kv", "--help", capsys=capsys)
    assert "(default: 32)" in r.stdout and "(default: 8)" in r.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_gpu():
    assert_one_line_error(cli("--device", "cuda"), "no CUDA GPU", "--device cpu")


def test_missing_checkpoint(tmp_path):
    assert_one_line_error(cli("--checkpoint_path", str(tmp_path / "nope" / "model.pth")), "not found", "convert_hf_checkpoint")


def test_missing_quantized_checkpoint_names_the_quantize_command(tmp_path):
    """A missing model_int8.pth is made by scripts.quantize from the model.pth beside it, not by a download."""
    missing = tmp_path / "nope" / "model_int8.pth"
    assert_one_line_error(cli("--checkpoint_path", str(missing)), "not found",
                          f"python -m scripts.quantize --checkpoint_path {missing.with_name('model.pth')} --mode int8")


def test_unknown_model_name(tmp_path):
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "model.pth").write_bytes(b"x")
    assert_one_line_error(cli("--checkpoint_path", str(folder / "model.pth")), "unknown model", "smollm2-135m")


@pytest.fixture(scope="module")
def default_dir(default_checkpoint):
    return default_checkpoint.parent


def checkpoint_folder(tmp_path, default_dir, model=None, gguf=None) -> Path:
    """A default-model folder in tmp_path whose model.pth / GGUF are the real ones unless given."""
    folder = tmp_path / "SmolLM2-135M-Instruct"
    folder.mkdir()
    for name, content in (("model.pth", model), (GGUF_NAME, gguf)):
        if content is None:
            (folder / name).symlink_to(default_dir / name)
        else:
            (folder / name).write_bytes(content)
    return folder


@pytest.mark.parametrize("content", [b"not a checkpoint at all", b"", "truncated"])
def test_damaged_checkpoint(tmp_path, default_dir, content, capsys):
    if content == "truncated":
        content = (default_dir / "model.pth").read_bytes()[: 10**6]
    folder = checkpoint_folder(tmp_path, default_dir, model=content)
    r = main_in_process("--checkpoint_path", str(folder / "model.pth"), capsys=capsys)
    assert_one_line_error(r, "is damaged", "prepare_default")


def test_truncated_gguf_next_to_a_good_checkpoint(tmp_path, default_dir, capsys):
    folder = checkpoint_folder(tmp_path, default_dir, gguf=(default_dir / GGUF_NAME).read_bytes()[:5000])
    r = main_in_process("--checkpoint_path", str(folder), "--device", "cpu", capsys=capsys)
    assert_one_line_error(r, "is damaged or not a GGUF file")


def test_truncated_default_gguf_without_checkpoint(tmp_path, default_dir, monkeypatch, capsys):
    """The default model's folder with a cut-short GGUF and no model.pth: preparing it fails in one line."""
    folder = tmp_path / "SmolLM2-135M-Instruct"
    folder.mkdir()
    (folder / GGUF_NAME).write_bytes((default_dir / GGUF_NAME).read_bytes()[: 40 * 2**20])
    monkeypatch.setattr(generate, "DEFAULT_CHECKPOINT", folder / "model.pth")
    with pytest.raises(SystemExit) as e:
        generate.main(["--device", "cpu", "--max_new_tokens", "2"])
    assert str(e.value).startswith("error: ") and "is damaged" in str(e.value) and "\n" not in str(e.value)
    assert sorted(p.name for p in folder.iterdir()) == [GGUF_NAME]  # no partial model.pth left behind


def test_preset_that_does_not_fit(default_dir, capsys):
    r = main_in_process("--checkpoint_path", str(default_dir / "model.pth"), "--model_name", "tiny", capsys=capsys)
    assert_one_line_error(r, "does not fit preset 'tiny'", "in the file", "in the preset")


def test_programming_error_is_a_traceback(default_dir, monkeypatch):
    """A bug inside our own code must surface as itself, never as advice to the user."""
    def broken(*args, **kwargs):
        raise TypeError("injected bug")

    monkeypatch.setattr(generate.torch, "load", broken)
    with pytest.raises(TypeError, match="injected bug"):
        generate.main(["--checkpoint_path", str(default_dir / "model.pth"), "--device", "cpu"])


def test_only_backend_errors_count_as_collective_failures(monkeypatch):
    monkeypatch.setattr(tp, "world_size", lambda: 2)
    gloo = RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error: Connection reset by peer")
    assert tp.is_collective_failure(gloo)
    assert not tp.is_collective_failure(RuntimeError("shape mismatch in our code (mentions nccl and gloo, timed out)"))


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
@pytest.mark.parametrize("strategy", ["quantize_kv", "compress_kv"])
@pytest.mark.parametrize("window", ["32", "100000", "1000000000"])
def test_sink_and_window_larger_than_cache(default_dir, strategy, window, capsys):
    r = main_in_process("--max_new_tokens", "5", "--device", "cpu", strategy, "--sink_size", "16", "--window_size", window, capsys=capsys)
    assert_one_line_error(r, "exceed the cache length")


@pytest.mark.slow
@pytest.mark.parametrize("strategy", [[], ["compress_kv", "--window_size", "8", "--sink_size", "4"], ["quantize_kv", "--window_size", "8", "--sink_size", "4", "--bits", "4", "--group_size", "16"]])
def test_generates_text_and_stats(strategy, default_dir):
    r = cli("--prompt", "The capital of France is", "--max_new_tokens", "40", "--temperature", "0", "--device", "cpu", *strategy)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("The capital of France is") and len(r.stdout) > len("The capital of France is") + 10
    assert "tokens/s" in r.stderr and "KV cache" in r.stderr
    # The ratio compares like with like: a full cache allocated for the same prompt + 40 tokens.
    n_prompt = len(generate.load_tokenizer(DEFAULT_DIR / "model.pth").encode("The capital of France is"))
    assert f"held for {n_prompt + 40} tokens" in r.stderr
    ratio = float(r.stderr.split(" tokens (prompt + --max_new_tokens) = ")[1].split("x")[0])
    assert ratio == 1.0 if not strategy else ratio < 1.0


def test_runs_from_another_folder(tmp_path, default_dir):
    """The default model is found next to the code wherever the command starts; nothing is
    written into the current folder."""
    r = cli("--max_new_tokens", "3", "--device", "cpu", "--temperature", "0", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert list(tmp_path.iterdir()) == []


DEFAULT_DIR = ROOT / "checkpoints" / "SmolLM2-135M-Instruct"
