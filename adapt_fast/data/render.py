"""Prompt rendering and loss masking: a record -> token ids and a loss mask.

NI style for base models (definition, optional positive examples, input, "Output:"; chat messages as a
"User: ... Assistant: " transcript), or the tokenizer's chat template where it has one. The loss mask is 0 on
the prompt and 1 on the response tokens and the EOS: only those carry the loss (in a conversation, the last
assistant turn's, or with assistant_turns 'all' every assistant turn's).
"""

from __future__ import annotations

import json

import numpy as np

from adapt_fast.data.formats import carries_loss, turn_text
from adapt_fast.errors import ConfigError

NI_TEMPLATES = ("ni", "chat")
ASSISTANT_TURNS = ("last", "all")  # which assistant turns of a conversation carry the loss


def resolve_template(template: str, tokenizer) -> str:
    """'auto' -> 'chat' if the tokenizer has a chat template, else 'ni'; 'chat' needs one."""
    has_chat_template = bool(getattr(tokenizer, "chat_template", None))
    if template == "auto":
        return "chat" if has_chat_template else "ni"
    if template == "chat" and not has_chat_template:
        raise ConfigError("data.template chat: the tokenizer has no chat template (use ni or auto)")
    return template


def transcript_pieces(messages: list[dict]) -> list[tuple[str, bool]]:
    """Chat messages but the last (the answer) as plain text for a model without a chat template: each turn as
    'Role: content', then the 'Assistant: ' cue the answer follows. -> (text, is an assistant turn's content)."""
    pieces = []
    for m in messages[:-1]:
        pieces += [(f"{m['role'].capitalize()}: ", False), (turn_text(m), carries_loss(m)), ("\n\n", False)]
    return pieces + [(f"{messages[-1]['role'].capitalize()}: ", False)]


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


def _chat_ids(tokenizer, messages: list[dict], generation_prompt: bool = False) -> list[int]:
    return _ids(tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True))


def _earlier_assistant_turns(tokenizer, messages: list[dict], ids: list[int], mask: list[int]) -> list[int]:
    """`mask` with the loss also on every earlier assistant turn of a chat-template rendering `ids` (its content
    and end-of-turn tokens), where the template renders the conversation up to that turn as a prefix of the whole;
    a turn it renders otherwise (templates that rewrite earlier turns) is left as context."""
    mask = list(mask)
    for i, m in enumerate(messages[:-1]):
        if not carries_loss(m):
            continue
        before, upto = _chat_ids(tokenizer, messages[:i], True), _chat_ids(tokenizer, messages[: i + 1])
        if upto[: len(before)] == before and ids[: len(upto)] == upto:
            mask[len(before) : len(upto)] = [1] * (len(upto) - len(before))
    return mask


def tokenize_record(
    record: dict, tokenizer, template: str, num_positive_examples: int = 0, assistant_turns: str = "last"
) -> tuple[list[int], list[int]]:
    """-> (ids, loss_mask), untruncated. `template` is 'ni' or 'chat' (already resolved). In a conversation the
    last assistant turn carries the loss; with assistant_turns 'all' every assistant turn does (TRL's
    assistant_only_loss)."""
    every_turn = assistant_turns == "all" and bool(record["messages"])
    if template == "chat":
        if record["messages"]:
            messages = json.loads(record["messages"])
        else:
            user = ni_prompt(record, num_positive_examples, with_output_cue=False)
            messages = [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]
        prompt = _chat_ids(tokenizer, messages[:-1], True)
        full = _chat_ids(tokenizer, messages)
        if full[: len(prompt)] == prompt:
            mask = [0] * len(prompt) + [1] * (len(full) - len(prompt))
            return full, _earlier_assistant_turns(tokenizer, messages, full, mask) if every_turn else mask
        # The template rewrites earlier turns once an answer follows: mask by the answer's tokens,
        # ended by EOS so that the model still learns to stop.
        answer = tokenizer.encode(record["output"], add_special_tokens=False)
        if tokenizer.eos_token_id is not None and answer[-1:] != [tokenizer.eos_token_id]:
            answer.append(tokenizer.eos_token_id)
        return prompt + answer, [0] * len(prompt) + [1] * len(answer)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids, mask = list(bos), [0] * len(bos)
    if record["messages"]:
        pieces = transcript_pieces(json.loads(record["messages"]))
    else:
        pieces = [(ni_prompt(record, num_positive_examples), False)]
    for text, is_answer in pieces:  # encoded piece by piece, so that each turn's tokens are known
        piece = tokenizer.encode(text, add_special_tokens=False)
        ids += piece
        mask += [int(is_answer and every_turn)] * len(piece)
    response = tokenizer.encode(record["output"], add_special_tokens=False)
    return ids + response + eos, mask + [1] * (len(response) + len(eos))


def fit_to_max_len(
    ids: list[int], mask: list[int], max_len: int, truncate: bool, mode: str = "keep_start"
) -> tuple[list[int], list[int], str]:
    """Apply max_len -> (ids, mask, status) with status "" | "truncated" | "dropped". A cut keeps the first max_len
    tokens (mode keep_start, TRL's default) or the last (keep_end: the response, the prompt's start cut).
    An example dropped (truncate off) or left with no loss token after truncation is 'dropped'."""
    if len(ids) <= max_len:
        return ids, mask, ""
    if not truncate:
        return [], [], "dropped"
    if mode == "keep_end":
        ids, mask = ids[-max_len:], mask[-max_len:]
    else:
        ids, mask = ids[:max_len], mask[:max_len]
    if not any(mask[1:]):
        return [], [], "dropped"
    return ids, mask, "truncated"


def loss_token_count(mask: np.ndarray) -> int:
    """Tokens that carry a loss: the first token of an example never does (nothing predicts it)."""
    return int(mask[1:].sum())
