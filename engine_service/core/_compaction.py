"""Context compaction: what the model sees of a transcript that outgrew its context window.

The transcript in storage keeps every entry. When a model request would pass a share of the
model's context window, the run appends a *compaction* entry (role "compaction"): a summary,
written by the model, of the entries the model no longer sees. From then on the model sees

    the task (the first entry), the latest summary, and the entries from its ``keep_from`` on

(compaction entries themselves left out). `model_view` computes that from any transcript, for
example one read back after a crash; `ContextWindow` keeps it up to date turn by turn without
rebuilding it, as the same list object between compactions, so the model adapters' serialised
history (keyed by the list) stays valid.

Sizes are estimates: about four characters a token at first (as the scripted model counts),
then at the rate the provider's reported input tokens show for the run's last request, so a
tokenizer that needs more tokens for the run's text (code, JSON, other scripts) is accounted for.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from engine_service.core._types import Message

COMPACTION = "compaction"
CHARS_PER_TOKEN = 4
# The range a learned rate may take, in tokens per character.
_RATE_BOUNDS = (1 / 8, 1.0)

SUMMARY_SYSTEM = (
    "You summarise the earlier part of an agent's working session so that the agent can go on "
    "without it. Keep what the agent needs: the task and its constraints, decisions made, facts "
    "learned, files and identifiers touched, tool results that still matter, and what was left to "
    "do. Be concise; do not call tools."
)
SUMMARY_REQUEST = (
    "Summarise the conversation so far for your own later use, as instructed. Answer with the summary only."
)
_SUMMARY_HEADER = "[Earlier turns of this session were summarised to fit the context window.]\n\n"


def summary_message(summary: str) -> Message:
    """How the model is shown a summary: a user message standing where the summarised turns were."""
    return Message("user", _SUMMARY_HEADER + summary)


def model_view(transcript: Sequence[Message]) -> list[Message]:
    """What the model sees of ``transcript``: the task, the latest summary, the entries after it."""
    latest = next((i for i in range(len(transcript) - 1, -1, -1) if transcript[i].role == COMPACTION), None)
    if latest is None:
        return list(transcript)
    compaction = transcript[latest]
    kept = [m for m in transcript[compaction.keep_from :] if m.role != COMPACTION]
    return [transcript[0], summary_message(compaction.text), *kept]


def message_chars(message: Message) -> int:
    return len(message.text) + sum(len(c.name) + len(json.dumps(c.arguments)) for c in message.tool_calls)


@dataclass(frozen=True, slots=True)
class CompactionPlan:
    """What one compaction summarises: ``messages`` (the view up to the kept turns), which are
    ``turns`` assistant turns; the model then sees the transcript from ``keep_from`` on."""

    messages: list[Message]
    turns: int
    keep_from: int


class ContextWindow:
    """`model_view` of one run's growing transcript, maintained incrementally, with its size."""

    def __init__(self) -> None:
        self._transcript: list[Message] | None = None
        self._seen = 0  # transcript entries reflected in the view
        # None while nothing was compacted: the view is then the transcript list itself.
        self._view: list[Message] | None = None
        # Index in the transcript of each view entry (-1 for the summary), once compacted.
        self._origin: list[int] = []
        self._chars = 0
        self._rate = 1 / CHARS_PER_TOKEN  # tokens per character
        self._sent_chars = 0  # the size of the last request, in characters

    def messages(self, transcript: list[Message]) -> list[Message]:
        """The view of ``transcript``, which must have only grown since the last call (else it is
        rebuilt)."""
        if transcript is not self._transcript or len(transcript) < self._seen:
            self._transcript, self._seen, self._view, self._origin, self._chars = transcript, 0, None, [], 0
        for index in range(self._seen, len(transcript)):
            message = transcript[index]
            if message.role == COMPACTION:
                self._rebuild(transcript, index + 1)
                continue
            self._chars += message_chars(message)
            if self._view is not None:
                self._view.append(message)
                self._origin.append(index)
        self._seen = len(transcript)
        return transcript if self._view is None else self._view

    def _rebuild(self, transcript: list[Message], upto: int) -> None:
        compaction = transcript[upto - 1]
        kept = [i for i in range(compaction.keep_from, upto) if transcript[i].role != COMPACTION]
        self._view = [transcript[0], summary_message(compaction.text), *(transcript[i] for i in kept)]
        self._origin = [0, -1, *kept]
        self._chars = sum(map(message_chars, self._view))

    def tokens(self, fixed_chars: int = 0) -> int:
        """The estimated size of a request: the view plus ``fixed_chars`` (system prompt, tools)."""
        return int((self._chars + fixed_chars) * self._rate)

    def sent(self, fixed_chars: int) -> None:
        """The view (plus ``fixed_chars``) goes to the model now; `observe` its reported size."""
        self._sent_chars = self._chars + fixed_chars

    def observe(self, input_tokens: int) -> None:
        """The model reported ``input_tokens`` for the request last `sent`: learn the rate."""
        if self._sent_chars > 0 and input_tokens > 0:
            low, high = _RATE_BOUNDS
            self._rate = min(max(input_tokens / self._sent_chars, low), high)
        self._sent_chars = 0

    def plan(self, keep_turns: int) -> CompactionPlan | None:
        """What to summarise to keep the last ``keep_turns`` assistant turns whole; None when there
        is no older turn to summarise."""
        assert self._transcript is not None, "messages() first"
        view = self._view if self._view is not None else self._transcript
        origin = self._origin if self._view is not None else list(range(len(view)))
        turns = [i for i, m in enumerate(view) if m.role == "assistant"]
        if len(turns) <= keep_turns:
            return None
        cut = turns[-keep_turns]  # the view index of the first kept turn
        summarised = sum(1 for i in turns if i < cut)
        return CompactionPlan(view[:cut], summarised, origin[cut])
