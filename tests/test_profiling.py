"""--profile: the names it accepts, the recorded window, the files it writes, never overwriting, and
the time split of the summary."""
import json
import re

import pytest
import torch

import generate
import profiling
from model import ModelArgs, Transformer
from profiling import check_profile_name, profile_run
import profile_summary as sp
from scripts import summarize_profile
from strategies import cache_factory

FOLDER = "--profile takes a name for the files it writes (NAME.json, NAME.txt, ...), not a folder"


def tiny_model(settings):
    torch.manual_seed(0)
    model = Transformer(ModelArgs.from_name("tiny")).eval()
    model.setup_caches(1, 128, cache_factory(settings))
    return model


def profiled_tiny_run(tmp_path, name, settings, tokens=4, steps=8, **kw):
    """A generation of `tokens` tokens on the tiny model, its first `steps` decode steps recorded."""
    model = tiny_model(settings)
    prompt = torch.randint(0, 256, (1, 40))
    with torch.no_grad():
        generate.generate(model, prompt, 4, generate.decode_one_token)  # warm-up, outside the profile
        with profile_run(name, steps, model=model, settings=settings, out_dir=tmp_path, quiet=True, **kw) as recorder:
            generate.generate(model, prompt, tokens, generate.decode_one_token, on_token=lambda tok: recorder.step())
    return model


def op_names(trace: dict) -> set:
    return {e["name"] for e in trace["traceEvents"] if e.get("cat") == "cpu_op"}


def count(trace: dict, name: str) -> int:
    return sum(e["name"] == name for e in trace["traceEvents"] if e.get("ph") == "X")


def profiler_steps(trace: dict) -> list[dict]:
    return [e for e in trace["traceEvents"] if e.get("ph") == "X" and e["name"].startswith("ProfilerStep#")]


def files(folder) -> list:
    return sorted(p.relative_to(folder) for p in folder.rglob("*"))


# -- names --------------------------------------------------------------------------------------
def bad_name_error(out, name) -> str:
    with pytest.raises(ValueError) as e:
        check_profile_name(name, out)
    message = str(e.value)
    assert "\n" not in message and message.startswith("--profile")
    return message


def suggestion(message: str) -> str:
    """The NAME of the `--profile NAME` the message suggests."""
    return re.findall(r"--profile (\S+?)[,;]?(?: |$)", message)[-1]


@pytest.mark.parametrize("name, fragments", [
    ("../escape", ["'..'", "e.g. --profile escape", "ENGINE_OUTPUTS"]),
    ("a/../../b", ["'..'", "e.g. --profile a/b"]),
    ("..", ["'..'", "e.g. --profile run1"]),
    ("runs/", [FOLDER, "('runs/'); e.g. --profile runs/run1"]),
    ("runs/.", [FOLDER, "e.g. --profile runs/run1"]),
    (".", [FOLDER, "e.g. --profile run1"]),
    ("", [FOLDER, "e.g. --profile run1"]),
    ("existing", [FOLDER, "('existing'); e.g. --profile existing/run1"]),            # a folder in outputs
    ("existing/deeper", [FOLDER, "e.g. --profile existing/deeper/run1"]),
    ("afile/run", ["afile to be a folder, but it is a file", "e.g. --profile afile_run"]),
    ("existing/afile/x/run", ["afile to be a folder, but it is a file", "e.g. --profile existing_afile_x_run"]),
])
def test_names_that_are_not_files_in_the_outputs_folder(tmp_path, name, fragments):
    out = tmp_path / "outputs"
    (out / "existing" / "deeper").mkdir(parents=True)
    (out / "afile").write_text("a file")
    (out / "existing" / "afile").write_text("a file")
    message = bad_name_error(out, name)
    for f in fragments:
        assert f in message, message
    # What the message says to do works.
    check_profile_name(suggestion(message), out)


def test_absolute_names_point_to_the_outputs_variable(tmp_path):
    out = tmp_path / "outputs"
    out.mkdir()
    message = bad_name_error(out, str(tmp_path / "x" / "run"))
    assert "not an absolute path" in message and f"ENGINE_OUTPUTS={tmp_path / 'x'} and pass --profile run" in message
    message = bad_name_error(out, str(tmp_path))  # an existing folder
    assert f"ENGINE_OUTPUTS={tmp_path} and pass --profile run1" in message
    check_profile_name(suggestion(message), tmp_path)


@pytest.mark.parametrize("name", ["run1", "runs/int8", "existing/int8", "new/sub/run", "./run", "v1.2"])
def test_names_inside_the_outputs_folder_are_fine(tmp_path, name):
    (tmp_path / "existing").mkdir()
    check_profile_name(name, tmp_path)


@pytest.mark.parametrize("name", ["../escape", "escape/../../x", "afile/run", "runs/"])
def test_profile_run_writes_nothing_for_a_bad_name(tmp_path, name):
    """Checked before anything is written, by profile_run itself too: the whole tree stays as it was."""
    out = tmp_path / "outputs"
    out.mkdir()
    (out / "afile").write_text("a file")
    before = files(tmp_path)
    with pytest.raises(ValueError), profile_run(name, 2, out_dir=out):
        pass
    with pytest.raises(ValueError), profile_run(str(tmp_path / "abs" / "run"), 2, out_dir=out):
        pass
    assert files(tmp_path) == before


def test_default_outputs_folder_is_next_to_the_code(tmp_path, monkeypatch):
    monkeypatch.delenv("ENGINE_OUTPUTS", raising=False)
    monkeypatch.chdir(tmp_path)
    assert profiling.output_dir() == profiling.Path(profiling.__file__).resolve().parent / "outputs"
    monkeypatch.setenv("ENGINE_OUTPUTS", str(tmp_path / "elsewhere"))
    assert profiling.output_dir() == tmp_path / "elsewhere"
    assert profiling.output_dir(tmp_path / "given") == tmp_path / "given"


# -- the recorded window ------------------------------------------------------------------------
def test_window_stops_after_steps_decode_steps(tmp_path):
    """50 tokens, steps=3: the prefill and 3 decode steps are recorded, nothing after them."""
    profiled_tiny_run(tmp_path, "w", {"strategy": "full"}, tokens=50, steps=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.json", "w.txt", "w_summary.json"]
    trace = json.loads((tmp_path / "w.json").read_text())
    assert [e["name"] for e in profiler_steps(trace)] == [f"ProfilerStep#{i}" for i in range(1, 5)]
    assert count(trace, "aten::embedding") == 4  # one forward per recorded step, not 50
    s = sp.summarize(trace)
    assert s["meta"]["decode_steps"] == 3
    # The summary's figures are exactly the recorded window's host time.
    assert s["total_us"] == pytest.approx(sum(e["dur"] for e in profiler_steps(trace)), rel=1e-6)
    assert "prefill + 3 decode steps" in sp.format_summary(s)
    table = (tmp_path / "w.txt").read_text()  # the table is the window's too: 4 steps, 4 forwards
    for op in (r"ProfilerStep\*", "aten::embedding"):
        assert re.search(rf"^ +{op} .* 4 +$", table, re.M), op


def test_generation_shorter_than_the_window_still_writes_everything(tmp_path):
    """Stopped after 2 tokens (as at an EOS) with steps=5: the window ends with the block."""
    profiled_tiny_run(tmp_path, "short", {"strategy": "full"}, tokens=2, steps=5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["short.json", "short.txt", "short_summary.json"]
    trace = json.loads((tmp_path / "short.json").read_text())
    assert count(trace, "aten::embedding") == 2
    summary = json.loads((tmp_path / "short_summary.json").read_text())
    assert summary["meta"]["decode_steps"] == 1
    assert summary["total_us"] == pytest.approx(sum(e["dur"] for e in profiler_steps(trace)), rel=1e-6)
    assert "aten::mm" in (tmp_path / "short.txt").read_text()


def test_a_failed_generation_still_leaves_its_trace(tmp_path):
    with pytest.raises(RuntimeError, match="boom"), profile_run("f", 4, out_dir=tmp_path, quiet=True) as recorder:
        torch.ones(8, 8) @ torch.ones(8, 8)
        recorder.step()
        raise RuntimeError("boom")
    trace = json.loads((tmp_path / "f.json").read_text())
    assert "aten::mm" in op_names(trace) and trace[sp.METADATA_KEY]["decode_steps"] == 0
    assert not (tmp_path / "f.txt").exists()


def test_stdout_stays_the_texts(tmp_path, capfd):
    """Progress and results go to stderr (fd 2, where Kineto writes too), and Kineto's own lines are off."""
    with profile_run("p", 2, out_dir=tmp_path) as recorder:
        for _ in range(5):
            torch.ones(8, 8) @ torch.ones(8, 8)
            recorder.step()
    out, err = capfd.readouterr()
    assert out == ""
    assert re.search(r"^writing profile \(\d+ events\) to .*p\.\* \.\.\.$", err, re.M), err
    assert f"profile written to {tmp_path / 'p.json'}, {tmp_path / 'p.txt'}" in err and "Profile summary" in err
    assert "USDT" not in err and "profiler_st" not in err


def test_detail_adds_shapes_memory_and_flops(tmp_path):
    profiled_tiny_run(tmp_path, "plain", {"strategy": "full"})
    profiled_tiny_run(tmp_path, "detail", {"strategy": "full"}, detail=True)
    plain, detail = ((tmp_path / f"{n}.txt").read_text() for n in ("plain", "detail"))
    assert "by input shape" not in plain and "FLOPs" not in plain and "CPU Mem" not in plain
    assert "by input shape" in detail and "FLOPs" in detail and "CPU Mem" in detail
    trace = json.loads((tmp_path / "detail.json").read_text())
    assert any("Input Dims" in e.get("args", {}) for e in trace["traceEvents"])
    assert any(e.get("cat") == "python_function" for e in trace["traceEvents"])  # stacks


# -- the CLI, files, summary --------------------------------------------------------------------
@pytest.mark.slow
def test_generate_profile_writes_trace_table_and_summary(tmp_path, monkeypatch, capfd):
    """The real CLI on the default model: files land in $ENGINE_OUTPUTS, the trace holds the model's
    ops, the window closes after --profile_steps while the generation goes on."""
    monkeypatch.setenv("ENGINE_OUTPUTS", str(tmp_path))
    generate.main(["--max_new_tokens", "6", "--device", "cpu", "--temperature", "0", "--profile", "run",
                   "--profile_steps", "2", "--profile_detail"])
    trace = json.loads((tmp_path / "run.json").read_text())
    names = op_names(trace)
    assert {"aten::linear", "aten::mm"} <= names
    assert "aten::einsum" in names and count(trace, "kv_attend") > 0  # the caches' attention_reference, in its range
    assert len(profiler_steps(trace)) == 3 and count(trace, "aten::embedding") == 3
    table = (tmp_path / "run.txt").read_text()
    assert "aten::mm" in table and "FLOPs" in table and "CPU Mem" in table
    summary = json.loads((tmp_path / "run_summary.json").read_text())
    assert sum(summary["shares"].values()) == pytest.approx(1.0, abs=1e-9)
    assert summary["times_us"]["matmul"] > 0 and summary["times_us"]["attention"] > 0
    assert summary["meta"]["kv_bytes"] > 0 and summary["meta"]["param_bytes"] > 0
    assert summary["meta"]["settings"] == {"strategy": "full"} and summary["meta"]["decode_steps"] == 2
    out, err = capfd.readouterr()
    assert f"{tmp_path / 'run.json'}" in err and "Profile summary" in err and "writing profile (" in err
    assert out.startswith("Once upon a time,")  # stdout: the text only
    assert not any(line in out for line in ("writing profile", "profile written", "Profile summary", "USDT"))

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
    {"strategy": "quantize_kv", "sink_size": 4, "window_size": 8, "bits": 4, "key_group": 8, "value_group": 8},
])
def test_summary_shares_add_up_and_kv_share_is_reported(tmp_path, settings):
    model = profiled_tiny_run(tmp_path, "s", settings, tokens=20, steps=16)
    trace = json.loads((tmp_path / "s.json").read_text())
    assert "aten::einsum" in op_names(trace) and count(trace, "kv_attend") > 0  # the caches' attention_reference
    s = sp.summarize(trace)
    assert s["times_us"]["attention"] > 0
    assert sum(s["shares"].values()) == pytest.approx(1.0, abs=1e-9)
    assert sum(s["times_us"].values()) == pytest.approx(s["total_us"])
    # The window's host time is fully accounted for: the shares are of the recorded steps' length.
    assert len(profiler_steps(trace)) == 17
    assert s["total_us"] == pytest.approx(sum(e["dur"] for e in profiler_steps(trace)), rel=1e-6)
    assert s["meta"]["kv_bytes"] == sum(c.nbytes() for c in model.caches())
    paragraph = sp.format_summary(s)
    for label in ("attention", "matmuls", "KV quantize/dequantize", "other", "KV cache", "prefill + 16 decode steps"):
        assert label in paragraph
    # The printed summary and the saved one agree.
    assert json.loads((tmp_path / "s_summary.json").read_text())["shares"] == pytest.approx(s["shares"])


def test_summarize_script_compares_two_traces(tmp_path, capsys):
    profiled_tiny_run(tmp_path, "full", {"strategy": "full"})
    profiled_tiny_run(tmp_path, "quant", {"strategy": "quantize_kv", "sink_size": 4, "window_size": 8, "bits": 8})
    summarize_profile.main([str(tmp_path / "full.json"), str(tmp_path / "quant.json"), "--json", str(tmp_path / "cmp.json")])
    out = capsys.readouterr().out
    assert "strategy=quantize_kv" in out and "top ops of full" in out and "top ops of quant" in out
    assert set(json.loads((tmp_path / "cmp.json").read_text())) == {str(tmp_path / "full.json"), str(tmp_path / "quant.json")}


def test_summarize_script_reads_gzipped_traces_and_never_overwrites(tmp_path, capsys):
    """A gzipped trace reads like the plain one; a file that is neither is a one-line error; --json
    refuses a file that exists and leaves it as it was."""
    import gzip

    profiled_tiny_run(tmp_path, "full", {"strategy": "full"})
    plain = tmp_path / "full.json"
    packed = tmp_path / "full.json.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    summarize_profile.main([str(packed), "--json", str(tmp_path / "s.json")])
    summarize_profile.main([str(plain), "--json", str(tmp_path / "t.json")])
    s, t = (json.loads((tmp_path / n).read_text()) for n in ("s.json", "t.json"))
    assert s[str(packed)] == t[str(plain)]
    capsys.readouterr()
    (tmp_path / "junk.bin").write_bytes(bytes(range(256)))
    with pytest.raises(SystemExit, match="is not a JSON trace"):
        summarize_profile.main([str(tmp_path / "junk.bin")])
    with pytest.raises(SystemExit, match="is a folder"):
        summarize_profile.main([str(tmp_path)])
    with pytest.raises(SystemExit, match="exists"):
        summarize_profile.main([str(plain), "--json", str(tmp_path / "s.json")])
    assert json.loads((tmp_path / "s.json").read_text()) == s
    with pytest.raises(SystemExit, match="is not a folder"):
        summarize_profile.main([str(plain), "--json", str(tmp_path / "no_such_folder" / "u.json")])


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


def test_graph_replayed_engine_kernels_are_named_by_their_own_names():
    """Under --compile on CUDA the kernels replay from a CUDA graph with no launching op: the
    engine's products and decode attention are still matmul and attention, by their names."""
    trace = {"traceEvents": [
        _x("linear_kernel", 0, 50, cat="kernel"), _x("token_partial_kernel", 50, 20, cat="kernel"),
        _x("combine_kernel", 70, 5, cat="kernel"), _x("add_rms_norm_kernel", 75, 5, cat="kernel"),
        _x("_ring_append_kernel", 80, 4, cat="kernel"),
    ]}
    s = sp.summarize(trace)
    assert s["times_us"] == pytest.approx({"attention": 25, "matmul": 50, "kv_quant": 0, "other": 9})


def test_kernels_by_launch_shape():
    """One row per (name, grid, block), heaviest first: the same kernel on two matrices is two
    rows; a copy without a shape is one row of its own. A CPU trace has none."""
    trace = {"traceEvents": [
        _x("linear_kernel", 0, 30, cat="kernel", grid=[896, 1, 1], block=[128, 1, 1]),
        _x("linear_kernel", 40, 9, cat="kernel", grid=[768, 1, 1], block=[256, 1, 1]),
        _x("linear_kernel", 50, 31, cat="kernel", grid=[896, 1, 1], block=[128, 1, 1]),
        _x("Memcpy DtoD", 90, 2, cat="gpu_memcpy"),
        _x("aten::mm", 0, 100),  # host: not a launch
    ]}
    launches = sp.summarize(trace)["launches"]
    assert [(k["grid"], k["calls"], k["us"], k["us_per_call"]) for k in launches] == [
        ("[896, 1, 1]", 2, 61, 30.5), ("[768, 1, 1]", 1, 9, 9), ("", 1, 2, 2)]
    table = sp.format_launches(sp.summarize(trace))
    assert "    0.061     0.061      2    30.50  linear_kernel, [896, 1, 1], [128, 1, 1]" in table
    host_only = sp.summarize({"traceEvents": [_x("aten::mm", 0, 10)]})
    assert host_only["launches"] == [] and sp.format_launches(host_only) == ""


def test_advance_counts_overlapping_calls_once():
    """A kernel launched early (PDL) overlaps the one before: its duration includes the wait, its
    advance only what it ran past the other's end. The advances add up to the busy time, gaps not
    included; a kernel inside a longer one advances nothing."""
    trace = {"traceEvents": [
        _x("linear_kernel", 0, 10, cat="kernel", grid=[768, 1, 1], block=[256, 1, 1]),
        _x("token_partial_kernel", 6, 7, cat="kernel", grid=[8, 17, 1], block=[128, 1, 1]),  # early: 3 past
        _x("combine_kernel", 20, 2, cat="kernel", grid=[32, 4, 1], block=[32, 1, 1]),  # after a gap of 7
        _x("linear_kernel", 30, 20, cat="kernel", grid=[768, 1, 1], block=[256, 1, 1]),
        _x("Memcpy DtoD", 35, 4, cat="gpu_memcpy"),  # inside the product
    ]}
    s = sp.summarize(trace)
    advance = {k["name"]: (k["us"], k["advance_us"]) for k in s["launches"]}
    assert advance == {"linear_kernel": (30, 30), "token_partial_kernel": (7, 3), "combine_kernel": (2, 2),
                       "Memcpy DtoD": (4, 0)}
    assert sum(k["advance_us"] for k in s["launches"]) == pytest.approx(s["idle"]["busy_us"])


def test_gpu_idle_time_and_its_boundaries():
    """The GPU's idle time between the first device event and the last, each stretch charged to
    the event that ended last before it and the one after it. Events that overlap (a kernel
    launched early by PDL, a copy on another stream) count once; a kernel that starts inside a
    longer one leaves no gap behind it."""
    trace = {"traceEvents": [
        _x("norm", 0, 10, cat="kernel"), _x("linear_kernel", 8, 30, cat="kernel"),  # PDL: 8-10 overlap
        _x("Memcpy DtoD", 12, 4, cat="gpu_memcpy"),  # inside linear, another stream
        _x("token_partial_kernel", 41, 9, cat="kernel"),  # 3 us after linear_kernel
        _x("combine_kernel", 52, 2, cat="kernel"),  # 2 us after token_partial
        _x("norm", 60, 10, cat="kernel"), _x("short", 61, 1, cat="kernel"),  # 6 us after combine
        _x("linear_kernel", 73, 7, cat="kernel"),  # 3 us after the norm, not after `short`
        _x("cudaLaunchKernel", 90, 50, cat="cuda_runtime"),  # host events do not count
    ]}
    idle = sp.summarize(trace)["idle"]
    assert idle["window_us"] == 80 and idle["idle_us"] == 14 and idle["busy_us"] == 66
    assert idle["idle_share"] == pytest.approx(14 / 80)
    assert idle["gaps"] == [
        {"before": "combine_kernel", "after": "norm", "us": 6, "count": 1, "longest_us": 6},
        {"before": "linear_kernel", "after": "token_partial_kernel", "us": 3, "count": 1, "longest_us": 3},
        {"before": "norm", "after": "linear_kernel", "us": 3, "count": 1, "longest_us": 3},
        {"before": "token_partial_kernel", "after": "combine_kernel", "us": 2, "count": 1, "longest_us": 2},
    ]
    assert "GPU idle 0.01 ms of the 0.08 ms" in sp.format_summary(sp.summarize(trace))
    # The same boundary twice adds up, and the longest of its gaps is kept: a trace's first step
    # can wait long on the host's first graph launch, where the later ones do not.
    repeated = {"traceEvents": [_x("a", 0, 1, cat="kernel"), _x("b", 3, 1, cat="kernel"), _x("a", 4, 1, cat="kernel"),
                                _x("b", 9, 1, cat="kernel")]}
    summary = sp.summarize(repeated)
    assert summary["idle"]["gaps"] == [{"before": "a", "after": "b", "us": 6, "count": 2, "longest_us": 4}]
    assert "after a before b (0.01 ms, 2 gaps, the longest 0.00 ms)" in sp.format_summary(summary)
    # A trace with no device events (a CPU run) has no idle figures and says nothing of them.
    host_only = {"traceEvents": [_x("aten::mm", 0, 10)]}
    assert sp.summarize(host_only)["idle"] == {} and "GPU idle" not in sp.format_summary(sp.summarize(host_only))
    table = sp.format_comparison(["gpu", "cpu"], [sp.summarize(trace), sp.summarize(host_only)])
    assert "GPU idle (of window)" in table and "0.006 ms in     1 (longest 0.006)  combine_kernel -> norm" in table


def test_every_decode_attention_kernel_is_attention():
    """Each Triton kernel of decode_kernels*.py (the `*_kernel` functions) is named in
    DECODE_KERNELS, so that a renamed or new kernel cannot fall into "other" unseen."""
    import decode_kernels
    import decode_kernels_kivi

    names = {name for module in (decode_kernels, decode_kernels_kivi) for name in vars(module)
             if name.endswith("_kernel") and hasattr(getattr(module, name), "run")}
    assert names and names == sp.DECODE_KERNELS
    assert {name: sp.kernel_category(name) for name in names} == dict.fromkeys(names, "attention")


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
