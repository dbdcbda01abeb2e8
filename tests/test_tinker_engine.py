"""The Tinker engine's pieces that need no server: key handling, LoRA options, tokenizers."""

import json
import logging
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
import tinker

from tinkerkit import models
from tinkerkit.checkpoint import is_tinker_path, parse_tinker_path, resolve_checkpoint
from tinkerkit.config import load_config
from tinkerkit.data.demo import write_demo_data
from tinkerkit.engines import tinker as engine
from tinkerkit.errors import (
    CheckpointError,
    ConfigError,
    EngineError,
    ModelError,
    NonFiniteGradientError,
)
from tinkerkit.evaluate import run_evaluation
from tinkerkit.serve.store import CheckpointStore

CANARY = "tml-canary-7f3a9c2e51d84b6f"


def test_the_api_key_comes_from_the_environment_only(monkeypatch):
    monkeypatch.delenv("TINKER_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="needs the environment variable TINKER_API_KEY"):
        engine.api_key()
    monkeypatch.setenv("TINKER_API_KEY", "sk-not-a-tinker-key-123")
    with pytest.raises(ConfigError) as info:
        engine.api_key()
    assert "sk-not-a-tinker-key-123" not in str(info.value)
    monkeypatch.setenv("TINKER_API_KEY", CANARY)
    assert engine.api_key() == CANARY
    with pytest.raises(ConfigError, match="unknown key TINKER_API_KEY") as info:
        load_config(None, [f"TINKER_API_KEY={CANARY}"])  # never a config key
    assert CANARY not in str(info.value)


def test_sdk_errors_become_one_line_engine_errors_without_the_key(monkeypatch):
    monkeypatch.setenv("TINKER_API_KEY", CANARY)
    request = httpx.Request("POST", "http://127.0.0.1:1/api/v1/forward_backward")
    response = httpx.Response(401, request=request,
                              json={"detail": f"unknown API key {CANARY}\nsecond line"})
    error = tinker.AuthenticationError("Error code: 401", response=response,
                                       body={"detail": f"unknown API key {CANARY}\nsecond line"})
    text = str(engine.engine_error(error, "forward_backward"))
    assert text == ("Tinker forward_backward: the Tinker server answered 401: unknown API key "
                    "tml-*** second line")
    other = engine.engine_error(RuntimeError(f"key tml-other-secret-99 in {CANARY}"), "sample")
    assert str(other) == "Tinker sample: RuntimeError: key tml-*** in tml-***"

    class Failing:
        def result(self, timeout=None):
            raise error

    failures = []
    with pytest.raises(EngineError) as info:
        engine.TinkerFuture(Failing(), "optim_step", failures.append).result()
    assert info.value.__cause__ is None and info.value.__suppress_context__  # no SDK chain
    assert CANARY not in str(info.value) and failures == [info.value]


def test_a_skipped_step_on_a_non_finite_gradient_is_recognized_and_nothing_else():
    # As the SDK raises a failed future of tinkerkit serve (its message wraps the server's).
    skipped = tinker.RequestFailedError(
        "Request failed: gradient norm is nan at step 4; step skipped for self.request_id='r1' "
        "and expected type self.model_cls=<class 'OptimStepResponse'>", request_id="r1",
        category=tinker.types.RequestErrorCategory.User)
    error = engine.engine_error(skipped, "optim_step")
    assert isinstance(error, NonFiniteGradientError)
    assert str(error) == "Tinker optim_step: gradient norm is nan at step 4; step skipped"
    other = tinker.RequestFailedError("Request failed: internal error: RuntimeError: CUDA out of "
                                      "memory", request_id="r2",
                                      category=tinker.types.RequestErrorCategory.Server)
    request = httpx.Request("POST", "http://127.0.0.1:1/api/v1/retrieve_future")
    for failure in (other, tinker.APIConnectionError(request=request)):
        error = engine.engine_error(failure, "optim_step")
        assert type(error) is EngineError, error
    assert str(engine.engine_error(other, "optim_step")) == (
        "Tinker optim_step: RequestFailedError: Request failed: internal error: RuntimeError: "
        "CUDA out of memory")


def _config(**overrides):
    return load_config(None, ["BACKEND=tinker", *[f"{k}={v}" for k, v in overrides.items()]])


def test_lora_settings_map_to_the_sdk_switches_or_are_refused():
    assert engine.lora_options(_config()) == {"train_attn": True, "train_mlp": True,
                                              "train_unembed": False}
    assert engine.lora_options(_config(LORA_TARGETS="mlp", TRAIN_UNEMBED=True)) == {
        "train_attn": False, "train_mlp": True, "train_unembed": True}
    assert engine.lora_options(_config(LORA_TARGETS="attention"))["train_mlp"] is False
    with pytest.raises(ConfigError) as info:
        engine.lora_options(_config(LORA_ALPHA=16, LORA_DROPOUT=0.1, LORA_TARGETS="q_proj,v_proj"))
    assert str(info.value) == (
        "BACKEND=tinker does not support LORA_ALPHA=16.0 (Tinker sets the LoRA scale itself; "
        "leave it None); LORA_DROPOUT=0.1 (Tinker trains without dropout); "
        "LORA_TARGETS='q_proj,v_proj' (Tinker takes attention, mlp or all-linear)")


def test_the_base_url_defaults_to_the_environment(monkeypatch):
    monkeypatch.setenv("TINKER_BASE_URL", "http://127.0.0.1:8123")
    assert _config().tinker_base_url == "http://127.0.0.1:8123"
    assert _config(TINKER_BASE_URL="https://example.org").tinker_base_url == "https://example.org"
    monkeypatch.delenv("TINKER_BASE_URL")
    assert _config().tinker_base_url is None
    with pytest.raises(ConfigError, match="must be an http:// or https:// URL"):
        _config(TINKER_BASE_URL="127.0.0.1:8000")


def test_an_unreachable_server_fails_in_seconds(monkeypatch):
    for name in ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "https_proxy", "http_proxy",
                 "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TINKER_API_KEY", CANARY)
    with socket.socket() as sock:  # a port that nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = _config(TINKER_BASE_URL=f"http://127.0.0.1:{port}")
    with pytest.raises(EngineError, match=f"cannot reach the Tinker server at http://127.0.0.1:"
                                          f"{port}.*is `tinkerkit serve` running there"):
        engine.create_training_client(config)


def test_a_web_server_that_is_not_tinker_fails_within_a_minute_naming_the_url(monkeypatch,
                                                                             tmp_path):
    for name in ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "https_proxy", "http_proxy",
                 "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TINKER_API_KEY", CANARY)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind",
                               "127.0.0.1"], cwd=tmp_path, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while engine._connect_error(f"http://127.0.0.1:{port}", 1.0) is not None:
            assert time.monotonic() < deadline, "http.server did not start"
            time.sleep(0.1)
        config = _config(TINKER_BASE_URL=f"http://127.0.0.1:{port}")
        started = time.monotonic()
        with pytest.raises(EngineError) as info:
            engine.create_training_client(config)
        assert time.monotonic() - started < 60
        assert str(info.value) == (
            f"cannot reach the Tinker server at http://127.0.0.1:{port}: a web server that is "
            f"not Tinker answers there (GET http://127.0.0.1:{port}/api/v1/healthz: HTTP 404 "
            "File not found) (is `tinkerkit serve` running there? set TINKER_BASE_URL)")
        with pytest.raises(EngineError, match="a web server that is not Tinker"):
            engine.rest_client(f"http://127.0.0.1:{port}")  # export and checkpoint listing too
    finally:
        server.terminate()
        server.wait(10)


class _Unavailable(BaseHTTPRequestHandler):
    """A server whose health route answers as Tinker's does and which answers every POST
    with 503 (a proxy in front of a backend that is down); it counts the POSTs."""

    posts = 0

    def _answer(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._answer(200, {"status": "ok"} if self.path == "/api/v1/healthz" else {})

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        type(self).posts += 1
        self._answer(503, {"detail": "upstream unavailable"})

    def log_message(self, *args):
        pass


def test_a_server_that_answers_503_to_every_request_fails_in_bounded_time(monkeypatch):
    for name in ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "https_proxy", "http_proxy",
                 "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TINKER_API_KEY", CANARY)
    monkeypatch.setattr(engine, "UNAVAILABLE_SECONDS", 3.0)  # 30 s by default
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Unavailable)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    try:
        expected = (f"the Tinker server at {url} answers POST /api/v1/client/config with HTTP 503 "
                    "Service Unavailable (for 3 s): it is up but serves no request; try again "
                    "later, or check the server")
        started = time.monotonic()
        with pytest.raises(EngineError) as info:  # tinkerkit train
            engine.create_training_client(_config(TINKER_BASE_URL=url))
        assert 3.0 <= time.monotonic() - started < 10
        assert str(info.value) == expected
        assert _Unavailable.posts >= 2  # asked again until the bound, as a restart would pass
        with pytest.raises(EngineError) as info:  # tinkerkit eval (and export's listing)
            engine.create_sampling_client(None, url, base_model="Qwen/Qwen3-8B")
        assert str(info.value) == expected
    finally:
        server.shutdown()
        server.server_close()


def test_known_base_models_tokenize_offline(monkeypatch):
    def no_hub(*args, **kwargs):
        raise AssertionError("the hub (or the SDK's lookup) was asked")

    monkeypatch.setattr(models, "hub_reachable", no_hub)
    monkeypatch.setattr(tinker.lib.public_interfaces.sampling_client,
                        "_load_tokenizer_from_model_info", no_hub)
    hub_id = "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert models.registry_name_of(hub_id) == "smollm2-135m-instruct"
    tokenizer = engine.load_tinker_tokenizer(hub_id)
    assert tokenizer.encode("<|im_start|>user") == [1, 4093]
    # An alias counts once its registry entry exists (qwen3-tokenizer comes with long sequences).
    monkeypatch.setitem(models.TOKENIZER_ALIASES, "Example/Alias-1B", "smollm2-135m-instruct")
    assert models.offline_tokenizer("Example/Alias-1B") == "smollm2-135m-instruct"
    assert len(engine.load_tinker_tokenizer("Example/Alias-1B")) == 49152
    monkeypatch.setitem(models.TOKENIZER_ALIASES, "Example/Missing-1B", "no-such-entry")
    assert models.offline_tokenizer("Example/Missing-1B") is None


def test_unknown_base_models_fall_back_to_the_sdk_lookup(monkeypatch):
    asked = []

    def sdk_lookup(name, tokenizer_id=None):
        asked.append((name, tokenizer_id))
        return "the SDK's tokenizer"

    monkeypatch.setattr(tinker.lib.public_interfaces.sampling_client,
                        "_load_tokenizer_from_model_info", sdk_lookup)
    monkeypatch.setattr(models, "hub_reachable", lambda: True)
    assert engine.load_tinker_tokenizer("meta-llama/Llama-3.1-8B", "hint") == "the SDK's tokenizer"
    assert asked == [("meta-llama/Llama-3.1-8B", "hint")]
    # Offline, the local HF cache answers at once instead of the hub client's retries.
    monkeypatch.setattr(models, "hub_reachable", lambda: False)
    with pytest.raises(ModelError, match="not in the local Hugging Face cache and the hub cannot"):
        engine.load_tinker_tokenizer("Nobody/NoModel-1B")
    assert len(asked) == 1


@pytest.mark.skipif("qwen3-tokenizer" not in models.REGISTRY,
                    reason="the registry's Qwen3 tokenizer comes with the long-sequence work")
def test_qwen3_base_models_use_the_offline_qwen_tokenizer(monkeypatch):
    def no_hub(*args, **kwargs):
        raise AssertionError("the hub (or the SDK's lookup) was asked")

    monkeypatch.setattr(models, "hub_reachable", no_hub)
    monkeypatch.setattr(tinker.lib.public_interfaces.sampling_client,
                        "_load_tokenizer_from_model_info", no_hub)
    tokenizer = engine.load_tinker_tokenizer("Qwen/Qwen3-8B")
    assert tokenizer.encode("<|im_start|>user\nHello<|im_end|>") == [151644, 872, 198, 9707,
                                                                      151645]


def test_the_sdks_long_poll_notices_are_dropped_and_its_other_warnings_kept(caplog):
    engine.quiet_long_polls()
    engine.quiet_long_polls()  # installed once
    sdk_logger = logging.getLogger("tinker.lib.api_future_impl")
    assert sum(isinstance(f, engine._LongPollNotice) for f in sdk_logger.filters) == 1
    with caplog.at_level(logging.WARNING):
        sdk_logger.warning("Retrying request self.request_id='abc' because of try_again")
        sdk_logger.warning("Sampling is paused for sampler s1. Reason: capacity")
    assert [r.getMessage() for r in caplog.records] == [
        "Sampling is paused for sampler s1. Reason: capacity"]


def _no_proxy(monkeypatch):
    for name in ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "https_proxy", "http_proxy",
                 "all_proxy"):
        monkeypatch.delenv(name, raising=False)


def _free_port() -> int:
    with socket.socket() as sock:  # a port that nothing listens on once closed
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _Pending:
    """A future that is not done for the first ``polls`` waits, then returns ``value``."""

    def __init__(self, polls: int | None, value=None, error: Exception | None = None) -> None:
        self.polls, self.value, self.error, self.waits = polls, value, error, 0

    def result(self, timeout=None):
        if timeout is None and self.polls is not None:  # blocks until done
            self.waits = max(self.waits, self.polls)
        if self.polls is None or self.waits < self.polls:
            self.waits += 1
            raise TimeoutError
        if self.error is not None:
            raise self.error
        return self.value

    def done(self) -> bool:
        return self.polls is not None and self.waits >= self.polls


def test_a_wait_fails_once_the_server_has_accepted_no_connection_for_a_while(monkeypatch):
    """The SDK retries a lost connection for as long as it is waited on: a training run whose
    server stopped between two steps waited forever. A wait now checks the server and fails
    once it has accepted no TCP connection for UNREACHABLE_SECONDS."""
    _no_proxy(monkeypatch)
    monkeypatch.setattr(engine, "UNREACHABLE_SECONDS", 0.3)
    monkeypatch.setattr(engine, "POLL_SECONDS", 0.05)
    url = f"http://127.0.0.1:{_free_port()}"
    failures = []
    never = _Pending(None)
    with pytest.raises(EngineError) as info:
        engine.TinkerFuture(never, "optim_step", failures.append, server=url).result()
    assert str(info.value) == (f"Tinker optim_step: cannot reach the Tinker server at {url} for "
                               "0 s (Connection refused); it stopped, or the network is down")
    assert failures == [info.value] and never.waits >= 2
    # Without a server (a client made elsewhere) or with a timeout, the wait is the SDK's own.
    slow = _Pending(3, value="done")
    assert engine.TinkerFuture(slow, "optim_step").result() == "done"
    with pytest.raises(EngineError, match="Tinker sample: TimeoutError"):
        engine.TinkerFuture(_Pending(None), "sample", server=url).result(timeout=0.1)


def test_a_wait_on_a_server_that_answers_goes_on_and_the_calls_own_timeout_is_kept(monkeypatch):
    _no_proxy(monkeypatch)
    monkeypatch.setattr(engine, "UNREACHABLE_SECONDS", 0.0)
    monkeypatch.setattr(engine, "POLL_SECONDS", 0.01)
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen(64)
        url = f"http://127.0.0.1:{listening.getsockname()[1]}"
        slow = _Pending(5, value="loss")  # a long step on a live server: waits on
        assert engine.TinkerFuture(slow, "forward_backward", server=url).result() == "loss"
        assert slow.waits == 5
        own = _Pending(1, error=TimeoutError("the call timed out"))  # done: its own error
        with pytest.raises(EngineError) as info:
            engine.TinkerFuture(own, "sample", server=url).result()
        assert str(info.value) == "Tinker sample: TimeoutError: the call timed out"


def test_a_key_that_no_http_header_can_carry_is_refused_before_the_sdk_hangs_on_it(monkeypatch):
    """SDK 0.38.0 hangs in ServiceClient creation on a key with a non-ASCII character."""
    for key in ("tml-caf\u00e9", "tml-abc def", "tml-abc\tdef", "tml-abc\x07"):
        monkeypatch.setenv("TINKER_API_KEY", key)
        with pytest.raises(ConfigError) as info:
            engine.api_key()
        assert str(info.value) == ("TINKER_API_KEY holds a space, a control character or a "
                                   "non-ASCII character, which an HTTP header cannot carry; copy "
                                   "the key again")
    monkeypatch.setenv("TINKER_API_KEY", f"  {CANARY}\n")  # surrounding whitespace is dropped
    assert engine.api_key() == CANARY


def test_the_tinker_scheme_is_recognized_in_any_case():
    """URI schemes are case-insensitive (RFC 3986 section 3.1); the SDK and servers get the
    lowercase form."""
    assert is_tinker_path("TINKER://run-1/weights/step_000002")
    assert not is_tinker_path("tinker:/run-1/weights/x") and not is_tinker_path("runs/tinker://x")
    assert resolve_checkpoint("TINKER://run-1/weights/step_2") == "tinker://run-1/weights/step_2"
    parsed = parse_tinker_path("Tinker://run-1/sampler_weights/s")
    assert (parsed.tinker_path, parsed.training_run_id, parsed.checkpoint_type) == (
        "tinker://run-1/sampler_weights/s", "run-1", "sampler")
    assert CheckpointStore.parse_tinker_path("TINKER://a:train:0/external_weights/e") == (
        "a:train:0", "external_weights", "e")


@pytest.mark.parametrize("path", ["tinker://run-1/checkpoints/x", "tinker://run-1/weights",
                                  "tinker://run-1/weights/", "TINKER:///weights/x",
                                  "tinker://run-1/weights/a/b"])
def test_a_malformed_tinker_path_is_refused_before_any_server_is_contacted(path, monkeypatch,
                                                                           tmp_path):
    def no_call(*args, **kwargs):
        raise AssertionError("a server was contacted")

    monkeypatch.setattr(engine, "connect", no_call)
    monkeypatch.setattr(engine, "rest_client", no_call)
    data = write_demo_data(tmp_path / "test.jsonl", n=2, seed=0)
    with pytest.raises(CheckpointError) as info:
        run_evaluation(load_config(None, ["DEVICE=cpu"]), [str(data)], checkpoint=path,
                       output=tmp_path / "results.json")
    assert str(info.value) == (f"checkpoint {path}: not a tinker://<run>/"
                               "{weights|sampler_weights|external_weights}/<name> path")
    assert not (tmp_path / "results.json").exists()
