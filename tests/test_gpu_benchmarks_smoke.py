"""The GPU benchmarks (bench/loss_kernel.py, ghost_dot.py, meta_gradient.py, layer_kernels.py, end_to_end.py) run
end to end on CPU at tiny sizes (`--device cpu`, Triton under TRITON_INTERPRET=1), so that a script error does not
cost a GPU session. Their timings mean nothing here; the numbers checked are the ones that must hold anywhere
(losses agree, dots agree). The device command (bench/gpu_checks.sh, through bench/stages.sh) runs here too, to
check that what it leaves in OUT is what the device tool brings back."""

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
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


# The kernel benchmarks of bench/gpu_checks.sh at tiny sizes; run once per module, into one folder (as on the GPU)
KERNEL_BENCHES = {
    "loss_kernel.py": ("--tokens", "70", "--hidden", "24", "--vocab", "300", "--tasks", "3", "--ignore-frac", "0.2",
                       "--warmup", "0", "--repeats", "1"),
    "ghost_dot.py": ("--tokens", "64", "--tasks", "3", "--shapes", "40x24,24x56", "--repeats", "1"),
    "meta_gradient.py": ("--model", "tiny-llama", "--tokens", "128", "--tasks", "3", "--example-len", "32",
                         "--repeats", "1"),
}  # fmt: skip


@pytest.fixture(scope="module")
def kernel_bench(tmp_path_factory):
    """kernel_bench(script) -> its result JSON, the script run (once) into kernel_bench.out."""
    out, results = tmp_path_factory.mktemp("kernel_benches"), {}

    def run(script: str) -> dict:
        if script not in results:
            results[script] = run_bench(script, out, *KERNEL_BENCHES[script])
        return results[script]

    run.out = out
    return run


def test_loss_kernel_bench_smoke(kernel_bench):
    result = kernel_bench("loss_kernel.py")
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


def test_loss_kernel_tile_sweep_smoke(tmp_path):
    """loss_kernel.py --sweep: each GEMM kernel at its default and other tiles, every run's loss and gradients
    checked against the default tiles' run; a tile that cannot compile is recorded, the sweep goes on."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, str(BENCH / "loss_kernel.py"), "--device", "cpu", "--out", str(tmp_path), "--sweep",
           *KERNEL_BENCHES["loss_kernel.py"]]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((tmp_path / "cpu" / "loss_kernel_sweep.json").read_text())["rows"]
    assert (tmp_path / "cpu" / "loss_kernel_sweep.md").exists() and not (tmp_path / "cpu" / "loss_kernel.json").exists()
    assert [r["kernel"] for r in rows] == ["all"] + ["logits"] * 3 + ["dhidden"] * 2 + ["dweight"] * 2
    assert rows[1]["tiles"] == "BLOCK_T=16 BLOCK_V=32 BLOCK_H=16"  # each kernel's default first
    failed = [r for r in rows if r["status"] != "ok"]
    assert [r["tiles"] for r in failed] == ["BLOCK_T=16 BLOCK_V=32 BLOCK_H=12"] and "power of 2" in failed[0]["status"]
    assert all(r["ms"] > 0 and r["max_rel_diff"] < 1e-2 for r in rows if r["status"] == "ok")


def test_ghost_dot_bench_smoke(kernel_bench):
    result = kernel_bench("ghost_dot.py")
    assert [(r["out"], r["inp"]) for r in result["rows"]] == [(40, 24), (24, 56)]
    assert all(r["rel_err_vs_reference"] < 1e-2 and r["folded_rel_err_vs_reference"] < 1e-2 for r in result["rows"])
    assert all(r["separate_dots_overhead"] > 1 and r["folded_dots_overhead"] > 0 for r in result["rows"])
    for r in result["rows"]:  # the tile sweep: the default and two other tiles, each checked against the reference,
        *rates, failed = r["sweep"].values()  # and one that cannot run, recorded with its error
        assert list(r["sweep"]) == ["16x32x16", "32x16x16", "16x64x32", "16x16x12"], r["sweep"]
        assert all(isinstance(rate, float) and rate > 0 for rate in rates) and "power of 2" in failed, r["sweep"]


def test_layer_kernels_bench_smoke(tmp_path):
    """Every layer runs in each installed stack; ours agree with HF's (RoPE bit for bit, the others to bf16)."""
    result = run_bench("layer_kernels.py", tmp_path, "--tokens", "37", "--hidden", "40", "--intermediate", "72",
                       "--heads", "3", "--kv-heads", "1", "--head-dim", "12", "--repeats", "1")  # fmt: skip
    rows = {(r["layer"], r["stack"]): r for r in result["rows"]}
    assert {layer for layer, _ in rows} == {"rms_norm", "swiglu", "geglu", "rope"}
    for layer in ("rms_norm", "swiglu", "geglu", "rope"):
        for stack in ("hf", "ours"):
            r = rows[layer, stack]
            assert r["status"] == "ok" and r["forward_backward_ms"] > 0 and r["gb_per_s"] > 0, r
            assert r["fraction_of_copy"] == pytest.approx(r["gb_per_s"] / result["copy_gb_per_s"])  # measured copy
        assert rows[layer, "ours"]["max_rel_err_vs_hf"] < 1e-2 and rows[layer, "hf"]["max_rel_err_vs_hf"] == 0
    assert rows["rope", "ours"]["max_rel_err_vs_hf"] == 0


def test_meta_gradient_bench_smoke(kernel_bench):
    result = kernel_bench("meta_gradient.py")
    assert set(result["results"]) == {"train_step", "one_pass", "one_pass_folded", "exact"}
    assert result["folded_dots_rel_err"] < 5e-2
    fused = {"rms_norm": 5, "swiglu_mlp": 2, "geglu_mlp": 0, "rope_attention": 2}
    assert result["fused_layers"] == fused  # as the trainer runs the model
    assert result["dots_rel_err"] < 5e-2  # bf16 model: one-pass and K-backward dots agree to bf16 rounding


def test_kernel_targets_table(kernel_bench, tmp_path):
    """bench/kernel_targets.py puts the three benchmarks' numbers against the issue's bounds: the same ratios as the
    benchmarks' JSON, met exactly when within the bound, the gpu tests' counts from pytest's summary line; and
    marks what is missing as missing."""
    loss, ghost, meta = (kernel_bench(s) for s in KERNEL_BENCHES)
    out = kernel_bench.out
    (out / "cpu" / "gpu_tests.txt").write_text("...\n==== 2 failed, 11 passed, 1 skipped in 80.12s ====\n")
    script = [sys.executable, str(BENCH / "kernel_targets.py"), "--out"]
    proc = subprocess.run([*script, str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "cpu" / "kernel_targets.json").read_text())
    assert (out / "cpu" / "kernel_targets.md").exists()
    assert summary["gpu_tests"] == {"status": "failures", "failed": 2, "passed": 11, "skipped": 1}
    assert summary["triton_tests"] == {"status": "triton_tests_on_gpu.txt missing"}
    (out / "cpu" / "triton_tests_on_gpu.txt").write_text("==== 50 passed, 1 deselected in 40.00s ====\n")
    assert subprocess.run([*script, str(out)], capture_output=True, timeout=120).returncode == 0
    summary = json.loads((out / "cpu" / "kernel_targets.json").read_text())
    assert summary["triton_tests"] == {"status": "all passed", "passed": 50, "deselected": 1}
    assert (
        "Triton kernel tests on this GPU (`-m triton`): all passed (50 passed"
        in (out / "cpu" / "kernel_targets.md").read_text()
    )
    for last_line, status in [
        ("==== 21 skipped in 2.72s ====", {"status": "none ran", "skipped": 21}),
        ("== 20 passed, 1 skipped in 97.10s (0:01:37) ==", {"status": "all passed", "passed": 20, "skipped": 1}),
        ("tests/test_kernels.py::test_gpu_lce_full_size[None-dtype0] PASSED", None),  # cut short
    ]:
        (out / "cpu" / "gpu_tests.txt").write_text(f"... 3 passed (printed by a test)\n{last_line}\n")
        assert subprocess.run([*script, str(out)], capture_output=True, timeout=120).returncode == 0
        tests = json.loads((out / "cpu" / "kernel_targets.json").read_text())["gpu_tests"]
        assert tests == (status or {"status": "no pytest summary line (cut short?)"})
    rows = {t["target"]: t for t in summary["targets"]}
    for t in loss["targets"]:
        row = rows[f"{t['target']} (logit std 1)"]
        assert row["value"] == t["ratio"] and row["met"] == (None if t["ratio"] is None else t["ratio"] <= t["at_most"])
    for r in ghost["rows"]:
        row = rows[f"ghost dot / bf16 matmul rate, {r['out']}x{r['inp']}"]
        assert row["value"] == r["fraction_of_matmul"] and row["met"] == (r["fraction_of_matmul"] >= 0.6)
    speedup = rows["one-pass meta-gradient speedup vs K backward passes"]
    assert speedup["value"] == meta["speedup_one_pass_vs_exact"] and speedup["met"] == (speedup["value"] >= 10)
    faster = "folded" if meta["folded_overhead_vs_train_step"] < meta["one_pass_overhead_vs_train_step"] else "separate"
    assert summary["ghost_dots_faster"].startswith(faster)

    (tmp_path / "partial" / "H200").mkdir(parents=True)  # the ghost dots ran, the meta-gradient was cut short
    (tmp_path / "partial" / "H200" / "ghost_dot.json").write_text(json.dumps(ghost))
    cut = {**meta, "results": {k: meta["results"][k] for k in ("train_step", "one_pass")}}  # as its first writes
    cut.update({k: None for k in ("speedup_one_pass_vs_exact", "dots_rel_err", "folded_overhead_vs_train_step",
                                  "folded_dots_rel_err")})  # fmt: skip
    (tmp_path / "partial" / "H200" / "meta_gradient.json").write_text(json.dumps(cut))
    proc = subprocess.run([*script, str(tmp_path / "partial")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    partial = json.loads((tmp_path / "partial" / "H200" / "kernel_targets.json").read_text())
    assert partial["gpu_tests"] == {"status": "gpu_tests.txt missing"}
    assert [t["met"] is None for t in partial["targets"]] == [True] + [False] * len(ghost["rows"]) + [True]
    assert partial["ghost_dots_faster"].startswith("unknown")
    (tmp_path / "tests_only" / "H200").mkdir(parents=True)  # every benchmark failed: the tests' summary still counts
    (tmp_path / "tests_only" / "H200" / "gpu_tests.txt").write_text("=== 20 passed, 1 skipped in 97.10s ===\n")
    assert subprocess.run([*script, str(tmp_path / "tests_only")], capture_output=True, timeout=120).returncode == 0
    tests_only = json.loads((tmp_path / "tests_only" / "H200" / "kernel_targets.json").read_text())
    assert tests_only["gpu_tests"]["status"] == "all passed" and all(t["met"] is None for t in tests_only["targets"])
    assert subprocess.run([*script, str(tmp_path / "empty")], capture_output=True, timeout=120).returncode == 2


def test_end_to_end_bench_smoke(tmp_path):
    """TRL's SFTTrainer on DeepSpeed (padded, length-grouped, packed) and adapt_fast (uniform, ADAPT) train the same
    tokenised examples."""
    stacks = "trl,trl_grouped,trl_packed,uniform,adapt"
    result = run_bench("end_to_end.py", tmp_path, "--model", "tiny-llama", "--stacks", stacks, "--steps", "4",
                       "--warmup-steps", "1", "--tokens-per-step", "512", "--examples", "90", "--tasks", "3",
                       "--length-median", "60", "--max-len", "256", "--val-examples", "2")  # fmt: skip
    rows = result["results"]
    assert list(rows) == stacks.split(",")
    for name, r in rows.items():
        assert r["ok"], (name, r)
        assert r["steps_measured"] == 3 and r["tokens"] > 0 and r["tokens_per_second"] > 0
        assert r["loss_tokens"] < r["tokens"] and 0 <= r["padding_fraction"] < 1
    # the same examples: TRL got adapt_fast's tokenised training split, token for token
    pools = {(r["train_examples"], r["train_example_tokens"]) for r in rows.values()}
    assert len(pools) == 1
    for name in ("uniform", "adapt", "trl_packed"):  # packed: a step holds at most its slots, less padding than rows
        assert rows[name]["tokens_per_step"] <= 512
        assert rows[name]["padding_fraction"] < rows["trl"]["padding_fraction"]
    assert rows["trl_packed"]["padding_fraction"] == 0 and rows["trl_packed"]["attention"] == "sdpa"  # padding-free
    # padded micro-batches of at most 512 // 256 rows (no more slots than a packed one), accumulated
    assert rows["trl"]["deepspeed"] and rows["trl"]["batch_size"] == 2 and rows["trl"]["gradient_accumulation"] > 1
    assert rows["trl_grouped"]["padding_fraction"] < rows["trl"]["padding_fraction"]  # length-grouped batches
    assert rows["adapt"]["mixture_final_min"] < rows["adapt"]["mixture_final_max"]  # ADAPT moved the mixture


def device_returns(out: Path) -> list[str]:
    """The files under `out`, after checking the device tool's limits on what it brings back from $OUT: at most 8
    files, none deeper than two folders, each name of letters, digits, '.', '_' and '-'."""
    files = [p.relative_to(out) for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8, files
    for rel in files:
        assert len(rel.parts) <= 3 and all(re.fullmatch(r"[A-Za-z0-9._-]+", part) for part in rel.parts), rel
    return sorted(str(rel) for rel in files)


def archive_names(archive: Path) -> set[str]:
    with tarfile.open(archive) as tar:
        return {name.removeprefix("./") for name in tar.getnames()}


def script_env(**extra: str) -> dict:
    """The environment for the device scripts here: this interpreter's folder first on PATH (they call `python3`),
    no GPU even where there is one, and their deadline counted from now (on the device: from the command's start)."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    return {**os.environ, "PATH": path, "CUDA_VISIBLE_DEVICES": "", "RUN_STARTED_AT": str(int(time.time())), **extra}


def test_gpu_checks_script_without_gpu(tmp_path):
    """bench/gpu_checks.sh on a machine without a GPU: the `gpu` tests skip and the benchmarks refuse, so it fails,
    but every stage leaves its log and OUT holds one archive, laid out like bench/results/, that the device tool
    brings back whole."""
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(BENCH / "gpu_checks.sh"), str(out)], env=script_env(), cwd=BENCH.parent,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert device_returns(out) == ["gpu_checks.tar.gz", "kernel_targets.md"]  # the summary beside the archive
    names = archive_names(out / "gpu_checks.tar.gz")
    logs = {f"cpu/logs/{name}.log" for name in ("sm90_compile", "loss_kernel", "ghost_dot", "meta_gradient",
                                                "loss_kernel_std4", "loss_kernel_sweep", "kernel_targets")}  # fmt: skip
    assert {"cpu/gpu_tests.txt", "cpu/kernel_targets.json", *logs} <= names, names
    with tarfile.open(out / "gpu_checks.tar.gz") as tar:
        tests = tar.extractfile("./cpu/gpu_tests.txt").read().decode()
        refused = tar.extractfile("./cpu/logs/loss_kernel.log").read().decode()
        summary = json.load(tar.extractfile("./cpu/kernel_targets.json"))
    assert re.search(r"\d+ skipped, \d+ deselected", tests), tests[-2000:]  # the gpu tests were collected, not run
    assert summary["gpu_tests"]["status"] == "none ran" and all(t["met"] is None for t in summary["targets"])
    assert "needs a CUDA GPU" in refused


def test_gpu_end_to_end_script_without_gpu(tmp_path):
    """bench/gpu_end_to_end.sh the same way: both benchmarks refuse, their logs come back in one archive."""
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(BENCH / "gpu_end_to_end.sh"), str(out)], env=script_env(), cwd=BENCH.parent,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert device_returns(out) == ["gpu_end_to_end.tar.gz"]
    with tarfile.open(out / "gpu_end_to_end.tar.gz") as tar:
        for name in ("layer_kernels", "end_to_end"):
            assert "needs a CUDA GPU" in tar.extractfile(f"./cpu/logs/{name}.log").read().decode()


def test_stages_pack_after_every_stage_and_keep_the_deadline(tmp_path):
    """bench/stages.sh: the stages' files, however many, come back as one archive; a stage that would run past the
    deadline is stopped at it (and says so), one that starts after it is not run; the status is a failure."""
    script = tmp_path / "demo.sh"
    script.write_text(f"""set -uo pipefail
source {BENCH / "stages.sh"}
stages_begin "$1" demo 15 || exit 2
stage 60 logs/many.log python3 -c "
import pathlib, sys
for folder in (sys.argv[1] + '/many', sys.argv[2]):
    pathlib.Path(folder).mkdir(parents=True)
    for i in range(12):
        pathlib.Path(folder, f'result{{i}}.json').write_text(str(i))
print('wrote 24 files')" "$work/$gpu" "$work/logit_std4/$gpu"
stage 60 logs/slow.log sleep 60
stage 60 logs/late.log echo this ran
stages_end
""")
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(script), str(out)], env=script_env(), capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert device_returns(out) == ["demo.tar.gz"]  # no half-written archive left beside it
    names = archive_names(out / "demo.tar.gz")
    for folder in ("cpu/many", "logit_std4/cpu"):
        assert {f"{folder}/result{i}.json" for i in range(12)} <= names, names
    with tarfile.open(out / "demo.tar.gz") as tar:
        log = {name: tar.extractfile(f"./cpu/logs/{name}.log").read().decode() for name in ("many", "slow", "late")}
    assert log["many"] == "wrote 24 files\n"
    assert "stopped at its limit of" in log["slow"] and "sleep 60" in log["slow"]
    assert log["late"] == "stages: the deadline has passed; not run: echo this ran\n"  # and nothing else: not run
    assert "some stages failed" in proc.stdout


def kill_session(sid: int) -> None:
    """SIGKILL every process of session `sid` (timeout and the background packer have process groups of their own)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid pgrp session ...
        except OSError:
            continue
        if int(fields[3]) == sid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(stat.parent.name), signal.SIGKILL)


def test_stages_pack_while_a_stage_runs(tmp_path):
    """What a long stage (end_to_end.py: a result after each stack) has written reaches the archive while it runs,
    so a command killed at the device's limit mid-stage still brings it back."""
    script = tmp_path / "demo.sh"
    script.write_text(f"""set -uo pipefail
source {BENCH / "stages.sh"}
stages_begin "$1" demo 120 || exit 2
stage 120 logs/long.log bash -c 'echo 1 > "$0/first_stack.json"; echo first stack done; sleep 120' "$work/$gpu"
stages_end
""")
    out = tmp_path / "out"
    env = script_env(STAGES_PACK_EVERY_S="1")
    proc = subprocess.Popen(["bash", str(script), str(out)], env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        packed = set()
        for _ in range(120):  # up to a minute: the archive holds the first result while the stage still runs
            if (out / "demo.tar.gz").exists():
                packed = archive_names(out / "demo.tar.gz")
                if "cpu/first_stack.json" in packed:
                    break
            time.sleep(0.5)
        assert proc.poll() is None and "cpu/first_stack.json" in packed, packed
    finally:
        kill_session(proc.pid)  # as the device's limit would
        proc.wait()
    assert "cpu/first_stack.json" in archive_names(out / "demo.tar.gz")  # whole after the kill
    device_returns(out)
