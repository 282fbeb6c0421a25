"""Benchmark the fused linear + cross-entropy loss: forward+backward time and peak memory (CUDA, bf16).

At T tokens, hidden size H and vocabulary V (default 16384 x 2048 x 128256, the Llama 3.2 1B head) compares:

    torch_fp32_logits   logits materialised (bf16 GEMM), upcast to fp32, F.cross_entropy
    liger               Liger-Kernel's LigerFusedLinearCrossEntropyLoss
    cce                 Cut Cross-Entropy's cut_cross_entropy.linear_cross_entropy (its defaults: the backward
                        skips logit blocks whose |softmax - onehot| < 2^-12 everywhere, which depends on the data)
    cce_exact           the same with filter_eps=None: every block, exact gradients as all the others here
    ours                adapt_fast per_task_linear_cross_entropy, K tasks, token-mean weights
    ours_ghost          the same with ghost_weight (per-task head ghost dots: one more GEMM)
    ours_chunk2048      ours with 2048-token chunks (a 512 MiB buffer at V=128K, 4x the default): memory for speed
    floor_3gemm         3 GEMMs of 2*T*H*V FLOPs (logits, d hidden, d weight) at the measured bf16 matmul rate
                        (floor_4gemm: the same with the ghost GEMM)

Every method computes the mean token loss (labels -100 excluded) and the gradients of hidden and weight.
Peak memory is the peak allocated during one forward+backward minus what was allocated before it (inputs).
Writes <out>/<gpu name>/loss_kernel.json and loss_kernel.md, with the targets as ratios of the rows (ours no slower
than cce and within 1.3x the 3-GEMM floor, peak no more than liger's, ours_ghost within 1.45x ours) and, for ours
and ours_ghost, the milliseconds of each kernel in one step (torch.profiler), to show where the time goes.

    python bench/loss_kernel.py [--tokens 16384 --hidden 2048 --vocab 128256 --tasks 8 --out bench/results]

With --sweep it instead times `ours` with other tiles for its three GEMM kernels (logits, d hidden, d weight), one
kernel at a time, each run's loss and gradients checked against the default tiles' first, and writes
loss_kernel_sweep.json and .md: if the loss layer misses its targets, the same GPU run says which tiles to ship.

`--device cpu` (tiny sizes, TRITON_INTERPRET=1 for our rows) checks the script itself, for tests: wall-clock
times, no peak memory.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout without install

from harness import (  # noqa: E402 (bench/ folder)
    add_run_options,
    default_tiles,
    device_name,
    error_text,
    median_ms,
    results_dir,
    run_device,
    swapped_tiles,
)


def measure(step, warmup: int, repeats: int) -> tuple[float, float | None]:
    """Median milliseconds of step() and, on a GPU, its peak extra memory in GiB (over what was allocated
    before it)."""
    for _ in range(warmup):
        step()
    peak = None
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    return median_ms(step, warmup=0, repeats=repeats), peak


def matmul_tflops(m: int, n: int, k: int, device: torch.device, repeats: int = 20) -> float:
    """Measured bf16 TFLOP/s of a (m, k) x (k, n) GEMM."""
    a = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    b = torch.randn(k, n, device=device, dtype=torch.bfloat16)
    ms, _ = measure(lambda: a @ b, warmup=5, repeats=repeats)
    return 2 * m * n * k / (ms * 1e-3) / 1e12


def kernel_breakdown(step, device: torch.device) -> dict:
    """Milliseconds per GPU kernel name in one step() (torch.profiler's CUDA activity), largest first: where the
    time goes, without Nsight. On CPU (smoke runs) the ops' own CPU time instead. {"error": ...} where the
    profiler cannot read the device."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    kind = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
    try:
        with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
            step()
            if cuda:
                torch.cuda.synchronize()
        totals: dict[str, list] = {}
        for event in prof.events():
            if event.device_type == kind:
                name = event.name if len(event.name) <= 60 else event.name[:57] + "..."
                entry = totals.setdefault(name, [0.0, 0])
                entry[0] += (event.device_time_total if cuda else event.self_cpu_time_total) / 1e3  # us -> ms
                entry[1] += 1
    except Exception as e:  # CUPTI unavailable (e.g. a sandboxed GPU): the timings above still stand
        return {"error": error_text(e)}
    ranked = sorted(totals.items(), key=lambda kv: -kv[1][0])
    return {name: dict(ms=ms, launches=n) for name, (ms, n) in ranked}


def targets(rows: list[dict]) -> list[dict]:
    """The issue's targets (benchmarks, not tests) as ratios of this run's rows; None where a row is missing."""
    ms = {r["method"]: r["ms"] for r in rows}
    peak = {r["method"]: r["peak_gib"] for r in rows}

    def ratio(a, b):
        return a / b if a is not None and b else None

    checks = [
        ("ours time / cce time", ratio(ms.get("ours"), ms.get("cce")), 1.0),
        ("ours time / cce_exact time", ratio(ms.get("ours"), ms.get("cce_exact")), 1.0),
        ("ours time / 3-GEMM floor", ratio(ms.get("ours"), ms.get("floor_3gemm")), 1.3),
        ("ours peak / liger peak", ratio(peak.get("ours"), peak.get("liger")), 1.0),
        ("ours_ghost time / ours time", ratio(ms.get("ours_ghost"), ms.get("ours")), 1.45),
    ]
    return [dict(target=name, ratio=r, at_most=bound, met=None if r is None else r <= bound)
            for name, r, bound in checks]  # fmt: skip


def methods(num_tasks: int, ghost_weight: torch.Tensor):
    """name -> loss_fn(hidden, weight, labels, task_ids) or the reason it cannot run."""
    from adapt_fast.kernels import per_task_linear_cross_entropy

    def torch_fp32_logits(h, w, labels, task_ids):
        return F.cross_entropy((h @ w.T).float(), labels, ignore_index=-100)

    def ours(h, w, labels, task_ids, ghost=None, chunk_size=None):
        n = (labels != -100).sum().clamp_min(1).float()
        weights = torch.ones(num_tasks, device=h.device) / n
        return per_task_linear_cross_entropy(
            h, w, labels, task_ids, num_tasks, weights, ghost_weight=ghost, chunk_size=chunk_size, backend="triton"
        ).loss

    out = {"torch_fp32_logits": torch_fp32_logits}
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss()
        out["liger"] = lambda h, w, labels, task_ids: liger(w, h, labels)
    except ImportError:
        out["liger"] = "not installed"
    try:
        from cut_cross_entropy import linear_cross_entropy

        out["cce"] = lambda h, w, labels, task_ids: linear_cross_entropy(h, w, labels)
        out["cce_exact"] = lambda h, w, labels, task_ids: linear_cross_entropy(h, w, labels, filter_eps=None)
    except ImportError:
        out["cce"] = out["cce_exact"] = "not installed"
    out["ours"] = ours
    out["ours_ghost"] = lambda h, w, labels, task_ids: ours(h, w, labels, task_ids, ghost_weight)
    out["ours_chunk2048"] = lambda h, w, labels, task_ids: ours(h, w, labels, task_ids, chunk_size=2048)
    return out


# Tiles the sweep tries for each GEMM kernel of the loss layer beside its default (kernels/linear_cross_entropy.py,
# _CUDA_CONFIG); bench/sm90_compile.py checks that none spills on sm_90 (its "sweep" rows). Under the interpreter
# (smoke runs) small ones, and one that cannot compile, so that the sweep's own paths run.
SWEEP_CUDA = {
    "logits": [
        dict(BLOCK_T=128, BLOCK_V=128, BLOCK_H=64, num_warps=8, num_stages=4),
        dict(BLOCK_T=256, BLOCK_V=128, BLOCK_H=64, num_warps=8, num_stages=3),
        dict(BLOCK_T=128, BLOCK_V=256, BLOCK_H=64, num_warps=8, num_stages=4),
    ],
    "dhidden": [
        dict(BLOCK_T=128, BLOCK_H=256, BLOCK_V=64, num_warps=8, num_stages=3),
        dict(BLOCK_T=256, BLOCK_H=128, BLOCK_V=64, num_warps=8, num_stages=3),
        dict(BLOCK_T=128, BLOCK_H=128, BLOCK_V=64, num_warps=4, num_stages=4),
    ],
    "dweight": [
        dict(BLOCK_V=128, BLOCK_H=256, BLOCK_T=64, num_warps=8, num_stages=3),
        dict(BLOCK_V=256, BLOCK_H=128, BLOCK_T=64, num_warps=8, num_stages=3),
        dict(BLOCK_V=128, BLOCK_H=128, BLOCK_T=64, num_warps=4, num_stages=4),
    ],
}
SWEEP_INTERPRETER = {
    "logits": [dict(BLOCK_T=32, BLOCK_V=16, BLOCK_H=16), dict(BLOCK_T=16, BLOCK_V=32, BLOCK_H=12)],  # 12: fails
    "dhidden": [dict(BLOCK_T=32, BLOCK_H=16, BLOCK_V=16)],
    "dweight": [dict(BLOCK_V=16, BLOCK_H=32, BLOCK_T=32)],
}


def tiles_label(tiles: dict) -> str:
    """The tiles in the kernel's own names, with warps and stages: BLOCK_T=128 BLOCK_V=256 BLOCK_H=64 w8 s3."""
    blocks = " ".join(f"{k}={v}" for k, v in tiles.items() if k.startswith("BLOCK"))
    warps = f" w{tiles['num_warps']}" if "num_warps" in tiles else ""
    return blocks + warps + (f" s{tiles['num_stages']}" if "num_stages" in tiles else "")


def tile_sweep(inputs: tuple, num_tasks: int, warmup: int, repeats: int, write) -> list[dict]:
    """`ours` forward + backward with each kernel's sweep tiles; rows of kernel, tiles, ms (or error) and the
    largest relative difference of loss and gradients from the default tiles' run. write(rows) after each row."""
    from adapt_fast.kernels import linear_cross_entropy as lce
    from adapt_fast.kernels.backend import interpret_mode

    ours = methods(num_tasks, ghost_weight=None)["ours"]
    hidden, weight = inputs[0], inputs[1]

    def step() -> list[torch.Tensor]:
        loss = ours(*inputs)
        loss.backward()
        values = [loss.detach(), hidden.grad, weight.grad]
        hidden.grad = weight.grad = None
        return values

    def run() -> tuple[float, list[torch.Tensor]]:
        values = [v.float() for v in step()]  # the first call compiles the new tiles
        return measure(step, warmup, repeats)[0], values

    defaults = default_tiles(lce)
    sweep = SWEEP_INTERPRETER if interpret_mode() else SWEEP_CUDA
    ms, reference = run()
    rows = [dict(kernel="all", tiles="default", ms=ms, max_rel_diff=0.0, status="ok")]
    write(rows)
    for kernel, candidates in sweep.items():
        for tiles in [defaults[kernel], *candidates]:
            row = dict(kernel=kernel, tiles=tiles_label(tiles), ms=None, max_rel_diff=None)
            try:
                with swapped_tiles(lce, {**defaults, kernel: tiles}):
                    row["ms"], values = run()
                diffs = [((a - b).norm() / b.norm()).item() for a, b in zip(values, reference, strict=True)]
                row["max_rel_diff"] = max(diffs)
                row["status"] = "ok" if row["max_rel_diff"] < 1e-2 else "**differs from the default tiles**"
            except Exception as e:  # a tile the chip cannot hold (shared memory, registers): record it, go on
                hidden.grad = weight.grad = None
                row["status"] = error_text(e, 160)
            rows.append(row)
            write(rows)
            print(row, flush=True)
    return rows


def write_sweep(rows: list[dict], shape: str, out_dir: Path) -> None:
    (out_dir / "loss_kernel_sweep.json").write_text(json.dumps(dict(shape=shape, rows=rows), indent=2) + "\n")
    lines = [
        f"# Loss layer tile sweep ({shape})",
        "",
        "`ours` forward+backward with one kernel's tiles changed (the first row of each kernel is its default); "
        "relative difference of loss and gradients from the default tiles' run.",
        "",
        "| kernel | tiles | ms | rel diff | status |",
        "|---|---|---:|---:|---|",
    ]
    for r in rows:
        ms = "-" if r["ms"] is None else f"{r['ms']:.2f}"
        diff = "-" if r["max_rel_diff"] is None else f"{r['max_rel_diff']:.1e}"
        lines.append(f"| {r['kernel']} | {r['tiles']} | {ms} | {diff} | {r['status']} |")
    (out_dir / "loss_kernel_sweep.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--ignore-frac", type=float, default=0.0, help="fraction of labels set to -100 (prompts)")
    parser.add_argument(
        "--logit-std",
        type=float,
        default=1.0,
        help="std of the logits (head scale); larger: peaked softmax, more blocks CCE filters",
    )
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--sweep", action="store_true", help="time ours at other tiles instead (loss_kernel_sweep)")
    add_run_options(parser, repeats=10)
    args = parser.parse_args()
    device = run_device(args, "bench/loss_kernel.py")

    gpu = device_name(device)
    T, H, V, K = args.tokens, args.hidden, args.vocab, args.tasks
    torch.manual_seed(0)
    hidden = torch.randn(T, H, device=device, dtype=torch.bfloat16).requires_grad_()
    weight = (torch.randn(V, H, device=device) * args.logit_std * H**-0.5).to(torch.bfloat16).requires_grad_()
    ghost_weight = torch.randn(V, H, device=device, dtype=torch.bfloat16)
    labels = torch.randint(0, V, (T,), device=device)
    labels[torch.rand(T, device=device) < args.ignore_frac] = -100
    task_ids = torch.arange(T, device=device) * K // T  # K contiguous tasks
    if args.sweep:
        shape = f"{gpu}, T={T}, H={H}, V={V}, K={K}, bf16, logit std {args.logit_std:g}"
        out_dir = results_dir(args.out, gpu)
        tile_sweep((hidden, weight, labels, task_ids), K, args.warmup, args.repeats,
                   lambda rows: write_sweep(rows, shape, out_dir))  # fmt: skip
        print((out_dir / "loss_kernel_sweep.md").read_text())
        return

    rate = matmul_tflops(T, V, H, device)
    gemm_ms = 2 * T * H * V / (rate * 1e12) * 1e3
    rows = [
        dict(method="floor_3gemm", ms=3 * gemm_ms, peak_gib=None, loss=None, status="ok"),
        dict(method="floor_4gemm", ms=4 * gemm_ms, peak_gib=None, loss=None, status="ok"),
    ]
    result = dict(
        gpu=gpu,
        torch=torch.__version__,
        shape=dict(
            tokens=T,
            hidden=H,
            vocab=V,
            tasks=K,
            ignore_frac=args.ignore_frac,
            logit_std=args.logit_std,
            dtype="bfloat16",
        ),
        matmul_tflops=rate,
        date=time.strftime("%Y-%m-%d %H:%M:%S"),
        rows=rows,
        targets=targets(rows),
        kernels={},  # ours, ours_ghost: ms per kernel (per op on CPU) in one step
    )
    out_dir = results_dir(args.out, gpu)
    steps = {}  # ours, ours_ghost: profiled after every row is measured and written
    for name, fn in methods(K, ghost_weight).items():
        if isinstance(fn, str):
            rows.append(dict(method=name, ms=None, peak_gib=None, loss=None, status=fn))
            continue

        def step(fn=fn):  # the gradients are dropped at the end: they count in the peak, not in the base
            loss = fn(hidden, weight, labels, task_ids)
            loss.backward()
            hidden.grad = weight.grad = None
            return loss

        try:
            loss = step().item()
            ms, peak = measure(step, args.warmup, args.repeats)
            rows.append(dict(method=name, ms=ms, peak_gib=peak, loss=loss, status="ok"))
            steps[name] = step
        except Exception as e:  # an OOM or a version mismatch in a third-party package: record it, go on
            rows.append(dict(method=name, ms=None, peak_gib=None, loss=None, status=error_text(e)))
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(rows[-1], flush=True)
        result["targets"] = targets(rows)
        write_results(result, out_dir, device, echo=False)  # after each row: a run stopped at its limit keeps them

    write_results(result, out_dir, device)  # first without the profiles: a profiler that crashes loses nothing
    for name in ("ours", "ours_ghost"):
        if name in steps:
            result["kernels"][name] = kernel_breakdown(steps[name], device)
    write_results(result, out_dir, device)


def write_results(result: dict, out_dir: Path, device: torch.device, echo: bool = True) -> None:
    """<out_dir>/loss_kernel.json and loss_kernel.md (also printed, when `echo`)."""
    (out_dir / "loss_kernel.json").write_text(json.dumps(result, indent=2) + "\n")
    shape = result["shape"]
    lines = [
        f"# Fused linear cross-entropy, {result['gpu']}",
        "",
        f"T={shape['tokens']}, H={shape['hidden']}, V={shape['vocab']}, K={shape['tasks']}, bf16, ignored labels "
        f"{shape['ignore_frac']:.0%}, logit std {shape['logit_std']:g}; forward+backward; bf16 matmul "
        f"{result['matmul_tflops']:.0f} TFLOP/s.",
        "",
        "| method | ms | peak extra GiB | loss | status |",
        "|---|---:|---:|---:|---|",
    ]
    for r in result["rows"]:
        ms = f"{r['ms']:.2f}" if r["ms"] is not None else "-"
        peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "-"
        loss = f"{r['loss']:.4f}" if r["loss"] is not None else "-"
        lines.append(f"| {r['method']} | {ms} | {peak} | {loss} | {r['status']} |")
    lines += ["", "| target | ratio | at most | met |", "|---|---:|---:|---|"]
    for t in result["targets"]:
        ratio = f"{t['ratio']:.2f}" if t["ratio"] is not None else "-"
        met = {True: "yes", False: "**no**", None: "-"}[t["met"]]
        lines.append(f"| {t['target']} | {ratio} | {t['at_most']} | {met} |")
    for name, kernels in result["kernels"].items():
        lines += ["", f"{'Kernels' if device.type == 'cuda' else 'Ops'} of one `{name}` step (torch.profiler):", ""]
        if "error" in kernels:
            lines.append(f"profiler unavailable: {kernels['error']}")
            continue
        lines += ["| name | ms | launches |", "|---|---:|---:|"]
        lines += [f"| `{k}` | {v['ms']:.2f} | {v['launches']} |" for k, v in list(kernels.items())[:12]]
    (out_dir / "loss_kernel.md").write_text("\n".join(lines) + "\n")
    if echo:
        print("\n".join(lines))
        print(f"wrote {out_dir}/loss_kernel.json and .md", flush=True)


if __name__ == "__main__":
    main()
