"""The model's loss on a packed micro-batch, per task, through the fused linear + cross-entropy kernel.

The decoder yields hidden states (T, H); the LM head never materialises the (T, V) logits: the
kernel computes per-task loss sums and counts, the weighted scalar to backpropagate, and (on meta
steps) the head's share of the per-task gradient dot products.
"""

from __future__ import annotations

import torch

from adapt_fast.data.batch import MicroBatch
from adapt_fast.kernels import PerTaskLoss, per_task_linear_cross_entropy
from adapt_fast.model.loading import base_model, lm_head_and_softcap


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
    weight, softcap = lm_head_and_softcap(model)
    return per_task_linear_cross_entropy(
        hidden,
        weight,
        batch.shift_labels(),
        batch.task_ids,
        batch.num_tasks,
        task_weights=task_weights,
        ghost_weight=ghost_weight,
        softcap=softcap,
        backend=backend,
    )
