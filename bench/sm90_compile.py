"""Compile every Triton kernel for Hopper (sm_90) on any machine, no GPU needed, and report what that costs none
of the device's time: registers per thread, stack (spilled) bytes, spill instructions, shared memory, and whether
the matrix products use Hopper's warpgroup MMA (HGMMA in the SASS) or an older path (HMMA).

    python bench/sm90_compile.py [--out bench/results/sm90_compile]

Each kernel is compiled with the tiles it launches with on CUDA (the _CUDA_CONFIG tables) for bf16 inputs (and
the FMA-path variants for fp32 inputs, _CUDA_CONFIG_FP32, whose products use no tensor cores; and the other tiles
the benchmarks' sweeps time, "sweep ..."), with
the argument specialisation a real launch gets (pointers, sizes and strides divisible by 16; the row count not).
A kernel that spills (stack > 0, STL/LDL in SASS) runs far under the matmul rate: fix its tiles before timing it.
Needs the ptxas/cuobjdump that ship with the triton wheel. Writes <out>.json and <out>.md.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import triton
from adapt_fast.kernels import gated_mlp as gated_module
from adapt_fast.kernels import ghost_dot as ghost_module
from adapt_fast.kernels import linear_cross_entropy as lce_module
from adapt_fast.kernels import norm as rms_norm_module
from adapt_fast.kernels import rotary as rope_module
from adapt_fast.kernels import weight_grad_ghost as weight_grad_module
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/: the benchmarks' tile sweeps
from ghost_dot import SWEEP_CUDA as GHOST_DOT_SWEEP  # noqa: E402
from loss_kernel import SWEEP_CUDA as LOSS_SWEEP  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
UNALIGNED = {"T", "C", "N", "n", "K", "Hq", "Hk"}  # row / element / head counts: any value; all else (sizes, strides,
FLOATS = {"softcap", "eps", "offset"}  # pointers) is 16-divisible; these scalars are fp32, every other one i32

# Pointer element types per kernel for a bf16 run (partials and scales are fp32); every other runtime argument
# is i32 except `softcap` (fp32).
KERNELS = {
    "logits": (lce_module._logits_kernel, dict(h_ptr="bf16", w_ptr="bf16", g_ptr="bf16", p_ptr="bf16")),
    "rows": (lce_module._rows_kernel, dict(h_ptr="bf16", w_ptr="bf16", g_ptr="bf16", labels_ptr="i64")),
    "dlogits": (lce_module._dlogits_kernel, dict(p_ptr="bf16", labels_ptr="i64")),
    "dhidden": (lce_module._dhidden_kernel, dict(dz_ptr="bf16", w_ptr="bf16", dh_ptr="bf16")),
    "dhidden split-K": (lce_module._dhidden_kernel, dict(dz_ptr="bf16", w_ptr="bf16", dh_ptr="fp32")),
    "dweight": (lce_module._dweight_kernel, dict(dz_ptr="bf16", h_ptr="bf16", dw_ptr="bf16")),
    "ghost_dot": (ghost_module._ghost_dot_kernel, dict(x_ptr="bf16", delta_ptr="bf16", g_ptr="bf16")),
    "weight_grad_ghost": (
        weight_grad_module._weight_grad_ghost_kernel,
        dict(x_ptr="bf16", delta_ptr="bf16", g_ptr="bf16", off_ptr="i32", dw_ptr="bf16"),
    ),
    "rms_norm forward": (rms_norm_module._rms_norm_forward_kernel, dict(x_ptr="bf16", w_ptr="bf16", y_ptr="bf16")),
    "rms_norm backward": (
        rms_norm_module._rms_norm_backward_kernel,
        dict(x_ptr="bf16", w_ptr="bf16", dy_ptr="bf16", dx_ptr="bf16"),
    ),
    "gated forward": (gated_module._gated_forward_kernel, dict(gate_ptr="bf16", up_ptr="bf16", y_ptr="bf16")),
    "gated backward": (
        gated_module._gated_backward_kernel,
        dict(gate_ptr="bf16", up_ptr="bf16", dy_ptr="bf16", dgate_ptr="bf16", dup_ptr="bf16"),
    ),
    "rope": (rope_module._rope_kernel, {f"{p}_ptr": "bf16" for p in ("q", "k", "cos", "sin", "qo", "ko")}),
}

# (report name, kernel, its _CUDA_CONFIG entry, extra constexprs); bf16 inputs unless the name says fp32.
LCE_CONFIG, LCE_FP32 = lce_module._CUDA_CONFIG, lce_module._CUDA_CONFIG_FP32
TILE_V = LCE_CONFIG["logits"]["BLOCK_V"]  # the dlogits kernel indexes the logits kernel's tiles
FP32 = dict(PRECISION="ieee")
NORM_TILES, LLAMA = rms_norm_module.cuda_tiles, dict(CAST_BEFORE_WEIGHT=True)
ROPE_TILES = dict(num_warps=rope_module.CUDA_NUM_WARPS, enable_fp_fusion=False)
VARIANTS = [
    ("logits", "logits", LCE_CONFIG["logits"], dict(HAS_SOFTCAP=False, HAS_GHOST=False)),
    ("logits softcap", "logits", LCE_CONFIG["logits"], dict(HAS_SOFTCAP=True, HAS_GHOST=False)),
    ("logits + ghost", "logits", LCE_CONFIG["logits_ghost"], dict(HAS_SOFTCAP=False, HAS_GHOST=True)),
    ("logits + ghost softcap", "logits", LCE_CONFIG["logits_ghost"], dict(HAS_SOFTCAP=True, HAS_GHOST=True)),
    ("rows", "rows", LCE_CONFIG["rows"], dict(HAS_SOFTCAP=False, HAS_GHOST=False, WRITE_TILE_SCALE=True)),
    ("rows + ghost softcap", "rows", LCE_CONFIG["rows"], dict(HAS_SOFTCAP=True, HAS_GHOST=True, WRITE_TILE_SCALE=True)),
    ("dlogits", "dlogits", LCE_CONFIG["dlogits"], dict(HAS_SOFTCAP=False, TILE_V=TILE_V)),
    ("dlogits softcap", "dlogits", LCE_CONFIG["dlogits"], dict(HAS_SOFTCAP=True, TILE_V=TILE_V)),
    ("dhidden", "dhidden", LCE_CONFIG["dhidden"], dict(SPLIT_K=False)),
    ("dhidden split-K", "dhidden split-K", LCE_CONFIG["dhidden"], dict(SPLIT_K=True)),
    ("dweight", "dweight", LCE_CONFIG["dweight"], {}),
    ("ghost_dot", "ghost_dot", ghost_module._CUDA_CONFIG, {}),
    ("fp32 logits softcap", "logits", LCE_FP32["logits"], dict(HAS_SOFTCAP=True, HAS_GHOST=False, **FP32)),
    ("fp32 logits + ghost softcap", "logits", LCE_FP32["logits_ghost"], dict(HAS_SOFTCAP=True, HAS_GHOST=True, **FP32)),
    ("fp32 dhidden split-K", "dhidden split-K", LCE_FP32["dhidden"], dict(SPLIT_K=True, **FP32)),
    ("fp32 dweight", "dweight", LCE_FP32["dweight"], FP32),
    ("fp32 ghost_dot", "ghost_dot", ghost_module._CUDA_CONFIG_FP32, FP32),
    ("weight_grad_ghost", "weight_grad_ghost", weight_grad_module._CUDA_CONFIG, {}),
    ("fp32 weight_grad_ghost", "weight_grad_ghost", weight_grad_module._CUDA_CONFIG_FP32, FP32),
    # the fused layers (elementwise and row reductions: no matrix products): Llama-3.2-1B's width, its q/k head width
    # (Qwen3's per-head norms) and 8192 in Gemma's form
    ("rms_norm forward H2048", "rms_norm forward", NORM_TILES(2048), LLAMA),
    ("rms_norm backward H2048", "rms_norm backward", NORM_TILES(2048, backward=True), LLAMA),
    ("rms_norm forward H128 q/k", "rms_norm forward", NORM_TILES(128), LLAMA),
    ("rms_norm backward H128 q/k", "rms_norm backward", NORM_TILES(128, backward=True), LLAMA),
    ("rms_norm forward H8192 gemma", "rms_norm forward", NORM_TILES(8192), {}),
    ("rms_norm backward H8192 gemma", "rms_norm backward", NORM_TILES(8192, backward=True), {}),
    *(
        (f"{name} {direction}", f"gated {direction}", dict(BLOCK=gated_module.CUDA_BLOCK), dict(ACTIVATION=activation))
        for name, activation in (("swiglu", 0), ("geglu", 1))
        for direction in ("forward", "backward")
    ),
    # RoPE at head_dim 64 (Llama-3.2-1B), 128 (Qwen3, Llama-3-8B) and 256 (Gemma 3), as launched: no FMA contraction
    *(
        (
            f"{dtype}rope {direction} D{D}",
            "rope",
            {**ROPE_TILES, "BLOCK_T": rope_module.cuda_block_t(D), "BLOCK_HALF": D // 2},
            dict(HALF=D // 2, BACKWARD=back),
        )
        for dtype, dims in (("", (64, 128, 256)), ("fp32 ", (256,)))
        for D in dims
        for direction, back in (("forward", False), ("backward", True))
    ),
]
# The other tiles bench/ghost_dot.py and bench/loss_kernel.py --sweep time on the GPU: none may spill either.
# d hidden as it runs at the benchmark's shape: split over the vocabulary (a 512-row chunk has too few row tiles).
SWEEP_KERNELS = {"logits": ("logits", dict(HAS_SOFTCAP=False, HAS_GHOST=False)),
                 "dhidden": ("dhidden split-K", dict(SPLIT_K=True)), "dweight": ("dweight", {})}  # fmt: skip
VARIANTS += [
    *((f"sweep ghost_dot {i}", "ghost_dot", tiles, {}) for i, tiles in enumerate(GHOST_DOT_SWEEP, 1)),
    *((f"sweep {kernel} {i}", SWEEP_KERNELS[kernel][0], tiles, SWEEP_KERNELS[kernel][1])
      for kernel, candidates in LOSS_SWEEP.items() for i, tiles in enumerate(candidates, 1)),
]  # fmt: skip
DEFAULT_CONSTEXPRS = dict(
    STORE_P=True, PRECISION="tf32", DOT_FP32=False, INTERPRET_BF16=False, CAST_BEFORE_WEIGHT=False, X_BF16=False,
    Y_BF16=False, BF16=False, OUT_BF16=False,
)  # fmt: skip


def compile_for_sm90(fn, pointer_types: dict, config: dict, constexprs: dict):
    """triton.compile for cuda sm_90 with a launch-like specialisation; returns the CompiledKernel."""
    config = dict(config)
    options = {k: config.pop(k) for k in ("num_warps", "num_stages", "enable_fp_fusion") if k in config}
    constants = {**DEFAULT_CONSTEXPRS, **constexprs, **config}
    names = fn.arg_names
    signature, attrs = {}, {}
    for i, (name, param) in enumerate(zip(names, fn.params, strict=True)):
        if param.is_constexpr:
            signature[name] = "constexpr"
            continue
        if name.endswith("_ptr"):
            signature[name] = "*" + pointer_types.get(name, "fp32")
        else:
            signature[name] = "fp32" if name in FLOATS else "i32"
        if signature[name] != "fp32" and name not in UNALIGNED:
            attrs[(i,)] = [["tt.divisibility", 16]]
    constants = {k: v for k, v in constants.items() if k in names}
    source = ASTSource(fn=fn, signature=signature, constexprs=constants, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)


def inspect_cubin(cubin: bytes) -> dict:
    """Registers, stack and shared bytes (cuobjdump's resource report) and SASS instruction counts."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        usage = subprocess.run([TOOLS / "cuobjdump", "--dump-resource-usage", f.name], capture_output=True, text=True)
        sass = subprocess.run([TOOLS / "cuobjdump", "-sass", f.name], capture_output=True, text=True)
    finally:
        os.unlink(f.name)
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage.stdout))
    ops = Counter(m.split(".")[0] for m in re.findall(r"\b(HGMMA|HMMA|LDL|STL|LDGSTS|UTMALDG|MUFU)\b", sass.stdout))
    return {
        "registers": int(fields.get("REG", -1)),
        "stack_bytes": int(fields.get("STACK", -1)),
        "static_shared_bytes": int(fields.get("SHARED", -1)),
        "hgmma": ops["HGMMA"],
        "hmma": ops["HMMA"],
        "spill_stores": ops["STL"],
        "spill_loads": ops["LDL"],
        "async_copies": ops["LDGSTS"] + ops["UTMALDG"],
    }


def markdown(rows: list[dict]) -> str:
    cols = ["kernel", "tiles", "warps", "stages", "registers", "stack_bytes", "shared_kib", "hgmma", "hmma", "spills"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        spills = r["spill_stores"] + r["spill_loads"]
        values = [r["kernel"], r["tiles"], r["num_warps"], r["num_stages"], r["registers"], r["stack_bytes"],
                  f"{r['shared_bytes'] / 1024:.0f}", r["hgmma"], r["hmma"], spills]  # fmt: skip
        lines.append("| " + " | ".join(str(v) for v in values) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "bench/results/sm90_compile"), help="output path without suffix")
    parser.add_argument("--only", default=None, help="compile only the variants whose name contains this")
    args = parser.parse_args()
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # fused multiply-add, the default of the device's Triton
    if not (TOOLS / "cuobjdump").exists():
        print(f"sm90_compile: {TOOLS / 'cuobjdump'} not found (the triton wheel ships it on x86-64 Linux)")
        return 2
    rows = []
    for name, kernel, config, constexprs in VARIANTS:
        if args.only and args.only not in name:
            continue
        fn, pointer_types = KERNELS[kernel]
        if name.startswith("fp32"):
            pointer_types = {k: "fp32" if v == "bf16" else v for k, v in pointer_types.items()}
        start = time.perf_counter()
        compiled = compile_for_sm90(fn, pointer_types, config, constexprs)
        row = {
            "kernel": name,
            "tiles": "x".join(str(v) for k, v in config.items() if k.startswith("BLOCK")),
            "num_warps": compiled.metadata.num_warps,
            "num_stages": compiled.metadata.num_stages,
            "shared_bytes": compiled.metadata.shared,
            **inspect_cubin(compiled.asm["cubin"]),
            "compile_s": round(time.perf_counter() - start, 1),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"triton": triton.__version__, "target": "cuda sm_90 (Hopper)", "dtype": "bf16", "kernels": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.json").write_text(json.dumps(result, indent=2) + "\n")  # not with_suffix: "triton3.6" has a dot
    table = markdown(rows)
    Path(f"{out}.md").write_text(f"Compiled for sm_90 with triton {triton.__version__} (no GPU), bf16.\n\n{table}")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
