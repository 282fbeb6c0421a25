"""A linear layer's weight gradient with the per-task ghost dots folded in (DESIGN.md section 2, "nearly free").

    dW = delta^T x  (out, in),      dots[k] = <G, delta_k^T x_k> = sum_{t in task k} delta_t^T G x_t

for tokens grouped by task (task k owns rows [off[k], off[k+1]); rows outside [off[0], off[K]) count in dW only).
Each program owns a (BLOCK_OUT, BLOCK_IN) tile of dW and reduces over the tokens task by task: a task's partial
tile is dotted with the matching G tile once, when its rows end, then added to the tile's total. Against the weight
gradient alone this adds one read of the G tile and one (BLOCK_OUT, BLOCK_IN) multiply-add per task and tile, where
per_task_ghost_dot adds a whole extra GEMM (2 * T * in * out FLOPs). The trainer does not use it yet:
bench/ghost_dot.py times it against the weight-gradient GEMM alone and plus per_task_ghost_dot.
"""

import torch
import triton
import triton.language as tl

from .backend import interpret_mode, launchable, resolve_backend
from .ghost_dot import _check, per_task_ghost_dot_reference
from .linear_cross_entropy import _round_bf16


def _check_offsets(task_offsets: torch.Tensor) -> None:
    if task_offsets.dim() != 1 or task_offsets.numel() < 2:
        raise ValueError("per_task_weight_grad: task_offsets must be (K+1,) with K >= 1")


@torch.no_grad()
def per_task_weight_grad_reference(
    x: torch.Tensor, delta: torch.Tensor, G: torch.Tensor, task_offsets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dW (out, in) in x's dtype, accumulated in fp32; dots (K,) fp32)."""
    _check(x, delta, G)
    _check_offsets(task_offsets)
    dW = (delta.float().T @ x.float()).to(x.dtype)
    return dW, per_task_ghost_dot_reference(x, delta, G, task_offsets=task_offsets)


@triton.jit
def _weight_grad_ghost_kernel(
    x_ptr, delta_ptr, g_ptr, off_ptr, dw_ptr, part_ptr, T, IN, OUT, K, stride_x, stride_delta, stride_g, stride_dw,
    PRECISION: tl.constexpr, DOT_FP32: tl.constexpr, OUT_BF16: tl.constexpr,
    BLOCK_OUT: tl.constexpr, BLOCK_IN: tl.constexpr, BLOCK_T: tl.constexpr, GROUP_OUT: tl.constexpr,
):  # fmt: skip
    """One (BLOCK_OUT, BLOCK_IN) tile of dW over the K + 2 row segments [0, off[0]), [off[0], off[1]), ...,
    [off[K], T); part[pid, k] = <G tile, segment k+1's partial tile> for the K task segments."""
    pid = tl.program_id(0)
    n_oblocks, n_iblocks = tl.cdiv(OUT, BLOCK_OUT), tl.cdiv(IN, BLOCK_IN)
    per_group = GROUP_OUT * n_iblocks  # tiles in row-major groups of GROUP_OUT out-blocks: G and delta stay in L2
    first_o = (pid // per_group) * GROUP_OUT
    group_size = min(n_oblocks - first_o, GROUP_OUT)
    pid_o = first_o + (pid % per_group) % group_size
    pid_i = (pid % per_group) // group_size

    offs_o = pid_o * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
    offs_i = pid_i * BLOCK_IN + tl.arange(0, BLOCK_IN)
    mask_o, mask_i = offs_o < OUT, offs_i < IN
    total = tl.zeros((BLOCK_OUT, BLOCK_IN), dtype=tl.float32)
    for s in range(0, K + 2):
        start = tl.load(off_ptr + s - 1, mask=s > 0, other=0)
        end = tl.load(off_ptr + s, mask=s <= K, other=T)
        part = tl.zeros((BLOCK_OUT, BLOCK_IN), dtype=tl.float32)
        for t0 in range(start, end, BLOCK_T):
            rows = t0 + tl.arange(0, BLOCK_T)
            mask_t = rows < end
            rows64 = rows.to(tl.int64)
            d = tl.load(
                delta_ptr + rows64[None, :] * stride_delta + offs_o[:, None],
                mask=mask_o[:, None] & mask_t[None, :],
                other=0.0,
            )  # (BLOCK_OUT, BLOCK_T) of delta^T
            x = tl.load(x_ptr + rows64[:, None] * stride_x + offs_i[None, :],
                        mask=mask_t[:, None] & mask_i[None, :], other=0.0)  # (BLOCK_T, BLOCK_IN)  # fmt: skip
            if DOT_FP32:  # the interpreter's bf16 dot: in fp32 on the same values
                d, x = d.to(tl.float32), x.to(tl.float32)
            part = tl.dot(d, x, part, input_precision=PRECISION)
        if (s >= 1) & (s <= K):
            g = tl.load(g_ptr + offs_o[:, None].to(tl.int64) * stride_g + offs_i[None, :],
                        mask=mask_o[:, None] & mask_i[None, :], other=0.0).to(tl.float32)  # fmt: skip
            tl.store(part_ptr + pid.to(tl.int64) * K + s - 1, tl.sum(tl.sum(part * g, axis=1), axis=0))
        total += part
    out = _round_bf16(total, OUT_BF16).to(dw_ptr.dtype.element_ty)
    tl.store(dw_ptr + offs_o[:, None].to(tl.int64) * stride_dw + offs_i[None, :], out,
             mask=mask_o[:, None] & mask_i[None, :])  # fmt: skip


# Two fp32 accumulator tiles (the total and the task's part). bf16 128x64x64 with 8 warps: about 170 registers on
# sm_90, no spills with triton 3.9 and 3.6 (bench/sm90_compile.py); 128x128 spilled with 3.6. fp32 (FMA products)
# 64x128x16: 175-188, where 64x128x32 spilled.
_CUDA_CONFIG = dict(BLOCK_OUT=128, BLOCK_IN=64, BLOCK_T=64, GROUP_OUT=8, num_warps=8, num_stages=3)
_CUDA_CONFIG_FP32 = dict(BLOCK_OUT=64, BLOCK_IN=128, BLOCK_T=16, GROUP_OUT=8, num_warps=8, num_stages=3)
_INTERPRETER_CONFIG = dict(BLOCK_OUT=32, BLOCK_IN=16, BLOCK_T=16, GROUP_OUT=2)  # small: odd shapes hit every mask


@torch.no_grad()
def _weight_grad_triton(x, delta, G, task_offsets) -> tuple[torch.Tensor, torch.Tensor]:
    _check(x, delta, G)
    _check_offsets(task_offsets)
    if not (x.dtype == delta.dtype == G.dtype):
        raise ValueError("per_task_weight_grad: x, delta and G must have the same dtype")
    T, n_in = x.shape
    n_out, K = delta.shape[1], task_offsets.numel() - 1
    x, delta, G = x.contiguous(), delta.contiguous(), G.contiguous()
    offsets = task_offsets.to(device=x.device, dtype=torch.int32).contiguous()
    if interpret_mode():
        cfg = _INTERPRETER_CONFIG
    else:
        cfg = _CUDA_CONFIG_FP32 if x.dtype == torch.float32 else _CUDA_CONFIG
    n_programs = triton.cdiv(n_out, cfg["BLOCK_OUT"]) * triton.cdiv(n_in, cfg["BLOCK_IN"])
    dW = torch.empty(n_out, n_in, dtype=x.dtype, device=x.device)
    part = torch.zeros(n_programs, K, dtype=torch.float32, device=x.device)
    launchable(_weight_grad_ghost_kernel)[(n_programs,)](
        x, delta, G, offsets, dW, part, T, n_in, n_out, K, x.stride(0), delta.stride(0), G.stride(0), dW.stride(0),
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        DOT_FP32=interpret_mode() and x.dtype == torch.bfloat16,
        OUT_BF16=interpret_mode() and x.dtype == torch.bfloat16, **cfg,
    )  # fmt: skip
    return dW, part.sum(0)


def per_task_weight_grad(
    x: torch.Tensor, delta: torch.Tensor, G: torch.Tensor, task_offsets: torch.Tensor, *, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dW = delta^T x (out, in) in x's dtype, fp32 accumulation; (K,) fp32 per-task ghost dots) for x (T, in),
    delta (T, out), G (out, in) and task_offsets (K+1,) (tokens grouped by task): the Triton kernel on CUDA
    (backend="auto"), the reference elsewhere."""
    if resolve_backend(backend, x.device) == "torch":
        return per_task_weight_grad_reference(x, delta, G, task_offsets)
    return _weight_grad_triton(x, delta, G, task_offsets)
