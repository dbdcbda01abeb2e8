"""Sessions, training runs and sampling sessions of ``tinkerkit serve``, over the local engine.

:class:`ServerState` implements the Tinker API's operations on
:class:`tinkerkit.engines.local.LocalTrainingClient` and
:class:`tinkerkit.engines.local.LocalSamplingClient`, with the SDK's own request and
response types; :mod:`tinkerkit.serve.app` only maps HTTP onto it.

Ordering. The SDK numbers the requests of a training model (``seq_id`` 1, 2, ...; 0 is a load
that creates the model) and may send them over parallel connections, so they can arrive out of
order. A :class:`ModelRunner` starts them strictly in ``seq_id`` order: a request whose
predecessors have not arrived waits in the runner. Starting a request only queues it on the
engine (whose single worker thread runs calls in submission order), so the client can submit
the next batch while the previous one computes, as the SDK's pipelining expects. A request
whose ``seq_id`` was already seen (a retry after a lost answer) gets the first one's future
back, so nothing runs twice (the last :data:`_SEEN_SEQ_IDS` requests to arrive are remembered,
:class:`_SeenRequests`; a forgotten one that already started is refused, one still waiting
answers with its future). Once a request's model and ``seq_id`` are known, the ``seq_id`` is
consumed whatever is wrong with the rest, so the requests behind it still run (the SDK goes on
after an error): a body that does not validate answers 400 (:meth:`ServerState.refuse`), a
request refused when it starts (a bad datum, an unknown checkpoint) answers its 4xx when it
started at once (the SDK's case: it submits a model's requests one after another) and fails its
future otherwise.

Sessions. A session belongs to the API key that created it. The SDK heartbeats every 10 s; a
session finished by the client (``ServiceClient.close``) or silent (no heartbeat, no request of
its models or samplers) for ``session_timeout_seconds`` releases its models and samplers (their
checkpoints stay on disk).

Sampling. Base weights for sampling are loaded once per served model and shared by every
sampler of that model (each adds its adapter on a copy that shares the base weights); a
sampler made by ``save_weights_and_get_sampling_client`` shares its training model's weights
instead.
"""

from __future__ import annotations

import collections
import datetime as _dt
import functools
import logging
import secrets
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tinker import types

from tinkerkit.checkpoint import read_checkpoint_meta
from tinkerkit.engines.local import (
    LocalSamplingClient,
    LocalTrainingClient,
    create_training_client_from_state,
)
from tinkerkit.engines.local.model import load_model, preset_of_switches, resolve_device
from tinkerkit.errors import RequestError
from tinkerkit.models import hub_id_of, load_tokenizer
from tinkerkit.serve.futures import FutureStore, ServerFuture, describe_error
from tinkerkit.serve.registry import ModelRegistry, ServedModel
from tinkerkit.serve.store import (
    EXTERNAL_FILES,
    CheckpointStore,
    RunRecord,
    check_name,
    check_ttl,
)

log = logging.getLogger("tinkerkit.serve")

SESSION_TIMEOUT_SECONDS = 600.0
"""A session without heartbeat or request for this long is released (the SDK beats every 10 s)."""
FINISHED_SESSION_SECONDS = 3600.0
"""How long a finished session is remembered (its heartbeats answer 410, then 404)."""
DOWNLOAD_URL_SECONDS = 3600
"""Lifetime of an external-weights download URL."""
MAX_LORA_RANK = 1024
"""Largest LoRA rank of a training model."""
SNAPSHOT_SAMPLERS_KEPT = 4
"""Snapshot samplers (``save_weights_and_get_sampling_client``) kept per training model: a new
one releases the oldest beyond this many. Each holds a copy of the LoRA weights (55 MiB for
SmolLM2-135M at rank 32), and an RL loop takes one every step, so without a bound a long run
grows by that much per step (``benchmarks/sampler_snapshot.py``). A released sampler answers
404 naming the bound; samplers made from a ``tinker://`` path or a base model are not
counted."""
MAX_MODEL_SEQ_ID = 10**9 - 1
"""Largest ``model_seq_id`` (model ids are ``<session id>:train:<n>`` with n of up to 9 digits)."""
MAX_NUM_SAMPLES = 1024
"""Most samples of one ``asample`` request (they are generated in batches of 32)."""
MAX_SAMPLE_TOKENS = 131072
"""Largest ``max_tokens`` of a sample (the KV cache is allocated for prompt + max_tokens)."""
MAX_TOPK = 1024
"""Largest ``topk_prompt_logprobs``."""
MAX_SEQ_ID = 2**63 - 1
"""Largest ``seq_id`` (a signed 64-bit integer: the SDK numbers a cloned sampler's requests from
its clone id times 10**9, which it keeps below this)."""
_SEEN_SEQ_IDS = 1024
"""How many past seq ids of a model (or sampler) are remembered to answer retries."""


class _SeenRequests:
    """The futures of the requests that arrived last, by ``seq_id``, to answer retries.

    Holds the ``capacity`` requests that arrived most recently: remembering one more forgets the
    one that arrived first. The rule goes by arrival, not by id: the clones of a sampling client
    share its sampling session and number their requests in blocks of 10**9 ids apart, so live
    ids can be far apart, while a retry follows its first attempt closely in time. Not
    thread-safe: the owner calls it under its own lock.

    Args:
        capacity: How many requests are remembered.
    """

    def __init__(self, capacity: int = _SEEN_SEQ_IDS) -> None:
        self.capacity = capacity
        self._futures: dict[int, ServerFuture] = {}  # in arrival order

    def __len__(self) -> int:
        return len(self._futures)

    def get(self, seq_id: int) -> ServerFuture | None:
        """The future of the remembered request ``seq_id``, or None."""
        return self._futures.get(seq_id)

    def remember(self, seq_id: int, future: ServerFuture) -> None:
        """Remember ``future`` as request ``seq_id`` (the latest arrival); forget the earliest
        arrival when more than ``capacity`` are held."""
        self._futures.pop(seq_id, None)
        self._futures[seq_id] = future
        if len(self._futures) > self.capacity:
            del self._futures[next(iter(self._futures))]


def _target_modules(lora: types.LoraConfig) -> str:
    preset = preset_of_switches(lora.train_attn, lora.train_mlp)
    if preset is not None:
        return preset
    raise RequestError(400, "LoraConfig trains neither attention nor MLP layers; tinkerkit serve "
                            "needs train_attn or train_mlp")


def _metadata(values: dict | None) -> dict[str, str] | None:
    """A run's user metadata as the listings carry it (string values)."""
    return None if values is None else {str(k): str(v) for k, v in values.items()}


def _check_range(name: str, value: int, low: int, high: int) -> int:
    """``value`` when ``low <= value <= high``.

    Raises:
        RequestError: 400 naming the field otherwise (sizes, seeds and ids from a request never
            reach the engine unbounded).
    """
    if not low <= value <= high:
        raise RequestError(400, f"{name}={value} must be in [{low}, {high}]")
    return value


def _check_adam(config: types.OptimizerConfig | None) -> None:
    if config is not None and config.type != "adamw":
        raise RequestError(400, f"optimizer '{config.type}' is not supported by tinkerkit serve "
                                "(AdamW only)")


class ModelRunner:
    """A live training model: its engine client and the order of its requests.

    The client is built in the background; requests that arrive before it exists wait.
    """

    def __init__(self, model_id: str, record: RunRecord, served: ServedModel,
                 created: ServerFuture) -> None:
        self.model_id, self.record, self.served = model_id, record, served
        self.created = created  # the create_model / create-via-load future
        self.client: LocalTrainingClient | None = None
        self.last_request = time.time()
        self._lock = threading.Lock()
        self._next_seq = 1
        self._highest_seq = 0  # the highest seq_id submitted
        self._waiting: dict[int, tuple[ServerFuture, Callable]] = {}
        self._seen = _SeenRequests()
        self._failure: str | None = None
        self.snapshots: collections.deque[str] = collections.deque()  # sampler ids, oldest first

    def submit(self, seq_id: int | None, future: ServerFuture,
               action: Callable[[LocalTrainingClient, ServerFuture], None]) -> ServerFuture:
        """Start ``action(client, future)`` once every request before ``seq_id`` has started.

        ``action`` must only queue work on the engine (it runs under this runner's lock); an
        exception it raises fails ``future``.

        Returns:
            ``future``, or the earlier future of the same ``seq_id`` (a retried request).
        """
        with self._lock:
            self.last_request = time.time()
            if seq_id is None:  # a client that does not number its requests: after the rest
                seq_id = max(self._next_seq, self._highest_seq + 1)
            earlier = self._seen.get(seq_id)
            if earlier is None and seq_id in self._waiting:  # forgotten, but not started yet
                earlier = self._waiting[seq_id][0]
            if earlier is not None:
                return earlier
            self._seen.remember(seq_id, future)
            self._highest_seq = max(self._highest_seq, seq_id)
            if seq_id < self._next_seq:
                future.fail(RequestError(400, f"seq_id {seq_id} of model {self.model_id} was "
                                              "already used"))
                return future
            self._waiting[seq_id] = (future, action)
            self._drain()
        return future

    def _drain(self) -> None:
        if self._failure is not None:
            for future, _ in self._waiting.values():
                future.set_error(self._failure)
            self._waiting.clear()
            return
        if self.client is None:
            return
        while self._next_seq in self._waiting:
            future, action = self._waiting.pop(self._next_seq)
            self._next_seq += 1
            try:
                action(self.client, future)
            except Exception as e:  # the request is refused or fails; the model goes on
                future.fail(e)

    def ready(self, client: LocalTrainingClient) -> None:
        """The client exists: start the waiting requests (or close it if the model is gone)."""
        with self._lock:
            if self._failure is None:
                self.client = client
                self._drain()
                return
        client.close()

    def fail(self, message: str, on_closed: Callable[[], None] | None = None) -> None:
        """The model is gone (failed to load, or released): fail waiting and later requests.

        Args:
            message: The error of every waiting and later request.
            on_closed: Called (in a background thread) once the client is closed: the running
                call finished and the queued ones cancelled, so nothing writes to the run any
                more.
        """
        with self._lock:
            self._failure = message
            client, self.client = self.client, None
            self._drain()

        def close() -> None:
            if client is not None:  # queued calls are cancelled: nobody waits for them any more
                client.close(cancel=True)
            if on_closed is not None:
                on_closed()

        threading.Thread(target=close, name="tinkerkit-release", daemon=True).start()


@dataclass
class Sampler:
    """A sampling session: a future sampling client and the futures of its requests."""

    sampler_id: str
    owner: str
    base_model: str
    model_path: str | None
    client: Future
    seen: _SeenRequests = field(default_factory=_SeenRequests)
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class Session:
    """A client session (one ``ServiceClient``)."""

    session_id: str
    owner: str
    last_seen: float = field(default_factory=time.monotonic)
    finished: bool = False
    finished_at: float = 0.0
    models: dict[int, ModelRunner] = field(default_factory=dict)
    samplers: dict[int, str] = field(default_factory=dict)  # sampling_session_seq_id -> id
    released_samplers: dict[str, str] = field(default_factory=dict)  # id -> why


def _close_in_background(client_future: Future) -> None:
    """Close a released sampling client (not in this thread), cancelling its queued samples and
    stopping the one being generated at its next decode step: nobody waits for them any more."""
    if not client_future.cancelled() and client_future.exception() is None:
        threading.Thread(target=client_future.result().close, kwargs={"cancel": True},
                         name="tinkerkit-release", daemon=True).start()


def _mask_prompt_logprobs(response: types.SampleResponse, last_n: int | None):
    """Keep only the last ``last_n`` prompt logprobs (``prompt_logprobs_last_n``)."""
    if last_n is None:
        return response
    logprobs = None
    if response.prompt_logprobs_np is not None:
        logprobs = response.prompt_logprobs_np.copy()
        logprobs[:len(logprobs) - last_n] = np.nan
    topk = response.topk_prompt_logprobs_np
    if topk is not None:
        ids, values = topk.token_ids.copy(), topk.logprobs.copy()
        ids[:len(ids) - last_n], values[:len(values) - last_n] = 0, -99999.0
        topk = type(topk)(ids, values)
    return types.SampleResponse(sequences=response.sequences, prompt_logprobs_np=logprobs,
                                topk_prompt_logprobs_np=topk)


class ServerState:
    """Everything ``tinkerkit serve`` knows, and the Tinker operations on it (thread-safe).

    Args:
        store: Where runs and checkpoints live.
        registry: The served base models.
        device: Engine device (``auto``, ``cpu``, ``cuda:0``, ...).
        session_timeout_seconds: Silence after which a session is released.
    """

    def __init__(self, store: CheckpointStore, registry: ModelRegistry, device: str = "auto",
                 session_timeout_seconds: float = SESSION_TIMEOUT_SECONDS) -> None:
        self.store, self.registry, self.device = store, registry, device
        self.futures = FutureStore()
        self.session_timeout_seconds = session_timeout_seconds
        self._lock = threading.Lock()
        self._sessions: dict[str, Session] = {}
        self._runners: dict[str, ModelRunner] = {}
        self._samplers: dict[str, Sampler] = {}
        self._bases: dict[tuple[str, str], Future] = {}
        self._tokenizers: dict[str, object] = {}
        self._loader = ThreadPoolExecutor(max_workers=2, thread_name_prefix="tinkerkit-load")

    # -- sessions

    def create_session(self, owner: str, request: types.CreateSessionRequest
                       ) -> types.CreateSessionResponse:
        """A new session for ``owner``."""
        session = Session(str(uuid.uuid4()), owner)
        with self._lock:
            self._sessions[session.session_id] = session
        log.info("session %s created", session.session_id)
        return types.CreateSessionResponse(session_id=session.session_id)

    def _session(self, session_id: str, owner: str, alive: bool = True) -> Session:
        with self._lock:
            session = self._sessions.get(session_id)
        if session is None or session.owner != owner:
            raise RequestError(404, f"session '{session_id}' not found")
        if alive and session.finished:
            raise RequestError(410, f"session '{session_id}' has finished")
        session.last_seen = time.monotonic()
        return session

    def _touch(self, session_id: str) -> None:
        """A request of one of the session's models or samplers keeps the session alive."""
        with self._lock:
            session = self._sessions.get(session_id)
        if session is not None:
            session.last_seen = time.monotonic()

    def heartbeat(self, owner: str, session_id: str) -> types.SessionHeartbeatResponse:
        """Keep a session alive (410 once it finished)."""
        self._session(session_id, owner)
        return types.SessionHeartbeatResponse()

    def finish_session(self, owner: str, session_id: str) -> None:
        """Finish a session: release its models and samplers (idempotent)."""
        self._release(self._session(session_id, owner, alive=False), "finished")

    def _release(self, session: Session, why: str, discard_empty: bool = True) -> None:
        """Release a session's models and samplers.

        Args:
            session: The session.
            why: Named in the errors of later requests to its models.
            discard_empty: Remove its runs that hold no checkpoint once their clients closed
                (:meth:`_discard_if_empty`); False for a session that only went silent, whose
                client may come back and is then told its model is not loaded.
        """
        with self._lock:
            if session.finished:
                return
            session.finished, session.finished_at = True, time.monotonic()
            runners = list(session.models.values())
            for runner in runners:
                self._runners.pop(runner.model_id, None)
            samplers = [self._samplers.pop(i) for i in session.samplers.values()
                        if i in self._samplers]
        for runner in runners:
            discard = functools.partial(self._discard_if_empty, runner.model_id)
            runner.fail(f"model {runner.model_id} was released: its session {why}",
                        on_closed=discard if discard_empty else None)
        for sampler in samplers:
            sampler.client.add_done_callback(_close_in_background)
        log.info("session %s %s; released %d model(s)", session.session_id, why, len(runners))

    def _discard_if_empty(self, model_id: str) -> None:
        """Remove a released run that holds no checkpoint: its weights went with its session, so
        nothing can be loaded from it, and the listing would show an empty run (each
        ``tinker://`` export, which loads a checkpoint into a new run, left one)."""
        if not self.store.list_checkpoints(model_id):
            self.store.discard_run(model_id)
            log.info("run %s discarded: released with no checkpoint", model_id)

    def release_idle_sessions(self) -> None:
        """Release sessions silent for longer than ``session_timeout_seconds``, and forget
        sessions finished more than :data:`FINISHED_SESSION_SECONDS` ago."""
        now = time.monotonic()
        with self._lock:
            idle = [s for s in self._sessions.values()
                    if not s.finished and now - s.last_seen > self.session_timeout_seconds]
            for old in [s for s in self._sessions.values()
                        if s.finished and now - s.finished_at > FINISHED_SESSION_SECONDS]:
                del self._sessions[old.session_id]
        for session in idle:
            self._release(session, f"sent no heartbeat for {self.session_timeout_seconds:.0f} s",
                          discard_empty=False)

    # -- training models

    def _runner(self, model_id: str, owner: str) -> ModelRunner:
        with self._lock:
            runner = self._runners.get(model_id)
        if runner is None or runner.record.owner != owner:
            self.store.run_dir(model_id)  # 404 for a malformed id
            hint = ""
            if runner is None and (self.store.run_dir(model_id) / "run.json").is_file():
                hint = (" (not loaded: its session ended or the server restarted; create a "
                        "training client from one of its checkpoints)")
            raise RequestError(404, f"model '{model_id}' not found{hint}")
        self._touch(model_id.split(":train:")[0])
        return runner

    def _register(self, session: Session, model_seq_id: int, record: RunRecord,
                  served: ServedModel, build: Callable[[], LocalTrainingClient],
                  response: Callable[[], object]) -> ServerFuture:
        """Register a new model and build its client in the background (or return the future
        of the same ``model_seq_id`` when the request is a retry)."""
        with self._lock:
            existing = session.models.get(model_seq_id)
            if existing is not None:
                return existing.created
            future = self.futures.create(session.owner)
            runner = ModelRunner(record.model_id, record, served, future)
            session.models[model_seq_id] = runner
            self._runners[record.model_id] = runner

        def finish(done: Future) -> None:
            try:
                client = done.result()
            except Exception as e:
                message, category = describe_error(e)
                log.warning("model %s failed to load: %s", record.model_id, message)
                self.store.discard_run(record.model_id)  # not listed as a run with nothing in it
                runner.fail(f"model {record.model_id} failed to load: {message}")
                future.set_error(message, category)
                return
            runner.ready(client)  # closes the client if the session was released meanwhile
            future.set_result(response())
            log.info("model %s ready (%s, rank %d)", record.model_id, served.name, record.rank)

        self._loader.submit(build).add_done_callback(finish)
        return future

    def create_model(self, owner: str, request: types.CreateModelRequest) -> ServerFuture:
        """``create_model``: a new LoRA training run (future of ``CreateModelResponse``).

        Raises:
            RequestError: 404 unknown session; 400 unknown base model, no LoRA config, a
                non-Adam optimizer, a LoRA that trains no attention or MLP layer, or a
                ``model_seq_id``, rank or seed out of bounds.
        """
        session = self._session(request.session_id, owner)
        served = self.registry.resolve(request.base_model)
        lora = request.lora_config
        if lora is None:
            raise RequestError(400, "full fine-tuning is not supported; pass a LoraConfig")
        _check_range("model_seq_id", request.model_seq_id, 0, MAX_MODEL_SEQ_ID)
        _check_range("lora_config.rank", lora.rank, 1, MAX_LORA_RANK)
        if lora.seed is not None:  # torch.manual_seed's range
            _check_range("lora_config.seed", lora.seed, -(2**63), 2**64 - 1)
        _check_adam(request.optimizer_config)
        targets = _target_modules(lora)
        model_id = f"{session.session_id}:train:{request.model_seq_id}"
        seed = lora.seed if lora.seed is not None else secrets.randbelow(2**31)
        record = RunRecord(model_id, served.name, owner, lora.rank, seed, lora.train_mlp,
                           lora.train_attn, lora.train_unembed,
                           user_metadata=_metadata(request.user_metadata))

        def build() -> LocalTrainingClient:
            run_dir = self.store.create_run(record)
            return LocalTrainingClient(served.source, lora.rank, seed=seed, target_modules=targets,
                                       train_unembed=lora.train_unembed, device=self.device,
                                       dtype=served.dtype, checkpoint_root=run_dir / "weights",
                                       adapter_base_model=hub_id_of(served.name))

        return self._register(session, request.model_seq_id, record, served, build,
                              lambda: types.CreateModelResponse(model_id=model_id))

    def get_info(self, owner: str, request: types.GetInfoRequest) -> types.GetInfoResponse:
        """``get_info`` of a live model."""
        runner = self._runner(request.model_id, owner)
        client = runner.client
        arch = client.get_info().model_data.arch if client is not None else None
        served = runner.served
        return types.GetInfoResponse(
            model_data=types.ModelData(arch=arch, model_name=served.name,
                                       tokenizer_id=self.registry.tokenizer_id(served)),
            model_id=runner.model_id, is_lora=True, lora_rank=runner.record.rank,
            model_name=served.name)

    def _ordered(self, runner: ModelRunner, seq_id: int | None, owner: str,
                 start: Callable[[LocalTrainingClient, ServerFuture], None]) -> ServerFuture:
        """Submit a model's request in ``seq_id`` order (see :meth:`ModelRunner.submit`).

        Raises:
            RequestError: 400 for a ``seq_id`` outside [1, :data:`MAX_SEQ_ID`] (the SDK numbers
                a model's requests from 1); the request started at once and was refused (its
                4xx), its ``seq_id`` consumed all the same.
        """
        if seq_id is not None:
            _check_range("seq_id", seq_id, 1, MAX_SEQ_ID)
        future = runner.submit(seq_id, self.futures.create(owner), start)
        future.raise_if_rejected()
        return future

    def refuse(self, owner: str, model_id: object, seq_id: object, error: RequestError) -> None:
        """Consume the ``seq_id`` of a request refused before it could be read (4xx).

        The SDK goes on with the next ``seq_id`` after an error, so the refused one must not
        hold back the model's later requests. Nothing happens when the model is not the
        caller's or the ids are not readable.
        """
        if not isinstance(model_id, str) or type(seq_id) is not int or seq_id < 1:
            return
        try:
            runner = self._runner(model_id, owner)
        except RequestError:
            return

        def start(client: LocalTrainingClient, future: ServerFuture) -> None:
            raise error

        runner.submit(seq_id, self.futures.create(owner), start)

    def forward_backward(self, owner: str, request: types.ForwardBackwardRequest,
                         forward_only: bool) -> ServerFuture:
        """``forward_backward`` / ``forward`` (future of ``ForwardBackwardOutput``)."""
        runner = self._runner(request.model_id, owner)
        given = request.forward_backward_input

        def start(client: LocalTrainingClient, future: ServerFuture) -> None:
            call = client.forward if forward_only else client.forward_backward
            future.follow(call(list(given.data), given.loss_fn,
                               dict(given.loss_fn_config) if given.loss_fn_config else None))

        return self._ordered(runner, request.seq_id, owner, start)

    def optim_step(self, owner: str, request: types.OptimStepRequest) -> ServerFuture:
        """``optim_step`` (future of ``OptimStepResponse``)."""
        runner = self._runner(request.model_id, owner)

        def start(client: LocalTrainingClient, future: ServerFuture) -> None:
            if not isinstance(request.optim_params, types.AdamParams):
                raise RequestError(400, f"optimizer '{request.optim_params.type}' is not "
                                        "supported by tinkerkit serve (AdamW only)")
            future.follow(client.optim_step(request.optim_params))

        return self._ordered(runner, request.seq_id, owner, start)

    # -- checkpoints

    def _save(self, runner: ModelRunner, client: LocalTrainingClient, future: ServerFuture,
              segment: str, name: str | None, respond: Callable[[str, Path], object],
              kind: str = "sampler", overwrite: bool = True,
              user_metadata: dict | None = None, ttl_seconds: int | None = None) -> None:
        directory = self.store.checkpoint_dir(runner.model_id, segment, check_name(name))
        check_ttl(ttl_seconds)
        if not overwrite and directory.exists():
            raise RequestError(400, f"checkpoint '{segment}/{name}' of {runner.model_id} exists; "
                                    "pass overwrite=True to replace it")
        path = self.store.tinker_path(runner.model_id, segment, directory.name)

        def convert(_response) -> object:
            self.store.write_checkpoint_meta(directory, user_metadata, ttl_seconds)
            return respond(path, directory)

        future.follow(client.save_checkpoint(directory, kind), convert)

    def save_weights(self, owner: str, request: types.SaveWeightsRequest) -> ServerFuture:
        """``save_weights`` (``save_state``): weights and optimizer state."""
        runner = self._runner(request.model_id, owner)

        def start(client: LocalTrainingClient, future: ServerFuture) -> None:
            self._save(runner, client, future, "weights", request.path,
                       lambda path, _: types.SaveWeightsResponse(path=path), kind="state",
                       overwrite=request.overwrite, user_metadata=request.user_metadata,
                       ttl_seconds=request.ttl_seconds)

        return self._ordered(runner, request.seq_id, owner, start)

    def save_weights_for_sampler(self, owner: str,
                                 request: types.SaveWeightsForSamplerRequest) -> ServerFuture:
        """``save_weights_for_sampler``: a named sampler checkpoint, or (no name) a sampling
        session on a snapshot of the current weights."""
        runner = self._runner(request.model_id, owner)
        session = self._session(runner.model_id.split(":")[0], owner)

        def start(client: LocalTrainingClient, future: ServerFuture) -> None:
            if request.path is not None:
                self._save(runner, client, future, "sampler_weights", request.path,
                           lambda path, _: types.SaveWeightsForSamplerResponseInternal(path=path),
                           user_metadata=request.user_metadata, ttl_seconds=request.ttl_seconds)
                return
            if request.kind != "snapshot":
                raise RequestError(400, f"sampling client kind '{request.kind}' is not supported "
                                        "by tinkerkit serve (snapshot only)")
            if request.sampling_session_seq_id is None:
                raise RequestError(400, "save_weights_for_sampler needs a path or a "
                                        "sampling_session_seq_id")
            snapshot = client.sampling_snapshot()
            sampler_id = self._add_sampler(session, request.sampling_session_seq_id,
                                           runner.served.name, None, snapshot)
            self._keep_newest_snapshots(session, runner, sampler_id)
            future.follow(snapshot, lambda _: types.SaveWeightsForSamplerResponseInternal(
                sampling_session_id=sampler_id))

        return self._ordered(runner, request.seq_id, owner, start)

    def save_weights_external(self, owner: str,
                              request: types.SaveWeightsExternalRequest) -> ServerFuture:
        """``save_weights_external``: the adapter in the PEFT layout, downloadable by URL."""
        runner = self._runner(request.model_id, owner)

        def respond(path: str, directory: Path) -> object:
            size = sum((directory / name).stat().st_size for name in EXTERNAL_FILES)
            return types.SaveWeightsExternalResponseInternal(path=path, size_bytes=size)

        def start(client: LocalTrainingClient, future: ServerFuture) -> None:
            if request.age_encryption_recipients:
                raise RequestError(400, "age encryption of external weights is not supported "
                                        "by tinkerkit serve")
            self._save(runner, client, future, "external_weights", request.path, respond,
                       ttl_seconds=request.ttl_seconds)

        return self._ordered(runner, request.seq_id, owner, start)

    def load_weights(self, owner: str, request: types.LoadWeightsRequest) -> ServerFuture:
        """``load_weights``: into a live model (``model_id`` + ``seq_id``), or into a new model
        created from the checkpoint (``session_id`` + ``model_seq_id``)."""
        if request.model_id is not None:
            return self._load_into(owner, request)
        if request.session_id is None or request.model_seq_id is None:
            raise RequestError(400, "load_weights needs model_id, or session_id and model_seq_id")
        session = self._session(request.session_id, owner)
        _check_range("model_seq_id", request.model_seq_id, 0, MAX_MODEL_SEQ_ID)
        source, directory = self.store.checkpoint(request.path, owner)
        served = self.registry.resolve(source.base_model)
        if request.base_model is not None and (
                self.registry.resolve(request.base_model).source != served.source):
            raise RequestError(400, f"base_model '{request.base_model}' differs from the "
                                    f"checkpoint's '{source.base_model}'")
        _check_adam(None if request.optimizer else request.optimizer_config)
        model_id = f"{session.session_id}:train:{request.model_seq_id}"
        record = RunRecord(model_id, served.name, owner, source.rank, source.seed,
                           source.train_mlp, source.train_attn, source.train_unembed,
                           user_metadata=_metadata(request.user_metadata))

        def build() -> LocalTrainingClient:
            run_dir = self.store.create_run(record)
            return create_training_client_from_state(
                directory, with_optimizer=request.optimizer, device=self.device,
                dtype=served.dtype, checkpoint_root=run_dir / "weights",
                adapter_base_model=hub_id_of(served.name))

        return self._register(session, request.model_seq_id, record, served, build,
                              lambda: types.LoadWeightsResponse(path=request.path,
                                                                model_id=model_id))

    def _load_into(self, owner: str, request: types.LoadWeightsRequest) -> ServerFuture:
        runner = self._runner(request.model_id, owner)

        def start(client: LocalTrainingClient, future: ServerFuture) -> None:
            _, directory = self.store.checkpoint(request.path, owner)
            load = client.load_state_with_optimizer if request.optimizer else client.load_state
            future.follow(load(str(directory)), lambda _: types.LoadWeightsResponse(
                path=request.path, model_id=runner.model_id))

        return self._ordered(runner, request.seq_id, owner, start)

    # -- listings

    def _training_run(self, record: RunRecord) -> types.TrainingRun:
        checkpoints = self.store.list_checkpoints(record.model_id)
        latest = {kind: next((c for c in reversed(checkpoints) if c.checkpoint_type == kind),
                             None) for kind in ("training", "sampler")}
        times = [_dt.datetime.fromisoformat(record.created)] + [c.time for c in checkpoints]
        with self._lock:
            runner = self._runners.get(record.model_id)
        if runner is not None:
            times.append(_dt.datetime.fromtimestamp(runner.last_request, _dt.UTC))
        return types.TrainingRun(
            training_run_id=record.model_id, base_model=record.base_model,
            model_owner=record.owner[:16], is_lora=True, lora_rank=record.rank,
            last_request_time=max(times), last_checkpoint=latest["training"],
            last_sampler_checkpoint=latest["sampler"], user_metadata=record.user_metadata)

    def get_training_run(self, owner: str, model_id: str) -> types.TrainingRun:
        """``GET /training_runs/<id>``."""
        return self._training_run(self.store.read_run(model_id, owner))

    def list_training_runs(self, owner: str, limit: int, offset: int
                           ) -> types.TrainingRunsResponse:
        """The owner's training runs, newest first, one page."""
        records = self.store.list_runs(owner)
        page = [self._training_run(r) for r in records[offset:offset + limit]]
        return types.TrainingRunsResponse(training_runs=page, cursor=types.Cursor(
            offset=offset, limit=limit, total_count=len(records)))

    def list_checkpoints(self, owner: str, model_id: str) -> types.CheckpointsListResponse:
        """The checkpoints of one run, oldest first."""
        self.store.read_run(model_id, owner)
        return types.CheckpointsListResponse(checkpoints=self.store.list_checkpoints(model_id))

    def list_user_checkpoints(self, owner: str, limit: int, offset: int
                              ) -> types.CheckpointsListResponse:
        """Every checkpoint of the owner, newest first, one page."""
        everything = [c for r in self.store.list_runs(owner)
                      for c in self.store.list_checkpoints(r.model_id)]
        everything.sort(key=lambda c: c.time, reverse=True)
        return types.CheckpointsListResponse(
            checkpoints=everything[offset:offset + limit],
            cursor=types.Cursor(offset=offset, limit=limit, total_count=len(everything)))

    def delete_checkpoint(self, owner: str, model_id: str, checkpoint_id: str) -> None:
        """Delete one checkpoint of a run."""
        self.store.delete_checkpoint(model_id, checkpoint_id, owner)

    def weights_info(self, owner: str, tinker_path: str) -> types.WeightsInfoResponse:
        """Base model and LoRA settings of a checkpoint."""
        record, _ = self.store.checkpoint(tinker_path, owner)
        return types.WeightsInfoResponse(base_model=record.base_model, is_lora=True,
                                         lora_rank=record.rank,
                                         train_unembed=record.train_unembed,
                                         train_mlp=record.train_mlp, train_attn=record.train_attn)

    def external_weights_urls(self, owner: str, model_id: str, checkpoint_id: str,
                              sign: Callable[[str], str], base_url: str
                              ) -> types.ExternalWeightsUrlsResponse:
        """Signed download URLs of an external-weights checkpoint's PEFT files.

        Each URL is ``<base_url>/api/v1/download/<model_id>/<name>/<file>?expires=<unix
        seconds>&signature=<hex>``, where the signature is ``sign`` of
        :func:`download_message`; the URL works without an API key until it expires.
        """
        segment, _, name = checkpoint_id.partition("/")
        if segment != "external_weights":
            raise RequestError(400, f"checkpoint '{checkpoint_id}' is not external weights "
                                    "(external_weights/<name>)")
        self.store.checkpoint(self.store.tinker_path(model_id, segment, name), owner)
        expires = int(time.time()) + DOWNLOAD_URL_SECONDS
        urls = {file: (f"{base_url}/api/v1/download/{model_id}/{name}/{file}?expires={expires}"
                       f"&signature={sign(download_message(model_id, name, file, expires))}")
                for file in EXTERNAL_FILES}
        return types.ExternalWeightsUrlsResponse(
            urls=urls, expires=_dt.datetime.fromtimestamp(expires, _dt.UTC))

    def download_file(self, model_id: str, name: str, file: str) -> Path:
        """The file behind a download URL (the signature was checked by the caller)."""
        if file not in EXTERNAL_FILES:
            raise RequestError(404, f"no downloadable file '{file}'")
        return self.store.file(self.store.checkpoint_dir(model_id, "external_weights", name), file)

    # -- sampling

    def _base_model(self, served: ServedModel) -> Future:
        """Future of the shared sampling copy of a base model (loaded once)."""

        key = (served.source, served.dtype)
        with self._lock:
            if key not in self._bases:
                future = self._loader.submit(
                    lambda: load_model(served.source, served.dtype).to(resolve_device(self.device)))
                future.add_done_callback(lambda done: self._forget_failed_base(key, done))
                self._bases[key] = future
            return self._bases[key]

    def _forget_failed_base(self, key: tuple[str, str], future: Future) -> None:
        """Drop a base model that failed to load, so that a later sampler tries again."""
        if future.cancelled() or future.exception() is not None:
            with self._lock:
                if self._bases.get(key) is future:
                    del self._bases[key]

    def _tokenizer(self, source: str):
        with self._lock:
            tokenizer = self._tokenizers.get(source)
        if tokenizer is None:
            tokenizer = load_tokenizer(source)
            with self._lock:
                self._tokenizers.setdefault(source, tokenizer)
        return tokenizer

    def _keep_newest_snapshots(self, session: Session, runner: ModelRunner,
                               sampler_id: str) -> None:
        """Count a new snapshot sampler of ``runner``'s model; release the oldest beyond
        :data:`SNAPSHOT_SAMPLERS_KEPT` (their queued samples are cancelled)."""
        released = []
        with self._lock:
            if sampler_id in runner.snapshots:  # a retried request
                return
            runner.snapshots.append(sampler_id)
            while len(runner.snapshots) > SNAPSHOT_SAMPLERS_KEPT:
                old = runner.snapshots.popleft()
                sampler = self._samplers.pop(old, None)
                if sampler is not None:
                    released.append(sampler)
                    session.released_samplers[old] = (
                        f"sampling session '{old}' was released: tinkerkit serve keeps the "
                        f"{SNAPSHOT_SAMPLERS_KEPT} newest samplers of {runner.model_id} "
                        "(save_weights_and_get_sampling_client)")
        for sampler in released:
            sampler.client.add_done_callback(_close_in_background)

    def _add_sampler(self, session: Session, seq: int, base_model: str, model_path: str | None,
                     client: Future) -> str:
        sampler_id = f"{session.session_id}:sample:{seq}"
        with self._lock:
            if seq not in session.samplers:
                session.samplers[seq] = sampler_id
                self._samplers[sampler_id] = Sampler(sampler_id, session.owner, base_model,
                                                     model_path, client)
        return sampler_id

    def create_sampling_session(self, owner: str, request: types.CreateSamplingSessionRequest
                                ) -> types.CreateSamplingSessionResponse:
        """A sampling session on a checkpoint (``model_path``) or a base model.

        Answers at once; the model loads in the background and samples wait for it.
        """
        session = self._session(request.session_id, owner)
        with self._lock:
            existing = session.samplers.get(request.sampling_session_seq_id)
        if existing is not None:
            return types.CreateSamplingSessionResponse(sampling_session_id=existing)
        directory = None
        if request.model_path is not None:
            record, directory = self.store.checkpoint(request.model_path, owner)
            served = self.registry.resolve(record.base_model)
            read_checkpoint_meta(directory)  # a complete checkpoint, or 400 now
        elif request.base_model is not None:
            served = self.registry.resolve(request.base_model)
        else:
            raise RequestError(400, "create_sampling_session needs model_path or base_model")
        base = self._base_model(served)

        def build() -> LocalSamplingClient:
            return LocalSamplingClient(served.source, None if directory is None else str(directory),
                                       model=base.result(), tokenizer=self._tokenizer(served.source),
                                       device=self.device, dtype=served.dtype)

        sampler_id = self._add_sampler(session, request.sampling_session_seq_id, served.name,
                                       request.model_path, self._loader.submit(build))
        return types.CreateSamplingSessionResponse(sampling_session_id=sampler_id)

    def _sampler(self, sampler_id: str, owner: str) -> Sampler:
        with self._lock:
            sampler = self._samplers.get(sampler_id)
            session = self._sessions.get(sampler_id.split(":sample:")[0])
        if sampler is None or sampler.owner != owner:
            released = (session.released_samplers.get(sampler_id)
                        if session is not None and session.owner == owner else None)
            raise RequestError(404, released or f"sampling session '{sampler_id}' not found")
        self._touch(sampler_id.split(":sample:")[0])
        return sampler

    def get_sampler(self, owner: str, sampler_id: str) -> types.GetSamplerResponse:
        """``GET /samplers/<id>``."""
        sampler = self._sampler(sampler_id, owner)
        return types.GetSamplerResponse(sampler_id=sampler.sampler_id,
                                        base_model=sampler.base_model,
                                        model_path=sampler.model_path)

    def sample(self, owner: str, request: types.SampleRequest) -> ServerFuture:
        """``asample`` (future of ``SampleResponse``; the future lists one sequence id per
        sample).

        Raises:
            RequestError: 404 unknown sampler; 400 an unsupported option, ``num_samples``,
                ``max_tokens``, ``topk_prompt_logprobs`` or ``seq_id`` out of the server's
                bounds, or (when the sampler is loaded, so the request starts at once) a prompt
                or parameters the engine refuses (a prompt past the model's positions
                included).
        """
        _check_range("num_samples", request.num_samples, 1, MAX_NUM_SAMPLES)
        if request.sampling_params.max_tokens is not None:
            _check_range("sampling_params.max_tokens", request.sampling_params.max_tokens, 1,
                         MAX_SAMPLE_TOKENS)
        _check_range("topk_prompt_logprobs", request.topk_prompt_logprobs, 0, MAX_TOPK)
        if request.seq_id is not None:  # a sampler's requests are numbered from 0
            _check_range("seq_id", request.seq_id, 0, MAX_SEQ_ID)
        if request.sampling_session_id is None:
            raise RequestError(400, "tinkerkit serve samples through sampling sessions "
                                    "(sampling_session_id)")
        sampler = self._sampler(request.sampling_session_id, owner)
        unsupported = {"topk_sample_logprobs": request.topk_sample_logprobs,
                       "target_prompt_logprobs": request.target_prompt_logprobs,
                       "prompt_alt_tokens_k": request.prompt_alt_tokens_k,
                       "record_stability_info": request.record_stability_info}
        named = [key for key, value in unsupported.items() if value]
        if named:
            raise RequestError(400, f"{', '.join(named)} not supported by tinkerkit serve")
        last_n = request.prompt_logprobs_last_n
        if last_n is not None and not (request.prompt_logprobs and
                                       1 <= last_n < request.prompt.length):
            raise RequestError(400, f"prompt_logprobs_last_n={last_n} needs prompt_logprobs and "
                                    f"1 <= N < {request.prompt.length} (the prompt length)")
        with sampler.lock:
            earlier = sampler.seen.get(request.seq_id) if request.seq_id is not None else None
            if earlier is not None:  # a retry: the first answer
                earlier.raise_if_rejected()
                return earlier
            future = self.futures.create(owner)
            future.sample_sequence_ids = [f"{future.request_id}:{i}"
                                          for i in range(request.num_samples)]
            if request.seq_id is not None:
                sampler.seen.remember(request.seq_id, future)

        def start(done: Future) -> None:
            try:
                client = done.result()
                pending = client.sample(request.prompt, request.num_samples,
                                        request.sampling_params,
                                        include_prompt_logprobs=bool(request.prompt_logprobs),
                                        topk_prompt_logprobs=request.topk_prompt_logprobs)
            except Exception as e:  # refused (at once when the sampler is loaded) or failed
                future.fail(e)
                return
            future.follow(pending, lambda response: _mask_prompt_logprobs(response, last_n))

        sampler.client.add_done_callback(start)
        future.raise_if_rejected()
        return future

    # -- server

    def capabilities(self) -> types.GetServerCapabilitiesResponse:
        """The served base models."""
        return types.GetServerCapabilitiesResponse(supported_models=[
            types.SupportedModel(model_name=name, trainable=True, sampleable=True)
            for name in self.registry.names()])

    def close(self) -> None:
        """Release every session (server shutdown)."""
        with self._lock:
            sessions = list(self._sessions.values())
        for session in sessions:
            self._release(session, "ended: the server stopped")
        self._loader.shutdown(wait=False, cancel_futures=True)


def download_message(model_id: str, name: str, file: str, expires: int) -> str:
    """The text a download URL's signature covers."""
    return f"download\0{model_id}\0{name}\0{file}\0{expires}"

