"""The Tinker engine: the official ``tinker`` SDK (pinned 0.38.0), hosted or ``tinkerkit serve``.

:func:`create_training_client` turns a :class:`~tinkerkit.config.TrainConfig` into an SDK
training client, wrapped in :class:`TinkerTrainingClient`, which offers the calls the training
loop makes (the same surface as :class:`~tinkerkit.engines.local.LocalTrainingClient`), so that
one loop runs on both engines::

    ServiceClient(base_url, api_key)
      .create_lora_training_client(base_model, rank, seed, train_mlp, train_attn, train_unembed)
      .create_training_client_from_state_with_optimizer(path)   # --resume: exact
      .create_training_client_from_state(path)                  # --init-from: new stage, no optimizer
      .create_sampling_client(model_path="tinker://...")        # tinkerkit eval --checkpoint tinker://

The SDK's calls return futures at once and run in submission order on the server, so the loop
keeps its pipelining: the next ``forward_backward`` is submitted before the previous result is
awaited.

The server: ``TINKER_BASE_URL`` (the config key, which defaults to the environment variable of
the same name), else the hosted service. The API key: the environment variable
``TINKER_API_KEY`` only (never a config key, never the SDK's stored credentials); it is never
printed, logged or written, and errors coming out of the SDK are re-raised as one-line
:class:`~tinkerkit.errors.EngineError` messages with the key scrubbed and the SDK's exception
chain dropped.

LoRA on Tinker: ``LORA_TARGETS`` maps to the SDK's ``train_attn``/``train_mlp`` switches
(``attention``, ``mlp``, ``all-linear``), ``TRAIN_UNEMBED`` to ``train_unembed``; Tinker sets
no alpha, no dropout and no per-module targets, so ``LORA_ALPHA``, ``LORA_DROPOUT > 0`` and a
module list are refused rather than ignored. ``DEVICE`` and ``DTYPE`` describe the local
engine and do not apply.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import time
import weakref
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from tinker import types

from tinkerkit import models
from tinkerkit.archive import MAX_EXTRACTED_BYTES, extract_tar, is_archive_name, safe_relative_path
from tinkerkit.checkpoint import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    is_tinker_path,
    parse_tinker_path,
)
from tinkerkit.config import TrainConfig
from tinkerkit.engines.local.model import preset_switches
from tinkerkit.errors import (
    NON_FINITE_GRADIENT,
    CheckpointError,
    ConfigError,
    EngineError,
    ModelError,
    NonFiniteGradientError,
)
from tinkerkit.files import atomic_write_json

API_KEY_ENV = "TINKER_API_KEY"
EXPORT_TTL_SECONDS = 3600
"""Lifetime of the temporary external-weights copy made to download a training checkpoint (the
shortest TTL the service accepts); it is deleted after the download."""
_KEY_PATTERN = re.compile(r"tml-[A-Za-z0-9_\-]+")
_PROXY_VARIABLES = ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY")
UNREACHABLE_SECONDS = 60.0
"""How long a call waits on a server that accepts no TCP connection before it fails. The SDK
itself retries a lost connection for as long as the caller waits: without this, a run whose
server stopped waited forever."""
POLL_SECONDS = 5.0
"""How often a waiting call checks that the server still accepts connections."""
HEALTH_TIMEOUT_SECONDS = 10.0
"""How long check_reachable waits for the health route's answer."""
UNAVAILABLE_SECONDS = 30.0
"""How long check_reachable goes on asking a server that answers its first request with 5xx,
408 or 429 (which the SDK retries for minutes at every call) before it fails."""


# -- credentials and errors -------------------------------------------------------------------

def api_key() -> str:
    """The API key from ``$TINKER_API_KEY``.

    Raises:
        ConfigError: The variable is unset, or does not hold a key of Tinker's form (``tml-...``
            or a JWT); the message never contains the value.
    """
    key = os.environ.get(API_KEY_ENV, "").strip()
    if not key:
        raise ConfigError(f"the Tinker engine needs the environment variable {API_KEY_ENV} (a "
                          "key from the Tinker console; for your own `tinkerkit serve` on "
                          "127.0.0.1 any key of the form tml-...)")
    if not key.startswith(("tml-", "eyJ")):
        raise ConfigError(f"{API_KEY_ENV} does not hold a Tinker API key (they start with 'tml-')")
    if not (key.isascii() and key.isprintable()) or any(c.isspace() for c in key):
        # the SDK cannot put such a key in a header, and then hangs instead of failing
        raise ConfigError(f"{API_KEY_ENV} holds a space, a control character or a non-ASCII "
                          "character, which an HTTP header cannot carry; copy the key again")
    return key


def scrub(text: str) -> str:
    """``text`` with the API key (and anything shaped like a Tinker key) replaced by ``tml-***``."""
    key = os.environ.get(API_KEY_ENV, "").strip()
    if len(key) >= 4:
        text = text.replace(key, "tml-***")
    return _KEY_PATTERN.sub("tml-***", text)


def engine_error(error: BaseException, action: str) -> EngineError:
    """A one-line, key-free :class:`EngineError` for an exception raised by the SDK.

    A failed request whose message reports a skipped step on a NaN/inf gradient norm
    (``tinkerkit serve``'s local engine, :data:`tinkerkit.errors.NON_FINITE_GRADIENT`) becomes a
    :class:`~tinkerkit.errors.NonFiniteGradientError`, so the loop reports divergence; every
    other failure (connection, HTTP status, server error) stays a plain ``EngineError``.

    Args:
        error: What the SDK raised (``tinker.APIStatusError``, ``APIConnectionError``, ...).
        action: What was being done, e.g. ``"forward_backward"``.
    """
    import tinker

    if isinstance(error, EngineError):
        return error
    if (isinstance(error, tinker.RequestFailedError)
            and (refused := NON_FINITE_GRADIENT.search(error.message)) is not None):
        # tinkerkit serve skipped a step on a NaN/inf gradient norm (the local engine's words)
        return NonFiniteGradientError(f"Tinker {action}: {refused.group(0)}")
    if isinstance(error, tinker.APIStatusError):
        detail = error.body.get("detail", error.body) if isinstance(error.body, dict) else error.body
        text = f"the Tinker server answered {error.status_code}: {detail or error.message}"
    elif isinstance(error, tinker.APIConnectionError):
        text = f"cannot reach the Tinker server ({error})"
    else:
        text = f"{type(error).__name__}: {error}"
    return EngineError(scrub(f"Tinker {action}: " + " ".join(str(text).split())))


class TinkerFuture:
    """A future of an SDK call whose failure comes out as a scrubbed :class:`EngineError`.

    Args:
        future: The SDK's ``APIFuture`` (or any object with ``result(timeout)``).
        action: The call's name, for error messages.
        on_error: Called once with the error when the call fails (the client records it, to
            finish its session as ``errored``).
        server: The server's URL: waiting without a timeout fails once it has accepted no
            connection for :data:`UNREACHABLE_SECONDS` (see :func:`wait_for`); None waits as
            the SDK does.
    """

    def __init__(self, future: Any, action: str, on_error=None, server: str | None = None) -> None:
        self._future, self._action, self._on_error = future, action, on_error
        self._server = server

    def result(self, timeout: float | None = None) -> Any:
        """The call's response (a ``tinker.types`` object).

        Raises:
            EngineError: The call failed, or the server stopped accepting connections (message
                without the API key).
        """
        try:
            return wait_for(self._future, self._action, self._server, timeout)
        except Exception as e:
            error = engine_error(e, self._action)
            if self._on_error is not None:
                self._on_error(error)
            raise error from None

    def done(self) -> bool:
        """Whether the call has finished."""
        return _is_done(self._future)


def _is_done(future: Any) -> bool:
    inner = getattr(future, "future", None)  # the SDK's futures wrap a concurrent.futures.Future
    if callable(inner):
        try:
            return bool(inner().done())
        except Exception:
            return False
    done = getattr(future, "done", None)
    return bool(done()) if callable(done) else False


def wait_for(future: Any, action: str, server: str | None, timeout: float | None = None) -> Any:
    """``future.result(timeout)``; without a timeout, fail when the server has gone away.

    The SDK retries a lost connection for as long as its caller waits, so a run whose server
    stopped (or whose network went down) waited forever. Here a wait without a timeout checks,
    every :data:`POLL_SECONDS`, that the server still accepts a TCP connection, and fails once
    it has accepted none for :data:`UNREACHABLE_SECONDS`. Skipped when ``server`` is None or a
    proxy is configured (the connection then goes through the proxy).

    Raises:
        EngineError: The server accepted no connection for :data:`UNREACHABLE_SECONDS`.
        Exception: Whatever the future raises.
    """
    if timeout is not None or server is None or _proxied():
        return future.result(timeout)
    down_since: float | None = None
    while True:
        try:
            return future.result(POLL_SECONDS)
        except TimeoutError:  # concurrent.futures.TimeoutError is this one since Python 3.11
            if _is_done(future):  # finished meanwhile, or failed with a timeout of its own
                return future.result(0)
        reason = _connect_error(server)
        if reason is None:
            down_since = None
            continue
        now = time.monotonic()
        down_since = now if down_since is None else down_since
        if now - down_since >= UNREACHABLE_SECONDS:
            raise EngineError(f"Tinker {action}: cannot reach the Tinker server at "
                              f"{_address(server)} for {UNREACHABLE_SECONDS:.0f} s ({reason}); "
                              "it stopped, or the network is down")


def _call(action: str, fn, *args: Any, **kwargs: Any) -> Any:
    """Run a synchronous SDK call (client creation), translating its errors."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:
        raise engine_error(e, action) from None


# -- connection -------------------------------------------------------------------------------

class _LongPollNotice(logging.Filter):
    """Drop the SDK's warning for each long poll that ends before its result is ready.

    ``tinker.lib.api_future_impl`` logs "Retrying request ... because of try_again" at WARNING
    every time a server answers a future's long poll with ``try_again`` (a step or a sample
    that takes longer than one poll); with no logging configured, Python prints each one. It
    is the protocol working, not a problem; the SDK's other warnings pass.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "because of try_again" not in record.getMessage()


class _NoTraceback(logging.Filter):
    """Keep a record's message, drop its traceback.

    ``tinker.lib.telemetry`` logs "Dropping telemetry batch that failed to send" with the whole
    exception chain (some 80 lines) each time a batch fails, that is every few seconds while
    the server is unreachable; the one line says what happened.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        record.exc_info, record.exc_text = None, None
        return True


def quiet_long_polls() -> None:
    """Install :class:`_LongPollNotice` on the SDK's future logger, and :class:`_NoTraceback`
    on its telemetry logger (once)."""
    for name, kind in (("tinker.lib.api_future_impl", _LongPollNotice),
                       ("tinker.lib.telemetry", _NoTraceback)):
        sdk_logger = logging.getLogger(name)
        if not any(isinstance(f, kind) for f in sdk_logger.filters):
            sdk_logger.addFilter(kind())


def resolved_base_url(base_url: str | None) -> str:
    """The server the SDK talks to: ``base_url``, else ``$TINKER_BASE_URL``, else the hosted
    service (the SDK's own resolution)."""
    from tinker.lib.base_url import resolve_base_url

    return resolve_base_url(base_url)


def _proxied() -> bool:
    return any(os.environ.get(name) or os.environ.get(name.lower()) for name in _PROXY_VARIABLES)


def _address(base_url: str) -> str:
    parts = urlsplit(base_url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"{parts.scheme}://{parts.hostname}:{port}"


def _connect_error(base_url: str, timeout_seconds: float = 5.0) -> str | None:
    """Why no TCP connection to the URL's host and port opens; None when one does."""
    parts = urlsplit(base_url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout_seconds).close()
    except OSError as e:
        return str(e.strerror or e)
    return None


def check_reachable(base_url: str, timeout_seconds: float = 5.0, key: str | None = None) -> None:
    """Fail in seconds, not after the SDK's retries, when nothing listens there, what listens
    is not a Tinker server, or the server answers but serves nothing.

    Three checks: a TCP connection to the URL's host and port, then ``GET /api/v1/healthz`` (the
    Tinker API's health route, answered without a key by the hosted service and by
    ``tinkerkit serve``), then, with ``key``, the SDK's own first request (``POST
    /api/v1/client/config``). Another web server (a `python -m http.server`, a proxy's error
    page) answers the health route with 404/405/501 or with something that is not JSON, and the
    SDK would retry its requests to it forever. A server (or the proxy in front of it) that
    answers its requests with 5xx, 408 or 429 is asked again for :data:`UNAVAILABLE_SECONDS`
    (a restart passes), then fails: the SDK would retry each call for minutes. Any other
    answer (200, or a 401 the SDK reports) passes. Skipped when a proxy is configured (the SDK
    then connects through it, not directly).

    Raises:
        EngineError: No TCP connection to the URL's host and port, the server there does not
            answer the health route as a Tinker server does, or it answers requests with an
            error status for :data:`UNAVAILABLE_SECONDS`; one line naming the URL (and the
            status).
    """
    if _proxied():
        return
    reason = _connect_error(base_url, timeout_seconds)
    if reason is None:
        reason = _not_tinker(base_url, HEALTH_TIMEOUT_SECONDS)
    if reason is None and key is not None:
        _check_serving(base_url, key)
        return
    if reason is not None:
        hint = (" (is `tinkerkit serve` running there? set TINKER_BASE_URL)"
                if urlsplit(base_url).hostname in ("127.0.0.1", "localhost", "::1") else "")
        raise EngineError(f"cannot reach the Tinker server at {_address(base_url)}: "
                          f"{reason}{hint}")


def _not_tinker(base_url: str, timeout_seconds: float) -> str | None:
    """Why the server at ``base_url`` is not a Tinker API server; None when it may be one."""
    url = base_url.rstrip("/") + "/api/v1/healthz"
    try:
        response = httpx.get(url, timeout=timeout_seconds, follow_redirects=False)
    except httpx.TimeoutException:
        return f"no answer to GET {url} within {timeout_seconds:.0f} s; is it a Tinker server?"
    except httpx.HTTPError as e:
        return f"GET {url} failed ({type(e).__name__}: {e}); is it a Tinker server?"
    if response.status_code in (401, 403) or response.status_code >= 500 \
            and response.status_code != 501:
        return None  # an API that wants a key, or one failing now: the SDK reports it
    try:
        response.json()
        is_json = response.is_success
    except ValueError:
        is_json = False
    if is_json:
        return None
    return (f"a web server that is not Tinker answers there (GET {url}: HTTP "
            f"{response.status_code}{'' if response.is_success else ' ' + response.reason_phrase}"
            f"{', not JSON' if response.is_success else ''})")


def _check_serving(base_url: str, key: str) -> None:
    """Fail when the server at ``base_url`` answers ``POST /api/v1/client/config`` (the SDK's
    first request; the key in the ``X-API-Key`` header, as the SDK sends it) with 5xx, 408 or
    429, or not at all, for :data:`UNAVAILABLE_SECONDS`.

    Raises:
        EngineError: One line naming the URL and the last status.
    """
    import tinker

    route = "/api/v1/client/config"
    body = types.ClientConfigRequest(sdk_version=tinker.__version__).model_dump()
    deadline = time.monotonic() + UNAVAILABLE_SECONDS
    while True:
        try:
            response = httpx.post(base_url.rstrip("/") + route, json=body,
                                  headers={"X-API-Key": key}, timeout=HEALTH_TIMEOUT_SECONDS,
                                  follow_redirects=False)
            status = f"HTTP {response.status_code} {response.reason_phrase}".rstrip()
            if not (response.status_code in (408, 429) or response.status_code >= 500):
                return
        except httpx.TimeoutException:
            status = f"no answer within {HEALTH_TIMEOUT_SECONDS:.0f} s"
        except httpx.HTTPError as e:  # the connection dropped: the SDK would retry it for minutes
            status = f"{type(e).__name__}: {e}"
        if time.monotonic() >= deadline:
            raise EngineError(scrub(
                f"the Tinker server at {_address(base_url)} answers POST {route} with {status} "
                f"(for {UNAVAILABLE_SECONDS:.0f} s): it is up but serves no request; try again "
                "later, or check the server"))
        time.sleep(min(2.0, max(0.0, deadline - time.monotonic())))


_SERVERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""The URL of each ``ServiceClient`` / ``RestClient`` made by :func:`connect` and
:func:`rest_client`, for :func:`wait_for`."""


def server_of(client: Any) -> str | None:
    """The URL an SDK client made here talks to (None for one made elsewhere)."""
    try:
        return _SERVERS.get(client)
    except TypeError:
        return None


def _remember(client: Any, url: str) -> Any:
    try:
        _SERVERS[client] = url
    except TypeError:  # not weakly referenceable: its waits go without the check
        pass
    return client


def connect(base_url: str | None):
    """A ``tinker.ServiceClient`` for ``base_url`` with the key from ``$TINKER_API_KEY``.

    Raises:
        ConfigError: No usable API key.
        EngineError: The server cannot be reached.
    """
    import tinker

    key = api_key()
    url = resolved_base_url(base_url)
    check_reachable(url, key=key)
    quiet_long_polls()
    return _remember(tinker.ServiceClient(base_url=url, api_key=key), url)


def rest_client(base_url: str | None):
    """A ``tinker.RestClient`` (checkpoint listing, download URLs) for ``base_url``."""
    import tinker

    key = api_key()
    url = resolved_base_url(base_url)
    check_reachable(url, key=key)
    quiet_long_polls()
    return _remember(tinker.RestClient(base_url=url, api_key=key), url)


def _create(service, action: str, create):
    """Await an SDK client-creation future; on failure finish the session and raise."""
    try:
        return _call(action, lambda: wait_for(create(), action, server_of(service)))
    except EngineError:
        _close_service(service, {"failed": True})
        raise


def _close_service(service, state: dict) -> None:
    """Finish the SDK session (``success`` unless a call failed), at most a few seconds; not
    at all when its server accepts no connection (the session times out there anyway)."""
    server = server_of(service)
    if server is not None and not _proxied() and _connect_error(server, 1.0) is not None:
        return
    try:
        service.close("errored" if state["failed"] else "success").result(timeout=10)
    except Exception:  # the session times out on the server anyway
        pass


class _Session:
    """A ``ServiceClient`` finished when its owner is closed or garbage-collected."""

    def __init__(self, owner: object, service) -> None:
        self.service = service
        self.state = {"failed": False}
        self._finalizer = weakref.finalize(owner, _close_service, service, self.state)

    def failed(self, error: BaseException) -> None:
        self.state["failed"] = True

    def close(self) -> None:
        self._finalizer()


# -- tokenizers -------------------------------------------------------------------------------

def load_tinker_tokenizer(base_model: str, tokenizer_id: str | None = None):
    """The tokenizer of a Tinker base model, offline when tinkerkit knows the model.

    Order: a local model directory or a name the registry knows offline
    (:func:`tinkerkit.models.offline_tokenizer`: registry names, their hub ids and
    :data:`tinkerkit.models.TOKENIZER_ALIASES`); else, when the Hugging Face hub answers, the
    SDK's own lookup, the one ``TrainingClient.get_tokenizer`` runs (with the SDK's substitutions
    for gated models; ``tokenizer_id`` is the server's hint from ``get_info``); else the local
    Hugging Face cache (in seconds, rather than the hub client's retries).

    Raises:
        ModelError: None of these has the tokenizer.
    """
    if models.offline_tokenizer(base_model) or Path(base_model).expanduser().is_dir():
        return models.load_tokenizer(base_model)
    if not models.hub_reachable():
        return models.load_tokenizer(base_model)  # the HF cache, or a one-line offline error
    from tinker.lib.public_interfaces.sampling_client import _load_tokenizer_from_model_info

    try:
        return _load_tokenizer_from_model_info(base_model, tokenizer_id)
    except Exception as e:
        raise ModelError(f"no offline tokenizer for Tinker base model '{base_model}', and the "
                         f"SDK could not load one ({type(e).__name__}: "
                         f"{' '.join(str(e).split())[:300]}); add it to "
                         "tinkerkit.models.TOKENIZER_ALIASES or make the hub reachable") from None


# -- sampling ---------------------------------------------------------------------------------

class TinkerSamplingClient:
    """An SDK ``SamplingClient`` with the surface evaluation uses (``sample``, ``close``).

    Args:
        client: The SDK's ``SamplingClient``.
        base_model: Its base model name (for the tokenizer).
        service: The ``ServiceClient`` whose session this client owns and finishes on
            :meth:`close` (or when collected); None when a training client owns the session.
        tokenizer: The tokenizer, when the caller has it already.
    """

    def __init__(self, client, base_model: str, service=None, tokenizer=None,
                 server: str | None = None) -> None:
        self.client, self.base_model = client, base_model
        self._session = _Session(self, service) if service is not None else None
        self._tokenizer = tokenizer
        self._server = server_of(service) if service is not None else server

    def sample(self, prompt: types.ModelInput, num_samples: int,
               sampling_params: types.SamplingParams, **kwargs: Any) -> TinkerFuture:
        """``SamplingClient.sample``; the future's ``result()`` is a ``SampleResponse``."""
        on_error = self._session.failed if self._session else None
        future = _call("sample", self.client.sample, prompt=prompt, num_samples=num_samples,
                       sampling_params=sampling_params, **kwargs)
        return TinkerFuture(future, "sample", on_error, self._server)

    def compute_logprobs(self, prompt: types.ModelInput) -> TinkerFuture:
        """``SamplingClient.compute_logprobs``: per-token log-probabilities of the prompt."""
        return TinkerFuture(_call("compute_logprobs", self.client.compute_logprobs, prompt),
                            "compute_logprobs", server=self._server)

    def get_tokenizer(self):
        """The base model's tokenizer (see :func:`load_tinker_tokenizer`)."""
        if self._tokenizer is None:
            self._tokenizer = load_tinker_tokenizer(self.base_model)
        return self._tokenizer

    def close(self) -> None:
        """Finish the session this client owns (nothing when a training client owns it)."""
        if self._session is not None:
            self._session.close()


def create_sampling_client(model_path: str | None, base_url: str | None,
                           base_model: str | None = None) -> TinkerSamplingClient:
    """A sampling client in a session of its own: on the weights at a ``tinker://`` path, or on
    a base model the server serves (``model_path`` None).

    Raises:
        ConfigError: No usable API key.
        EngineError: The server cannot be reached or refuses the path or model.
    """
    service = connect(base_url)
    sdk_client = _create(service, "create_sampling_client",
                         lambda: service.create_sampling_client(model_path=model_path,
                                                                base_model=base_model))
    return TinkerSamplingClient(sdk_client, sdk_client.get_base_model(), service)


# -- training ---------------------------------------------------------------------------------

def lora_options(config: TrainConfig) -> dict[str, bool]:
    """The SDK's ``train_attn``/``train_mlp``/``train_unembed`` switches for ``config``.

    Raises:
        ConfigError: A LoRA setting Tinker does not offer (alpha, dropout, a module list).
    """
    problems = []
    if config.lora_alpha is not None:
        problems.append(f"LORA_ALPHA={config.lora_alpha} (Tinker sets the LoRA scale itself; "
                        "leave it None)")
    if config.lora_dropout:
        problems.append(f"LORA_DROPOUT={config.lora_dropout} (Tinker trains without dropout)")
    switches = preset_switches(config.lora_targets)
    if switches is None:
        problems.append(f"LORA_TARGETS={config.lora_targets!r} (Tinker takes attention, mlp or "
                        "all-linear)")
    if problems:
        raise ConfigError("BACKEND=tinker does not support " + "; ".join(problems))
    train_attn, train_mlp = switches
    return {"train_attn": train_attn, "train_mlp": train_mlp,
            "train_unembed": config.train_unembed}


class TinkerTrainingClient:
    """An SDK ``TrainingClient`` with the surface of the local engine's training client.

    Every call returns a :class:`TinkerFuture` at once; the SDK runs the calls on the server in
    submission order. The session is finished (``success``, or ``errored`` after a failed call)
    by :meth:`close`, or when this object is garbage-collected.

    Args:
        service: The ``tinker.ServiceClient`` that owns the session.
        client: The SDK's ``TrainingClient``.
    """

    def __init__(self, service, client) -> None:
        self.client = client
        self._session = _Session(self, service)
        info = client.get_info()
        self.base_model = info.model_data.model_name or ""
        self.rank = info.lora_rank
        self._tokenizer_id = info.model_data.tokenizer_id
        self._tokenizer = None

    def _future(self, action: str, future: Any) -> TinkerFuture:
        return TinkerFuture(future, action, self._session.failed, server_of(self._session.service))

    def _submit(self, action: str, fn, *args: Any, **kwargs: Any) -> TinkerFuture:
        return self._future(action, _call(action, fn, *args, **kwargs))

    def forward_backward(self, data: list[types.Datum], loss_fn: str = "cross_entropy",
                         loss_fn_config: dict | None = None) -> TinkerFuture:
        """Forward and backward pass; gradients add up on the server until :meth:`optim_step`.

        Returns:
            Future of ``ForwardBackwardOutput`` (``metrics["loss:sum"]``, per-datum
            ``loss_fn_outputs[i]["logprobs"]``).
        """
        return self._submit("forward_backward", self.client.forward_backward, data, loss_fn,
                            loss_fn_config)

    def forward(self, data: list[types.Datum], loss_fn: str = "cross_entropy",
                loss_fn_config: dict | None = None) -> TinkerFuture:
        """Like :meth:`forward_backward`, without gradients."""
        return self._submit("forward", self.client.forward, data, loss_fn, loss_fn_config)

    def optim_step(self, optim_params: types.AdamParams | None = None, *,
                   adam_params: types.AdamParams | None = None) -> TinkerFuture:
        """One AdamW step on the accumulated gradients (future of ``OptimStepResponse``)."""
        return self._submit("optim_step", self.client.optim_step, optim_params,
                            adam_params=adam_params)

    def save_state(self, name: str) -> TinkerFuture:
        """Save weights and optimizer state; ``result().path`` is ``tinker://.../weights/name``."""
        return self._submit("save_state", self.client.save_state, name)

    def save_weights_for_sampler(self, name: str) -> TinkerFuture:
        """Save weights for sampling; ``result().path`` is ``tinker://.../sampler_weights/name``."""
        return self._submit("save_weights_for_sampler", self.client.save_weights_for_sampler,
                            name)

    def save_weights_external(self, name: str, ttl_seconds: int | None = None) -> TinkerFuture:
        """Save the weights as a downloadable PEFT adapter (``tinker://.../external_weights/``)."""
        return self._submit("save_weights_external", self.client.save_weights_external, name,
                            ttl_seconds=ttl_seconds)

    def save_weights_and_get_sampling_client(self) -> TinkerSamplingClient:
        """A sampling client on a snapshot of the current weights (after the queued calls).

        Raises:
            EngineError: The server refused the snapshot.
        """
        sdk_client = self._future("save_weights_and_get_sampling_client",
                                  self.client.save_weights_and_get_sampling_client()).result()
        return TinkerSamplingClient(sdk_client, self.base_model, tokenizer=self.get_tokenizer(),
                                    server=server_of(self._session.service))

    def create_sampling_client(self, model_path: str) -> TinkerSamplingClient:
        """A sampling client on the weights saved at a ``tinker://`` path."""
        sdk_client = self._future("create_sampling_client",
                                  self.client.create_sampling_client(model_path)).result()
        return TinkerSamplingClient(sdk_client, self.base_model, tokenizer=self.get_tokenizer(),
                                    server=server_of(self._session.service))

    def get_info(self) -> types.GetInfoResponse:
        """The server's ``GetInfoResponse`` (model id, base model, LoRA rank)."""
        return self.client.get_info()

    def get_tokenizer(self):
        """The base model's tokenizer (see :func:`load_tinker_tokenizer`), loaded once."""
        if self._tokenizer is None:
            self._tokenizer = load_tinker_tokenizer(self.base_model, self._tokenizer_id)
        return self._tokenizer

    def close(self) -> None:
        """Finish the session (the calls already submitted complete first on the server)."""
        self._session.close()


def _check_matches(client: TinkerTrainingClient, config: TrainConfig, state: str) -> None:
    """A checkpoint's base model and rank must be the configured ones (as the local engine)."""
    problems = []
    if client.base_model != config.base_model:
        problems.append(f"base model '{client.base_model}', BASE_MODEL is '{config.base_model}'")
    if client.rank != config.lora_rank:
        problems.append(f"LoRA rank {client.rank}, LORA_RANK is {config.lora_rank}")
    if problems:
        client.close()
        raise CheckpointError(f"checkpoint {state}: " + "; ".join(problems))


def create_training_client(config: TrainConfig, state: str | None = None,
                           with_optimizer: bool = False) -> TinkerTrainingClient:
    """A Tinker training client for ``config``: new, or from a ``tinker://`` checkpoint.

    Args:
        config: Base model (a name the server serves, e.g. ``Qwen/Qwen3-8B``), LoRA rank and
            targets, seed and ``TINKER_BASE_URL``.
        state: A ``tinker://.../weights/...`` checkpoint to start from, or None.
        with_optimizer: Restore the optimizer state too (``--resume``; exact), rather than the
            weights only (``--init-from``; a fresh optimizer).

    Raises:
        ConfigError: No usable API key, a LoRA setting Tinker lacks, or a local ``state``.
        CheckpointError: ``state`` has another base model or rank than ``config``.
        EngineError: The server cannot be reached or refuses the request.
    """
    options = lora_options(config)
    if state is not None and not is_tinker_path(state):
        raise ConfigError(f"BACKEND=tinker starts from tinker:// checkpoints only, not {state} "
                          "(train on from a local checkpoint with BACKEND=local)")
    if state is not None:
        state = parse_tinker_path(state).tinker_path
    service = connect(config.tinker_base_url)
    if state is None:
        sdk_client = _create(service, "create_lora_training_client", lambda: (
            service.create_lora_training_client(config.base_model, config.lora_rank,
                                                seed=config.seed, **options)))
    elif with_optimizer:
        sdk_client = _create(service, "create_training_client_from_state_with_optimizer",
                             lambda: service.create_training_client_from_state_with_optimizer(state))
    else:
        sdk_client = _create(service, "create_training_client_from_state",
                             lambda: service.create_training_client_from_state(state))
    client = TinkerTrainingClient(service, sdk_client)
    if state is not None:
        _check_matches(client, config, state)
    return client


# -- download (export) ------------------------------------------------------------------------

def _download_file(url: str, target: Path, name: str, limit: int) -> int:
    """Stream one URL into ``target``; errors name the file, never the (signed) URL."""

    written = 0
    try:
        with httpx.stream("GET", url, timeout=60, follow_redirects=True) as response:
            if response.status_code != 200:
                raise CheckpointError(f"downloading {name}: the server answered HTTP "
                                      f"{response.status_code}")
            with open(target, "wb") as out:
                for chunk in response.iter_bytes():
                    written += len(chunk)
                    if written > limit:
                        raise CheckpointError(f"downloading {name}: more than {limit:,} bytes; "
                                              "refused")
                    out.write(chunk)
    except httpx.HTTPError as e:
        raise CheckpointError(f"downloading {name}: {type(e).__name__}") from None
    return written


def download_external_weights(rest, path: str, dest: Path,
                              max_bytes: int = MAX_EXTRACTED_BYTES) -> int:
    """Download every file of an ``external_weights`` checkpoint into ``dest``.

    File names come from ``RestClient.get_external_weights_urls`` and are checked with
    :func:`tinkerkit.archive.safe_relative_path`; a single tar archive among them is extracted
    with :func:`tinkerkit.archive.extract_tar` and then removed. ``max_bytes`` bounds the bytes
    written, downloads and extraction together.

    Returns:
        The bytes written.

    Raises:
        CheckpointError: An unsafe name or archive, a failed download, or too many bytes.
        EngineError: The server refused the listing.
    """
    listing = TinkerFuture(rest.get_external_weights_urls(path), "get_external_weights_urls",
                           server=server_of(rest))
    urls = listing.result().urls
    if not urls:
        raise CheckpointError(f"checkpoint {path}: the server lists no files to download")
    where = f"checkpoint {path}"
    targets = {name: dest / safe_relative_path(name, where) for name in urls}
    total = 0
    for name, target in sorted(targets.items()):
        target.parent.mkdir(parents=True, exist_ok=True)
        total += _download_file(urls[name], target, name, max_bytes - total)
    archives = [target for name, target in targets.items() if is_archive_name(name)]
    for archive in archives:
        extracted = extract_tar(archive, dest, max_bytes - total)
        total += sum(p.stat().st_size for p in extracted)
        archive.unlink()
    return total


def download_adapter(path: str, dest: Path, base_url: str | None = None,
                     max_bytes: int = MAX_EXTRACTED_BYTES) -> str:
    """Download the LoRA adapter of a ``tinker://`` checkpoint into ``dest`` (PEFT files).

    A training checkpoint (``tinker://<run>/weights/<name>``) is loaded into a new training
    client, saved with ``save_weights_external`` (kept one hour at most, deleted after the
    download), and its files fetched through ``RestClient.get_external_weights_urls``; an
    ``external_weights`` checkpoint is fetched directly. Sampler checkpoints cannot be
    downloaded (as on the hosted service).

    ``adapter_config.json`` gets ``base_model_name_or_path`` from the server when it lacks one.

    Returns:
        The checkpoint's base model name, as the server reports it.

    Raises:
        CheckpointError: Not a downloadable ``tinker://`` path, unsafe files, no PEFT adapter.
        ConfigError: No usable API key.
        EngineError: The server cannot be reached or refuses a request.
    """
    parsed = parse_tinker_path(path)
    path = parsed.tinker_path
    if parsed.checkpoint_type == "sampler":
        raise CheckpointError(f"checkpoint {path}: sampler weights cannot be downloaded; export "
                              "the training checkpoint (tinker://<run>/weights/<name>) instead")
    rest = rest_client(base_url)
    if parsed.checkpoint_type == "external":
        download_external_weights(rest, path, dest, max_bytes)
        base_model = TinkerFuture(rest.get_weights_info_by_tinker_path(path), "get_weights_info",
                                  server=server_of(rest)).result().base_model
    else:
        service = connect(base_url)
        client = TinkerTrainingClient(service, _create(
            service, "create_training_client_from_state",
            lambda: service.create_training_client_from_state(path)))
        try:
            base_model = client.base_model
            export = client.save_weights_external("export", EXPORT_TTL_SECONDS).result().path
            try:
                download_external_weights(rest, export, dest, max_bytes)
            finally:
                try:
                    TinkerFuture(rest.delete_checkpoint_from_tinker_path(export),
                                 "delete_checkpoint", server=server_of(rest)).result()
                except EngineError:
                    pass  # expires after EXPORT_TTL_SECONDS anyway
        finally:
            client.close()
    _record_base_model(dest, path, base_model)
    return base_model


def _record_base_model(dest: Path, path: str, base_model: str) -> None:
    """Check that ``dest`` holds a PEFT adapter; fill in its base model when missing."""
    import json

    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (dest / name).is_file():
            raise CheckpointError(f"checkpoint {path}: the download holds no {name} (not a "
                                  "PEFT LoRA adapter)")
    try:
        config = json.loads((dest / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {path}: {ADAPTER_CONFIG} is not JSON: {e}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"checkpoint {path}: {ADAPTER_CONFIG} is not a JSON object")
    if not config.get("base_model_name_or_path"):
        atomic_write_json(dest / ADAPTER_CONFIG, {**config, "base_model_name_or_path": base_model})
