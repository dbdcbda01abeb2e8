"""Rendering: a :class:`~tinkerkit.data.conversation.Conversation` becomes a ``tinker.types.Datum``.

The model's own chat template (``tokenizer.apply_chat_template``) decides the text; the renderer
decides which tokens carry loss. A conversation is rendered as a list of *segments*, each the text
that one message adds to the template's output, and each segment is tokenized on its own::

    [system/user text ...][generation prompt "<|im_start|>assistant\\n"][answer "...<|im_end|>\\n"]
     weight 0              weight 0                                     weight 1 up to and including
                                                                        the end-of-turn token

Tokenizing per segment makes the prompt that evaluation sends (the conversation without its final
assistant message, plus the generation prompt) exactly the token prefix of the training example,
whatever the tokenizer would have merged across the boundary.

Reasoning (``Message.thinking``) goes to the template's own field (``reasoning_content``, as in
Qwen3) when it has one, else before the answer as ``<think>\n…\n</think>\n\n``; either way it is
part of the trained answer segment. The generation prompt before an assistant message is asked
for with ``enable_thinking`` set to whether that message has reasoning (the chat-template
argument of Qwen3, SmolLM3 and others). A Qwen3 answer without reasoning is thus rendered as
Qwen3 generates it with thinking disabled: the empty think block ``<think>\n\n</think>\n\n``
ends the (untrained) generation prompt, and only the answer after it carries loss::

    [<|im_start|>assistant\n<think>\n\n</think>\n\n][answer<|im_end|>][\n]   no reasoning
     weight 0                                        weight 1          0
    [<|im_start|>assistant\n][<think>\nreasoning\n</think>\n\nanswer<|im_end|>][\n]
     weight 0                 weight 1                                        0

The datum is the usual one-token shift (Tinker's cross_entropy convention)::

    model_input   = tokens[:-1]
    target_tokens = tokens[1:]
    weights       = token_weights[1:]

Example::

    renderer = Renderer(tokenizer, max_length=512)
    example = renderer.render(conversation)   # RenderedExample, or raises RenderSkip
    prompt = renderer.build_prompt(conversation)  # tinker.types.ModelInput
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import tinker

from tinkerkit.config import TrainOn
from tinkerkit.data.conversation import Conversation, Message
from tinkerkit.data.stats import length_stats
from tinkerkit.errors import DataError

# End-of-turn markers of common chat templates (ChatML, Llama 3, Gemma, Phi-3). Generation stops on
# them by default, and the training weight mask includes them so that the model learns to stop.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>",
                      "<|end_of_text|>")


def end_of_turn_ids(tokenizer) -> list[int]:
    """Token ids that end an assistant turn: the EOS token and known end-of-turn markers.

    Returns:
        Sorted unique ids present in the tokenizer's vocabulary.
    """
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()
    for token in END_OF_TURN_TOKENS:
        if token in vocab:
            ids.add(int(vocab[token]))
    return sorted(ids)


class RenderSkip(Exception):
    """An example that is deliberately not trained on; ``kind`` is "skipped" or "failed"."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind, self.reason = kind, reason


@dataclass(frozen=True)
class RenderedExample:
    """One rendered training example.

    Attributes:
        datum: ``model_input`` (T tokens), ``loss_fn_inputs`` ``target_tokens`` (int64, [T]) and
            ``weights`` (float32, [T], 0 or 1).
        full_length: Tokens of the whole rendering before truncation (T + 1 when not truncated).
        truncated: The example was cut at the maximum length.
        lost_end_of_turn: Truncation removed a weighted end-of-turn token.
        source: ``path:line`` of the record.
    """

    datum: tinker.types.Datum
    full_length: int
    truncated: bool
    lost_end_of_turn: bool
    source: str | None = None

    @property
    def n_tokens(self) -> int:
        """Length T of the datum (input positions)."""
        return self.datum.model_input.length

    @property
    def n_weighted(self) -> int:
        """Number of positions with non-zero weight."""
        return int(np.count_nonzero(self.datum.loss_fn_inputs["weights"].to_numpy()))


@dataclass
class RenderStats:
    """Counts and lengths of a rendered dataset (the seed's long-text statistics).

    Attributes:
        lengths: Full token length of every example that rendered (before truncation).
        processed: Examples rendered and kept (including truncated ones).
        truncated: Kept examples that were cut at ``max_length``.
        skipped: Examples left out on purpose (too long with truncation off, or all loss cut off).
        failed: Examples that could not be rendered (no assistant turn, template error, ...).
        lost_end_of_turn: Truncated examples whose end-of-turn token was cut.
        reasons: ``(source, reason)`` of skipped and failed examples, in order.
        failures: ``(source, reason)`` of the failed examples only, in order.
    """

    lengths: list[int] = field(default_factory=list)
    processed: int = 0
    truncated: int = 0
    skipped: int = 0
    failed: int = 0
    lost_end_of_turn: int = 0
    reasons: list[tuple[str, str]] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.processed + self.skipped + self.failed


def _template_message(message: Message, reasoning_field: bool) -> dict:
    data = {"role": message.role, "content": message.content}
    if message.thinking:
        if reasoning_field:
            data["reasoning_content"] = message.thinking
        else:
            data["content"] = f"<think>\n{message.thinking}\n</think>\n\n{message.content}"
    return data


class Renderer:
    """Renders conversations with a tokenizer's chat template.

    Args:
        tokenizer: A HF tokenizer with a chat template.
        train_on: Which assistant messages carry loss.
        max_length: Longest full token sequence kept (``MAX_SEQUENCE_LENGTH``); None = no limit.
        truncate: Cut longer examples on the right (True) or skip them (False).

    Raises:
        DataError: The tokenizer has no chat template.
    """

    def __init__(self, tokenizer, train_on: TrainOn = TrainOn.ALL_ASSISTANT,
                 max_length: int | None = None, truncate: bool = True) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise DataError("the tokenizer has no chat template; use a chat/instruct model")
        self.tokenizer = tokenizer
        self.train_on = TrainOn(train_on)
        self.max_length = max_length
        self.truncate = truncate
        self.stop_ids = set(end_of_turn_ids(tokenizer))
        # Templates with a reasoning field (Qwen3's reasoning_content) render thinking themselves.
        self.reasoning_field = "reasoning_content" in tokenizer.chat_template

    # -- text ---------------------------------------------------------------------------------

    def _text(self, messages: Sequence[Message], generation_prompt: bool = False,
              enable_thinking: bool = True) -> str:
        if not messages:
            return ""
        chat = [_template_message(m, self.reasoning_field) for m in messages]
        return self.tokenizer.apply_chat_template(
            chat, tokenize=False, add_generation_prompt=generation_prompt,
            enable_thinking=enable_thinking)

    def segments(self, conversation: Conversation) -> list[tuple[str, bool]]:
        """Split the rendered text into per-message pieces.

        Returns:
            ``(text, trained)`` pairs whose texts concatenate to the template's full rendering;
            ``trained`` marks the assistant answers that carry loss.

        Raises:
            RenderSkip: (failed) The template does not render message prefixes as text prefixes.
        """
        messages = conversation.messages
        assistant_indices = [i for i, m in enumerate(messages) if m.role == "assistant"]
        trained = set(assistant_indices[-1:] if self.train_on == TrainOn.LAST_ASSISTANT
                      else assistant_indices)
        pieces, done = [], ""
        for i, message in enumerate(messages):
            if message.role == "assistant":
                prompt = self._text(messages[:i], generation_prompt=True,
                                    enable_thinking=bool(message.thinking))
                pieces.append((self._cut(done, prompt), False))
                done = prompt
            text = self._text(messages[: i + 1])
            pieces.append((self._cut(done, text), i in trained))
            done = text
        return [(t, w) for t, w in pieces if t]

    @staticmethod
    def _cut(done: str, text: str) -> str:
        if not text.startswith(done):
            raise RenderSkip("failed", "the chat template does not render this conversation "
                             "incrementally (a message prefix changes earlier text)")
        return text[len(done):]

    # -- tokens -------------------------------------------------------------------------------

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def build_prompt(self, conversation: Conversation) -> tinker.types.ModelInput:
        """The generation prompt for evaluation: the conversation without its final assistant
        message, plus the template's generation prompt — exactly the token prefix of
        :meth:`render`'s tokens. Thinking is enabled in that prompt when the final assistant
        message has reasoning, and disabled otherwise (Qwen3: the empty think block follows).
        """
        prompt_messages = conversation.prompt_messages()
        last = conversation.messages[-1]
        thinking = "…" if last.role == "assistant" and last.thinking else None
        probe = Conversation(messages=(*prompt_messages,
                                       Message(role="assistant", content="", thinking=thinking)))
        tokens: list[int] = []
        for text, _ in self.segments(probe)[:-1]:
            tokens += self._encode(text)
        return tinker.types.ModelInput.from_ints(tokens)

    def chat_prompt(self, messages: Sequence[Message], thinking: bool = True
                    ) -> tinker.types.ModelInput:
        """The prompt that asks the model for its next reply in a live chat (``tinkerkit chat``,
        the OpenAI-compatible routes): ``messages`` plus the generation prompt, tokenized as
        :meth:`build_prompt` does.

        Args:
            messages: The conversation so far; it should end with a user message.
            thinking: Let a reasoning model think first (the chat template's
                ``enable_thinking``, on by default in Qwen3); False asks for the answer alone
                (Qwen3: the prompt ends with an empty think block). Templates without the
                argument ignore it.
        """
        reply = Message(role="assistant", content="", thinking="…" if thinking else None)
        return self.build_prompt(Conversation(messages=(*messages, reply)))

    def render_tokens(self, conversation: Conversation) -> tuple[list[int], list[float]]:
        """Token ids and per-token weights of the full (untruncated) rendering.

        Returns:
            ``tokens`` and ``weights`` (1.0 on trained answer tokens up to and including their last
            end-of-turn token, 0.0 elsewhere), both of length N.

        Raises:
            RenderSkip: (failed) No assistant message, a last message that is not the
                assistant's, or the template cannot be split.
        """
        if not any(m.role == "assistant" for m in conversation.messages):
            raise RenderSkip("failed", "no assistant message to learn from")
        if conversation.messages[-1].role != "assistant":  # a cut conversation, most likely
            raise RenderSkip("failed", f"the conversation ends with a "
                             f"{conversation.messages[-1].role} turn, after its last assistant "
                             "message (a cut conversation?)")
        tokens: list[int] = []
        weights: list[float] = []
        for text, trained in self.segments(conversation):
            ids = self._encode(text)
            w = [0.0] * len(ids)
            if trained:
                ends = [j for j, t in enumerate(ids) if t in self.stop_ids]
                last = ends[-1] if ends else len(ids) - 1
                w[: last + 1] = [1.0] * (last + 1)
            tokens += ids
            weights += w
        return tokens, weights

    def render(self, conversation: Conversation) -> RenderedExample:
        """Render one conversation to a training example, applying the length policy.

        Raises:
            RenderSkip: ``kind="skipped"`` when too long with truncation off, or when truncation
                cut every weighted token; ``kind="failed"`` when it cannot be rendered.
        """
        tokens, weights = self.render_tokens(conversation)
        full_length = len(tokens)
        truncated = lost_eot = False
        if self.max_length is not None and full_length > self.max_length:
            if not self.truncate:
                raise RenderSkip("skipped", f"{full_length} tokens > max length {self.max_length} "
                                 "(truncation off)")
            cut = tokens[self.max_length:]
            lost_eot = any(w > 0 and t in self.stop_ids
                           for t, w in zip(cut, weights[self.max_length:]))
            tokens, weights = tokens[: self.max_length], weights[: self.max_length]
            truncated = True
        if not any(w > 0 for w in weights[1:]):
            reason = (f"truncation at {self.max_length} tokens cut the whole answer"
                      if truncated else "no trained tokens")
            raise RenderSkip("skipped", reason)
        datum = tinker.types.Datum(
            model_input=tinker.types.ModelInput.from_ints(tokens[:-1]),
            loss_fn_inputs={
                "target_tokens": tinker.types.TensorData.from_numpy(np.asarray(tokens[1:], dtype=np.int64)),
                "weights": tinker.types.TensorData.from_numpy(np.asarray(weights[1:], dtype=np.float32)),
            },
        )
        return RenderedExample(datum, full_length, truncated, lost_eot, conversation.source)

    def render_dataset(self, conversations: Sequence[Conversation]
                       ) -> tuple[list[RenderedExample], RenderStats]:
        """Render many conversations, counting what was processed, truncated, skipped, failed."""
        examples, stats = [], RenderStats()
        for conversation in conversations:
            try:
                example = self.render(conversation)
            except RenderSkip as skip:
                setattr(stats, skip.kind, getattr(stats, skip.kind) + 1)
                stats.reasons.append((conversation.source or "?", skip.reason))
                if skip.kind == "skipped":
                    stats.lengths.append(self._safe_length(conversation))
                else:
                    stats.failures.append(stats.reasons[-1])
                continue
            except Exception as e:  # a template that raises on this record (TemplateError, ...)
                stats.failed += 1
                stats.reasons.append((conversation.source or "?", f"{type(e).__name__}: {e}"))
                stats.failures.append(stats.reasons[-1])
                continue
            examples.append(example)
            stats.processed += 1
            stats.truncated += example.truncated
            stats.lost_end_of_turn += example.lost_end_of_turn
            stats.lengths.append(example.full_length)
        return examples, stats

    def _safe_length(self, conversation: Conversation) -> int:
        try:
            return len(self.render_tokens(conversation)[0])
        except RenderSkip:
            return 0


def render_stats_dict(stats: RenderStats, max_length: int | None) -> dict:
    """The seed's statistics as a flat dict (lengths in tokens, before truncation)."""

    lengths = length_stats(stats.lengths)
    over = sum(1 for n in stats.lengths if max_length is not None and n > max_length)
    return {"examples": stats.total, "max": lengths.max, "mean": round(lengths.mean, 1),
            "median": lengths.median, "p95": round(lengths.p95, 1), "max_length": max_length,
            "over_max_length": over, "processed": stats.processed, "truncated": stats.truncated,
            "skipped": stats.skipped, "failed": stats.failed,
            "truncated_lost_end_of_turn": stats.lost_end_of_turn}


def print_render_stats(stats: RenderStats, console, max_length: int | None,
                       skipped_records: Sequence[tuple[str, str]] = (), show_reasons: int = 5) -> dict:
    """Print the length statistics and processing counts; returns them as a dict.

    Args:
        stats: From :meth:`Renderer.render_dataset`.
        console: A ``rich.console.Console``.
        max_length: ``MAX_SEQUENCE_LENGTH`` (for the over-length count).
        skipped_records: ``(where, reason)`` of records the loader skipped (``--on-error skip``).
        show_reasons: How many skip/failure reasons to list.
    """
    from rich.table import Table

    figures = render_stats_dict(stats, max_length)
    table = Table(title="Sequence lengths (tokens, chat template applied)", show_header=True)
    for name in ("Max", "Mean", "Median", "p95"):
        table.add_column(name, justify="right")
    table.add_row(*(str(figures[k]) for k in ("max", "mean", "median", "p95")))
    console.print(table)
    console.print(
        f"Successfully processed: {figures['processed']}  Truncated: {figures['truncated']}  "
        f"Skipped: {figures['skipped']}  Failed: {figures['failed']}"
        + (f"  (records skipped while loading: {len(skipped_records)})" if skipped_records else ""))
    if max_length is not None:
        console.print(f"Longer than MAX_SEQUENCE_LENGTH={max_length}: {figures['over_max_length']}; "
                      f"truncated examples that lost their end-of-turn token: "
                      f"{figures['truncated_lost_end_of_turn']}")
    for where, reason in [*skipped_records, *stats.reasons][:show_reasons]:
        console.print(f"  - {where}: {reason}", markup=False)
    return figures
