"""Rotary position embedding (RoPE), fused: queries and keys rotated in one kernel, forward and backward.

HF's `apply_rotary_pos_emb(q, k, cos, sin)` (Llama, Qwen, Mistral, Gemma) computes, for x in (q, k),

    x_embed = x * cos + rotate_half(x) * sin,      rotate_half(x) = cat(-x2, x1)   (x1, x2: the halves of head_dim)

as about five kernels per tensor (negate, concatenate, two products, a sum), forward and backward. Here one
launch reads q, k, cos and sin once and writes both outputs; the backward is the same kernel with the transposed
rotation (it saves only cos and sin). With h = head_dim / 2 and r() the rounding to the inputs' dtype:

    forward   y1 = r(r(x1 c1) - r(x2 s1)),   y2 = r(r(x2 c2) + r(x1 s2))
    backward dx1 = r(r(g1 c1) + r(g2 s2)),  dx2 = r(r(g2 c2) - r(g1 s1))

which are HF's own roundings (each product, then the sum, rounded; autograd's rounding of the two branches'
gradients): the results equal HF's bit for bit, in fp32 too (the products are not fused into FMAs).

Shapes: q (B, Hq, T, D), k (B, Hk, T, D) of any strides with the last dim contiguous (HF passes (B, T, H, D)
transposed), cos and sin (B or 1, T, D); all one dtype. The outputs keep the inputs' memory layout.
"""

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from .backend import interpret_mode, launchable, resolve_backend
from .linear_cross_entropy import _round_bf16


@triton.jit
def _rounded(x, dtype: tl.constexpr, INTERPRET_BF16: tl.constexpr):
    """fp32 x rounded to `dtype` and back (the interpreter's bf16 cast truncates: round first)."""
    return _round_bf16(x, INTERPRET_BF16).to(dtype).to(tl.float32)


@triton.jit
def _rotate_heads(
    x_ptr, y_ptr, first_head, n_heads, head_step, stride_xh, stride_xt, stride_yh, stride_yt, tok, cols, mask,
    c1, c2, s1, s2, HALF: tl.constexpr, BACKWARD: tl.constexpr, INTERPRET_BF16: tl.constexpr,
):  # fmt: skip
    """Heads first_head, first_head + head_step, ... of one (BLOCK_T, D) token block: x_ptr / y_ptr point at the
    block's batch row; cos / sin halves c1, c2, s1, s2 are (BLOCK_T, BLOCK_HALF) fp32."""
    dtype = y_ptr.dtype.element_ty
    x_offs = tok[:, None] * stride_xt + cols[None, :]
    y_offs = tok[:, None] * stride_yt + cols[None, :]
    for head in range(first_head, n_heads, head_step):
        head64 = tl.cast(head, tl.int64)
        xh, yh = x_ptr + head64 * stride_xh, y_ptr + head64 * stride_yh
        x1 = tl.load(xh + x_offs, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(xh + x_offs + HALF, mask=mask, other=0.0).to(tl.float32)
        a1 = _rounded(x1 * c1, dtype, INTERPRET_BF16)
        a2 = _rounded(x2 * c2, dtype, INTERPRET_BF16)
        if BACKWARD:  # the gradient through rotate_half: its transpose, cat(x2, -x1), times sin
            y1 = a1 + _rounded(x2 * s2, dtype, INTERPRET_BF16)
            y2 = a2 - _rounded(x1 * s1, dtype, INTERPRET_BF16)
        else:
            y1 = a1 - _rounded(x2 * s1, dtype, INTERPRET_BF16)
            y2 = a2 + _rounded(x1 * s2, dtype, INTERPRET_BF16)
        tl.store(yh + y_offs, _round_bf16(y1, INTERPRET_BF16).to(dtype), mask=mask)
        tl.store(yh + y_offs + HALF, _round_bf16(y2, INTERPRET_BF16).to(dtype), mask=mask)


@triton.jit
def _rope_kernel(
    q_ptr, k_ptr, cos_ptr, sin_ptr, qo_ptr, ko_ptr, T, Hq, Hk,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
    stride_qob, stride_qoh, stride_qot, stride_kob, stride_koh, stride_kot,
    stride_cb, stride_ct, stride_sb, stride_st,
    HALF: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_HALF: tl.constexpr, BACKWARD: tl.constexpr,
    INTERPRET_BF16: tl.constexpr,
):  # fmt: skip
    """Program (t, b, s): tokens [t * BLOCK_T, (t + 1) * BLOCK_T) of batch row b, heads s, s + S, ... (S programs
    on axis 2) of q and of k. cos / sin (broadcast rows: batch stride 0) are read once per program."""
    pid_t, b, split, n_split = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2), tl.num_programs(2)
    tok = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_HALF)
    mask = (tok < T)[:, None] & (cols < HALF)[None, :]
    tok = tok.to(tl.int64)
    c_offs = cos_ptr + b * stride_cb + tok[:, None] * stride_ct + cols[None, :]
    s_offs = sin_ptr + b * stride_sb + tok[:, None] * stride_st + cols[None, :]
    c1 = tl.load(c_offs, mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(c_offs + HALF, mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(s_offs, mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(s_offs + HALF, mask=mask, other=0.0).to(tl.float32)
    _rotate_heads(
        q_ptr + b * stride_qb, qo_ptr + b * stride_qob, split, Hq, n_split, stride_qh, stride_qt, stride_qoh,
        stride_qot, tok, cols, mask, c1, c2, s1, s2, HALF, BACKWARD, INTERPRET_BF16,
    )  # fmt: skip
    _rotate_heads(
        k_ptr + b * stride_kb, ko_ptr + b * stride_kob, split, Hk, n_split, stride_kh, stride_kt, stride_koh,
        stride_kot, tok, cols, mask, c1, c2, s1, s2, HALF, BACKWARD, INTERPRET_BF16,
    )  # fmt: skip


# CUDA tiles: heads split over HEAD_SPLIT programs (about 4 programs per SM at T=16k, B=1; each reads cos / sin once
# and its share of the heads, memory-bound); bench/sm90_compile.py compiles them at head_dim 64, 128 and 256.
CUDA_HEAD_SPLIT, CUDA_NUM_WARPS = 4, 4


def cuda_block_t(head_dim: int) -> int:
    """Tokens per program: tiles of about 32 x 64 (head_dim 256 at 32 tokens spilled registers in fp32)."""
    return max(8, min(32, 2048 // triton.next_power_of_2(head_dim // 2)))


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _rotate(q, k, cos, sin, backward: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One launch over q and k (B, H, T, D); cos / sin (B, T, D), possibly with batch stride 0."""
    q, k, cos, sin = (_last_dim_contiguous(t) for t in (q, k, cos, sin))
    qo, ko = torch.empty_like(q), torch.empty_like(k)  # the inputs' layout (dense tensors keep their strides)
    B, Hq, T, D = q.shape
    Hk = k.shape[1]
    if q.numel() + k.numel() == 0:
        return qo, ko
    interpret = interpret_mode()
    block_t = min(triton.next_power_of_2(T), 256) if interpret else cuda_block_t(D)  # interpreter: few, large ones
    split = 1 if interpret else CUDA_HEAD_SPLIT
    launchable(_rope_kernel)[(triton.cdiv(T, block_t), B, split)](
        q, k, cos, sin, qo, ko, T, Hq, Hk, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1),
        k.stride(2), qo.stride(0), qo.stride(1), qo.stride(2), ko.stride(0), ko.stride(1), ko.stride(2),
        cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1),
        HALF=D // 2, BLOCK_T=block_t, BLOCK_HALF=triton.next_power_of_2(D // 2), BACKWARD=backward,
        INTERPRET_BF16=interpret and q.dtype == torch.bfloat16, num_warps=CUDA_NUM_WARPS, enable_fp_fusion=False,
    )  # fmt: skip
    return qo, ko


class _RoPEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        B, _, T, D = q.shape
        cos, sin = cos.expand(B, T, D), sin.expand(B, T, D)
        ctx.save_for_backward(cos, sin)
        return _rotate(q, k, cos, sin, backward=False)

    @staticmethod
    @once_differentiable
    def backward(ctx, dq_embed, dk_embed):
        cos, sin = ctx.saved_tensors
        dq, dk = _rotate(dq_embed, dk_embed, cos, sin, backward=True)
        return dq, dk, None, None


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_reference(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch, HF's apply_rotary_pos_emb (unsqueeze_dim=1): (q * cos + rotate_half(q) * sin, same for k)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def rope_shape_error(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> str | None:
    """Why the kernel cannot take these inputs (None: it can)."""
    if q.dim() != 4 or k.dim() != 4 or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        return f"q {tuple(q.shape)} and k {tuple(k.shape)} are not (B, H, T, D) with one B, T and D"
    B, _, T, D = q.shape
    if D % 2:
        return f"head_dim {D} is odd"
    if cos.shape != sin.shape:
        return f"cos {tuple(cos.shape)} and sin {tuple(sin.shape)} differ in shape"
    if cos.dim() != 3 or cos.shape[1:] != (T, D) or cos.shape[0] not in (1, B):
        return f"cos {tuple(cos.shape)} / sin {tuple(sin.shape)} are not ({B} or 1, {T}, {D})"
    if len({q.dtype, k.dtype, cos.dtype, sin.dtype}) != 1:
        return f"dtypes differ (q {q.dtype}, k {k.dtype}, cos {cos.dtype}, sin {sin.dtype})"
    return None


def rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q_embed, k_embed) as rope_reference: the Triton kernel on CUDA (backend="auto"), the reference elsewhere and
    for float64. Gradients flow to q and k (cos and sin are constants, as HF's rotary embedding makes them)."""
    error = rope_shape_error(q, k, cos, sin)
    if error:
        raise ValueError(f"rope: {error}")
    if q.dtype == torch.float64 and backend == "triton":
        raise ValueError("rope: the Triton kernel takes bf16, fp16 or fp32 inputs, not float64 (backend='torch')")
    if q.dtype == torch.float64 or resolve_backend(backend, q.device) == "torch":
        return rope_reference(q, k, cos, sin)
    if cos.requires_grad or sin.requires_grad:
        raise ValueError("rope: the Triton kernel treats cos and sin as constants; they require grad here")
    return _RoPEFunction.apply(q, k, cos, sin)
