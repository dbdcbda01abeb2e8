"""``tinkerkit serve`` driven by the real ``tinker`` SDK on a tiny random Llama.

Each server runs in a thread on a free loopback port; the SDK talks HTTP to it exactly as to the
hosted service. Results are compared with the local engine run in process on the same data.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import warnings
from pathlib import Path

import httpx
import numpy as np
import pytest
import tinker
import torch
from safetensors.torch import load_file
from tinker import types
from tinker.proto import tinker_public_pb2 as public_pb
from tinker.proto.request_conv import forward_backward_request_to_proto
from tinker.proto.response_conv import deserialize_proto_response

from helpers import KEY, checkpoint_dir, running_server, service
from tinkerkit.engines import tinker as tinker_engine
from tinkerkit.engines.local import LocalSamplingClient, LocalTrainingClient
from tinkerkit.errors import ConfigError, EngineError
from tinkerkit.export import export_adapter
from tinkerkit.serve import make_server, protobuf
from tinkerkit.serve.app import REAPER_INTERVAL_SECONDS
from tinkerkit.serve.futures import CANCELLED_MESSAGE, ServerFuture
from tinkerkit.serve.registry import read_models_file
from tinkerkit.serve.state import (
    SDK_HEARTBEAT_SECONDS,
    SESSION_TIMEOUT_SECONDS,
    ModelRunner,
    _SeenRequests,
)

OTHER_KEY = "tml-someone-else"
ADAM = types.AdamParams(learning_rate=1e-2)
LORA = {"rank": 4, "seed": 7, "train_unembed": False}


def datums() -> list[types.Datum]:
    """Two datums of different lengths, loss on part of each."""
    def datum(tokens, weights):
        return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                           loss_fn_inputs={"target_tokens": tokens[1:], "weights": weights})
    return [datum([1, 17, 305, 4431, 9, 28, 611, 2], [0, 0, 1, 1, 1, 1, 1]),
            datum([1, 88, 1024, 77, 3], [0, 1, 1, 1])]


def local_client(model, tmp_path) -> LocalTrainingClient:
    """The in-process engine with the settings the server derives from ``LORA``."""
    return LocalTrainingClient(model, LORA["rank"], seed=LORA["seed"], target_modules="all-linear",
                               train_unembed=False, checkpoint_root=tmp_path / "local")


def logprobs(output: types.ForwardBackwardOutput) -> list[np.ndarray]:
    return [out["logprobs"].to_numpy() for out in output.loss_fn_outputs]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("serve-root")) as running:
        yield running


def test_forward_backward_and_optim_step_equal_the_local_engine(server, tiny_model, tmp_path):
    local = local_client(tiny_model, tmp_path)
    with service(server.url) as client:
        training = client.create_lora_training_client(tiny_model, **LORA).result()
        assert training.model_id.endswith(":train:0")
        info = training.get_info()
        assert (info.lora_rank, info.model_data.arch) == (4, "LlamaForCausalLM")
        remote_steps, local_steps = [], []
        for _ in range(3):  # pipelined: the optimizer step is submitted before the result is read
            fwd_bwd, optim = training.forward_backward(datums(), "cross_entropy"), \
                training.optim_step(ADAM)
            remote_steps.append((fwd_bwd.result(), optim.result()))
            local_steps.append((local.forward_backward(datums()).result(),
                                local.optim_step(ADAM).result()))
        evaluation = training.forward(datums(), "cross_entropy").result()
    for (remote, remote_optim), (here, here_optim) in zip(remote_steps, local_steps):
        assert remote.metrics["loss:sum"] == pytest.approx(here.metrics["loss:sum"], rel=1e-6)
        for a, b in zip(logprobs(remote), logprobs(here)):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
        assert remote_optim.metrics["grad_norm"] == pytest.approx(here_optim.metrics["grad_norm"],
                                                                  rel=1e-5)
    # the known loss: sum over tokens of weights * -logprob, and it went down while training
    first = remote_steps[0][0]
    expected = -sum(float((lp * np.array(d.loss_fn_inputs["weights"].tolist())).sum())
                    for lp, d in zip(logprobs(first), datums()))
    assert first.metrics["loss:sum"] == pytest.approx(expected, rel=1e-6)
    assert evaluation.metrics["loss:sum"] < first.metrics["loss:sum"]
    assert [s[1].metrics["step"] for s in remote_steps] == [1.0, 2.0, 3.0]


def test_save_state_and_resume_with_and_without_optimizer(server, tiny_model):
    with service(server.url) as client:
        training = client.create_lora_training_client(tiny_model, **LORA).result()
        training.forward_backward(datums(), "cross_entropy")
        training.optim_step(ADAM).result()
        first_loss = training.forward(datums(), "cross_entropy").result().metrics["loss:sum"]
        path = training.save_state("step1").result().path
        assert path == f"tinker://{training.model_id}/weights/step1"
        training.forward_backward(datums(), "cross_entropy")
        expected = training.optim_step(ADAM).result()
        after = training.forward(datums(), "cross_entropy").result()

        resumed = client.create_training_client_from_state_with_optimizer(path).result()
        assert resumed.model_id != training.model_id
        resumed.forward_backward(datums(), "cross_entropy")
        step = resumed.optim_step(ADAM).result()
        assert step.metrics["step"] == 2.0  # the optimizer's step count came back
        assert step.metrics["grad_norm"] == pytest.approx(expected.metrics["grad_norm"], rel=1e-6)
        again = resumed.forward(datums(), "cross_entropy").result()
        assert again.metrics["loss:sum"] == pytest.approx(after.metrics["loss:sum"], rel=1e-6)

        fresh = client.create_training_client_from_state(path).result()  # weights only
        fresh.forward_backward(datums(), "cross_entropy")
        assert fresh.optim_step(ADAM).result().metrics["step"] == 1.0
        with warnings.catch_warnings():  # the SDK's older way, into a live model, still works
            warnings.simplefilter("ignore", FutureWarning)
            fresh.load_state_with_optimizer(path).result()
        assert fresh.forward(datums(), "cross_entropy").result().metrics["loss:sum"] == \
            pytest.approx(first_loss, rel=1e-6)
        with pytest.raises(tinker.BadRequestError, match="exists"):
            training.save_state("step1").result()


def test_sampling_equals_the_local_sampling_client(server, tiny_model, tmp_path):
    prompt = types.ModelInput.from_ints([1, 17, 305, 4431])
    greedy = types.SamplingParams(max_tokens=8, temperature=0.0, stop=[])
    with service(server.url) as client:
        training = client.create_lora_training_client(tiny_model, **LORA).result()
        for _ in range(2):
            training.forward_backward(datums(), "cross_entropy")
            training.optim_step(types.AdamParams(learning_rate=5e-2))
        saved = training.save_weights_for_sampler("sampler1").result()
        sampler = client.create_sampling_client(model_path=saved.path).result()
        response = sampler.sample(prompt, 3, greedy, include_prompt_logprobs=True).result()
        snapshot = training.save_weights_and_get_sampling_client().result()
        from_snapshot = snapshot.sample(prompt, 1, greedy).result()
        base = client.create_sampling_client(base_model=tiny_model).result()
        from_base = base.sample(prompt, 1, greedy).result()
        scored = sampler.compute_logprobs(prompt).result()
        assert sampler.get_base_model() == tiny_model
    directory = checkpoint_dir(server.root, saved.path)
    local = LocalSamplingClient(tiny_model, str(directory)).sample(
        prompt, 1, greedy, include_prompt_logprobs=True).result()
    local_base = LocalSamplingClient(tiny_model).sample(prompt, 1, greedy).result()
    tokens = local.sequences[0].tokens
    assert len(tokens) == 8
    assert [s.tokens for s in response.sequences] == [tokens] * 3
    assert from_snapshot.sequences[0].tokens == tokens
    assert from_base.sequences[0].tokens == local_base.sequences[0].tokens != tokens
    ids = [s.sequence_id for s in response.sequences]
    assert len(set(ids)) == 3 and all(ids)
    np.testing.assert_allclose(response.sequences[0].logprobs, local.sequences[0].logprobs,
                               rtol=1e-5, atol=1e-5)
    assert response.prompt_logprobs[0] is None and scored[0] is None
    np.testing.assert_allclose(response.prompt_logprobs[1:], local.prompt_logprobs[1:], rtol=1e-5)
    np.testing.assert_allclose(scored[1:], local.prompt_logprobs[1:], rtol=1e-5)


def test_checkpoint_and_run_listings(server, tiny_model):
    with service(server.url) as client:
        training = client.create_lora_training_client(
            tiny_model, **LORA, user_metadata={"purpose": "listing"}).result()
        training.save_state("a", user_metadata={"note": "first"}).result()
        training.save_weights_for_sampler("b").result()
        rest = tinker.RestClient(base_url=server.url, api_key=KEY)
        listed = rest.list_checkpoints(training.model_id).result().checkpoints
        assert [(c.checkpoint_id, c.checkpoint_type) for c in listed] == [
            ("weights/a", "training"), ("sampler_weights/b", "sampler")]
        assert listed[0].user_metadata == {"note": "first"} and listed[0].size_bytes > 0
        run = rest.get_training_run(training.model_id).result()
        assert (run.base_model, run.lora_rank, run.user_metadata) == (
            tiny_model, 4, {"purpose": "listing"})
        assert run.last_checkpoint.checkpoint_id == "weights/a"
        assert training.model_id in [r.training_run_id for r in
                                     rest.list_training_runs(limit=100).result().training_runs]
        mine = rest.list_user_checkpoints().result()
        assert {"weights/a", "sampler_weights/b"} <= {c.checkpoint_id for c in mine.checkpoints}
        info = rest.get_weights_info_by_tinker_path(listed[0].tinker_path).result()
        assert (info.lora_rank, info.train_unembed, info.train_mlp) == (4, False, True)
        rest.delete_checkpoint_from_tinker_path(listed[1].tinker_path).result()
        assert [c.checkpoint_id for c in rest.list_checkpoints(training.model_id).result()
                .checkpoints] == ["weights/a"]


def test_external_weights_download_as_a_peft_adapter(server, tiny_model, tmp_path):
    with service(server.url) as client:
        training = client.create_lora_training_client(tiny_model, **LORA).result()
        training.forward_backward(datums(), "cross_entropy")
        training.optim_step(ADAM)
        sampler_path = training.save_weights_for_sampler("same").result().path
        external = training.save_weights_external("export").result().path
        assert external == f"tinker://{training.model_id}/external_weights/export"
        urls = tinker.RestClient(base_url=server.url, api_key=KEY) \
            .get_external_weights_urls(external).result()
    assert sorted(urls.urls) == ["adapter_config.json", "adapter_model.safetensors"]
    for name, url in urls.urls.items():  # signed URLs: no API key needed
        (tmp_path / name).write_bytes(urllib.request.urlopen(url).read())
    downloaded = load_file(tmp_path / "adapter_model.safetensors")
    reference = load_file(checkpoint_dir(server.root, sampler_path) / "adapter_model.safetensors")
    assert downloaded.keys() == reference.keys() and len(downloaded) > 0
    assert all(torch.equal(downloaded[k], reference[k]) for k in downloaded)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["r"] == 4
    exported = export_adapter(checkpoint_dir(server.root, external), tmp_path / "exported")
    assert all(torch.equal(t, downloaded[k]) for k, t in
               load_file(exported / "adapter_model.safetensors").items())
    tampered = urls.urls["adapter_config.json"].replace("signature=", "signature=0")
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(tampered)
    assert error.value.code == 403


def test_checkpoints_survive_a_restart(tmp_path, tiny_model):
    with running_server(tmp_path / "root") as running, service(running.url) as client:
        training = client.create_lora_training_client(tiny_model, **LORA).result()
        training.forward_backward(datums(), "cross_entropy")
        training.optim_step(ADAM)
        path = training.save_state("keep").result().path
        before = training.forward(datums(), "cross_entropy").result()
    with running_server(tmp_path / "root") as running, service(running.url) as client:
        rest = tinker.RestClient(base_url=running.url, api_key=KEY)
        model_id = path.split("/")[2]
        assert [c.tinker_path for c in rest.list_checkpoints(model_id).result().checkpoints] \
            == [path]
        resumed = client.create_training_client_from_state_with_optimizer(path).result()
        after = resumed.forward(datums(), "cross_entropy").result()
    assert after.metrics["loss:sum"] == pytest.approx(before.metrics["loss:sum"], rel=1e-6)


def test_a_port_in_use_is_a_one_line_error(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError) as caught:
            make_server("127.0.0.1", port, root=tmp_path / "root")
    assert str(caught.value) == (f"cannot listen on 127.0.0.1:{port}: Address already in use "
                                 "(another server listens there: stop it or pick another --port)")


def test_api_keys_are_required_when_listed(tmp_path, tiny_model):
    keys = tmp_path / "keys.txt"
    keys.write_text("# accepted keys\ntml-listed-key\n")
    with pytest.raises(ConfigError, match="requires --api-keys"):
        make_server("0.0.0.0", 0, root=tmp_path / "root")
    with running_server(tmp_path / "root", api_keys_file=keys) as running:
        url = running.url
        for headers in ({}, {"X-API-Key": "tml-not-listed"}, {"X-API-Key": "listed-key"}):
            answer = httpx.get(f"{url}/api/v1/get_server_capabilities", headers=headers)
            assert answer.status_code == 401, headers
        with pytest.raises(tinker.AuthenticationError):
            tinker.ServiceClient(base_url=url, api_key="tml-not-listed") \
                .create_lora_training_client(tiny_model, rank=4)
        with service(url, "tml-listed-key") as client:
            assert client.create_lora_training_client(tiny_model, **LORA).result().model_id


def test_sessions_see_only_their_own_key(server, tiny_model):
    with service(server.url) as client:
        training = client.create_lora_training_client(tiny_model, **LORA).result()
        path = training.save_state("private").result().path
    with service(server.url, OTHER_KEY) as other:
        rest = tinker.RestClient(base_url=server.url, api_key=OTHER_KEY)
        with pytest.raises(tinker.NotFoundError):
            rest.list_checkpoints(training.model_id).result()
        with pytest.raises(tinker.NotFoundError):
            other.create_training_client_from_state(path).result()
        assert path not in [c.tinker_path for c in rest.list_user_checkpoints().result().checkpoints]
    headers = {"X-API-Key": OTHER_KEY, "Content-Type": protobuf.PROTO_CONTENT_TYPE}
    request = types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(data=datums(), loss_fn="cross_entropy"),
        model_id=training.model_id, seq_id=1)
    answer = httpx.post(f"{server.url}/api/v1/forward_backward", headers=headers,
                        content=forward_backward_request_to_proto(request).SerializeToString())
    assert answer.status_code == 404


def test_malformed_requests_get_4xx_and_the_server_goes_on(server):
    headers = {"X-API-Key": KEY}
    post = lambda route, **kw: httpx.post(f"{server.url}/api/v1/{route}", **kw)  # noqa: E731
    cases = [
        post("forward_backward", headers={**headers, "Content-Type": protobuf.PROTO_CONTENT_TYPE},
             content=b"\xff\xfe not protobuf"),
        post("forward_backward", headers=headers, json={"model_id": "x"}),
        post("create_session", headers=headers, content=b"{not json"),
        post("create_session", headers=headers, json=[1, 2]),
        post("create_session", headers=headers, content=b"[" * 100_000),
        post("create_session", headers=headers, content=b'{"tags": ' + b"1" * 5000 + b"}"),
        post("create_model", headers=headers, json={"session_id": "s", "model_seq_id": "x"}),
        post("load_weights", headers=headers, json={"model_id": "../../etc", "seq_id": 1,
                                                    "path": "tinker://../weights/x",
                                                    "optimizer": False}),
        post("weights_info", headers=headers, json={"tinker_path": "tinker://a/../../x"}),
        post("retrieve_future", headers=headers, json={"request_id": "nope"}),
        httpx.get(f"{server.url}/api/v1/training_runs/..%2F..%2Fetc/checkpoints", headers=headers),
        httpx.get(f"{server.url}/api/v1/no_such_route", headers=headers),
    ]
    statuses = [answer.status_code for answer in cases]
    assert statuses == [400, 400, 400, 400, 400, 400, 400, 404, 400, 404, 404, 404]
    assert all("detail" in answer.json() for answer in cases)
    assert httpx.get(f"{server.url}/api/v1/healthz").json() == {"status": "ok"}


def test_unknown_base_model_and_models_file(tmp_path, tiny_model):
    models = tmp_path / "models.toml"
    models.write_text(f'[models]\n"Qwen/Qwen3-8B" = "{tiny_model}"\n')
    with running_server(tmp_path / "root", models_file=models) as running, \
            service(running.url) as client:
        with pytest.raises(tinker.BadRequestError) as refused:
            client.create_lora_training_client("meta-llama/Llama-3.1-8B", rank=4).result()
        assert str(refused.value).endswith(  # registry models with weights; no tokenizer-only
            "served models: Qwen/Qwen3-8B, qwen3-moe-tiny-random, qwen3-tiny-random, "
            'smollm2-135m-instruct or a HF model directory on the server"}')
        training = client.create_lora_training_client("Qwen/Qwen3-8B", **LORA).result()
        assert training.get_info().model_data.model_name == "Qwen/Qwen3-8B"
        # no tokenizer_id in the entry: the model directory's own tokenizer, offline
        assert training.get_info().model_data.tokenizer_id == str(Path(tiny_model).resolve())
        assert training.get_tokenizer().encode("Hello world") == [19556, 905]
        assert training.forward(datums(), "cross_entropy").result().metrics["loss:sum"] > 0
        # saved adapters name the model as the client did, so PEFT finds it by itself
        state = training.save_state("named").result().path
        resumed = client.create_training_client_from_state(state).result()
        for path in (state, resumed.save_weights_for_sampler("again").result().path):
            saved = checkpoint_dir(running.root, path)
            config = json.loads((saved / "adapter_config.json").read_text())
            assert config["base_model_name_or_path"] == "Qwen/Qwen3-8B"
            assert json.loads((saved / "tinkerkit_state.json").read_text())["base_model"] == \
                tiny_model
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"models": {"x": {"path": tiny_model, "dtype": "int8"}}}))
    with pytest.raises(ConfigError) as info:
        read_models_file(bad)
    assert str(info.value) == (f"{bad}: models.x: dtype='int8': Input should be 'float32', "
                               "'bfloat16' or 'float16'")


@pytest.mark.parametrize(("text", "problem"), [
    ('[models."Qwen/X"]\npath = "{model}"\ndtyp = "float32"\n',
     "models.Qwen/X: unknown key 'dtyp' (an entry takes path, dtype and tokenizer_id)"),
    ('[models."Qwen/X"]\ndtype = "float32"\n', "models.Qwen/X: 'path' is missing"),
    ('[models."Qwen/X"]\npath = "{model}"\ntokenizer_id = 7\n',
     "models.Qwen/X: tokenizer_id=7: Input should be a valid string"),
    ('[models]\n"Qwen/X" = 42\n', "models.Qwen/X: expected a path (a string) or a table with "
                                    "path, dtype and tokenizer_id, got int"),
    ('[modelz]\n"Qwen/X" = "{model}"\n', "expected a 'models' table of name = path entries"),
    ('[models]\n"Qwen/X" = "{model}"\n[extra]\n',
     "unknown key 'extra' (the file holds one table, 'models')"),
    ('[models]\n"" = "{model}"\n', "a model name is empty"),
])
def test_a_models_file_error_names_the_entry_and_what_is_wrong_with_it(tmp_path, tiny_model,
                                                                        text, problem):
    """A table entry with an unknown key, a missing path or a wrong type used to be reported
    as pydantic's first union branch: 'models.Qwen/X.str: Input should be a valid string'."""
    models = tmp_path / "models.toml"
    models.write_text(text.replace("{model}", tiny_model))
    with pytest.raises(ConfigError) as info:
        read_models_file(models)
    assert str(info.value) == f"{models}: {problem}"


def test_finished_session_stops_heartbeats(server, tiny_model):
    with service(server.url) as client:
        session_id = client.holder.get_session_id()
    answer = httpx.post(f"{server.url}/api/v1/session_heartbeat", headers={"X-API-Key": KEY},
                        json={"session_id": session_id})
    assert answer.status_code == 410


def test_pending_futures_answer_try_again(tmp_path, tiny_model):
    with running_server(tmp_path / "root", long_poll_seconds=0.2) as running, \
            service(running.url) as client:
        training = client.create_lora_training_client(tiny_model, **LORA).result()
        request = types.ForwardBackwardRequest(  # seq ids 1-4 never come: it waits
            forward_backward_input=types.ForwardBackwardInput(data=datums(),
                                                              loss_fn="cross_entropy"),
            model_id=training.model_id, seq_id=5)
        headers = {"X-API-Key": KEY}
        submitted = httpx.post(
            f"{running.url}/api/v1/forward_backward",
            headers={**headers, "Content-Type": protobuf.PROTO_CONTENT_TYPE},
            content=forward_backward_request_to_proto(request).SerializeToString()).json()
        polled = httpx.post(f"{running.url}/api/v1/retrieve_future", headers=headers,
                            json={"request_id": submitted["request_id"]})
        assert polled.json() == {"type": "try_again", "request_id": submitted["request_id"],
                                 "queue_state": "active"}
        # the SDK's own requests (seq 1, 2) still run, polling through try_again answers
        assert training.forward(datums(), "cross_entropy").result().metrics["loss:sum"] > 0


def test_silent_sessions_are_released(server, tiny_model):
    with service(server.url) as client:
        training = client.create_lora_training_client(tiny_model, **LORA).result()
        server.state.session_timeout_seconds = 0.0
        try:
            server.state.release_idle_sessions()
        finally:
            server.state.session_timeout_seconds = SESSION_TIMEOUT_SECONDS
        with pytest.raises(tinker.NotFoundError, match="not loaded"):
            training.forward(datums(), "cross_entropy").result()
        answer = httpx.post(f"{server.url}/api/v1/session_heartbeat", headers={"X-API-Key": KEY},
                            json={"session_id": client.holder.get_session_id()})
        assert answer.status_code == 410


# -- units -------------------------------------------------------------------------------------


def test_runner_starts_requests_in_seq_id_order_and_answers_retries():
    runner = ModelRunner("m", None, None, ServerFuture("create", "owner"))
    started = []
    futures = {seq: ServerFuture(f"r{seq}", "owner") for seq in (1, 2, 3)}
    action = lambda client, future: started.append(future.request_id)  # noqa: E731
    runner.submit(3, futures[3], action)
    runner.submit(2, futures[2], action)
    runner.ready(client=object())
    assert started == []  # 1 has not arrived
    runner.submit(1, futures[1], action)
    assert started == ["r1", "r2", "r3"]
    assert runner.submit(2, ServerFuture("again", "owner"), action) is futures[2]
    late = runner.submit(None, ServerFuture("r4", "owner"), action)
    assert started[-1] == "r4" and not late.done()


def test_seen_requests_forget_the_earliest_arrival_not_the_lowest_id():
    seen = _SeenRequests(capacity=3)
    futures = {seq: ServerFuture(f"r{seq}", "owner") for seq in (5, 1, 2 * 10**9, 7, 8)}
    for seq in (5, 1, 2 * 10**9):  # a clone's ids start at its clone id times 10**9
        seen.remember(seq, futures[seq])
    assert [seen.get(seq) for seq in (5, 1, 2 * 10**9)] == [futures[5], futures[1],
                                                              futures[2 * 10**9]]
    seen.remember(7, futures[7])
    assert len(seen) == 3
    assert seen.get(5) is None  # the earliest arrival, not the lowest id (1) is forgotten
    assert [seen.get(seq) for seq in (1, 2 * 10**9, 7)] == [futures[1], futures[2 * 10**9],
                                                              futures[7]]
    seen.remember(1, futures[1])  # remembered again: now the latest arrival
    seen.remember(8, futures[8])
    assert seen.get(2 * 10**9) is None
    assert [seen.get(seq) for seq in (7, 1, 8)] == [futures[7], futures[1], futures[8]]


def test_runner_retries_of_forgotten_requests_never_run_twice():
    runner = ModelRunner("m", None, None, ServerFuture("create", "owner"))
    runner._seen = _SeenRequests(capacity=2)
    started = []
    action = lambda client, future: started.append(future.request_id)  # noqa: E731
    futures = {seq: ServerFuture(f"r{seq}", "owner") for seq in range(1, 8)}
    runner.ready(client=object())
    for seq in (1, 2, 3):
        runner.submit(seq, futures[seq], action)
    assert started == ["r1", "r2", "r3"]
    retry = runner.submit(1, ServerFuture("again", "owner"), action)  # 1 is forgotten
    assert retry.error is not None and "already used" in retry.error[0]
    assert runner.submit(3, ServerFuture("again", "owner"), action) is futures[3]
    for seq in (5, 6, 7):  # 4 has not arrived: these wait, and 5 is forgotten
        runner.submit(seq, futures[seq], action)
    assert runner.submit(5, ServerFuture("again", "owner"), action) is futures[5]
    runner.submit(4, futures[4], action)
    assert started == [f"r{seq}" for seq in range(1, 8)]
    assert runner.submit(None, ServerFuture("r8", "owner"), action).request_id == "r8"
    assert started[-1] == "r8"


def test_protobuf_round_trips_through_the_sdk_decoders():
    request = types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(data=datums(), loss_fn="cross_entropy"),
        model_id="m", seq_id=5)
    msg = protobuf.parse_forward_backward(
        forward_backward_request_to_proto(request).SerializeToString())
    decoded = protobuf.forward_backward_request(msg)
    assert (decoded.model_id, decoded.seq_id, msg.forward_only) == ("m", 5, False)
    for got, sent in zip(decoded.forward_backward_input.data, datums()):
        assert got.model_input.to_ints() == sent.model_input.to_ints()
        assert got.loss_fn_inputs["weights"].tolist() == sent.loss_fn_inputs["weights"].tolist()

    output = types.ForwardBackwardOutput(
        loss_fn_output_type="ArrayRecord", metrics={"loss:sum": 3.5},
        loss_fn_outputs=[{"logprobs": types.TensorData.from_numpy(np.array(v, np.float32))}
                         for v in ([-1.0, -2.5], [-0.25, -3.0, -4.0])])
    back = deserialize_proto_response(protobuf.encode_forward_backward_output(output),
                                      types.ForwardBackwardOutput)
    assert back.metrics == {"loss:sum": 3.5}
    assert [o["logprobs"].tolist() for o in back.loss_fn_outputs] == [[-1.0, -2.5],
                                                                       [-0.25, -3.0, -4.0]]
    sample = types.SampleResponse(
        sequences=[types.SampledSequence(stop_reason="length", sequence_id="s",
                                         tokens_np=np.array([4, 5], np.int32),
                                         logprobs_np=np.array([-0.5, -1.5], np.float32))],
        prompt_logprobs_np=np.array([np.nan, -2.0], np.float32))
    back = deserialize_proto_response(protobuf.encode_sample_response(sample),
                                      types.SampleResponse)
    assert (back.sequences[0].tokens, back.sequences[0].logprobs) == ([4, 5], [-0.5, -1.5])
    assert back.sequences[0].stop_reason == "length" and back.prompt_logprobs == [None, -2.0]
    assert public_pb.SampleResponse.FromString(protobuf.encode_sample_response(sample)).sequences


def test_a_model_that_fails_to_load_leaves_no_training_run(tmp_path, tiny_model):
    """A models file entry whose directory has a config.json but is no model passes the
    startup check and fails when a client creates a model on it: that failure used to leave a
    run.json behind, listed by list_training_runs for ever as a run with nothing in it."""
    broken = tmp_path / "not-a-model"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    models = tmp_path / "models.toml"
    models.write_text(f'[models]\n"Broken/Model" = "{broken}"\n"Good/Model" = "{tiny_model}"\n')
    with running_server(tmp_path / "root", models_file=models) as running, \
            service(running.url) as client:
        with pytest.raises(tinker.RequestFailedError, match="could not be loaded"):
            client.create_lora_training_client("Broken/Model", **LORA).result()
        good = client.create_lora_training_client("Good/Model", **LORA).result()
        rest = tinker.RestClient(base_url=running.url, api_key=KEY)
        runs = rest.list_training_runs().result().training_runs
        assert [run.training_run_id for run in runs] == [good.model_id]
        assert [run.base_model for run in runs] == ["Good/Model"]
        assert sorted(p.name for p in (running.root / "runs").iterdir()) == [good.model_id]


def _sample_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("tinkerkit-sample")]


def _wait(condition, seconds: float) -> float:
    """Seconds until ``condition()`` held; fails after ``seconds``."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < seconds, f"not within {seconds} s"
        time.sleep(0.05)
    return time.monotonic() - started


def test_a_huge_sample_stops_when_its_session_ends_and_at_shutdown(tmp_path, tiny_model):
    # 4 x 256 samples of 500 tokens each, 32 rows at a time: minutes of CPU if nothing stops it.
    huge = types.SamplingParams(max_tokens=100_000, temperature=1.0, seed=3)
    prompt = types.ModelInput.from_ints([1, 17, 305])
    assert _sample_threads() == []
    with running_server(tmp_path / "root") as running:
        with service(running.url) as client:
            sampler = client.create_sampling_client(base_model=tiny_model).result()
            for _ in range(4):
                sampler.sample(prompt, 256, huge)
            _wait(lambda: _sample_threads(), 60)  # generating
            time.sleep(0.5)
        # the session ended: its samples are cancelled, the worker stops at a decode step
        assert _wait(lambda: not _sample_threads(), 15) < 15
        client = tinker.ServiceClient(base_url=running.url, api_key=KEY)
        try:
            sampler = client.create_sampling_client(base_model=tiny_model).result()
            for _ in range(4):
                sampler.sample(prompt, 256, huge)
            _wait(lambda: _sample_threads(), 60)
            time.sleep(0.5)
            # the server's shutdown (server_close on Ctrl-C in `tinkerkit serve`) releases the
            # live session: the same cancellation, so the process exits without waiting
            running.state.close()
            assert _wait(lambda: not _sample_threads(), 15) < 15
        finally:  # the server has stopped: finishing the session may never be answered
            with contextlib.suppress(Exception):
                client.close("interrupted").result(timeout=10)


# A client that submits huge samples, prints its session id and waits to be killed.
_KILLED_CLIENT = """
import sys, time, warnings, tinker
from tinker import types
warnings.simplefilter("ignore")
client = tinker.ServiceClient(base_url=sys.argv[1], api_key=sys.argv[2])
sampler = client.create_sampling_client(base_model=sys.argv[3]).result()
huge = types.SamplingParams(max_tokens=100_000, temperature=1.0, seed=3)
futures = [sampler.sample(types.ModelInput.from_ints([1, 17, 305]), 256, huge) for _ in range(4)]
print(client.holder.get_session_id(), flush=True)
time.sleep(3600)
"""


@pytest.mark.slow  # about a minute of sampling on the CPU until the session times out
def test_a_killed_clients_samples_stop_within_the_heartbeat_bound(tmp_path, tiny_model):
    # The SDK beats every 10 s (tinker 0.38.0); three missed beats release the session.
    assert SDK_HEARTBEAT_SECONDS == 10 and SESSION_TIMEOUT_SECONDS == 40
    bound = SESSION_TIMEOUT_SECONDS + REAPER_INTERVAL_SECONDS + 10  # + the last decode step
    earlier = set(_sample_threads())  # idle workers of samplers that other tests left open

    def sampling() -> set:
        return set(_sample_threads()) - earlier

    with running_server(tmp_path / "root") as running:
        client = subprocess.Popen([sys.executable, "-c", _KILLED_CLIENT, running.url, KEY,
                                   tiny_model], stdout=subprocess.PIPE, text=True)
        try:
            session_id = client.stdout.readline().strip()
            _wait(sampling, 120)  # generating
            time.sleep(1)
        finally:
            client.kill()  # no ServiceClient.close: only its heartbeats stop
            client.wait(30)
        seconds = _wait(lambda: not sampling(), bound)
        assert seconds < bound
        answer = httpx.post(f"{running.url}/api/v1/session_heartbeat", headers={"X-API-Key": KEY},
                            json={"session_id": session_id})
        assert answer.status_code == 410  # released


def test_a_cancelled_queued_call_says_so():
    from concurrent.futures import Future

    queued = Future()
    future = ServerFuture("req-1", KEY)
    future.follow(queued)
    queued.cancel()  # what closing a released session's clients does to their queued calls
    assert future.error == (CANCELLED_MESSAGE, types.RequestErrorCategory.User)
    assert CANCELLED_MESSAGE == ("cancelled: its session ended (closed by the client, silent past "
                                 "the heartbeat timeout, or the server stopped) before it ran")


def test_a_cancelled_local_sampler_stops_at_a_decode_step(tiny_model):
    client = LocalSamplingClient(tiny_model)
    huge = types.SamplingParams(max_tokens=100_000, temperature=1.0, seed=3)
    running = client.sample(types.ModelInput.from_ints([1, 17, 305]), 32, huge)
    queued = client.sample(types.ModelInput.from_ints([1, 17]), 32, huge)
    _wait(lambda: running.running() or running.done(), 30)
    time.sleep(0.3)
    started = time.monotonic()
    client.close(cancel=True)
    assert time.monotonic() - started < 5
    with pytest.raises(EngineError, match="sampling cancelled: the sampling client was closed"):
        running.result(0)
    assert queued.cancelled() or isinstance(queued.exception(0), EngineError)
    with pytest.raises(EngineError, match="the sampling client is closed"):
        client.sample(types.ModelInput.from_ints([1, 17]), 1, huge)


def test_a_tinker_export_leaves_no_empty_training_run(tmp_path, tiny_model, monkeypatch):
    monkeypatch.setenv("TINKER_API_KEY", KEY)
    with running_server(tmp_path / "root") as running, service(running.url) as client:
        training = client.create_lora_training_client(tiny_model, **LORA).result()
        path = training.save_state("step_1").result().path
        rest = tinker.RestClient(base_url=running.url, api_key=KEY)

        def runs() -> list[str]:
            return [r.training_run_id for r in rest.list_training_runs().result().training_runs]

        assert runs() == [training.model_id]
        for attempt in range(2):  # each export loads the checkpoint into a run of its own
            dest = tmp_path / f"export{attempt}"
            assert tinker_engine.download_adapter(path, dest, base_url=running.url) == tiny_model
            assert (dest / "adapter_model.safetensors").is_file()
            _wait(lambda: runs() == [training.model_id], 10)
        assert sorted(p.name for p in (running.root / "runs").iterdir()) == [training.model_id]
        # a run released with a checkpoint in it stays listed
        assert [c.tinker_path for c in rest.list_checkpoints(training.model_id).result()
                .checkpoints] == [path]
