"""Gated MLP activations, fused: y = act(gate) * up in one pass. SwiGLU (act = silu: Llama, Qwen, Mistral) and
GEGLU (act = GELU's tanh approximation: Gemma).

HF's gated MLP computes `act_fn(gate_proj(x)) * up_proj(x)`: two kernels, and autograd keeps gate, up and
act(gate). Here the forward reads gate and up once and writes y; the backward recomputes act from gate (saved:
gate and up only) and writes both input gradients in one pass:

    d gate = dy * up * act'(gate),      d up = dy * act(gate)

    silu:      act = a s,                         act' = s (1 + a (1 - s)),                    s = sigmoid(a)
    gelu_tanh: act = a (1 + t) / 2,               act' = (1 + t) / 2 + a (1 - t^2) c (1 + 3 k a^2) / 2,
               t = tanh(c (a + k a^3)),  c = sqrt(2 / pi),  k = 0.044715

Everything is computed in fp32 and rounded once to the inputs' dtype (HF rounds act(gate) before the product).
"""

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from .backend import interpret_mode, launchable, resolve_backend
from .linear_cross_entropy import _round_bf16

ACTIVATIONS = ("silu", "gelu_tanh")  # the ACTIVATION constexpr of the kernels: an index into this
GELU_C = tl.constexpr(0.7978845608028654)  # sqrt(2 / pi)
GELU_K = tl.constexpr(0.044715)  # the cubic term's factor


@triton.jit
def _activation(a, ACTIVATION: tl.constexpr):
    """(act(a), act'(a)) in fp32."""
    if ACTIVATION == 0:
        s = tl.sigmoid(a)
        return a * s, s * (1.0 + a * (1.0 - s))
    else:
        e = tl.exp(-2.0 * tl.clamp(GELU_C * (a + GELU_K * a * a * a), -20.0, 20.0))  # tanh from exp, no overflow
        t = (1.0 - e) / (1.0 + e)
        return 0.5 * a * (1.0 + t), 0.5 * (1.0 + t) + 0.5 * a * (1.0 - t * t) * GELU_C * (1.0 + 3.0 * GELU_K * a * a)


@triton.jit
def _gated_forward_kernel(
    gate_ptr, up_ptr, y_ptr, n, ACTIVATION: tl.constexpr, BF16: tl.constexpr, BLOCK: tl.constexpr
):  # fmt: skip
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    a = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    act, _ = _activation(a, ACTIVATION)
    tl.store(y_ptr + offs, _round_bf16(act * b, BF16).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gated_backward_kernel(
    gate_ptr, up_ptr, dy_ptr, dgate_ptr, dup_ptr, n, ACTIVATION: tl.constexpr, BF16: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    a = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    act, d_act = _activation(a, ACTIVATION)
    tl.store(dgate_ptr + offs, _round_bf16(dy * b * d_act, BF16).to(dgate_ptr.dtype.element_ty), mask=mask)
    tl.store(dup_ptr + offs, _round_bf16(dy * act, BF16).to(dup_ptr.dtype.element_ty), mask=mask)


CUDA_BLOCK = 1024


def _block() -> int:
    return 4096 if interpret_mode() else CUDA_BLOCK  # the interpreter runs programs one after another: fewer, larger


class _GatedFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, activation):
        gate, up = gate.contiguous(), up.contiguous()
        y = torch.empty_like(gate)
        n = gate.numel()
        ctx.activation = ACTIVATIONS.index(activation)
        if n > 0:
            bf16 = interpret_mode() and gate.dtype == torch.bfloat16
            launchable(_gated_forward_kernel)[(triton.cdiv(n, _block()),)](
                gate, up, y, n, ACTIVATION=ctx.activation, BF16=bf16, BLOCK=_block()
            )
        ctx.save_for_backward(gate, up)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        dy = dy.contiguous()
        dgate, dup = torch.empty_like(gate), torch.empty_like(up)
        n = gate.numel()
        if n > 0:
            bf16 = interpret_mode() and gate.dtype == torch.bfloat16
            launchable(_gated_backward_kernel)[(triton.cdiv(n, _block()),)](
                gate, up, dy, dgate, dup, n, ACTIVATION=ctx.activation, BF16=bf16, BLOCK=_block()
            )
        return dgate, dup, None


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch, HF's LlamaMLP activation: silu(gate) * up."""
    return torch.nn.functional.silu(gate) * up


def geglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch, HF's Gemma3MLP activation (gelu_pytorch_tanh): gelu(gate, approximate="tanh") * up."""
    return torch.nn.functional.gelu(gate, approximate="tanh") * up


def _gated(gate: torch.Tensor, up: torch.Tensor, activation: str, backend: str) -> torch.Tensor:
    name = {"silu": "swiglu", "gelu_tanh": "geglu"}[activation]
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"{name}: gate {tuple(gate.shape)} {gate.dtype} and up {tuple(up.shape)} {up.dtype} differ")
    if gate.dtype == torch.float64 and backend == "triton":
        raise ValueError(f"{name}: the Triton kernel takes bf16, fp16 or fp32 inputs, not float64 (backend='torch')")
    if gate.dtype == torch.float64 or resolve_backend(backend, gate.device) == "torch":
        return (swiglu_reference if activation == "silu" else geglu_reference)(gate, up)
    return _GatedFunction.apply(gate, up, activation)


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """silu(gate) * up for two tensors of one shape and dtype: the Triton kernel on CUDA (backend="auto"), the
    reference elsewhere and for float64."""
    return _gated(gate, up, "silu", backend)


def geglu(gate: torch.Tensor, up: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """gelu_tanh(gate) * up, as swiglu otherwise."""
    return _gated(gate, up, "gelu_tanh", backend)
