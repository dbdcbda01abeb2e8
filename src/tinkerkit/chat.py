"""``tinkerkit chat``: talk to a base model or a fine-tuned checkpoint in the terminal.

The model is named as the other commands name it: a registry name or HF model directory (a base
model), a checkpoint or exported adapter directory, a run directory (its latest checkpoint), or a
``tinker://`` checkpoint (sampled on the Tinker server at ``TINKER_BASE_URL`` through the SDK).
Prompts are rendered with the model's own chat template exactly as ``tinkerkit eval`` renders
them (:meth:`tinkerkit.render.Renderer.chat_prompt`), so the model sees what it was trained on.

On the local engine the answer is printed as it is generated (the sampler hands each token to a
callback, :class:`tinkerkit.streaming.TextStream` turns tokens into final text); the Tinker SDK
returns whole samples only, so a ``tinker://`` answer is printed when it is complete. A reasoning
model's ``<think>`` block is shown apart, dimmed (:class:`tinkerkit.streaming.ThinkSplit`), and
is not kept in the conversation (Qwen3's template drops earlier turns' reasoning too).

Interactive: ``/reset`` forgets the conversation (the system prompt stays), ``/system TEXT`` sets
the system prompt and resets, ``/exit`` or end of input (Ctrl-D) leaves; Ctrl-C while an answer
is generated stops that answer (the conversation goes on). ``--prompt TEXT`` asks once, prints
the answer on stdout (the reasoning, if any, on stderr) and exits.
"""

from __future__ import annotations

import queue
import sys
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from tinker import types

from tinkerkit.checkpoint import CHECKPOINTS_FILE, is_tinker_path, resolve_checkpoint
from tinkerkit.config import TrainConfig
from tinkerkit.data.conversation import Message
from tinkerkit.engines import create_sampling_client
from tinkerkit.engines.local import LocalSamplingClient
from tinkerkit.errors import ConfigError
from tinkerkit.evaluate import with_end_of_turn
from tinkerkit.models import is_model_dir
from tinkerkit.render import Renderer, end_of_turn_ids
from tinkerkit.streaming import TextStream, ThinkSplit, prompt_opens_thinking

HELP = "/reset: new conversation  /system TEXT: set the system prompt  /exit: leave"


def model_and_checkpoint(name: str) -> tuple[str | None, str | None]:
    """``(base_model, checkpoint)`` of a chat's model argument: a ``tinker://`` path, a run,
    checkpoint or adapter directory is a checkpoint (a run directory: its latest); a HF model
    directory, a registry name or a hub id is a base model.

    Raises:
        CheckpointError: A malformed ``tinker://`` path, or a run directory without a complete
            checkpoint.
    """
    path = Path(name).expanduser()
    if is_tinker_path(name) or (path / CHECKPOINTS_FILE).is_file():
        return None, resolve_checkpoint(name)
    if path.is_dir() and not is_model_dir(path):
        return None, resolve_checkpoint(path)
    return name, None


@dataclass
class Reply:
    """One generated answer: its text (without reasoning), reasoning and whether it was cut
    short (Ctrl-C)."""

    answer: str
    thinking: str
    interrupted: bool = False


class Chat:
    """A conversation with one model.

    Args:
        client: A sampling client (local: answers stream; the SDK's: whole answers).
        params: Sampling settings of every answer (``stop`` None: the model's end tokens).
        system: The system prompt, or None.
        thinking: Let reasoning models think (the chat template's ``enable_thinking``).
    """

    def __init__(self, client, params: types.SamplingParams, system: str | None = None,
                 thinking: bool = True) -> None:
        self.client, self.params, self.thinking = client, params, thinking
        self.tokenizer = client.get_tokenizer()
        self.renderer = Renderer(self.tokenizer)
        self.system = system
        self.messages: list[Message] = []
        self.reset()

    def reset(self) -> None:
        """Forget the conversation; keep the system prompt."""
        self.messages = [Message(role="system", content=self.system)] if self.system else []

    def set_system(self, text: str) -> None:
        """A new system prompt (empty: none), and a new conversation."""
        self.system = text or None
        self.reset()

    def _text_stream(self) -> TextStream:
        if self.params.stop:
            return TextStream(self.tokenizer, stop_strings=self.params.stop)
        stop_ids = getattr(self.client, "default_stop_ids", None)
        return TextStream(self.tokenizer, stop_ids=stop_ids or end_of_turn_ids(self.tokenizer))

    def ask(self, text: str, show) -> Reply:
        """Send a user message, show the answer as it comes, keep it in the conversation.

        Args:
            text: The user's message.
            show: ``show(kind, text)`` with kind ``"thinking"`` or ``"answer"``, called with
                each new piece of the answer.

        Returns:
            The reply (cut short when Ctrl-C interrupted it).
        """
        self.messages.append(Message(role="user", content=text))
        prompt = self.renderer.chat_prompt(self.messages, self.thinking)
        stream, split = self._text_stream(), ThinkSplit(
            prompt_opens_thinking(self.tokenizer, prompt.to_ints()))
        pieces: list[tuple[str, str]] = []

        def emit(new: list[tuple[str, str]]) -> None:
            for kind, piece in new:
                pieces.append((kind, piece))
                show(kind, piece)

        interrupted = False
        try:
            if isinstance(self.client, LocalSamplingClient):
                interrupted = self._stream(prompt, stream, split, emit)
            else:  # the SDK: whole samples only
                sequence = self.client.sample(prompt, 1, self.params).result().sequences[0]
                for token in sequence.tokens:
                    emit(split.feed(stream.push(int(token))))
        except KeyboardInterrupt:
            interrupted = True
        emit(split.feed(stream.finish()) + split.finish())
        reply = Reply("".join(t for k, t in pieces if k == "answer"),
                      "".join(t for k, t in pieces if k == "thinking"), interrupted)
        self.messages.append(Message(role="assistant", content=reply.answer))
        return reply

    def _stream(self, prompt, stream: TextStream, split: ThinkSplit, emit) -> bool:
        """Generate on the local sampler, showing each token's text as it comes; True when
        Ctrl-C stopped it (the sampler ends the sequence at its next token)."""
        tokens: queue.Queue = queue.Queue()
        listening = [True]

        def on_token(index: int, token: int, logprob: float) -> bool:
            tokens.put(token)
            return listening[0]

        future = self.client.sample(prompt, 1, self.params, on_token=on_token)
        future.add_done_callback(lambda done: tokens.put(None))
        interrupted = False
        try:
            while True:
                try:
                    token = tokens.get()
                except KeyboardInterrupt:
                    listening[0], interrupted = False, True
                    continue  # drain: the sampler stops this sequence at its next token
                if token is None:
                    break
                if not interrupted:
                    emit(split.feed(stream.push(token)))
        finally:  # also when Ctrl-C lands while a piece is printed: generation stops
            listening[0] = False
        future.result()  # a failed generation raises here
        return interrupted


def sampling_params(config: TrainConfig, tokenizer, seed: int | None) -> types.SamplingParams:
    """The config's sampling settings (``TEMPERATURE``, ``TOP_P``, ``TOP_K``, ``MAX_TOKENS``,
    ``STOP`` plus the end-of-turn tokens) for chat answers."""
    return types.SamplingParams(max_tokens=config.max_tokens, temperature=config.temperature,
                                top_p=config.top_p, top_k=config.top_k, seed=seed,
                                stop=with_end_of_turn(config.stop, tokenizer))


def run_chat(config: TrainConfig, model: str, prompt: str | None = None,
             system: str | None = None, thinking: bool = True, seed: int | None = None,
             console: Console | None = None) -> Reply | None:
    """``tinkerkit chat``: one answer to ``prompt``, or an interactive session.

    Args:
        config: Sampling settings, ``BACKEND``, ``DEVICE``, ``DTYPE``, ``TINKER_BASE_URL``.
        model: The model argument (:func:`model_and_checkpoint`).
        prompt: Ask this once and return (non-interactive), or None.
        system: The system prompt, or None.
        thinking: Let reasoning models think first.
        seed: Seed of the sampling (None: a fresh one per answer).
        console: Where the interactive session prints.

    Returns:
        The reply to ``prompt``, or None after an interactive session.

    Raises:
        ConfigError: ``prompt`` is empty or blank.
        ModelError, CheckpointError, ConfigError, EngineError: The model cannot be loaded or
            sampled.
    """
    if prompt is not None and not prompt.strip():
        raise ConfigError("--prompt is empty: give the question to answer, or leave --prompt out "
                          "for an interactive chat")
    console = console or Console(highlight=False)
    base_model, checkpoint = model_and_checkpoint(model)
    client = create_sampling_client(config, checkpoint, base_model)
    try:
        chat = Chat(client, sampling_params(config, client.get_tokenizer(), seed), system,
                    thinking)
        if prompt is not None:
            return _answer_once(chat, prompt)
        _interactive(chat, console, checkpoint or client.base_model)
        return None
    finally:
        client.close()


def _answer_once(chat: Chat, prompt: str) -> Reply:
    errors = Console(stderr=True, highlight=False)

    def show(kind: str, text: str) -> None:
        if kind == "thinking":
            errors.print(text, style="dim", end="", markup=False, soft_wrap=True)
        else:
            sys.stdout.write(text)
            sys.stdout.flush()

    reply = chat.ask(prompt, show)
    sys.stdout.write("\n")
    return reply


def _interactive(chat: Chat, console: Console, name: str) -> None:
    console.print(f"Chatting with {name}. {HELP}. Ctrl-C stops an answer.", style="bold",
                  markup=False)
    shown = {"kind": None}

    def show(kind: str, text: str) -> None:
        if shown["kind"] == "thinking" and kind == "answer":
            console.print()
        shown["kind"] = kind
        console.print(text, style="dim" if kind == "thinking" else None, end="", markup=False,
                      soft_wrap=True)

    while True:
        try:
            line = console.input("[bold green]you> [/]")
        except EOFError:
            console.print()
            return
        except KeyboardInterrupt:
            console.print("\n(/exit or Ctrl-D leaves)")
            continue
        command, _, rest = line.strip().partition(" ")
        if command == "/exit":
            return
        if command == "/reset":
            chat.reset()
            console.print("(new conversation)")
            continue
        if command == "/system":
            chat.set_system(rest.strip())
            console.print("(system prompt set; new conversation)" if rest.strip() else
                          "(no system prompt; new conversation)")
            continue
        if command.startswith("/"):
            console.print(f"(unknown command {command}; {HELP})", markup=False)
            continue
        if not line.strip():
            continue
        shown["kind"] = None
        console.print("[bold blue]model>[/] ", end="")
        reply = chat.ask(line, show)
        console.print(" [stopped]" if reply.interrupted else "", style="yellow")

