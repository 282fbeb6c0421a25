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
runs alone in blocks of CHUNK_TOKENS queries.
"""

from __future__ import annotations

import bisect
import functools
import inspect
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

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


def _work_items(bounds: list[int], chunk_tokens: int, window: int | None) -> list[tuple[int, int, int]]:
    """(query start, query end, key start) blocks of at most chunk_tokens queries; keys end where queries end.

    Consecutive short segments are grouped; a segment longer than chunk_tokens is cut into query blocks,
    each with the keys it can see (from its segment's start, or from the window's).
    """
    groups, start = [], bounds[0]
    for prev, cur in zip(bounds[1:-1], bounds[2:], strict=True):
        if cur - start > chunk_tokens:
            groups.append((start, prev))
            start = prev
    groups.append((start, bounds[-1]))
    items = []
    for s, e in groups:
        if e - s <= chunk_tokens:
            items.append((s, e, s))
            continue
        for qs in range(s, e, chunk_tokens):  # one long segment
            items.append((qs, min(qs + chunk_tokens, e), s if window is None else max(s, qs - window + 1)))
    return [(qs, qe, ks) for qs, qe, ks in items if qe > qs]


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
    """Attention with an explicit mask. q (.., H, L, D), k/v (.., H, S, D) (KV heads already repeated).

    mask: bool (True = attend) or additive float, broadcastable to (.., H, L, S). Soft-cap (Gemma 2)
    is tanh(s / cap) * cap on the scaled scores, before the mask (HF's eager order).
    """
    if softcap is None:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale, is_causal=is_causal
        )
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
    """Block-diagonal causal attention on a flat stream, any device. q (T, H, D), k/v (T, Hkv, D) -> (T, H, D)."""
    n_rep = q.shape[1] // k.shape[1]
    bounds = [int(b) for b in cu_seqlens.tolist()]
    outs = []
    for qs, qe, ks in _work_items(bounds, chunk_tokens, window):
        qc = q[qs:qe].transpose(0, 1)  # (H, L, D)
        kc = repeat_kv_heads(k[ks:qe].transpose(0, 1), n_rep)  # (H, S, D)
        vc = repeat_kv_heads(v[ks:qe].transpose(0, 1), n_rep)
        one_segment = qs == ks and bounds[bisect.bisect_right(bounds, qs)] == qe
        if one_segment and (window is None or window >= qe - qs):
            out = masked_attention(qc, kc, vc, None, scale, softcap, dropout_p, is_causal=True)
        else:
            out = masked_attention(qc, kc, vc, segment_mask(cu_seqlens, qs, qe, window, ks), scale, softcap, dropout_p)
        outs.append(out.transpose(0, 1))
    return torch.cat(outs, dim=0)


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
        diff = torch.arange(Tq, device=query.device)[:, None] + (Tk - Tq) - torch.arange(Tk, device=query.device)
        mask = diff >= 0
        if sliding_window is not None:
            mask &= diff < sliding_window
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


def use_packed_attention(model: torch.nn.Module) -> torch.nn.Module:
    """Switch an HF model (and its sub-models) to the packed attention, in place; returns the model."""
    register_packed_attention()
    model.set_attn_implementation(ATTN_NAME)
    return model


register_packed_attention()
