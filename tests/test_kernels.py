"""Kernel tests.

1. The references against naive formulas in float64 (full (T, V) logits, F.cross_entropy per task, autograd for
   gradients and for the ghost dots: <G, d loss_k / d W> with the loss masked to task k).
2. The Triton kernels against the references on fresh random inputs of odd sizes: on CUDA when present, else on
   CPU under the Triton interpreter. The interpreter must be on when triton is first imported (Triton decorates
   its own library then): this module switches it on if triton is not imported yet; otherwise (another test
   module imported it first) the Triton tests run again in a subprocess started with TRITON_INTERPRET=1.
3. GPU tests at full size (marked `gpu`, skipped without CUDA).

Every test draws a fresh seed and prints it (shown by pytest on failure). Errors are norm-wise relative errors
||a - b|| / ||b||; tolerances: fp32 1e-5 on losses, 1e-4 on gradients and dots; bf16/fp16 1e-2. Low-precision
results are compared with the reference evaluated in fp32 on the same (exactly representable) values, so that
each result's final rounding counts once, not twice.
"""

import contextlib
import functools
import importlib.util
import json
import math
import os
import random
import subprocess
import sys
import types
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

if not torch.cuda.is_available() and "triton" not in sys.modules:  # import triton in interpreter mode
    _saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    importlib.import_module("triton")
    if _saved is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = _saved

from adapt_fast.kernels import (
    PerTaskLoss,
    geglu,
    geglu_reference,
    per_task_ghost_dot,
    per_task_ghost_dot_reference,
    per_task_linear_cross_entropy,
    per_task_linear_cross_entropy_reference,
    per_task_weight_grad,
    per_task_weight_grad_reference,
    resolve_backend,
    rms_norm,
    rms_norm_reference,
    rope,
    rope_reference,
    swiglu,
    swiglu_reference,
)
from adapt_fast.kernels.backend import interpreter_ready

CPU = torch.device("cpu")
LOSS_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
GRAD_TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}


@pytest.fixture
def seed() -> int:
    s = random.randrange(2**31)
    torch.manual_seed(s)
    print(f"seed={s}")
    return s


@pytest.fixture
def triton_device(monkeypatch) -> torch.device:
    """Where Triton kernels run: CUDA when present, else CPU under the Triton interpreter."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if not interpreter_ready():
        pytest.skip("triton was imported before TRITON_INTERPRET=1: run by test_triton_kernels_in_subprocess")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    return CPU


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item() if b.norm() > 0 else a.norm().item()


@contextlib.contextmanager
def tf32_matmuls(enabled: bool):
    """CUDA fp32 matmuls with TF32 on or off inside the block (whatever the session set), restored after."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def make_batch(T: int, H: int, V: int, K: int, dtype: torch.dtype, device: torch.device = CPU) -> dict:
    """Random inputs with every edge case: ~25% ignored labels, padding rows (task id -1) at the end, task K-2
    present but with all labels ignored, task K-1 empty. Logits are O(1-10)."""
    hidden = torch.randn(T, H, device=device)
    weight = torch.randn(V, H, device=device) * (3.0 / math.sqrt(H))
    labels = torch.randint(0, V, (T,), device=device)
    labels[torch.rand(T, device=device) < 0.25] = -100
    task_ids = torch.randint(0, K - 1, (T,), device=device)  # never K-1: an empty task
    labels[task_ids == K - 2] = -100  # task K-2: all labels ignored
    task_ids[T - T // 8 :] = -1  # padding
    return dict(
        hidden=hidden.to(dtype),
        weight=weight.to(dtype),
        labels=labels,
        task_ids=task_ids,
        num_tasks=K,
        task_weights=torch.rand(K, device=device) + 0.5,
        ghost_weight=torch.randn(V, H, device=device).to(dtype),
    )


def upcast(batch: dict) -> dict:
    """The same values in fp32 (exact): the reference run on them gives the unrounded answer."""
    return {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in batch.items()}


def naive_lce(hidden, weight, labels, task_ids, num_tasks, task_weights, ghost_weight, softcap, ignore_index=-100):
    """Full-logit float64 per-task cross-entropy; returns loss_sum, count, ghost_dot, d hidden, d weight."""
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    z = h @ w.T
    s = softcap * torch.tanh(z / softcap) if softcap else z
    sums = []
    for k in range(num_tasks):
        rows = (task_ids == k) & (labels != ignore_index)
        sums.append(F.cross_entropy(s[rows], labels[rows], reduction="sum") if rows.any() else s.sum() * 0)
    loss_sum = torch.stack(sums)
    count = torch.stack([((task_ids == k) & (labels != ignore_index)).sum() for k in range(num_tasks)])
    weighted = task_weights.double() * loss_sum
    ghost = None
    if ghost_weight is not None:  # <G, d (c_k loss_sum_k) / dW> per task, by autograd on the masked loss
        grads = [torch.autograd.grad(weighted[k], w, retain_graph=True)[0] for k in range(num_tasks)]
        ghost = torch.stack([(g * ghost_weight.double()).sum() for g in grads])
    d_h, d_w = torch.autograd.grad(weighted.sum(), (h, w))
    return loss_sum, count, ghost, d_h, d_w


def run_lce(fn, batch: dict, softcap, *, ghost=True, **kwargs):
    """Call fn with fresh leaf copies of hidden/weight; returns (result, d hidden, d weight)."""
    h = batch["hidden"].detach().clone().requires_grad_()
    w = batch["weight"].detach().clone().requires_grad_()
    args = {**batch, "hidden": h, "weight": w, "ghost_weight": batch["ghost_weight"] if ghost else None}
    r = fn(**args, softcap=softcap, **kwargs)
    r.loss.backward()
    return r, h.grad, w.grad


# ----------------------------------------------------------------------------------------------------------
# Backend selection
# ----------------------------------------------------------------------------------------------------------


def test_resolve_backend(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert resolve_backend("auto", CPU) == "torch"
    assert resolve_backend("torch", torch.device("cuda")) == "torch"
    assert resolve_backend("auto", torch.device("cuda")) == "triton"
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        resolve_backend("triton", CPU)
    with pytest.raises(ValueError, match="unknown kernel backend"):
        resolve_backend("cuda", CPU)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("auto", CPU) == "torch"
    if interpreter_ready():
        assert resolve_backend("triton", "cpu") == "triton"
    else:
        with pytest.raises(ValueError, match="before triton is imported"):
            resolve_backend("triton", "cpu")


def test_triton_kernels_in_subprocess():
    """Without CUDA, when triton was imported before the interpreter could be switched on, run this file's
    Triton tests (marked `triton` by conftest.py) in a fresh interpreter with TRITON_INTERPRET=1."""
    if torch.cuda.is_available() or interpreter_ready():
        pytest.skip("the Triton tests run in this process")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-m", "triton and not gpu"]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]


# A small ADAPT run of the trainer (3 steps, mixture updates on 2), run in a subprocess: `runs` is a tuple of
# (output folder name, extra arguments) in the script that follows this part.
TRAINER_RUNS = """
import sys
from adapt_fast.train import main
out = sys.argv[1]
args = ["--budget.tokens", "3072", "--tokens_per_micro_batch", "1024", "--data.max_len", "256",
        "--data.synthetic_examples", "30", "--training.warmup_steps", "1", "--meta.warmup", "1",
        "--meta.val_every", "2", "--meta.val_examples_per_task", "2", "--data.cache_dir", out + "/cache"]
open(out + "/zero3.json", "w").write('{"zero_optimization": {"stage3_param_persistence_threshold": 0}}')
zero3 = ["--training.zero_stage", "3", "--training.deepspeed_config", out + "/zero3.json"]  # every weight partitioned
folded = ["--kernels.fold_ghost_dots", "true"]
"""
RUN_ALL = """
for name, extra in runs:
    main([*args, "--output_dir", f"{out}/{name}", *extra])
"""
TRAINER_TWICE = (
    TRAINER_RUNS
    + """
from adapt_fast.kernels import ghost_dot, linear_cross_entropy as lce
# Large tiles, so that the interpreter runs few programs (the kernel tests above cover the masks with small ones).
ghost_dot._INTERPRETER_CONFIG = dict(BLOCK_T=128, BLOCK_OUT=256, BLOCK_IN=64, GROUP_T=8)
lce._INTERPRETER_CONFIG = {
    k: {n: v for n, v in c.items() if n.startswith("BLOCK")} for k, c in lce._CUDA_CONFIG.items()
}
runs = (("torch", ["--kernels.backend", "torch"]), ("triton", ["--kernels.backend", "triton"]),
        ("triton_zero3", ["--kernels.backend", "triton", *zero3, *folded]))
"""
    + RUN_ALL
)
TINY_LLAMA_FUSED = {"rms_norm": 5, "swiglu_mlp": 2, "geglu_mlp": 0, "rope_attention": 2}  # 2 decoder layers


def metrics_rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_trainer_with_triton_backend_matches_torch(tmp_path):
    """An ADAPT run of the trainer with kernels.backend triton (interpreted on CPU; the loss, ghost-dot and fused
    layer kernels), at ZeRO-0, and at ZeRO-3 with every weight partitioned and the linear layers' dots folded into
    their weight gradients, against backend torch at ZeRO-0: the same losses, one-pass meta dots, validation losses
    and mixtures, to fp32 tolerance."""
    if torch.cuda.is_available():
        pytest.skip("CPU interpreter check (on CUDA, tests/test_ghost.py and the gpu tests cover Triton)")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", TRAINER_TWICE, str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = {name: metrics_rows(tmp_path / name) for name in ("torch", "triton", "triton_zero3")}
    torch_rows = runs["torch"]
    for triton_rows in (runs["triton"], runs["triton_zero3"]):
        rows_match(torch_rows, triton_rows)
    kernels = {n: json.loads((tmp_path / n / "report.json").read_text())["kernels"] for n in runs}
    assert kernels["torch"] == {"backend": "torch", "fused_layers": {}}
    for name in ("triton", "triton_zero3"):
        assert kernels[name] == {"backend": "triton", "fused_layers": TINY_LLAMA_FUSED}


def rows_match(torch_rows: list[dict], triton_rows: list[dict], dots_tol: float = 1e-4) -> int:
    """Two runs' metrics rows agree (losses, meta dots to dots_tol relative to the first run's largest, validation
    losses, mixtures); returns how many rows had meta dots of at least one measured task to compare."""
    assert len(torch_rows) == len(triton_rows) >= 3  # the last step may hold only what was left of the budget
    assert sum("meta_dots" in r for r in triton_rows) >= 2 and sum("val_loss" in r for r in triton_rows) >= 1
    measured = 0
    for a, b in zip(torch_rows, triton_rows, strict=True):
        assert a["tokens_consumed"] == b["tokens_consumed"]
        assert (a["loss"] is None) == (b["loss"] is None)  # null: a step without loss tokens
        assert a["loss"] is None or abs(a["loss"] - b["loss"]) <= 1e-5 * abs(a["loss"])
        for key, tol in (("meta_dots", dots_tol), ("val_loss", 1e-5)):
            if key in a:  # (a task with no loss token on a step has d_k null, in both runs)
                x = np.array(list(a[key].values()), dtype=float)  # null (not measured) -> nan
                y = np.array([b[key][k] for k in a[key]], dtype=float)
                assert np.array_equal(np.isnan(x), np.isnan(y)), (key, a[key], b[key])
                x, y = x[~np.isnan(x)], y[~np.isnan(y)]
                assert x.size == 0 or np.abs(x - y).max() <= tol * np.abs(x).max(), (key, a[key], b[key])
                if key == "meta_dots" and x.size > 0:
                    measured += 1
        assert max(abs(a["mixture"][k] - b["mixture"][k]) for k in a["mixture"]) <= 1e-6
    return measured


def test_kernels_compile_for_hopper_without_spills(tmp_path):
    """Every kernel, at the tiles it launches with on CUDA, compiles for sm_90 (no GPU needed) without spilling
    registers, and its matrix products use Hopper's warpgroup MMA. Triton compiles, not interprets: a subprocess
    without TRITON_INTERPRET."""
    tools = os.path.join(os.path.dirname(importlib.util.find_spec("triton").origin), "backends/nvidia/bin")
    if not os.path.exists(os.path.join(tools, "cuobjdump")):
        pytest.skip("this triton wheel ships no ptxas/cuobjdump")
    script = os.path.join(os.path.dirname(__file__), "..", "bench", "sm90_compile.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, script, "--out", str(tmp_path / "sm90")], env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((tmp_path / "sm90.json").read_text())["kernels"]
    assert len(rows) >= 9
    for row in rows:
        assert row["stack_bytes"] == 0 and row["spill_stores"] + row["spill_loads"] == 0, row
        assert row["registers"] <= 255, row
        no_matmul = ("dlogits", "rows", "rms_norm", "swiglu", "geglu", "rope")  # and fp32: FMA by design
        if not row["kernel"].startswith((*no_matmul, "fp32")):
            assert row["hmma"] == 0 and row["hgmma"] > 0, row


# ----------------------------------------------------------------------------------------------------------
# References against naive float64 formulas
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_reference_lce_matches_naive(dtype, softcap, seed):
    T, H, V, K = random.randint(40, 120), random.randint(8, 40), random.randint(30, 200), 5
    batch = make_batch(T, H, V, K, dtype)
    r, d_h, d_w = run_lce(per_task_linear_cross_entropy_reference, batch, softcap, chunk_size=random.randint(5, 40))
    loss_sum, count, ghost, n_dh, n_dw = naive_lce(**batch, softcap=softcap)
    assert isinstance(r, PerTaskLoss)
    assert r.loss_sum.dtype == torch.float32 and r.count.dtype == torch.int64 and r.ghost_dot.dtype == torch.float32
    assert d_h.dtype == dtype and d_w.dtype == dtype
    assert torch.equal(r.count, count)
    assert r.count[K - 1] == 0 and r.count[K - 2] == 0 and r.loss_sum[K - 2] == 0 and r.ghost_dot[K - 1] == 0
    lt, gt = (1e-5, 1e-4) if dtype == torch.float32 else (1e-5, 1e-2)  # bf16: exact inputs, rounded gradients
    assert rel_err(r.loss_sum, loss_sum) < lt
    assert rel_err(r.loss, (batch["task_weights"].double() * loss_sum).sum()) < lt
    assert rel_err(r.ghost_dot, ghost) < 1e-4
    assert rel_err(d_h, n_dh) < gt
    assert rel_err(d_w, n_dw) < gt


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_reference_lce_float64_is_float64_exact(softcap, seed):
    """Float64 inputs are computed in float64 (exactness tests of the meta-gradient rely on it)."""
    batch = make_batch(random.randint(20, 90), random.randint(8, 40), random.randint(30, 200), 4, torch.float64)
    r, d_h, d_w = run_lce(per_task_linear_cross_entropy_reference, batch, softcap, chunk_size=random.randint(5, 40))
    loss_sum, _, ghost, n_dh, n_dw = naive_lce(**batch, softcap=softcap)
    assert r.loss_sum.dtype == r.ghost_dot.dtype == d_h.dtype == d_w.dtype == torch.float64
    for ours, naive in ((r.loss_sum, loss_sum), (r.ghost_dot, ghost), (d_h, n_dh), (d_w, n_dw)):
        assert rel_err(ours, naive) < 1e-12
    with pytest.raises(ValueError, match="float64"):
        per_task_linear_cross_entropy(**batch, backend="triton")


BAD_LCE_INPUTS = {
    "hidden not 2-D": (dict(hidden=torch.zeros(2, 5, 8)), "hidden \\(T, H\\) and weight \\(V, H\\)"),
    "weight width": (dict(weight=torch.zeros(30, 7)), "hidden \\(T, H\\) and weight \\(V, H\\)"),
    "labels length": (dict(labels=torch.zeros(9, dtype=torch.long)), "labels and task_ids must have shape"),
    "label out of range": (dict(labels=torch.full((10,), 30)), "labels must be ignore_index"),
    "dtype mix": (dict(weight=torch.zeros(30, 8, dtype=torch.float64)), "same dtype"),
    "ghost shape": (dict(ghost_weight=torch.zeros(29, 8)), "ghost_weight must have the head's shape"),
    "softcap": (dict(softcap=0.0), "softcap must be positive"),
    "task weights": (dict(task_weights=torch.ones(4)), "task_weights must have shape"),
    "chunk size": (dict(chunk_size=0), "chunk_size must be a positive"),
}


@pytest.mark.parametrize("case", list(BAD_LCE_INPUTS))
def test_lce_bad_input_is_a_clear_error(case):
    args = dict(hidden=torch.zeros(10, 8), weight=torch.zeros(30, 8), labels=torch.zeros(10, dtype=torch.long),
                task_ids=torch.zeros(10, dtype=torch.long), num_tasks=3)  # fmt: skip
    change, message = BAD_LCE_INPUTS[case]
    with pytest.raises(ValueError, match=message):
        per_task_linear_cross_entropy(**{**args, **change}, backend="torch")


def test_ghost_dot_bad_input_is_a_clear_error():
    x, delta, G, ids = torch.zeros(6, 4), torch.zeros(6, 5), torch.zeros(5, 4), torch.zeros(6, dtype=torch.long)
    with pytest.raises(ValueError, match="do not match"):
        per_task_ghost_dot(x, delta, G.T, ids, 2)
    with pytest.raises(ValueError, match="num_tasks is required"):
        per_task_ghost_dot(x, delta, G, ids)
    with pytest.raises(ValueError, match="chunk_size must be a positive"):
        per_task_ghost_dot(x, delta, G, ids, 2, chunk_size=-1)


def test_reference_lce_no_grad_and_no_tokens(seed):
    batch = make_batch(50, 16, 40, 4, torch.float32)
    with torch.no_grad():
        r = per_task_linear_cross_entropy_reference(**batch)
    assert not r.loss.requires_grad
    assert rel_err(r.loss_sum, naive_lce(**batch, softcap=None)[0]) < 1e-5
    # No loss token at all: zero loss and zero gradients, still differentiable.
    batch["labels"][:] = -100
    r, d_h, d_w = run_lce(per_task_linear_cross_entropy_reference, batch, None)
    assert r.loss.item() == 0 and not r.count.any() and not r.ghost_dot.any()
    assert not d_h.any() and not d_w.any()


def test_reference_ghost_dot_matches_naive(seed):
    T, n_in, n_out, K = random.randint(1, 150), random.randint(3, 50), random.randint(3, 50), 4
    x, delta, G = torch.randn(T, n_in), torch.randn(T, n_out), torch.randn(n_out, n_in)
    task_ids = torch.randint(-1, K - 1, (T,))  # task K-1 empty, -1 ignored
    out = per_task_ghost_dot_reference(x, delta, G, task_ids, K, chunk_size=random.randint(1, 20))
    W = torch.zeros(n_out, n_in, dtype=torch.float64, requires_grad=True)
    y = x.double() @ W.T
    naive = []
    for k in range(K):  # <G, dW of task k's part of the loss>, the loss being sum_t delta_t . y_t
        (g,) = torch.autograd.grad((delta.double() * y)[task_ids == k].sum(), W, retain_graph=True)
        naive.append((g * G.double()).sum())
    assert out.dtype == torch.float32 and out.shape == (K,) and out[K - 1] == 0
    assert rel_err(out, torch.stack(naive)) < 1e-4


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_ghost_dot_offsets_match_ids(backend, seed, request):
    device = request.getfixturevalue("triton_device") if backend == "triton" else CPU
    T, n_in, n_out, K = random.randint(20, 150), random.randint(3, 40), random.randint(3, 40), 5
    x, delta, G = torch.randn(T, n_in), torch.randn(T, n_out), torch.randn(n_out, n_in)
    # Contiguous tasks, task 2 empty, rows before off[0] and from off[K] on belong to no task.
    cuts = sorted(random.sample(range(2, T - 1), 3))
    offsets = torch.tensor([1, cuts[0], cuts[1], cuts[1], cuts[2], T - 1])
    ids = torch.full((T,), -1)
    for k in range(K):
        ids[offsets[k] : offsets[k + 1]] = k
    x, delta, G, offsets, ids = (t.to(device) for t in (x, delta, G, offsets, ids))
    by_offsets = per_task_ghost_dot(x, delta, G, task_offsets=offsets, backend=backend)
    by_ids = per_task_ghost_dot(x, delta, G, task_ids=ids, num_tasks=K, backend=backend)
    assert by_offsets[2] == 0
    assert torch.allclose(by_offsets, by_ids, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_tied_head(backend, seed, request):
    """Head weight shared with the input embedding: both uses contribute to its gradient."""
    device = request.getfixturevalue("triton_device") if backend == "triton" else CPU
    T, V, H, K = random.randint(20, 80), random.randint(30, 100), random.randint(8, 32), 3
    E0, A0 = torch.randn(V, H, device=device) * 0.5, torch.randn(H, H, device=device) / math.sqrt(H)
    tokens, labels = torch.randint(0, V, (T,), device=device), torch.randint(0, V, (T,), device=device)
    labels[::4] = -100
    task_ids = torch.randint(0, K, (T,), device=device)
    task_weights = torch.rand(K, device=device)

    def grads(loss_fn):
        E, A = E0.clone().requires_grad_(), A0.clone().requires_grad_()
        hidden = torch.tanh(E[tokens] @ A)
        loss_fn(hidden, E).backward()
        return E.grad, A.grad

    def ours(hidden, E):
        return per_task_linear_cross_entropy(hidden, E, labels, task_ids, K, task_weights, backend=backend).loss

    def naive(hidden, E):
        ce = F.cross_entropy(hidden @ E.T, labels, reduction="none", ignore_index=-100)
        return (task_weights[task_ids] * ce).sum()

    (dE, dA), (n_dE, n_dA) = grads(ours), grads(naive)
    assert rel_err(dE, n_dE) < 1e-4 and rel_err(dA, n_dA) < 1e-4


# ----------------------------------------------------------------------------------------------------------
# Triton kernels against the references (CPU interpreter or CUDA)
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("softcap", [None, 7.5])
@pytest.mark.parametrize("ghost", [False, True])
def test_triton_lce_matches_reference(dtype, softcap, ghost, seed, triton_device):
    T, H, V, K = random.randint(1, 160), random.randint(17, 48), random.randint(33, 300), random.randint(4, 6)
    batch = make_batch(T, H, V, K, dtype, triton_device)
    chunk = random.choice([None, random.randint(7, 60)])
    kwargs = dict(ghost=ghost, chunk_size=chunk)
    r, d_h, d_w = run_lce(per_task_linear_cross_entropy, batch, softcap, backend="triton", **kwargs)
    e, e_dh, e_dw = run_lce(per_task_linear_cross_entropy_reference, upcast(batch), softcap, **kwargs)
    assert torch.equal(r.count, e.count)
    assert d_h.dtype == dtype and d_w.dtype == dtype
    assert rel_err(r.loss_sum, e.loss_sum) < LOSS_TOL[dtype]
    assert rel_err(r.loss, e.loss) < LOSS_TOL[dtype]
    assert rel_err(d_h, e_dh) < GRAD_TOL[dtype]
    assert rel_err(d_w, e_dw) < GRAD_TOL[dtype]
    if ghost:
        assert rel_err(r.ghost_dot, e.ghost_dot) < GRAD_TOL[dtype]
    else:
        assert r.ghost_dot is None


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_lce_backward_scales_accumulates_and_runs_once(backend, seed, request):
    """The gradients computed in the forward pass are scaled by grad_output, add to existing .grad, and are
    handed over once: a second backward through the same loss is a clear error, not silently wrong gradients."""
    device = request.getfixturevalue("triton_device") if backend == "triton" else CPU
    batch = make_batch(random.randint(10, 60), 20, 50, 4, torch.float32, device)
    _, d_h, d_w = run_lce(per_task_linear_cross_entropy, batch, None, backend=backend)
    h = batch["hidden"].clone().requires_grad_()
    w = batch["weight"].clone().requires_grad_()
    h.grad, w.grad = torch.ones_like(h), torch.ones_like(w)
    loss = per_task_linear_cross_entropy(**{**batch, "hidden": h, "weight": w}, backend=backend).loss
    (2.5 * loss).backward(retain_graph=True)
    assert rel_err(h.grad, 1 + 2.5 * d_h) < 1e-5 and rel_err(w.grad, 1 + 2.5 * d_w) < 1e-5
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


@pytest.mark.parametrize("multiprocessors", [1, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_lce_d_hidden_split_over_vocabulary(multiprocessors, dtype, seed, triton_device, monkeypatch):
    """Chunks of few rows on a GPU of many multiprocessors: d hidden is split over the vocabulary too (atomic fp32
    sums); with one multiprocessor it is not. Both match the reference."""
    import adapt_fast.kernels.linear_cross_entropy as lce

    monkeypatch.setattr(lce, "_multiprocessors", lambda device: multiprocessors)
    batch = make_batch(
        random.randint(40, 90), random.randint(17, 40), random.randint(200, 300), 4, dtype, triton_device
    )
    r, d_h, d_w = run_lce(per_task_linear_cross_entropy, batch, None, backend="triton", chunk_size=16)
    e, e_dh, e_dw = run_lce(per_task_linear_cross_entropy_reference, upcast(batch), None)
    assert rel_err(r.loss_sum, e.loss_sum) < LOSS_TOL[dtype]
    assert rel_err(d_h, e_dh) < GRAD_TOL[dtype] and rel_err(d_w, e_dw) < GRAD_TOL[dtype]


def test_d_hidden_splits(monkeypatch):
    """Few tiles on many multiprocessors: split (2 programs per SM, 2+ column blocks per split); never under
    torch.use_deterministic_algorithms, since split sums are atomic."""
    import adapt_fast.kernels.linear_cross_entropy as lce

    monkeypatch.setattr(lce, "_multiprocessors", lambda device: 132)
    assert lce._dhidden_splits(64, 2004, CPU) == 4  # 512 rows x 2048 columns in 128x128 tiles: 256 programs
    assert lce._dhidden_splits(256, 2004, CPU) == 1
    assert lce._dhidden_splits(4, 6, CPU) == 3
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    assert lce._dhidden_splits(64, 2004, CPU) == 1


def test_triton_lce_strided_head(seed, triton_device):
    """A head stored transposed (a (V, H) view of an (H, V) tensor): same loss and gradients as a row-major one."""
    batch = make_batch(random.randint(20, 60), 24, 70, 4, torch.float32, triton_device)
    wt = batch["weight"].t().contiguous().requires_grad_()  # (H, V) storage
    h = batch["hidden"].clone().requires_grad_()
    r = per_task_linear_cross_entropy(**{**batch, "hidden": h, "weight": wt.t()}, backend="triton")
    r.loss.backward()
    e, e_dh, e_dw = run_lce(per_task_linear_cross_entropy_reference, batch, None)
    assert rel_err(r.loss_sum, e.loss_sum) < 1e-5 and rel_err(r.ghost_dot, e.ghost_dot) < 1e-4
    assert rel_err(h.grad, e_dh) < 1e-4 and rel_err(wt.grad.t(), e_dw) < 1e-4


class AllocationLog(TorchDispatchMode):
    """Bytes of every new tensor storage that a torch op creates while active (views of live storages are not
    new); storages of the tensors passed in `known` count as existing."""

    def __init__(self, known: list[torch.Tensor]):
        super().__init__()
        self.known = {t.untyped_storage().data_ptr() for t in known}
        self.sizes: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.known:
                storage = t.untyped_storage()
                self.known.add(storage.data_ptr())
                self.sizes.append(storage.nbytes())
                weakref.finalize(storage, self.known.discard, storage.data_ptr())  # its address may be reused
        return out


def test_triton_lce_memory_layout(seed, triton_device, monkeypatch):
    """What the loss layer allocates for a bf16 head, by storage: d hidden (T, H) and d weight (V, H) in bf16,
    and per chunk one (chunk, V) bf16 buffer and an fp32 scratch of max(tile partials, chunk x H); nothing else
    beyond (T,)-sized vectors. An fp32 logits buffer, an fp32 d weight or a copy of either would show here."""
    import adapt_fast.kernels.linear_cross_entropy as lce

    if triton_device.type == "cpu":  # launch-sized tiles: the interpreter runs few programs
        cuda_tiles = {k: {n: v for n, v in c.items() if n.startswith("BLOCK")} for k, c in lce._CUDA_CONFIG.items()}
        monkeypatch.setattr(lce, "_INTERPRETER_CONFIG", cuda_tiles)
    T, H, V, K, chunk = 512, 64, 2000, 3, 128
    hidden = torch.randn(T, H, device=triton_device).bfloat16().requires_grad_()
    weight = (torch.randn(V, H, device=triton_device) * 0.2).bfloat16().requires_grad_()
    labels, task_ids = torch.randint(0, V, (T,), device=triton_device), torch.randint(0, K, (T,), device=triton_device)
    with AllocationLog([hidden, weight, labels, task_ids]) as log:
        r = per_task_linear_cross_entropy(hidden, weight, labels, task_ids, K, backend="triton", chunk_size=chunk)
        r.loss.backward()
    n_vblocks = math.ceil(V / lce._CUDA_CONFIG["logits"]["BLOCK_V"])
    scratch = 4 * max(2 * chunk * n_vblocks, chunk * H)
    large = sorted(n for n in log.sizes if n > 8 * T)
    assert large == sorted([T * H * 2, V * H * 2] + [chunk * V * 2, scratch] * (T // chunk)), large
    assert hidden.grad.dtype == weight.grad.dtype == torch.bfloat16


def test_triton_lce_no_grad(seed, triton_device):
    batch = make_batch(random.randint(1, 100), 24, 77, 4, torch.bfloat16, triton_device)
    with torch.no_grad():
        r = per_task_linear_cross_entropy(**batch, softcap=3.0, backend="triton")
        e = per_task_linear_cross_entropy_reference(**batch, softcap=3.0)
    assert not r.loss.requires_grad
    assert rel_err(r.loss_sum, e.loss_sum) < 1e-2 and rel_err(r.ghost_dot, e.ghost_dot) < 1e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_ghost_dot_matches_reference(dtype, seed, triton_device):
    T, n_in, n_out, K = random.randint(1, 300), random.randint(17, 80), random.randint(17, 80), 4
    x, delta = torch.randn(T, n_in, device=triton_device), torch.randn(T, n_out, device=triton_device)
    G = torch.randn(n_out, n_in, device=triton_device)
    x, delta, G = x.to(dtype), delta.to(dtype), G.to(dtype)
    task_ids = torch.randint(-1, K - 1, (T,), device=triton_device)
    out = per_task_ghost_dot(x, delta, G, task_ids, K, backend="triton")
    ref = per_task_ghost_dot_reference(x.float(), delta.float(), G.float(), task_ids, K)
    assert out.dtype == torch.float32 and out[K - 1] == 0
    assert rel_err(out, ref) < GRAD_TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_weight_grad_ghost_matches_reference(dtype, seed, triton_device):
    """dW = delta^T x with the per-task dots folded in: rows before the first task and after the last count in dW
    only, one task is empty, a task may hold a single row."""
    T, n_in, n_out = random.randint(1, 300), random.randint(17, 80), random.randint(17, 80)
    x, delta = torch.randn(T, n_in, device=triton_device), torch.randn(T, n_out, device=triton_device)
    G = torch.randn(n_out, n_in, device=triton_device)
    x, delta, G = x.to(dtype), delta.to(dtype), G.to(dtype)
    cuts = sorted(random.randint(0, T) for _ in range(4))
    offsets = torch.tensor([cuts[0], cuts[1], cuts[1], cuts[2], cuts[3]], device=triton_device)  # task 1 empty
    dW, dots = per_task_weight_grad(x, delta, G, offsets, backend="triton")
    ref_dW, ref_dots = per_task_weight_grad_reference(x.float(), delta.float(), G.float(), offsets)
    assert dW.dtype == dtype and dots.dtype == torch.float32 and dots[1] == 0
    assert rel_err(dW, ref_dW) < GRAD_TOL[dtype] and rel_err(dots, ref_dots) < GRAD_TOL[dtype]
    ghost = per_task_ghost_dot(x, delta, G, task_offsets=offsets, backend="triton")  # the same dots, the other way
    assert rel_err(dots, ghost) < GRAD_TOL[dtype]


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen3", "tiny-gemma3"])
def test_triton_folded_linear_dots_match_hooks(name, seed, triton_device):
    """GhostDots(fold_linear=True): every linear layer's dots come with its weight gradient (per_task_weight_grad)
    and equal the hooks' separate ghost dots, as do the gradients; also under activation checkpointing (the layers
    recomputed in the backward); the layers get their class back on exit; ungrouped task ids fall back to hooks."""
    from adapt_fast.model.ghost import GhostDots, trainable_parameters
    from adapt_fast.model.loading import enable_gradient_checkpointing, load_model_and_tokenizer
    from adapt_fast.model.loss import per_task_loss

    model, _ = load_model_and_tokenizer(name, dtype=torch.float32, device=triton_device, seed=seed % 1000)
    batch = packed_micro_batch([5, 9, 1, 30, 12, 7], [0, 0, 1, 2, 2, 3], model.config.vocab_size).to(triton_device)
    K = 5  # task 4: empty
    weights = torch.ones(K, dtype=torch.float64) / int((batch.labels != -100).sum())
    G = {n: torch.randn_like(p) for n, p in trainable_parameters(model).items()}
    classes = [type(m) for m in model.modules()]

    def dots_and_grads(fold: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
        model.zero_grad()
        with GhostDots(model, G, batch.task_ids, K, backend=backend, fold_linear=fold) as ghost:
            assert (ghost.offsets is not None) == fold
            out = per_task_loss(model, batch, weights, ghost_weight=ghost.head_ghost_weight, backend="torch")
            out.loss.backward()
        assert [type(m) for m in model.modules()] == classes
        grads = torch.cat([p.grad.flatten() for p in trainable_parameters(model).values()])
        return ghost.dots + out.ghost_dot.double(), grads

    dots, grads = dots_and_grads(False, "torch")
    for checkpointing in (False, True):
        if checkpointing:
            enable_gradient_checkpointing(model)
            model.train()
        f_dots, f_grads = dots_and_grads(True, "triton")
        assert rel_err(f_dots, dots) < 1e-4 and rel_err(f_grads, grads) < 1e-4, checkpointing
    shuffled = batch.task_ids.flip(0)  # not grouped by task: no offsets, the hooks run
    assert GhostDots(model, G, shuffled, K, fold_linear=True).offsets is None


def test_weight_grad_ghost_bad_input_is_a_clear_error():
    x, delta, G = torch.randn(5, 3), torch.randn(5, 4), torch.randn(4, 3)
    with pytest.raises(ValueError, match="task_offsets must be"):
        per_task_weight_grad(x, delta, G, torch.tensor([0]))
    with pytest.raises(ValueError, match="do not match"):
        per_task_weight_grad(x, delta, G.T, torch.tensor([0, 5]))


# ----------------------------------------------------------------------------------------------------------
# Fused layers: RMSNorm, SwiGLU, RoPE (kernels/norm.py, gated_mlp.py, rotary.py; adapt_fast/model/fused_layers.py)
# ----------------------------------------------------------------------------------------------------------

RMS_NORM_FORMS = {"llama": (0.0, True), "rounded_once": (0.0, False), "gemma": (1.0, False)}


def packed_micro_batch(lengths: list[int], tasks: list[int], vocab: int):
    """A MicroBatch of examples of the given lengths and (sorted) tasks; the first third of each carries no loss."""
    from adapt_fast.data.batch import MicroBatch

    T = sum(lengths)
    input_ids = torch.randint(4, vocab, (T,))
    labels, positions, task_ids, cu = input_ids.clone(), [], [], [0]
    for n, k in zip(lengths, tasks, strict=True):
        labels[cu[-1] : cu[-1] + max(1, n // 3)] = -100
        positions.append(torch.arange(n))
        task_ids += [k] * n
        cu.append(cu[-1] + n)
    task_ids = torch.tensor(task_ids)
    return MicroBatch(
        input_ids=input_ids, labels=labels, position_ids=torch.cat(positions), task_ids=task_ids,
        cu_seqlens=torch.tensor(cu, dtype=torch.int32), task_offsets=torch.searchsorted(task_ids, torch.arange(6)),
        max_seqlen=max(lengths), num_examples=len(lengths),
    )  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_references_are_hf_modules(dtype, seed):
    """The references are HF's own formulas, bit for bit: LlamaRMSNorm, Qwen3RMSNorm, Gemma3RMSNorm, the
    activation products of LlamaMLP and Gemma3MLP, and apply_rotary_pos_emb of Llama, Qwen3 and Gemma 3 (forward
    and backward)."""
    from transformers.activations import ACT2FN
    from transformers.models.gemma3 import modeling_gemma3
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
    from transformers.models.llama import modeling_llama
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.qwen3 import modeling_qwen3
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    H = random.randint(2, 300)
    x = (torch.randn(2, random.randint(1, 9), H) * 3).to(dtype)
    for cls, form in ((LlamaRMSNorm, "llama"), (Qwen3RMSNorm, "llama"), (Gemma3RMSNorm, "gemma")):
        module = cls(H, eps=1e-5).to(dtype)
        module.weight.data = torch.randn(H).to(dtype)
        assert torch.equal(module(x), rms_norm_reference(x, module.weight, 1e-5, *RMS_NORM_FORMS[form])), cls
    gate, up = torch.randn(5, H).to(dtype), torch.randn(5, H).to(dtype)
    assert torch.equal(ACT2FN["silu"](gate) * up, swiglu_reference(gate, up))
    assert torch.equal(ACT2FN["gelu_pytorch_tanh"](gate) * up, geglu_reference(gate, up))
    q, k, cos, sin, grads = rope_inputs(dtype, CPU)
    expected = rope_reference(q, k, cos, sin)
    expected_grads = torch.autograd.grad(expected, (q, k), grads)
    for modeling in (modeling_llama, modeling_qwen3, modeling_gemma3):
        own = modeling.apply_rotary_pos_emb(q, k, cos, sin)
        own_grads = torch.autograd.grad(own, (q, k), grads)
        pairs = zip((*own, *own_grads), (*expected, *expected_grads), strict=True)
        assert all(torch.equal(a, b) for a, b in pairs), modeling


def rope_inputs(dtype: torch.dtype, device: torch.device) -> tuple:
    """Random q (B, Hq, T, D), k (B, Hk, T, D) (HF's (B, T, H, D) transposed, or contiguous), cos and sin (B or 1,
    T, D; values unlike a real rotation, so that every element counts) and output gradients, at odd sizes."""
    B, T, D = random.randint(1, 3), random.randint(1, 300), 2 * random.randint(1, 80)
    Hq, Hk = random.randint(1, 6), random.randint(1, 3)
    transposed = random.random() < 0.5
    q, k = (torch.randn(B, T, H, D, device=device).transpose(1, 2) for H in (Hq, Hk))
    if not transposed:
        q, k = q.contiguous(), k.contiguous()
    q, k = q.to(dtype).requires_grad_(), k.to(dtype).requires_grad_()
    cos_batch = random.choice([1, B])
    cos, sin = (torch.randn(cos_batch, T, D, device=device).to(dtype) for _ in range(2))
    grads = (torch.randn(B, Hq, T, D, device=device).to(dtype), torch.randn(B, Hk, T, D, device=device).to(dtype))
    print(f"rope inputs: B={B} Hq={Hq} Hk={Hk} T={T} D={D} transposed={transposed} cos batch={cos.shape[0]}")
    return q, k, cos, sin, grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("form", list(RMS_NORM_FORMS))
def test_triton_rms_norm_matches_reference(dtype, form, seed, triton_device):
    """Odd row counts and widths (up to two blocks of rows, H not a power of two), a 3-D input; against the
    reference run in fp32 on the same values. The output of a bf16 run also equals the bf16 reference (HF's own
    roundings) up to one rounding step."""
    H, rows = random.randint(3, 300), random.randint(1, 40)
    x = (torch.randn(2, rows, H, device=triton_device) * 3).to(dtype)
    w = (torch.randn(H, device=triton_device) * 0.5 + (0.0 if form == "gemma" else 1.0)).to(dtype)
    dy = torch.randn(2, rows, H, device=triton_device).to(dtype)
    offset, cast = RMS_NORM_FORMS[form]
    results = {}
    for name, fn, dt in (("kernel", rms_norm, dtype), ("reference", rms_norm_reference, torch.float32)):
        xi, wi = x.to(dt, copy=True).requires_grad_(), w.to(dt, copy=True).requires_grad_()
        kwargs = {"backend": "triton"} if name == "kernel" else {}
        y = fn(xi, wi, 1e-6, offset, cast, **kwargs)
        y.backward(dy.to(dt))
        results[name] = (y, xi.grad, wi.grad)
    (y, dx, dw), (ry, rdx, rdw) = results["kernel"], results["reference"]
    assert y.dtype == dtype and dx.dtype == dtype and dw.dtype == dtype and y.shape == x.shape
    assert rel_err(y, ry) < LOSS_TOL[dtype]
    assert rel_err(dx, rdx) < GRAD_TOL[dtype] and rel_err(dw, rdw) < GRAD_TOL[dtype]
    if dtype == torch.bfloat16:
        same_rounding = rms_norm_reference(x, w, 1e-6, offset, cast)
        assert (y.float() - same_rounding.float()).abs().max() <= 2**-7 * same_rounding.float().abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kernel,reference", [(swiglu, swiglu_reference), (geglu, geglu_reference)])
def test_triton_gated_mlp_matches_reference(kernel, reference, dtype, seed, triton_device):
    shape = (random.randint(1, 5), random.randint(3, 3000))
    gate, up, dy = ((torch.randn(shape, device=triton_device) * 3).to(dtype) for _ in range(3))
    gate[0, :3] = torch.tensor([30.0, -30.0, 0.0])  # tanh and sigmoid saturated, and at 0
    results = {}
    for name, fn, dt in (("kernel", kernel, dtype), ("reference", reference, torch.float32)):
        g, u = gate.to(dt, copy=True).requires_grad_(), up.to(dt, copy=True).requires_grad_()
        y = fn(g, u, backend="triton") if name == "kernel" else fn(g, u)
        y.backward(dy.to(dt))
        results[name] = (y, g.grad, u.grad)
    (y, dg, du), (ry, rdg, rdu) = results["kernel"], results["reference"]
    assert y.dtype == dtype and dg.dtype == dtype
    assert rel_err(y, ry) < LOSS_TOL[dtype]
    assert rel_err(dg, rdg) < GRAD_TOL[dtype] and rel_err(du, rdu) < GRAD_TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_rope_matches_reference(dtype, seed, triton_device):
    """The RoPE kernel's outputs and q / k gradients against the reference: in the interpreter bit for bit in the
    same dtype (HF's roundings, reproduced), on CUDA within the tolerances; and against the reference in fp32 on
    the same values within the tolerances. The outputs keep q's and k's memory layout."""
    q, k, cos, sin, grads = rope_inputs(dtype, triton_device)
    out = rope(q, k, cos, sin, backend="triton")
    out_grads = torch.autograd.grad(out, (q, k), grads)
    assert out[0].stride() == q.stride() and out[1].stride() == k.stride()
    same = rope_reference(q, k, cos, sin)
    same_grads = torch.autograd.grad(same, (q, k), grads)
    upcast = [t.detach().float().requires_grad_() for t in (q, k)]
    fp32 = rope_reference(*upcast, cos.float(), sin.float())
    fp32_grads = torch.autograd.grad(fp32, upcast, [g.float() for g in grads])
    for a, b, c in zip((*out, *out_grads), (*same, *same_grads), (*fp32, *fp32_grads), strict=True):
        assert a.dtype == dtype and a.shape == b.shape
        if triton_device.type == "cpu" and dtype != torch.float16:
            assert torch.equal(a, b)
        assert rel_err(a, b) <= LOSS_TOL[dtype] and rel_err(a, c) <= LOSS_TOL[dtype]


def test_triton_layer_kernels_refuse_double_backward(triton_device):
    """Their backward is a kernel, not differentiable again: a second derivative through it is an error, not a
    silently missing term."""
    x = torch.randn(3, 8, device=triton_device, requires_grad=True)
    q, k, cos = (torch.randn(1, h, 3, 8, device=triton_device, requires_grad=True) for h in (2, 1, 1))
    for out, inputs in (
        (rms_norm(x, torch.ones(8, device=triton_device), 1e-6, backend="triton"), (x,)),
        (swiglu(x, x * 2, backend="triton"), (x,)),
        (rope(q, k, cos[0].detach(), cos[0].detach(), backend="triton")[0], (q,)),
    ):
        (grad,) = torch.autograd.grad(out.pow(2).sum(), inputs, create_graph=True)
        with pytest.raises(RuntimeError, match="differentiate twice"):
            grad.sum().backward()


def test_layer_kernels_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="rms_norm: weight"):
        rms_norm(torch.randn(3, 8), torch.randn(7), 1e-6)
    with pytest.raises(ValueError, match="swiglu: gate"):
        swiglu(torch.randn(3, 8), torch.randn(3, 9))
    with pytest.raises(ValueError, match="geglu: gate"):
        geglu(torch.randn(3, 8), torch.randn(3, 8).bfloat16())
    q, k, cos = torch.randn(1, 4, 5, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 5, 8)
    for bad, match in (
        ((q, k[..., :6], cos, cos), "are not \\(B, H, T, D\\)"),
        ((q[..., :7], k[..., :7], cos[..., :7], cos[..., :7]), "head_dim 7 is odd"),
        ((q, k, cos[:, :4], cos[:, :4]), "cos \\(1, 4, 8\\)"),
        ((q, k, cos, cos[:, :4]), "differ in shape"),
        ((q, k.bfloat16(), cos, cos), "dtypes differ"),
        ((q.double(), k.double(), cos.double(), cos.double(), "triton"), "not float64"),
    ):
        with pytest.raises(ValueError, match="^rope: .*" + match):
            rope(*bad[:4], backend=bad[4] if len(bad) > 4 else "auto")
    x, w = torch.randn(3, 8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    with pytest.raises(ValueError, match="not float64"):
        rms_norm(x, w, 1e-6, backend="triton")
    for fn in (swiglu, geglu):
        with pytest.raises(ValueError, match="not float64"):
            fn(x, x, backend="triton")
    assert torch.equal(rms_norm(x, w, 1e-6), rms_norm_reference(x, w, 1e-6))  # auto: float64 runs the reference


def test_fused_layers_swap_only_what_they_compute():
    """Names are not enough: an "RMSNorm" that centres its input, an "MLP" gating the other branch or with exact
    (erf) GELU, keep their own forward; the real ones are recognised (SwiGLU, and GEGLU with GELU's tanh form),
    including a Llama-style norm in a class of another name."""
    from torch import nn

    from adapt_fast.model.fused_layers import gated_mlp_activation, rms_norm_form, use_fused_layers

    class CenteringRMSNorm(nn.Module):
        def __init__(self, h):
            super().__init__()
            self.weight, self.eps = nn.Parameter(torch.ones(h)), 1e-6

        def forward(self, x):
            x = x - x.mean(-1, keepdim=True)
            return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))

    class MyRMSNorm(CenteringRMSNorm):
        def forward(self, x):
            h = x.float()
            return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)

    class GatedMLP(nn.Module):
        def __init__(self, act, swapped=False):
            super().__init__()
            self.gate_proj, self.up_proj, self.down_proj = nn.Linear(4, 6), nn.Linear(4, 6), nn.Linear(6, 4)
            self.act_fn, self.swapped = act, swapped

        def forward(self, x):
            a, b = (self.up_proj(x), self.gate_proj(x)) if self.swapped else (self.gate_proj(x), self.up_proj(x))
            return self.down_proj(self.act_fn(a) * b)

    assert rms_norm_form(CenteringRMSNorm(8)) is None
    assert rms_norm_form(MyRMSNorm(8)) == (1e-6, 0.0, True)
    assert gated_mlp_activation(GatedMLP(nn.GELU())) is None
    assert gated_mlp_activation(GatedMLP(nn.SiLU(), swapped=True)) is None
    assert gated_mlp_activation(GatedMLP(nn.SiLU())) == "silu"
    assert gated_mlp_activation(GatedMLP(nn.GELU(approximate="tanh"))) == "gelu_tanh"
    model = nn.Sequential(CenteringRMSNorm(8), MyRMSNorm(8), GatedMLP(nn.SiLU(), swapped=True), GatedMLP(nn.SiLU()),
                          GatedMLP(nn.GELU()), GatedMLP(nn.GELU(approximate="tanh")))  # fmt: skip
    state = torch.random.get_rng_state()
    assert use_fused_layers(model, "torch") == {"rms_norm": 1, "swiglu_mlp": 1, "geglu_mlp": 1, "rope_attention": 0}
    assert torch.equal(torch.random.get_rng_state(), state)  # the probes leave the caller's random stream alone
    names = ["CenteringRMSNorm", "FusedMyRMSNorm", "GatedMLP", "FusedGatedMLP", "GatedMLP", "FusedGatedMLP"]
    assert [type(m).__name__ for m in model] == names
    x = torch.randn(3, 8)
    assert torch.equal(model[1](x), MyRMSNorm.forward(model[1], x))  # backend torch: the reference, same numbers


def attention_class(rotary, decorated: bool = False) -> type:
    """An attention module class whose forward calls `rotary` as its modeling file's apply_rotary_pos_emb
    (`decorated`: under a functools.wraps decorator, as HF's deprecate_kwarg puts on some forwards)."""
    from torch import nn

    def forward(self, q, k, cos, sin, **kwargs):
        return apply_rotary_pos_emb(q, k, cos, sin, **kwargs)  # noqa: F821 (the namespace below)

    forward = types.FunctionType(forward.__code__, {"apply_rotary_pos_emb": rotary})
    if decorated:
        forward = functools.wraps(forward)(lambda self, *args, **kwargs: forward(self, *args, **kwargs))
    return type("ToyAttention", (nn.Module,), {"forward": forward})


def test_fused_rope_only_where_it_computes_the_same(monkeypatch):
    """A modeling file's apply_rotary_pos_emb is replaced only if it is HF's rotation (an interleaved or partial
    one is not), and the replacement runs the kernel only inside a swapped attention module's forward: not for an
    unswapped module of the same class, a direct call, inside reference_kernels(), or with another unsqueeze_dim."""
    from adapt_fast.kernels import reference_kernels
    from torch import nn

    from adapt_fast.model import fused_layers
    from adapt_fast.model.fused_layers import rope_function_namespace, use_fused_layers

    def hf(q, k, cos, sin, unsqueeze_dim=1):
        half = q.shape[-1] // 2
        cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
        rotated = [torch.cat((-x[..., half:], x[..., :half]), -1) for x in (q, k)]
        return q * cos + rotated[0] * sin, k * cos + rotated[1] * sin

    def interleaved(q, k, cos, sin):  # GPT-J: pairs (x0, x1) -> (-x1, x0)
        rot = [torch.stack((-x[..., 1::2], x[..., ::2]), -1).flatten(-2) for x in (q, k)]
        return q * cos[:, None] + rot[0] * sin[:, None], k * cos[:, None] + rot[1] * sin[:, None]

    def partial(q, k, cos, sin):  # the first half of head_dim rotated, the rest passed through
        d = q.shape[-1] // 2
        out = [rope_reference(q[..., :d], k[..., :d], cos[..., :d], sin[..., :d]), (q[..., d:], k[..., d:])]
        return torch.cat((out[0][0], out[1][0]), -1), torch.cat((out[0][1], out[1][1]), -1)

    HF, Interleaved, Partial = attention_class(hf), attention_class(interleaved), attention_class(partial)
    assert rope_function_namespace(HF()) is not None and rope_function_namespace(attention_class(hf, True)())
    assert rope_function_namespace(Interleaved()) is None and rope_function_namespace(Partial()) is None
    model = nn.Sequential(HF(), Interleaved(), Partial(), nn.Linear(2, 2))
    assert use_fused_layers(model, "torch") == {"rms_norm": 0, "swiglu_mlp": 0, "geglu_mlp": 0, "rope_attention": 1}
    assert type(model[0]).__name__ == "FusedToyAttention" and type(model[1]).__name__ == "ToyAttention"

    calls = []
    monkeypatch.setattr(fused_layers, "rope", lambda *a, **kw: calls.append(kw["backend"]) or rope_reference(*a))
    q, k, cos, sin = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    expected = rope_reference(q, k, cos, sin)
    direct = HF.forward.__globals__["apply_rotary_pos_emb"]
    assert direct.adapt_fast_original is hf
    for label, run, context, fused in (
        ("swapped", model[0], contextlib.nullcontext(), True),
        ("unswapped, same class", HF(), contextlib.nullcontext(), False),
        ("direct call", lambda *a: direct(*a), contextlib.nullcontext(), False),
        ("reference_kernels", model[0], reference_kernels(), False),
    ):
        calls.clear()
        with context:
            out = run(q, k, cos, sin)
        assert calls == (["torch"] if fused else []), label
        assert all(torch.equal(a, b) for a, b in zip(out, expected, strict=True)), label
    calls.clear()
    out = model[0](q.transpose(1, 2), k.transpose(1, 2), cos, sin, unsqueeze_dim=2)  # (B, T, H, D): the original's
    assert calls == [] and torch.equal(out[0], expected[0].transpose(1, 2))


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen3", "tiny-gemma3"])
def test_triton_fused_layers_in_models(name, seed, triton_device):
    """use_fused_layers swaps every RMSNorm (Qwen3's and Gemma 3's per-head q/k norms too), gated MLP (SwiGLU, and
    Gemma's GEGLU) and attention's RoPE without touching parameters or state dicts; the fused model's loss,
    gradients and one-pass ghost dots (whose forward-mode jvp runs the modules' own forward) equal the unfused
    model's in fp32."""
    import copy

    from adapt_fast.model.fused_layers import use_fused_layers
    from adapt_fast.model.ghost import GhostDots, trainable_parameters
    from adapt_fast.model.loading import load_model_and_tokenizer
    from adapt_fast.model.loss import per_task_loss

    plain, _ = load_model_and_tokenizer(name, dtype=torch.float32, device=triton_device, seed=seed % 1000)
    with torch.no_grad():
        for p in plain.parameters():
            if p.dim() == 1:  # norm weights away from their init (ones, or zeros in Gemma's 1 + w)
                p.add_(0.2 * torch.randn_like(p))
    fused = copy.deepcopy(plain)
    counts = use_fused_layers(fused, "triton")
    expected = {"tiny-llama": (5, 2, 0, 2), "tiny-qwen3": (9, 2, 0, 2), "tiny-gemma3": (19, 0, 3, 3)}[name]
    assert tuple(counts.values()) == expected
    assert list(fused.state_dict()) == list(plain.state_dict())
    assert sum(type(m).__name__.startswith("Fused") for m in fused.modules()) == sum(expected)
    assert use_fused_layers(fused, "triton") == dict.fromkeys(counts, 0)  # already swapped

    batch = packed_micro_batch([5, 9, 1, 30, 12, 7], [0, 0, 1, 2, 2, 3], plain.config.vocab_size).to(triton_device)
    K = 5  # task 4: empty
    weights = torch.ones(K, dtype=torch.float64) / max(int((batch.labels != -100).sum()), 1)
    G = {n: torch.randn_like(p) for n, p in trainable_parameters(plain).items()}
    results = {}
    for label, model in (("plain", plain), ("fused", fused)):
        model.zero_grad()
        with GhostDots(model, G, batch.task_ids, K, backend="torch") as ghost:
            out = per_task_loss(model, batch, weights, ghost_weight=ghost.head_ghost_weight, backend="torch")
            out.loss.backward()
        dots = ghost.dots + out.ghost_dot.double()
        grads = torch.cat([p.grad.flatten() for p in trainable_parameters(model).values()])
        results[label] = (out.loss.detach(), grads, dots)
    (loss, grads, dots), (f_loss, f_grads, f_dots) = results["plain"], results["fused"]
    assert rel_err(f_loss, loss) < 1e-5 and rel_err(f_grads, grads) < 1e-4 and rel_err(f_dots, dots) < 1e-4


@pytest.mark.parametrize("reentrant", [False, True])
def test_triton_fused_layers_with_gradient_checkpointing(reentrant, seed, triton_device, monkeypatch):
    """With activation checkpointing the decoder layers run again in the backward: the swapped attention sets its
    RoPE dispatch there too (the kernel runs in the forward and in the recompute), and loss and gradients equal
    the unfused model's without checkpointing."""
    import copy

    from adapt_fast.model import fused_layers
    from adapt_fast.model.loading import enable_gradient_checkpointing, load_model_and_tokenizer

    plain, _ = load_model_and_tokenizer("tiny-llama", dtype=torch.float32, device=triton_device, seed=seed % 1000)
    fused = copy.deepcopy(plain)
    fused_layers.use_fused_layers(fused, "triton")
    enable_gradient_checkpointing(fused, reentrant=reentrant)
    calls = []
    kernel = fused_layers.rope
    monkeypatch.setattr(fused_layers, "rope", lambda *a, **kw: calls.append(1) or kernel(*a, **kw))
    ids = torch.randint(4, plain.config.vocab_size, (1, 37), device=triton_device)
    results = {}
    for label, model in (("plain", plain), ("fused", fused)):
        model.train()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        results[label] = (loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters()]))
    layers = plain.config.num_hidden_layers
    assert len(calls) == 2 * layers  # each layer's forward, and its recompute in the backward
    assert rel_err(results["fused"][0], results["plain"][0]) < 1e-5
    assert rel_err(results["fused"][1], results["plain"][1]) < 1e-4


# ----------------------------------------------------------------------------------------------------------
# GPU, full size
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_gpu_lce_full_size(softcap, dtype, seed):
    """T=16384, H=2048, V=128256 against the reference in fp32 on the same values. bf16: the reference may use
    TF32 (bf16 inputs are exact in it) and the bf16 tolerances hold; fp32: no TF32 anywhere, fp32 tolerances."""
    T, H, V, K = 16384, 2048, 128256, 8
    batch = make_batch(T, H, V, K, dtype, torch.device("cuda"))
    batch["weight"] = batch["weight"] * 0.3  # keep Llama-like logit scales
    r, d_h, d_w = run_lce(per_task_linear_cross_entropy, batch, softcap, backend="triton")
    with tf32_matmuls(dtype == torch.bfloat16):  # keeps the bf16 reference fast
        e, e_dh, e_dw = run_lce(per_task_linear_cross_entropy_reference, upcast(batch), softcap)
    assert torch.equal(r.count, e.count)
    low = dtype == torch.bfloat16
    assert rel_err(r.loss_sum, e.loss_sum) < (1e-4 if low else LOSS_TOL[dtype])
    assert rel_err(r.ghost_dot, e.ghost_dot) < (5e-3 if low else GRAD_TOL[dtype])  # TF32 reference: 10-bit dz
    assert rel_err(d_h, e_dh) < GRAD_TOL[dtype] and rel_err(d_w, e_dw) < GRAD_TOL[dtype]


@pytest.mark.gpu
def test_gpu_lce_deterministic_full_size(seed):
    """Under torch.use_deterministic_algorithms(True), at full size in bf16: d hidden without the split-K atomics
    (a path the test above does not reach on a GPU, where 512-row chunks split), two runs equal bit for bit, and
    the reference's values to the bf16 tolerances."""
    import adapt_fast.kernels.linear_cross_entropy as lce

    T, H, V, K, cuda = 16384, 2048, 128256, 8, torch.device("cuda")
    cfg = lce._CUDA_CONFIG["dhidden"]
    tiles = math.ceil(lce._triton_chunk_rows(V, 2) / cfg["BLOCK_T"]) * math.ceil(H / cfg["BLOCK_H"])  # per chunk
    vblocks = math.ceil(V / cfg["BLOCK_V"])
    assert lce._dhidden_splits(tiles, vblocks, cuda) > 1
    batch = make_batch(T, H, V, K, torch.bfloat16, cuda)
    batch["weight"] = batch["weight"] * 0.3
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert lce._dhidden_splits(tiles, vblocks, cuda) == 1
        r, d_h, d_w = run_lce(per_task_linear_cross_entropy, batch, None, backend="triton")
        r2, d_h2, d_w2 = run_lce(per_task_linear_cross_entropy, batch, None, backend="triton")
    finally:
        torch.use_deterministic_algorithms(before)
    for a, b in ((r.loss_sum, r2.loss_sum), (r.ghost_dot, r2.ghost_dot), (d_h, d_h2), (d_w, d_w2)):
        assert torch.equal(a, b)
    with tf32_matmuls(True):
        e, e_dh, e_dw = run_lce(per_task_linear_cross_entropy_reference, upcast(batch), None)
    assert torch.equal(r.count, e.count) and rel_err(r.loss_sum, e.loss_sum) < 1e-4
    assert rel_err(r.ghost_dot, e.ghost_dot) < 5e-3
    assert rel_err(d_h, e_dh) < GRAD_TOL[torch.bfloat16] and rel_err(d_w, e_dw) < GRAD_TOL[torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n_out,n_in", [(2048, 2048), (8192, 2048), (2048, 8192)])
def test_gpu_ghost_dot_full_size(n_out, n_in, dtype, seed):
    """At Llama-3.2-1B's linear shapes, T=16384, against the references on the same values (fp32 matmuls, no TF32):
    per_task_ghost_dot by task ids (task K-1 empty, the last 100 rows padding) and by task offsets (task 2 empty,
    100 rows of no task at the end), and per_task_weight_grad (dW with the dots folded in) on the offsets.
    fp32 runs the kernels' fp32 tiles (FMA, not tensor cores), which no other GPU test reaches at this size."""
    T, K, cuda = 16384, 8, torch.device("cuda")
    x, delta = torch.randn(T, n_in, device=cuda).to(dtype), torch.randn(T, n_out, device=cuda).to(dtype)
    G = torch.randn(n_out, n_in, device=cuda).to(dtype)
    dot_tol = GRAD_TOL[torch.float32] if dtype == torch.float32 else 1e-3
    ids = torch.randint(0, K - 1, (T,), device=cuda)
    ids[T - 100 :] = -1
    offsets = torch.linspace(0, T - 100, K + 1, device=cuda).long()
    offsets[3] = offsets[2]
    with tf32_matmuls(False):
        ref_by_ids = per_task_ghost_dot_reference(x, delta, G, ids, K)
        ref_by_offsets = per_task_ghost_dot_reference(x, delta, G, task_offsets=offsets)
        ref_dW, ref_dots = per_task_weight_grad_reference(x, delta, G, offsets)
    by_ids = per_task_ghost_dot(x, delta, G, ids, K, backend="triton")
    by_offsets = per_task_ghost_dot(x, delta, G, task_offsets=offsets, backend="triton")
    dW, dots = per_task_weight_grad(x, delta, G, offsets, backend="triton")
    assert by_ids[K - 1] == 0 and by_offsets[2] == 0 and dots[2] == 0
    assert rel_err(by_ids, ref_by_ids) < dot_tol and rel_err(by_offsets, ref_by_offsets) < dot_tol
    assert rel_err(dW, ref_dW) < GRAD_TOL[dtype] and rel_err(dots, ref_dots) < dot_tol


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_layer_kernels_full_size(dtype, seed):
    """RMSNorm at Llama-3.2-1B's width (T=16384, H=2048; Gemma's form at 8192), SwiGLU and GEGLU at its MLP width
    (8192) and RoPE at its attention (32 query and 8 key heads of 64, HF's transposed layout), against the
    references in fp32 on the same values."""
    T, cuda = 16384, torch.device("cuda")
    for H, form in ((2048, "llama"), (8192, "gemma")):
        offset, cast = RMS_NORM_FORMS[form]
        x, dy = torch.randn(T, H, device=cuda).to(dtype), torch.randn(T, H, device=cuda).to(dtype)
        w = (torch.randn(H, device=cuda) * 0.5 + 1.0).to(dtype)
        out = {}
        for name, fn, dt in (("kernel", rms_norm, dtype), ("reference", rms_norm_reference, torch.float32)):
            xi, wi = x.to(dt, copy=True).requires_grad_(), w.to(dt, copy=True).requires_grad_()
            y = fn(xi, wi, 1e-6, offset, cast, **({"backend": "triton"} if name == "kernel" else {}))
            y.backward(dy.to(dt))
            out[name] = (y, xi.grad, wi.grad)
        for a, b in zip(out["kernel"], out["reference"], strict=True):
            assert rel_err(a, b) < GRAD_TOL[dtype], (H, form)
    gate, up, dy = (torch.randn(T, 8192, device=cuda).to(dtype) for _ in range(3))
    for kernel, reference in ((swiglu, swiglu_reference), (geglu, geglu_reference)):
        out = {}
        for name, dt in (("kernel", dtype), ("reference", torch.float32)):
            g, u = gate.to(dt, copy=True).requires_grad_(), up.to(dt, copy=True).requires_grad_()
            y = kernel(g, u, backend="triton") if name == "kernel" else reference(g, u)
            y.backward(dy.to(dt))
            out[name] = (y, g.grad, u.grad)
        for a, b in zip(out["kernel"], out["reference"], strict=True):
            assert rel_err(a, b) < GRAD_TOL[dtype], kernel.__name__
    q, k = (torch.randn(1, T, H, 64, device=cuda).transpose(1, 2).to(dtype) for H in (32, 8))
    cos, sin = (torch.randn(1, T, 64, device=cuda).to(dtype) for _ in range(2))
    grads = (torch.randn(1, 32, T, 64, device=cuda).to(dtype), torch.randn(1, 8, T, 64, device=cuda).to(dtype))
    out = {}
    for name, dt in (("kernel", dtype), ("reference", torch.float32)):
        qi, ki = q.to(dt, copy=True).requires_grad_(), k.to(dt, copy=True).requires_grad_()
        embed = rope(qi, ki, cos, sin, backend="triton") if name == "kernel" else rope_reference(qi, ki, cos, sin)
        out[name] = (*embed, *torch.autograd.grad(embed, (qi, ki), [g.to(dt) for g in grads]))
    for a, b in zip(out["kernel"], out["reference"], strict=True):
        assert rel_err(a, b) < GRAD_TOL[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_rope_equals_hf_bit_for_bit(dtype, seed):
    """The RoPE kernel's claim beyond the tolerances (kernels/rotary.py): on the GPU too, its outputs and gradients
    equal HF's apply_rotary_pos_emb's bit for bit, at Llama-3.2-1B's attention with real rotation angles. If this
    alone fails, the claim in the docstring and README is what to correct."""
    from transformers.models.llama import modeling_llama

    apply_rope = modeling_llama.apply_rotary_pos_emb
    apply_rope = getattr(apply_rope, "adapt_fast_original", apply_rope)  # HF's own, if fused_layers replaced it
    T, D, cuda = 16384, 64, torch.device("cuda")
    q, k = (torch.randn(1, T, H, D, device=cuda).transpose(1, 2).to(dtype) for H in (32, 8))
    angles = torch.arange(T, device=cuda)[:, None] / 500000 ** (torch.arange(D // 2, device=cuda) / (D // 2))
    angles = torch.cat((angles, angles), -1)[None]
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    grads = (torch.randn(1, 32, T, D, device=cuda).to(dtype), torch.randn(1, 8, T, D, device=cuda).to(dtype))
    out = {}
    for name, fn in (("kernel", functools.partial(rope, backend="triton")), ("hf", apply_rope)):
        qi, ki = q.clone().requires_grad_(), k.clone().requires_grad_()
        embed = fn(qi, ki, cos, sin)
        out[name] = (*embed, *torch.autograd.grad(embed, (qi, ki), grads))
    differing = [int((a != b).sum()) for a, b in zip(out["kernel"], out["hf"], strict=True)]
    assert differing == [0, 0, 0, 0], f"values differing from HF's (q, k, dq, dk): {differing}"


TRAINER_ON_GPU = (
    TRAINER_RUNS
    + """
fp32 = ["--model.dtype", "float32"]
runs = (("torch", ["--kernels.backend", "torch", *fp32]),
        ("torch_exact", ["--kernels.backend", "torch", "--meta.dots", "exact", *fp32]),
        ("triton", ["--kernels.backend", "triton", *fp32]),
        ("triton_bf16_zero3", ["--kernels.backend", "triton", *zero3, *folded]))
"""
    + RUN_ALL
)


@pytest.mark.gpu
def test_gpu_trainer_one_pass_with_triton_matches_exact(tmp_path):
    """The trainer on CUDA (DeepSpeed over NCCL, a world of one), tiny Llama in fp32: ADAPT with the Triton backend
    (loss, ghost-dot and fused layer kernels) against the torch backend, the same losses, one-pass dots, validation
    losses and mixtures to fp32 tolerance; the same against the trainer's exact K-backward dots (meta.dots exact),
    the dots to the tolerance the CPU trainer test uses. Then the GPU default, bf16 (varlen flash
    attention), at ZeRO-3 with the dots folded into the weight gradients: the budget to the token, every fused
    layer, losses near fp32's."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", TRAINER_ON_GPU, str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = {name: metrics_rows(tmp_path / name) for name in ("torch", "torch_exact", "triton", "triton_bf16_zero3")}
    rows_match(runs["torch"], runs["triton"])
    assert rows_match(runs["torch_exact"], runs["triton"], dots_tol=1e-3) >= 2
    reports = {n: json.loads((tmp_path / n / "report.json").read_text()) for n in runs}
    assert reports["torch"]["kernels"] == {"backend": "torch", "fused_layers": {}}
    for name in ("triton", "triton_bf16_zero3"):
        assert reports[name]["kernels"] == {"backend": "triton", "fused_layers": TINY_LLAMA_FUSED}
        assert reports[name]["tokens_consumed"] == 3072
    bf16, fp32 = runs["triton_bf16_zero3"], runs["triton"]
    assert [r["tokens_consumed"] for r in bf16] == [r["tokens_consumed"] for r in fp32]
    assert [sorted(r) for r in bf16] == [sorted(r) for r in fp32]  # validation and mixture updates on the same steps
    pairs = [(a["loss"], b["loss"]) for a, b in zip(bf16, fp32, strict=True) if b["loss"] is not None]
    assert pairs and all(abs(x - y) <= 2e-2 * y for x, y in pairs)
