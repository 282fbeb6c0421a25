"""Document-masked attention: a packed forward equals each example run alone; helpers vs naive references."""

from __future__ import annotations

import pytest
import torch
from transformers.integrations.sdpa_attention import repeat_kv as hf_repeat_kv

from adapt_fast.data.batch import IGNORE_INDEX, PAD_TASK, MicroBatch
from adapt_fast.model.attention import (
    ATTN_NAME,
    cu_seqlens_from_position_ids,
    packed_attention,
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
    """The control: HF's own sdpa, given the same packed call, lets examples see each other."""
    _, model = tiny
    mb, examples = make_micro_batch(LENGTHS, PAD)
    model.set_attn_implementation("sdpa")
    try:
        with torch.no_grad():
            leaky = model(**mb.model_inputs()).logits[0, : sum(LENGTHS)]
    finally:
        model.set_attn_implementation(ATTN_NAME)
    assert (leaky - alone_logits(model, examples)).abs().max() > 1e-2


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
