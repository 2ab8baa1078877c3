"""scripts/benchmark.py on the CPU (eager, tiny model): the JSON it writes, its refusals. GPU
timings are the device's; here only that every figure is there and sane."""
import json
import subprocess
import sys


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
    assert [e["strategy"] for e in result["errors"]] == ["int4"] and "group_size" in result["errors"][0]["error"]
    assert out.with_suffix(".png").exists()


def test_never_overwrites(tmp_path):
    (tmp_path / "b.json").write_text("{}")
    r, out = bench(tmp_path)
    assert r.returncode != 0 and "exists" in r.stderr and out.read_text() == "{}"
