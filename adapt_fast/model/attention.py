"""Document-masked attention for packed micro-batches, registered with HF transformers.

A packed micro-batch (adapt_fast.data.batch.MicroBatch) is one row of T token slots holding N
segments end to end. `MicroBatch.model_inputs()` passes them to an HF causal LM forward as

    input_ids, position_ids (1, T)   cu_seq_lens_q, cu_seq_lens_k (N+1,) int32   max_length_q, max_length_k int

`use_packed_attention(model)` switches a loaded model to the attention registered here under
ATTN_NAME = "adapt_varlen". Every segment is then attended as its own sequence:

    key j is visible from query i  iff  seg(i) == seg(j)  and  i - window < j <= i   (window: sliding layers)

What reaches `packed_attention_forward` (transformers 5.x, checked for Llama, Qwen3, Gemma 3):
  from the attention module: module, query (B, H, T, D), key/value (B, Hkv, T, D), attention_mask,
    dropout, scaling, and `sliding_window` (Gemma 3 / Qwen3 / Mistral; None on full layers),
    `softcap` (Gemma 2 only: Gemma 3 in transformers 5 does not pass attn_logit_softcapping on);
  from the model forward's **kwargs, untouched: cu_seq_lens_q/k, max_length_q/k, and position_ids and
    use_cache (added by the decoder layer).

Masks. We register a mask builder under the same name with AttentionMaskInterface: when there is
no padding mask and queries = keys (training, prefill) it returns None, so HF never builds a dense
(T, T) mask; the segments then come from cu_seq_lens_q (or, without it, from position_ids restarts,
as HF does). With a padding mask or a KV cache (batched generation) it defers to HF's sdpa mask and
we run a plain masked attention.

Back-ends for the packed path: flash-attn's `flash_attn_varlen_func` when installed, else
`torch.nn.attention.varlen.varlen_attn` (CUDA, fp16/bf16); a grouped SDPA otherwise (CPU, fp32, softcap
without flash-attn, dropout). The grouped SDPA sorts the segments by length and gathers each group of
similar lengths into right-padded rows (B, H, Lmax, D): then plain `is_causal` SDPA needs no mask (a real
query only sees positions <= its own, all real), a sliding window is one (Lmax, Lmax) band shared by the
rows, and the outputs are scattered back. Memory stays O(T): scores are only materialised for softcap or
dropout (at most CHUNK_TOKENS^2 per head and group), and a long segment that needs scores or a window mask
runs alone in blocks of at most CHUNK_TOKENS queries (with scores adding up to O(L^2): recomputed in the backward).
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from adapt_fast.errors import ConfigError

ATTN_NAME = "adapt_varlen"
CHUNK_TOKENS = 1024


# ----------------------------------------------------------------------------- helpers


def repeat_kv_heads(x: torch.Tensor, n_rep: int, dim: int = -3) -> torch.Tensor:
    """Repeat each KV head n_rep times along `dim` (GQA): (.., Hkv, ..) -> (.., Hkv * n_rep, ..).

    Query head h reads KV head h // n_rep, as in HF's repeat_kv.
    """
    if n_rep == 1:
        return x
    return torch.repeat_interleave(x, n_rep, dim=dim)


def cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) or (T,) positions restarting per segment -> (N+1,) int32 boundaries over the flat B*T stream.

    A segment starts wherever a position is not the previous one + 1 (HF's packed-sequence rule).
    """
    pos = position_ids.reshape(position_ids.shape[0] if position_ids.dim() > 1 else 1, -1)
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    idx = starts.flatten().nonzero().flatten()
    end = torch.tensor([pos.numel()], device=pos.device, dtype=idx.dtype)
    return torch.cat([idx, end]).to(torch.int32)


def segment_mask(
    cu_seqlens: torch.Tensor, start: int, end: int, window: int | None = None, key_start: int | None = None
) -> torch.Tensor:
    """(L, S) bool mask of queries [start, end) over keys [key_start, end) (key_start defaults to start):
    same segment, causal, and within the sliding window."""
    key_start = start if key_start is None else key_start
    qi = torch.arange(start, end, device=cu_seqlens.device)
    kj = torch.arange(key_start, end, device=cu_seqlens.device)
    bounds = cu_seqlens.to(torch.long)
    same = torch.searchsorted(bounds, qi, right=True)[:, None] == torch.searchsorted(bounds, kj, right=True)[None, :]
    diff = qi[:, None] - kj[None, :]  # i - j
    mask = same & (diff >= 0)
    if window is not None:
        mask &= diff < window
    return mask


def causal_band_mask(q_len: int, k_len: int, window: int | None = None, device=None) -> torch.Tensor:
    """(q_len, k_len) bool mask, bottom-right aligned (query i sits at key position i + k_len - q_len):
    key j is visible iff 0 <= pos(i) - j < window (no upper limit without a window)."""
    diff = torch.arange(q_len, device=device)[:, None] + (k_len - q_len) - torch.arange(k_len, device=device)
    mask = diff >= 0
    if window is not None:
        mask &= diff < window
    return mask


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    softcap: float | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
) -> torch.Tensor:
    """Attention with an explicit mask. q (.., H, L, D), k/v (.., Hkv, S, D) with H a multiple of Hkv (GQA).

    mask: bool (True = attend) or additive float, broadcastable to (.., H, L, S). Soft-cap (Gemma 2)
    is tanh(s / cap) * cap on the scaled scores, before the mask (HF's eager order).
    """
    n_rep = q.shape[-3] // k.shape[-3]
    if softcap is None:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale, is_causal=is_causal, enable_gqa=n_rep > 1
        )
    k, v = repeat_kv_heads(k, n_rep), repeat_kv_heads(v, n_rep)
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale
    scores = torch.tanh(scores / softcap) * softcap
    if is_causal:
        L, S = scores.shape[-2:]
        mask = torch.ones(L, S, dtype=torch.bool, device=q.device).tril(S - L)
    if mask is not None:
        if mask.dtype == torch.bool:  # a finite fill keeps fully masked (padding) rows finite, as eager does
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + mask
    probs = torch.softmax(scores, dim=-1).to(q.dtype)
    if dropout_p > 0:
        probs = F.dropout(probs, p=dropout_p)
    return torch.matmul(probs, v)


# ----------------------------------------------------------------------------- packed (varlen) attention

GROUP_PAD_RATIO = 1.25  # a segment joins a group of rows of length Lmax if Lmax <= ratio * length + slack
GROUP_PAD_SLACK = 8


def plan_segment_groups(
    lengths: list[int],
    chunk_tokens: int = CHUNK_TOKENS,
    window: int | None = None,
    explicit_scores: bool = False,
    pad_ratio: float = GROUP_PAD_RATIO,
    pad_slack: int = GROUP_PAD_SLACK,
) -> list[tuple[list[int], int]]:
    """Group segments of similar length into right-padded rows: [(segment indices, row length Lmax)].

    Longest first. A segment joins the current group while Lmax <= pad_ratio * length + pad_slack (so
    padding stays within ~pad_ratio x the real tokens) and, with explicit_scores (softcap, dropout: the
    (B, H, Lmax, Lmax) scores are materialised), while B * Lmax^2 <= chunk_tokens^2. A segment longer than
    chunk_tokens that needs scores or a window mask (longer than the window) is a group of its own, which
    `_rows_attention` runs in query blocks.
    """
    order = sorted(range(len(lengths)), key=lengths.__getitem__, reverse=True)
    groups: list[tuple[list[int], int]] = []
    members: list[int] = []
    lmax = 0
    for n in order:
        length = lengths[n]
        if length > chunk_tokens and (explicit_scores or (window is not None and length > window)):
            groups.append(([n], length))
            continue
        fits = lmax <= pad_ratio * length + pad_slack
        if explicit_scores:
            fits = fits and (len(members) + 1) * lmax * lmax <= chunk_tokens * chunk_tokens
        if members and not fits:
            groups.append((members, lmax))
            members = []
        if not members:
            lmax = length
        members.append(n)
    if members:
        groups.append((members, lmax))
    return groups


def _rows_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    window: int | None,
    softcap: float | None,
    dropout_p: float,
    chunk_tokens: int,
) -> torch.Tensor:
    """Causal attention over right-padded rows, each one segment: q (B, H, L, D), k/v (B, Hkv, L, D) -> (B, H, L, D).

    Row b holds its segment at positions [0, len_b); a real query only sees keys at positions <= its own,
    all real, so no padding mask is needed. Outputs at padded positions are garbage (and get no gradient).
    """
    L = q.shape[-2]
    if window is not None and window >= L:
        window = None
    explicit_scores = softcap is not None or dropout_p > 0
    if L <= chunk_tokens or (window is None and not explicit_scores):
        mask = None if window is None else causal_band_mask(L, L, window, q.device)
        return masked_attention(q, k, v, mask, scale, softcap, dropout_p, is_causal=mask is None)
    # One long segment (B == 1): blocks of queries, each with the keys it can see. With explicit scores a
    # block is (H, qb, <= qb + span) floats, span = the keys a query sees: keep qb * span <= chunk_tokens^2;
    # and where autograd would keep more than ~8 chunk_tokens^2 scores per head over all blocks (O(L^2)
    # without a window), recompute each block in the backward (checkpoint) instead.
    span = L if window is None else window
    qb = max(1, min(chunk_tokens, chunk_tokens * chunk_tokens // span)) if explicit_scores else chunk_tokens
    recompute = (
        explicit_scores
        and L * min(L, qb + span) > 8 * chunk_tokens * chunk_tokens
        and torch.is_grad_enabled()
        and any(x.requires_grad for x in (q, k, v))
    )
    # Last block first: the blocks' buffers then shrink, so the allocator can reuse them (growing sizes
    # fragment glibc's heap into GBs of RSS for a 16k segment).
    outs = []
    for qs in reversed(range(0, L, qb)):
        qe = min(qs + qb, L)
        ks = 0 if window is None else max(0, qs - window + 1)
        mask = causal_band_mask(qe - qs, qe - ks, window, q.device)
        args = (q[..., qs:qe, :], k[..., ks:qe, :], v[..., ks:qe, :], mask, scale, softcap, dropout_p)
        outs.append(checkpoint(masked_attention, *args, use_reentrant=False) if recompute else masked_attention(*args))
    return torch.cat(outs[::-1], dim=-2)


def varlen_masked_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
    dropout_p: float = 0.0,
    chunk_tokens: int = CHUNK_TOKENS,
) -> torch.Tensor:
    """Block-diagonal causal attention on a flat stream, any device. q (T, H, D), k/v (T, Hkv, D) -> (T, H, D).

    Segments are grouped by length (`plan_segment_groups`) and gathered into right-padded rows, one SDPA call
    per group (`_rows_attention`), then scattered back; gathers and scatters are index_select, so autograd
    flows through (padded slots copy a real token and get exactly zero gradient).
    """
    T, H, D = q.shape
    bounds = cu_seqlens.detach().to("cpu", torch.long)
    lengths_t = bounds[1:] - bounds[:-1]
    if bounds.numel() == 0 or int(bounds[0]) != 0 or int(bounds[-1]) != T or bool((lengths_t < 0).any()):
        raise ValueError(f"cu_seqlens must rise from 0 to T = {T}, got {bounds.tolist()}")
    starts_t = bounds[:-1]
    keep = lengths_t > 0
    lengths_t, starts_t = lengths_t[keep], starts_t[keep]
    if T == 0:
        return q.new_zeros(q.shape)
    lengths = lengths_t.tolist()
    groups = plan_segment_groups(lengths, chunk_tokens, window, softcap is not None or dropout_p > 0)

    if len(groups) == 1 and len(groups[0][0]) == 1 and lengths[0] == T:  # one segment: no gather
        rows = (x.transpose(0, 1)[None] for x in (q, k, v))  # (1, H, T, D)
        return _rows_attention(*rows, scale, window, softcap, dropout_p, chunk_tokens)[0].transpose(0, 1)

    # slot_src: the token each padded slot reads (slot b * Lmax + p of a group <- token start_b + min(p, len_b - 1));
    # seg_slot: the first slot of each segment.
    slot_src, seg_slot, base = [], torch.empty_like(lengths_t), 0
    positions = torch.arange(max(lmax for _, lmax in groups))
    for members, lmax in groups:
        idx = torch.tensor(members)
        rows = torch.minimum(positions[:lmax], lengths_t[idx, None] - 1)
        slot_src.append((starts_t[idx, None] + rows).flatten())
        seg_slot[idx] = base + lmax * torch.arange(len(members))
        base += lmax * len(members)
    slot_src = torch.cat(slot_src).to(q.device)
    offsets = torch.arange(T) - torch.repeat_interleave(starts_t, lengths_t)
    token_slot = (torch.repeat_interleave(seg_slot, lengths_t) + offsets).to(q.device)

    # split (not slicing) keeps the backward one cat instead of a full-size zeros + add per group
    sizes = [lmax * len(members) for members, lmax in groups]
    q_split, k_split, v_split = (x.index_select(0, slot_src).split(sizes) for x in (q, k, v))
    outs = []
    for (members, lmax), qg, kg, vg in zip(groups, q_split, k_split, v_split, strict=True):
        qg, kg, vg = (x.view(len(members), lmax, x.shape[1], D).transpose(1, 2) for x in (qg, kg, vg))
        out = _rows_attention(qg, kg, vg, scale, window, softcap, dropout_p, chunk_tokens)
        outs.append(out.transpose(1, 2).reshape(-1, H, D))
    out_slots = torch.cat(outs) if len(outs) > 1 else outs[0]
    return out_slots.index_select(0, token_slot)


@functools.cache
def _varlen_backend() -> tuple[str, Callable, frozenset[str]] | None:
    """('flash_attn' | 'torch', function, its parameter names), or None when no varlen kernel is importable."""
    try:
        from flash_attn import flash_attn_varlen_func

        return "flash_attn", flash_attn_varlen_func, frozenset(inspect.signature(flash_attn_varlen_func).parameters)
    except ImportError:
        pass
    try:
        from torch.nn.attention.varlen import varlen_attn

        return "torch", varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)
    except ImportError:
        return None


def varlen_flash(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor | None:
    """Varlen flash attention on CUDA. q (T, H, D), k/v (T, Hkv, D) -> (T, H, D); None if it cannot express the call.

    HF's window W (i - W < j <= i) is the kernels' window_size = (W - 1, 0).
    """
    backend = _varlen_backend()
    head_dim = q.shape[-1]
    if backend is None or not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
        return None
    if head_dim > 256 or head_dim % 8:
        return None
    name, fn, params = backend
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    window_size = (window - 1, 0) if window is not None else (-1, 0)

    if name == "flash_attn":
        kwargs = dict(dropout_p=dropout_p, softmax_scale=scale, causal=True)
        if window is not None:
            if "window_size" not in params:
                return None
            kwargs["window_size"] = window_size
        if softcap is not None:
            if "softcap" not in params:
                return None
            kwargs["softcap"] = softcap
        return fn(q, k, v, cu, cu, max_seqlen, max_seqlen, **kwargs)

    # torch.nn.attention.varlen.varlen_attn: 2.10 takes is_causal, later versions window_size; enable_gqa
    # and scale come and go, so read the signature.
    if softcap is not None or dropout_p > 0:
        return None
    kwargs = {}
    if "window_size" in params:
        kwargs["window_size"] = window_size
    elif "is_causal" in params and window is None:
        kwargs["is_causal"] = True
    else:
        return None
    if "scale" in params:
        kwargs["scale"] = scale
    else:  # the kernel uses 1/sqrt(D): fold our scale into the queries
        q = q * (scale * math.sqrt(head_dim))
    n_rep = q.shape[1] // k.shape[1]
    if n_rep > 1:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            k, v = repeat_kv_heads(k, n_rep, dim=1), repeat_kv_heads(v, n_rep, dim=1)
    out = fn(q, k, v, cu, cu, max_seqlen, max_seqlen, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def packed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int | None = None,
    scale: float | None = None,
    window: int | None = None,
    softcap: float | None = None,
    dropout_p: float = 0.0,
    backend: str = "auto",
) -> torch.Tensor:
    """Causal attention within each segment of a flat stream. q (T, H, D), k/v (T, Hkv, D) -> (T, H, D).

    backend: "auto" (varlen flash kernel where it applies, else masked SDPA), "varlen" (raise if the
    kernel cannot run this call), "sdpa" (always the masked SDPA).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if backend != "sdpa":
        if max_seqlen is None:
            max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        out = varlen_flash(q, k, v, cu_seqlens, int(max_seqlen), scale, window, softcap, dropout_p)
        if out is not None:
            return out
        if backend == "varlen":
            raise RuntimeError(
                f"no varlen kernel for this call (device {q.device}, dtype {q.dtype}, softcap {softcap})"
            )
    return varlen_masked_sdpa(q, k, v, cu_seqlens, scale, window, softcap, dropout_p)


# ----------------------------------------------------------------------------- HF integration


def packed_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    cu_seq_lens_k: torch.Tensor | None = None,
    max_length_q: int | None = None,
    max_length_k: int | None = None,
    position_ids: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The AttentionInterface function. query (B, H, Tq, D), key/value (B, Hkv, Tk, D) -> ((B, Tq, H, D), None).

    Packed path (no mask and Tq == Tk): segments from cu_seq_lens_q, else from position_ids restarts,
    else one segment per row; a given attention_mask is ignored there. Otherwise (padding mask or KV
    cache, i.e. generation) a plain masked attention with HF's mask.
    """
    if not getattr(module, "is_causal", True):
        raise ValueError(f"{ATTN_NAME} supports causal (decoder) attention only")
    B, H, Tq, D = query.shape
    Tk = key.shape[2]
    scale = D**-0.5 if scaling is None else scaling
    dropout = dropout if module.training else 0.0

    packed = cu_seq_lens_q is not None or (attention_mask is None and Tq == Tk)
    if packed:
        if cu_seq_lens_q is not None:
            k_differs = cu_seq_lens_k is not None and cu_seq_lens_k is not cu_seq_lens_q
            if k_differs and not torch.equal(cu_seq_lens_k, cu_seq_lens_q):
                raise ValueError(f"{ATTN_NAME}: cu_seq_lens_k must equal cu_seq_lens_q (self-attention)")
            cu, max_len = cu_seq_lens_q, max_length_q
        elif position_ids is not None and position_ids.shape[-1] == Tq:
            cu, max_len = cu_seqlens_from_position_ids(position_ids.expand(B, -1)), None
        else:
            cu, max_len = torch.arange(0, B * Tq + 1, Tq, dtype=torch.int32, device=query.device), Tq
        max_len = int(max_len) if max_len is not None else None
        q = query.transpose(1, 2).reshape(B * Tq, H, D)
        k = key.transpose(1, 2).reshape(B * Tk, -1, D)
        v = value.transpose(1, 2).reshape(B * Tk, -1, D)
        out = packed_attention(q, k, v, cu, max_len, scale, sliding_window, softcap, dropout)
        return out.reshape(B, Tq, H, D), None

    # Generation: HF's mask (padding, cache offsets, window) or, without one, bottom-right causal.
    n_rep = H // key.shape[1]
    k, v = repeat_kv_heads(key, n_rep), repeat_kv_heads(value, n_rep)
    mask = attention_mask
    if mask is None and Tq > 1:
        mask = causal_band_mask(Tq, Tk, sliding_window, query.device)
    elif mask is not None and mask.dtype != torch.bool:
        mask = mask.to(query.dtype)
    out = masked_attention(query, k, v, mask, scale, softcap, dropout)
    return out.transpose(1, 2).contiguous(), None


def packed_attention_mask(*args, **kwargs) -> torch.Tensor | None:
    """AttentionMaskInterface builder: None when segments come from cu_seqlens, else HF's sdpa mask."""
    q_length, kv_length = kwargs.get("q_length"), kwargs.get("kv_length")
    no_offset = all(isinstance(o, int) and o == 0 for o in (kwargs.get("q_offset", 0), kwargs.get("kv_offset", 0)))
    if kwargs.get("attention_mask") is None and q_length == kv_length and no_offset:
        return None
    return sdpa_mask(*args, **kwargs)


def register_packed_attention() -> str:
    """Register ATTN_NAME with AttentionInterface and AttentionMaskInterface (idempotent); return the name."""
    AttentionInterface.register(ATTN_NAME, packed_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, packed_attention_mask)
    return ATTN_NAME


def use_packed_attention(model: PreTrainedModel) -> PreTrainedModel:
    """Switch an HF model (and its sub-models) to the packed attention, in place; returns the model.

    ConfigError for a model whose attention does not go through AttentionInterface (Falcon, GPT-J, ...):
    transformers only warns and keeps its own attention, under which packed examples would attend to each other.
    """
    register_packed_attention()
    models = [m for m in model.modules() if isinstance(m, PreTrainedModel)]
    fixed = sorted({type(m).__name__ for m in models if not m._can_set_attn_implementation()})
    if not fixed:
        model.set_attn_implementation(ATTN_NAME)
        fixed = sorted({type(m).__name__ for m in models if m.config._attn_implementation != ATTN_NAME})
    if fixed:
        raise ConfigError(
            f"{', '.join(fixed)}: its attention does not take a function from transformers' AttentionInterface, so "
            "packed examples would attend to each other; models whose attention does (Llama, Qwen, Gemma, Mistral, "
            "Phi-3, GPT-2, GPT-NeoX, OLMo, ...) are supported"
        )
    return model


register_packed_attention()
