"""Futures of ``tinkerkit serve``: every long request answers with a request id at once.

The Tinker protocol is asynchronous: ``create_model``, ``forward_backward``, ``optim_step``, the
weight saves and loads and ``asample`` each return ``{"request_id": ...}`` (the SDK's
``UntypedAPIFuture``), and the SDK polls ``/api/v1/retrieve_future`` until the result is there.
A retrieval waits up to :data:`LONG_POLL_SECONDS` for the result (long polling) and otherwise
answers ``try_again``, so a client neither spins nor holds a request past the SDK's 45 s
read timeout.

A finished future is kept :data:`RESULT_TTL_SECONDS` after it finished, so a retrieval whose
answer was lost on the way can be retried; pending futures are never dropped.
"""

from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass, field
from typing import Any

from tinker import types

from tinkerkit.errors import RequestError, TinkerkitError

LONG_POLL_SECONDS = 30.0
"""Longest wait of one retrieve_future call (the SDK reads with a 45 s timeout)."""
RESULT_TTL_SECONDS = 600.0
"""How long a finished future's result stays retrievable."""


@dataclass
class ServerFuture:
    """One request's outcome.

    Attributes:
        request_id: The id handed to the client.
        owner: The owner id (see :mod:`tinkerkit.serve.auth`) allowed to retrieve it.
        result: The response (a ``tinker.types`` object) once done.
        error: ``(message, category)`` once failed; category is a
            ``tinker.types.RequestErrorCategory``.
        sample_sequence_ids: For sampling requests, one id per requested sample.
        rejected: The 4xx status when the request was refused when it started (an invalid
            datum, an unknown checkpoint, ...); the error holds the message.
    """

    request_id: str
    owner: str
    result: Any = None
    error: tuple[str, types.RequestErrorCategory] | None = None
    sample_sequence_ids: list[str] | None = None
    finished_at: float | None = None
    rejected: int | None = None
    _done: threading.Event = field(default_factory=threading.Event, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def set_result(self, result: Any) -> None:
        """Finish with ``result`` (the first outcome wins)."""
        with self._lock:
            if not self._done.is_set():
                self.result, self.finished_at = result, time.monotonic()
                self._done.set()

    def set_error(self, message: str,
                  category: types.RequestErrorCategory = types.RequestErrorCategory.User) -> None:
        """Fail with ``message`` (the first outcome wins)."""
        with self._lock:
            if not self._done.is_set():
                self.error, self.finished_at = (message, category), time.monotonic()
                self._done.set()

    def fail(self, error: Exception) -> None:
        """Fail with ``error`` (see :func:`describe_error`); a user's error also marks the
        request as rejected with its 4xx status (a ``RequestError``'s own, else 400)."""
        message, category = describe_error(error)
        with self._lock:
            if self._done.is_set():
                return
            if category == types.RequestErrorCategory.User:
                self.rejected = getattr(error, "status", 400)
            self.error, self.finished_at = (message, category), time.monotonic()
            self._done.set()

    def raise_if_rejected(self) -> None:
        """Raise the rejection as the HTTP answer of the request that submitted this future.

        Raises:
            RequestError: The 4xx status and message of a rejected request.
        """

        if self.rejected is not None and self.error is not None:
            raise RequestError(self.rejected, self.error[0])

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds; True when finished."""
        return self._done.wait(timeout)

    def done(self) -> bool:
        """Whether the future has finished."""
        return self._done.is_set()

    def follow(self, future: Future, convert=lambda result: result) -> None:
        """Finish when a ``concurrent.futures.Future`` does, with ``convert(result)``.

        An exception becomes the error (see :func:`describe_error`).
        """
        def finish(done: Future) -> None:
            try:
                self.set_result(convert(done.result()))
            except BaseException as e:  # every failure reaches the client
                self.set_error(*describe_error(e))
        future.add_done_callback(finish)

    def untyped(self) -> types.UntypedAPIFuture:
        """The ``UntypedAPIFuture`` that the submitting request answers with."""
        return types.UntypedAPIFuture(request_id=self.request_id,
                                      sample_sequence_ids=self.sample_sequence_ids)


CANCELLED_MESSAGE = ("cancelled: its session ended (closed by the client, silent past the "
                     "heartbeat timeout, or the server stopped) before it ran")
"""The error of a queued request cancelled when its session was released."""


def describe_error(error: BaseException) -> tuple[str, types.RequestErrorCategory]:
    """The client-facing message and category of an exception.

    A :class:`tinkerkit.errors.TinkerkitError` (bad datum, incompatible checkpoint, unknown
    model, ...) is the user's, and so is a cancellation (a queued call of a released session:
    :data:`CANCELLED_MESSAGE`); anything else is the server's, named by its type.
    """

    if isinstance(error, TinkerkitError):
        return str(error), types.RequestErrorCategory.User
    if isinstance(error, CancelledError):
        return CANCELLED_MESSAGE, types.RequestErrorCategory.User
    return f"internal error: {type(error).__name__}: {error}", types.RequestErrorCategory.Server


class FutureStore:
    """All futures of the server, by request id (thread-safe)."""

    def __init__(self, result_ttl_seconds: float = RESULT_TTL_SECONDS) -> None:
        self._futures: dict[str, ServerFuture] = {}
        self._lock = threading.Lock()
        self._ttl = result_ttl_seconds

    def create(self, owner: str) -> ServerFuture:
        """A new pending future owned by ``owner`` (old finished futures are dropped here)."""
        future = ServerFuture(request_id=uuid.uuid4().hex, owner=owner)
        now = time.monotonic()
        with self._lock:
            expired = [rid for rid, f in self._futures.items()
                       if f.finished_at is not None and now - f.finished_at > self._ttl]
            for rid in expired:
                del self._futures[rid]
            self._futures[future.request_id] = future
        return future

    def get(self, request_id: str, owner: str) -> ServerFuture | None:
        """The future with this id if ``owner`` owns it, else None."""
        with self._lock:
            future = self._futures.get(request_id)
        return future if future is not None and future.owner == owner else None
