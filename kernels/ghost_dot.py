"""Per-task ghost dot products of a linear layer (DESIGN.md section 2).

For a linear layer y = W x with output gradient delta_t = dL/dy_t, the weight gradient splits over tokens,
grad_W = sum_t delta_t x_t^T, so its inner product with any G of W's shape splits too:

    out[k] = <G, grad_W restricted to the tokens of task k> = sum_{t in task k} delta_t^T G x_t

computed without per-task gradients (K x out x in) and, in the Triton kernel, without any (T, out) tensor
beyond one tile: each program computes a (BLOCK_T, BLOCK_OUT) tile of x G^T in fp32 (a forward GEMM) and
reduces it against the matching tile of delta into one partial per row; the partials are then summed per task.
Cost: 2 * T * in * out FLOPs, one extra forward matmul.

Tasks are given per token (task_ids, ids outside [0, K) ignored) or as contiguous ranges (task_offsets (K+1,):
task k owns rows [off[k], off[k+1]), rows outside [off[0], off[K]) are ignored).
"""

import torch
import triton
import triton.language as tl

from .backend import interpret_mode, launchable, resolve_backend


def task_index(
    num_rows: int,
    device: torch.device,
    task_ids: torch.Tensor | None = None,
    num_tasks: int | None = None,
    task_offsets: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int]:
    """Per-row task ids (num_rows,) int64 and K, from task_ids or task_offsets; rows of no task get id -1."""
    if task_ids is not None:
        if num_tasks is None:
            if task_offsets is None:
                raise ValueError("per-task op: num_tasks is required with task_ids")
            num_tasks = task_offsets.numel() - 1
        if task_ids.shape != (num_rows,):
            raise ValueError(f"task_ids must have shape ({num_rows},), got {tuple(task_ids.shape)}")
        ids = task_ids.to(device=device, dtype=torch.int64)
        return torch.where((ids >= 0) & (ids < num_tasks), ids, -1), int(num_tasks)
    if task_offsets is None:
        raise ValueError("per-task op: give task_ids (with num_tasks) or task_offsets")
    offsets = task_offsets.to(device=device, dtype=torch.int64)
    k = offsets.numel() - 1
    if num_tasks is not None and num_tasks != k:
        raise ValueError(f"num_tasks={num_tasks} disagrees with task_offsets of length {k + 1}")
    rows = torch.arange(num_rows, device=device)
    ids = torch.searchsorted(offsets, rows, right=True) - 1  # task k owns [off[k], off[k+1])
    return torch.where((ids >= 0) & (ids < k), ids, -1), k


def _check(x: torch.Tensor, delta: torch.Tensor, G: torch.Tensor) -> None:
    if x.dim() != 2 or delta.dim() != 2 or G.dim() != 2:
        raise ValueError("per_task_ghost_dot: x (T, in), delta (T, out) and G (out, in) must be 2-D")
    if x.shape[0] != delta.shape[0] or G.shape != (delta.shape[1], x.shape[1]):
        raise ValueError(
            f"per_task_ghost_dot: shapes x {tuple(x.shape)}, delta {tuple(delta.shape)}, G {tuple(G.shape)} "
            "do not match x (T, in), delta (T, out), G (out, in)"
        )


def _sum_per_task(row_dots: torch.Tensor, ids: torch.Tensor, num_tasks: int) -> torch.Tensor:
    """(T,) fp32 row values summed into (K,) by task id; rows with id -1 are dropped (no host sync)."""
    out = torch.zeros(num_tasks, dtype=torch.float32, device=row_dots.device)
    keep = ids >= 0
    return out.index_add_(0, ids.clamp(min=0), torch.where(keep, row_dots, 0.0))


# ----------------------------------------------------------------------------------------------------------
# Reference (plain PyTorch)
# ----------------------------------------------------------------------------------------------------------


@torch.no_grad()
def per_task_ghost_dot_reference(
    x: torch.Tensor,
    delta: torch.Tensor,
    G: torch.Tensor,
    task_ids: torch.Tensor | None = None,
    num_tasks: int | None = None,
    task_offsets: torch.Tensor | None = None,
    *,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """(K,) fp32: out[k] = sum_{t in task k} delta_t^T G x_t, in fp32, chunked over T (chunk_size rows)."""
    _check(x, delta, G)
    T, out_features = delta.shape
    ids, K = task_index(T, x.device, task_ids, num_tasks, task_offsets)
    g32 = G.float()
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of tokens or None, got {chunk_size}")
    chunk = chunk_size or max(1, (1 << 24) // max(out_features, 1))  # (chunk, out) fp32 temporaries, 64 MiB
    row_dots = torch.empty(T, dtype=torch.float32, device=x.device)
    for s in range(0, T, chunk):
        e = min(s + chunk, T)
        row_dots[s:e] = ((x[s:e].float() @ g32.T) * delta[s:e].float()).sum(1)
    return _sum_per_task(row_dots, ids, K)


# ----------------------------------------------------------------------------------------------------------
# Triton
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _ghost_dot_kernel(
    x_ptr, delta_ptr, g_ptr, part_ptr, T, IN, OUT, stride_x, stride_delta, stride_g,
    PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_OUT: tl.constexpr, BLOCK_IN: tl.constexpr, GROUP_T: tl.constexpr,
):  # fmt: skip
    """Tile (BLOCK_T, BLOCK_OUT) of x G^T in fp32, reduced against delta: part[pid_o, t] = sum_o (G x_t)_o delta_to."""
    pid = tl.program_id(0)
    n_tblocks = tl.cdiv(T, BLOCK_T)
    n_oblocks = tl.cdiv(OUT, BLOCK_OUT)
    # Grouped ordering (Triton matmul tutorial): GROUP_T row blocks sweep the column blocks together, for L2 reuse.
    per_group = GROUP_T * n_oblocks
    first_t = (pid // per_group) * GROUP_T
    group_rows = tl.minimum(n_tblocks - first_t, GROUP_T)
    pid_t = first_t + (pid % per_group) % group_rows
    pid_o = (pid % per_group) // group_rows

    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_o = pid_o * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
    offs_i = tl.arange(0, BLOCK_IN)
    mask_t, mask_o = offs_t < T, offs_o < OUT
    x_ptrs = x_ptr + offs_t[:, None].to(tl.int64) * stride_x + offs_i[None, :]  # (BLOCK_T, BLOCK_IN)
    g_ptrs = g_ptr + offs_o[None, :].to(tl.int64) * stride_g + offs_i[:, None]  # (BLOCK_IN, BLOCK_OUT) of G^T
    acc = tl.zeros((BLOCK_T, BLOCK_OUT), dtype=tl.float32)
    for k in range(0, IN, BLOCK_IN):
        mask_i = offs_i + k < IN
        a = tl.load(x_ptrs, mask=mask_t[:, None] & mask_i[None, :], other=0.0)
        b = tl.load(g_ptrs, mask=mask_i[:, None] & mask_o[None, :], other=0.0)
        if DOT_FP32:  # the Triton interpreter's tl.dot multiplies bf16 bit patterns as integers
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        x_ptrs += BLOCK_IN
        g_ptrs += BLOCK_IN
    d_ptrs = delta_ptr + offs_t[:, None].to(tl.int64) * stride_delta + offs_o[None, :]
    d = tl.load(d_ptrs, mask=mask_t[:, None] & mask_o[None, :], other=0.0).to(tl.float32)
    tl.store(part_ptr + pid_o * T + offs_t, tl.sum(acc * d, axis=1), mask=mask_t)


# 256x128 tiles: 242 registers and no spills on sm_90 (bench/sm90_compile.py); 128x256 spilled the accumulator.
_CUDA_CONFIG = dict(BLOCK_T=256, BLOCK_OUT=128, BLOCK_IN=64, GROUP_T=8, num_warps=8, num_stages=3)
# fp32 inputs: FMA products, not tensor cores; 128x128x32 tiles take 240 registers, no spills (256x128 spilled).
_CUDA_CONFIG_FP32 = dict(BLOCK_T=128, BLOCK_OUT=128, BLOCK_IN=32, GROUP_T=8, num_warps=8, num_stages=3)
_INTERPRETER_CONFIG = dict(BLOCK_T=16, BLOCK_OUT=32, BLOCK_IN=16, GROUP_T=4)  # small: odd shapes hit every mask


@torch.no_grad()
def _ghost_dot_triton(x, delta, G, task_ids=None, num_tasks=None, task_offsets=None) -> torch.Tensor:
    _check(x, delta, G)
    if not (x.dtype == delta.dtype == G.dtype):
        raise ValueError("per_task_ghost_dot: x, delta and G must have the same dtype")
    T, out_features = delta.shape
    ids, K = task_index(T, x.device, task_ids, num_tasks, task_offsets)
    if T == 0:
        return torch.zeros(K, dtype=torch.float32, device=x.device)
    x, delta, G = x.contiguous(), delta.contiguous(), G.contiguous()
    if interpret_mode():
        cfg = _INTERPRETER_CONFIG
    else:
        cfg = _CUDA_CONFIG_FP32 if x.dtype == torch.float32 else _CUDA_CONFIG
    n_oblocks = triton.cdiv(out_features, cfg["BLOCK_OUT"])
    part = torch.empty(n_oblocks, T, dtype=torch.float32, device=x.device)
    launchable(_ghost_dot_kernel)[(triton.cdiv(T, cfg["BLOCK_T"]) * n_oblocks,)](
        x, delta, G, part, T, x.shape[1], out_features, x.stride(0), delta.stride(0), G.stride(0),
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        DOT_FP32=interpret_mode() and x.dtype == torch.bfloat16, **cfg,
    )  # fmt: skip
    return _sum_per_task(part.sum(dim=0), ids, K)


def per_task_ghost_dot(
    x: torch.Tensor,
    delta: torch.Tensor,
    G: torch.Tensor,
    task_ids: torch.Tensor | None = None,
    num_tasks: int | None = None,
    task_offsets: torch.Tensor | None = None,
    *,
    chunk_size: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """(K,) fp32 per-task ghost dot products: Triton on CUDA (backend="auto"), the reference elsewhere.

    chunk_size (rows per chunk) applies to the reference only; the Triton kernel holds one tile at a time.
    """
    if resolve_backend(backend, x.device) == "torch":
        return per_task_ghost_dot_reference(x, delta, G, task_ids, num_tasks, task_offsets, chunk_size=chunk_size)
    return _ghost_dot_triton(x, delta, G, task_ids, num_tasks, task_offsets)
