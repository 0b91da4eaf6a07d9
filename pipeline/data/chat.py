"""Chat and instruction records → one sequence per conversation, rendered with the teacher's chat template, with a
mask of the response tokens.

- `conversation_of` turns a record into messages (`data.format: chat`: `messages` with `role`/`content`, or
  ShareGPT's `conversations` with `from`/`value`; `prompt_response`: a prompt and a response field, optionally a
  system field), assistant turns before the first user turn dropped, or raises `MalformedRecord` saying what is
  wrong with it.
- `encode_conversation` renders the messages with `apply_chat_template`, tokenizes the text once (with character
  offsets) and marks the assistant tokens. An assistant turn's span is found by rendering the conversation up to it
  with the generation prompt (where its content starts) and up to and including it (where it ends, trailing
  whitespace after the end-of-turn token excluded): so the content and the template's end-of-turn token (SmolLM2's
  `<|im_end|>`) are response tokens, the role header is not. This needs a template that renders a conversation's
  turns as prefixes of the whole, which ChatML templates like SmolLM2's do; one that does not is refused.
- Mask semantics: `response_mask[t] = 1` marks the *token* `input_ids[t]` as a response token, not the position
  that predicts it. With next-token CE the logits at t predict token t + 1, so the trained predictions are those
  with `response_mask[t + 1] = 1` (HF's `labels = where(mask, input_ids, -100)`, shifted inside the model).
- One conversation per sequence, right-padded to `seq_len` with the pad token (`length` real tokens, mask 0 on the
  padding): under causal attention the padding changes nothing at the real positions, so neither the teacher's
  capture nor the student needs per-document attention masks.
- Longer than `seq_len`: cut after the last assistant turn that fits whole; when not even the first one fits, cut
  at `seq_len` inside it (it still has response tokens); when no response token fits at all, the conversation is
  dropped. Each outcome is counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from jinja2 import TemplateError

ROLE_ALIASES = {
    "system": "system",
    "user": "user",
    "assistant": "assistant",
    "human": "user",
    "gpt": "assistant",
}
"""Roles a message may have → the role the template is given (ShareGPT's `human`/`gpt` are `user`/`assistant`)."""
RESPONSE_ROLE = "assistant"
OUTCOMES = ("whole", "truncated_at_turn", "truncated_in_response", "dropped_no_response", "template_refused")
"""What became of an encoded conversation; the index is the `outcome` code `encode_conversation` returns."""


class MalformedRecord(ValueError):
    """A record that cannot become a conversation; `kind` is its category in meta.json, the message says why."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(kind, detail)  # both in args: the exception survives pickling out of a worker process
        self.kind, self.detail = kind, detail

    def __str__(self) -> str:
        return self.detail


class TemplateNotTurnByTurn(ValueError):
    """The chat template does not render a conversation's turns as prefixes of the whole rendering."""


@dataclass(frozen=True)
class ChatFormat:
    """How records become messages (`data.format`, `data.prompt_field`, `data.response_field`,
    `data.system_field`)."""

    kind: Literal["chat", "prompt_response"]
    prompt_field: str = "prompt"
    response_field: str = "response"
    system_field: str | None = None


@dataclass(frozen=True)
class EncodedConversation:
    """One sequence: `input_ids` and `response_mask` of exactly `seq_len` (padded), `length` real tokens, the
    tokens of the whole conversation before any cut (`full_length`) and the outcome code (`OUTCOMES`)."""

    input_ids: np.ndarray
    response_mask: np.ndarray
    length: int
    full_length: int
    outcome: int


def record_name(record: Any, index: int) -> str:
    """How a record is named in messages: `record <index>`, with its `id` field when it has one."""
    identifier = record.get("id") if isinstance(record, dict) else None
    return f"record {index} (id {identifier!r})" if isinstance(identifier, (str, int)) else f"record {index}"


def conversation_of(record: Any, chat_format: ChatFormat) -> tuple[list[dict[str, str]], int]:
    """The record's messages as `{"role", "content"}` dicts, roles normalised (`ROLE_ALIASES`), and how many leading
    assistant turns were dropped; raises `MalformedRecord` for a record that is not an object, lacks a field, has an
    unknown role or an empty response, or has no response turn after a prompt.

    Assistant turns before the first user turn are dropped (as FastChat does): a ShareGPT record split off a longer
    conversation often starts with the model's reply to a prompt it no longer holds."""
    if not isinstance(record, dict):
        raise MalformedRecord("not_an_object", f"a JSON {type(record).__name__}, expected an object")
    if chat_format.kind == "prompt_response":
        messages = _prompt_response_messages(record, chat_format)
    else:
        messages = _chat_messages(record)
    first_prompt = next((at for at, message in enumerate(messages) if message["role"] == "user"), len(messages))
    head, tail = messages[:first_prompt], messages[first_prompt:]
    kept_head = [message for message in head if message["role"] != RESPONSE_ROLE]
    if not any(message["role"] == RESPONSE_ROLE for message in tail):
        raise MalformedRecord("no_response", "no assistant turn after a user turn: nothing to train on")
    return kept_head + tail, len(head) - len(kept_head)


def _prompt_response_messages(record: dict[str, Any], chat_format: ChatFormat) -> list[dict[str, str]]:
    fields = [("system", chat_format.system_field), ("user", chat_format.prompt_field)]
    fields.append((RESPONSE_ROLE, chat_format.response_field))
    messages = []
    for role, name in fields:
        if name is None:
            continue
        if name not in record:
            key = {"system": "system_field", "user": "prompt_field"}.get(role, "response_field")
            raise MalformedRecord("missing_field", f"no field {name!r} (data.{key}); it has {sorted(record)}")
        messages.append({"role": role, "content": _text(record[name], repr(name), role)})
    return messages


def _chat_messages(record: dict[str, Any]) -> list[dict[str, str]]:
    if isinstance(record.get("messages"), list):
        turns, role_key, content_key = record["messages"], "role", "content"
    elif isinstance(record.get("conversations"), list):
        turns, role_key, content_key = record["conversations"], "from", "value"
    else:
        found = {key: type(record[key]).__name__ for key in ("messages", "conversations") if key in record}
        raise MalformedRecord(
            "missing_field", f"no 'messages' (role/content) or 'conversations' (from/value) list; found {found or {}}"
        )
    messages = []
    for position, turn in enumerate(turns):
        where = f"message {position}"
        if not isinstance(turn, dict) or role_key not in turn or content_key not in turn:
            keys = sorted(turn) if isinstance(turn, dict) else type(turn).__name__
            raise MalformedRecord("missing_field", f"{where} lacks {role_key!r} or {content_key!r} (it has {keys})")
        role = ROLE_ALIASES.get(turn[role_key]) if isinstance(turn[role_key], str) else None
        if role is None:
            raise MalformedRecord(
                "unknown_role",
                f"{where} has role {turn[role_key]!r}; known: {', '.join(ROLE_ALIASES)}",
            )
        messages.append({"role": role, "content": _text(turn[content_key], where, role)})
    return messages


def _text(value: Any, where: str, role: str) -> str:
    """A message's content: a string, not empty for a response."""
    if not isinstance(value, str):
        raise MalformedRecord("missing_field", f"{where} is a {type(value).__name__}, expected a string")
    if role == RESPONSE_ROLE and not value.strip():
        raise MalformedRecord("empty_response", f"{where} is an empty response")
    return value


def encode_conversation(
    messages: list[dict[str, str]], tokenizer: Any, seq_len: int, pad_token_id: int
) -> EncodedConversation:
    """Render, tokenize, mask, cut and pad one conversation (see the module docstring for each rule).

    Raises `MalformedRecord` ("template_refused") when the template raises for these messages, and
    `TemplateNotTurnByTurn` when its renderings are not prefixes of each other.
    """
    whole = _render(tokenizer, messages, add_generation_prompt=False)
    spans = []  # (first char, end char) of each assistant turn's response text
    turn_ends = []  # end char of the conversation up to and including each assistant turn
    for position, message in enumerate(messages):
        if message["role"] != RESPONSE_ROLE:
            continue
        before = _render(tokenizer, messages[:position], add_generation_prompt=True)
        through = _render(tokenizer, messages[: position + 1], add_generation_prompt=False)
        if not (through.startswith(before) and whole.startswith(through)):
            raise TemplateNotTurnByTurn(
                f"rendering the first {position} messages with the generation prompt, then the first {position + 1}, "
                "then all of them does not give texts that extend each other"
            )
        spans.append((len(before), len(through.rstrip())))
        turn_ends.append(len(through))
    encoded = tokenizer(whole, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    ids = np.asarray(encoded["input_ids"], dtype=np.int32)
    offsets = np.asarray(encoded["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    mask = np.zeros(len(ids), dtype=np.int8)
    for start, end in spans:  # a token is a response token when its characters overlap the response text
        mask[(offsets[:, 1] > start) & (offsets[:, 0] < end)] = 1
    keep, outcome = len(ids), OUTCOMES.index("whole")
    if len(ids) > seq_len:
        fitting = [int(np.count_nonzero(offsets[:, 0] < end)) for end in turn_ends]
        fitting = [count for count in fitting if count <= seq_len]
        if fitting:
            keep, outcome = max(fitting), OUTCOMES.index("truncated_at_turn")
        else:
            keep, outcome = seq_len, OUTCOMES.index("truncated_in_response")
    if not mask[:keep].any():
        outcome = OUTCOMES.index("dropped_no_response")
    input_ids = np.full(seq_len, pad_token_id, dtype=np.int32)
    response_mask = np.zeros(seq_len, dtype=np.int8)
    input_ids[:keep] = ids[:keep]
    response_mask[:keep] = mask[:keep]
    return EncodedConversation(input_ids, response_mask, keep, len(ids), outcome)


def _render(tokenizer: Any, messages: list[dict[str, str]], *, add_generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except TemplateError as error:
        raise MalformedRecord("template_refused", f"the chat template refused it: {error}") from error
