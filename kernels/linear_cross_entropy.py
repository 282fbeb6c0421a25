"""Fused linear + per-task cross-entropy (DESIGN.md section 4.1), with the head's per-task ghost dot products.

For hidden states h (T, H), head W (V, H), labels y (T,) and task ids (T,):

    z_t = W h_t (raw logits, fp32)      s_t = softcap * tanh(z_t / softcap)   (or z_t without soft-cap)
    ce_t = logsumexp(s_t) - s_t[y_t]    loss_sum[k] = sum_{t in task k} ce_t    loss = sum_k c_k loss_sum[k]

Tokens whose label is ignore_index or whose task id is outside [0, K) do not count. The (T, V) logits are never
held at once: the loss-carrying tokens are gathered and processed in chunks of rows; each chunk computes its
logits, loss, dloss/dz (the gradient is computed in the forward pass, as in Liger-Kernel's fused linear cross
entropy) and its share of d hidden and d weight. Backward only scales the stored gradients by grad_output.

With ghost_weight G (V, H) it also returns, per task, the inner product of G with the head's gradient:

    ghost_dot[k] = sum_{t in task k} (dloss/dz_t) . (G h_t) = <G, d loss / d W restricted to task k>

where `loss` is the returned weighted scalar and its upstream gradient is taken to be 1 (it is computed in the
forward pass and returned detached). Computed as sum_t ((dloss/dz_t) G) . h_t: one extra (chunk, V) x (V, H)
GEMM per chunk, no per-task gradients.

Two implementations share the driver below and differ in how one chunk is processed:
  * `_chunk_torch` (the reference): fp32 matmuls in PyTorch;
  * `_chunk_triton`: four Triton kernels - logits GEMM with soft-cap and partial log-sum-exp fused in the
    epilogue (fp32 logits), dlogits in place (written over the logits in the input dtype), d hidden GEMM with the
    ghost dot fused, d weight GEMM accumulated in fp32 across chunks.
"""

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .backend import interpret_mode, launchable, resolve_backend


@dataclass
class PerTaskLoss:
    """Result of per_task_linear_cross_entropy.

    loss:      () scalar sum_k task_weights[k] * loss_sum[k]; backpropagates into hidden and weight.
    loss_sum:  (K,) fp32, per-task sum of token cross-entropies (detached).
    count:     (K,) int64, per-task number of loss tokens (label != ignore_index, task id in [0, K)).
    ghost_dot: (K,) fp32 <ghost_weight, d loss / d weight restricted to task k> (detached), or None.
    """

    loss: torch.Tensor
    loss_sum: torch.Tensor
    count: torch.Tensor
    ghost_dot: torch.Tensor | None = None


# ----------------------------------------------------------------------------------------------------------
# Shared driver: select loss tokens, chunk them, reduce per task, attach the gradients to the loss.
# ----------------------------------------------------------------------------------------------------------


class _AttachGradients(torch.autograd.Function):
    """Identity on the loss whose backward returns gradients computed in the forward pass, times grad_output."""

    @staticmethod
    def forward(ctx, loss, hidden, weight, d_hidden, d_weight):
        ctx.save_for_backward(d_hidden, d_weight)
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_output):
        d_hidden, d_weight = ctx.saved_tensors
        d_hidden = None if d_hidden is None else d_hidden * grad_output.to(d_hidden.dtype)
        d_weight = None if d_weight is None else d_weight * grad_output.to(d_weight.dtype)
        return None, d_hidden, d_weight, None, None


def _linear_cross_entropy(
    chunk_fn,
    default_chunk_rows,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    task_ids: torch.Tensor,
    num_tasks: int,
    task_weights: torch.Tensor | None,
    ghost_weight: torch.Tensor | None,
    softcap: float | None,
    ignore_index: int,
    chunk_size: int | None,
) -> PerTaskLoss:
    T, H = hidden.shape if hidden.dim() == 2 else (None, None)
    if T is None or weight.dim() != 2 or weight.shape[1] != H:
        raise ValueError(f"hidden (T, H) and weight (V, H) expected, got {tuple(hidden.shape)} {tuple(weight.shape)}")
    if labels.shape != (T,) or task_ids.shape != (T,):
        raise ValueError(f"labels and task_ids must have shape ({T},)")
    if weight.dtype != hidden.dtype or (ghost_weight is not None and ghost_weight.dtype != hidden.dtype):
        raise ValueError("hidden, weight and ghost_weight must have the same dtype")
    if ghost_weight is not None and ghost_weight.shape != weight.shape:
        raise ValueError(f"ghost_weight must have the head's shape {tuple(weight.shape)}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be positive or None, got {softcap}")
    V, K, device = weight.shape[0], int(num_tasks), hidden.device
    if task_weights is None:
        task_weights = torch.ones(K, dtype=torch.float32, device=device)
    task_weights = task_weights.to(device=device, dtype=torch.float32)
    if task_weights.shape != (K,):
        raise ValueError(f"task_weights must have shape ({K},)")

    # Loss tokens only: prompt and padding tokens cost nothing (one host sync for their number).
    labels, task_ids = labels.to(device=device, dtype=torch.int64), task_ids.to(device=device, dtype=torch.int64)
    valid = (labels != ignore_index) & (task_ids >= 0) & (task_ids < K)
    rows = valid.nonzero().squeeze(1)
    n = rows.numel()
    row_labels, row_tasks = labels[rows], task_ids[rows]
    if n and bool(((row_labels < 0) | (row_labels >= V)).any()):
        raise ValueError(f"labels must be ignore_index ({ignore_index}) or in [0, {V})")
    row_coef = task_weights[row_tasks]  # dloss/dce_t

    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    with torch.no_grad():
        d_hidden = torch.zeros_like(hidden) if need_grad and hidden.requires_grad else None
        d_weight = torch.zeros(V, H, dtype=torch.float32, device=device) if need_grad and weight.requires_grad else None
        row_ce = torch.empty(n, dtype=torch.float32, device=device)
        row_ghost = torch.empty(n, dtype=torch.float32, device=device) if ghost_weight is not None else None
        chunk = max(1, chunk_size or default_chunk_rows(V))
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            h = hidden.index_select(0, rows[s:e])
            ce, dh, ghost = chunk_fn(
                h, weight, row_labels[s:e], row_coef[s:e], ghost_weight, softcap, d_weight, d_hidden is not None
            )
            row_ce[s:e] = ce
            if d_hidden is not None:
                d_hidden.index_copy_(0, rows[s:e], dh)
            if row_ghost is not None:
                row_ghost[s:e] = ghost

        loss_sum = torch.zeros(K, dtype=torch.float32, device=device).index_add_(0, row_tasks, row_ce)
        count = torch.bincount(row_tasks, minlength=K)[:K]
        ghost_dot = None
        if row_ghost is not None:
            ghost_dot = torch.zeros(K, dtype=torch.float32, device=device).index_add_(0, row_tasks, row_ghost)
        loss = (task_weights * loss_sum).sum()

    if need_grad:
        d_weight = None if d_weight is None else d_weight.to(weight.dtype)
        loss = _AttachGradients.apply(loss, hidden, weight, d_hidden, d_weight)
    return PerTaskLoss(loss=loss, loss_sum=loss_sum, count=count, ghost_dot=ghost_dot)


# ----------------------------------------------------------------------------------------------------------
# Reference (plain PyTorch): one chunk in fp32.
# ----------------------------------------------------------------------------------------------------------


def _reference_chunk_rows(vocab: int) -> int:
    return max(1, (1 << 26) // vocab)  # (rows, V) fp32 temporaries of 256 MiB each


def _chunk_torch(h, weight, labels, coef, ghost_weight, softcap, d_weight, want_d_hidden):
    """One chunk of loss tokens: h (C, H), labels (C,), coef (C,) = task weight of each row.

    Returns ce (C,) fp32, d hidden (C, H) in h's dtype or None, ghost (C,) fp32 or None; adds the chunk's
    d weight into d_weight (V, H) fp32 when given. Logits and their gradient are fp32 (C, V) tensors.
    """
    w32 = weight.float()  # exact upcast: a product of two bf16/fp16 numbers is exact in fp32
    h32 = h.float()
    logits = h32 @ w32.T
    if softcap is not None:
        logits.div_(softcap).tanh_().mul_(softcap)
    lse = torch.logsumexp(logits, dim=1)
    ce = lse - logits.gather(1, labels[:, None]).squeeze(1)
    if d_weight is None and not want_d_hidden and ghost_weight is None:
        return ce, None, None

    dz = torch.exp(logits - lse[:, None])  # softmax
    dz[torch.arange(dz.shape[0], device=dz.device), labels] -= 1.0
    if softcap is not None:  # d softcap*tanh(z/softcap) / dz = 1 - tanh^2
        dz.mul_(logits.div_(softcap).square_().neg_().add_(1.0))
    dz.mul_(coef[:, None])
    del logits

    dh = (dz @ w32).to(h.dtype) if want_d_hidden else None
    if d_weight is not None:
        d_weight.addmm_(dz.T, h32)
    ghost = ((dz @ ghost_weight.float()) * h32).sum(1) if ghost_weight is not None else None
    return ce, dh, ghost


def per_task_linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    task_ids: torch.Tensor,
    num_tasks: int,
    task_weights: torch.Tensor | None = None,
    ghost_weight: torch.Tensor | None = None,
    softcap: float | None = None,
    ignore_index: int = -100,
    *,
    chunk_size: int | None = None,
) -> PerTaskLoss:
    """Plain-PyTorch per-task linear cross-entropy (see the module docstring); chunk_size = loss tokens per chunk."""
    return _linear_cross_entropy(
        _chunk_torch, _reference_chunk_rows, hidden, weight, labels, task_ids, num_tasks,
        task_weights, ghost_weight, softcap, ignore_index, chunk_size,
    )  # fmt: skip


def per_task_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    task_ids: torch.Tensor,
    num_tasks: int,
    task_weights: torch.Tensor | None = None,
    ghost_weight: torch.Tensor | None = None,
    softcap: float | None = None,
    ignore_index: int = -100,
    *,
    chunk_size: int | None = None,
    backend: str = "auto",
) -> PerTaskLoss:
    """Per-task linear cross-entropy: Triton kernels on CUDA (backend="auto"), the reference elsewhere."""
    if resolve_backend(backend, hidden.device) == "torch":
        chunk_fn, chunk_rows = _chunk_torch, _reference_chunk_rows
    else:
        chunk_fn, chunk_rows = _chunk_triton, _triton_chunk_rows
    return _linear_cross_entropy(
        chunk_fn, chunk_rows, hidden, weight, labels, task_ids, num_tasks,
        task_weights, ghost_weight, softcap, ignore_index, chunk_size,
    )  # fmt: skip


def _triton_chunk_rows(vocab: int) -> int:
    raise NotImplementedError


def _chunk_triton(*args):
    raise NotImplementedError
