"""Prompt rendering and loss masking: a record -> token ids and a loss mask.

NI style for base models (definition, optional positive examples, input, "Output:"; chat messages as a
"User: ... Assistant: " transcript), or the tokenizer's chat template where it has one. The loss mask is 0 on
the prompt and 1 on the response tokens and the EOS: only those carry the loss (in a conversation, the last
assistant turn's).
"""

from __future__ import annotations

import json

import numpy as np

from adapt_fast.errors import ConfigError

NI_TEMPLATES = ("ni", "chat")


def resolve_template(template: str, tokenizer) -> str:
    """'auto' -> 'chat' if the tokenizer has a chat template, else 'ni'; 'chat' needs one."""
    has_chat_template = bool(getattr(tokenizer, "chat_template", None))
    if template == "auto":
        return "chat" if has_chat_template else "ni"
    if template == "chat" and not has_chat_template:
        raise ConfigError("data.template chat: the tokenizer has no chat template (use ni or auto)")
    return template


def transcript_prompt(messages: list[dict]) -> str:
    """Chat messages but the last (the answer) as plain text for a model without a chat template: each turn as
    'Role: content', then the 'Assistant: ' cue the answer follows."""
    turns = [f"{m['role'].capitalize()}: {m['content']}\n\n" for m in messages[:-1]]
    return "".join(turns) + f"{messages[-1]['role'].capitalize()}: "


def ni_prompt(record: dict, num_positive_examples: int = 0, with_output_cue: bool = True) -> str:
    """The NI-style prompt: definition, positive examples, then the input and an 'Output:' cue.
    A record without a definition (prompt/response data) is its prompt verbatim."""
    if not record["definition"]:
        return record["input"]
    parts = [f"Definition: {record['definition']}\n\n"]
    positives = json.loads(record["positive_examples"] or "[]")[:num_positive_examples]
    for i, ex in enumerate(positives, start=1):
        parts.append(f"Positive Example {i} -\nInput: {ex['input']}\nOutput: {ex['output']}\n\n")
    if positives:
        parts.append("Now complete the following example -\n")
    parts.append(f"Input: {record['input']}\n")
    if with_output_cue:
        parts.append("Output: ")
    return "".join(parts)


def _ids(encoded) -> list[int]:
    """apply_chat_template returns a list or a dict-like with input_ids, depending on the version."""
    if hasattr(encoded, "keys"):
        encoded = encoded["input_ids"]
    return list(encoded)


def tokenize_record(
    record: dict, tokenizer, template: str, num_positive_examples: int = 0
) -> tuple[list[int], list[int]]:
    """-> (ids, loss_mask), untruncated. `template` is 'ni' or 'chat' (already resolved)."""
    if template == "chat":
        if record["messages"]:
            messages = json.loads(record["messages"])
        else:
            user = ni_prompt(record, num_positive_examples, with_output_cue=False)
            messages = [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]
        prompt = _ids(tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=True))
        full = _ids(tokenizer.apply_chat_template(messages, tokenize=True))
        if full[: len(prompt)] == prompt:
            return full, [0] * len(prompt) + [1] * (len(full) - len(prompt))
        # The template rewrites earlier turns once an answer follows: mask by the answer's tokens,
        # ended by EOS so that the model still learns to stop.
        answer = tokenizer.encode(record["output"], add_special_tokens=False)
        if tokenizer.eos_token_id is not None and answer[-1:] != [tokenizer.eos_token_id]:
            answer.append(tokenizer.eos_token_id)
        return prompt + answer, [0] * len(prompt) + [1] * len(answer)
    if record["messages"]:
        text = transcript_prompt(json.loads(record["messages"]))
    else:
        text = ni_prompt(record, num_positive_examples)
    prompt = tokenizer.encode(text, add_special_tokens=False)
    response = tokenizer.encode(record["output"], add_special_tokens=False)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids = bos + prompt + response + eos
    return ids, [0] * (len(bos) + len(prompt)) + [1] * (len(response) + len(eos))


def fit_to_max_len(ids: list[int], mask: list[int], max_len: int, truncate: bool) -> tuple[list[int], list[int], str]:
    """Apply max_len -> (ids, mask, status) with status "" | "truncated" | "dropped".
    An example dropped (truncate off) or left with no loss token after truncation is 'dropped'."""
    if len(ids) <= max_len:
        return ids, mask, ""
    if not truncate:
        return [], [], "dropped"
    ids, mask = ids[:max_len], mask[:max_len]
    if not any(mask[1:]):
        return [], [], "dropped"
    return ids, mask, "truncated"


def loss_token_count(mask: np.ndarray) -> int:
    """Tokens that carry a loss: the first token of an example never does (nothing predicts it)."""
    return int(mask[1:].sum())
