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
forward pass and returned detached). It costs one extra GEMM of the logits' size, no per-task gradients.

Two implementations share the driver below and differ in how one chunk is processed:
  * `_chunk_torch` (the reference): fp32 matmuls in PyTorch; ghost_t = ((dloss/dz_t) G) . h_t;
  * `_chunk_triton`: five Triton kernels -
      1. logits GEMM, soft-cap and per-tile log-sum-exp partials fused in the epilogue; the tile's
         exp(s - tile max), in [0, 1], is stored in the input dtype (the logits themselves never leave the
         registers). With G, the tile of h G^T is computed alongside and reduced online against the softmax;
      2. per row: log-sum-exp from the tile partials, the label's logit (one row of W, and of G, per token),
         loss and ghost dot, all fp32. Without gradients (validation) kernels 1 and 2 are all that runs;
      3. dlogits: softmax - onehot, scaled per tile by exp(tile max - lse), written in place. Storing exp(s - m)
         in bf16 costs no accuracy where it matters: a label with softmax near 1 is its tile's max, stored as
         exactly 1, so 1 - softmax keeps fp32 accuracy; elsewhere the error is the bf16 rounding dz gets anyway;
      4. d hidden = dz W (split over the vocabulary as well when a chunk has too few row tiles to fill the GPU);
      5. d weight += dz^T h (fp32 within a chunk; across chunks in bf16 for a bf16 head, else fp32).
    Memory: one (chunk, V) buffer in the input dtype (at most 128 MiB by default, Liger-Kernel's logits chunk;
    chunk_size sets it), d weight and d hidden (the gradients themselves), a few (chunk,) and (chunk, V / 256)
    fp32 vectors. When every token carries loss, chunks are views of hidden and d hidden (no copies).
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
    loss_sum:  (K,) fp32 (float64 for float64 inputs), per-task sum of token cross-entropies (detached).
    count:     (K,) int64, per-task number of loss tokens (label != ignore_index, task id in [0, K)).
    ghost_dot: (K,) fp32 (float64 likewise) <ghost_weight, d loss / d weight restricted to task k> (detached), or None.
    """

    loss: torch.Tensor
    loss_sum: torch.Tensor
    count: torch.Tensor
    ghost_dot: torch.Tensor | None = None


# ----------------------------------------------------------------------------------------------------------
# Shared driver: select loss tokens, chunk them, reduce per task, attach the gradients to the loss.
# ----------------------------------------------------------------------------------------------------------


class _AttachGradients(torch.autograd.Function):
    """Identity on the loss whose backward returns gradients computed in the forward pass, times grad_output.

    The gradients are handed over once and scaled in place (no copy of d weight: it is as large as the head), so a
    second backward through the same loss is an error, as after any backward without retain_graph."""

    @staticmethod
    def forward(ctx, loss, hidden, weight, d_hidden, d_weight):
        ctx.gradients = (d_hidden, d_weight)
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.gradients is None:
            raise RuntimeError(
                "per_task_linear_cross_entropy: backward ran twice through one loss; its gradients are computed "
                "in the forward pass and handed over once (compute the loss again)"
            )
        grads, ctx.gradients = ctx.gradients, None
        for g in grads:
            if g is not None:
                g.mul_(grad_output.to(g.dtype))
        return None, *grads, None, None


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
    weight_grad_dtype: torch.dtype | None = None,
) -> PerTaskLoss:
    if hidden.dim() != 2 or weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"hidden (T, H) and weight (V, H) expected, got {tuple(hidden.shape)} {tuple(weight.shape)}")
    (T, H), V, K, device = hidden.shape, weight.shape[0], int(num_tasks), hidden.device
    if labels.shape != (T,) or task_ids.shape != (T,):
        raise ValueError(f"labels and task_ids must have shape ({T},)")
    if weight.dtype != hidden.dtype or (ghost_weight is not None and ghost_weight.dtype != hidden.dtype):
        raise ValueError("hidden, weight and ghost_weight must have the same dtype")
    if ghost_weight is not None and ghost_weight.shape != weight.shape:
        raise ValueError(f"ghost_weight must have the head's shape {tuple(weight.shape)}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be positive or None, got {softcap}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of tokens or None, got {chunk_size}")
    acc = torch.promote_types(hidden.dtype, torch.float32)  # fp32, or float64 for float64 inputs (reference only)
    if task_weights is None:
        task_weights = torch.ones(K, dtype=acc, device=device)
    task_weights = task_weights.to(device=device, dtype=acc)
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
    # Every token carries loss (no prompt or padding) and rows are unit-stride: chunks are views of hidden and of
    # d hidden, no gathered copies; otherwise the chunk's rows are gathered and their d hidden scattered back.
    all_rows = n == T and hidden.stride(1) == 1
    with torch.no_grad():
        d_hidden = None
        if need_grad and hidden.requires_grad:
            d_hidden = (torch.empty if all_rows else torch.zeros)(T, H, dtype=hidden.dtype, device=device)
        d_weight = None
        if need_grad and weight.requires_grad:
            d_weight = torch.zeros(V, H, dtype=weight_grad_dtype or acc, device=device)
        row_ce = torch.empty(n, dtype=acc, device=device)
        row_ghost = torch.empty(n, dtype=acc, device=device) if ghost_weight is not None else None
        chunk = chunk_size or default_chunk_rows(V, hidden.element_size())
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            h = hidden[s:e] if all_rows else hidden.index_select(0, rows[s:e])
            dh = None
            if d_hidden is not None:
                dh = d_hidden[s:e] if all_rows else torch.empty_like(h)
            ce, ghost = chunk_fn(h, weight, row_labels[s:e], row_coef[s:e], ghost_weight, softcap, d_weight, dh)
            row_ce[s:e] = ce
            if dh is not None and not all_rows:
                d_hidden.index_copy_(0, rows[s:e], dh)
            if row_ghost is not None:
                row_ghost[s:e] = ghost

        loss_sum = torch.zeros(K, dtype=acc, device=device).index_add_(0, row_tasks, row_ce)
        count = torch.bincount(row_tasks, minlength=K)[:K]
        ghost_dot = None
        if row_ghost is not None:
            ghost_dot = torch.zeros(K, dtype=acc, device=device).index_add_(0, row_tasks, row_ghost)
        loss = (task_weights * loss_sum).sum()

    if need_grad:
        d_weight = None if d_weight is None else d_weight.to(weight.dtype)
        loss = _AttachGradients.apply(loss, hidden, weight, d_hidden, d_weight)
    return PerTaskLoss(loss=loss, loss_sum=loss_sum, count=count, ghost_dot=ghost_dot)


# ----------------------------------------------------------------------------------------------------------
# Reference (plain PyTorch): one chunk in fp32 (float64 for float64 inputs).
# ----------------------------------------------------------------------------------------------------------


def _reference_chunk_rows(vocab: int, itemsize: int) -> int:
    return max(1, (1 << 26) // vocab)  # (rows, V) fp32 temporaries of 256 MiB each


def _chunk_torch(h, weight, labels, coef, ghost_weight, softcap, d_weight, d_hidden):
    """One chunk of loss tokens: h (C, H), labels (C,), coef (C,) = task weight of each row.

    Returns ce (C,) fp32 and ghost (C,) fp32 or None; writes the chunk's d hidden into d_hidden (C, H) and adds
    its d weight into d_weight (V, H) when they are given. Logits and their gradient are fp32 (C, V) tensors.
    Float64 inputs are computed in float64 throughout (tests of exactness).
    """
    acc = torch.promote_types(h.dtype, torch.float32)
    w32 = weight.to(acc)  # exact upcast (a product of two bf16/fp16 numbers is exact in fp32); a copy per chunk
    h32 = h.to(acc)
    logits = h32 @ w32.T
    if softcap is not None:
        logits.div_(softcap).tanh_().mul_(softcap)
    lse = torch.logsumexp(logits, dim=1)
    ce = lse - logits.gather(1, labels[:, None]).squeeze(1)
    if d_weight is None and d_hidden is None and ghost_weight is None:
        return ce, None

    dz = torch.exp(logits - lse[:, None])  # softmax
    dz[torch.arange(dz.shape[0], device=dz.device), labels] -= 1.0
    if softcap is not None:  # d softcap*tanh(z/softcap) / dz = 1 - tanh^2
        dz.mul_(logits.div_(softcap).square_().neg_().add_(1.0))
    dz.mul_(coef[:, None])
    del logits

    if d_hidden is not None:
        d_hidden.copy_(dz @ w32)
    if d_weight is not None:
        d_weight.addmm_(dz.T, h32)
    ghost = ((dz @ ghost_weight.to(acc)) * h32).sum(1) if ghost_weight is not None else None
    return ce, ghost


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


# ----------------------------------------------------------------------------------------------------------
# Triton: one chunk in five kernels.
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _round_bf16(x, INTERPRET_BF16: tl.constexpr):
    """fp32 x rounded to the nearest bf16 (ties to even), still fp32, when INTERPRET_BF16 (the interpreter's own
    fp32 -> bf16 cast truncates, a bias that adds up over chunks); on a GPU the cast itself rounds so."""
    if INTERPRET_BF16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        x = (bits & 0xFFFF0000).to(tl.float32, bitcast=True)
    return x


@triton.jit
def _softcap(z, softcap):
    """softcap * tanh(z / softcap), fp32: tanh from exp, clamped where it is +-1 in fp32 (no overflow)."""
    e = tl.exp(-2.0 * tl.clamp(z / softcap, -20.0, 20.0))
    return softcap * ((1.0 - e) / (1.0 + e))


@triton.jit
def _logits_kernel(
    h_ptr, w_ptr, g_ptr, p_ptr, part_max_ptr, part_sum_ptr, part_ghost_ptr,
    C, V, H, stride_h, stride_w, stride_p, n_vblocks, softcap,
    HAS_SOFTCAP: tl.constexpr, HAS_GHOST: tl.constexpr, STORE_P: tl.constexpr,
    PRECISION: tl.constexpr, INTERPRET_BF16: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    """Tile (BLOCK_T, BLOCK_V) of s = softcap(h W^T) in fp32 and per row of the tile m = max_v s and
    sum_v exp(s - m); _rows_kernel combines the tiles into the log-sum-exp. If STORE_P, the tile of exp(s - m), in
    [0, 1], is stored in the input dtype for _dlogits_kernel (the softmax is that times exp(m - lse)).

    With the ghost head G, also the tile of g = (h G^T) * ds/dz, reduced online like the sum of exponentials:
    sum_v exp(s - max) g_v per row, so that ghost_t = coef_t (sum_v softmax(s)_v g_v - g_y) (_rows_kernel).

    The label's logit s_y and g_y are left to _rows_kernel (one row of W and G per token): comparing every
    element of the tile with the label costs a tile of predicates, and the 128x256 tile then spills.
    """
    pid = tl.program_id(0)
    n_tblocks = tl.cdiv(C, BLOCK_T)
    pid_t = pid % n_tblocks  # row blocks vary fastest: one tile of W is read once and reused from L2
    pid_v = pid // n_tblocks
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    offs_h = tl.arange(0, BLOCK_H)
    mask_t, mask_v = offs_t < C, offs_v < V
    h_ptrs = h_ptr + offs_t[:, None].to(tl.int64) * stride_h + offs_h[None, :]  # (BLOCK_T, BLOCK_H)
    w_ptrs = w_ptr + offs_v[None, :].to(tl.int64) * stride_w + offs_h[:, None]  # (BLOCK_H, BLOCK_V) of W^T
    g_ptrs = g_ptr + offs_v[None, :].to(tl.int64) * stride_w + offs_h[:, None]  # (BLOCK_H, BLOCK_V) of G^T
    acc = tl.zeros((BLOCK_T, BLOCK_V), dtype=tl.float32)
    acc_g = tl.zeros((BLOCK_T, BLOCK_V), dtype=tl.float32)
    for k in range(0, H, BLOCK_H):
        mask_h = offs_h + k < H
        a = tl.load(h_ptrs, mask=mask_t[:, None] & mask_h[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=mask_h[:, None] & mask_v[None, :], other=0.0)
        if INTERPRET_BF16:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        if HAS_GHOST:
            bg = tl.load(g_ptrs, mask=mask_h[:, None] & mask_v[None, :], other=0.0)
            if INTERPRET_BF16:
                bg = bg.to(tl.float32)
            acc_g = tl.dot(a, bg, acc_g, input_precision=PRECISION)
        h_ptrs += BLOCK_H
        w_ptrs += BLOCK_H
        g_ptrs += BLOCK_H
    if HAS_SOFTCAP:
        acc = _softcap(acc, softcap)
    row_max = tl.max(tl.where(mask_v[None, :], acc, float("-inf")), axis=1)
    p = tl.where(mask_v[None, :], tl.exp(acc - row_max[:, None]), 0.0)
    part = offs_t * n_vblocks + pid_v
    tl.store(part_max_ptr + part, row_max, mask=mask_t)
    tl.store(part_sum_ptr + part, tl.sum(p, axis=1), mask=mask_t)
    if STORE_P:
        p_ptrs = p_ptr + offs_t[:, None].to(tl.int64) * stride_p + offs_v[None, :]
        p_out = _round_bf16(p, INTERPRET_BF16).to(p_ptr.dtype.element_ty)
        tl.store(p_ptrs, p_out, mask=mask_t[:, None] & mask_v[None, :])
    if HAS_GHOST:
        if HAS_SOFTCAP:  # d(softcap * tanh(z / softcap))/dz = 1 - tanh^2
            th = acc / softcap
            acc_g = acc_g * (1.0 - th * th)
        tl.store(part_ghost_ptr + part, tl.sum(p * acc_g, axis=1), mask=mask_t)


@triton.jit
def _rows_kernel(
    h_ptr, w_ptr, g_ptr, labels_ptr, coef_ptr, scale_ptr, part_max_ptr, part_sum_ptr, part_ghost_ptr,
    ce_ptr, target_ptr, ghost_ptr, H, stride_h, stride_w, n_vblocks, softcap,
    HAS_SOFTCAP: tl.constexpr, HAS_GHOST: tl.constexpr, WRITE_TILE_SCALE: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    """One row t, after _logits_kernel: lse_t from the partials of its n_vblocks tiles; the label's logit
    s_y = softcap(h_t . W[y_t]) in fp32 (target); ce_t = lse_t - s_y; with G,
    ghost_t = coef_t (sum_v softmax_v g_v - g_y). With WRITE_TILE_SCALE, the row's partial sums are overwritten
    by tile_scale = coef_t / scale * exp(m - lse_t) per tile, for _dlogits_kernel."""
    row = tl.program_id(0)
    parts = row.to(tl.int64) * n_vblocks + tl.arange(0, BLOCK_P)
    m = tl.full((BLOCK_P,), float("-inf"), tl.float32)
    for start in range(0, n_vblocks, BLOCK_P):
        mask = tl.arange(0, BLOCK_P) + start < n_vblocks
        m = tl.maximum(m, tl.load(part_max_ptr + parts + start, mask=mask, other=float("-inf")))
    row_max = tl.max(m, axis=0)
    total = tl.zeros((BLOCK_P,), tl.float32)
    total_g = tl.zeros((BLOCK_P,), tl.float32)
    for start in range(0, n_vblocks, BLOCK_P):
        mask = tl.arange(0, BLOCK_P) + start < n_vblocks
        e = tl.exp(tl.load(part_max_ptr + parts + start, mask=mask, other=float("-inf")) - row_max)
        total += e * tl.load(part_sum_ptr + parts + start, mask=mask, other=0.0)
        if HAS_GHOST:
            total_g += e * tl.load(part_ghost_ptr + parts + start, mask=mask, other=0.0)
    lse = row_max + tl.log(tl.sum(total, axis=0))

    label = tl.load(labels_ptr + row)
    offs_h = tl.arange(0, BLOCK_H)
    acc = tl.zeros((BLOCK_H,), tl.float32)
    acc_g = tl.zeros((BLOCK_H,), tl.float32)
    for k in range(0, H, BLOCK_H):
        mask_h = offs_h + k < H
        h = tl.load(h_ptr + row.to(tl.int64) * stride_h + k + offs_h, mask=mask_h, other=0.0).to(tl.float32)
        acc += h * tl.load(w_ptr + label * stride_w + k + offs_h, mask=mask_h, other=0.0).to(tl.float32)
        if HAS_GHOST:
            acc_g += h * tl.load(g_ptr + label * stride_w + k + offs_h, mask=mask_h, other=0.0).to(tl.float32)
    target = tl.sum(acc, axis=0)
    if HAS_SOFTCAP:
        target = _softcap(target, softcap)
    tl.store(target_ptr + row, target)
    tl.store(ce_ptr + row, lse - target)
    coef = tl.load(coef_ptr + row)
    if HAS_GHOST:
        target_g = tl.sum(acc_g, axis=0)
        if HAS_SOFTCAP:
            th = target / softcap
            target_g = target_g * (1.0 - th * th)
        tl.store(ghost_ptr + row, coef * (tl.sum(total_g, axis=0) * tl.exp(row_max - lse) - target_g))
    if WRITE_TILE_SCALE:
        coef = coef / tl.load(scale_ptr)
        for start in range(0, n_vblocks, BLOCK_P):
            mask = tl.arange(0, BLOCK_P) + start < n_vblocks
            tile_max = tl.load(part_max_ptr + parts + start, mask=mask, other=0.0)
            tl.store(part_sum_ptr + parts + start, coef * tl.exp(tile_max - lse), mask=mask)


@triton.jit
def _dlogits_kernel(
    p_ptr, tile_scale_ptr, tile_max_ptr, target_ptr, labels_ptr, coef_ptr, scale_ptr, V, stride_p, n_vblocks,
    softcap,
    HAS_SOFTCAP: tl.constexpr, INTERPRET_BF16: tl.constexpr, TILE_V: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """One row: dz / scale = coef / scale * (softmax(s) - onehot(label)) * ds/dz, written in place over the
    row's exp(s - m).

    The softmax of column v is exp(s_v - m) * exp(m - lse) with m the max of its tile of _logits_kernel (TILE_V
    columns); tile_scale = coef / scale * exp(m - lse) per (row, tile), from _rows_kernel. With the soft-cap,
    s_v = m + log(exp(s_v - m)) gives ds/dz = 1 - (s_v / softcap)^2; the label's s_y (target, exact) is used in
    its column.
    """
    row = tl.program_id(0)
    label = tl.load(labels_ptr + row)
    coef = tl.load(coef_ptr + row) / tl.load(scale_ptr)
    p_row = p_ptr + row.to(tl.int64) * stride_p
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < V
        tile = row * n_vblocks + cols // TILE_V
        is_label = cols == label
        p = tl.load(p_row + cols, mask=mask, other=0.0).to(tl.float32)
        g = p * tl.load(tile_scale_ptr + tile, mask=mask, other=0.0) - tl.where(is_label, coef, 0.0)
        if HAS_SOFTCAP:  # d(softcap * tanh(z / softcap))/dz = 1 - tanh^2 (where p underflowed, g is 0 anyway)
            s = tl.load(tile_max_ptr + tile, mask=mask, other=0.0) + tl.log(tl.maximum(p, 1e-30))
            s = tl.where(is_label, tl.load(target_ptr + row), s)
            th = tl.clamp(s / softcap, -1.0, 1.0)
            g = g * (1.0 - th * th)
        tl.store(p_row + cols, _round_bf16(g, INTERPRET_BF16).to(p_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dhidden_kernel(
    dz_ptr, w_ptr, dh_ptr, scale_ptr, C, V, H, stride_dz, stride_w, stride_dh, v_per_split,
    SPLIT_K: tl.constexpr, PRECISION: tl.constexpr, INTERPRET_BF16: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    """Tile (BLOCK_T, BLOCK_H) of dh = scale * dz W, over the vocabulary columns [v0, v0 + v_per_split) with
    v0 = program_id(1) * v_per_split. Stored in dh's dtype, or with SPLIT_K added atomically into an fp32 dh:
    a chunk of few rows has too few (row, column) tiles to fill the GPU, so the vocabulary is split as well."""
    pid = tl.program_id(0)
    n_hblocks = tl.cdiv(H, BLOCK_H)
    pid_h = pid % n_hblocks
    pid_t = pid // n_hblocks
    v0 = tl.program_id(1) * v_per_split
    v_end = tl.minimum(V, v0 + v_per_split)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_v = v0 + tl.arange(0, BLOCK_V)
    mask_t, mask_h = offs_t < C, offs_h < H
    dz_ptrs = dz_ptr + offs_t[:, None].to(tl.int64) * stride_dz + offs_v[None, :]  # (BLOCK_T, BLOCK_V)
    w_ptrs = w_ptr + offs_v[:, None].to(tl.int64) * stride_w + offs_h[None, :]  # (BLOCK_V, BLOCK_H)
    acc = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float32)
    for k in range(0, v_end - v0, BLOCK_V):
        mask_v = offs_v + k < v_end
        a = tl.load(dz_ptrs, mask=mask_t[:, None] & mask_v[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=mask_v[:, None] & mask_h[None, :], other=0.0)
        if INTERPRET_BF16:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        dz_ptrs += BLOCK_V
        w_ptrs += BLOCK_V * stride_w
    dh_ptrs = dh_ptr + offs_t[:, None].to(tl.int64) * stride_dh + offs_h[None, :]
    acc = tl.load(scale_ptr) * acc
    mask = mask_t[:, None] & mask_h[None, :]
    if SPLIT_K:
        tl.atomic_add(dh_ptrs, acc, mask=mask, sem="relaxed")
    else:
        tl.store(dh_ptrs, _round_bf16(acc, INTERPRET_BF16).to(dh_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dweight_kernel(
    dz_ptr, h_ptr, dw_ptr, scale_ptr, C, V, H, stride_dz, stride_h, stride_dw,
    PRECISION: tl.constexpr, INTERPRET_BF16: tl.constexpr,
    BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    """Tile (BLOCK_V, BLOCK_H) of dW += scale * dz^T h, summed in fp32, added in place into dW (all chunks)."""
    pid = tl.program_id(0)
    n_hblocks = tl.cdiv(H, BLOCK_H)
    pid_h = pid % n_hblocks  # column blocks vary fastest: a column block of dz is reused from L2
    pid_v = pid // n_hblocks
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_t = tl.arange(0, BLOCK_T)
    mask_v, mask_h = offs_v < V, offs_h < H
    dzt_ptrs = dz_ptr + offs_t[None, :].to(tl.int64) * stride_dz + offs_v[:, None]  # (BLOCK_V, BLOCK_T) of dz^T
    h_ptrs = h_ptr + offs_t[:, None].to(tl.int64) * stride_h + offs_h[None, :]  # (BLOCK_T, BLOCK_H)
    acc = tl.zeros((BLOCK_V, BLOCK_H), dtype=tl.float32)
    for k in range(0, C, BLOCK_T):
        mask_k = offs_t + k < C
        a = tl.load(dzt_ptrs, mask=mask_v[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(h_ptrs, mask=mask_k[:, None] & mask_h[None, :], other=0.0)
        if INTERPRET_BF16:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        dzt_ptrs += BLOCK_T * stride_dz
        h_ptrs += BLOCK_T * stride_h
    dw_ptrs = dw_ptr + offs_v[:, None].to(tl.int64) * stride_dw + offs_h[None, :]
    mask = mask_v[:, None] & mask_h[None, :]
    dw = tl.load(dw_ptrs, mask=mask, other=0.0).to(tl.float32) + tl.load(scale_ptr) * acc
    tl.store(dw_ptrs, _round_bf16(dw, INTERPRET_BF16).to(dw_ptr.dtype.element_ty), mask=mask)


# Tiles (and num_warps, num_stages) per kernel. On CUDA: Hopper-sized GEMM tiles (the ghost variant of the logits
# kernel holds two accumulators, hence its narrower tile). Under the interpreter: small tiles, so that small odd
# test shapes span several tiles and exercise every mask.
_CUDA_CONFIG = {
    "logits": dict(BLOCK_T=128, BLOCK_V=256, BLOCK_H=64, num_warps=8, num_stages=3),
    "logits_ghost": dict(BLOCK_T=128, BLOCK_V=128, BLOCK_H=64, num_warps=8, num_stages=3),
    "rows": dict(BLOCK_H=1024, BLOCK_P=1024, num_warps=4),
    "dlogits": dict(BLOCK=4096, num_warps=8),
    "dhidden": dict(BLOCK_T=128, BLOCK_H=128, BLOCK_V=64, num_warps=8, num_stages=3),
    "dweight": dict(BLOCK_V=128, BLOCK_H=128, BLOCK_T=64, num_warps=8, num_stages=3),
}
# fp32 inputs (exactness, rarely trained in): the products run on FMA units, not tensor cores; these tiles keep
# every kernel under 255 registers without spills (bench/sm90_compile.py).
_CUDA_CONFIG_FP32 = {
    **_CUDA_CONFIG,
    "logits": dict(BLOCK_T=128, BLOCK_V=128, BLOCK_H=32, num_warps=8, num_stages=3),
    "logits_ghost": dict(BLOCK_T=64, BLOCK_V=128, BLOCK_H=32, num_warps=8, num_stages=3),
    "dhidden": dict(BLOCK_T=128, BLOCK_H=128, BLOCK_V=32, num_warps=8, num_stages=3),
    "dweight": dict(BLOCK_V=128, BLOCK_H=128, BLOCK_T=32, num_warps=8, num_stages=3),
}
_INTERPRETER_CONFIG = {
    "logits": dict(BLOCK_T=16, BLOCK_V=32, BLOCK_H=16),
    "logits_ghost": dict(BLOCK_T=16, BLOCK_V=32, BLOCK_H=16),
    "rows": dict(BLOCK_H=16, BLOCK_P=8),
    "dlogits": dict(BLOCK=128),
    "dhidden": dict(BLOCK_T=16, BLOCK_H=16, BLOCK_V=32),
    "dweight": dict(BLOCK_V=32, BLOCK_H=16, BLOCK_T=16),
}


def _triton_chunk_rows(vocab: int, itemsize: int) -> int:
    """Rows per chunk: the chunk's (rows, V) buffer in the input dtype takes at most 128 MiB, the size of
    Liger-Kernel's logits chunk (512 bf16 rows for a 128K vocabulary); a multiple of 128 rows (the row tile)."""
    return max(128, (1 << 27) // (itemsize * vocab) // 128 * 128)


def _multiprocessors(device: torch.device) -> int:
    """Streaming multiprocessors of the GPU; under the interpreter a small number, so that tests split too."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def _dhidden_splits(n_tiles: int, n_vblocks: int, device: torch.device) -> int:
    """Vocabulary splits of the d hidden GEMM: enough for 2 programs per multiprocessor when the chunk has fewer
    (row, column) tiles, at least 2 column blocks each; 1 under torch.use_deterministic_algorithms (the split
    sums are fp32 atomics, whose order varies)."""
    if torch.are_deterministic_algorithms_enabled():
        return 1
    return max(1, min(2 * _multiprocessors(device) // n_tiles, n_vblocks // 2))


def _chunk_triton(h, weight, labels, coef, ghost_weight, softcap, d_weight, d_hidden):
    """Triton version of `_chunk_torch` (same arguments and results)."""
    C, H = h.shape
    V = weight.shape[0]
    device = h.device
    if interpret_mode():
        config = _INTERPRETER_CONFIG
    else:
        config = _CUDA_CONFIG_FP32 if h.dtype == torch.float32 else _CUDA_CONFIG
    precision = "ieee" if h.dtype == torch.float32 else "tf32"  # fp32 inputs: no TF32 rounding
    # The Triton interpreter's tl.dot multiplies bf16 bit patterns as integers, and its fp32 -> bf16 casts truncate:
    # under it, bf16 dot operands are upcast (exact in fp32) and bf16 results rounded to nearest even, as on a GPU.
    interpret_bf16 = interpret_mode() and h.dtype == torch.bfloat16
    has_softcap, softcap = softcap is not None, float(softcap or 1.0)
    has_ghost, need_dz = ghost_weight is not None, d_weight is not None or d_hidden is not None
    ghost_weight = ghost_weight if has_ghost else weight  # a placeholder pointer when there is no ghost head

    # 1. Logits tiles: log-sum-exp partials, ghost partials, and exp(s - tile max) kept if gradients are needed.
    cfg = config["logits_ghost" if has_ghost else "logits"]
    tile_v, n_vblocks = cfg["BLOCK_V"], triton.cdiv(V, cfg["BLOCK_V"])
    probs = torch.empty((C, V) if need_dz else (1,), dtype=h.dtype, device=device)
    # fp32 scratch: the tile partials, then (once _dlogits_kernel has read them) the split-K sums of d hidden.
    n_parts = 3 if has_ghost else 2
    scratch = torch.empty(max(n_parts * C * n_vblocks, C * H), dtype=torch.float32, device=device)
    parts = scratch[: n_parts * C * n_vblocks].view(n_parts, C, n_vblocks)
    part_max, part_sum, part_ghost = parts[0], parts[1], parts[-1]
    launchable(_logits_kernel)[(triton.cdiv(C, cfg["BLOCK_T"]) * n_vblocks,)](
        h, weight, ghost_weight, probs, part_max, part_sum, part_ghost,
        C, V, H, h.stride(0), weight.stride(0), probs.stride(0), n_vblocks, softcap,
        HAS_SOFTCAP=has_softcap, HAS_GHOST=has_ghost, STORE_P=need_dz,
        PRECISION=precision, INTERPRET_BF16=interpret_bf16, **cfg,
    )  # fmt: skip

    # 2. Per row: log-sum-exp, the label's logit, loss, ghost dot; the tile scales of step 3 over part_sum.
    # scale = max |coef| keeps dz / scale in [-1, 1], clear of fp16 underflow (coef is 1/N for a token-mean loss);
    # the GEMMs below multiply it back in fp32.
    scale = coef.abs().max().clamp_min(1e-30).reshape(1)
    ce, target = torch.empty(2, C, dtype=torch.float32, device=device)
    ghost = torch.empty(C, dtype=torch.float32, device=device) if has_ghost else None
    launchable(_rows_kernel)[(C,)](
        h, weight, ghost_weight, labels, coef, scale, part_max, part_sum, part_ghost,
        ce, target, ghost if has_ghost else ce, H, h.stride(0), weight.stride(0), n_vblocks, softcap,
        HAS_SOFTCAP=has_softcap, HAS_GHOST=has_ghost, WRITE_TILE_SCALE=need_dz, **config["rows"],
    )  # fmt: skip
    if not need_dz:
        return ce, ghost

    # 3. dz / scale in the input dtype, in place over probs.
    dz = probs
    launchable(_dlogits_kernel)[(C,)](
        dz, part_sum, part_max, target, labels, coef, scale, V, dz.stride(0), n_vblocks, softcap,
        HAS_SOFTCAP=has_softcap, INTERPRET_BF16=interpret_bf16, TILE_V=tile_v, **config["dlogits"],
    )  # fmt: skip

    # 4. d hidden = dz W, split over the vocabulary too when the chunk has fewer tiles than the GPU runs at once.
    if d_hidden is not None:
        cfg = config["dhidden"]
        n_tiles = triton.cdiv(C, cfg["BLOCK_T"]) * triton.cdiv(H, cfg["BLOCK_H"])
        n_vblocks = triton.cdiv(V, cfg["BLOCK_V"])
        splits = _dhidden_splits(n_tiles, n_vblocks, device)
        v_per_split = triton.cdiv(n_vblocks, splits) * cfg["BLOCK_V"]
        splits = triton.cdiv(V, v_per_split)
        out = scratch[: C * H].view(C, H).zero_() if splits > 1 else d_hidden
        launchable(_dhidden_kernel)[(n_tiles, splits)](
            dz, weight, out, scale, C, V, H, dz.stride(0), weight.stride(0), out.stride(0), v_per_split,
            SPLIT_K=splits > 1, PRECISION=precision, INTERPRET_BF16=interpret_bf16, **cfg,
        )  # fmt: skip
        if splits > 1:
            d_hidden.copy_(out)

    # 5. d weight += dz^T h (summed in fp32 within the chunk, added into d_weight's dtype across chunks).
    if d_weight is not None:
        cfg = config["dweight"]
        launchable(_dweight_kernel)[(triton.cdiv(V, cfg["BLOCK_V"]) * triton.cdiv(H, cfg["BLOCK_H"]),)](
            dz, h, d_weight, scale, C, V, H, dz.stride(0), h.stride(0), d_weight.stride(0),
            PRECISION=precision, INTERPRET_BF16=interpret_bf16, **cfg,
        )  # fmt: skip
    return ce, ghost


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
    """Per-task linear cross-entropy: Triton kernels on CUDA (backend="auto"), the reference elsewhere.

    The Triton kernels take bf16, fp16 and fp32; float64 (tests) runs the reference with backend="auto" and is
    an error with backend="triton"."""
    if hidden.dtype == torch.float64 and backend == "triton":
        raise ValueError("the Triton kernel takes bf16, fp16 or fp32 inputs, not float64 (use backend='torch')")
    if hidden.dtype == torch.float64 or resolve_backend(backend, hidden.device) == "torch":
        chunk_fn, chunk_rows = _chunk_torch, _reference_chunk_rows
    else:
        chunk_fn, chunk_rows = _chunk_triton, _triton_chunk_rows
        # The kernels take row-major heads; a strided one is copied once here, not once per chunk (autograd routes
        # the gradient through the copy).
        weight = weight.contiguous()
        ghost_weight = None if ghost_weight is None else ghost_weight.contiguous()
    # bf16 heads: d weight is summed across chunks in bf16 (as Liger-Kernel's), half the memory of an fp32 sum and
    # no copy at the end; fp16 would underflow (token-mean gradients are ~1/N), fp32 stays fp32.
    weight_grad_dtype = torch.bfloat16 if chunk_fn is _chunk_triton and weight.dtype == torch.bfloat16 else None
    return _linear_cross_entropy(
        chunk_fn, chunk_rows, hidden, weight, labels, task_ids, num_tasks,
        task_weights, ghost_weight, softcap, ignore_index, chunk_size, weight_grad_dtype,
    )  # fmt: skip
