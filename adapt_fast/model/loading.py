"""Models: presets (real architectures, random init, no download) or a local HF folder.

    model, tokenizer = load_model_and_tokenizer("tiny-llama")          # or "llama-3.2-1b", or "/path/to/folder"
    decoder = base_model(model)                                         # hidden states (1, T, H)
    weight, scale, softcap = lm_head(model)                             # (V, H), logit scale and soft-cap or None

Presets are the real models' configs written out (Llama 3.2 1B, Qwen3 0.6B, Gemma 3 1B) plus tiny
versions of the same architectures for tests. All use the byte tokenizer (adapt_fast.data.tokenizer):
tiny presets have its vocabulary (rounded up to a multiple of 8), the big ones keep their real
vocabulary (the byte ids are a subset), and every preset's bos/eos/pad ids are the byte tokenizer's.

Loaded models run the packed attention (adapt_fast.model.attention). The attention implementation is
not written into a saved config.json, so `model.save_pretrained(folder)` plus
`tokenizer.save_pretrained(folder)` gives a folder that plain transformers loads (with sdpa) and
generates from.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    Gemma3TextConfig,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    Qwen3Config,
)

from adapt_fast.data.tokenizer import BOS_ID, BYTE_VOCAB_SIZE, EOS_ID, PAD_ID, build_byte_tokenizer
from adapt_fast.errors import ConfigError, first_line
from adapt_fast.model.attention import use_packed_attention
from adapt_fast.model.zero3 import full_shape, is_partitioned

TINY_VOCAB = (BYTE_VOCAB_SIZE + 7) // 8 * 8  # 264
BYTE_IDS = dict(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")
BYTE_TOKENIZER = "byte"  # model.tokenizer: the presets' byte tokenizer, for a model folder saved without one


def _gemma3_layer_types(num_layers: int, pattern: int) -> list[str]:
    """Gemma 3: every pattern-th layer is global, the others local (sliding window)."""
    return ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(num_layers)]


def _tiny_llama() -> PretrainedConfig:
    return LlamaConfig(
        vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
        rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=True, **BYTE_IDS,
    )  # fmt: skip


def _tiny_qwen3() -> PretrainedConfig:
    return Qwen3Config(
        vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=4096,
        rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        tie_word_embeddings=True, use_sliding_window=False, sliding_window=None, **BYTE_IDS,
    )  # fmt: skip


def _tiny_gemma3() -> PretrainedConfig:
    return Gemma3TextConfig(
        vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=192, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
        max_position_embeddings=4096, rms_norm_eps=1e-6, sliding_window=16,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        },
        attn_logit_softcapping=50.0, final_logit_softcapping=30.0, tie_word_embeddings=True, **BYTE_IDS,
    )  # fmt: skip


def _llama_3_2_1b() -> PretrainedConfig:
    """meta-llama/Llama-3.2-1B."""
    return LlamaConfig(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
        rms_norm_eps=1e-5, hidden_act="silu", attention_bias=False, mlp_bias=False, initializer_range=0.02,
        rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "high_freq_factor": 4.0,
            "low_freq_factor": 1.0, "original_max_position_embeddings": 8192,
        },
        tie_word_embeddings=True, **BYTE_IDS,
    )  # fmt: skip


def _qwen3_0_6b() -> PretrainedConfig:
    """Qwen/Qwen3-0.6B."""
    return Qwen3Config(
        vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
        num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
        rms_norm_eps=1e-6, hidden_act="silu", attention_bias=False, initializer_range=0.02,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        use_sliding_window=False, sliding_window=None, max_window_layers=28,
        tie_word_embeddings=True, **BYTE_IDS,
    )  # fmt: skip


def _gemma_3_1b() -> PretrainedConfig:
    """google/gemma-3-1b-pt (text only): 5 local layers (window 512) per global one, MQA, head_dim 256."""
    return Gemma3TextConfig(
        vocab_size=262144, hidden_size=1152, intermediate_size=6912, num_hidden_layers=26,
        num_attention_heads=4, num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256,
        max_position_embeddings=32768, rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh",
        sliding_window=512, layer_types=_gemma3_layer_types(26, 6),
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        },
        attn_logit_softcapping=None, final_logit_softcapping=None, attention_bias=False,
        initializer_range=0.02, tie_word_embeddings=True, **BYTE_IDS,
    )  # fmt: skip


PRESETS: dict[str, Callable[[], PretrainedConfig]] = {
    "tiny-llama": _tiny_llama,
    "tiny-qwen3": _tiny_qwen3,
    "tiny-gemma3": _tiny_gemma3,
    "llama-3.2-1b": _llama_3_2_1b,
    "qwen3-0.6b": _qwen3_0_6b,
    "gemma-3-1b": _gemma_3_1b,
}


def preset_config(name: str) -> PretrainedConfig:
    """The config of a preset (a fresh object). Unknown name: ConfigError."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model {name!r}: not a folder and not a preset ({', '.join(PRESETS)})")
    return PRESETS[name]()


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA, fp32 elsewhere."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_tokenizer(
    name: str, trust_remote_code: bool = False, tokenizer_name: str = "", option: str = "model.tokenizer"
):
    """The tokenizer for model `name` (pad = eos where it has no pad): `tokenizer_name` when given (a folder, or
    "byte"), else a folder's own tokenizer files, else (a preset) the byte tokenizer. ConfigError for an unknown
    name, and for a model folder without tokenizer files (training it on another tokenizer's ids would be silent
    damage): save the tokenizer beside the model, or name one (`option`: how errors name the setting)."""
    if tokenizer_name == BYTE_TOKENIZER:
        return build_byte_tokenizer()
    if tokenizer_name:
        if not os.path.isdir(tokenizer_name) or not _has_tokenizer_files(tokenizer_name):
            files = ", ".join(TOKENIZER_FILES)
            raise ConfigError(f"{option} {tokenizer_name}: no tokenizer files there ({files})")
        name = tokenizer_name
    elif not os.path.isdir(name):
        preset_config(name)  # ConfigError for an unknown name
        return build_byte_tokenizer()
    elif not _has_tokenizer_files(name):
        raise ConfigError(
            f"{name}: no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}, ...): save the model's tokenizer beside it "
            f"(tokenizer.save_pretrained), or name one with {option} (a folder, or {BYTE_TOKENIZER} for the "
            "presets' byte tokenizer)"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as err:
        raise ConfigError(f"{name}: cannot load the tokenizer ({first_line(err)})") from None
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _has_tokenizer_files(folder: str) -> bool:
    return any(os.path.exists(os.path.join(folder, f)) for f in TOKENIZER_FILES)


@contextlib.contextmanager
def partitioned_loading(zero3_config: dict | None):
    """While active, transformers' from_pretrained builds the model inside deepspeed.zero.Init and loads the
    checkpoint into each rank's ZeRO-3 partitions, layer by layer (HF's own ZeRO-3 integration, reached through an
    HfDeepSpeedConfig, as HF Trainer does): a model too large for one device can start. No-op for None; without
    accelerate (which HfDeepSpeedConfig needs) a warning, and the model loads whole on every rank first."""
    if zero3_config is None:
        yield
        return
    if importlib.util.find_spec("accelerate") is None:
        warnings.warn("ZeRO-3: accelerate is not installed, so the model loads whole on every rank first", stacklevel=3)
        yield
        return
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    hf_config = HfDeepSpeedConfig(zero3_config)  # transformers keeps only a weak reference: hold it here
    try:
        yield
    finally:
        unset_hf_deepspeed_config()
        del hf_config


def check_model_folder(name: str, trust_remote_code: bool = False) -> None:
    """ConfigError (one line) unless the folder holds a causal-LM config transformers can read and weights;
    cheap (no weights read), so a trainer can call it before tokenising the data."""
    from transformers import AutoConfig

    from adapt_fast.checkpoint import MARKER

    if (Path(name) / MARKER).is_file():  # a trainer checkpoint, not a model folder
        raise ConfigError(
            f"{name}: a training checkpoint (DeepSpeed state), not a model folder; the model folder is the run's "
            "final/ (written when the run ends: continue a stopped run with --resume)"
        )
    try:
        AutoConfig.from_pretrained(name, local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as err:
        raise ConfigError(f"{name}: not a model folder ({first_line(err)})") from None
    if not any(any(Path(name).glob(pattern)) for pattern in ("*.safetensors", "*.bin")):
        raise ConfigError(f"{name}: no weights (*.safetensors or *.bin) in the model folder")


def load_model_and_tokenizer(
    name: str,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    trust_remote_code: bool = False,
    seed: int = 0,
    zero3_config: dict | None = None,
    tokenizer: object | None = None,
) -> tuple[PreTrainedModel, object]:
    """A preset (random init from `seed`) or a local HF folder, with the packed attention switched on.

    device: default CUDA when available, else CPU. dtype: default bf16 on CUDA, fp32 on CPU.
    The tokenizer is load_tokenizer(name)'s (a folder without tokenizer files is a ConfigError); `tokenizer`, when
    given (the caller loaded it already, with load_tokenizer), is checked against the model and returned instead.
    zero3_config (the DeepSpeed config of a ZeRO-3 run): a folder loads straight into this rank's partitions
    (partitioned_loading); a preset is built whole, so that its seeded random init is the same under every ZeRO
    stage.
    """
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or default_dtype(device)

    if os.path.isdir(name):
        check_model_folder(name, trust_remote_code)
        try:
            with partitioned_loading(zero3_config):
                model = AutoModelForCausalLM.from_pretrained(
                    name, dtype=dtype, local_files_only=True, trust_remote_code=trust_remote_code
                )
        except (OSError, ValueError, KeyError) as err:  # no weights, a config transformers does not know, ...
            if type(err).__module__.startswith("pydantic"):  # DeepSpeed refusing its config (zero.Init): the caller's
                raise
            raise ConfigError(f"{name}: cannot load the model ({first_line(err)})") from None
        if not is_partitioned(next(model.parameters())):  # zero.Init put the partitions on the device already
            model = model.to(device)
    else:
        config = preset_config(name)
        torch.manual_seed(seed)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if tokenizer is None:
        tokenizer = load_tokenizer(name, trust_remote_code)

    vocab = full_shape(model.get_input_embeddings().weight)[0]
    if len(tokenizer) > vocab:
        raise ConfigError(f"tokenizer of {name!r} has {len(tokenizer)} tokens but the model's vocabulary is {vocab}")
    use_packed_attention(model)
    if is_partitioned(next(model.parameters())):
        lm_head(model)  # a head with a bias: one line now (the forward of check_head needs the engine's gathering)
    else:
        check_head(model, name)
    return model, tokenizer


def enable_gradient_checkpointing(model: PreTrainedModel, reentrant: bool = False) -> None:
    """Recompute each decoder layer's activations in the backward (HF activation checkpointing, non-reentrant by
    default, as HF Trainer's `gradient_checkpointing`): memory for one layer's activations instead of all, about a
    third more compute. Active only while the model is in training mode. ConfigError if the model does not support
    it."""
    if not model.supports_gradient_checkpointing:
        raise ConfigError(f"training.gradient_checkpointing: {type(model).__name__} does not support it")
    kwargs = {"use_reentrant": reentrant}
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.2x; the old name warns
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def unwrap(model: torch.nn.Module) -> PreTrainedModel:
    """The HF model inside DDP / DeepSpeed / compile wrappers."""
    while not isinstance(model, PreTrainedModel) and hasattr(model, "module"):
        model = model.module
    return getattr(model, "_orig_mod", model)


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder (model.model) whose forward returns last_hidden_state (B, T, H), final norm applied."""
    model = unwrap(model)
    decoder = getattr(model, model.base_model_prefix, None)
    return decoder if decoder is not None else model.get_decoder()


class LMHead(NamedTuple):
    """What the fused loss needs of a model's LM head: logits = softcap · tanh(scale · hidden @ weight.T / softcap)."""

    weight: torch.nn.Parameter  # (V, H), the embedding weight itself when tied
    scale: float | None  # logits multiplied by this (Cohere's logit_scale, 1 / Granite's logits_scaling), or None
    softcap: float | None  # final logit soft-cap (Gemma 2/3), or None


def lm_head(model: torch.nn.Module) -> LMHead:
    """The model's LM head as the fused loss computes it (ConfigError for a head with a bias)."""
    model = unwrap(model)
    head = model.get_output_embeddings()
    if head is None or getattr(head, "bias", None) is not None:
        raise ConfigError(f"{type(model).__name__}: need a bias-free linear LM head")
    config = model.config.get_text_config()
    scale = 1.0
    if isinstance(divisor := getattr(config, "logits_scaling", None), (int, float)):  # Granite: logits / this
        scale /= divisor
    if isinstance(factor := getattr(config, "logit_scale", None), (int, float)):  # Cohere: logits * this
        scale *= factor
    softcap = getattr(config, "final_logit_softcapping", None)
    return LMHead(head.weight, None if scale == 1.0 else scale, softcap)


@torch.no_grad()
def check_head(model: PreTrainedModel, name: str) -> None:
    """ConfigError unless the model's own logits on a few tokens are what the fused loss computes from its head
    (`lm_head`): a transform after the head that this trainer does not apply (a bias, another scale, a model
    folder's own code) would otherwise train silently on other logits than the model's."""
    head = lm_head(model)
    vocab = head.weight.shape[0]
    ids = (torch.arange(8, device=head.weight.device) * 7 + 3)[None] % vocab
    was_training = model.training
    model.eval()
    try:
        theirs = model(input_ids=ids).logits[0].double()
        ours = base_model(model)(input_ids=ids).last_hidden_state[0].double() @ head.weight.double().T
    finally:
        model.train(was_training)
    if not torch.isfinite(theirs).all():
        return  # a broken model (nan weights): nothing to compare; training reports it (non-finite steps)
    if head.scale is not None:
        ours = ours * head.scale
    if head.softcap is not None:
        ours = head.softcap * torch.tanh(ours / head.softcap)
    error = float((ours - theirs).norm() / theirs.norm().clamp_min(1e-30))
    tolerance = 1e-4 if head.weight.dtype in (torch.float32, torch.float64) else 3e-2
    if not error <= tolerance:
        raise ConfigError(
            f"{name}: the model's logits are not its LM head's output (relative difference {error:.2g}): a "
            "transform after the head that the fused loss does not apply; not supported"
        )
