"""Benchmark the per-task ghost dot products of linear layers (CUDA, bf16), in TFLOP/s.

For each linear shape (out, in) and T tokens in K contiguous tasks, times per_task_ghost_dot (Triton) with
task_offsets and with task_ids, and the PyTorch reference, and compares with the measured rate of the bf16
matmul of the same shape, x (T, in) @ G^T (in, out). A ghost dot costs 2 * T * in * out FLOPs. Also times the
weight gradient delta^T x alone (the backward's matmul) and per_task_weight_grad, the same with the dots folded in.
Writes <out>/<gpu name>/ghost_dot.json and ghost_dot.md.

    python bench/ghost_dot.py [--tokens 16384 --tasks 8 --shapes 2048x2048,8192x2048,2048x8192 --out bench/results]

`--device cpu` (tiny sizes, TRITON_INTERPRET=1 for the Triton rows) checks the script itself, for tests.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout without install

from harness import add_run_options, device_name, median_ms, results_dir, run_device  # noqa: E402 (bench/ folder)


def bench_shape(
    n_out: int, n_in: int, offsets: torch.Tensor, task_ids: torch.Tensor, repeats: int, backend: str
) -> dict:
    from adapt_fast.kernels import per_task_ghost_dot, per_task_ghost_dot_reference, per_task_weight_grad

    T, K = task_ids.numel(), offsets.numel() - 1
    torch.manual_seed(0)
    device = task_ids.device
    x = torch.randn(T, n_in, device=device, dtype=torch.bfloat16)
    delta = torch.randn(T, n_out, device=device, dtype=torch.bfloat16)
    G = torch.randn(n_out, n_in, device=device, dtype=torch.bfloat16)
    runs = {
        "matmul": lambda: x @ G.T,
        "triton_offsets": lambda: per_task_ghost_dot(x, delta, G, task_offsets=offsets, backend=backend),
        "triton_ids": lambda: per_task_ghost_dot(x, delta, G, task_ids, K, backend=backend),
        "reference": lambda: per_task_ghost_dot_reference(x, delta, G, task_ids, K),
        # the weight gradient the backward computes anyway (delta^T x), and the same with the dots folded in
        "dweight_matmul": lambda: delta.T @ x,
        "dweight_with_dots": lambda: per_task_weight_grad(x, delta, G, offsets, backend=backend),
    }
    ms = {name: median_ms(fn, repeats=repeats) for name, fn in runs.items()}
    flops = 2 * T * n_in * n_out
    tflops = {name: flops / (t * 1e-3) / 1e12 for name, t in ms.items()}
    ours, ref = runs["triton_offsets"](), runs["reference"]()
    folded = runs["dweight_with_dots"]()[1]
    return dict(
        out=n_out,
        inp=n_in,
        tokens=T,
        ms=ms,
        tflops=tflops,
        fraction_of_matmul=tflops["triton_offsets"] / tflops["matmul"],
        rel_err_vs_reference=((ours - ref).norm() / ref.norm()).item(),
        # what the dots cost on top of the weight gradient: a separate kernel, or folded into the dW GEMM
        separate_dots_overhead=(ms["dweight_matmul"] + ms["triton_offsets"]) / ms["dweight_matmul"],
        folded_dots_overhead=ms["dweight_with_dots"] / ms["dweight_matmul"],
        folded_rel_err_vs_reference=((folded - ref).norm() / ref.norm()).item(),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--shapes", default="2048x2048,8192x2048,2048x8192", help="out x in of each linear layer")
    add_run_options(parser, repeats=20)
    args = parser.parse_args()
    device = run_device(args, "bench/ghost_dot.py")

    gpu = device_name(device)
    T, K = args.tokens, args.tasks
    offsets = torch.linspace(0, T, K + 1, device=device).long()
    task_ids = torch.repeat_interleave(torch.arange(K, device=device), offsets.diff())
    rows = []
    for shape in args.shapes.split(","):
        n_out, n_in = (int(v) for v in shape.lower().split("x"))
        rows.append(bench_shape(n_out, n_in, offsets, task_ids, args.repeats, backend="triton"))
        print(rows[-1], flush=True)

    date = time.strftime("%Y-%m-%d %H:%M:%S")
    result = dict(gpu=gpu, torch=torch.__version__, tasks=K, dtype="bfloat16", date=date, rows=rows)
    out_dir = results_dir(args.out, gpu)
    (out_dir / "ghost_dot.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# Per-task ghost dot products, {gpu}",
        "",
        f"T={T} tokens, K={K} tasks, bf16. TFLOP/s at 2*T*in*out FLOPs (ms in parentheses). "
        "Target: triton at >= 60% of the bf16 matmul rate.",
        "",
        "| out x in | bf16 matmul | triton (offsets) | triton (ids) | reference | dW matmul | dW with dots "
        "| triton / matmul | rel err |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        cells = [f"{r['tflops'][k]:.0f} ({r['ms'][k]:.2f})" for k in r["ms"]]
        shape = f"{r['out']}x{r['inp']}"
        lines.append(
            f"| {shape} | {' | '.join(cells)} | {r['fraction_of_matmul']:.0%} | {r['rel_err_vs_reference']:.1e} |"
        )
    lines += [
        "",
        "The weight gradient with the dots (time relative to the dW matmul alone): per_task_ghost_dot after it, or",
        "folded into it (kernels/weight_grad_ghost.py, not used by the trainer yet).",
        "",
        "| out x in | dW + separate dots | dW with dots folded in | folded dots rel err |",
        "|---|---:|---:|---:|",
        *(f"| {r['out']}x{r['inp']} | {r['separate_dots_overhead']:.2f}x | {r['folded_dots_overhead']:.2f}x | "
          f"{r['folded_rel_err_vs_reference']:.1e} |" for r in rows),
    ]  # fmt: skip
    (out_dir / "ghost_dot.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {out_dir}/ghost_dot.json and .md")


if __name__ == "__main__":
    main()
