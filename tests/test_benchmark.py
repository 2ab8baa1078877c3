"""scripts/benchmark.py on the CPU (eager, tiny model): the JSON it writes, its refusals. GPU
timings are the device's; here only that every figure is there and sane."""
import argparse
import importlib
import json
import subprocess
import sys

import pytest
import torch


def bench(tmp_path, *extra):
    out = tmp_path / "b.json"
    cmd = [sys.executable, "-m", "scripts.benchmark", "--model", "tiny", "--batch_sizes", "1", "--contexts", "32", "64",
           "--long_context", "0", "--steps", "2", "--repeats", "2", "--no_compile", "--out", str(out), *extra]
    return subprocess.run(cmd, capture_output=True, text=True), out


def test_writes_every_row_and_figure(tmp_path):
    r, out = bench(tmp_path, "--layers", "1", "--strategies", "full", "compress_kv", "int8", "int4")
    assert r.returncode == 0, r.stderr
    result = json.loads(out.read_text())
    assert result["layers"] == 1 and result["model"] == "tiny"
    rows = {(row["strategy"], row["context"]): row for row in result["rows"]}
    assert set(rows) == {(s, c) for s in ("full", "compress_kv", "int8") for c in (32, 64)}
    for row in rows.values():
        assert row["ms_per_step"] > 0 and row["ms_per_step_back_to_back"] > 0
        assert len(row["ms_repeat_medians"]) == 2 and len(row["ms_back_to_back_repeats"]) == 2
        assert row["kv_bytes"] > 0 and row["bytes_read"] > row["kv_bytes"] // 2
    # The tiny model's head dim (16) cannot take the default KIVI group: skipped with the reason.
    assert [e["strategy"] for e in result["errors"]] == ["int4"] and "--value_group" in result["errors"][0]["error"]
    assert out.with_suffix(".png").exists()


def test_never_overwrites(tmp_path):
    (tmp_path / "b.json").write_text("{}")
    r, out = bench(tmp_path)
    assert r.returncode != 0 and "exists" in r.stderr and out.read_text() == "{}"


def test_trace_per_row_that_summarize_profile_reads(tmp_path):
    """--trace: one profiler trace per row beside the JSON, carrying the row's settings, that
    scripts.summarize_profile reads (on the CPU: host ops, no GPU idle figures); an existing trace
    file is never overwritten."""
    from profile_summary import summarize

    r, out = bench(tmp_path, "--layers", "1", "--strategies", "full", "int8", "--trace")
    assert r.returncode == 0, r.stderr
    traces = sorted(p.name for p in tmp_path.glob("*.trace.json"))
    assert traces == [f"b.b1.{s}.{c}.trace.json" for s in ("full", "int8") for c in (32, 64)]
    summary = summarize(json.loads((tmp_path / "b.b1.int8.64.trace.json").read_text()))
    assert summary["total_us"] > 0 and summary["idle"] == {}
    assert summary["meta"]["settings"] == {"batch": 1, "strategy": "int8", "context": 64, "weights": "bf16"}
    s = subprocess.run([sys.executable, "-m", "scripts.summarize_profile", str(tmp_path / "b.b1.full.32.trace.json")],
                       capture_output=True, text=True)
    assert s.returncode == 0 and "strategy=full, context=32" in s.stdout, s.stderr
    # A second run with another --out but a trace name taken: refused before anything runs.
    (tmp_path / "c.b1.full.64.trace.json").write_text("mine")
    cmd = list(r.args)
    cmd[cmd.index("--out") + 1] = str(tmp_path / "c.json")
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode != 0 and "c.b1.full.64.trace.json exists" in r.stderr
    assert (tmp_path / "c.b1.full.64.trace.json").read_text() == "mine" and not (tmp_path / "c.json").exists()


def test_prints_no_floor_without_a_measured_bandwidth(tmp_path):
    r, out = bench(tmp_path, "--layers", "1", "--strategies", "full")
    assert r.returncode == 0, r.stderr
    assert json.loads(out.read_text())["rows"][0]["floor_ms"] is None
    assert "floor n/a" in r.stdout and "roofline" not in r.stdout


def test_help_lists_presets_defaults_and_a_working_example():
    from model import PRESETS
    from scripts.benchmark import build_parser

    text = build_parser().format_help()
    assert all(name in text for name in PRESETS)
    # The docstring's example continues over two lines with a shell backslash.
    assert "--contexts 1024 8192 32768 \\\n        --long_context 131072" in text


@pytest.mark.parametrize("module", ["scripts.benchmark", "scripts.evaluate", "scripts.bench_attention"])
def test_every_option_shows_its_default(module):
    parser = importlib.import_module(module).build_parser()
    for action in parser._actions:
        takes_value = action.option_strings and not isinstance(action, (argparse._HelpAction, argparse._StoreTrueAction))
        if takes_value:
            assert "default" in (action.help or ""), f"{module} {action.option_strings[0]}: {action.help}"


def test_a_bug_in_tp_init_is_a_traceback(tmp_path, monkeypatch):
    """tp.init's ValueError (a launch that cannot work) is the user's; anything else is ours: it
    once turned an UnboundLocalError into `error: cannot access local variable 'torch'`."""
    from scripts import benchmark

    def raise_(error):
        def init(device):
            raise error
        return init

    argv = ["--model", "tiny", "--out", str(tmp_path / "b.json")]
    monkeypatch.setattr(benchmark.tp, "init", raise_(TypeError("a bug")))
    with pytest.raises(TypeError, match="a bug"):
        benchmark.main(argv)
    monkeypatch.setattr(benchmark.tp, "init", raise_(ValueError("2 ranks on this node but 1 GPU(s) visible")))
    with pytest.raises(SystemExit, match="^error: 2 ranks on this node"):
        benchmark.main(argv)
    assert list(tmp_path.iterdir()) == []


def test_only_settings_that_do_not_fit_are_skipped(monkeypatch):
    """check_settings' ValueError skips a (batch, strategy); a ValueError from inside the
    measurement is a bug and propagates."""
    from scripts import benchmark

    args = benchmark.build_parser().parse_args(["--model", "tiny", "--contexts", "64", "--long_context", "0"])
    model = benchmark.random_model("tiny", "cpu", torch.float32, 1)
    rows, error = benchmark.run_config(model, 1, "int4", args, "cpu", None)
    assert rows == [] and "--value_group" in error

    def broken(*a, **k):
        raise ValueError("a bug")

    monkeypatch.setattr(benchmark, "bench_config", broken)
    with pytest.raises(ValueError, match="a bug"):
        benchmark.run_config(model, 1, "full", args, "cpu", None)
