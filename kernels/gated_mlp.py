"""SwiGLU, fused: y = silu(gate) * up in one pass, the MLP activation of Llama, Qwen and Mistral.

HF's LlamaMLP computes `act_fn(gate_proj(x)) * up_proj(x)`: two kernels, and autograd keeps gate, up and
silu(gate). Here the forward reads gate and up once and writes y; the backward recomputes silu from gate
(saved: gate and up only) and writes both input gradients in one pass, with s = sigmoid(gate):

    d gate = dy * up * s * (1 + gate * (1 - s)),      d up = dy * gate * s

Everything is computed in fp32 and rounded once to the inputs' dtype (HF rounds silu(gate) before the product).
"""

import torch
import triton
import triton.language as tl

from .backend import interpret_mode, launchable, resolve_backend
from .linear_cross_entropy import _round_bf16


@triton.jit
def _swiglu_forward_kernel(gate_ptr, up_ptr, y_ptr, n, BF16: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    a = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = a * tl.sigmoid(a) * b
    tl.store(y_ptr + offs, _round_bf16(y, BF16).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_backward_kernel(gate_ptr, up_ptr, dy_ptr, dgate_ptr, dup_ptr, n, BF16: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    a = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(a)
    dgate = dy * b * s * (1.0 + a * (1.0 - s))
    dup = dy * a * s
    tl.store(dgate_ptr + offs, _round_bf16(dgate, BF16).to(dgate_ptr.dtype.element_ty), mask=mask)
    tl.store(dup_ptr + offs, _round_bf16(dup, BF16).to(dup_ptr.dtype.element_ty), mask=mask)


CUDA_BLOCK = 1024


def _block() -> int:
    return 4096 if interpret_mode() else CUDA_BLOCK  # the interpreter runs programs one after another: fewer, larger


class _SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        gate, up = gate.contiguous(), up.contiguous()
        y = torch.empty_like(gate)
        n = gate.numel()
        if n > 0:
            bf16 = interpret_mode() and gate.dtype == torch.bfloat16
            launchable(_swiglu_forward_kernel)[(triton.cdiv(n, _block()),)](gate, up, y, n, BF16=bf16, BLOCK=_block())
        ctx.save_for_backward(gate, up)
        return y

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        dy = dy.contiguous()
        dgate, dup = torch.empty_like(gate), torch.empty_like(up)
        n = gate.numel()
        if n > 0:
            bf16 = interpret_mode() and gate.dtype == torch.bfloat16
            launchable(_swiglu_backward_kernel)[(triton.cdiv(n, _block()),)](
                gate, up, dy, dgate, dup, n, BF16=bf16, BLOCK=_block()
            )
        return dgate, dup


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch, HF's LlamaMLP activation: silu(gate) * up."""
    return torch.nn.functional.silu(gate) * up


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """silu(gate) * up for two tensors of one shape and dtype: the Triton kernel on CUDA (backend="auto"), the
    reference elsewhere and for float64."""
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"swiglu: gate {tuple(gate.shape)} {gate.dtype} and up {tuple(up.shape)} {up.dtype} differ")
    if gate.dtype == torch.float64 and backend == "triton":
        raise ValueError("swiglu: the Triton kernel takes bf16, fp16 or fp32 inputs, not float64 (backend='torch')")
    if gate.dtype == torch.float64 or resolve_backend(backend, gate.device) == "torch":
        return swiglu_reference(gate, up)
    return _SwiGLUFunction.apply(gate, up)
