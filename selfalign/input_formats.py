"""Input formats: map the shapes human preference data arrives in (the load stage's `format:`) onto the
canonical columns. (The trainer formats a run writes are in trainer_formats.py.)

Canonical row: `prompt` (list of {role, content} messages, the conversation so far), `chosen` and
`rejected` (the final assistant turn of each answer, as text). A prompt-only row has just `prompt`.
Each mapper takes one source row (a dict) and returns the canonical row or raises `RowError`;
`INPUT_FORMATS` names each format's mapper and the columns it makes.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Literal, NamedTuple

ROLES = {"system", "user", "assistant"}
_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant): ")


class RowError(Exception):
    def __init__(self, message: str, column: str | None = None):
        self.column = column
        super().__init__(message)


def _text(row: dict[str, Any], column: str) -> str:
    if column not in row:
        raise RowError(f"missing column; the row has {sorted(row)}", column)
    value = row[column]
    if value is None:
        raise RowError("is null; fill it in or drop the row (on_bad_row: drop)", column)
    if not isinstance(value, str):
        raise RowError(f"expected text, got {type(value).__name__}", column)
    return value


def parse_hh_transcript(text: str, column: str) -> list[dict[str, str]]:
    """'\\n\\nHuman: hi\\n\\nAssistant: hello' -> [{user: hi}, {assistant: hello}]."""
    parts = _HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        raise RowError("not an HH-RLHF transcript: it must start with '\\n\\nHuman: '", column)
    turns = []
    for speaker, content in zip(parts[1::2], parts[2::2]):
        turns.append({"role": "user" if speaker == "Human" else "assistant", "content": content.strip()})
    return turns


def from_hh_rlhf(row: dict[str, Any]) -> dict[str, Any]:
    chosen = parse_hh_transcript(_text(row, "chosen"), "chosen")
    rejected = parse_hh_transcript(_text(row, "rejected"), "rejected")
    for name, turns in (("chosen", chosen), ("rejected", rejected)):
        if turns[-1]["role"] != "assistant":
            raise RowError("transcript has no final Assistant turn to compare; drop the row or fix the data", name)
    if chosen[:-1] != rejected[:-1]:
        raise RowError("chosen and rejected transcripts differ before their last Assistant turn", "rejected")
    return {"prompt": chosen[:-1], "chosen": chosen[-1]["content"], "rejected": rejected[-1]["content"]}


def _messages(value: Any, column: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise RowError("expected a non-empty list of {role, content} messages", column)
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str) \
                or message.get("role") not in ROLES:
            raise RowError(f"message {i} must be {{role: system|user|assistant, content: text}}", column)
        messages.append({"role": message["role"], "content": message["content"]})
    return messages


def _answer(value: Any, column: str) -> str:
    """A TRL answer: plain text (standard) or a one-assistant-message list (conversational)."""
    if isinstance(value, str):
        return value
    messages = _messages(value, column)
    if messages[-1]["role"] != "assistant":
        raise RowError("the answer must end with an assistant message", column)
    return messages[-1]["content"]


def from_trl(row: dict[str, Any]) -> dict[str, Any]:
    """TRL preference data: standard or conversational, with explicit or implicit prompt."""
    for column in ("chosen", "rejected"):
        if column not in row:
            raise RowError(f"missing column; TRL preference data has chosen and rejected, the row has {sorted(row)}",
                           column)
        if row[column] is None:
            raise RowError("is null", column)
    if "prompt" in row and row["prompt"] is not None:
        prompt = row["prompt"]
        prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else _messages(prompt, "prompt")
        return {"prompt": prompt, "chosen": _answer(row["chosen"], "chosen"),
                "rejected": _answer(row["rejected"], "rejected")}
    # Implicit prompt: chosen and rejected are whole conversations sharing everything but the last turn.
    chosen, rejected = _messages(row["chosen"], "chosen"), _messages(row["rejected"], "rejected")
    if chosen[:-1] != rejected[:-1] or chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
        raise RowError("implicit-prompt rows must share every message but a final assistant one", "chosen")
    return {"prompt": chosen[:-1], "chosen": chosen[-1]["content"], "rejected": rejected[-1]["content"]}


def from_prompts(row: dict[str, Any]) -> dict[str, Any]:
    if "prompt" not in row:
        raise RowError(f"missing column; a prompt list needs 'prompt', the row has {sorted(row)}", "prompt")
    value = row["prompt"]
    if value is None:
        raise RowError("is null", "prompt")
    if isinstance(value, str):
        return {"prompt": [{"role": "user", "content": value}]}
    return {"prompt": _messages(value, "prompt")}


def from_feedback(row: dict[str, Any]) -> dict[str, Any]:
    """A chat log with the user's reaction: prompt, response, and free-text `feedback` and/or `thumbs`."""
    prompt = from_prompts(row)["prompt"]
    response = _text(row, "response")
    feedback, thumbs = row.get("feedback"), row.get("thumbs")
    if feedback is not None and not isinstance(feedback, str):
        raise RowError(f"expected text, got {type(feedback).__name__}", "feedback")
    if thumbs not in (None, "up", "down"):
        raise RowError(f"expected up, down or null, got {thumbs!r}", "thumbs")
    if not feedback and thumbs is None:
        raise RowError("a row needs a reaction: feedback text and/or thumbs up/down", "feedback")
    return {"prompt": prompt, "response": response, "feedback": feedback or "", "thumbs": thumbs}


class InputFormat(NamedTuple):
    mapper: Callable[[dict[str, Any]], dict[str, Any]]  # a source row -> the canonical row (or RowError)
    columns: tuple[str, ...]                            # the canonical columns it makes


INPUT_FORMATS: dict[str, InputFormat] = {
    "hh-rlhf": InputFormat(from_hh_rlhf, ("prompt", "chosen", "rejected")),
    "trl": InputFormat(from_trl, ("prompt", "chosen", "rejected")),
    "prompts": InputFormat(from_prompts, ("prompt",)),
    "feedback": InputFormat(from_feedback, ("prompt", "response", "feedback", "thumbs")),
}
InputFormatName = Literal[tuple(INPUT_FORMATS)]
