"""Benchmark the fused layer kernels against HF's eager layers and Liger-Kernel's (CUDA, bf16).

At Llama-3.2-1B's shapes for T tokens: RMSNorm (T, 2048), SwiGLU (T, 8192) and GEGLU (Gemma's, at the same
shape), and RoPE on q (32 heads) and k (8 heads)
of 64 in HF's layout ((B, T, H, D) transposed). Each layer runs as
  hf     transformers' own: LlamaRMSNorm, silu(gate) * up, gelu_pytorch_tanh(gate) * up,
         modeling_llama.apply_rotary_pos_emb;
  ours   adapt_fast.kernels rms_norm, swiglu, geglu, rope (backend triton), what kernels.fused_layers swaps in;
  liger  what TRL's use_liger_kernel swaps in: LigerRMSNorm, LigerSiLUMulFunction, LigerGELUMulFunction,
         liger_rotary_pos_emb
         (skipped when liger-kernel is not installed: `pip install .[bench]`).
Reports the median time of the forward and of forward + backward (torch.autograd.grad, so no gradient
accumulation is timed), the bandwidth that forward + backward reaches on the least traffic it needs (each
input and output read or written once), also as a fraction of a measured device-to-device copy's, the peak memory
it allocates, and each output's relative error against hf's. Writes <out>/<gpu name>/layer_kernels.json and .md.

    python bench/layer_kernels.py [--tokens 16384 --out bench/results]

`--device cpu` (tiny sizes, TRITON_INTERPRET=1 for ours) checks the script itself, for tests.
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout without install

from harness import (  # noqa: E402 (bench/ folder)
    add_run_options,
    copy_gb_per_s,
    device_name,
    error_text,
    median_ms,
    results_dir,
    run_device,
)

EPS = 1e-5


def hf_layers() -> dict:
    from transformers.activations import ACT2FN
    from transformers.models.llama import modeling_llama

    apply_rope = modeling_llama.apply_rotary_pos_emb
    apply_rope = getattr(apply_rope, "adapt_fast_original", apply_rope)  # HF's own, also if fused_layers ran here
    silu, gelu_tanh = ACT2FN["silu"], ACT2FN["gelu_pytorch_tanh"]

    norm = modeling_llama.LlamaRMSNorm(1, eps=EPS)  # its forward, run with the benchmark's weight:

    def rms_norm(x, w):
        return torch.func.functional_call(norm, {"weight": w}, (x,))  # w itself: its gradient is timed

    return {
        "rms_norm": rms_norm,
        "swiglu": lambda gate, up: silu(gate) * up,
        "geglu": lambda gate, up: gelu_tanh(gate) * up,
        "rope": apply_rope,
    }


def our_layers() -> dict:
    from adapt_fast.kernels import geglu, rms_norm, rope, swiglu

    return {
        "rms_norm": lambda x, w: rms_norm(x, w, EPS, backend="triton"),
        "swiglu": lambda gate, up: swiglu(gate, up, backend="triton"),
        "geglu": lambda gate, up: geglu(gate, up, backend="triton"),
        "rope": lambda q, k, cos, sin: rope(q, k, cos, sin, backend="triton"),
    }


def liger_layers() -> dict | None:
    try:
        from liger_kernel.ops.geglu import LigerGELUMulFunction
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction
        from liger_kernel.transformers.rope import liger_rotary_pos_emb
    except ImportError:
        return None
    return {  # LigerRMSNorm's defaults: offset 0, Llama casting, the gradient written over dy (in place)
        "rms_norm": lambda x, w: LigerRMSNormFunction.apply(x, w, EPS, 0.0, "llama", True),
        "swiglu": LigerSiLUMulFunction.apply,
        "geglu": LigerGELUMulFunction.apply,
        "rope": liger_rotary_pos_emb,
    }


def layer_inputs(args, device: torch.device) -> dict:
    """name -> (differentiable inputs, constant inputs, least bytes forward + backward move)."""
    T, H, I, Hq, Hk, D = args.tokens, args.hidden, args.intermediate, args.heads, args.kv_heads, args.head_dim
    bf16 = dict(device=device, dtype=torch.bfloat16)
    torch.manual_seed(0)
    x, w = torch.randn(1, T, H, **bf16), (torch.randn(H, **bf16) * 0.1 + 1)
    gate, up = torch.randn(T, I, **bf16), torch.randn(T, I, **bf16)
    q, k = (torch.randn(1, T, heads, D, **bf16).transpose(1, 2) for heads in (Hq, Hk))
    angles = torch.arange(T, device=device)[:, None] / 10000 ** (torch.arange(D // 2, device=device) / (D // 2))
    angles = torch.cat((angles, angles), -1)[None]
    cos, sin = angles.cos().bfloat16(), angles.sin().bfloat16()
    b = 2  # bytes per bf16 value
    return {
        "rms_norm": ((x, w), (), b * T * H * (2 + 3)),  # forward: x in, y out; backward: x, dy in, dx out
        "swiglu": ((gate, up), (), b * T * I * (3 + 5)),  # forward: 2 in, 1 out; backward: 3 in, 2 out
        "geglu": ((gate, up), (), b * T * I * (3 + 5)),
        "rope": ((q, k), (cos, sin), b * T * D * ((Hq + Hk) * 4 + 4)),  # q, k in and out, each way; cos, sin twice
    }


def bench_layer(fn, inputs: tuple, constants: tuple, repeats: int, device: torch.device) -> dict:
    """Times and peak memory of fn on `inputs`, and its outputs and input gradients for the error columns. Liger's
    kernels write over their inputs and output gradients: the values checked come from a run on fresh copies,
    cloned as soon as they exist; the timed runs reuse one set, whose values then drift (elementwise kernels' times
    do not depend on them)."""

    def run(leaves: list) -> tuple:
        out = fn(*leaves, *constants)
        return out if isinstance(out, tuple) else (out,)

    fresh = [t.detach().clone().requires_grad_() for t in inputs]
    outputs = run(fresh)
    checked = [o.detach().clone() for o in outputs]
    torch.manual_seed(1)  # the same output gradients for every stack
    grads = [torch.randn_like(o) for o in outputs]
    checked += [g.clone() for g in torch.autograd.grad(outputs, fresh, [g.clone() for g in grads])]
    leaves = [t.detach().clone().requires_grad_() for t in inputs]

    def forward():
        return run(leaves)

    def forward_backward():
        return torch.autograd.grad(forward(), leaves, grads)

    with torch.no_grad():
        forward_ms = median_ms(forward, repeats=repeats)
    total_ms = median_ms(forward_backward, repeats=repeats)
    peak_mib = None
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        forward_backward()
        torch.cuda.synchronize()
        peak_mib = (torch.cuda.max_memory_allocated() - base) / 2**20
    return {"forward_ms": forward_ms, "forward_backward_ms": total_ms, "peak_mib": peak_mib,
            "outputs": checked}  # fmt: skip


def max_rel_err(tensors: list[torch.Tensor], references: list[torch.Tensor]) -> float:
    """The largest norm-wise relative error of tensors against references; nan if any is nan."""
    errors = [((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()
              for a, b in zip(tensors, references, strict=True)]  # fmt: skip
    return math.nan if any(math.isnan(e) for e in errors) else max(errors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=8192)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    add_run_options(parser, repeats=20)
    args = parser.parse_args()
    device = run_device(args, "bench/layer_kernels.py")

    gpu = device_name(device)
    stacks = {"hf": hf_layers(), "ours": our_layers(), "liger": liger_layers()}
    copy_rate = copy_gb_per_s(device)
    rows = []
    for layer, (inputs, constants, least_bytes) in layer_inputs(args, device).items():
        results = {}
        for stack, layers in stacks.items():
            if layers is None:
                rows.append(dict(layer=layer, stack=stack, status="liger-kernel not installed"))
                continue
            try:
                results[stack] = bench_layer(layers[layer], inputs, constants, args.repeats, device)
            except Exception as error:  # noqa: BLE001 (a failing stack is a result, the others still run)
                rows.append(dict(layer=layer, stack=stack, status="error: " + error_text(error, 290)))
                continue
            r = results[stack]
            rows.append(dict(
                layer=layer, stack=stack, status="ok", forward_ms=r["forward_ms"],
                forward_backward_ms=r["forward_backward_ms"], peak_mib=r["peak_mib"],
                gb_per_s=least_bytes / (r["forward_backward_ms"] * 1e-3) / 1e9,
                fraction_of_copy=least_bytes / (r["forward_backward_ms"] * 1e-3) / 1e9 / copy_rate,
                speedup_vs_hf=(results["hf"]["forward_backward_ms"] / r["forward_backward_ms"]) if "hf" in results
                else None,
                max_rel_err_vs_hf=max_rel_err(r["outputs"], results["hf"]["outputs"]) if "hf" in results else None,
            ))  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
        write_results(args, gpu, copy_rate, rows)  # after each layer: a run stopped at its limit keeps them
    print((results_dir(args.out, gpu) / "layer_kernels.md").read_text())
    print(f"wrote {results_dir(args.out, gpu)}/layer_kernels.json and .md")


def write_results(args: argparse.Namespace, gpu: str, copy_rate: float, rows: list[dict]) -> None:
    """<out>/<gpu>/layer_kernels.json and .md."""
    date = time.strftime("%Y-%m-%d %H:%M:%S")
    shapes = dict(tokens=args.tokens, hidden=args.hidden, intermediate=args.intermediate, heads=args.heads,
                  kv_heads=args.kv_heads, head_dim=args.head_dim)  # fmt: skip
    result = dict(gpu=gpu, torch=torch.__version__, dtype="bfloat16", date=date, shapes=shapes,
                  copy_gb_per_s=copy_rate, rows=rows)  # fmt: skip
    out_dir = results_dir(args.out, gpu)
    (out_dir / "layer_kernels.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# Layer kernels, {gpu}",
        "",
        f"Llama-3.2-1B shapes, T={args.tokens} tokens, bf16: RMSNorm (T, {args.hidden}), SwiGLU and GEGLU (T, "
        f"{args.intermediate}), RoPE on {args.heads} + {args.kv_heads} heads of {args.head_dim}. Bandwidth: the least "
        f"bytes forward + backward move, over its time; of copy: that over a device-to-device copy's {copy_rate:.0f} "
        "GB/s. Errors: largest relative error of an output or gradient against hf's.",
        "",
        "| layer | stack | forward ms | fwd + bwd ms | GB/s | of copy | vs hf | peak MiB | rel err vs hf |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['layer']} | {r['stack']} | {r['status']} | | | | | | |")
            continue
        peak = "" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        speedup = "-" if r["speedup_vs_hf"] is None else f"{r['speedup_vs_hf']:.2f}x"  # hf's own run failed
        err = "-" if r["max_rel_err_vs_hf"] is None else f"{r['max_rel_err_vs_hf']:.1e}"
        lines.append(
            f"| {r['layer']} | {r['stack']} | {r['forward_ms']:.3f} | {r['forward_backward_ms']:.3f} | "
            f"{r['gb_per_s']:.0f} | {r['fraction_of_copy']:.0%} | {speedup} | {peak} | {err} |"
        )
    (out_dir / "layer_kernels.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
