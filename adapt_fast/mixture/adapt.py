"""ADAPT: the learned task mixture (DESIGN.md section 1).

Logits alpha (K,), mixture p = (1 - eps) * softmax(alpha) + eps / K over the K training tasks.

Objective. Phi(theta) = tau * log sum_k exp(l_k / tau) over the objective tasks (validation losses,
optionally relative: l_k / l_k(theta_0)). Its gradient is grad Phi = sum_k w_k grad l_k with
w = softmax(l / tau), so the trainer backpropagates the scalar sum_k w_k * l_k with w *detached*
(from `objective_weights`) to get G = grad Phi.

Update. With d_k = <G, g_k> (g_k: gradient of task k's mean training loss) and eta the model's
learning rate, J(alpha) = Phi(theta+) - lambda * H(p) has
    u_k = dJ/dp_k = -eta * d_k + lambda * (log p_k + 1)
    dJ/dalpha = (1 - eps) * q * (u - <q, u>),   q = softmax(alpha)
and alpha takes one step of its own optimizer (Adam or SGD, learning rate beta) downhill on J.
A task whose gradient agrees with the objective's (d_k > 0) gains share.

Scale (`normalize`). At a stationary point p_k ∝ exp(eta * d_k / lambda): with `none` (the formula
above) lambda is in units of eta * d, so the mixture's sharpness follows the learning-rate schedule
and the shrinking gradients (flat early or late, sharp in between). With `rms`, eta * d is divided
by a running RMS over tasks of eta * d (EMA, decay 0.9), so lambda is dimensionless: p_k ∝
exp(z_k / lambda) with z_k the task's lookahead gain in RMS units, at every point of training.

Everything is float64 numpy and deterministic, so every rank updates alpha identically and a
resumed run continues bit-exactly (state_dict holds alpha, Adam's moments, the step count and l0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from adapt_fast.errors import ConfigError


@dataclass
class AdaptSettings:
    """ADAPT's hyper-parameters (config section `mixture`).

    Defaults:
    - tau = 1: validation losses are O(1) nats, so tau = 1 weights a task 0.5 nats worse than another
      by e^0.5 ~ 1.6x: clearly toward the worst tasks, without collapsing onto a single one.
    - entropy_weight = 1e-3: at a stationary point p_k ∝ exp(eta * d_k / lambda), so lambda is in units
      of one step's validation-loss change: a task whose step improves Phi by 1e-3 nats more than
      another's gets e x the share. That is the order of a fine-tuning step's loss decrease.
    - floor = 0.05: no task ever goes below 0.05 / K of the tokens, so every d_k stays measured and
      a task can come back.
    - optimizer = adam, lr = 0.05: the scale of d_k changes by orders of magnitude across models and
      during training (gradient norms shrink, AdamW preconditioning); Adam's step is ~lr in each
      logit whatever that scale, so lr = 0.05 moves a task's share by at most ~5% per update and by
      a factor e in ~20 updates. SGD's step is proportional to d_k, and lr then needs tuning per model.
    - prior = uniform: alpha_0 = 0. "proportional" (the data's token shares) or "fixed" (the user's
      mixture.weights): alpha_0 = log(prior_weights), so p_0 = (1 - eps) * prior + eps / K.
    - normalize = none: u_k as in DESIGN.md (lambda absolute). "rms": the lookahead term in units of
      its running RMS over tasks, so lambda is dimensionless (use lambda ~ 1; bench/reproduce.py
      compares both).
    - adam_betas, adam_eps: Adam's usual betas; eps far below any real gradient of alpha (float64),
      so Adam stays scale-free even when eta * d_k is ~1e-8.
    """

    tau: float = 1.0  # temperature of the smooth worst case (log-sum-exp)
    entropy_weight: float = 1e-3  # lambda
    floor: float = 0.05  # epsilon: p = (1 - eps) * softmax(alpha) + eps / K
    lr: float = 0.05  # beta, the mixture optimizer's learning rate
    optimizer: str = "adam"  # adam | sgd
    prior: str = "uniform"  # uniform | proportional | fixed (alpha_0 = 0, or log of prior_weights)
    relative_loss: bool = False  # use l_k / l_k(theta_0)
    normalize: str = "none"  # none | rms: eta * d_k divided by its running RMS over tasks
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-12

    def __post_init__(self):
        checks = [
            (self.tau > 0, f"mixture.tau must be > 0, got {self.tau}"),
            (self.entropy_weight >= 0, f"mixture.entropy_weight must be >= 0, got {self.entropy_weight}"),
            (0.0 <= self.floor < 1.0, f"mixture.floor (epsilon) must be in [0, 1), got {self.floor}"),
            (self.lr > 0, f"mixture.lr must be > 0, got {self.lr}"),
            (self.optimizer in ("adam", "sgd"), f"mixture.optimizer must be adam or sgd, got {self.optimizer!r}"),
            (
                self.prior in ("uniform", "proportional", "fixed"),
                f"mixture.prior must be uniform, proportional or fixed, got {self.prior!r}",
            ),
            (self.normalize in ("none", "rms"), f"mixture.normalize must be none or rms, got {self.normalize!r}"),
            (all(0.0 <= b < 1.0 for b in self.adam_betas), f"adam_betas must be in [0, 1), got {self.adam_betas}"),
            (self.adam_eps >= 0, f"adam_eps must be >= 0, got {self.adam_eps}"),
        ]
        for ok, message in checks:
            if not ok:  # `not (x > 0)` also catches nan
                raise ConfigError(message)


def softmax(x: np.ndarray) -> np.ndarray:
    """softmax of a float64 vector, stable for any finite x."""
    e = np.exp(x - x.max())
    return e / e.sum()


def mixture_entropy(p: np.ndarray) -> float:
    """H(p) = -sum_k p_k log p_k in nats (0 log 0 = 0); log K for the uniform mixture."""
    p = np.asarray(p, dtype=np.float64)
    nz = p[p > 0]
    return float(-(nz * np.log(nz)).sum())


class AdaptMixture:
    """The mixture p over K training tasks, learned from validation losses of the objective tasks.

    task_names      the K training tasks (the mixture is over all of them)
    settings        AdaptSettings
    prior_weights   (K,) >= 0, required when settings.prior is "proportional" or "fixed" (the
                    static mixture of that name); alpha_0 = log(prior / sum(prior)).
                    Ignored when settings.prior == "uniform" (alpha_0 = 0).
    objective_tasks indices (into task_names) of the tasks whose validation losses form Phi
                    (meta.val_tasks); default: all K
    """

    def __init__(
        self,
        task_names: list[str],
        settings: AdaptSettings,
        prior_weights: np.ndarray | None = None,
        objective_tasks: list[int] | None = None,
    ):
        self.task_names = list(task_names)
        self.settings = settings
        K = self.num_tasks = len(self.task_names)
        if K == 0:
            raise ValueError("AdaptMixture needs at least one task")
        self.objective_tasks = list(range(K)) if objective_tasks is None else [int(i) for i in objective_tasks]
        if (
            not self.objective_tasks
            or len(set(self.objective_tasks)) != len(self.objective_tasks)
            or not all(0 <= i < K for i in self.objective_tasks)
        ):
            raise ValueError(f"objective_tasks must be distinct indices in [0, {K}), got {objective_tasks}")

        self.alpha = np.zeros(K)
        if settings.prior != "uniform":
            if prior_weights is None:
                raise ValueError(f"mixture.prior {settings.prior} needs prior_weights")
            prior = np.asarray(prior_weights, dtype=np.float64)
            if prior.shape != (K,) or not np.all(np.isfinite(prior)) or np.any(prior < 0) or not prior.sum() > 0:
                raise ValueError(f"prior_weights must be (K,)=({K},) finite, >= 0 and not all 0, got {prior}")
            # a task with prior 0 starts at softmax ~1e-12 (the floor still gives it eps/K), not at -inf,
            # where its gradient (proportional to q_k) would be exactly zero forever
            self.alpha = np.log(np.maximum(prior / prior.sum(), 1e-12))
        self.m = np.zeros(K)  # Adam's first and second moments of dJ/dalpha
        self.v = np.zeros(K)
        self.step = 0  # mixture updates taken (skipped ones are not counted)
        self.l0: np.ndarray | None = None  # (K_obj,) reference losses l_k(theta_0) for relative_loss
        self.lookahead_rms: float | None = None  # normalize = rms: running RMS over tasks of eta * d_k

    @property
    def probs(self) -> np.ndarray:
        """p (K,) float64 = (1 - eps) * softmax(alpha) + eps / K; min p >= eps / K, sum p = 1."""
        eps = self.settings.floor
        return (1.0 - eps) * softmax(self.alpha) + eps / self.num_tasks

    def set_reference(self, val_losses: np.ndarray) -> None:
        """relative_loss: l0 := these objective losses (K_obj,) if none is set yet and all are finite.
        The trainer calls it with the first validation losses (step 0, theta_0), whatever meta.warmup is."""
        l = np.asarray(val_losses, dtype=np.float64)
        if self.settings.relative_loss and self.l0 is None and np.all(np.isfinite(l)):
            self.l0 = np.maximum(l, 1e-8)  # a zero loss at theta_0 would make every ratio infinite

    def objective_weights(self, val_losses: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Weights of the validation losses whose weighted sum has gradient grad Phi, and Phi.

        val_losses (K_obj,) mean token loss of each objective task on the validation batch.
        Returns w (K_obj,) detached, on val_losses' device and dtype, and Phi (float):
            w = softmax(l / tau),                    Phi = tau * logsumexp(l / tau)
        With relative_loss, r = l / l0 (l0: from `set_reference`, else the losses of the first call
        whose losses are all finite), Phi = tau * logsumexp(r / tau) and w = softmax(r / tau) / l0:
        the weights to put on the *raw* losses, since grad(r_k) = grad(l_k) / l0_k.
        The trainer backpropagates sum_k w_k * l_k (w detached) to get G = grad Phi.
        """
        l = val_losses.detach().to(device="cpu", dtype=torch.float64).numpy().copy()
        if l.shape != (len(self.objective_tasks),):
            raise ValueError(f"val_losses must have shape ({len(self.objective_tasks)},), got {tuple(l.shape)}")
        scale = np.ones_like(l)
        if self.settings.relative_loss:
            self.set_reference(l)
            if self.l0 is not None:
                scale = 1.0 / self.l0
        x = l * scale / self.settings.tau
        top = x.max()
        phi = float(self.settings.tau * (top + math.log(np.exp(x - top).sum())))
        w = softmax(x) * scale
        return torch.from_numpy(w).to(device=val_losses.device, dtype=val_losses.dtype), phi

    def update(self, dots: np.ndarray, lr_model: float, present: np.ndarray | None = None) -> dict:
        """One mixture step from d (K,) = <grad Phi, g_k> for every training task; eta = lr_model.

        present (K,) bool: the tasks measured on this step (None: all). An absent task's d_k (nan or
        anything) is replaced by the q-weighted mean of the present ones, so that it neither favours nor
        penalises the present tasks' gradients, and the absent task is not moved: its logit and its Adam
        moments stay as they were (a lazy step, as torch's SparseAdam takes), so no momentum from earlier
        measurements carries it. Its share still changes through the normalisation as the others move.
        Returns diagnostics: skipped, step, u (K,), grad_alpha (K,) = dJ/dalpha, alpha_step (K,)
        (the change in alpha), probs (K,) after the step, entropy H(p) after the step (nats), and
        lookahead = -eta * <p, d>, the first-order change of Phi this step's mixture predicts.
        Non-finite dots of present tasks (or lr_model), or no task present, leave every state untouched
        and return {"skipped": True}.
        """
        d = np.array(dots, dtype=np.float64)
        if d.shape != (self.num_tasks,):
            raise ValueError(f"dots must have shape ({self.num_tasks},), got {d.shape}")
        mask = np.ones(self.num_tasks, dtype=bool) if present is None else np.asarray(present, dtype=bool)
        if mask.shape != (self.num_tasks,):
            raise ValueError(f"present must have shape ({self.num_tasks},), got {mask.shape}")
        eta = float(lr_model)
        if not (mask.any() and np.all(np.isfinite(d[mask])) and math.isfinite(eta)):
            return {"skipped": True}

        s = self.settings
        p, q = self.probs, softmax(self.alpha)
        if not mask.all():
            d[~mask] = float(q[mask] @ d[mask]) / float(q[mask].sum())
        gain = eta * d  # first-order decrease of Phi per unit of p_k
        if s.normalize == "rms":
            rms = math.sqrt(float(np.mean(gain[mask] ** 2)))
            self.lookahead_rms = rms if self.lookahead_rms is None else 0.9 * self.lookahead_rms + 0.1 * rms
            gain = gain / max(self.lookahead_rms, 1e-300)
        u = -gain + s.entropy_weight * (np.log(np.maximum(p, 1e-300)) + 1.0)  # dJ/dp (p >= eps/K > 0)
        grad = (1.0 - s.floor) * q * (u - q @ u)  # dJ/dalpha through the floored softmax

        self.step += 1
        if s.optimizer == "adam":
            b1, b2 = s.adam_betas
            self.m = np.where(mask, b1 * self.m + (1.0 - b1) * grad, self.m)
            self.v = np.where(mask, b2 * self.v + (1.0 - b2) * grad * grad, self.v)
            m_hat = self.m / (1.0 - b1**self.step)
            v_hat = self.v / (1.0 - b2**self.step)
            delta = np.where(mask, -s.lr * m_hat / (np.sqrt(v_hat) + s.adam_eps), 0.0)
        else:
            delta = np.where(mask, -s.lr * grad, 0.0)
        self.alpha = self.alpha + delta

        p_new = self.probs
        return {
            "skipped": False,
            "step": self.step,
            "u": u,
            "grad_alpha": grad,
            "alpha_step": delta,
            "probs": p_new,
            "entropy": mixture_entropy(p_new),
            "lookahead": float(-eta * (p @ d)),
        }

    def state_dict(self) -> dict:
        """Plain Python floats/lists (float64 round-trips exactly; safe for torch.load(weights_only=True))."""
        return {
            "task_names": list(self.task_names),
            "objective_tasks": list(self.objective_tasks),
            "alpha": self.alpha.tolist(),
            "m": self.m.tolist(),
            "v": self.v.tolist(),
            "step": self.step,
            "l0": None if self.l0 is None else self.l0.tolist(),
            "lookahead_rms": self.lookahead_rms,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a state_dict; the tasks must be the same, in the same order."""
        if list(state["task_names"]) != self.task_names or list(state["objective_tasks"]) != self.objective_tasks:
            raise ConfigError("the checkpoint's mixture was learned over different tasks; resume with the same data")
        self.alpha = np.array(state["alpha"], dtype=np.float64)
        self.m = np.array(state["m"], dtype=np.float64)
        self.v = np.array(state["v"], dtype=np.float64)
        self.step = int(state["step"])
        self.l0 = None if state["l0"] is None else np.array(state["l0"], dtype=np.float64)
        self.lookahead_rms = state.get("lookahead_rms")  # absent in checkpoints from before `normalize`
