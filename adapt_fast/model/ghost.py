"""Per-task gradient dot products in one backward pass (DESIGN.md section 2), and their references.

On a meta step the trainer needs, for every task k in the packed micro-batch, D_k = <G, grad of task k's share
of the loss> with G the validation gradient. Attention never crosses examples, so the gradient of every token-wise
layer splits exactly over tokens, and so over tasks, without ever forming a per-task gradient:

    Linear     y = W x + b     D_k += sum_{t in k} delta_t^T G_W x_t + delta_t . G_b     (adapt_fast.kernels)
    Embedding  y = E[id]       D_k += sum_{t in k} delta_t . G_E[id_t]
    any other token-wise module (RMSNorm, Gemma's (1 + w) form, Qwen3's / Gemma 3's per-head q_norm / k_norm):
               D_k += sum_{t in k} delta_t . (d y_t along G)      (forward-mode jvp of the module in its params)

with delta_t = dL/dy_t, caught by a tensor hook on the module output. The LM head is not hooked: per_task_loss
never calls it, the fused kernel returns its share (`ghost_dot`) given G of the head weight. A tied head weight is
the embedding weight: the embedding hook covers the embedding use, the kernel the head use, with the same G.

    with GhostDots(model, G, task_ids, num_tasks) as ghost:
        out = per_task_loss(model, batch, task_weights, ghost_weight=ghost.head_ghost_weight)
        out.loss.backward()                                  # or engine.backward(out.loss), see add_head
    D = ghost.dots + out.ghost_dot                           # (K,) float64, w.r.t. the backpropagated scalar
    d, missing = task_mean_dots(D, out.count, N)             # d_k = <G, grad of task k's mean loss>

`exact_task_dots` computes the same with K backward passes (the reference); `validation_gradient` gives G.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Sequence

import torch
from torch import nn
from torch.func import jvp
from transformers.pytorch_utils import Conv1D

from adapt_fast.data.batch import IGNORE_INDEX, MicroBatch
from adapt_fast.errors import some_of
from adapt_fast.kernels import PerTaskLoss, per_task_ghost_dot, per_task_weight_grad, reference_kernels
from adapt_fast.model import zero3
from adapt_fast.model.loading import unwrap
from adapt_fast.model.loss import per_task_loss

# Modules whose output at token t depends on the input at token t only (checked by class, not by running them).
TOKENWISE_NORM = re.compile(r"(RMS|Layer)Norm\w*$")


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Name -> parameter of the unwrapped model, trainable only; tied parameters once under their first name."""
    return {name: p for name, p in unwrap(model).named_parameters() if p.requires_grad}


def head_parameter_name(model: nn.Module) -> str | None:
    """The G key of the LM head weight: its own name, or the embedding's when tied; None without a head."""
    module = unwrap(model)
    head = module.get_output_embeddings()
    if head is None:
        return None
    return next((name for name, p in module.named_parameters() if p is head.weight), None)


def _kind(module: nn.Module) -> str | None:
    """How a module's own parameters are dotted: "linear", "conv1d" (GPT-2's Conv1D: a linear layer with its weight
    stored (in, out)), "embedding", "jvp", or None (unsupported)."""
    if isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward:
        return "linear"
    if isinstance(module, Conv1D) and type(module).forward is Conv1D.forward:
        return "conv1d"
    if isinstance(module, nn.Embedding) and type(module).forward is nn.Embedding.forward:
        return "embedding"
    if isinstance(module, (nn.Linear, nn.Embedding, nn.LayerNorm, nn.RMSNorm)):
        return "jvp"  # subclasses with their own forward (e.g. Gemma's scaled embedding)
    if TOKENWISE_NORM.search(type(module).__name__) and not any(True for _ in module.children()):
        return "jvp"
    return None


def hooked_modules(model: nn.Module) -> tuple[list[tuple[nn.Module, str, dict[str, nn.Parameter]]], list[str]]:
    """The modules GhostDots hooks, as (module, kind, {local name: trainable parameter}) for every module that owns
    trainable parameters directly (the LM head left to the fused kernel), and the trainable parameters outside any
    module it can dot, as "name (module class)" (empty when the model is fully supported)."""
    module = unwrap(model)
    head = module.get_output_embeddings()
    head_weight = head.weight if head is not None else None
    hooked, covered, unsupported = [], set(), {}
    for mod in module.modules():
        if mod is head:  # the fused kernel covers the head (per_task_loss never calls it)
            continue
        own = {n: p for n, p in mod.named_parameters(recurse=False) if p.requires_grad}
        if not own:
            continue
        kind = _kind(mod)
        if kind is None:
            unsupported.update({id(p): type(mod).__name__ for p in own.values()})
            continue
        hooked.append((mod, kind, own))
        covered |= {id(p) for p in own.values()}
    uncovered = [
        f"{n} ({unsupported.get(id(p), 'not token-wise')})"
        for n, p in trainable_parameters(module).items()
        if id(p) not in covered and p is not head_weight
    ]
    return hooked, uncovered


def uncovered_message(uncovered: list[str], most: int = 4) -> str:
    """One line naming (the first few of) the parameters whose per-task dots cannot be taken."""
    return (
        "these trainable parameters are not in a module known to act token-wise (Linear, Conv1D, Embedding, "
        f"*RMSNorm / *LayerNorm), so their per-task dots cannot be taken in one pass: {some_of(uncovered, most)}"
    )


def _token_dim(x: torch.Tensor, T: int) -> int:
    """The dim of a module input that indexes the T token slots: (1, T, ...), (T, ...), or Gemma 3's (1, heads, T, d)
    q_norm / k_norm input. Several dims of size T: the one with the largest stride (activations are token-major)."""
    dims = [i for i, s in enumerate(x.shape) if s == T]
    if not dims:
        raise ValueError(f"GhostDots: a hooked module got a tensor of shape {tuple(x.shape)} with no dim of {T} tokens")
    return max(dims, key=lambda i: (x.stride(i), -i))


def _rows(t: torch.Tensor, dim: int, T: int) -> torch.Tensor:
    """(T, -1): one row per token slot, `dim` being the token dim."""
    return t.movedim(dim, 0).reshape(T, -1)


def _per_task(row: torch.Tensor, task_ids: torch.Tensor, num_tasks: int) -> torch.Tensor:
    """(T,) per-token values summed by task into (K,) float64; ids outside [0, K) dropped (no host sync)."""
    keep = (task_ids >= 0) & (task_ids < num_tasks)
    out = torch.zeros(num_tasks, dtype=torch.float64, device=row.device)
    return out.index_add_(0, torch.where(keep, task_ids, 0), torch.where(keep, row, 0).to(torch.float64))


def forward_with(module: nn.Module, params: dict[str, torch.Tensor], args: tuple, kwargs: dict):
    """module.forward with some of its own parameters replaced, skipping every hook (functional_call runs the
    module's hooks, e.g. HF's gradient-checkpointing make_inputs_require_grads, which fail inside jvp)."""
    saved = {n: module._parameters[n] for n in params}
    try:
        module._parameters.update(params)
        return module.forward(*args, **kwargs)
    finally:
        module._parameters.update(saved)


def _detach(x):
    return x.detach() if isinstance(x, torch.Tensor) else x


def _whole(entry: tuple[nn.Parameter, torch.Tensor]) -> torch.Tensor:
    """G of one (parameter, G entry): the entry itself, or under ZeRO-3 gathered from the ranks' partitions."""
    param, g = entry
    return zero3.gather(g, param) if zero3.is_partitioned(param) else g


def _value(param: nn.Parameter) -> torch.Tensor:
    """The parameter's values, detached; under ZeRO-3 gathered from the ranks' weight partitions when ZeRO-3 has
    released the parameter or its gather is still in flight (a collective; every rank asks at the same point of the
    backward, where the parameter's status is the same on every rank)."""
    if not zero3.is_gathered(param):
        return zero3.gather(param.ds_tensor.detach().to(param.device), param)
    return param.detach()


class _FoldedLinearFunction(torch.autograd.Function):
    """F.linear whose backward computes the weight gradient and the layer's per-task dots in one kernel
    (per_task_weight_grad) instead of autograd's dW plus a separate ghost dot."""

    @staticmethod
    def forward(ctx, x, weight, bias, ghost, module):
        ctx.save_for_backward(x, weight)  # the Parameter itself: ZeRO-3 re-gathers it for the backward
        ctx.ghost, ctx.module, ctx.params, ctx.has_bias = ghost, module, module._ghost_params, bias is not None
        return nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        ghost, params = ctx.ghost, ctx.params
        x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
        dx = (dy2 @ weight.to(dy2.dtype)).view(x.shape).to(x.dtype) if ctx.needs_input_grad[0] else None
        dW = db = None
        counted = ghost._active and x2.shape[0] == ghost.task_ids.numel() and x.dtype != torch.float64
        if ctx.needs_input_grad[1]:
            if counted and "weight" in params:
                G = _whole(params["weight"]).to(x.dtype)
                dW, dots = per_task_weight_grad(x2, dy2.to(x.dtype), G, ghost.offsets, backend=ghost.backend)
                ghost.dots += dots.to(torch.float64)
            else:
                dW = (dy2.T.to(x.dtype) @ x2).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy2.sum(0)
            if counted and "bias" in params:
                compute = torch.promote_types(dy2.dtype, torch.float32)
                row = dy2.to(compute) @ _whole(params["bias"]).to(compute)
                ghost.dots += _per_task(row, ghost.task_ids, ghost.num_tasks)
        if ghost._active and not counted:  # not this micro-batch's token rows, or float64: the hook's way
            ghost.dots += ghost._module_dots(ctx.module, "linear", params, (x.detach(),), {}, dy.detach())
        return dx, dW, db, None, None


class _FoldedLinear:
    """Mixin before a linear layer's class inside GhostDots(fold_linear=True): its backward takes the dots with the
    weight gradient."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _FoldedLinearFunction.apply(x, self.weight, self.bias, self._ghost, self)


@functools.cache
def _folded_class(cls: type) -> type:
    return type(f"Folded{cls.__name__}", (_FoldedLinear, cls), {"__module__": cls.__module__})


def task_offsets_if_grouped(task_ids: torch.Tensor, num_tasks: int) -> torch.Tensor | None:
    """(K+1,) offsets of task_ids (padding -1 counts as after the last task) when the tokens are grouped by task in
    task order, as packed micro-batches are; else None. One host sync."""
    ids = torch.where((task_ids >= 0) & (task_ids < num_tasks), task_ids, num_tasks)
    if ids.numel() > 1 and not bool((ids[1:] >= ids[:-1]).all()):
        return None
    return torch.searchsorted(ids, torch.arange(num_tasks + 1, device=ids.device))


class GhostDots:
    """Context manager: while active, the backward adds D_k = <G, grad of task k's share of the loss> to `dots`.

    model     the model (DDP / DeepSpeed wrappers are unwrapped), ZeRO stages 0-3.
    G         name -> tensor of the parameter's shape, for every trainable parameter (names as in
              trainable_parameters; the head weight's entry goes to the kernel, see head_ghost_weight).
              Under ZeRO-3: this rank's partition (validation_gradient's), gathered one module at a time in the
              backward, as ZeRO-3 gathers the weights (collectives: every rank runs the same model).
    task_ids  (T,) int64 task of every token slot of the packed micro-batch; -1 (padding) is ignored.
    dots      (K,) float64 accumulator, reset on __enter__; it never holds per-task gradients.

    fold_linear  take each nn.Linear's dots with its weight gradient in one kernel (per_task_weight_grad: the layer
              changes class inside the context) instead of a separate ghost-dot GEMM from a hook; needs tokens
              grouped by task (packed micro-batches are), else the hooks run. Not the trainer's path yet
              (bench/meta_gradient.py times both).

    Per-token products are computed in fp32 (float64 for a float64 model) and summed into float64 on any device.
    Only modules known to act token-wise are hooked; a trainable parameter outside them (other than the head
    weight) raises ValueError at construction, so an unsupported architecture fails loudly.
    """

    def __init__(
        self,
        model: nn.Module,
        G: dict[str, torch.Tensor],
        task_ids: torch.Tensor,
        num_tasks: int,
        backend: str = "auto",
        fold_linear: bool = False,
    ):
        module = unwrap(model)
        params = trainable_parameters(module)
        name_of = {id(p): name for name, p in params.items()}
        head = module.get_output_embeddings()
        head_weight = head.weight if head is not None else None

        missing = [n for n in params if n not in G]
        if missing:
            raise ValueError(f"GhostDots: G has no entry for {', '.join(missing)}")
        wrong = [
            n
            for n, p in params.items()
            if (G[n].numel() != zero3.partition_numel(p) if zero3.is_partitioned(p) else G[n].shape != p.shape)
        ]
        if wrong:
            raise ValueError(f"GhostDots: G has the wrong shape for {', '.join(wrong)}")

        # (module, kind, {local name: (parameter, G)}) for every module that owns trainable parameters directly.
        hooked, uncovered = hooked_modules(module)
        if uncovered:
            raise ValueError(f"GhostDots: {uncovered_message(uncovered)}")
        self.plan: list[tuple[nn.Module, str, dict[str, tuple[nn.Parameter, torch.Tensor]]]] = [
            (mod, kind, {n: (p, G[name_of[id(p)]]) for n, p in own.items()}) for mod, kind, own in hooked
        ]

        device = next(iter(params.values())).device if params else torch.device("cpu")
        self.task_ids = task_ids.reshape(-1).to(device=device, dtype=torch.int64, non_blocking=True)
        self.num_tasks = int(num_tasks)
        self.backend = backend
        name = name_of.get(id(head_weight)) if head_weight is not None else None
        self.head_ghost_weight: torch.Tensor | None = (  # (V, H) or None; gathered now under ZeRO-3
            _whole((head_weight, G[name])) if name is not None else None
        )
        self.dots = torch.zeros(self.num_tasks, dtype=torch.float64, device=device)
        self.loss_grad: torch.Tensor | None = None  # gradient that reached the loss (set by add_head)
        self.offsets = task_offsets_if_grouped(self.task_ids, self.num_tasks) if fold_linear else None
        self._handles: list = []
        self._swapped: list[tuple[nn.Module, type]] = []
        self._active = False

    # ------------------------------------------------------------------ context

    def __enter__(self) -> GhostDots:
        self.dots.zero_()
        self.loss_grad = None
        self._active = True
        for mod, kind, params in self.plan:
            if kind == "linear" and self.offsets is not None:
                self._swapped.append((mod, type(mod)))
                mod.__class__, mod._ghost, mod._ghost_params = _folded_class(type(mod)), self, params
                continue
            hook = self._forward_hook(kind, params)
            self._handles.append(mod.register_forward_hook(hook, with_kwargs=True))
        return self

    def __exit__(self, *exc) -> bool:
        self._active = False
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for mod, cls in self._swapped:
            mod.__class__ = cls
            del mod._ghost, mod._ghost_params
        self._swapped.clear()
        return False

    def add_head(self, out: PerTaskLoss) -> None:
        """Count the head's share into `dots` when the backward reaches `out.loss`.

        The kernel's out.ghost_dot assumes an upstream gradient of 1; an engine may backpropagate a scaled loss
        (DeepSpeed: 1/gradient_accumulation_steps, fp16 loss scale). This scales it by the gradient that arrives,
        recorded in `loss_grad`, so that `dots` alone is D w.r.t. the backpropagated scalar (dots / loss_grad:
        w.r.t. out.loss). Without add_head: D = dots + out.ghost_dot, right for a plain out.loss.backward().
        """
        if out.ghost_dot is None:
            raise ValueError("GhostDots.add_head: out has no ghost_dot (pass ghost_weight to per_task_loss)")

        def on_grad(grad: torch.Tensor) -> None:
            if self._active:
                self.loss_grad = grad.detach().to(torch.float64)
                self.dots += self.loss_grad * out.ghost_dot.to(torch.float64)

        self._handles.append(out.loss.register_hook(on_grad))

    # ------------------------------------------------------------------ hooks

    def _forward_hook(self, kind: str, params: dict):
        def hook(module, args, kwargs, output):
            if not self._active or not torch.is_grad_enabled():
                return
            if not isinstance(output, torch.Tensor) or not output.requires_grad:
                return  # e.g. reentrant checkpointing's no-grad forward; the recompute registers instead
            args = tuple(_detach(a) for a in args)
            kwargs = {k: _detach(v) for k, v in kwargs.items()}

            def on_grad(delta: torch.Tensor) -> None:
                if self._active:
                    self.dots += self._module_dots(module, kind, params, args, kwargs, delta.detach())

            self._handles.append(output.register_hook(on_grad))

        return hook

    def _module_dots(self, module, kind, params, args, kwargs, delta) -> torch.Tensor:
        """(K,) float64: sum over tokens of task k of delta_t . (d output_t along G) for one call of `module`."""
        T, K, ids = self.task_ids.numel(), self.num_tasks, self.task_ids
        compute = torch.promote_types(delta.dtype, torch.float32)
        dim = _token_dim(args[0], T)
        d = _rows(delta, dim, T)
        total = torch.zeros(K, dtype=torch.float64, device=delta.device)
        row = None  # (T,) per-token dots in `compute`
        if kind in ("linear", "conv1d"):
            x = _rows(args[0], dim, T)
            if "weight" in params:
                G = _whole(params["weight"])  # (out, in); Conv1D stores (in, out)
                total += self._linear_dots(x, d, G.T.contiguous() if kind == "conv1d" else G, ids, K)
            if "bias" in params:
                row = d.to(compute) @ _whole(params["bias"]).to(compute)
        elif kind == "embedding":
            row = (_whole(params["weight"])[_rows(args[0], dim, T)[:, 0]].to(compute) * d.to(compute)).sum(1)
        else:  # forward-mode directional derivative of the module output along G
            names = list(params)
            primals = tuple(_value(params[n][0]) for n in names)
            tangents = tuple(_whole(params[n]).to(params[n][0].dtype) for n in names)
            with torch.no_grad(), reference_kernels():  # a fused layer's kernel has no jvp rule: its own forward
                _, tangent = jvp(lambda *p: forward_with(module, dict(zip(names, p, strict=True)), args, kwargs),
                                 primals, tangents)  # fmt: skip
            row = (_rows(tangent, dim, T).to(compute) * d.to(compute)).sum(1)
        if row is not None:
            if isinstance(module, nn.Embedding) and module.padding_idx is not None:  # that row gets no gradient
                row = torch.where(_rows(args[0], dim, T)[:, 0] == module.padding_idx, 0, row)
            total += _per_task(row, ids, K)
        return total

    def _linear_dots(self, x, delta, G, ids, K) -> torch.Tensor:
        """(K,) float64 sum_{t in k} delta_t^T G x_t: the ghost-dot kernel; float64 inputs stay in float64."""
        if x.dtype == torch.float64:  # the kernel and its reference accumulate in fp32
            return _per_task(((x @ G.to(x.dtype).T) * delta.to(x.dtype)).sum(1), ids, K)
        dots = per_task_ghost_dot(x, delta.to(x.dtype), G.to(x.dtype), task_ids=ids, num_tasks=K, backend=self.backend)
        return dots.to(torch.float64)


def task_mean_dots(
    D: torch.Tensor, loss_tokens_per_task: torch.Tensor | Sequence[int], total_loss_tokens: int | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """From D (w.r.t. the token-mean loss over N = total_loss_tokens) to d_k = D_k N / N_k, the dot with the
    gradient of task k's mean loss. Returns d (K,) float64 (0 where N_k = 0) and missing (K,) bool (N_k = 0)."""
    D = D.to(torch.float64)
    counts = torch.as_tensor(loss_tokens_per_task, device=D.device).to(torch.float64)
    total = torch.as_tensor(total_loss_tokens, device=D.device).to(torch.float64)
    missing = counts == 0
    d = torch.where(missing, 0.0, D * total / counts.clamp(min=1))
    return d, missing


# ---------------------------------------------------------------------------------------------- references


def _loss_tokens(batch: MicroBatch, num_tasks: int) -> torch.Tensor:
    """(K,) int64 loss tokens per task of one micro-batch (task ids outside [0, K) ignored)."""
    ids = batch.task_ids
    mask = (batch.shift_labels() != IGNORE_INDEX) & (ids >= 0) & (ids < num_tasks)
    return torch.bincount(ids[mask], minlength=num_tasks)[:num_tasks]


def _dot(G: dict[str, torch.Tensor], names: list[str], grads: Iterable[torch.Tensor | None]) -> torch.Tensor:
    """sum_p <G_p, grad_p> in float64 (unused parameters: 0)."""
    terms = [(G[n].double() * g.double()).sum() for n, g in zip(names, grads, strict=True) if g is not None]
    return torch.stack(terms).sum() if terms else torch.zeros((), dtype=torch.float64)


def exact_task_dots(
    model: nn.Module, batch: MicroBatch, G: dict[str, torch.Tensor], num_tasks: int, backend: str = "torch"
) -> torch.Tensor:
    """(K,) float64 reference d_k = <G, grad of task k's mean token loss on `batch`>: one backward per task.

    0 for tasks with no loss token. For tests and tiny models (`meta.dots: exact`).
    """
    module = unwrap(model)
    params = trainable_parameters(module)
    names = list(params)
    device = next(iter(params.values())).device
    batch = batch.to(device)
    counts = _loss_tokens(batch, num_tasks).tolist()
    dots = torch.zeros(num_tasks, dtype=torch.float64, device=device)
    for k, n_k in enumerate(counts):
        if n_k == 0:
            continue
        one_hot = torch.zeros(num_tasks, dtype=torch.float32, device=device)
        one_hot[k] = 1.0  # task k's loss sum; divided by N_k below in float64 (1/N_k in fp32 would round)
        out = per_task_loss(module, batch, one_hot, backend=backend)
        grads = torch.autograd.grad(out.loss, [params[n] for n in names], allow_unused=True)
        dots[k] = _dot(G, names, grads).to(device) / n_k
    return dots


def validation_gradient(
    model: nn.Module,
    batches: Sequence[MicroBatch],
    weights_per_task: torch.Tensor | Sequence[float],
    backend: str = "auto",
) -> dict[str, torch.Tensor]:
    """G = grad of sum_k w_k * (mean loss of task k over all `batches`), name -> tensor in the parameter's dtype.

    Taken with torch.autograd.grad on the unwrapped module (no .grad touched, no engine hooks), accumulated in
    fp32 (float64 for float64 parameters) over the micro-batches with task weights w_k / N_k, N_k the task's loss
    tokens over all batches (tasks with N_k = 0 contribute nothing). Local to this rank: the caller may all-reduce.
    Under ZeRO-3 (partitioned parameters) each entry is instead this rank's partition of G already summed over the
    ranks (adapt_fast.model.zero3), reduced layer by layer as the backward produces it: a collective, and G is
    never whole on any rank.
    In the model's current mode: the trainer's is training mode, that of the gradients G is dotted with.
    """
    module = unwrap(model)
    params = trainable_parameters(module)
    names = list(params)
    device = next(iter(params.values())).device
    weights = torch.as_tensor(weights_per_task, dtype=torch.float64, device=device)
    K = weights.numel()
    batches = [b.to(device) for b in batches]
    counts = sum((_loss_tokens(b, K) for b in batches), torch.zeros(K, dtype=torch.int64, device=device))
    task_weights = torch.where(counts > 0, weights / counts.clamp(min=1), 0.0).to(torch.float32)
    partitioned = any(zero3.is_partitioned(p) for p in params.values())
    G = {
        n: torch.zeros(
            zero3.partition_numel(p) if partitioned else p.shape,
            dtype=torch.promote_types(p.dtype, torch.float32),
            device=device,
        )
        for n, p in params.items()
    }
    handles = [params[n].register_hook(_reduce_into(G[n], params[n])) for n in names] if partitioned else []
    try:
        for batch in batches:
            out = per_task_loss(module, batch, task_weights, backend=backend)
            grads = torch.autograd.grad(out.loss, [params[n] for n in names], allow_unused=True)
            if not partitioned:
                for n, g in zip(names, grads, strict=True):
                    if g is not None:
                        G[n] += g
    finally:
        for handle in handles:
            handle.remove()
    return {n: G[n].to(params[n].dtype) for n in names}


def _reduce_into(partition: torch.Tensor, param: nn.Parameter):
    """A tensor hook for ZeRO-3: add the summed-over-ranks partition of the parameter's gradient to `partition`,
    and hand autograd a stride-0 zero instead, so the whole gradient is freed at once."""

    def hook(grad: torch.Tensor) -> torch.Tensor:
        partition.add_(zero3.reduce_scatter_sum(grad, param, partition.dtype))
        return torch.zeros((), dtype=grad.dtype, device=grad.device).expand(grad.shape)

    return hook


@torch.no_grad()
def validation_losses(
    model: nn.Module, batches: Sequence[MicroBatch], num_tasks: int, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean token loss per task over all `batches`, in eval mode (no dropout; the mode is restored after):
    losses (K,) float64 (nan where a task has no loss token) and loss-token counts (K,) int64."""
    module = unwrap(model)
    device = next(module.parameters()).device
    loss_sum = torch.zeros(num_tasks, dtype=torch.float64, device=device)
    counts = torch.zeros(num_tasks, dtype=torch.int64, device=device)
    ones = torch.ones(num_tasks, dtype=torch.float32, device=device)
    was_training = module.training
    module.eval()
    try:
        for batch in batches:
            out = per_task_loss(module, batch.to(device), ones, backend=backend)
            loss_sum += out.loss_sum.to(torch.float64)
            counts += out.count
    finally:
        module.train(was_training)
    return torch.where(counts > 0, loss_sum / counts.clamp(min=1), float("nan")), counts
