"""The GPU benchmarks (bench/loss_kernel.py, ghost_dot.py, meta_gradient.py) run end to end on CPU at tiny sizes
(`--device cpu`, Triton under TRITON_INTERPRET=1), so that a script error does not cost a GPU session. Their
timings mean nothing here; the numbers checked are the ones that must hold anywhere (losses agree, dots agree)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def run_bench(script: str, out: Path, *args: str) -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, str(BENCH / script), "--device", "cpu", "--out", str(out), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "cpu" / script.replace(".py", ".json")).read_text())
    assert (out / "cpu" / script.replace(".py", ".md")).exists()
    return result


def test_loss_kernel_bench_smoke(tmp_path):
    result = run_bench("loss_kernel.py", tmp_path, "--tokens", "70", "--hidden", "24", "--vocab", "300",
                       "--tasks", "3", "--ignore-frac", "0.2", "--warmup", "0", "--repeats", "1")  # fmt: skip
    rows = {r["method"]: r for r in result["rows"]}
    expected = rows["torch_fp32_logits"]["loss"]
    for name in ("ours", "ours_ghost", "ours_chunk2048"):
        assert rows[name]["status"] == "ok" and rows[name]["ms"] > 0
        assert rows[name]["loss"] == pytest.approx(expected, rel=1e-2)
    targets = {t["target"]: t for t in result["targets"]}
    ghost = targets["ours_ghost time / ours time"]
    assert ghost["ratio"] == pytest.approx(rows["ours_ghost"]["ms"] / rows["ours"]["ms"])
    assert ghost["met"] == (ghost["ratio"] <= 1.45)
    for name in ("ours", "ours_ghost"):  # where the time goes: op names with their times
        ops = result["kernels"][name]
        assert "error" not in ops and len(ops) > 3 and all(v["ms"] >= 0 and v["launches"] > 0 for v in ops.values())


def test_ghost_dot_bench_smoke(tmp_path):
    result = run_bench("ghost_dot.py", tmp_path, "--tokens", "64", "--tasks", "3", "--shapes", "40x24,24x56",
                       "--repeats", "1")  # fmt: skip
    assert [(r["out"], r["inp"]) for r in result["rows"]] == [(40, 24), (24, 56)]
    assert all(r["rel_err_vs_reference"] < 1e-2 for r in result["rows"])


def test_meta_gradient_bench_smoke(tmp_path):
    result = run_bench("meta_gradient.py", tmp_path, "--model", "tiny-llama", "--tokens", "128", "--tasks", "3",
                       "--example-len", "32", "--repeats", "1")  # fmt: skip
    assert set(result["results"]) == {"train_step", "one_pass", "exact"}
    assert result["dots_rel_err"] < 5e-2  # bf16 model: one-pass and K-backward dots agree to bf16 rounding
