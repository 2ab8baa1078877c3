"""--profile: the files it writes, never overwriting, and the time split of the summary."""
import json

import pytest
import torch

import generate
from model import ModelArgs, Transformer
from profiling import profile_run
from scripts import summarize_profile as sp
from strategies import cache_factory


def tiny_model(settings):
    torch.manual_seed(0)
    model = Transformer(ModelArgs.from_name("tiny")).eval()
    model.setup_caches(1, 64, cache_factory(settings))
    return model


def profiled_tiny_run(tmp_path, name, settings, **kw):
    model = tiny_model(settings)
    prompt = torch.randint(0, 256, (1, 40))
    with torch.no_grad():
        generate.generate(model, prompt, 4, generate.decode_one_token)  # warm-up, outside the profile
        with profile_run(name, model=model, settings=settings, out_dir=tmp_path, quiet=True, **kw):
            generate.generate(model, prompt, 4, generate.decode_one_token)
    return model


def op_names(trace: dict) -> set:
    return {e["name"] for e in trace["traceEvents"] if e.get("cat") == "cpu_op"}


@pytest.mark.slow
def test_generate_profile_writes_trace_table_and_summary(tmp_path, monkeypatch, capsys):
    """The real CLI on the default model: files land in $ENGINE_OUTPUTS, the trace holds the model's ops."""
    monkeypatch.setenv("ENGINE_OUTPUTS", str(tmp_path))
    generate.main(["--max_new_tokens", "4", "--device", "cpu", "--temperature", "0", "--profile", "run"])
    trace = json.loads((tmp_path / "run.json").read_text())
    names = op_names(trace)
    assert {"aten::linear", "aten::mm"} <= names
    assert any("scaled_dot_product" in n for n in names)
    table = (tmp_path / "run.txt").read_text()
    assert "aten::mm" in table and "FLOPs" in table and "CPU Mem" in table
    summary = json.loads((tmp_path / "run_summary.json").read_text())
    assert sum(summary["shares"].values()) == pytest.approx(1.0, abs=1e-9)
    assert summary["times_us"]["matmul"] > 0 and summary["times_us"]["attention"] > 0
    assert summary["meta"]["kv_bytes"] > 0 and summary["meta"]["param_bytes"] > 0
    assert summary["meta"]["settings"] == {"strategy": "full"}
    err = capsys.readouterr().err
    assert f"{tmp_path / 'run.json'}" in err and "Profile summary" in err

    # A second run with the same name gets a numbered suffix; the first files stay as they were.
    before = (tmp_path / "run.json").read_bytes()
    profiled_tiny_run(tmp_path, "run", {"strategy": "full"})
    assert (tmp_path / "run.json").read_bytes() == before
    assert json.loads((tmp_path / "run_1.json").read_text())["traceEvents"]


def test_second_run_gets_a_suffix_unless_overwrite(tmp_path):
    profiled_tiny_run(tmp_path, "a", {"strategy": "full"})
    first = (tmp_path / "a.json").read_bytes()
    profiled_tiny_run(tmp_path, "a", {"strategy": "full"})
    profiled_tiny_run(tmp_path, "a", {"strategy": "full"})
    assert (tmp_path / "a.json").read_bytes() == first
    for stem in ("a_1", "a_2"):
        assert {p.name for p in tmp_path.glob(f"{stem}.*")} | {p.name for p in tmp_path.glob(f"{stem}_*")} == {
            f"{stem}.json", f"{stem}.txt", f"{stem}_summary.json"}
    profiled_tiny_run(tmp_path, "a", {"strategy": "full"}, overwrite=True)
    assert (tmp_path / "a.json").read_bytes() != first
    assert not (tmp_path / "a_3.json").exists()


@pytest.mark.parametrize("settings", [
    {"strategy": "full"},
    {"strategy": "quantize_kv", "sink_size": 4, "window_size": 8, "bits": 4, "group_size": 8},
])
def test_summary_shares_add_up_and_kv_share_is_reported(tmp_path, settings):
    model = profiled_tiny_run(tmp_path, "s", settings)
    trace = json.loads((tmp_path / "s.json").read_text())
    assert any("scaled_dot_product" in n for n in op_names(trace))
    s = sp.summarize(trace)
    assert sum(s["shares"].values()) == pytest.approx(1.0, abs=1e-9)
    assert sum(s["times_us"].values()) == pytest.approx(s["total_us"])
    # The window's host time is fully accounted for: the shares are of the recorded step's length.
    step = next(e for e in trace["traceEvents"] if e["name"].startswith("ProfilerStep#"))
    assert s["total_us"] == pytest.approx(step["dur"], rel=1e-6)
    assert s["meta"]["kv_bytes"] == sum(c.nbytes() for c in model.caches())
    paragraph = sp.format_summary(s)
    for label in ("attention", "matmuls", "KV quantize/dequantize", "other", "KV cache"):
        assert label in paragraph
    # The printed summary and the saved one agree.
    assert json.loads((tmp_path / "s_summary.json").read_text())["shares"] == pytest.approx(s["shares"])


def test_summarize_script_compares_two_traces(tmp_path, capsys):
    profiled_tiny_run(tmp_path, "full", {"strategy": "full"})
    profiled_tiny_run(tmp_path, "quant", {"strategy": "quantize_kv", "sink_size": 4, "window_size": 8, "bits": 8, "group_size": 32})
    sp.main([str(tmp_path / "full.json"), str(tmp_path / "quant.json"), "--json", str(tmp_path / "cmp.json")])
    out = capsys.readouterr().out
    assert "strategy=quantize_kv" in out and "top ops of full" in out and "top ops of quant" in out
    assert set(json.loads((tmp_path / "cmp.json").read_text())) == {str(tmp_path / "full.json"), str(tmp_path / "quant.json")}


def _x(name, ts, dur, cat="cpu_op", **args):
    return {"ph": "X", "cat": cat, "name": name, "pid": 1, "tid": 1, "ts": ts, "dur": dur, "args": args}


def test_categorizer_rules_on_a_synthetic_host_trace():
    trace = {"traceEvents": [
        _x("ProfilerStep#1", 0, 100, cat="user_annotation"),
        _x("aten::linear", 0, 20), _x("aten::t", 1, 2), _x("aten::addmm", 5, 10),            # matmul: 20
        _x("kv_attend", 20, 40, cat="user_annotation"),
        _x("kv_dequantize", 21, 9, cat="user_annotation"), _x("aten::mul", 22, 5),          # kv_quant: 9
        _x("aten::scaled_dot_product_attention", 30, 20), _x("aten::bmm", 31, 8),           # attention: 31
        _x("kv_quantize", 60, 10, cat="user_annotation"), _x("aten::round", 61, 4),          # kv_quant: 10
        _x("aten::argmax", 75, 5),                                                           # other: 5 + 30 gaps
    ]}
    s = sp.summarize(trace)
    assert s["times_us"] == pytest.approx({"attention": 31, "matmul": 20, "kv_quant": 19, "other": 30})
    assert s["total_us"] == pytest.approx(100)
    assert s["ranges_seen"] == ["kv_attend", "kv_dequantize", "kv_quantize"]


def test_categorizer_charges_kernels_to_their_launching_op():
    trace = {"traceEvents": [
        _x("aten::linear", 0, 10, **{"External id": 1}), _x("cudaLaunchKernel", 2, 1, cat="cuda_runtime", correlation=7),
        _x("kvcache::decode_attention", 10, 10, **{"External id": 2}),
        _x("cudaLaunchKernel", 12, 1, cat="cuda_runtime", correlation=8),
        _x("aten::add", 20, 5, **{"External id": 3}), _x("cudaLaunchKernel", 21, 1, cat="cuda_runtime", correlation=9),
        _x("sm90_xmma_gemm_bf16", 3, 50, cat="kernel", correlation=7),
        _x("_decode_kernel", 60, 30, cat="kernel", correlation=8),
        _x("elementwise_kernel", 95, 5, cat="kernel", correlation=9),
        _x("Memcpy DtoD", 101, 15, cat="gpu_memcpy", correlation=99),
        _x("_combine_kernel", 120, 0, cat="kernel"),
    ]}
    s = sp.summarize(trace)
    assert s["basis"].startswith("GPU time")
    assert s["times_us"] == pytest.approx({"attention": 30, "matmul": 50, "kv_quant": 0, "other": 20})
