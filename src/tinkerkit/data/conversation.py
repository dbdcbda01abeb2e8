"""The one normalized record type every data format becomes: a :class:`Conversation`."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Role = Literal["system", "user", "assistant"]


class Message(BaseModel):
    """One chat turn.

    Attributes:
        role: ``"system"``, ``"user"`` or ``"assistant"``.
        content: The visible text of the turn.
        thinking: The assistant's reasoning (chain of thought), rendered by the chat template's own
            reasoning field when it has one, else as ``<think>…</think>`` before ``content``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    role: Role
    content: str
    thinking: str | None = None


class Conversation(BaseModel):
    """A normalized training or evaluation example.

    Attributes:
        messages: The turns in order; at least one. Training needs an assistant turn to learn from.
        reference_answer: The source's final answer (GSM8K's text after ``####``, MATH's ``answer``,
            ...) used for grading; ``None`` when the source has none.
        source: Where the record came from, ``"path:line"``, for error messages and statistics.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    messages: tuple[Message, ...] = Field(min_length=1)
    reference_answer: str | None = None
    source: str | None = None

    def prompt_messages(self) -> tuple[Message, ...]:
        """The conversation without its final assistant message: what evaluation sends.

        Returns all messages when the last one is not an assistant turn.
        """
        if self.messages[-1].role == "assistant":
            return self.messages[:-1]
        return self.messages

    @property
    def prompt_key(self) -> str:
        """A canonical string of the prompt messages; equal prompts never straddle a split."""
        return "\x1e".join(f"{m.role}\x1f{m.content}" for m in self.prompt_messages())

    def to_record(self) -> dict:
        """The JSON form written by ``tinkerkit split`` (read back by the ``messages`` format)."""
        record: dict = {"messages": [m.model_dump(exclude_none=True) for m in self.messages]}
        if self.reference_answer is not None:
            record["reference_answer"] = self.reference_answer
        return record
