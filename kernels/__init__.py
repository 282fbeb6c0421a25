"""adapt_fast.kernels: Triton kernels for per-task losses and ghost dot products, with PyTorch references.

    per_task_linear_cross_entropy(hidden, weight, labels, task_ids, num_tasks, ...) -> PerTaskLoss
    per_task_ghost_dot(x, delta, G, task_ids=None, num_tasks=None, task_offsets=None) -> (K,) fp32
    rms_norm(x, weight, eps, offset=0.0, cast_before_weight=True) -> like x      (fused layers of the model)
    swiglu(gate, up) -> silu(gate) * up;  geglu(gate, up) -> gelu_tanh(gate) * up
    rope(q, k, cos, sin) -> (q_embed, k_embed)           (HF's apply_rotary_pos_emb, one kernel)
    per_task_weight_grad(x, delta, G, task_offsets) -> (dW, (K,) dots)  (the dW GEMM with the ghost dots folded in)

Each op takes backend="auto" ("triton" on CUDA, "torch" elsewhere; see resolve_backend); the *_reference
functions are the plain-PyTorch versions with the same signature.
"""

from .backend import reference_forced, reference_kernels, resolve_backend
from .gated_mlp import geglu, geglu_reference, swiglu, swiglu_reference
from .ghost_dot import per_task_ghost_dot, per_task_ghost_dot_reference
from .linear_cross_entropy import (
    PerTaskLoss,
    per_task_linear_cross_entropy,
    per_task_linear_cross_entropy_reference,
)
from .norm import rms_norm, rms_norm_reference
from .rotary import rope, rope_reference
from .weight_grad_ghost import per_task_weight_grad, per_task_weight_grad_reference

__all__ = [
    "geglu",
    "geglu_reference",
    "PerTaskLoss",
    "per_task_ghost_dot",
    "per_task_ghost_dot_reference",
    "per_task_linear_cross_entropy",
    "per_task_linear_cross_entropy_reference",
    "per_task_weight_grad",
    "per_task_weight_grad_reference",
    "reference_forced",
    "reference_kernels",
    "resolve_backend",
    "rms_norm",
    "rms_norm_reference",
    "rope",
    "rope_reference",
    "swiglu",
    "swiglu_reference",
]
