"""adapt_fast.kernels: Triton kernels for per-task losses and ghost dot products, with PyTorch references.

    per_task_linear_cross_entropy(hidden, weight, labels, task_ids, num_tasks, ...) -> PerTaskLoss
    per_task_ghost_dot(x, delta, G, task_ids=None, num_tasks=None, task_offsets=None) -> (K,) fp32

Each op takes backend="auto" ("triton" on CUDA, "torch" elsewhere; see resolve_backend); the *_reference
functions are the plain-PyTorch versions with the same signature.
"""

from .backend import resolve_backend
from .ghost_dot import per_task_ghost_dot, per_task_ghost_dot_reference
from .linear_cross_entropy import (
    PerTaskLoss,
    per_task_linear_cross_entropy,
    per_task_linear_cross_entropy_reference,
)

__all__ = [
    "PerTaskLoss",
    "per_task_ghost_dot",
    "per_task_ghost_dot_reference",
    "per_task_linear_cross_entropy",
    "per_task_linear_cross_entropy_reference",
    "resolve_backend",
]
