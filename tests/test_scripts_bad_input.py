"""Bad input to the scripts: one `error:` line on stderr that says what to do, a
non-zero exit status, no traceback, and nothing written anywhere. Each command runs from an empty
working folder beside the files it is given, so a file written relative to the current folder
shows up too. And the other side: a bug of ours is a traceback, not advice."""
import importlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = json.dumps({"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                          "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 256,
                          "tie_word_embeddings": False}).encode()


def files(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else "folder" for p in sorted(folder.rglob("*"))}


@pytest.fixture
def fails_in_one_line(tmp_path, monkeypatch, capsys):
    """fails_in_one_line(module, *args) runs the module's main(args) from the empty folder
    tmp_path/cwd and returns its error line. In-process (a subprocess per case costs seconds);
    test_the_command_line checks the real stderr of one case per script."""
    def run(module: str, *args) -> str:
        cwd = tmp_path / "cwd"
        cwd.mkdir(exist_ok=True)
        monkeypatch.chdir(cwd)
        before = files(tmp_path)
        with pytest.raises(SystemExit) as exit_:
            importlib.import_module(module).main([str(a) for a in args])
        line = exit_.value.code  # what the interpreter prints on stderr
        assert isinstance(line, str) and line.startswith("error: ") and "\n" not in line
        assert capsys.readouterr().err == ""
        assert files(tmp_path) == before
        return line

    return run


# -- scripts.convert_hf_checkpoint: damaged downloads ----------------------------------------------
def safetensors_bytes() -> bytes:
    from safetensors.torch import save

    return save({"model.norm.weight": torch.ones(64)})


def torch_save_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


DAMAGED = {  # case: (the folder's files, the one named as damaged)
    "config not JSON": ({"config.json": b'{"hidden_size": 64,'}, "config.json"),
    "config a list": ({"config.json": b"[64, 2, 4]"}, "config.json"),
    "config not UTF-8": ({"config.json": b"\xff\xfe{}"}, "config.json"),
    "safetensors truncated": ({"model.safetensors": safetensors_bytes()[:60]}, "model.safetensors"),
    "safetensors garbage": ({"model.safetensors": b"\x00" * 7}, "model.safetensors"),
    "index not JSON": ({"model.safetensors.index.json": b'{"weight_map": {', "model.safetensors": b""},
                       "model.safetensors.index.json"),
    "index without weight_map": ({"model.safetensors.index.json": b'{"metadata": {}}'}, "model.safetensors.index.json"),
    "index a list": ({"model.safetensors.index.json": b'["model.safetensors"]'}, "model.safetensors.index.json"),
    "bin garbage": ({"pytorch_model.bin": b"\x80\x04garbage"}, "pytorch_model.bin"),
    "bin truncated": ({"pytorch_model.bin": torch_save_bytes({"model.norm.weight": torch.ones(64)})[:300]},
                      "pytorch_model.bin"),
    "bin empty": ({"pytorch_model.bin": b""}, "pytorch_model.bin"),
    "bin not a state dict": ({"pytorch_model.bin": torch_save_bytes([torch.ones(2)])}, "pytorch_model.bin"),
}


def damaged_folder(tmp_path: Path, case: str) -> Path:
    folder = tmp_path / "ckpt"
    folder.mkdir()
    for name, data in {"config.json": TINY_CONFIG, **DAMAGED[case][0]}.items():
        (folder / name).write_bytes(data)
    return folder


@pytest.mark.parametrize("case", DAMAGED)
def test_convert_damaged_file(tmp_path, fails_in_one_line, case):
    folder = damaged_folder(tmp_path, case)
    line = fails_in_one_line("scripts.convert_hf_checkpoint", "--checkpoint_dir", folder, "--model_name", "tiny")
    damaged = DAMAGED[case][1]
    assert f"{folder / damaged} is damaged" in line and "download it again" in line and "scripts.download" in line


# -- scripts.evaluate: --out ------------------------------------------------------------------------
@pytest.mark.parametrize("content", ["[1, 2]", "null", '"eval"', '{"cells": []}'])
def test_evaluate_out_holding_other_json(tmp_path, fails_in_one_line, content):
    (tmp_path / "eval.json").write_text(content)
    line = fails_in_one_line("scripts.evaluate", "--quick", "--out", tmp_path / "eval.json")
    assert "is not a results file" in line and "--fresh" in line


@pytest.mark.parametrize("fresh", [[], ["--fresh"]])
def test_evaluate_out_is_a_folder(tmp_path, fails_in_one_line, fresh):
    (tmp_path / "results").mkdir()
    line = fails_in_one_line("scripts.evaluate", "--quick", *fresh, "--out", tmp_path / "results")
    assert "is a folder; pass a file name" in line


def test_evaluate_out_below_a_file(tmp_path, fails_in_one_line):
    (tmp_path / "notes.txt").write_text("mine")
    line = fails_in_one_line("scripts.evaluate", "--quick", "--out", tmp_path / "notes.txt" / "eval.json")
    assert "pass another --out" in line


def test_evaluate_text_file_not_utf8(tmp_path, fails_in_one_line):
    (tmp_path / "text.txt").write_bytes(b"caf\xe9 latin-1")
    line = fails_in_one_line("scripts.evaluate", "--quick", "--text_file", tmp_path / "text.txt", "--out", tmp_path / "eval.json")
    assert "is not UTF-8 text" in line


# -- scripts.benchmark --------------------------------------------------------------------------------
@pytest.mark.parametrize("args, says", [
    (["--model", "no-such-model"], "known presets: "),
    (["--batch_sizes", "0"], "--batch_sizes must be positive"),
    (["--steps", "0"], "--steps must be positive"),
    (["--long_context", "-1"], "--long_context must be 0 or more"),
    (["--device", "tpu"], "unknown --device"),
])
def test_benchmark_bad_arguments(tmp_path, fails_in_one_line, args, says):
    assert says in fails_in_one_line("scripts.benchmark", "--model", "tiny", *args, "--out", tmp_path / "b.json")


def test_benchmark_never_overwrites_the_png_either(tmp_path, fails_in_one_line):
    (tmp_path / "b.png").write_bytes(b"someone's plot")
    line = fails_in_one_line("scripts.benchmark", "--model", "tiny", "--out", tmp_path / "b.json")
    assert "b.png exists; pass another --out" in line


def test_benchmark_out_below_a_file(tmp_path, fails_in_one_line):
    (tmp_path / "notes.txt").write_text("mine")
    line = fails_in_one_line("scripts.benchmark", "--model", "tiny", "--out", tmp_path / "notes.txt" / "b.json")
    assert "pass another --out" in line


# -- scripts.bench_attention ------------------------------------------------------------------------
@pytest.mark.parametrize("args, says", [
    (["--cases", "8by32768"], "--cases takes BxS pairs"),
    (["--cases", "8x0"], "--cases takes BxS pairs"),
    (["--modes", "int8,int9"], "unknown --modes int9"),
    (["--cases", "1x8192,1x1024", "--capacity", "4096"], "no smaller than the longest case (8192 tokens)"),
    (["--cases", "1x1024", "--capacity", "1100"], "--capacity takes a multiple of 128"),
    pytest.param([], "CUDA GPU", marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is there")),
])
def test_bench_attention_bad_arguments(tmp_path, fails_in_one_line, args, says):
    assert says in fails_in_one_line("scripts.bench_attention", *args, "--out", tmp_path / "out")


def test_bench_attention_records_out_of_memory_but_not_bugs(monkeypatch):
    """A case too large for the GPU is the row's error and the run goes on; a kernel bug (here a
    TypeError) ends the run with its traceback instead of becoming a row error."""
    import decode_kernels as dk
    from scripts import bench_attention as ba

    def raise_(error):
        def launch(*args, **kwargs):
            raise error
        return launch

    monkeypatch.setattr(dk, "flash_decode", raise_(torch.cuda.OutOfMemoryError("CUDA out of memory")))
    args = (torch.zeros(1, ba.HQ, ba.D),) + (None,) * 6  # never read: the launch fails first
    row = {}
    ba.check_and_time(row, args, [args], None, ba.Switched("bf16"))
    assert "out of memory" in row["error"] and "ms" not in row
    monkeypatch.setattr(dk, "flash_decode", raise_(TypeError("a bug")))
    with pytest.raises(TypeError, match="a bug"):
        ba.check_and_time({}, args, [args], None, ba.Switched("int8"))
    assert ba.wrong({"rel_err": float("nan")}) and ba.wrong({"rel_err": 0.5}) and not ba.wrong({"rel_err": 1e-3})


def test_bench_attention_switches_are_set_for_a_while():
    """Switched sets a format's config, a module switch and its split minimum (--sweep,
    --variants, --splits) and puts every one back, also when the timed call raises."""
    import decode_kernels as dk
    from scripts import bench_attention as ba

    shipped = dk.CONFIGS[("int8", ba.D)], dk.CONVERT_ASM, dk.MIN_SPLIT
    with pytest.raises(RuntimeError, match="inside"):
        with ba.Switched("int8", config=(64, 4, 3, 8), flip="CONVERT_ASM", min_split=96):
            assert (dk.CONFIGS[("int8", ba.D)], dk.CONVERT_ASM, dk.MIN_SPLIT) == ((64, 4, 3, 8), not shipped[1], 96)
            raise RuntimeError("inside")
    assert (dk.CONFIGS[("int8", ba.D)], dk.CONVERT_ASM, dk.MIN_SPLIT) == shipped
    # bf16's grid is the exact slots alone: --splits sets their own minimum.
    shipped_exact = dk.EXACT_MIN_SPLIT, dk.MIN_SPLIT
    with ba.Switched("bf16", min_split=2048):
        assert (dk.EXACT_MIN_SPLIT, dk.MIN_SPLIT) == (2048, shipped_exact[1])
    assert (dk.EXACT_MIN_SPLIT, dk.MIN_SPLIT) == shipped_exact


def test_bench_attention_tables_against_shipped(capsys):
    """--splits and --variants rows: time and ratio to the shipped row, or the error of either."""
    from scripts import bench_attention as ba

    shipped = {"B": 1, "S": 8192, "capacity": 131072, "mode": "int8", "ms": 0.02}
    failed = {"B": 8, "S": 32768, "capacity": 32768, "mode": "int4", "error": "out of memory"}
    ba.print_against_shipped([(shipped, {"min_split": 64, "ms": 0.015, "rel_err": 1e-3}),
                              (failed, {"min_split": 64, "error": "out of memory"})], "MIN_SPLIT", "min_split")
    lines = capsys.readouterr().out.strip().splitlines()
    assert "| MIN_SPLIT |" in lines[0] and len(lines) == 4
    assert lines[2] == "| 1 | 8192 | 131072 | int8 | 0.0200 | 64 | 0.0150 | 0.75 | 1.0e-03 |"
    assert lines[3].startswith("| 8 | 32768 | 32768 | int4 |  | 64 | error: out of memory")
    ba.print_against_shipped([], "flipped", "flipped")
    assert capsys.readouterr().out == ""


# -- scripts.bench_linear ---------------------------------------------------------------------------
@pytest.mark.parametrize("args, says", [
    (["--model", "nope"], "known presets"),
    (["--tp", "3"], "use one of [1, 2, 4, 8]"),
    (["--grid", "cuda-cores"], "pass --rows 1"),
    pytest.param([], "CUDA GPU", marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is there")),
])
def test_bench_linear_bad_arguments(tmp_path, fails_in_one_line, args, says):
    assert says in fails_in_one_line("scripts.bench_linear", *args, "--out", tmp_path / "out")


def test_bench_linear_never_overwrites(tmp_path, fails_in_one_line):
    (tmp_path / "bench_linear.json").write_text("earlier results")
    assert "pass another --out" in fails_in_one_line("scripts.bench_linear", "--out", tmp_path)
    assert (tmp_path / "bench_linear.json").read_text() == "earlier results"


# -- the real command line: stderr holds the one line and nothing else ---------------------------------
COMMANDS = {
    "convert": lambda tmp: ["scripts.convert_hf_checkpoint", "--checkpoint_dir", damaged_folder(tmp, "bin garbage"),
                            "--model_name", "tiny"],
    "evaluate": lambda tmp: ["scripts.evaluate", "--out", tmp],
    "benchmark": lambda tmp: ["scripts.benchmark", "--model", "no-such-model", "--out", tmp / "b.json"],
    "bench_attention": lambda tmp: ["scripts.bench_attention", "--modes", "int9", "--out", tmp / "out"],
    "bench_linear": lambda tmp: ["scripts.bench_linear", "--tp", "3", "--out", tmp / "out"],
}


@pytest.mark.parametrize("script", COMMANDS)
def test_the_command_line(tmp_path, script):
    args = COMMANDS[script](tmp_path)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    before = files(tmp_path)
    env = dict(os.environ, PYTHONPATH=str(ROOT))  # run from another folder than the code's
    r = subprocess.run([sys.executable, "-m", *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True)
    assert r.returncode == 1
    assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith("error: "), r.stderr
    assert files(tmp_path) == before
