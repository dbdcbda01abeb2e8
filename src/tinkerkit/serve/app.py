"""The HTTP side of ``tinkerkit serve``: routes of the Tinker API onto :class:`ServerState`.

A standard-library ``ThreadingHTTPServer`` (HTTP/1.1 keep-alive, one thread per connection):
the engine computes in its own threads, so the HTTP layer only parses, checks and answers.
Routes live under ``/api/v1/`` as the ``tinker`` SDK (0.38.0) calls them; JSON bodies are
validated with the SDK's own pydantic request types, ``forward_backward`` arrives as protobuf
(see :mod:`tinkerkit.serve.protobuf`), and results of futures go back as JSON or, for
``ForwardBackwardOutput`` and ``SampleResponse``, as protobuf.

Errors: a malformed or invalid request gets a 4xx with ``{"detail": "<one line>"}`` (never 409
or 429, which the SDK retries), http.server's own refusals included; a failure inside a started
request (or a refusal of one that waited for earlier ones) fails its future with
``{"error": ..., "category": "user" | "server"}``, which the SDK raises as
``RequestFailedError``. Only an unexpected bug answers 500. The access log names method, path
(without query), status and duration; it never holds a header, so never an API key.
"""

from __future__ import annotations

import errno
import json
import logging
import re
import select
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pydantic
from tinker import types
from tinker.types.try_again_response import TryAgainResponse

from tinkerkit.errors import ConfigError, RequestError
from tinkerkit.models import cache_dir
from tinkerkit.serve import protobuf
from tinkerkit.serve.auth import API_KEY_HEADER, Authenticator, is_loopback, read_api_keys
from tinkerkit.serve.futures import LONG_POLL_SECONDS
from tinkerkit.serve.openai import OpenAIRoutes, error_body
from tinkerkit.serve.registry import ModelRegistry, read_models_file
from tinkerkit.serve.state import ServerState, download_message
from tinkerkit.serve.store import CheckpointStore

log = logging.getLogger("tinkerkit.serve")

MAX_JSON_BODY_BYTES = 16 * 1024 * 1024
"""Largest JSON request body accepted (16 MiB: a prompt of millions of tokens; every JSON body
is parsed whole into Python objects, several times its size)."""
REAPER_INTERVAL_SECONDS = 5.0
"""How often silent sessions are looked for (:meth:`ServerState.release_idle_sessions`)."""


@dataclass
class Request:
    """One HTTP request as the route handlers see it."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: Any
    body: bytes
    params: dict[str, str] = field(default_factory=dict)
    owner: str = ""
    base_url: str = ""
    client_gone: Callable[[], bool] = lambda: False
    """Whether the client has closed its connection (a long answer stops generating then)."""

    def json(self, model: type[pydantic.BaseModel]) -> Any:
        """The body validated as ``model`` (a SDK request type), in pydantic's strict mode for
        JSON: no conversion between JSON types, so ``true`` is not the integer 1 nor ``"4"`` the
        integer 4 (the conversions JSON needs, a string to an enum or a date, still apply).

        Raises:
            RequestError: 400 naming the first invalid field.
        """
        try:
            data = json.loads(self.body or b"{}")
        except (ValueError, RecursionError) as e:  # bad JSON or UTF-8, huge numbers, deep nesting
            raise RequestError(400, f"body is not JSON: {e}") from e
        if not isinstance(data, dict):
            raise RequestError(400, f"body must be a JSON object, got {type(data).__name__}")
        try:
            return model.model_validate_json(self.body or b"{}", strict=True)
        except pydantic.ValidationError as e:
            raise RequestError.invalid(model.__name__, e) from e

    def int_query(self, name: str, default: int, maximum: int = 1000) -> int:
        """A non-negative integer query parameter (400 otherwise)."""
        values = self.query.get(name)
        if not values:
            return default
        try:
            value = int(values[0])
        except ValueError:
            value = -1
        if not 0 <= value <= maximum:
            raise RequestError(400, f"query parameter {name}={values[0]!r} must be an integer "
                                    f"in [0, {maximum}]")
        return value


class _WeightsInfoRequest(pydantic.BaseModel):
    """The body of ``/weights_info`` (the SDK sends a bare dict)."""

    model_config = pydantic.ConfigDict(extra="forbid")
    tinker_path: str


@dataclass
class Response:
    """A route's answer."""

    status: int = 200
    body: bytes = b"{}"
    content_type: str = "application/json"
    file: Path | None = None
    stream: Iterator[bytes] | None = None
    """Sent chunk by chunk (chunked transfer encoding) instead of ``body``: server-sent events."""


def json_response(value: Any, status: int = 200) -> Response:
    """A JSON answer from a pydantic model, a dict or None."""
    if isinstance(value, pydantic.BaseModel):
        value = value.model_dump(mode="json")
    return Response(status, json.dumps(value).encode("utf-8"))


def openai_response(value: dict | Iterator[bytes]) -> Response:
    """The answer of an OpenAI-compatible route: JSON, or a stream of server-sent events."""
    if isinstance(value, dict):
        return json_response(value)
    return Response(content_type="text/event-stream", stream=value)


def error_response(path: str, error: RequestError) -> Response:
    """A refusal: OpenAI's error shape under ``/v1/``, ``{"detail": ...}`` elsewhere."""
    if path.startswith("/v1/"):
        return json_response(error_body(error), error.status)
    return json_response({"detail": str(error)}, error.status)


def future_response(future) -> Response:
    """The ``UntypedAPIFuture`` answer of a submitted request."""
    return json_response(future.untyped())


class Routes:
    """The route table and its handlers.

    Args:
        state: The server's state.
        auth: The API key checker.
        long_poll_seconds: Longest wait of one ``retrieve_future``.
    """

    def __init__(self, state: ServerState, auth: Authenticator,
                 long_poll_seconds: float = LONG_POLL_SECONDS) -> None:
        self.state, self.auth, self.long_poll_seconds = state, auth, long_poll_seconds
        segment = r"(?P<{}>[^/]+)"
        run = "/training_runs/" + segment.format("model_id")
        checkpoint = run + "/checkpoints/" + segment.format("segment") + "/" + segment.format("name")
        table: list[tuple[str, str, Callable[[Request], Response], bool]] = [
            ("GET", "/healthz", lambda r: json_response({"status": "ok"}), False),
            ("POST", "/client/config", self.client_config, True),
            ("POST", "/client/dynamic_config",
             lambda r: json_response(types.ClientDynamicConfigResponse()), True),
            ("POST", "/create_session", self.create_session, True),
            ("POST", "/session_heartbeat", self.heartbeat, True),
            ("POST", "/sessions/" + segment.format("session_id") + "/finish", self.finish, True),
            ("GET", "/get_server_capabilities", lambda r: json_response(state.capabilities()),
             True),
            ("POST", "/telemetry", lambda r: json_response({"status": "accepted"}), True),
            ("POST", "/create_model", self.create_model, True),
            ("POST", "/get_info", self.get_info, True),
            ("POST", "/forward_backward", self.forward_backward, True),
            ("POST", "/optim_step", self.optim_step, True),
            ("POST", "/save_weights", self.save_weights, True),
            ("POST", "/save_weights_for_sampler", self.save_weights_for_sampler, True),
            ("POST", "/save_weights_external", self.save_weights_external, True),
            ("POST", "/load_weights", self.load_weights, True),
            ("POST", "/create_sampling_session", self.create_sampling_session, True),
            ("GET", "/samplers/" + segment.format("sampler_id"), self.get_sampler, True),
            ("POST", "/asample", self.sample, True),
            ("POST", "/retrieve_future", self.retrieve_future, True),
            ("GET", "/training_runs", self.list_training_runs, True),
            ("GET", run, self.get_training_run, True),
            ("GET", run + "/checkpoints", self.list_checkpoints, True),
            ("DELETE", checkpoint, self.delete_checkpoint, True),
            ("GET", checkpoint + "/external_weights_urls", self.external_weights_urls, True),
            ("GET", "/checkpoints", self.list_user_checkpoints, True),
            ("POST", "/weights_info", self.weights_info, True),
            ("GET", "/download/" + segment.format("model_id") + "/" + segment.format("name")
             + "/" + segment.format("file"), self.download, False),
        ]
        self.table = [(method, re.compile("/api/v1" + pattern), handler, needs_key)
                      for method, pattern, handler, needs_key in table]
        self.openai = OpenAIRoutes(state, auth)

    def handle(self, request: Request) -> Response:
        """Route a request: 404 for an unknown path, 405 for a known path and another method.

        Raises:
            RequestError: 401 (no valid key) or the handler's 4xx.
        """
        if request.path.startswith("/v1/"):
            return openai_response(self.openai.handle(request))
        known_path = False
        for method, pattern, handler, needs_key in self.table:
            match = pattern.fullmatch(request.path)
            if match is None:
                continue
            known_path = True
            if method != request.method:
                continue
            request.params = {k: unquote(v) for k, v in match.groupdict().items()}
            if needs_key:
                request.owner = self.auth.owner(request.headers.get(API_KEY_HEADER))
            return handler(request)
        if known_path:
            raise RequestError(405, f"{request.method} is not allowed on {request.path}")
        raise RequestError(404, f"no route {request.method} {request.path} in tinkerkit serve")

    # -- service

    def client_config(self, request: Request) -> Response:
        request.json(types.ClientConfigRequest)
        # API-key auth only; plain httpx transport; every result through retrieve_future.
        return json_response(types.ClientConfigResponse(
            pjwt_auth_enabled=False, use_pyqwest_transport=False, proto_compress_fwdbwd=False,
            sample_use_retrieve_futures=False, custom_loss_server_side=False,
            sample_join_sampling_session=False))

    def create_session(self, request: Request) -> Response:
        return json_response(self.state.create_session(request.owner,
                                                       request.json(types.CreateSessionRequest)))

    def heartbeat(self, request: Request) -> Response:
        body = request.json(types.SessionHeartbeatRequest)
        return json_response(self.state.heartbeat(request.owner, body.session_id))

    def finish(self, request: Request) -> Response:
        self.state.finish_session(request.owner, request.params["session_id"])
        return json_response({})

    # -- training

    def create_model(self, request: Request) -> Response:
        return future_response(self.state.create_model(request.owner,
                                                       request.json(types.CreateModelRequest)))

    def get_info(self, request: Request) -> Response:
        return json_response(self.state.get_info(request.owner,
                                                 request.json(types.GetInfoRequest)))

    def forward_backward(self, request: Request) -> Response:
        content_type = request.headers.get("Content-Type", "")
        if protobuf.PROTO_CONTENT_TYPE not in content_type:
            raise RequestError(400, f"forward_backward takes a protobuf body "
                                    f"({protobuf.PROTO_CONTENT_TYPE}), got '{content_type}'")
        body = protobuf.decompress(request.body, request.headers.get("Content-Encoding"))
        msg = protobuf.parse_forward_backward(body)
        try:
            fwd_bwd = protobuf.forward_backward_request(msg)
        except RequestError as e:
            self.state.refuse(request.owner, msg.model_id, msg.seq_id, e)
            raise
        return future_response(self.state.forward_backward(request.owner, fwd_bwd,
                                                           msg.forward_only))

    def ordered_json(self, request: Request, model: type[pydantic.BaseModel]) -> Any:
        """The body of a model's request numbered by ``seq_id``, validated as ``model``.

        Raises:
            RequestError: 400 as :meth:`Request.json`; the request's ``seq_id`` is consumed
                when its ``model_id`` and ``seq_id`` are readable (:meth:`ServerState.refuse`).
        """
        try:
            return request.json(model)
        except RequestError as e:
            try:
                data = json.loads(request.body)
            except (ValueError, RecursionError):
                data = None
            if isinstance(data, dict):
                self.state.refuse(request.owner, data.get("model_id"), data.get("seq_id"), e)
            raise

    def optim_step(self, request: Request) -> Response:
        body = self.ordered_json(request, types.OptimStepRequest)
        return future_response(self.state.optim_step(request.owner, body))

    def save_weights(self, request: Request) -> Response:
        body = self.ordered_json(request, types.SaveWeightsRequest)
        return future_response(self.state.save_weights(request.owner, body))

    def save_weights_for_sampler(self, request: Request) -> Response:
        body = self.ordered_json(request, types.SaveWeightsForSamplerRequest)
        return future_response(self.state.save_weights_for_sampler(request.owner, body))

    def save_weights_external(self, request: Request) -> Response:
        body = self.ordered_json(request, types.SaveWeightsExternalRequest)
        return future_response(self.state.save_weights_external(request.owner, body))

    def load_weights(self, request: Request) -> Response:
        body = self.ordered_json(request, types.LoadWeightsRequest)
        return future_response(self.state.load_weights(request.owner, body))

    # -- sampling

    def create_sampling_session(self, request: Request) -> Response:
        body = request.json(types.CreateSamplingSessionRequest)
        return json_response(self.state.create_sampling_session(request.owner, body))

    def get_sampler(self, request: Request) -> Response:
        return json_response(self.state.get_sampler(request.owner, request.params["sampler_id"]))

    def sample(self, request: Request) -> Response:
        return future_response(self.state.sample(request.owner,
                                                 request.json(types.SampleRequest)))

    # -- futures

    def retrieve_future(self, request: Request) -> Response:
        body = request.json(types.FutureRetrieveRequest)
        future = self.state.futures.get(body.request_id, request.owner)
        if future is None:
            raise RequestError(404, f"future '{body.request_id}' not found (unknown, expired or "
                                    "another key's)")
        if not future.wait(self.long_poll_seconds):
            return json_response(TryAgainResponse(request_id=future.request_id,
                                                  queue_state="active"))
        if future.error is not None:
            message, category = future.error
            return json_response(types.RequestFailedResponse(error=message, category=category))
        result = future.result
        if isinstance(result, types.ForwardBackwardOutput):
            return Response(body=protobuf.encode_forward_backward_output(result),
                            content_type=protobuf.PROTO_CONTENT_TYPE)
        if isinstance(result, types.SampleResponse):
            return Response(body=protobuf.encode_sample_response(result),
                            content_type=protobuf.PROTO_CONTENT_TYPE)
        return json_response(result)

    # -- runs and checkpoints

    def list_training_runs(self, request: Request) -> Response:
        return json_response(self.state.list_training_runs(
            request.owner, request.int_query("limit", 20), request.int_query("offset", 0, 10**9)))

    def get_training_run(self, request: Request) -> Response:
        return json_response(self.state.get_training_run(request.owner,
                                                         request.params["model_id"]))

    def list_checkpoints(self, request: Request) -> Response:
        return json_response(self.state.list_checkpoints(request.owner,
                                                         request.params["model_id"]))

    def list_user_checkpoints(self, request: Request) -> Response:
        return json_response(self.state.list_user_checkpoints(
            request.owner, request.int_query("limit", 100), request.int_query("offset", 0, 10**9)))

    def delete_checkpoint(self, request: Request) -> Response:
        params = request.params
        self.state.delete_checkpoint(request.owner, params["model_id"],
                                     f"{params['segment']}/{params['name']}")
        return json_response({})

    def weights_info(self, request: Request) -> Response:
        body = request.json(_WeightsInfoRequest)
        return json_response(self.state.weights_info(request.owner, body.tinker_path))

    def external_weights_urls(self, request: Request) -> Response:
        params = request.params
        return json_response(self.state.external_weights_urls(
            request.owner, params["model_id"], f"{params['segment']}/{params['name']}",
            self.auth.sign, request.base_url))

    def download(self, request: Request) -> Response:
        params = request.params
        try:
            expires = int(request.query.get("expires", ["0"])[0])
        except ValueError:
            expires = 0
        signature = request.query.get("signature", [""])[0]
        message = download_message(params["model_id"], params["name"], params["file"], expires)
        if not self.auth.verify(message, signature) or expires < time.time():
            raise RequestError(403, "download URL is invalid or expired; ask for new URLs with "
                                    "get_external_weights_urls")
        path = self.state.download_file(params["model_id"], params["name"], params["file"])
        return Response(content_type="application/octet-stream", file=path)


class _ClientGone(Exception):
    """The connection broke while a request body was read; there is no one to answer."""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "tinkerkit-serve"
    timeout = 120  # seconds an idle keep-alive connection is kept
    # Headers and body leave in separate writes; with Nagle's algorithm the body would wait for
    # the client's delayed ACK (40 ms on Linux) on every response.
    disable_nagle_algorithm = True
    server: TinkerHTTPServer

    def do_GET(self) -> None:  # noqa: N802 - the http.server naming
        self._dispatch()

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch()

    def do_DELETE(self) -> None:  # noqa: N802
        self._dispatch()

    # Methods no route takes: 405 on a known path, 404 elsewhere (http.server would say 501).
    do_PUT = do_PATCH = do_OPTIONS = do_HEAD = do_DELETE  # noqa: N815

    def send_error(self, code: int, message: str | None = None,
                   explain: str | None = None) -> None:
        """http.server's own refusals (a malformed request line, too long or too many
        headers, ...) as the JSON ``{"detail": ...}`` every other error has."""
        self.close_connection = True
        if self.request_version == "HTTP/0.9":  # an unreadable request line: answer with headers
            self.request_version = "HTTP/1.0"
        reason = self.responses.get(code, ("Error",))[0]
        body = json.dumps({"detail": message or reason}).encode("utf-8")
        self.send_response(code, reason)
        self.send_header("Connection", "close")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            self.close_connection = True  # the unread body would corrupt the next request
            raise RequestError(411, "chunked request bodies are not supported; send Content-Length")
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError as e:
            self.close_connection = True
            raise RequestError(400, "Content-Length is not an integer") from e
        if length < 0:
            self.close_connection = True
            raise RequestError(400, "Content-Length is negative")
        proto = protobuf.PROTO_CONTENT_TYPE in self.headers.get("Content-Type", "")
        limit = protobuf.MAX_MESSAGE_BYTES if proto else MAX_JSON_BODY_BYTES
        if length > limit:
            self.close_connection = True
            raise RequestError(413, f"request body of {length} bytes is over the {limit} byte "
                                    f"limit of {'protobuf' if proto else 'JSON'} bodies")
        try:
            return self.rfile.read(length)
        except OSError as e:  # the client went away or stalled mid-body
            raise _ClientGone from e

    def _client_gone(self) -> bool:
        """Whether the client closed the connection: it is readable and a peek reads nothing
        (a pipelined next request reads bytes: the client is still there)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and not self.connection.recv(1, socket.MSG_PEEK)
        except (OSError, ValueError):  # reset, or already closed
            return True

    def _dispatch(self) -> None:
        start = time.perf_counter()
        url = urlsplit(self.path)
        address, port = self.server.server_address[:2]
        try:
            request = Request(self.command, url.path, parse_qs(url.query), self.headers,
                              self._read_body(),
                              base_url=f"http://{self.headers.get('Host') or f'{address}:{port}'}",
                              client_gone=self._client_gone)
            response = self.server.routes.handle(request)
        except _ClientGone:
            self.close_connection = True
            return
        except RequestError as e:
            response = error_response(url.path, e)
        except Exception as e:  # a bug: answer 500, keep serving
            log.exception("unexpected error in %s %s", self.command, url.path)
            response = error_response(url.path, RequestError(
                500, f"internal error: {type(e).__name__}: {e}"))
        try:
            self._send(response)
        except OSError:  # the client stopped waiting (a cancelled long poll): nothing to do
            self.close_connection = True
        level = logging.DEBUG if response.status < 400 else logging.INFO
        log.log(level, "%s %s -> %d (%.1f ms)", self.command, url.path, response.status,
                1000 * (time.perf_counter() - start))

    def _send(self, response: Response) -> None:
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        if response.status >= 400:
            self.send_header("x-should-retry", "true" if response.status >= 500 else "false")
        if response.stream is not None:
            self._send_stream(response.stream)
            return
        if response.file is not None:
            self.send_header("Content-Length", str(response.file.stat().st_size))
            self.end_headers()
            if self.command != "HEAD":
                with open(response.file, "rb") as f:
                    shutil.copyfileobj(f, self.wfile)
            return
        self.send_header("Content-Length", str(len(response.body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(response.body)

    def _send_stream(self, stream: Iterator[bytes]) -> None:
        """Send ``stream`` in chunks (RFC 9112 section 7.1), each as soon as it is made; a client
        that goes away closes the stream (which stops its generation)."""
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            for chunk in stream:
                if chunk:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()

    def log_message(self, format: str, *args: Any) -> None:
        """Silence http.server's own access log (see ``_dispatch`` for ours)."""


class TinkerHTTPServer(ThreadingHTTPServer):
    """The server: ``serve_forever()`` in a thread, ``shutdown()`` then ``server_close()``.

    ``server_close`` also releases every session (models freed; checkpoints stay on disk).
    """

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], state: ServerState, auth: Authenticator,
                 long_poll_seconds: float = LONG_POLL_SECONDS) -> None:
        # Set before binding: a failed bind calls server_close, which needs them.
        self.state = state
        self._stop = threading.Event()
        super().__init__(address, _Handler)
        self.routes = Routes(state, auth, long_poll_seconds)
        self._reaper = threading.Thread(target=self._reap, name="tinkerkit-reaper", daemon=True)
        self._reaper.start()

    def _reap(self) -> None:
        while not self._stop.wait(REAPER_INTERVAL_SECONDS):
            self.state.release_idle_sessions()

    def server_close(self) -> None:
        self._stop.set()
        super().server_close()
        self.state.close()


def make_server(host: str = "127.0.0.1", port: int = 8000, root: str | Path | None = None,
                models_file: str | Path | None = None, api_keys_file: str | Path | None = None,
                device: str = "auto", long_poll_seconds: float = LONG_POLL_SECONDS
                ) -> TinkerHTTPServer:
    """Build (and bind) a ``tinkerkit serve`` server.

    Args:
        host: Address to bind; a non-loopback address requires ``api_keys_file``.
        port: TCP port; 0 picks a free one (read it from ``server.server_port``).
        root: Directory of runs and checkpoints (default ``<tinkerkit cache>/serve``).
        models_file: Models file (see :mod:`tinkerkit.serve.registry`), or None.
        api_keys_file: Accepted API keys, one per line, or None (any ``tml-`` key, loopback
            only).
        device: Engine device (``auto``: CUDA when available).
        long_poll_seconds: Longest wait of one ``retrieve_future``.

    Returns:
        The bound server; run ``serve_forever()``.

    Raises:
        ConfigError: A non-loopback host without API keys, a bad models / keys file, or an
            address that cannot be bound (the port is in use, the host is not this machine's).

    Example::

        server = make_server(port=0, root="serve_root")
        threading.Thread(target=server.serve_forever, daemon=True).start()
        client = tinker.ServiceClient(base_url=f"http://127.0.0.1:{server.server_port}",
                                      api_key="tml-local")
    """
    loopback = is_loopback(host)
    if not loopback and api_keys_file is None:
        raise ConfigError(f"binding {host} (not a loopback address) requires --api-keys FILE")
    keys = read_api_keys(api_keys_file) if api_keys_file is not None else None
    served = read_models_file(models_file) if models_file is not None else {}
    store = CheckpointStore(root if root is not None else cache_dir() / "serve")
    state = ServerState(store, ModelRegistry(served, allow_paths=loopback), device=device)
    try:
        return TinkerHTTPServer((host, port), state, Authenticator(keys), long_poll_seconds)
    except OSError as e:
        hint = " (another server listens there: stop it or pick another --port)" if (
            e.errno == errno.EADDRINUSE) else ""
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror or e}{hint}") from None
