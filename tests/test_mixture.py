"""Mixture: ADAPT's update against hand computations of DESIGN.md section 1, and the static baselines."""

import io
import json
import math

import numpy as np
import pytest
import torch

from adapt_fast.errors import ConfigError
from adapt_fast.mixture import AdaptMixture, AdaptSettings, mixture_entropy, static_mixture
from adapt_fast.mixture.adapt import softmax

NAMES = ["a", "b", "c"]


def close(x, y, rel=1e-12, abs_=1e-15):
    return all(math.isclose(float(a), float(b), rel_tol=rel, abs_tol=abs_) for a, b in zip(x, y, strict=True))


# ---------------------------------------------------------------------------------------------
# ADAPT update: hand computation in plain Python math
# ---------------------------------------------------------------------------------------------


def hand_grad(alpha, dots, eta, lam, eps):
    """softmax, p, u and dJ/dalpha written out for K tasks with Python floats."""
    K = len(alpha)
    e = [math.exp(a) for a in alpha]
    q = [x / sum(e) for x in e]
    p = [(1 - eps) * qk + eps / K for qk in q]
    u = [-eta * dk + lam * (math.log(pk) + 1) for dk, pk in zip(dots, p, strict=True)]
    qu = sum(qk * uk for qk, uk in zip(q, u, strict=True))
    g = [(1 - eps) * qk * (uk - qu) for qk, uk in zip(q, u, strict=True)]
    return p, u, g


def test_adam_update_matches_hand_computation():
    s = AdaptSettings(entropy_weight=0.01, floor=0.1, lr=0.05, optimizer="adam", prior="proportional")
    mix = AdaptMixture(NAMES, s, prior_weights=np.array([5.0, 3.0, 2.0]))
    alpha0 = [math.log(0.5), math.log(0.3), math.log(0.2)]
    assert close(mix.alpha, alpha0)
    # p_0 = 0.9 * prior + 0.1 / 3
    assert close(mix.probs, [0.9 * 0.5 + 0.1 / 3, 0.9 * 0.3 + 0.1 / 3, 0.9 * 0.2 + 0.1 / 3])

    # step 1: dots (2, -1, 0.5), eta 0.01
    p, u, g1 = hand_grad(alpha0, [2.0, -1.0, 0.5], 0.01, 0.01, 0.1)
    m = [0.1 * gk for gk in g1]
    v = [0.001 * gk * gk for gk in g1]
    m_hat = [mk / (1 - 0.9) for mk in m]  # = g1
    v_hat = [vk / (1 - 0.999) for vk in v]  # = g1^2
    alpha1 = [a - 0.05 * mh / (math.sqrt(vh) + 1e-12) for a, mh, vh in zip(alpha0, m_hat, v_hat, strict=True)]
    info = mix.update(np.array([2.0, -1.0, 0.5]), lr_model=0.01)
    assert not info["skipped"] and info["step"] == 1
    assert close(info["u"], u) and close(info["grad_alpha"], g1)
    assert close(mix.alpha, alpha1)
    # the first Adam step is lr * sign(g): task a (d > 0) gains, task b (d < 0) loses
    step = [a1 - a0 for a1, a0 in zip(alpha1, alpha0, strict=True)]
    assert close(step, [0.05 * -math.copysign(1, x) for x in g1], rel=1e-8)
    assert g1[0] < 0 < g1[1]
    assert math.isclose(info["lookahead"], -0.01 * sum(pk * dk for pk, dk in zip(p, [2.0, -1.0, 0.5], strict=True)))

    # step 2: dots (-1, 0.5, 3), eta 0.02; the moments carry over, bias corrections at t = 2
    _, _, g2 = hand_grad(alpha1, [-1.0, 0.5, 3.0], 0.02, 0.01, 0.1)
    m = [0.9 * mk + 0.1 * gk for mk, gk in zip(m, g2, strict=True)]
    v = [0.999 * vk + 0.001 * gk * gk for vk, gk in zip(v, g2, strict=True)]
    alpha2 = [
        a - 0.05 * (mk / (1 - 0.9**2)) / (math.sqrt(vk / (1 - 0.999**2)) + 1e-12)
        for a, mk, vk in zip(alpha1, m, v, strict=True)
    ]
    info = mix.update(np.array([-1.0, 0.5, 3.0]), lr_model=0.02)
    assert close(info["grad_alpha"], g2) and close(mix.alpha, alpha2)
    assert close(info["probs"], mix.probs) and math.isclose(info["entropy"], mixture_entropy(mix.probs))


def test_sgd_update_matches_hand_computation():
    s = AdaptSettings(entropy_weight=0.001, floor=0.05, lr=3.0, optimizer="sgd")
    mix = AdaptMixture(NAMES, s)
    alpha = [0.0, 0.0, 0.0]
    for dots, eta in [([4.0, 1.0, -2.0], 0.1), ([0.5, -3.0, 1.0], 0.05)]:
        _, u, g = hand_grad(alpha, dots, eta, 0.001, 0.05)
        alpha = [a - 3.0 * gk for a, gk in zip(alpha, g, strict=True)]
        info = mix.update(np.array(dots), lr_model=eta)
        assert close(info["u"], u) and close(info["grad_alpha"], g)
        assert close(mix.alpha, alpha)
    # first step from uniform, by hand: q = 1/3, p = 1/3, u = -0.1 d + 0.001 (log(1/3) + 1)
    u = [-0.1 * d + 0.001 * (math.log(1 / 3) + 1) for d in (4.0, 1.0, -2.0)]
    g = [0.95 / 3 * (uk - sum(u) / 3) for uk in u]
    assert close(g, [0.95 / 3 * -0.3, 0.0, 0.95 / 3 * 0.3], abs_=1e-15)


def test_grad_alpha_is_the_autograd_gradient_of_J():
    """dJ/dalpha from the formula equals autograd of J = Phi - eta <p, d> - lambda H(p) (first order)."""
    s = AdaptSettings(entropy_weight=0.02, floor=0.2, prior="proportional")
    prior = np.array([0.6, 0.1, 0.25, 0.05])
    mix = AdaptMixture(list("abcd"), s, prior_weights=prior)
    dots, eta = np.array([1.5, -0.7, 0.2, 3.0]), 0.03
    alpha = torch.tensor(mix.alpha, requires_grad=True)
    p = (1 - 0.2) * torch.softmax(alpha, 0) + 0.2 / 4
    J = -eta * (p * torch.from_numpy(dots)).sum() - 0.02 * -(p * p.log()).sum()
    (grad,) = torch.autograd.grad(J, alpha)
    info = mix.update(dots, lr_model=eta)
    np.testing.assert_allclose(info["grad_alpha"], grad.numpy(), rtol=1e-12, atol=1e-16)


def test_floor_and_normalisation():
    rng = np.random.default_rng(0)
    s = AdaptSettings(floor=0.1, lr=0.5, entropy_weight=0.0)
    mix = AdaptMixture(list("abcde"), s)
    for _ in range(300):  # task 0 is always far better: the others are pushed to the floor
        dots = np.array([100.0, -5.0, -5.0, -5.0, -5.0]) + rng.normal(size=5)
        mix.update(dots, lr_model=1.0)
        p = mix.probs
        assert p.dtype == np.float64 and p.shape == (5,)
        assert p.min() >= 0.1 / 5 - 1e-15
        assert math.isclose(p.sum(), 1.0, abs_tol=1e-12)
    assert p[0] > 0.9 and np.allclose(p[1:], 0.1 / 5, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Objective weights: smooth worst case and the relative variant
# ---------------------------------------------------------------------------------------------


def test_objective_weights_by_hand():
    mix = AdaptMixture(NAMES, AdaptSettings(tau=0.5))
    losses = [1.0, 1.5, 1.2]
    w, phi = mix.objective_weights(torch.tensor(losses, dtype=torch.float64))
    e = [math.exp(l / 0.5) for l in losses]
    assert close(w.tolist(), [x / sum(e) for x in e]) and math.isclose(phi, 0.5 * math.log(sum(e)), rel_tol=1e-14)
    # float32 in, float32 out, detached
    w32, _ = mix.objective_weights(torch.tensor(losses, requires_grad=True))
    assert w32.dtype == torch.float32 and not w32.requires_grad


def test_tau_limits():
    losses = torch.tensor([1.0, 1.5, 1.2], dtype=torch.float64)
    w, phi = AdaptMixture(NAMES, AdaptSettings(tau=1e-3)).objective_weights(losses)
    assert torch.allclose(w, torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64), atol=1e-12)  # the worst task
    assert math.isclose(phi, 1.5, rel_tol=1e-9)
    w, phi = AdaptMixture(NAMES, AdaptSettings(tau=1e6)).objective_weights(losses)
    assert torch.allclose(w, torch.full((3,), 1 / 3, dtype=torch.float64), atol=1e-6)  # the mean
    assert math.isclose(phi - 1e6 * math.log(3), sum(losses.tolist()) / 3, rel_tol=1e-5)


def test_weighted_loss_has_the_gradient_of_phi():
    """The trainer backpropagates sum_k w_k l_k with w detached: that is grad Phi, plain and relative."""
    theta = torch.tensor([0.3, -1.2, 0.7], dtype=torch.float64, requires_grad=True)

    def losses(t):  # three 'validation losses' depending on shared parameters
        return torch.stack([(t**2).sum() + 1, (t[0] - t[1]).exp(), 2 + t.sin().sum()])

    for relative in (False, True):
        mix = AdaptMixture(NAMES, AdaptSettings(tau=0.7, relative_loss=relative))
        l0 = torch.tensor([2.0, 0.5, 4.0], dtype=torch.float64)
        if relative:
            mix.objective_weights(l0)  # records l0
        l = losses(theta)
        w, phi = mix.objective_weights(l)
        (g_trainer,) = torch.autograd.grad((w * l).sum(), theta)
        r = losses(theta) / l0 if relative else losses(theta)
        phi_ref = 0.7 * torch.logsumexp(r / 0.7, 0)
        (g_phi,) = torch.autograd.grad(phi_ref, theta)
        torch.testing.assert_close(g_trainer, g_phi, rtol=1e-12, atol=1e-14)
        assert math.isclose(phi, phi_ref.item(), rel_tol=1e-14)


def test_relative_loss_by_hand():
    mix = AdaptMixture(NAMES, AdaptSettings(tau=1.0, relative_loss=True))
    nan = torch.tensor([float("nan"), 1.0, 1.0], dtype=torch.float64)
    w, _ = mix.objective_weights(nan)
    assert mix.l0 is None and torch.isnan(w).all()  # l0 only from finite losses
    w, phi = mix.objective_weights(torch.tensor([2.0, 1.0, 4.0], dtype=torch.float64))
    assert close(mix.l0, [2.0, 1.0, 4.0])
    assert close(w.tolist(), [1 / 3 / 2.0, 1 / 3 / 1.0, 1 / 3 / 4.0]) and math.isclose(phi, 1 + math.log(3))
    # later: r = (0.5, 1, 0.5); the task that improved least relative to its start dominates
    w, phi = mix.objective_weights(torch.tensor([1.0, 1.0, 2.0], dtype=torch.float64))
    e = [math.exp(0.5), math.exp(1.0), math.exp(0.5)]
    assert close(w.tolist(), [e[0] / sum(e) / 2.0, e[1] / sum(e) / 1.0, e[2] / sum(e) / 4.0])
    assert math.isclose(phi, math.log(sum(e))) and close(mix.l0, [2.0, 1.0, 4.0])


def test_objective_task_subset():
    mix = AdaptMixture(NAMES, AdaptSettings(), objective_tasks=[0, 2])
    w, _ = mix.objective_weights(torch.tensor([1.0, 2.0]))
    assert w.shape == (2,)
    with pytest.raises(ValueError):
        mix.objective_weights(torch.tensor([1.0, 2.0, 3.0]))
    assert mix.probs.shape == (3,)  # the mixture is still over every training task
    assert mix.update(np.array([1.0, 0.0, -1.0]), 0.1)["grad_alpha"].shape == (3,)
    for bad in ([], [0, 0], [3], [-1]):
        with pytest.raises(ValueError):
            AdaptMixture(NAMES, AdaptSettings(), objective_tasks=bad)


# ---------------------------------------------------------------------------------------------
# Behaviour over many updates
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("optimizer,lr", [("adam", 0.05), ("sgd", 50.0)])
def test_entropy_pulls_toward_uniform(optimizer, lr):
    s = AdaptSettings(entropy_weight=0.01, floor=0.0, lr=lr, optimizer=optimizer, prior="proportional")
    mix = AdaptMixture(NAMES, s, prior_weights=np.array([0.7, 0.2, 0.1]))
    h = [mixture_entropy(mix.probs)]
    for _ in range(150):
        h.append(mix.update(np.zeros(3), lr_model=1e-3)["entropy"])
    assert h[-1] > h[0] + 0.2
    assert np.abs(mix.probs - 1 / 3).max() < 0.03
    if optimizer == "sgd":  # plain gradient descent on -H: monotone
        assert all(b >= a - 1e-15 for a, b in zip(h[:-1], h[1:], strict=True))


@pytest.mark.parametrize("optimizer,lr", [("adam", 0.05), ("sgd", 2000.0)])
def test_sign_of_d_moves_share(optimizer, lr):
    """A task whose gradient opposes the objective's (d < 0) loses share; d > 0 gains."""
    rng = np.random.default_rng(1)
    mix = AdaptMixture(list("abcd"), AdaptSettings(entropy_weight=1e-4, lr=lr, optimizer=optimizer))
    p0 = mix.probs
    for _ in range(100):
        dots = np.array([1.0, -1.0, 0.0, 0.0]) + 0.3 * rng.normal(size=4)
        mix.update(dots, lr_model=1e-3)
    p = mix.probs
    assert p[0] > p0[0] + 0.2 and p[1] < p0[1] - 0.15
    assert p[0] > max(p[2], p[3]) > min(p[2], p[3]) > p[1]


def test_non_finite_dots_skip():
    mix = AdaptMixture(NAMES, AdaptSettings())
    mix.update(np.array([1.0, 2.0, 3.0]), 0.1)
    before = mix.state_dict()
    for dots, eta in [([float("nan"), 0.0, 1.0], 0.1), ([0.0, float("inf"), 1.0], 0.1), ([1.0, 2.0, 3.0], math.nan)]:
        assert mix.update(np.array(dots), eta) == {"skipped": True}
    assert mix.state_dict() == before
    with pytest.raises(ValueError):
        mix.update(np.zeros(2), 0.1)


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_state_dict_round_trip_is_bit_exact(optimizer):
    rng = np.random.default_rng(2)
    s = AdaptSettings(relative_loss=True, optimizer=optimizer, lr=0.05 if optimizer == "adam" else 10.0)
    dots = [rng.normal(size=3) for _ in range(12)]
    mix = AdaptMixture(NAMES, s)
    mix.objective_weights(torch.tensor([2.0, 3.0, 1.5]))
    for d in dots[:6]:
        mix.update(d, 1e-2)

    buf = io.BytesIO()
    torch.save(mix.state_dict(), buf)
    buf.seek(0)
    via_torch = torch.load(buf, weights_only=True)
    via_json = json.loads(json.dumps(mix.state_dict()))
    resumed = [AdaptMixture(NAMES, s) for _ in range(2)]
    resumed[0].load_state_dict(via_torch)
    resumed[1].load_state_dict(via_json)

    for d in dots[6:]:
        for m in [mix, *resumed]:
            m.update(d, 1e-2)
    for m in resumed:
        assert m.alpha.tobytes() == mix.alpha.tobytes() and m.probs.tobytes() == mix.probs.tobytes()
        assert m.m.tobytes() == mix.m.tobytes() and m.v.tobytes() == mix.v.tobytes()
        assert m.step == mix.step == 12 and m.l0.tobytes() == mix.l0.tobytes()

    with pytest.raises(ConfigError):
        AdaptMixture(["a", "c", "b"], s).load_state_dict(mix.state_dict())


def test_settings_and_constructor_errors():
    for bad in [
        dict(tau=0.0),
        dict(tau=math.nan),
        dict(entropy_weight=-1.0),
        dict(floor=1.0),
        dict(floor=-0.1),
        dict(lr=0.0),
        dict(optimizer="rmsprop"),
        dict(prior="size"),
    ]:
        with pytest.raises(ConfigError):
            AdaptSettings(**bad)
    with pytest.raises(ValueError):
        AdaptMixture(NAMES, AdaptSettings(prior="proportional"))  # no prior_weights
    with pytest.raises(ValueError):
        AdaptMixture(NAMES, AdaptSettings(prior="proportional"), prior_weights=np.array([1.0, -1.0, 1.0]))
    # a zero prior starts tiny but finite (it can recover); the floor still gives it eps/K
    mix = AdaptMixture(NAMES, AdaptSettings(prior="proportional"), prior_weights=np.array([1.0, 0.0, 1.0]))
    assert np.all(np.isfinite(mix.alpha)) and math.isclose(mix.probs[1], 0.05 / 3, rel_tol=1e-9)


def test_mixture_entropy():
    assert math.isclose(mixture_entropy(np.full(4, 0.25)), math.log(4))
    assert mixture_entropy(np.array([0.0, 1.0, 0.0])) == 0.0
    assert math.isclose(mixture_entropy(np.array([0.5, 0.5, 0.0])), math.log(2))


# ---------------------------------------------------------------------------------------------
# Static baselines
# ---------------------------------------------------------------------------------------------

TOKENS = np.array([100, 300, 600])
EXAMPLES = np.array([10, 50, 1000])


def shares(method, **kw):
    p = static_mixture(method, TOKENS, EXAMPLES, NAMES, **kw)
    assert p.dtype == np.float64 and p.shape == (3,) and math.isclose(p.sum(), 1.0, abs_tol=1e-15)
    return p.tolist()


def test_static_methods():
    assert close(shares("uniform"), [1 / 3] * 3)
    assert close(shares("proportional"), [0.1, 0.3, 0.6])  # by training tokens
    assert close(shares("proportional", cap=100), [10 / 160, 50 / 160, 100 / 160])  # min(examples, cap)
    assert close(shares("proportional", cap=10**6), [10 / 1060, 50 / 1060, 1000 / 1060])
    r = [math.sqrt(100), math.sqrt(300), math.sqrt(600)]
    assert close(shares("temperature", temperature=2.0), [x / sum(r) for x in r])
    assert close(shares("temperature", temperature=1.0), shares("proportional"))
    assert close(shares("temperature", temperature=1.0, cap=100), shares("proportional", cap=100))
    assert close(shares("temperature", temperature=math.inf), [1 / 3] * 3)
    assert close(shares("temperature", temperature=1e9), [1 / 3] * 3, rel=1e-8)
    assert close(shares("fixed", weights={"a": 1.0, "c": 3.0}), [0.25, 0.0, 0.75])  # unnamed tasks get 0
    # huge sizes at a small temperature do not overflow
    p = static_mixture("temperature", np.array([1e12, 1e11, 0.0]), EXAMPLES, NAMES, temperature=0.01)
    assert close(p, [1.0, 0.0, 0.0]) and np.all(np.isfinite(p))
    # a task without data gets nothing, even at T = inf
    p = static_mixture("temperature", np.array([5.0, 0.0, 7.0]), EXAMPLES, NAMES, temperature=math.inf)
    assert close(p, [0.5, 0.0, 0.5])


def test_static_errors():
    with pytest.raises(ConfigError, match="unknown mixture method 'size'"):
        static_mixture("size", TOKENS, EXAMPLES, NAMES)
    with pytest.raises(ConfigError, match="unknown tasks: x, y"):
        static_mixture("fixed", TOKENS, EXAMPLES, NAMES, weights={"a": 1.0, "y": 1.0, "x": 2.0})
    for weights in [None, {}, {"a": 0.0, "b": 0.0}, {"a": -1.0, "b": 2.0}, {"a": math.nan}, {"a": math.inf}]:
        with pytest.raises(ConfigError):
            static_mixture("fixed", TOKENS, EXAMPLES, NAMES, weights=weights)
    for T in (0.0, -1.0, math.nan):
        with pytest.raises(ConfigError):
            static_mixture("temperature", TOKENS, EXAMPLES, NAMES, temperature=T)
    with pytest.raises(ConfigError):
        static_mixture("proportional", TOKENS, EXAMPLES, NAMES, cap=-5)
    with pytest.raises(ConfigError):
        static_mixture("proportional", np.zeros(3), EXAMPLES, NAMES)
    with pytest.raises(ValueError):
        static_mixture("uniform", TOKENS[:2], EXAMPLES, NAMES)
    with pytest.raises(ValueError):
        static_mixture("uniform", np.array([1.0, -1.0, 1.0]), EXAMPLES, NAMES)
    # every message is one line
    try:
        static_mixture("fixed", TOKENS, EXAMPLES, NAMES, weights={"zz": 1.0})
    except ConfigError as err:
        assert "\n" not in str(err) and "zz" in str(err)


# ---------------------------------------------------------------------------------------------
# normalize: rms makes lambda dimensionless
# ---------------------------------------------------------------------------------------------


def test_rms_normalised_update_is_scale_free():
    """With normalize=rms the trajectory does not depend on the scale of eta * d; with none it does."""
    rng = np.random.default_rng()
    stream = [rng.normal(size=5) + np.arange(5) for _ in range(50)]
    trajectories = {}
    for normalize in ("rms", "none"):
        for scale, eta in ((1.0, 1e-2), (1e-7, 3.0)):
            mix = AdaptMixture(list("abcde"), AdaptSettings(normalize=normalize, entropy_weight=0.5))
            for d in stream:
                mix.update(d * scale, lr_model=eta)
            trajectories[normalize, scale] = mix.probs
    np.testing.assert_allclose(trajectories["rms", 1.0], trajectories["rms", 1e-7], rtol=1e-9)
    assert np.abs(trajectories["none", 1.0] - trajectories["none", 1e-7]).max() > 1e-3


def test_rms_normalised_stationary_point_and_state():
    """Constant dots: p converges to softmax(z / lambda), z = eta d / RMS(eta d); the RMS survives a round trip."""
    d = np.array([3.0, 1.0, 0.0, -1.0, -2.0])
    s = AdaptSettings(normalize="rms", entropy_weight=0.7, floor=0.0, optimizer="sgd", lr=2.0)
    mix = AdaptMixture(list("abcde"), s)
    for _ in range(3000):
        mix.update(d, lr_model=1e-4)
    z = d / math.sqrt(np.mean(d * d))
    np.testing.assert_allclose(mix.probs, softmax(z / 0.7), rtol=1e-6)
    clone = AdaptMixture(list("abcde"), s)
    clone.load_state_dict(mix.state_dict())
    assert clone.lookahead_rms == mix.lookahead_rms
    a, b = mix.update(d * 2, lr_model=1e-4), clone.update(d * 2, lr_model=1e-4)
    np.testing.assert_array_equal(a["probs"], b["probs"])
    with pytest.raises(ConfigError):
        AdaptSettings(normalize="l2")


def test_absent_tasks_are_not_measured():
    """A task absent from the batch (d_k nan) is not measured: neither favoured nor penalised, and not moved."""
    rng = np.random.default_rng()
    mix = AdaptMixture(list("abcde"), AdaptSettings(entropy_weight=0.0, prior="proportional"), rng.random(5) + 0.1)
    dots = rng.normal(size=5)
    dots[2] = np.nan
    present = ~np.isnan(dots)
    info = mix.update(dots, lr_model=0.1, present=present)
    assert not info["skipped"] and abs(info["grad_alpha"][2]) < 1e-15 and np.all(info["grad_alpha"][present] != 0)
    # the present tasks step as if the absent task's d were the q-weighted mean of theirs; the absent task's
    # logit and Adam moments stay put, even after measured steps left momentum behind (a lazy step)
    a = AdaptMixture(list("abcde"), AdaptSettings(entropy_weight=0.05), objective_tasks=[0, 1])
    b = AdaptMixture(list("abcde"), AdaptSettings(entropy_weight=0.05), objective_tasks=[0, 1])
    for _ in range(3):
        measured = rng.normal(size=5)
        a.update(measured, 0.1)
        b.update(measured, 0.1)
    assert abs(a.m[2]) > 0
    before = a.state_dict()
    q = softmax(a.alpha)
    imputed = dots.copy()
    imputed[2] = q[present] @ dots[present] / q[present].sum()
    info = a.update(dots, 0.1, present)
    b.update(imputed, 0.1)
    np.testing.assert_allclose(a.alpha[present], b.alpha[present], rtol=1e-12)
    assert info["alpha_step"][2] == 0 and a.alpha[2] == before["alpha"][2] != b.alpha[2]
    assert a.m[2] == before["m"][2] and a.v[2] == before["v"][2]
    sgd = AdaptMixture(list("abcde"), AdaptSettings(entropy_weight=0.05, optimizer="sgd"))
    assert sgd.update(dots, 0.1, present)["alpha_step"][2] == 0 and sgd.alpha[2] == 0
    # nothing measured, or a present task's dot non-finite: nothing changes
    before = a.state_dict()
    assert a.update(dots, 0.1, present=np.zeros(5, dtype=bool))["skipped"]
    assert a.update(dots, 0.1)["skipped"]
    assert a.state_dict() == before
