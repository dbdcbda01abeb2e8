"""OpenAI-compatible routes of ``tinkerkit serve``: ``/v1/models``, ``/v1/chat/completions``,
``/v1/completions``, streamed (server-sent events) or not.

Any OpenAI client reaches the served base models and every checkpoint its key owns::

    client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="tml-mine")
    client.chat.completions.create(model="tinker://<run>/sampler_weights/final",
                                   messages=[{"role": "user", "content": "2+2?"}])

Models: a base model by the name the Tinker routes take (:class:`ModelRegistry`), or a checkpoint
by its ``tinker://`` path (or the path without the scheme). Keys and isolation are the Tinker
routes': the key comes as ``Authorization: Bearer tml-...`` (or ``X-API-Key``), and a checkpoint
of another key is unknown (404), as it is to the Tinker routes.

Sampling: every request on a model goes through one shared sampling client
(:meth:`ServerState.shared_sampler`), so concurrent requests are batched together by the local
sampler, as the samples of a Tinker sampling session are. Chat prompts are rendered with the
model's chat template by :meth:`tinkerkit.render.Renderer.chat_prompt` (as ``tinkerkit chat``
and ``tinkerkit eval`` render them); a reply that starts with ``<think>`` has its reasoning in
``reasoning_content`` (the DeepSeek API's and vLLM's field), its answer in ``content``.

Parameters, as the OpenAI API reference defines them (https://platform.openai.com/docs/api-reference):
``temperature`` (0-2, default 1; 0 greedy), ``top_p``, ``max_tokens`` / ``max_completion_tokens``
(default: chat 256, the local sampler's default; completions 16, OpenAI's), ``stop`` (up to 4
strings; the text ends before the first), ``n``, ``seed`` (each choice seeded from ``(seed,
index)``: a seeded request gives the same choices again), ``logprobs`` (chat: ``true`` and
``top_logprobs`` 0-20; completions: an integer 0-20), ``stream`` with ``stream_options.
include_usage``. Extensions, as vLLM names them: ``top_k`` and ``chat_template_kwargs.
enable_thinking``. Differences from OpenAI are listed in docs/TINKER_AND_SERVE.md.

Errors come in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``: 400
``invalid_request_error`` (a bad or unsupported parameter, named in ``param``), 401 (no or an
unknown key), 404 ``model_not_found``, 500 ``server_error``; an error after a stream started is
one ``data: {"error": ...}`` event before the stream ends.
"""

from __future__ import annotations

import json
import queue
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field
from tinker import types

from tinkerkit.checkpoint import is_tinker_path
from tinkerkit.data.formats import normalize_record
from tinkerkit.errors import DataError, RequestError, TinkerkitError
from tinkerkit.evaluate import with_end_of_turn
from tinkerkit.render import Renderer
from tinkerkit.sampling_rules import sampling_problems
from tinkerkit.serve.auth import API_KEY_HEADER, Authenticator
from tinkerkit.serve.futures import describe_error
from tinkerkit.serve.state import MAX_NUM_SAMPLES, MAX_SAMPLE_TOKENS, ServerState
from tinkerkit.serve.store import CheckpointStore
from tinkerkit.streaming import TextStream, ThinkSplit, prompt_opens_thinking

CHAT_DEFAULT_MAX_TOKENS = 256
"""``max_tokens`` of a chat completion that sets none (the local sampler's default)."""
COMPLETION_DEFAULT_MAX_TOKENS = 16
"""``max_tokens`` of a completion that sets none (OpenAI's default for ``/v1/completions``)."""
MAX_TOP_LOGPROBS = 20
"""Largest ``top_logprobs`` (chat) or ``logprobs`` (completions), as OpenAI allows."""
MAX_STOP_STRINGS = 4
"""Most ``stop`` strings, as OpenAI allows."""
STREAM_POLL_SECONDS = 1.0
"""How often a stream waiting for tokens checks that its generation is still alive."""


class ApiError(RequestError):
    """A refused OpenAI-route request, answered as ``{"error": {...}}``.

    Args:
        status: HTTP status.
        message: One line.
        param: The request field at fault, or None.
        code: OpenAI's error code (``model_not_found``, ``invalid_api_key``, ...), or None.
    """

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(status, message)
        self.param, self.code = param, code


_ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error",
                403: "permission_error", 404: "invalid_request_error", 405: "invalid_request_error",
                411: "invalid_request_error", 413: "invalid_request_error"}


def error_body(error: RequestError) -> dict:
    """OpenAI's error object for a refused request (any :class:`RequestError`)."""
    return {"error": {"message": str(error),
                      "type": _ERROR_TYPES.get(error.status, "server_error"),
                      "param": getattr(error, "param", None),
                      "code": getattr(error, "code", None)}}


# -- requests ------------------------------------------------------------------------------------

class _StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _ChatTemplateKwargs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enable_thinking: bool = True


class _Request(BaseModel):
    """What both routes take (OpenAI's names, ranges and defaults)."""

    model_config = ConfigDict(extra="forbid")
    model: str
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = 1.0
    top_k: int = -1
    max_tokens: int | None = Field(None, ge=1, le=MAX_SAMPLE_TOKENS)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=MAX_NUM_SAMPLES)
    seed: int | None = None
    stream: bool = False
    stream_options: _StreamOptions | None = None
    user: str | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0


class ChatRequest(_Request):
    """The body of ``POST /v1/chat/completions``."""

    messages: list[Any]
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_SAMPLE_TOKENS)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    chat_template_kwargs: _ChatTemplateKwargs | None = None


class CompletionRequest(_Request):
    """The body of ``POST /v1/completions``."""

    prompt: str | list[int]
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: Literal[False] = False


def parse_body(body: bytes, model: type[_Request]) -> _Request:
    """The body validated as ``model`` (pydantic strict JSON mode, as the Tinker routes).

    Raises:
        ApiError: 400 naming the first invalid field in ``param``; also a penalty other than 0
            (not supported), ``stop`` of more than 4 strings or an empty one, and the sampling
            rules of :mod:`tinkerkit.sampling_rules`.
    """
    try:
        request = model.model_validate_json(body or b"{}", strict=True)
    except pydantic.ValidationError as e:
        first = e.errors()[0]
        field = ".".join(str(part) for part in first["loc"][:1]) or None
        where = ".".join(str(part) for part in first["loc"]) or "body"
        raise ApiError(400, f"{where}: {first['msg']}", param=field) from None
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(request, name):
            raise ApiError(400, f"{name} is not supported by tinkerkit serve (only 0)", param=name)
    stops = _stops(request)
    if len(stops) > MAX_STOP_STRINGS or any(not s for s in stops):
        raise ApiError(400, f"stop: at most {MAX_STOP_STRINGS} non-empty strings", param="stop")
    problems = sampling_problems(request.temperature, request.top_p, request.top_k,
                                 request.max_tokens)
    if problems:
        raise ApiError(400, "; ".join(problems), param=problems[0].split(" ")[0])
    return request


def _stops(request: _Request) -> list[str]:
    return [request.stop] if isinstance(request.stop, str) else list(request.stop or [])


# -- models --------------------------------------------------------------------------------------

@dataclass
class _Target:
    """A resolved ``model`` of a request: a base model, or a checkpoint on one."""

    name: str
    served: Any
    directory: Path | None = None


def _bearer_key(request) -> str | None:
    header = request.headers.get("Authorization") or ""
    scheme, _, key = header.partition(" ")
    if scheme.lower() == "bearer" and key.strip():
        return key.strip()
    return request.headers.get(API_KEY_HEADER)


class OpenAIRoutes:
    """The ``/v1/...`` routes over a server's state.

    Args:
        state: The server's state (registry, checkpoint store, shared samplers).
        auth: The API key checker of the Tinker routes.
    """

    def __init__(self, state: ServerState, auth: Authenticator) -> None:
        self.state, self.auth = state, auth
        self._renderers: dict[int, Renderer] = {}  # by id() of the state's cached tokenizers
        self.table: dict[tuple[str, str], Callable] = {
            ("GET", "/v1/models"): self.models,
            ("POST", "/v1/chat/completions"): self.chat,
            ("POST", "/v1/completions"): self.completions,
        }

    def handle(self, request) -> dict | Iterator[bytes]:
        """Answer one ``/v1/`` request (an ``app.Request``): a JSON object, or the server-sent
        events of a stream (``data: ...`` lines, bytes).

        Raises:
            RequestError: 401, 404 (unknown route or model), 405, or an :class:`ApiError`.
        """
        path = request.path.rstrip("/")
        handler = self.table.get((request.method, path))
        if handler is None:
            if any(p == path for _, p in self.table):
                raise ApiError(405, f"{request.method} is not allowed on {path}")
            raise ApiError(404, f"no route {request.method} {path} in tinkerkit serve",
                           code="unknown_url")
        key = _bearer_key(request)
        if not key:
            raise ApiError(401, "missing API key: send 'Authorization: Bearer tml-...'",
                           code="invalid_api_key")
        try:
            owner = self.auth.owner(key)
        except RequestError as e:
            raise ApiError(e.status, str(e), code="invalid_api_key") from None
        return handler(request, owner)

    # -- /v1/models

    def models(self, request, owner: str) -> dict:
        """``GET /v1/models``: the served base models, then the key's checkpoints."""
        created = int(time.time())
        data = [{"id": name, "object": "model", "created": created, "owned_by": "tinkerkit"}
                for name in self.state.registry.names()]
        store = self.state.store
        for record in store.list_runs(owner):
            for checkpoint in store.list_checkpoints(record.model_id):
                data.append({"id": checkpoint.tinker_path, "object": "model",
                             "created": int(checkpoint.time.timestamp()), "owned_by": "you",
                             "root": record.base_model})
        return {"object": "list", "data": data}

    def _target(self, name: str, owner: str) -> _Target:
        """The base model or checkpoint ``name`` names, for ``owner``.

        Raises:
            ApiError: 404 ``model_not_found`` when it is neither a served base model nor a
                checkpoint of ``owner`` (another key's checkpoint included).
        """
        path = name if is_tinker_path(name) else None
        if path is None and name.count("/") == 2 and ":train:" in name:  # a path without scheme
            path = "tinker://" + name
        if path is not None:
            try:
                record, directory = self.state.store.checkpoint(
                    CheckpointStore.tinker_path(*CheckpointStore.parse_tinker_path(path)), owner)
                return _Target(name, self.state.registry.resolve(record.base_model), directory)
            except RequestError:
                raise ApiError(404, f"model '{name}' does not exist or is not yours",
                               param="model", code="model_not_found") from None
        try:
            return _Target(name, self.state.registry.resolve(name))
        except RequestError:
            raise ApiError(404, f"model '{name}' does not exist; GET /v1/models lists the models "
                                "served", param="model", code="model_not_found") from None

    def _client(self, target: _Target):
        try:
            return self.state.shared_sampler(target.served, target.directory).result()
        except TinkerkitError as e:
            raise ApiError(400, f"model '{target.name}' cannot be loaded: {e}",
                           param="model") from None

    def _renderer(self, tokenizer) -> Renderer:
        """The renderer of a served model's tokenizer, made once (it reads the vocabulary).

        Raises:
            DataError: The tokenizer has no chat template.
        """
        renderer = self._renderers.get(id(tokenizer))
        if renderer is None or renderer.tokenizer is not tokenizer:
            renderer = self._renderers[id(tokenizer)] = Renderer(tokenizer)
        return renderer

    # -- /v1/chat/completions and /v1/completions

    def chat(self, request, owner: str):
        """``POST /v1/chat/completions``."""
        body = parse_body(request.body, ChatRequest)
        if body.top_logprobs and not body.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        if body.max_tokens is not None and body.max_completion_tokens is not None:
            raise ApiError(400, "set max_tokens or max_completion_tokens, not both",
                           param="max_completion_tokens")
        target = self._target(body.model, owner)
        client = self._client(target)
        tokenizer = client.get_tokenizer()
        try:
            conversation = normalize_record({"messages": body.messages}, "messages", "request")
            thinking = body.chat_template_kwargs is None or \
                body.chat_template_kwargs.enable_thinking
            prompt = self._renderer(tokenizer).chat_prompt(conversation.messages, thinking)
        except DataError as e:
            raise ApiError(400, str(e), param="messages") from None
        max_tokens = body.max_completion_tokens or body.max_tokens or CHAT_DEFAULT_MAX_TOKENS
        top = (body.top_logprobs or 0) if body.logprobs else None
        run = _Generation(client, prompt, body, max_tokens, top, chat=True,
                          thinking=prompt_opens_thinking(tokenizer, prompt.to_ints()),
                          client_gone=request.client_gone)
        return run.stream() if body.stream else run.whole()

    def completions(self, request, owner: str):
        """``POST /v1/completions``."""
        body = parse_body(request.body, CompletionRequest)
        target = self._target(body.model, owner)
        client = self._client(target)
        if isinstance(body.prompt, str):
            tokens = client.get_tokenizer().encode(body.prompt, add_special_tokens=True)
        else:
            tokens = body.prompt
        if not tokens:
            raise ApiError(400, "prompt is empty", param="prompt")
        run = _Generation(client, types.ModelInput.from_ints(tokens), body,
                          body.max_tokens or COMPLETION_DEFAULT_MAX_TOKENS, body.logprobs,
                          chat=False, client_gone=request.client_gone)
        return run.stream() if body.stream else run.whole()


# -- generation ----------------------------------------------------------------------------------

class _Generation:
    """One request's sampling on the shared client, and its answer in OpenAI's shapes.

    Args:
        client: The shared :class:`~tinkerkit.engines.local.LocalSamplingClient`.
        prompt: Prompt tokens.
        body: The validated request.
        max_tokens: Most generated tokens per choice.
        top: Top logprobs per token (0: the chosen token's only), or None for no logprobs.
        chat: Chat shapes (``chat.completion``) rather than ``text_completion``.
        thinking: The prompt opened a think block (the reply starts inside it).
        client_gone: Whether the client has closed its connection; an answer without
            ``stream`` stops generating then (a stream stops when a write fails).
    """

    def __init__(self, client, prompt: types.ModelInput, body: _Request, max_tokens: int,
                 top: int | None, chat: bool, thinking: bool = False,
                 client_gone=lambda: False) -> None:
        self.client, self.prompt, self.body = client, prompt, body
        self.client_gone = client_gone
        self.top, self.chat, self.thinking = top, chat, thinking
        self.tokenizer = client.get_tokenizer()
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        stops = _stops(body)
        # Explicit stop strings replace the sampler's end tokens (Tinker's semantics): add them.
        self.stop = with_end_of_turn(stops, self.tokenizer) if stops else None
        self.params = types.SamplingParams(max_tokens=max_tokens, temperature=body.temperature,
                                           top_p=body.top_p, top_k=body.top_k, seed=body.seed,
                                           stop=self.stop)
        self.streams = [self._text_stream() for _ in range(body.n)]

    def _text_stream(self) -> TextStream:
        if self.stop is None:
            return TextStream(self.tokenizer, stop_ids=self.client.default_stop_ids)
        return TextStream(self.tokenizer, stop_strings=self.stop)

    def _sample(self, on_token=None):
        try:
            return self.client.sample(self.prompt, self.body.n, self.params, on_token=on_token)
        except TinkerkitError as e:  # refused at once: prompt too long, bad token ids, ...
            raise ApiError(400, str(e), param="messages" if self.chat else "prompt") from None

    # -- pieces

    def _finish_reason(self, index: int, sequence: types.SampledSequence) -> str:
        stopped = self.streams[index].stopped or sequence.stop_reason == "stop"
        return "stop" if stopped else "length"

    def _usage(self, response: types.SampleResponse) -> dict:
        completion = sum(len(s.tokens) for s in response.sequences)
        return {"prompt_tokens": self.prompt.length, "completion_tokens": completion,
                "total_tokens": self.prompt.length + completion}

    def _top_logprobs(self, sequence: types.SampledSequence, count: int) -> list[list]:
        """Top-``self.top`` (token id, logprob) of the first ``count`` generated positions:
        one prompt-scoring pass over prompt + answer on the same client (the sampler reports
        only the chosen token's logprob while decoding)."""
        if not self.top or not count:
            return [[] for _ in range(count)]
        tokens = self.prompt.to_ints() + list(sequence.tokens[:count])
        scored = self.client.sample(types.ModelInput.from_ints(tokens), 1,
                                    types.SamplingParams(max_tokens=1, temperature=0),
                                    topk_prompt_logprobs=self.top).result()
        topk = scored.topk_prompt_logprobs_np
        start = self.prompt.length
        return [list(zip(topk.token_ids[start + i].tolist(), topk.logprobs[start + i].tolist()))
                for i in range(count)]

    def _token_text(self, token: int) -> str:
        return self.tokenizer.decode([token], skip_special_tokens=False)

    def _chat_logprobs(self, tokens: list[int], logprobs: list[float], tops: list[list]) -> dict:
        def entry(token: int, logprob: float) -> dict:
            text = self._token_text(token)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}
        return {"content": [{**entry(t, lp), "top_logprobs": [entry(i, v) for i, v in top]}
                            for t, lp, top in zip(tokens, logprobs, tops)]}

    def _completion_logprobs(self, tokens: list[int], logprobs: list[float], tops: list[list],
                             offsets: list[int]) -> dict:
        return {"tokens": [self._token_text(t) for t in tokens], "token_logprobs": logprobs,
                "top_logprobs": [{self._token_text(i): v for i, v in top} for top in tops]
                if self.top else None,
                "text_offset": offsets}

    def _logprobs(self, stream: TextStream, logprobs: list[float], tops: list[list] | None,
                  first: int, last: int) -> dict | None:
        """The logprobs object of visible tokens ``first`` to ``last`` (exclusive) of a choice,
        or None when the request asks for none.

        Args:
            stream: The choice's text stream (its tokens and offsets).
            logprobs: The choice's logprob per generated token.
            tops: Top logprobs of tokens ``0 .. last``, or None (none asked).
        """
        if self.top is None:
            return None
        tokens = stream.tokens[first:last]
        values = [float(v) for v in logprobs[first:last]]
        tops = [[] for _ in tokens] if tops is None else tops[first:last]
        if self.chat:
            return self._chat_logprobs(tokens, values, tops)
        return self._completion_logprobs(tokens, values, tops, stream.offsets[first:last])

    # -- whole answers

    def whole(self) -> dict:
        """The answer of a request without ``stream``."""
        future = self._sample(lambda index, token, logprob: not self.client_gone())
        try:
            response = future.result()
        except Exception as e:  # the generation failed (the batch it ran in, a closed sampler)
            message, category = describe_error(e)
            raise ApiError(400 if category == types.RequestErrorCategory.User else 500,
                           message) from None
        choices = []
        for index, sequence in enumerate(response.sequences):
            stream = self.streams[index]
            for token in sequence.tokens:
                stream.push(int(token))
            stream.finish()
            visible = stream.visible_tokens()
            logprobs = self._logprobs(stream, list(sequence.logprobs),
                                      self._top_logprobs(sequence, visible), 0, visible)
            reason = self._finish_reason(index, sequence)
            if self.chat:
                split = ThinkSplit(self.thinking)
                pieces = split.feed(stream.text) + split.finish()
                message = {"role": "assistant",
                           "content": "".join(t for k, t in pieces if k == "answer")}
                reasoning = "".join(t for k, t in pieces if k == "thinking")
                if reasoning:
                    message["reasoning_content"] = reasoning
                choices.append({"index": index, "message": message, "logprobs": logprobs,
                                "finish_reason": reason})
            else:
                choices.append({"index": index, "text": stream.text, "logprobs": logprobs,
                                "finish_reason": reason})
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.body.model, "choices": choices,
                "usage": self._usage(response)}

    # -- streams

    def _chunk(self, choices: list[dict], usage: dict | None = None) -> bytes:
        chunk = {"id": self.id,
                 "object": "chat.completion.chunk" if self.chat else "text_completion",
                 "created": self.created, "model": self.body.model, "choices": choices}
        if usage is not None:
            chunk["usage"] = usage
        return b"data: " + json.dumps(chunk).encode("utf-8") + b"\n\n"

    def _delta(self, index: int, text: str, split: ThinkSplit | None, logprobs: dict | None,
               finish: str | None = None) -> list[dict]:
        if not self.chat:
            return [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}]
        pieces = split.feed(text) if text else []
        if finish is not None:
            pieces += split.finish()
        deltas = [{"reasoning_content" if kind == "thinking" else "content": piece}
                  for kind, piece in pieces]
        if not deltas and (logprobs or finish is not None):
            deltas = [{}]
        return [{"index": index, "delta": delta, "logprobs": logprobs if i == 0 else None,
                 "finish_reason": finish if i == len(deltas) - 1 else None}
                for i, delta in enumerate(deltas)]

    def stream(self) -> Iterator[bytes]:
        """Check the request now (400 before any byte is sent), then the server-sent events of
        a request with ``stream``.

        Raises:
            ApiError: 400 ``top_logprobs`` with a stream (not supported), or a prompt the
                sampler refuses.
        """
        if self.top:
            raise ApiError(400, "top_logprobs with stream is not supported by tinkerkit serve "
                                "(send stream: false)", param="top_logprobs")
        events: queue.Queue = queue.Queue()
        listening = [True]
        per_choice: list[list[float]] = [[] for _ in range(self.body.n)]

        def on_token(index: int, token: int, logprob: float) -> bool:
            events.put((index, token, logprob))
            return listening[0]  # the client left: stop generating for it

        future = self._sample(on_token)
        future.add_done_callback(lambda done: events.put(None))
        return self._events(events, future, per_choice, listening)

    def _events(self, events: queue.Queue, future, per_choice: list[list[float]],
                listening: list[bool]) -> Iterator[bytes]:
        splits = [ThinkSplit(self.thinking) if self.chat else None for _ in range(self.body.n)]
        reported = [0] * self.body.n
        try:
            if self.chat:
                yield self._chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                                    "logprobs": None, "finish_reason": None}
                                   for i in range(self.body.n)])
            while True:
                try:
                    item = events.get(timeout=STREAM_POLL_SECONDS)
                except queue.Empty:
                    continue
                if item is None:
                    break
                index, token, logprob = item
                stream = self.streams[index]
                per_choice[index].append(logprob)
                text = stream.push(token)
                logprobs = self._stream_logprobs(index, stream, per_choice[index], reported)
                if text or logprobs:
                    choices = self._delta(index, text, splits[index], logprobs)
                    if choices:
                        yield self._chunk(choices)
            try:
                response = future.result()
            except Exception as e:  # the generation failed after the stream started
                message, _ = describe_error(e)
                yield b"data: " + json.dumps(error_body(ApiError(500, message))).encode() + \
                    b"\n\n"
                return
            for index, sequence in enumerate(response.sequences):
                stream = self.streams[index]
                text = stream.finish()
                logprobs = self._stream_logprobs(index, stream, per_choice[index], reported)
                yield self._chunk(self._delta(index, text, splits[index], logprobs,
                                              finish=self._finish_reason(index, sequence)))
            options = self.body.stream_options
            if options is not None and options.include_usage:
                yield self._chunk([], usage=self._usage(response))
            yield b"data: [DONE]\n\n"
        finally:
            listening[0] = False

    def _stream_logprobs(self, index: int, stream: TextStream, logprobs: list[float],
                         reported: list[int]) -> dict | None:
        """Logprobs of the tokens of choice ``index`` that became visible since its last chunk
        (the tokens whose text starts inside the text sent so far)."""
        if self.top is None:
            return None
        first, visible = reported[index], stream.visible_tokens()
        if visible <= first:
            return None
        reported[index] = visible
        return self._logprobs(stream, logprobs, None, first, visible)
