"""Generated tokens as text, piece by piece: what ``tinkerkit chat`` prints and what the
OpenAI-compatible routes of ``tinkerkit serve`` send, streamed or whole.

Two small state machines, fed as tokens arrive, so that a streamed answer and the whole one are
the same text by construction (the whole answer is the streamed pieces joined):

- :class:`TextStream`: token ids in, text deltas out. The sequence so far is decoded whole at
  each token (a token can complete a multi-byte character that the one before began, and a
  tokenizer may merge spaces across tokens), and only text that cannot change any more goes
  out: a trailing U+FFFD (an incomplete UTF-8 character) and a trailing prefix of a stop string
  are held back. The text ends before the first stop string (OpenAI's ``stop``: "the returned
  text will not contain the stop sequence") and a stop token is not part of it.
- :class:`ThinkSplit`: text deltas in, ``("thinking" | "answer", text)`` pieces out. A reply
  that starts with ``<think>`` (Qwen3, DeepSeek-R1 and other reasoning models) has its
  reasoning up to ``</think>`` split off, as vLLM's reasoning parsers and the DeepSeek API's
  ``reasoning_content`` do; whitespace between the blocks is dropped.

No third-party imports: the tokenizer is any object with ``decode(ids, skip_special_tokens=)``.
"""

from __future__ import annotations

from collections.abc import Iterable

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def _held_back(text: str, stops: Iterable[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of one of ``stops``."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest


class TextStream:
    """The visible text of one generated sequence, built token by token.

    Args:
        tokenizer: Decodes token ids (special tokens are kept, so that ``<|im_end|>`` as a stop
            string is found).
        stop_ids: Token ids that end the text; such a token is not part of it.
        stop_strings: Strings that end the text; the text stops before the first one.

    Attributes:
        text: The visible text so far (all of it once :attr:`stopped` or after :meth:`finish`).
        offsets: Per accepted token, the character offset in the decoded sequence where its text
            starts (OpenAI's ``text_offset``); tokens at or past ``len(text)`` at the end are
            not visible (they completed a stop string).
        stopped: A stop token or stop string was reached; later tokens are ignored.

    Example::

        stream = TextStream(tokenizer, stop_ids={2}, stop_strings=["\\n\\n"])
        pieces = [stream.push(t) for t in tokens] + [stream.finish()]
        assert "".join(pieces) == stream.text
    """

    def __init__(self, tokenizer, stop_ids: Iterable[int] = (),
                 stop_strings: Iterable[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop_ids = frozenset(stop_ids)
        self.stop_strings = tuple(s for s in stop_strings if s)
        self.tokens: list[int] = []
        self.offsets: list[int] = []
        self.text = ""
        self.stopped = False
        self._decoded = ""

    def push(self, token: int) -> str:
        """Add one generated token.

        Returns:
            The text that became final with it (often empty: a held-back partial character or
            stop-string prefix, or a token after the stop).
        """
        if self.stopped:
            return ""
        if token in self.stop_ids:
            self.stopped = True
            return self._emit(self._decoded)
        self.offsets.append(len(self._decoded))
        self.tokens.append(token)
        self._decoded = self.tokenizer.decode(self.tokens, skip_special_tokens=False)
        cut = min((i for i in (self._decoded.find(s) for s in self.stop_strings) if i >= 0),
                  default=-1)
        if cut >= 0:
            self.stopped = True
            return self._emit(self._decoded[:cut])
        safe = self._decoded.rstrip("\ufffd")
        return self._emit(safe[:len(safe) - _held_back(safe, self.stop_strings)])

    def finish(self) -> str:
        """The sequence ended (length, or the sampler's own stop): release what was held back."""
        return self._emit(self._decoded if not self.stopped else self.text)

    def _emit(self, final: str) -> str:
        # Decoding more tokens can, rarely, rewrite earlier characters (whitespace clean-up);
        # what was sent stays sent and only the text past it goes out.
        if len(final) <= len(self.text):
            return ""
        delta = final[len(self.text):]
        self.text = final
        return delta

    def visible_tokens(self) -> int:
        """How many of the accepted tokens start inside :attr:`text` (the ones a caller reports
        logprobs for)."""
        return sum(1 for offset in self.offsets if offset < len(self.text))


class ThinkSplit:
    """Splits a reply into its reasoning (``<think>…</think>`` at the start) and its answer.

    Args:
        thinking: The reply starts inside the reasoning block (the prompt already ended with
            ``<think>``, as some templates' generation prompts do).

    Example::

        split = ThinkSplit()
        split.feed("<think>\\n2+2") + split.feed(" is 4</think>\\n\\n4") + split.finish()
        # [("thinking", "2+2"), ("thinking", " is 4"), ("answer", "4")]
    """

    def __init__(self, thinking: bool = False) -> None:
        self.state = "thinking" if thinking else "start"
        self._buffer = ""
        self._skip_space = thinking

    def feed(self, text: str) -> list[tuple[str, str]]:
        """The pieces that ``text`` (the next delta of the reply) completes."""
        self._buffer += text
        out: list[tuple[str, str]] = []
        if self.state == "start":
            head = self._buffer.lstrip()
            if head.startswith(THINK_OPEN):
                self.state, self._buffer = "thinking", head[len(THINK_OPEN):]
                self._skip_space = True
            elif THINK_OPEN.startswith(head):
                return out  # maybe the start of "<think>": wait
            else:
                self.state = "answer"
        if self.state == "thinking":
            if self._skip_space:
                self._buffer = self._buffer.lstrip()
                self._skip_space = not self._buffer
            end = self._buffer.find(THINK_CLOSE)
            if end < 0:
                keep = _held_back(self._buffer, [THINK_CLOSE])
                piece, self._buffer = self._buffer[:len(self._buffer) - keep], \
                    self._buffer[len(self._buffer) - keep:]
                return out + ([("thinking", piece)] if piece else [])
            if end:
                out.append(("thinking", self._buffer[:end]))
            self.state, self._buffer = "answer", self._buffer[end + len(THINK_CLOSE):]
            self._skip_space = True
        if self.state == "answer":
            if self._skip_space:
                self._buffer = self._buffer.lstrip()
                self._skip_space = not self._buffer
            if self._buffer:
                out.append(("answer", self._buffer))
                self._buffer = ""
        return out

    def finish(self) -> list[tuple[str, str]]:
        """The rest once the reply ended (a reply of only ``<thi`` is an answer)."""
        rest, self._buffer = self._buffer, ""
        if not rest:
            return []
        return [("thinking" if self.state == "thinking" else "answer", rest)]


def split_thinking(text: str, thinking: bool = False) -> tuple[str, str]:
    """``(reasoning, answer)`` of a whole reply, exactly as :class:`ThinkSplit` streams them."""
    split = ThinkSplit(thinking)
    pieces = split.feed(text) + split.finish()
    return ("".join(t for kind, t in pieces if kind == "thinking"),
            "".join(t for kind, t in pieces if kind == "answer"))


def prompt_opens_thinking(tokenizer, prompt: list[int]) -> bool:
    """Whether a generation prompt ends inside an open ``<think>`` block (templates that start
    the reasoning themselves), so that the reply begins with reasoning (:class:`ThinkSplit`'s
    ``thinking``)."""
    return tokenizer.decode(prompt[-4:], skip_special_tokens=False).rstrip().endswith(THINK_OPEN)
