"""RMSNorm, fused: one read of x and one write of y in the forward, one pass over (x, dy) in the backward.

    y = (x * rstd) (.) (offset + w),     rstd = 1 / sqrt(mean(x^2) + eps)   per row of x (..., H)

in fp32, with the rounding of the model it stands in for (`cast_before_weight`):
  * True  (Llama, Qwen, Mistral): the normalised x is rounded to x's dtype first, then multiplied by w in the
    result dtype (HF: `weight * hidden_states.to(input_dtype)`); offset is 0;
  * False (Gemma 3, offset 1): the product is formed in fp32 and rounded once (HF: `(x * (1 + w.float())).type_as(x)`).
The backward takes the exact gradient of the fp32 formula (the rounding is not differentiated, as in HF's own
autograd up to its intermediate roundings): with g = dy (.) (offset + w) and xh = x * rstd,

    dx = rstd * (g - xh * mean(g (.) xh)),      dw = sum over rows of dy (.) xh

dw is summed per program over its rows in fp32 and the partials then over programs. HF's eager RMSNorm runs about
seven kernels and keeps their fp32 intermediates for its backward; this keeps x and the (rows,) rstd only.
"""

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from .backend import interpret_mode, launchable, resolve_backend
from .linear_cross_entropy import _round_bf16


@triton.jit
def _rms_norm_forward_kernel(
    x_ptr, w_ptr, y_ptr, rstd_ptr, N, H, stride_x, stride_y, eps, offset,
    CAST_BEFORE_WEIGHT: tl.constexpr, X_BF16: tl.constexpr, Y_BF16: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_H: tl.constexpr,
):  # fmt: skip
    """Rows [pid * BLOCK_R, (pid + 1) * BLOCK_R) of y and rstd; BLOCK_H >= H holds a whole row. X_BF16 / Y_BF16:
    the interpreter runs and x / y is bf16 (its casts truncate: round first, see _round_bf16)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_H)
    mask_r, mask_h = rows < N, cols < H
    mask = mask_r[:, None] & mask_h[None, :]
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / H + eps)
    xh = x * rstd[:, None]
    w = tl.load(w_ptr + cols, mask=mask_h, other=0.0).to(tl.float32) + offset
    if CAST_BEFORE_WEIGHT:  # x's dtype first, then the product in y's dtype (exact in fp32, rounded once)
        xh = _round_bf16(xh, X_BF16).to(x_ptr.dtype.element_ty).to(tl.float32)
    y = _round_bf16(xh * w[None, :], Y_BF16).to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + rows[:, None].to(tl.int64) * stride_y + cols[None, :], y, mask=mask)
    tl.store(rstd_ptr + rows, rstd, mask=mask_r)


@triton.jit
def _rms_norm_backward_kernel(
    x_ptr, w_ptr, dy_ptr, rstd_ptr, dx_ptr, dw_part_ptr, N, H, stride_x, stride_dy, stride_dx, offset,
    CAST_BEFORE_WEIGHT: tl.constexpr, X_BF16: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    """dx (x's dtype) for the row blocks pid, pid + P, pid + 2P, ... (P programs), and this program's partial dw
    (H,) in fp32."""
    pid, n_programs = tl.program_id(0), tl.num_programs(0)
    cols = tl.arange(0, BLOCK_H)
    mask_h = cols < H
    w = tl.load(w_ptr + cols, mask=mask_h, other=0.0).to(tl.float32) + offset
    dw = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for start in range(pid * BLOCK_R, N, n_programs * BLOCK_R):
        rows = start + tl.arange(0, BLOCK_R)
        mask_r = rows < N
        mask = mask_r[:, None] & mask_h[None, :]
        rows64 = rows[:, None].to(tl.int64)
        x = tl.load(x_ptr + rows64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + rows64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=mask_r, other=0.0)
        xh = x * rstd[:, None]
        g = dy * w[None, :]
        dx = rstd[:, None] * (g - xh * (tl.sum(g * xh, axis=1) / H)[:, None])
        dx = _round_bf16(dx, X_BF16).to(dx_ptr.dtype.element_ty)
        tl.store(dx_ptr + rows64 * stride_dx + cols[None, :], dx, mask=mask)
        if CAST_BEFORE_WEIGHT:  # the weight multiplied the rounded xh
            xh = _round_bf16(xh, X_BF16).to(x_ptr.dtype.element_ty).to(tl.float32)
        dw += tl.sum(dy * xh, axis=0)
    tl.store(dw_part_ptr + pid.to(tl.int64) * H + cols, dw, mask=mask_h)


def cuda_tiles(H: int, backward: bool = False) -> dict:
    """BLOCK_R whole rows per program. Forward: about 8k values per program. Backward (more live values per element):
    about 2k, at most 8-16 per thread, which keeps it near 64 registers on sm_90 (4 row-blocks of 4 x 2048 took
    159, one program per SM); bench/sm90_compile.py compiles both."""
    block_h = triton.next_power_of_2(H)
    if backward:
        block_r = max(1, min(16, 2048 // block_h))
        return dict(BLOCK_R=block_r, BLOCK_H=block_h, num_warps=max(4, min(16, block_r * block_h // 256)))
    num_warps = 16 if block_h >= 8192 else 8 if block_h >= 2048 else 4
    return dict(BLOCK_R=max(1, min(16, 8192 // block_h)), BLOCK_H=block_h, num_warps=num_warps)


def _config(H: int, N: int, backward: bool = False) -> tuple[int, int, int, int]:
    """(BLOCK_R, BLOCK_H, num_warps, backward programs): the CUDA tiles, or in the interpreter (which runs programs
    one after another) fewer, larger programs of about 2k values."""
    if interpret_mode():
        block_h = triton.next_power_of_2(H)
        block_r = max(1, min(16, 2048 // block_h))
        return block_r, block_h, 4, max(1, min(4, triton.cdiv(N, block_r)))
    tiles = cuda_tiles(H, backward)
    programs = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count * 4
    block_r = tiles["BLOCK_R"]
    return block_r, tiles["BLOCK_H"], tiles["num_warps"], max(1, min(programs, triton.cdiv(N, block_r)))


def _result_dtype(x: torch.Tensor, weight: torch.Tensor, cast_before_weight: bool) -> torch.dtype:
    return torch.promote_types(x.dtype, weight.dtype) if cast_before_weight else x.dtype


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, offset, cast_before_weight):
        H = x.shape[-1]
        x2 = x.reshape(-1, H)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        N = x2.shape[0]
        y = torch.empty(N, H, dtype=_result_dtype(x, weight, cast_before_weight), device=x.device)
        rstd = torch.empty(N, dtype=torch.float32, device=x.device)
        block_r, block_h, num_warps, programs = _config(H, N)
        interpret = interpret_mode()
        if N > 0:
            launchable(_rms_norm_forward_kernel)[(triton.cdiv(N, block_r),)](
                x2, weight, y, rstd, N, H, x2.stride(0), y.stride(0), float(eps), float(offset),
                CAST_BEFORE_WEIGHT=cast_before_weight, X_BF16=interpret and x.dtype == torch.bfloat16,
                Y_BF16=interpret and y.dtype == torch.bfloat16, BLOCK_R=block_r, BLOCK_H=block_h, num_warps=num_warps,
            )  # fmt: skip
        ctx.save_for_backward(x2, weight, rstd)  # the Parameter itself: ZeRO-3 re-gathers it for the backward
        ctx.settings = (offset, cast_before_weight, x.shape)
        return y.view(*x.shape[:-1], H)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        offset, cast_before_weight, shape = ctx.settings
        N, H = x2.shape
        dy2 = dy.reshape(-1, H)
        if dy2.stride(-1) != 1:
            dy2 = dy2.contiguous()
        dx = torch.empty(N, H, dtype=x2.dtype, device=x2.device)
        block_r, block_h, num_warps, programs = _config(H, N, backward=True)
        dw_part = torch.zeros(programs, H, dtype=torch.float32, device=x2.device)
        if N > 0:
            launchable(_rms_norm_backward_kernel)[(programs,)](
                x2, weight, dy2, rstd, dx, dw_part, N, H, x2.stride(0), dy2.stride(0), dx.stride(0), float(offset),
                CAST_BEFORE_WEIGHT=cast_before_weight, X_BF16=interpret_mode() and x2.dtype == torch.bfloat16,
                BLOCK_R=block_r, BLOCK_H=block_h, num_warps=num_warps,
            )  # fmt: skip
        dw = dw_part.sum(0).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return dx.view(shape), dw, None, None, None


def rms_norm_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    offset: float = 0.0,
    cast_before_weight: bool = True,
) -> torch.Tensor:
    """Plain PyTorch, HF's own formulas: LlamaRMSNorm (cast_before_weight, offset 0) and Gemma3RMSNorm (offset 1)."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if cast_before_weight:
        return (weight + offset if offset else weight) * h.to(x.dtype)
    return (h * (offset + weight.float())).type_as(x)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    offset: float = 0.0,
    cast_before_weight: bool = True,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """RMSNorm over the last dim of x (..., H) with weight (H,): the Triton kernel on CUDA (backend="auto"), the
    reference elsewhere and for float64. Result dtype: promote(x, weight) when cast_before_weight (as Llama's),
    else x's."""
    if x.shape[-1] != weight.shape[-1] or weight.dim() != 1:
        raise ValueError(f"rms_norm: weight {tuple(weight.shape)} does not match x {tuple(x.shape)}")
    if x.dtype == torch.float64 and backend == "triton":
        raise ValueError("rms_norm: the Triton kernel takes bf16, fp16 or fp32 inputs, not float64 (backend='torch')")
    if x.dtype == torch.float64 or resolve_backend(backend, x.device) == "torch":
        return rms_norm_reference(x, weight, eps, offset, cast_before_weight)
    return _RMSNormFunction.apply(x, weight, eps, offset, cast_before_weight)
