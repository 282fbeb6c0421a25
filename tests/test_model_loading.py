"""Model presets, loading from a folder, save/reload round trip, and the byte tokenizer."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from adapt_fast.data.tokenizer import BOS_ID, BYTE_VOCAB_SIZE, EOS_ID, PAD_ID, build_byte_tokenizer
from adapt_fast.errors import ConfigError
from adapt_fast.model.attention import ATTN_NAME
from adapt_fast.model.loading import (
    PRESETS,
    base_model,
    lm_head,
    load_model_and_tokenizer,
    load_tokenizer,
    preset_config,
)

TINY = ["tiny-llama", "tiny-qwen3", "tiny-gemma3"]
TEXT = "Definition: translate.\nInput: Grüße, 世界!\tOutput:"


def test_byte_tokenizer_ids_and_round_trip():
    tok = build_byte_tokenizer()
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (PAD_ID, BOS_ID, EOS_ID, 3)
    assert len(tok) == BYTE_VOCAB_SIZE == 260
    assert tok.chat_template is None
    ids = tok(TEXT)["input_ids"]
    assert ids[0] == BOS_ID and ids[1:] == [4 + b for b in TEXT.encode()]
    assert tok(TEXT, add_special_tokens=False)["input_ids"] == ids[1:]
    assert tok.decode(ids, skip_special_tokens=True) == TEXT
    assert build_byte_tokenizer()(TEXT)["input_ids"] == ids  # deterministic


def test_byte_tokenizer_save_and_reload(tmp_path):
    tok = build_byte_tokenizer()
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(TEXT)["input_ids"] == tok(TEXT)["input_ids"]
    assert (again.pad_token_id, again.bos_token_id, again.eos_token_id) == (PAD_ID, BOS_ID, EOS_ID)
    assert again.decode(again(TEXT)["input_ids"], skip_special_tokens=True) == TEXT


@pytest.mark.parametrize("name", TINY)
def test_tiny_presets_build_and_run(name):
    model, tok = load_model_and_tokenizer(name)
    cfg = model.config
    assert model.config._attn_implementation == ATTN_NAME
    assert next(model.parameters()).dtype == torch.float32 and next(model.parameters()).device.type == "cpu"
    assert BYTE_VOCAB_SIZE <= cfg.vocab_size < BYTE_VOCAB_SIZE + 8
    assert cfg.num_key_value_heads < cfg.num_attention_heads  # GQA
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (BOS_ID, EOS_ID, PAD_ID)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tied
    if name == "tiny-gemma3":
        assert "sliding_attention" in cfg.layer_types and "full_attention" in cfg.layer_types
        assert cfg.attn_logit_softcapping is not None and cfg.final_logit_softcapping is not None
    ids = torch.tensor([tok(TEXT)["input_ids"]])
    assert model(input_ids=ids).logits.shape == (1, ids.shape[1], cfg.vocab_size)


def test_seed_and_dtype():
    a, _ = load_model_and_tokenizer("tiny-llama", seed=3)
    b, _ = load_model_and_tokenizer("tiny-llama", seed=3)
    c, _ = load_model_and_tokenizer("tiny-llama", seed=4, dtype=torch.bfloat16)
    w = lambda m: m.get_input_embeddings().weight  # noqa: E731
    assert torch.equal(w(a), w(b)) and not torch.equal(w(a), w(c).float())
    assert w(c).dtype == torch.bfloat16


def test_unknown_name_is_a_config_error():
    with pytest.raises(ConfigError) as err:
        load_model_and_tokenizer("no-such-model")
    message = str(err.value)
    assert "\n" not in message and "no-such-model" in message
    assert all(name in message for name in PRESETS)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma3"])
def test_head_softcap_and_base_model_give_the_logits(name):
    model, tok = load_model_and_tokenizer(name)
    ids = tok([TEXT, "a second example"], add_special_tokens=False)["input_ids"]
    cu = torch.tensor([0, len(ids[0]), len(ids[0]) + len(ids[1])], dtype=torch.int32)
    packed = {  # the trainer's call: MicroBatch.model_inputs()
        "input_ids": torch.tensor([ids[0] + ids[1]]),
        "position_ids": torch.cat([torch.arange(len(ids[0])), torch.arange(len(ids[1]))])[None],
        "cu_seq_lens_q": cu,
        "cu_seq_lens_k": cu,
        "max_length_q": len(ids[0]),
        "max_length_k": len(ids[0]),
    }
    weight, scale, softcap = lm_head(model)
    assert scale is None
    assert weight is model.get_input_embeddings().weight
    assert softcap == (30.0 if name == "tiny-gemma3" else None)
    with torch.no_grad():
        hidden = base_model(model)(**packed).last_hidden_state
        logits = hidden @ weight.T
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        torch.testing.assert_close(logits, model(**packed).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", TINY)
def test_save_reload_and_generate(name, tmp_path):
    model, tok = load_model_and_tokenizer(name)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    assert ATTN_NAME not in (tmp_path / "config.json").read_text()

    # plain transformers, our attention not involved
    plain = AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True)
    plain_tok = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert plain.config._attn_implementation in ("sdpa", "eager")
    ids = torch.tensor([plain_tok(TEXT)["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5, rtol=0)
    out = plain.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 6) or out[0, -1].item() == EOS_ID
    assert isinstance(plain_tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True), str)

    # and through our loader
    again, again_tok = load_model_and_tokenizer(str(tmp_path))
    assert again.config._attn_implementation == ATTN_NAME
    assert again_tok(TEXT)["input_ids"] == tok(TEXT)["input_ids"]
    for p, q in zip(model.parameters(), again.parameters(), strict=True):
        assert torch.equal(p, q)


def test_a_folder_without_tokenizer_is_refused_unless_one_is_named(tmp_path):
    """A model folder saved without its tokenizer would otherwise train on another tokenizer's ids: one line naming
    the way out (model.tokenizer: a folder, or byte); presets take the byte tokenizer."""
    model, byte = load_model_and_tokenizer("tiny-qwen3")
    model.save_pretrained(tmp_path / "model")
    with pytest.raises(ConfigError, match=r"model: no tokenizer files .*model\.tokenizer"):
        load_tokenizer(str(tmp_path / "model"))
    with pytest.raises(ConfigError, match="no tokenizer files"):
        load_model_and_tokenizer(str(tmp_path / "model"))
    expected = build_byte_tokenizer()(TEXT)["input_ids"]
    assert load_tokenizer(str(tmp_path / "model"), tokenizer_name="byte")(TEXT)["input_ids"] == expected
    byte.save_pretrained(tmp_path / "tok")
    assert load_tokenizer(str(tmp_path / "model"), tokenizer_name=str(tmp_path / "tok"))(TEXT)["input_ids"] == expected
    with pytest.raises(ConfigError, match="model.tokenizer .*model: no tokenizer files there"):
        load_tokenizer("tiny-llama", tokenizer_name=str(tmp_path / "model"))
    assert load_tokenizer("tiny-gemma3")(TEXT)["input_ids"] == expected
    with pytest.raises(ConfigError):
        load_tokenizer("no-such-model")


# Real models' shapes: (vocab, hidden, layers, heads, kv heads, head_dim, intermediate, parameters in millions)
BIG = {
    "llama-3.2-1b": (128256, 2048, 16, 32, 8, 64, 8192, 1235.8),
    "qwen3-0.6b": (151936, 1024, 28, 16, 8, 128, 3072, 596.0),
    "gemma-3-1b": (262144, 1152, 26, 4, 1, 256, 6912, 999.9),
}


@pytest.mark.parametrize("name", list(BIG))
def test_big_preset_shapes_on_meta(name):
    vocab, hidden, layers, heads, kv_heads, head_dim, inter, millions = BIG[name]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(preset_config(name))
    assert all(p.is_meta for p in model.parameters())
    cfg = model.config
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers) == (vocab, hidden, layers)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size) == (
        heads,
        kv_heads,
        head_dim,
        inter,
    )
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # all three tie
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (heads * head_dim, hidden)
    assert attn.k_proj.weight.shape == (kv_heads * head_dim, hidden)
    n = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(n - millions) < 0.5, n
    if name == "gemma-3-1b":
        assert cfg.sliding_window == 512 and cfg.query_pre_attn_scalar == 256
        assert [i for i, t in enumerate(cfg.layer_types) if t == "full_attention"] == [5, 11, 17, 23]
    if name == "llama-3.2-1b":
        assert cfg.rope_parameters["rope_type"] == "llama3" and cfg.rope_parameters["factor"] == 32.0
    # the byte tokenizer's ids fit every big vocabulary
    assert BYTE_VOCAB_SIZE < vocab and json.loads(cfg.to_json_string())["eos_token_id"] == EOS_ID


def test_zero3_loading_without_accelerate_warns_and_loads_whole(tmp_path, monkeypatch):
    """The GPU machine has no accelerate (HfDeepSpeedConfig needs it): ZeRO-3 then loads the folder whole, with a
    warning, and DeepSpeed partitions it at initialize."""
    import importlib.util

    from adapt_fast.model import loading
    from adapt_fast.model.zero3 import is_partitioned

    for part in load_model_and_tokenizer("tiny-llama"):
        part.save_pretrained(tmp_path / "m")
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "accelerate" else find_spec(name))
    with pytest.warns(UserWarning, match="accelerate is not installed"):
        model, _ = loading.load_model_and_tokenizer(str(tmp_path / "m"), zero3_config={"zero_optimization": {}})
    assert not is_partitioned(next(model.parameters()))


def test_a_given_tokenizer_is_checked_not_reloaded():
    """The trainer passes the tokenizer it loaded for the data: it comes back as it is, and one with more tokens
    than the model's vocabulary is a ConfigError (its ids would index past the embedding)."""
    byte = build_byte_tokenizer()
    model, tokenizer = load_model_and_tokenizer("tiny-llama", tokenizer=byte)
    assert tokenizer is byte
    vocab = model.get_input_embeddings().weight.shape[0]

    class Large:
        def __len__(self):
            return vocab + 1

    with pytest.raises(ConfigError, match=f"has {vocab + 1} tokens but the model's vocabulary is {vocab}"):
        load_model_and_tokenizer("tiny-llama", tokenizer=Large())


def _save_tiny(folder, config_class, **kwargs) -> str:
    """A random-init tiny model of `config_class` with the byte tokenizer, saved to `folder`."""
    config = config_class(
        vocab_size=264, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
        pad_token_id=PAD_ID, **kwargs,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # logits of a trained model's size, so that a missing scale shows in the loss
        model.get_output_embeddings().weight.mul_(30)
    model.save_pretrained(folder)
    build_byte_tokenizer().save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize(
    "config_name, kwargs",
    [("GraniteConfig", {"logits_scaling": 4.0}), ("CohereConfig", {"logit_scale": 0.25}), ("LlamaConfig", {})],
)
def test_the_fused_loss_scales_the_logits_as_the_model_does(config_name, kwargs, tmp_path):
    """Granite divides its logits by logits_scaling, Cohere multiplies them by logit_scale (HF's forward): the loss
    the trainer optimises is HF's own loss on the same tokens, not the loss of the unscaled head."""
    import transformers

    from adapt_fast.data.batch import MicroBatch
    from adapt_fast.model.loss import per_task_loss

    name = _save_tiny(tmp_path, getattr(transformers, config_name), **kwargs)
    model, tok = load_model_and_tokenizer(name)
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    T = len(ids)
    batch = MicroBatch(
        input_ids=torch.tensor(ids), labels=torch.tensor([-100, *ids[1:]]), position_ids=torch.arange(T),
        cu_seqlens=torch.tensor([0, T], dtype=torch.int32), task_ids=torch.zeros(T, dtype=torch.long),
        task_offsets=torch.tensor([0, T]), max_seqlen=T, num_examples=1,
    )  # fmt: skip
    with torch.no_grad():
        ours = per_task_loss(model, batch, torch.ones(1))
        theirs = model(input_ids=torch.tensor([ids]), labels=torch.tensor([ids])).loss
    assert int(ours.count[0]) == T - 1
    torch.testing.assert_close(ours.loss_sum[0] / (T - 1), theirs.float(), rtol=1e-5, atol=0)
    assert lm_head(model).scale == {"GraniteConfig": 0.25, "CohereConfig": 0.25, "LlamaConfig": None}[config_name]


def test_a_transform_after_the_head_that_is_not_applied_is_refused(tmp_path):
    """check_head compares the model's own logits with the head's output: a config asking for a scale the model's
    forward does not apply (here Llama given Granite's logits_scaling) is refused in one line, not trained on."""
    from transformers import LlamaConfig

    name = _save_tiny(tmp_path, LlamaConfig)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "logits_scaling": 2.0}))
    with pytest.raises(ConfigError, match=r"logits are not its LM head's output \(relative difference 0\.5\)"):
        load_model_and_tokenizer(name)


def test_a_model_whose_attention_ignores_the_interface_is_refused(tmp_path):
    """Falcon's attention does not go through AttentionInterface: transformers only warns and keeps sdpa, under
    which packed examples attend to each other. Refused in one line when loading, for training and evaluation."""
    from transformers import FalconConfig, FalconForCausalLM

    config = FalconConfig(vocab_size=264, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
    FalconForCausalLM(config).save_pretrained(tmp_path)
    build_byte_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="FalconForCausalLM, FalconModel: its attention does not take a function"):
        load_model_and_tokenizer(str(tmp_path))
