"""Benchmark the per-task ghost dot products of linear layers (CUDA, bf16), in TFLOP/s.

For each linear shape (out, in) and T tokens in K contiguous tasks, times per_task_ghost_dot (Triton) with
task_offsets and with task_ids, and the PyTorch reference, and compares with the measured rate of the bf16
matmul of the same shape, x (T, in) @ G^T (in, out). A ghost dot costs 2 * T * in * out FLOPs. Also times the
weight gradient delta^T x alone (the backward's matmul) and per_task_weight_grad, the same with the dots folded in.
Then times the ghost-dot kernel at a few other tile configurations (the sweep; --no-sweep skips it), so that one GPU
run says which tiles to ship if the default misses its target. Writes <out>/<gpu name>/ghost_dot.json and .md.

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


# Tile configurations the sweep tries beside the kernel's default (kernels/ghost_dot.py, _CUDA_CONFIG; none spills on
# sm_90: bench/sm90_compile.py's "sweep" rows); under the interpreter (smoke runs) small ones, which check the sweep
# itself.
SWEEP_CUDA = [
    dict(BLOCK_T=128, BLOCK_OUT=128, BLOCK_IN=64, GROUP_T=8, num_warps=4, num_stages=4),
    dict(BLOCK_T=128, BLOCK_OUT=128, BLOCK_IN=64, GROUP_T=8, num_warps=8, num_stages=4),
    dict(BLOCK_T=256, BLOCK_OUT=128, BLOCK_IN=64, GROUP_T=8, num_warps=8, num_stages=4),
    dict(BLOCK_T=256, BLOCK_OUT=128, BLOCK_IN=32, GROUP_T=8, num_warps=8, num_stages=5),
    dict(BLOCK_T=128, BLOCK_OUT=128, BLOCK_IN=128, GROUP_T=8, num_warps=8, num_stages=3),
]
SWEEP_INTERPRETER = [
    dict(BLOCK_T=32, BLOCK_OUT=16, BLOCK_IN=16, GROUP_T=2),
    dict(BLOCK_T=16, BLOCK_OUT=64, BLOCK_IN=32, GROUP_T=1),
    dict(BLOCK_T=16, BLOCK_OUT=16, BLOCK_IN=12, GROUP_T=1),  # not a power of 2: the sweep records its error
]


def label(config: dict) -> str:
    """The config as BLOCK_T x BLOCK_OUT x BLOCK_IN, warps, stages: 256x128x64 w8 s3."""
    tiles = f"{config['BLOCK_T']}x{config['BLOCK_OUT']}x{config['BLOCK_IN']}"
    warps = f" w{config['num_warps']}" if "num_warps" in config else ""
    return tiles + warps + (f" s{config['num_stages']}" if "num_stages" in config else "")


def sweep_shape(n_out: int, n_in: int, offsets: torch.Tensor, configs: list[dict], repeats: int) -> dict:
    """{config label: TFLOP/s of per_task_ghost_dot, or the error that config ran into (e.g. out of resources)}, each
    config's dots checked against the reference first."""
    from adapt_fast.kernels import ghost_dot, per_task_ghost_dot, per_task_ghost_dot_reference

    T = int(offsets[-1])
    torch.manual_seed(1)
    x, delta = (torch.randn(T, n, device=offsets.device, dtype=torch.bfloat16) for n in (n_in, n_out))
    G = torch.randn(n_out, n_in, device=offsets.device, dtype=torch.bfloat16)
    ref = per_task_ghost_dot_reference(x, delta, G, task_offsets=offsets)
    rates = {}
    for config in configs:
        try:
            with swapped_tiles(ghost_dot, config):
                dots = per_task_ghost_dot(x, delta, G, task_offsets=offsets, backend="triton")
                err = ((dots - ref).norm() / ref.norm()).item()
                if not err < 1e-2:
                    raise ValueError(f"dots off the reference: rel err {err:.1e}")
                ms = median_ms(lambda: per_task_ghost_dot(x, delta, G, task_offsets=offsets, backend="triton"),
                               repeats=repeats)  # fmt: skip
            rates[label(config)] = 2 * T * n_in * n_out / (ms * 1e-3) / 1e12
        except Exception as e:  # a config the chip cannot hold (shared memory, registers): record it, go on
            rates[label(config)] = error_text(e, 160)
    return rates


def write_results(out_dir: Path, gpu: str, T: int, K: int, rows: list[dict], configs: list[dict]) -> None:
    """ghost_dot.json and .md; called again as the sweep goes, so a run stopped during it keeps what it measured."""
    date = time.strftime("%Y-%m-%d %H:%M:%S")
    result = dict(gpu=gpu, torch=torch.__version__, tasks=K, dtype="bfloat16", date=date, rows=rows)
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
    if configs:
        header = " | ".join(map(label, configs))
        lines += [
            "",
            "Tile sweep: the ghost-dot kernel's TFLOP/s at other tiles (BLOCK_T x BLOCK_OUT x BLOCK_IN, warps, stages; "
            "the first is the default).",
            "",
            f"| out x in | {header} |",
            "|---|" + "---:|" * len(configs),
        ]
        for r in rows:
            rates = [r.get("sweep", {}).get(label(config)) for config in configs]
            cells = ["not run" if v is None else f"{v:.0f}" if isinstance(v, float) else "failed" for v in rates]
            lines.append(f"| {r['out']}x{r['inp']} | " + " | ".join(cells) + " |")
    (out_dir / "ghost_dot.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--shapes", default="2048x2048,8192x2048,2048x8192", help="out x in of each linear layer")
    parser.add_argument("--no-sweep", dest="sweep", action="store_false", help="skip the tile sweep")
    add_run_options(parser, repeats=20)
    args = parser.parse_args()
    device = run_device(args, "bench/ghost_dot.py")

    gpu = device_name(device)
    out_dir = results_dir(args.out, gpu)
    T, K = args.tokens, args.tasks
    offsets = torch.linspace(0, T, K + 1, device=device).long()
    task_ids = torch.repeat_interleave(torch.arange(K, device=device), offsets.diff())
    rows = []
    for shape in args.shapes.split(","):
        n_out, n_in = (int(v) for v in shape.lower().split("x"))
        rows.append(bench_shape(n_out, n_in, offsets, task_ids, args.repeats, backend="triton"))
        print(rows[-1], flush=True)
        write_results(out_dir, gpu, T, K, rows, [])  # after each shape: a run stopped at its limit keeps them
    from adapt_fast.kernels import ghost_dot
    from adapt_fast.kernels.backend import interpret_mode

    configs = [default_tiles(ghost_dot), *(SWEEP_INTERPRETER if interpret_mode() else SWEEP_CUDA)] if args.sweep else []
    for row in rows if configs else []:
        row["sweep"] = sweep_shape(row["out"], row["inp"], offsets, configs, args.repeats)
        print({"sweep": (row["out"], row["inp"]), **row["sweep"]}, flush=True)
        write_results(out_dir, gpu, T, K, rows, configs)
    print((out_dir / "ghost_dot.md").read_text())
    print(f"wrote {out_dir}/ghost_dot.json and .md")


if __name__ == "__main__":
    main()
