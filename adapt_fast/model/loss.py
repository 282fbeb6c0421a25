"""The model's loss on a packed micro-batch, per task, through the fused linear + cross-entropy kernel.

The decoder yields hidden states (T, H); the LM head never materialises the (T, V) logits: the
kernel computes per-task loss sums and counts, the weighted scalar to backpropagate, and (on meta
steps) the head's share of the per-task gradient dot products.

Under DeepSpeed ZeRO-3 the head weight is a partitioned parameter that only its own module's forward gathers;
the kernel reads it outside that forward. `attach_zero3_head_loss` adds a parameterless `HeadLoss` module to the
model, with the head weight registered as its external parameter, and `per_task_loss` then runs the kernel as
that module's forward: ZeRO-3 gathers the weight around it (and its backward) like any weight of a module.
"""

from __future__ import annotations

import torch

from adapt_fast.data.batch import MicroBatch
from adapt_fast.kernels import PerTaskLoss, per_task_linear_cross_entropy
from adapt_fast.model.loading import base_model, lm_head, unwrap

HEAD_LOSS_MODULE = "adapt_fast_head_loss"  # name of the HeadLoss child under ZeRO-3


class HeadLoss(torch.nn.Module):
    """per_task_linear_cross_entropy as a module (ZeRO-3). Only `hidden` is positional: DeepSpeed's hooks wrap
    positional inputs, and the weight must reach the kernel as the gathered parameter itself."""

    def forward(self, hidden: torch.Tensor, **kwargs) -> tuple[torch.Tensor, ...]:
        out = per_task_linear_cross_entropy(hidden, **kwargs)
        return out.loss, out.loss_sum, out.count, out.ghost_dot  # tensors ZeRO-3's hooks can see


def attach_zero3_head_loss(model: torch.nn.Module) -> None:
    """Give the model (before deepspeed.initialize, which hooks every module) a HeadLoss child whose forward
    gathers the head weight (tied or not) under ZeRO-3."""
    import deepspeed

    weight = lm_head(model).weight
    module = HeadLoss()
    unwrap(model).add_module(HEAD_LOSS_MODULE, module)
    deepspeed.zero.register_external_parameter(module, weight)


def hidden_states(model: torch.nn.Module, batch: MicroBatch) -> torch.Tensor:
    """(T, H) final hidden states (final norm applied) of the packed micro-batch."""
    return base_model(model)(**batch.model_inputs()).last_hidden_state[0]


def per_task_loss(
    model: torch.nn.Module,
    batch: MicroBatch,
    task_weights: torch.Tensor,
    ghost_weight: torch.Tensor | None = None,
    backend: str = "auto",
) -> PerTaskLoss:
    """Forward the micro-batch; `loss` = Σ_k task_weights[k]·loss_sum[k] backpropagates into the model.

    task_weights (K,) fp32: 1/N for the token-mean training loss over N loss tokens, w_k/N_k for
    the validation objective. ghost_weight (V, H): G of the head weight (tied or not) on meta steps.
    """
    hidden = hidden_states(model, batch)
    weight, scale, softcap = lm_head(model)
    if scale is not None:  # scale · (hidden @ weight.T) = (scale · hidden) @ weight.T
        hidden = hidden * scale
    kwargs = dict(
        weight=weight,
        labels=batch.shift_labels(),
        task_ids=batch.task_ids,
        num_tasks=batch.num_tasks,
        task_weights=task_weights,
        ghost_weight=ghost_weight,
        softcap=softcap,
        backend=backend,
    )
    head_loss = getattr(unwrap(model), HEAD_LOSS_MODULE, None)
    if head_loss is None:
        return per_task_linear_cross_entropy(hidden, **kwargs)
    return PerTaskLoss(*head_loss(hidden, **kwargs))
