"""GhostDots: per-task gradient dot products in one backward pass, against one backward pass per task.

The micro-batch is packed by the loader from the synthetic suite: tasks addition, copy, reverse, sort (K = 4), two
examples each except `reverse` (empty: no token), padding at the end. Models are the tiny presets in float64 with
random norm weights, G a random tensor dict or a validation gradient. Errors are max |a - b| / max |b| over tasks.

The loss kernel's reference computes float64 inputs in float64; HF's RMSNorms compute in fp32 whatever the
input: the float64 comparison lands at ~1e-15 with the loss sum and a few 1e-7 with the token mean (whose 1/N
rounds differently through the fp32 norms in the two passes). A float64 stand-in for the kernel with autograd
(float64_linear_cross_entropy) checks the head's ghost dots independently of the kernel.
"""

import pytest
import torch
from torch import nn
from torch.func import jvp

from adapt_fast.data.cache import build_or_load
from adapt_fast.data.loader import pack_items
from adapt_fast.data.synthetic import write_synthetic_suite
from adapt_fast.data.tokenizer import build_byte_tokenizer
from adapt_fast.model import loss as loss_module
from adapt_fast.model.ghost import (
    GhostDots,
    exact_task_dots,
    task_mean_dots,
    trainable_parameters,
    validation_gradient,
    validation_losses,
)
from adapt_fast.model.loading import enable_gradient_checkpointing, load_model_and_tokenizer
from adapt_fast.model.loss import PerTaskLoss, hidden_states, per_task_loss

PRESETS = ("tiny-llama", "tiny-qwen3", "tiny-gemma3")
K, EMPTY = 4, 2  # tasks sorted by name: addition, copy, reverse (no example), sort


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny float64 models gain nothing from threads, and OpenMP threads on a busy 2-core machine run 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """(training micro-batch: an empty task, 5 padding slots at the end; two validation micro-batches)."""
    root = tmp_path_factory.mktemp("ghost")
    write_synthetic_suite(root / "suite", examples_per_task=8, tasks=("copy", "reverse", "sort", "addition"))
    split = build_or_load(root / "suite", build_byte_tokenizer(), cache_dir=root / "cache", progress=False).train

    def items(tasks, picks):
        return [(int(e), int(split.lengths[e])) for k in tasks for e in split.examples_of_task(k)[picks]]

    train = items([0, 1, 3], slice(0, 2))
    batch = pack_items(split, train, K, pad_to=sum(n for _, n in train) + 5)
    val = [pack_items(split, items(range(K), slice(2, 3)), K), pack_items(split, items([0, 2, 3], slice(3, 5)), K)]
    assert batch.loss_tokens_per_task()[EMPTY] == 0 and (batch.task_ids[-5:] == -1).all()
    return batch, val


def tiny_model(name: str, dtype=torch.float64) -> nn.Module:
    model, _ = load_model_and_tokenizer(name, device="cpu", dtype=dtype, seed=0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:  # norm weights away from their init (ones, or zeros in Gemma's 1 + w)
                p.add_(0.2 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


def random_G(model: nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.randn(p.shape, generator=gen, dtype=p.dtype) for n, p in trainable_parameters(model).items()}


def one_pass(
    model, batch, G, scale: float = 1.0, add_head: bool = False, token_mean: bool = True, backend="auto", fold=False
):
    """d (K,), missing (K,) from one backward of the token-mean loss (or the loss sum), times `scale`; the GhostDots.
    fold: every linear layer's dots taken inside its weight-gradient kernel (GhostDots' fold_linear)."""
    n = int(batch.loss_tokens_per_task().sum()) if token_mean else 1
    with GhostDots(model, G, batch.task_ids, K, backend=backend, fold_linear=fold) as ghost:
        weights = torch.full((K,), 1.0 / n, device=batch.input_ids.device)
        out = per_task_loss(model, batch, weights, ghost_weight=ghost.head_ghost_weight, backend=backend)
        if add_head:
            ghost.add_head(out)
        (out.loss * scale).backward()
    model.zero_grad(set_to_none=True)
    D = ghost.dots if add_head else ghost.dots + out.ghost_dot
    d, missing = task_mean_dots(D, out.count, n)
    return d, missing, ghost


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    """A tiny GPT-2 (Conv1D layers, learned positions, LayerNorms with biases, tied head), dropout off."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from adapt_fast.data.tokenizer import BOS_ID, EOS_ID, PAD_ID

    folder = tmp_path_factory.mktemp("gpt2")
    config = GPT2Config(
        vocab_size=264, n_positions=512, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
    )  # fmt: skip
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(folder)
    build_byte_tokenizer().save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("name", [*PRESETS, "gpt2"])
def test_one_pass_matches_exact(name, data, request):
    """Through the loss kernel's reference, which computes float64 inputs in float64: the issue's 1e-6 relative,
    with the loss sum (task weights 1, as exact_task_dots does) and with the trainer's token mean (1/N). GPT-2's
    Conv1D layers store their weight (in, out): their G is transposed for the ghost-dot kernel."""
    batch, val = data
    model = tiny_model(request.getfixturevalue("gpt2_folder") if name == "gpt2" else name)
    for label, G in (
        ("random G", random_G(model)),
        ("validation G", validation_gradient(model, val, torch.tensor([0.4, 0.3, 0.1, 0.2]))),
    ):
        exact = exact_task_dots(model, batch, G, K)
        assert exact[EMPTY] == 0 and (exact != 0).sum() == K - 1
        d_sum, missing, _ = one_pass(model, batch, G, token_mean=False)
        d_mean, _, _ = one_pass(model, batch, G)
        assert missing.tolist() == [k == EMPTY for k in range(K)] and d_sum[EMPTY] == d_mean[EMPTY] == 0
        err_sum, err_mean = rel_err(d_sum, exact), rel_err(d_mean, exact)
        print(f"{name} {label}: max rel err {err_sum:.2e} (loss sum), {err_mean:.2e} (token mean)")
        assert err_sum <= 1e-6 and err_mean <= 1e-6


def float64_linear_cross_entropy(hidden, weight, labels, task_ids, num_tasks, task_weights=None,
                                 ghost_weight=None, softcap=None, **_) -> PerTaskLoss:  # fmt: skip
    """A float64 stand-in for the fused kernel: full logits, autograd, head ghost dots by forward-mode AD."""
    rows = ((labels != -100) & (task_ids >= 0)).nonzero()[:, 0]
    tasks, targets, h = task_ids[rows], labels[rows], hidden[rows]
    coef = task_weights.double()[tasks]

    def token_ce(h, w):
        z = h @ w.T
        z = softcap * torch.tanh(z / softcap) if softcap else z
        return torch.logsumexp(z, 1) - z.gather(1, targets[:, None])[:, 0]

    per_task = torch.zeros(num_tasks, dtype=torch.float64)
    ce = token_ce(h, weight)
    ghost = None
    if ghost_weight is not None:  # sum_{t in k} coef_t * (d ce_t along G)
        _, along = jvp(lambda w: coef * token_ce(h.detach(), w), (weight.detach(),), (ghost_weight,))
        ghost = per_task.index_add(0, tasks, along)
    loss = (coef * ce).sum()
    return PerTaskLoss(
        loss, per_task.index_add(0, tasks, ce.detach()), torch.bincount(tasks, minlength=num_tasks), ghost
    )


@pytest.mark.parametrize("name", PRESETS)
def test_hooks_exact_with_float64_head(name, data, monkeypatch):
    """With the head in float64 too, what is left is HF's fp32 RMSNorm arithmetic: agreement to ~1e-9.

    The loss sum (task weights 1), as in exact_task_dots: HF's norms round delta to fp32, and a scale that is not a
    power of two (1/N) would round differently there (a few 1e-7 after cancellation)."""
    monkeypatch.setattr(loss_module, "per_task_linear_cross_entropy", float64_linear_cross_entropy)
    batch, _ = data
    model = tiny_model(name)
    G = random_G(model, seed=1)
    err = rel_err(one_pass(model, batch, G, token_mean=False)[0], exact_task_dots(model, batch, G, K))
    print(f"{name} float64 head: max rel err {err:.2e}")
    assert err <= 1e-8


class Wrapper(nn.Module):
    """Stands for DDP / a DeepSpeed engine: the model under `.module`."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module


def test_hooks_removed_after_context(data):
    batch, _ = data
    model = tiny_model("tiny-llama")
    G = random_G(model)
    with torch.no_grad():
        before = hidden_states(model, batch)
    d, _, ghost = one_pass(Wrapper(model), batch, G)
    dots = ghost.dots.clone()
    assert not any(m._forward_hooks for m in model.modules())
    out = per_task_loss(model, batch, torch.ones(K))
    out.loss.backward()  # no context: nothing is added
    assert torch.equal(ghost.dots, dots)
    with torch.no_grad():
        assert torch.equal(hidden_states(model, batch), before)

    with pytest.raises(RuntimeError, match="boom"), GhostDots(model, G, batch.task_ids, K):
        assert any(m._forward_hooks for m in model.modules())
        raise RuntimeError("boom")
    assert not any(m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing(data, reentrant):
    """Recomputed forwards: the reentrant one hooks the recompute, the other the first forward; same dots."""
    batch, _ = data
    model = tiny_model("tiny-gemma3")
    G = random_G(model)
    d = one_pass(model, batch, G)[0]
    enable_gradient_checkpointing(model, reentrant=reentrant)
    model.train()  # dropout is 0 in the tiny presets
    assert rel_err(one_pass(model, batch, G)[0], d) <= 1e-12


def test_uncovered_parameter_raises(data):
    batch, _ = data
    model = tiny_model("tiny-qwen3")
    model.fake = nn.Parameter(torch.zeros(3, dtype=torch.float64))  # owned by the whole model: not token-wise
    model.model.mixer = nn.Conv1d(2, 2, 3).double()
    with pytest.raises(ValueError, match=r"fake \(Qwen3ForCausalLM\).*mixer.weight \(Conv1d\)"):
        GhostDots(model, random_G(model), batch.task_ids, K)
    model.fake.requires_grad_(False)  # frozen parameters need no dots
    model.model.mixer.requires_grad_(False)
    GhostDots(model, random_G(model), batch.task_ids, K)
    G = random_G(model)
    del G["model.norm.weight"]
    with pytest.raises(ValueError, match="no entry for model.norm.weight"):
        GhostDots(model, G, batch.task_ids, K)


def test_fp32_agrees_with_float64(data):
    batch, _ = data
    model = tiny_model("tiny-gemma3")
    G = random_G(model)
    exact = exact_task_dots(model, batch, G, K)
    model.float()
    d32, _, ghost = one_pass(model, batch, {n: g.float() for n, g in G.items()})
    assert ghost.dots.dtype == torch.float64
    err = rel_err(d32, exact)
    print(f"fp32 one pass vs float64 exact: max rel err {err:.2e}")
    assert err <= 1e-4


def test_add_head_follows_a_scaled_backward(data):
    """engine.backward(loss) may backpropagate loss / A (or a loss scale): add_head scales the head's share too."""
    batch, _ = data
    model = tiny_model("tiny-gemma3")
    G = random_G(model)
    d, _, _ = one_pass(model, batch, G)
    d_scaled, _, ghost = one_pass(model, batch, G, scale=0.25, add_head=True)
    assert ghost.loss_grad.item() == 0.25
    assert rel_err(d_scaled, 0.25 * d) <= 1e-12


def test_validation_losses_and_gradient(data):
    batch, val = data
    model = tiny_model("tiny-llama")
    losses, counts = validation_losses(model, [batch], K)
    out = per_task_loss(model, batch, torch.ones(K))
    assert counts.tolist() == out.count.tolist() and counts[EMPTY] == 0 and losses[EMPTY].isnan()
    keep = counts > 0
    torch.testing.assert_close(losses[keep], out.loss_sum[keep].double() / counts[keep], rtol=1e-6, atol=0)

    # <R, G_w> = sum_k w_k <R, grad mean_k>, the mean over both batches = sum_b N_kb d_kb / N_k
    w = torch.tensor([0.4, 0.3, 0.1, 0.2], dtype=torch.float64)
    G = validation_gradient(model, val, w)
    R = random_G(model, seed=2)
    got = sum((R[n].double() * G[n].double()).sum() for n in G)
    per_batch = [(exact_task_dots(model, b, R, K), b.loss_tokens_per_task().double()) for b in val]
    N = sum(n for _, n in per_batch)
    want = (w * sum(n * d for d, n in per_batch) / N).sum()
    assert abs(got - want) <= 1e-6 * abs(want)


@pytest.mark.gpu
@pytest.mark.parametrize("fold", [False, True], ids=["ghost_dot", "folded"])
@pytest.mark.parametrize("name", PRESETS)
def test_gpu_triton_one_pass_matches_exact(name, fold, data):
    """CUDA: one backward with the Triton kernels (loss layer with the head's ghost, every linear layer's ghost
    dot, or with fold its dots inside its weight-gradient kernel as kernels.fold_ghost_dots does) on the fp32
    model against the float64 exact K-backward reference on CPU; fp32 tolerance 1e-4."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    batch, _ = data
    model = tiny_model(name)
    G = random_G(model)
    exact = exact_task_dots(model, batch, G, K)
    model = model.float().cuda()
    G = {n: g.float().cuda() for n, g in G.items()}
    d, missing, ghost = one_pass(model, batch.to("cuda"), G, backend="triton", fold=fold)
    assert (ghost.offsets is not None) == fold  # the batch is grouped by task, so folding really ran
    assert missing.tolist() == [k == EMPTY for k in range(K)]
    err = rel_err(d.cpu(), exact)
    print(f"{name} triton one pass{' folded' if fold else ''} (fp32, cuda) vs float64 exact: max rel err {err:.2e}")
    assert err <= 1e-4
