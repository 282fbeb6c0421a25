"""Document-masked attention: a packed forward equals each example run alone; helpers vs naive references."""

from __future__ import annotations

import pytest
import torch
from transformers.integrations.sdpa_attention import repeat_kv as hf_repeat_kv

from adapt_fast.data.batch import IGNORE_INDEX, PAD_TASK, MicroBatch
from adapt_fast.model.attention import (
    ATTN_NAME,
    GROUP_PAD_RATIO,
    GROUP_PAD_SLACK,
    causal_band_mask,
    cu_seqlens_from_position_ids,
    masked_attention,
    packed_attention,
    plan_segment_groups,
    repeat_kv_heads,
    segment_mask,
    varlen_flash,
    varlen_masked_sdpa,
)
from adapt_fast.model.loading import load_model_and_tokenizer

TINY = ["tiny-llama", "tiny-qwen3", "tiny-gemma3"]
LENGTHS = [7, 23, 1, 12]  # 23 > tiny-gemma3's sliding window (16)
PAD = 5


def make_micro_batch(lengths: list[int], pad: int, vocab: int = 260, seed: int = 0) -> tuple[MicroBatch, list]:
    """Examples end to end (one task each), then a padding segment of `pad` slots."""
    g = torch.Generator().manual_seed(seed)
    examples = [torch.randint(4, vocab, (n,), generator=g) for n in lengths]
    segs = lengths + ([pad] if pad else [])
    input_ids = torch.cat(examples + [torch.zeros(pad, dtype=torch.long)])
    labels = input_ids.clone()
    labels[torch.tensor([0] + lengths[:-1]).cumsum(0)] = IGNORE_INDEX
    labels[sum(lengths) :] = IGNORE_INDEX
    task_ids = torch.cat([torch.full((n,), k) for k, n in enumerate(lengths)] + [torch.full((pad,), PAD_TASK)])
    mb = MicroBatch(
        input_ids=input_ids,
        labels=labels,
        position_ids=torch.cat([torch.arange(n) for n in segs]),
        cu_seqlens=torch.tensor([0] + segs, dtype=torch.int32).cumsum(0, dtype=torch.int32),
        task_ids=task_ids,
        task_offsets=torch.tensor([0] + lengths).cumsum(0),
        max_seqlen=max(segs),
        num_examples=len(lengths),
    )
    return mb, examples


@pytest.fixture(scope="module", params=TINY)
def tiny(request):
    model, _ = load_model_and_tokenizer(request.param, dtype=torch.float32, device="cpu")
    return request.param, model.eval()


def alone_logits(model, examples: list[torch.Tensor]) -> torch.Tensor:
    """Each example on its own through HF's plain sdpa attention, concatenated: (sum L, V)."""
    model.set_attn_implementation("sdpa")
    try:
        with torch.no_grad():
            return torch.cat([model(input_ids=ex[None]).logits[0] for ex in examples])
    finally:
        model.set_attn_implementation(ATTN_NAME)


def test_packed_forward_equals_examples_alone(tiny):
    name, model = tiny
    assert model.config._attn_implementation == ATTN_NAME
    if name == "tiny-gemma3":
        assert "sliding_attention" in model.config.layer_types and max(LENGTHS) > model.config.sliding_window
    mb, examples = make_micro_batch(LENGTHS, PAD)
    with torch.no_grad():
        packed = model(**mb.model_inputs()).logits[0]
    n = sum(LENGTHS)
    torch.testing.assert_close(packed[:n], alone_logits(model, examples), atol=1e-5, rtol=0)
    # without cu_seq_lens the segments come from the position_ids restarts
    with torch.no_grad():
        from_positions = model(input_ids=mb.input_ids[None], position_ids=mb.position_ids[None]).logits[0]
    torch.testing.assert_close(from_positions, packed, atol=1e-6, rtol=0)


def test_plain_sdpa_with_packed_positions_leaks(tiny):
    """The control: HF's own sdpa with a plain causal mask over the packed row lets examples see each other.

    (transformers 5 finds the segments from position_ids restarts by itself when no attention_mask is
    given, so the control passes an all-ones 2D mask, which switches that detection off.)
    """
    _, model = tiny
    mb, examples = make_micro_batch(LENGTHS, PAD)
    model.set_attn_implementation("sdpa")
    try:
        with torch.no_grad():
            ones = torch.ones_like(mb.input_ids)[None]
            leaky = model(**mb.model_inputs(), attention_mask=ones).logits[0, : sum(LENGTHS)]
    finally:
        model.set_attn_implementation(ATTN_NAME)
    assert (leaky - alone_logits(model, examples)).abs().max() > 1e-2


def test_hf_sdpa_finds_packed_examples_without_cache(tiny):
    """What TRL's padding-free rows rely on without flash-attn (bench/end_to_end.py, trl_packed): with no attention
    mask and no KV cache, transformers builds the block-diagonal mask from the position_ids restarts itself."""
    _, model = tiny
    mb, examples = make_micro_batch(LENGTHS, PAD)
    model.set_attn_implementation("sdpa")
    try:
        with torch.no_grad():
            row = dict(input_ids=mb.input_ids[None], position_ids=mb.position_ids[None])
            packed = model(**row, use_cache=False).logits[0, : sum(LENGTHS)]
            with_cache = model(**row, use_cache=True).logits[0, : sum(LENGTHS)]  # a cache switches the detection off
    finally:
        model.set_attn_implementation(ATTN_NAME)
    alone = alone_logits(model, examples)
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=0)
    assert (with_cache - alone).abs().max() > 1e-2


def test_packed_gradients_equal_sum_of_example_gradients():
    """What the per-task gradient split relies on: d(packed loss) = sum over examples of d(example loss)."""
    model, _ = load_model_and_tokenizer("tiny-gemma3", dtype=torch.float32, device="cpu")
    mb, examples = make_micro_batch(LENGTHS, PAD, seed=1)
    logits = model(**mb.model_inputs()).logits[0]
    torch.nn.functional.cross_entropy(logits, mb.shift_labels(), reduction="sum").backward()
    packed = [p.grad.clone() for p in model.parameters()]

    model.zero_grad()
    model.set_attn_implementation("sdpa")
    for ex in examples:
        target = torch.cat([ex[1:], torch.tensor([IGNORE_INDEX])])
        torch.nn.functional.cross_entropy(model(input_ids=ex[None]).logits[0], target, reduction="sum").backward()
    for g_packed, p in zip(packed, model.parameters(), strict=True):
        torch.testing.assert_close(g_packed, p.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma3"])
def test_padded_batch_and_generate_match_sdpa(name):
    """Without cu_seqlens (batched, left-padded generation) the function follows HF's mask."""
    model, tok = load_model_and_tokenizer(name, dtype=torch.float32, device="cpu")
    model.eval()
    tok.padding_side = "left"
    enc = tok(["Hi", "a prompt longer than the sixteen-token window"], return_tensors="pt", padding=True)
    valid = enc["attention_mask"].bool()
    with torch.no_grad():
        ours, ours_gen = model(**enc).logits[valid], model.generate(**enc, max_new_tokens=8, do_sample=False)
        model.set_attn_implementation("sdpa")
        ref, ref_gen = model(**enc).logits[valid], model.generate(**enc, max_new_tokens=8, do_sample=False)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    assert torch.equal(ours_gen, ref_gen)


# ----------------------------------------------------------------------------- helpers vs naive references


def naive_packed_attention(q, k, v, cu_seqlens, scale, window=None, softcap=None):
    """Loop over segments and query positions: q (T, H, D), k/v (T, Hkv, D) -> (T, H, D)."""
    n_rep = q.shape[1] // k.shape[1]
    out = torch.zeros_like(q)
    bounds = cu_seqlens.tolist()
    for s, e in zip(bounds[:-1], bounds[1:], strict=True):
        for i in range(s, e):
            lo = max(s, i - window + 1) if window is not None else s
            for h in range(q.shape[1]):
                scores = (k[lo : i + 1, h // n_rep] @ q[i, h]) * scale
                if softcap is not None:
                    scores = torch.tanh(scores / softcap) * softcap
                out[i, h] = torch.softmax(scores, dim=0) @ v[lo : i + 1, h // n_rep]
    return out


def test_repeat_kv_heads_matches_hf():
    x = torch.randn(2, 3, 5, 4)  # (B, Hkv, T, D)
    torch.testing.assert_close(repeat_kv_heads(x, 4), hf_repeat_kv(x, 4), rtol=0, atol=0)
    flat = x[0].transpose(0, 1)  # (T, Hkv, D): varlen layout
    expected = hf_repeat_kv(x[:1], 4)[0].transpose(0, 1)
    torch.testing.assert_close(repeat_kv_heads(flat, 4, dim=1), expected, rtol=0, atol=0)
    assert repeat_kv_heads(x, 1) is x


@pytest.mark.parametrize("window", [None, 1, 3, 7])
def test_segment_mask_matches_naive(window):
    cu = torch.tensor([0, 4, 5, 13, 20], dtype=torch.int32)
    bounds = cu.tolist()
    seg = [next(n for n in range(len(bounds) - 1) if bounds[n] <= t < bounds[n + 1]) for t in range(20)]
    for start, end, key_start in [(0, 20, 0), (4, 13, 4), (5, 20, 5), (9, 13, 5), (16, 20, 0)]:
        naive = torch.tensor(
            [
                [seg[i] == seg[j] and j <= i and (window is None or i - window < j) for j in range(key_start, end)]
                for i in range(start, end)
            ]
        )
        assert torch.equal(segment_mask(cu, start, end, window, key_start), naive)


@pytest.mark.parametrize("window, softcap", [(None, None), (5, None), (None, 20.0), (4, 10.0)])
@pytest.mark.parametrize("chunk_tokens", [4, 8, 1024])  # 4 and 8 cut the long segments into blocks
def test_varlen_masked_sdpa_matches_naive(window, softcap, chunk_tokens):
    g = torch.Generator().manual_seed(0)
    lengths = [3, 17, 1, 9, 6]
    T, H, Hkv, D = sum(lengths), 6, 2, 8
    q, k, v = (torch.randn(T, h, D, generator=g) for h in (H, Hkv, Hkv))
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    scale = 0.3
    out = varlen_masked_sdpa(q, k, v, cu, scale, window, softcap, chunk_tokens=chunk_tokens)
    torch.testing.assert_close(out, naive_packed_attention(q, k, v, cu, scale, window, softcap), atol=1e-5, rtol=1e-5)


@pytest.fixture
def single_thread():
    """These tensors are tiny: on a shared 2-core box a 2-thread pool waits on descheduled threads (~10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def per_segment_reference(q, k, v, cu_seqlens, scale, window=None, softcap=None):
    """Loop over segments, dense attention in float64: q (T, H, D), k/v (T, Hkv, D) -> (T, H, D) float64."""
    n_rep = q.shape[1] // k.shape[1]
    bounds = cu_seqlens.tolist()
    outs = []
    for s, e in zip(bounds[:-1], bounds[1:], strict=True):
        qs, ks, vs = (x[s:e].double().transpose(0, 1) for x in (q, k, v))  # (heads, L, D)
        ks, vs = ks.repeat_interleave(n_rep, 0), vs.repeat_interleave(n_rep, 0)
        scores = qs @ ks.transpose(-1, -2) * scale
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        pos = torch.arange(e - s)
        diff = pos[:, None] - pos[None, :]
        visible = (diff >= 0) & (diff < (window if window is not None else e - s + 1))
        outs.append((scores.masked_fill(~visible, float("-inf")).softmax(-1) @ vs).transpose(0, 1))
    return torch.cat(outs)


def random_lengths(total: int, seed: int) -> list[int]:
    """Segment lengths summing to `total`: runs of 1-token segments, short ones and some long ones."""
    g = torch.Generator().manual_seed(seed)
    lengths = []
    while sum(lengths) < total:
        kind = int(torch.randint(0, 4, (1,), generator=g))
        hi = [1, 8, 40, 150][kind]
        lengths += torch.randint(1, hi + 1, (int(torch.randint(1, 4, (1,), generator=g)),), generator=g).tolist()
    lengths[-1] -= sum(lengths) - total
    return [n for n in lengths if n > 0]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("window, explicit_scores", [(None, False), (24, False), (None, True), (24, True)])
def test_plan_segment_groups(seed, window, explicit_scores):
    lengths = random_lengths(600, seed) + [1, 300]
    chunk = 64
    groups = plan_segment_groups(lengths, chunk, window, explicit_scores)
    assert sorted(n for members, _ in groups for n in members) == list(range(len(lengths)))
    for members, lmax in groups:
        assert lmax == max(lengths[n] for n in members)
        blocks = lmax > chunk and (explicit_scores or (window is not None and lmax > window))
        if blocks:  # run alone, in query blocks
            assert len(members) == 1
            continue
        assert all(lmax <= GROUP_PAD_RATIO * lengths[n] + GROUP_PAD_SLACK for n in members)
        if explicit_scores:
            assert len(members) == 1 or len(members) * lmax * lmax <= chunk * chunk
    padded = sum(len(members) * lmax for members, lmax in groups)
    assert padded <= GROUP_PAD_RATIO * sum(lengths) + GROUP_PAD_SLACK * len(lengths)


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize(
    "lengths, heads, dtype",
    [
        ("mixed", (4, 4), torch.float32),
        ("mixed", (6, 2), torch.float32),
        ("mixed", (6, 2), torch.bfloat16),
        ("single", (6, 2), torch.float32),
    ],
)
@pytest.mark.parametrize("window, softcap", [(None, None), (24, None), (None, 30.0), (24, 30.0)])
def test_grouped_sdpa_matches_per_segment_loop(lengths, heads, dtype, window, softcap):
    """Forward and input gradients of the grouped (padded rows) SDPA vs a per-segment dense loop in float64.

    chunk_tokens=48 covers every route: grouped rows without a mask, with the shared band mask (lengths
    25..48 with window 24), with explicit scores (softcap) in groups of B * Lmax^2 <= 48^2, the long
    segments (> 48) alone in query blocks (window or softcap) or as one causal call (neither).
    """
    g = torch.Generator().manual_seed(0)
    lengths = random_lengths(200, 3) + [1, 1, 130] if lengths == "mixed" else [150]
    assert window is None or max(lengths) > window
    T, (H, Hkv), D = sum(lengths), heads, 16
    q, k, v = (torch.randn(T, h, D, generator=g).to(dtype).requires_grad_() for h in (H, Hkv, Hkv))
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    grad_out = torch.randn(T, H, D, generator=g)
    scale = D**-0.5 * 1.3

    out = varlen_masked_sdpa(q, k, v, cu, scale, window, softcap, chunk_tokens=48)
    assert out.dtype == dtype and out.shape == (T, H, D)
    grads = torch.autograd.grad(out, (q, k, v), grad_out.to(dtype))
    ref = per_segment_reference(q, k, v, cu, scale, window, softcap)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad_out.double())
    for got, want in zip((out, *grads), (ref, *ref_grads), strict=True):
        want = want.double()  # the gradients come back in the inputs' dtype
        if dtype == torch.float32:
            torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
        else:  # bf16: within 1e-2 of the tensor's scale (observed <= 1e-2 x max |ref|)
            torch.testing.assert_close(got.double(), want, atol=2e-2 * want.abs().max().item(), rtol=0)


@pytest.mark.usefixtures("single_thread")
def test_grouped_sdpa_matches_dense_block_diagonal_mask():
    """Against one dense (T, T) block-diagonal mask (`segment_mask`) through masked_attention, with a padding tail."""
    g = torch.Generator().manual_seed(7)
    lengths = [1] * 20 + random_lengths(250, 11) + [5]
    T, H, Hkv, D = sum(lengths), 8, 2, 8
    q, k, v = (torch.randn(T, h, D, generator=g) for h in (H, Hkv, Hkv))
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    for window in (None, 3, 40):
        mask = segment_mask(cu, 0, T, window)
        ref = masked_attention(*(x.transpose(0, 1) for x in (q, k, v)), mask, 0.5).transpose(0, 1)
        torch.testing.assert_close(varlen_masked_sdpa(q, k, v, cu, 0.5, window), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.usefixtures("single_thread")
def test_grouped_sdpa_dropout_stays_in_segment():
    """With dropout (training), a segment's outputs still depend on that segment's tokens only (padded rows too)."""
    lengths = [3, 40, 1, 17, 60, 9]  # groups: [60], [40], [17, 9 padded to 17], [3, 1 padded to 3]
    T, H, D = sum(lengths), 4, 8
    q, k, v = (torch.randn(T, H, D, requires_grad=True) for _ in range(3))
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    out = varlen_masked_sdpa(q, k, v, cu, 0.3, dropout_p=0.5)
    assert not torch.allclose(out, varlen_masked_sdpa(q, k, v, cu, 0.3))
    bounds = cu.tolist()
    for s, e in zip(bounds[:-1], bounds[1:], strict=True):
        for grad in torch.autograd.grad(out[s:e].sum(), (q, k, v), retain_graph=True):
            assert torch.equal(grad[:s], torch.zeros_like(grad[:s])) and torch.equal(
                grad[e:], torch.zeros_like(grad[e:])
            )


def test_varlen_masked_sdpa_rejects_bad_cu_seqlens():
    q = torch.randn(6, 2, 4)
    for bad in ([0, 4], [1, 6], [0, 4, 3, 6]):
        with pytest.raises(ValueError):
            varlen_masked_sdpa(q, q, q, torch.tensor(bad, dtype=torch.int32), 0.5)


@pytest.mark.parametrize("window", [None, 1, 4])
def test_causal_band_mask(window):
    for q_len, k_len in [(5, 5), (3, 7), (1, 4)]:
        off = k_len - q_len
        naive = torch.tensor([[0 <= i + off - j < (window or k_len + 1) for j in range(k_len)] for i in range(q_len)])
        assert torch.equal(causal_band_mask(q_len, k_len, window), naive)


def test_cu_seqlens_from_position_ids():
    pos = torch.tensor([[0, 1, 2, 0, 0, 1, 0, 1, 2, 3]])
    assert cu_seqlens_from_position_ids(pos).tolist() == [0, 3, 4, 6, 10]
    two_rows = torch.tensor([[0, 1, 2], [0, 1, 0]])
    assert cu_seqlens_from_position_ids(two_rows).tolist() == [0, 3, 5, 6]


def test_varlen_kernel_declines_on_cpu():
    q = torch.randn(6, 2, 8)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    assert varlen_flash(q, q, q, cu, 4, 0.5) is None
    with pytest.raises(RuntimeError):
        packed_attention(q, q, q, cu, backend="varlen")


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("window", [None, 64])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_varlen_kernel_matches_masked_sdpa(window, dtype):
    """Forward and backward of the varlen kernel (flash-attn or torch varlen_attn) vs the masked SDPA path."""
    g = torch.Generator(device="cuda").manual_seed(0)
    lengths = [1, 37, 300, 129, 64, 5]
    T, H, Hkv, D = sum(lengths), 8, 2, 64
    q, k, v = (torch.randn(T, h, D, device="cuda", dtype=dtype, generator=g, requires_grad=True) for h in (H, Hkv, Hkv))
    cu = torch.tensor([0] + lengths, device="cuda").cumsum(0).to(torch.int32)
    scale = D**-0.5 * 0.9
    grad_out = torch.randn(T, H, D, device="cuda", dtype=dtype, generator=g)

    out = packed_attention(q, k, v, cu, max(lengths), scale, window, backend="varlen")
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    ref = packed_attention(q.float(), k.float(), v.float(), cu, max(lengths), scale, window, backend="sdpa")
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad_out.float())
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got.float(), want.float(), atol=5e-2, rtol=5e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("name", TINY)
def test_cuda_packed_model_forward_equals_examples_alone(name):
    model, _ = load_model_and_tokenizer(name, dtype=torch.bfloat16, device="cuda")
    mb, examples = make_micro_batch([7, 40, 1, 100], 9)
    with torch.no_grad():
        packed = model.eval()(**mb.to("cuda").model_inputs()).logits[0, : sum([7, 40, 1, 100])].float()
    ref = alone_logits(model, [ex.cuda() for ex in examples]).float()
    torch.testing.assert_close(packed, ref, atol=5e-2, rtol=5e-2)
