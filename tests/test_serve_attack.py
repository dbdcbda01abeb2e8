"""``tinkerkit serve`` under attack: malformed requests, other keys' checkpoints, path escapes.

A malformed request gets a 4xx with a one-line ``detail`` and the server goes on serving; a
refused request of a training model still consumes its ``seq_id``, so the model's next request
runs (the SDK numbers requests and goes on after an error). One API key reaches none of another
key's runs, checkpoints, samplers, sessions or futures. No request reaches a file outside the
server root, whatever its path holds (``..``, absolute paths, URL-encoded dots, symbolic links
placed in the root). Raw HTTP (httpx, shipped with the SDK) sends what the SDK would refuse to.
"""

from __future__ import annotations

import json
import os
import socket
from types import SimpleNamespace

import httpx
import pytest
import tinker
import zstandard
from tinker import types
from tinker.proto import tinker_public_pb2 as public_pb
from tinker.proto.request_conv import forward_backward_request_to_proto

from helpers import KEY, checkpoint_dir, running_server, service
from tinkerkit.serve import protobuf
from tinkerkit.serve.app import MAX_JSON_BODY_BYTES
from tinkerkit.serve.auth import owner_id

OTHER_KEY = "tml-attacker"
LORA = {"rank": 4, "seed": 3, "train_unembed": False}
ADAM = types.AdamParams(learning_rate=1e-2)
PROTO = {"Content-Type": protobuf.PROTO_CONTENT_TYPE}


def datum(tokens: list[int], targets: list[int] | None = None) -> types.Datum:
    """Next-token datum: input ``tokens[:-1]``, targets ``tokens[1:]`` (or ``targets``)."""
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                       loss_fn_inputs={"target_tokens": targets or tokens[1:],
                                       "weights": [1.0] * (len(tokens) - 1)})


GOOD = [datum([1, 17, 305, 4431, 9, 2])]


def post(url: str, route: str, key: str = KEY, **kwargs) -> httpx.Response:
    headers = {"X-API-Key": key, **kwargs.pop("headers", {})}
    return httpx.post(f"{url}/api/v1/{route}", headers=headers, timeout=60, **kwargs)


def result(url: str, answer: httpx.Response, key: str = KEY) -> dict | bytes:
    """The outcome of a submitted request's future: the failure as a dict, or the raw result."""
    assert answer.status_code == 200, answer.text
    for _ in range(60):
        polled = post(url, "retrieve_future", key, json={"request_id": answer.json()["request_id"]})
        assert polled.status_code == 200, polled.text
        if protobuf.PROTO_CONTENT_TYPE in polled.headers["content-type"]:
            return polled.content
        body = polled.json()
        if body.get("type") != "try_again":
            return body
    raise AssertionError("the future never finished")


def fwd_bwd_body(model_id: str, seq_id: int, data: list[types.Datum]) -> bytes:
    request = types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(data=data, loss_fn="cross_entropy"),
        model_id=model_id, seq_id=seq_id)
    return forward_backward_request_to_proto(request).SerializeToString()


def raw_http(port: int, data: bytes) -> tuple[int, bytes]:
    """Send bytes on a fresh connection; the status code and body of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as conn:
        conn.sendall(data)
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer.partition(b"\r\n\r\n")[2]) < int(
                _header(answer, b"content-length") or 0):
            chunk = conn.recv(65536)
            if not chunk:
                break
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def _header(answer: bytes, name: bytes) -> bytes | None:
    for line in answer.partition(b"\r\n\r\n")[0].split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name:
            return value.strip()
    return None


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model):
    """One server; a victim (``KEY``) with a trained model, its three kinds of checkpoints and a
    loaded sampler; an attacker (``OTHER_KEY``) with a model of its own."""
    root = tmp_path_factory.mktemp("attack-root")
    with running_server(root) as server, service(server.url) as victim, \
            service(server.url, OTHER_KEY) as attacker:
        training = victim.create_lora_training_client(tiny_model, **LORA).result()
        training.forward_backward(GOOD, "cross_entropy")
        training.optim_step(ADAM)
        paths = SimpleNamespace(
            state=training.save_state("private").result().path,
            sampler=training.save_weights_for_sampler("private-s").result().path,
            external=training.save_weights_external("private-e").result().path)
        sampler = victim.create_sampling_client(model_path=paths.sampler).result()
        greedy = types.SamplingParams(max_tokens=4, temperature=0.0)
        expected = sampler.sample(types.ModelInput.from_ints([1, 17]), 1, greedy).result()
        own = attacker.create_lora_training_client(tiny_model, **LORA).result()
        yield SimpleNamespace(
            url=server.url, port=int(server.url.rsplit(":", 1)[1]), root=root, model=tiny_model,
            victim=victim, training=training, paths=paths, sampler=sampler,
            sampler_id=sampler._sampling_session_id, expected=expected,
            session_id=victim.holder.get_session_id(), attacker=attacker, own=own,
            rest=tinker.RestClient(base_url=server.url, api_key=OTHER_KEY))


def still_serving(world) -> None:
    """The server answers, and the victim's model and sampler still work as before."""
    assert httpx.get(f"{world.url}/api/v1/healthz").json() == {"status": "ok"}
    assert world.training.forward(GOOD, "cross_entropy").result().metrics["loss:sum"] > 0
    again = world.sampler.sample(types.ModelInput.from_ints([1, 17]), 1,
                                 types.SamplingParams(max_tokens=4, temperature=0.0)).result()
    assert again.sequences[0].tokens == world.expected.sequences[0].tokens


# -- malformed requests ----------------------------------------------------------------------


def test_malformed_bodies_get_4xx_with_a_detail(world):
    url, mid, sid = world.url, world.training.model_id, world.sampler_id
    prompt = {"chunks": [{"type": "encoded_text", "tokens": [1, 17]}]}

    def sample(**fields):
        body = {"sampling_session_id": sid, "num_samples": 1, "prompt": prompt,
                "sampling_params": {"max_tokens": 4}}
        return post(url, "asample", json={**body, **fields})

    valid = fwd_bwd_body(mid, 10**6, GOOD)  # a seq_id that never comes: nothing runs
    cases = {
        "truncated protobuf": post(url, "forward_backward", headers=PROTO,
                                   content=valid[:len(valid) // 2]),
        "gzip encoding": post(url, "forward_backward", content=valid,
                              headers={**PROTO, "Content-Encoding": "gzip"}),
        "zstd garbage": post(url, "forward_backward", content=b"\x28\xb5\x2f\xfd junk",
                             headers={**PROTO, "Content-Encoding": "zstd"}),
        "optim_step: learning_rate is text": post(url, "optim_step", json={
            "model_id": mid, "seq_id": 10**6, "adam_params": {"learning_rate": "fast"}}),
        "create_model: rank is a list": post(url, "create_model", json={
            "session_id": world.session_id, "model_seq_id": 9, "base_model": world.model,
            "lora_config": {"rank": [4]}}),
        "prompt token is text": sample(prompt={"chunks": [{"type": "encoded_text",
                                                           "tokens": ["a"]}]}),
        "prompt token 2**70": sample(prompt={"chunks": [{"type": "encoded_text",
                                                         "tokens": [1, 2**70]}]}),
        "prompt token -1": sample(prompt={"chunks": [{"type": "encoded_text",
                                                      "tokens": [1, -1]}]}),
        "prompt token = vocabulary size": sample(prompt={"chunks": [{"type": "encoded_text",
                                                                     "tokens": [1, 49152]}]}),
        "num_samples 2**70": sample(num_samples=2**70),
        "num_samples -3": sample(num_samples=-3),
        "max_tokens -1": sample(sampling_params={"max_tokens": -1}),
        "max_tokens 2**70": sample(sampling_params={"max_tokens": 2**70}),
        "topk_prompt_logprobs 2**70": sample(prompt_logprobs=True, topk_prompt_logprobs=2**70),
        "model_seq_id -1": post(url, "create_model", json={
            "session_id": world.session_id, "model_seq_id": -1, "base_model": world.model,
            "lora_config": {"rank": 4}}),
        "rank 2**70": post(url, "create_model", json={
            "session_id": world.session_id, "model_seq_id": 9, "base_model": world.model,
            "lora_config": {"rank": 2**70}}),
        "seed 2**70": post(url, "create_model", json={
            "session_id": world.session_id, "model_seq_id": 9, "base_model": world.model,
            "lora_config": {"rank": 4, "seed": 2**70}}),
        "rank true": post(url, "create_model", json={  # not LoRA rank 1
            "session_id": world.session_id, "model_seq_id": 9, "base_model": world.model,
            "lora_config": {"rank": True}}),
        "optim_step: seq_id -1": post(url, "optim_step", json={
            "model_id": mid, "seq_id": -1, "adam_params": {"learning_rate": 1e-3}}),
        "sample: seq_id -1": sample(seq_id=-1),
        "prompt past the model's positions": sample(prompt={"chunks": [
            {"type": "encoded_text", "tokens": [17] * 600}]}),
    }
    statuses = {name: answer.status_code for name, answer in cases.items()}
    assert statuses == {name: 400 for name in cases}
    details = {name: answer.json()["detail"] for name, answer in cases.items()}
    assert "outside [0, 49152)" in details["prompt token 2**70"]
    assert "outside [0, 49152)" in details["prompt token = vocabulary size"]
    assert details["num_samples 2**70"] == "num_samples=1180591620717411303424 must be in [1, 1024]"
    assert details["rank 2**70"].startswith("lora_config.rank=1180591620717411303424 must be in")
    assert "adam_params" in details["optim_step: learning_rate is text"]
    assert details["rank true"] == (
        "CreateModelRequest: lora_config.rank: Input should be a valid integer")
    assert details["optim_step: seq_id -1"] == "seq_id=-1 must be in [1, 9223372036854775807]"
    assert details["sample: seq_id -1"] == "seq_id=-1 must be in [0, 9223372036854775807]"
    assert details["prompt past the model's positions"] == (
        "prompt of 600 tokens is too long: the model has 512 positions "
        "(max_position_embeddings), so it takes at most 511 to sample from")
    assert all("\n" not in detail and "Traceback" not in detail for detail in details.values())
    still_serving(world)


def test_oversized_and_broken_http_get_4xx_and_the_server_goes_on(world):
    big = MAX_JSON_BODY_BYTES + 1
    status, body = raw_http(world.port, (
        f"POST /api/v1/asample HTTP/1.1\r\nHost: x\r\nX-API-Key: {KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {big}\r\n\r\n{{").encode())
    assert (status, json.loads(body)["detail"]) == (
        413, f"request body of {big} bytes is over the {MAX_JSON_BODY_BYTES} byte limit of "
             "JSON bodies")
    proto_big = protobuf.MAX_MESSAGE_BYTES + 1
    status, _ = raw_http(world.port, (
        f"POST /api/v1/forward_backward HTTP/1.1\r\nHost: x\r\nX-API-Key: {KEY}\r\n"
        f"Content-Type: {protobuf.PROTO_CONTENT_TYPE}\r\nContent-Length: {proto_big}\r\n\r\n"
    ).encode())
    assert status == 413
    bomb = zstandard.ZstdCompressor().compress(bytes(proto_big))  # a few KB
    answer = post(world.url, "forward_backward", content=bomb,
                  headers={**PROTO, "Content-Encoding": "zstd"})
    assert answer.status_code == 413 and len(bomb) < 100_000
    status, body = raw_http(world.port, b"POST /api/v1/create_session HTTP/1.1\r\nHost: x\r\n"
                                        b"X-API-Key: tml-a\r\nContent-Length: -5\r\n\r\n")
    assert (status, json.loads(body)) == (400, {"detail": "Content-Length is negative"})
    status, body = raw_http(world.port, b"\x16\x03\x01 not http at all\r\n\r\n")
    assert status == 400 and "detail" in json.loads(body)
    status, body = raw_http(world.port, b"PUT /api/v1/optim_step HTTP/1.1\r\nHost: x\r\n"
                                        b"Content-Length: 0\r\n\r\n")
    assert (status, json.loads(body)) == (
        405, {"detail": "PUT is not allowed on /api/v1/optim_step"})
    status, body = raw_http(world.port, b"GET /api/v1/healthz HTTP/1.1\r\nX-Long: "
                                        + b"a" * 70_000 + b"\r\n\r\n")
    assert status == 431 and "detail" in json.loads(body)
    still_serving(world)


def test_refused_requests_consume_their_seq_id(world, tiny_model):
    """A training model's requests run in seq_id order; each refused one (4xx at once, or a
    failed future when it waited) still counts, so the next one runs."""
    # the SDK: an unsupported chunk and an out-of-vocabulary target are 400s, and it goes on
    bad_chunk = types.Datum(model_input=types.ModelInput(chunks=[
        types.EncodedTextChunk(tokens=[1, 2]), types.ImageChunk(data=b"\x89PNG", format="png")]),
        loss_fn_inputs={"target_tokens": [2, 3, 4], "weights": [1.0, 1.0, 1.0]})
    with pytest.raises(tinker.BadRequestError, match="model_input chunk 'image' is not supported"):
        world.own.forward_backward([bad_chunk], "cross_entropy").result(timeout=120)
    with pytest.raises(tinker.BadRequestError, match="target_tokens holds a token id outside"):
        world.own.forward_backward([datum([1, 2, 3], [2, 2**40])], "cross_entropy").result(
            timeout=120)
    assert world.own.forward(GOOD, "cross_entropy").result(timeout=120).metrics["loss:sum"] > 0

    # raw requests 1-6 of a fresh model, every kind of refusal, then a valid one
    with service(world.url) as client:  # open: its session keeps the model loaded
        mid = client.create_lora_training_client(tiny_model, **LORA).result().model_id
        sparse = public_pb.ForwardBackwardRequest.FromString(fwd_bwd_body(mid, 5, GOOD))
        target = sparse.data[0].loss_fn_inputs["target_tokens"]
        target.ClearField("dense")
        target.shape[:] = [1, 2**40]  # a CSR "matrix" that would densify to 8 TB
        target.sparse_csr.crow_indices = bytes(16)
        refused = {
            1: post(world.url, "optim_step", json={"model_id": mid, "seq_id": 1,
                                                    "adam_params": {"learning_rate": "x"}}),
            2: post(world.url, "save_weights", json={"model_id": mid, "seq_id": 2,
                                                      "path": "../escape"}),
            3: post(world.url, "save_weights", json={"model_id": mid, "seq_id": 3, "path": "t",
                                                      "ttl_seconds": 2**70}),
            4: post(world.url, "load_weights", json={
                "model_id": mid, "seq_id": 4, "optimizer": True,
                "path": world.paths.state.replace(world.training.model_id, mid)}),
            5: post(world.url, "forward_backward", headers=PROTO,
                    content=sparse.SerializeToString()),
        }
        assert {seq: a.status_code for seq, a in refused.items()} == {
            1: 400, 2: 400, 3: 400, 4: 404, 5: 400}
        assert "ttl_seconds=1180591620717411303424 must be in" in refused[3].json()["detail"]
        assert "is negative or too large" in refused[5].json()["detail"]
        done = result(world.url, post(world.url, "forward_backward", headers=PROTO,
                                      content=fwd_bwd_body(mid, 6, GOOD)))
        assert isinstance(done, bytes)  # the ForwardBackwardOutput, not a failure
        again = post(world.url, "save_weights", json={"model_id": mid, "seq_id": 2,
                                                       "path": "ok"})
        assert again.status_code == 400  # a retried seq_id gets the first answer
        assert "'../escape'" in again.json()["detail"]
    assert not list(world.root.parent.rglob("escape"))
    assert not list(world.root.rglob("t"))  # refused before anything was written


# -- other keys ------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::FutureWarning")  # TrainingClient.load_state is deprecated
def test_one_key_cannot_reach_another_keys_checkpoints(world):
    paths, rest, attacker = world.paths, world.rest, world.attacker
    sdk_attempts = {
        "sample from": lambda: attacker.create_sampling_client(model_path=paths.sampler)
        .result(),
        "train from": lambda: attacker.create_training_client_from_state_with_optimizer(
            paths.state).result(),
        "load into own model": lambda: world.own.load_state(paths.state).result(),
        "weights info": lambda: rest.get_weights_info_by_tinker_path(paths.state).result(),
        "download URLs": lambda: rest.get_external_weights_urls(paths.external).result(),
        "delete": lambda: rest.delete_checkpoint_from_tinker_path(paths.state).result(),
        "get run": lambda: rest.get_training_run(world.training.model_id).result(),
        "list checkpoints": lambda: rest.list_checkpoints(world.training.model_id).result(),
    }
    for name, attempt in sdk_attempts.items():
        with pytest.raises(tinker.NotFoundError):
            attempt()
            pytest.fail(name)
    mine = rest.list_training_runs(limit=100).result().training_runs
    assert [run.training_run_id for run in mine] == [world.own.model_id]
    assert not {paths.state, paths.sampler, paths.external} & {
        c.tinker_path for c in rest.list_user_checkpoints(limit=1000).result().checkpoints}

    url, mid = world.url, world.training.model_id
    future = post(url, "asample", json={
        "sampling_session_id": world.sampler_id, "num_samples": 1,
        "prompt": {"chunks": [{"type": "encoded_text", "tokens": [1]}]},
        "sampling_params": {"max_tokens": 1}}).json()["request_id"]
    raw_attempts = {
        "overwrite a checkpoint": post(url, "save_weights", OTHER_KEY, json={
            "model_id": mid, "seq_id": 10**6, "path": "private", "overwrite": True}),
        "save into the model": post(url, "save_weights_for_sampler", OTHER_KEY, json={
            "model_id": mid, "seq_id": 10**6, "path": "evil"}),
        "sample": post(url, "asample", OTHER_KEY, json={
            "sampling_session_id": world.sampler_id, "num_samples": 1,
            "prompt": {"chunks": [{"type": "encoded_text", "tokens": [1]}]},
            "sampling_params": {"max_tokens": 1}}),
        "sampler info": httpx.get(f"{url}/api/v1/samplers/{world.sampler_id}",
                                  headers={"X-API-Key": OTHER_KEY}),
        "sampling session on": post(url, "create_sampling_session", OTHER_KEY, json={
            "session_id": attacker.holder.get_session_id(), "sampling_session_seq_id": 50,
            "model_path": paths.sampler}),
        "another key's future": post(url, "retrieve_future", OTHER_KEY,
                                     json={"request_id": future}),
        "finish the session": post(url, f"sessions/{world.session_id}/finish", OTHER_KEY),
        "heartbeat": post(url, "session_heartbeat", OTHER_KEY,
                          json={"session_id": world.session_id}),
        "create a model in the session": post(url, "create_model", OTHER_KEY, json={
            "session_id": world.session_id, "model_seq_id": 50, "base_model": world.model,
            "lora_config": {"rank": 4}}),
        "load into a new model": post(url, "load_weights", OTHER_KEY, json={
            "session_id": attacker.holder.get_session_id(), "model_seq_id": 50,
            "path": paths.state, "optimizer": True}),
    }
    assert {name: a.status_code for name, a in raw_attempts.items()} == {
        name: 404 for name in raw_attempts}
    assert [c.checkpoint_id for c in tinker.RestClient(base_url=url, api_key=KEY).list_checkpoints(
        mid).result().checkpoints] == ["weights/private", "sampler_weights/private-s",
                                       "external_weights/private-e"]

    # a signed download URL is bound to its run, checkpoint and file
    own_external = world.own.save_weights_external("mine").result().path
    urls = rest.get_external_weights_urls(own_external).result().urls
    swapped = urls["adapter_model.safetensors"].replace(world.own.model_id, mid) \
        .replace("/mine/", "/private-e/")
    assert httpx.get(swapped).status_code == 403
    assert httpx.get(urls["adapter_model.safetensors"]).status_code == 200
    still_serving(world)


# -- paths -----------------------------------------------------------------------------------


def test_paths_in_requests_cannot_escape_the_root(world, tmp_path):
    url, vm = world.url, world.training.model_id
    outside = world.root.parent / "outside"
    outside.mkdir(exist_ok=True)
    (outside / "secret.txt").write_text("TOP-SECRET CONTENT")
    before = sorted(p.name for p in world.root.parent.iterdir())
    tinker_paths = [
        f"tinker://{vm}/weights/../../../outside", f"tinker://{vm}/weights/..",
        f"tinker://{vm}/../../outside/x", "tinker://../runs/x/weights/private",
        "tinker://%2e%2e/weights/private", f"tinker://{vm}/weights/%2e%2e%2f%2e%2e",
        f"tinker://{vm}/weights/..%2fprivate", f"tinker://{vm}\\..\\x/weights/private",
        f"tinker://{vm}/weights/private\x00", "tinker:///etc/passwd/x", "/etc/passwd",
        f"file://{outside}/secret.txt", f"{world.root}/runs/{vm}/weights/private",
    ]
    session = world.attacker.holder.get_session_id()
    statuses = set()
    for number, path in enumerate(tinker_paths):
        for route, body in (
                ("create_sampling_session", {"session_id": session, "model_path": path,
                                             "sampling_session_seq_id": 100 + number}),
                ("load_weights", {"session_id": session, "model_seq_id": 100 + number,
                                  "path": path, "optimizer": False}),
                ("weights_info", {"tinker_path": path})):
            answer = post(url, route, OTHER_KEY, json=body)
            statuses.add(answer.status_code)
            assert answer.status_code in (400, 404), (route, path, answer.text)
            assert "TOP-SECRET" not in answer.text
    assert statuses == {400, 404}
    names = ["../../outside/x", "/tmp/abs", "..", "%2e%2e", "a\\..\\b", ".hidden", "a/b"]
    for name in names:
        with pytest.raises(tinker.BadRequestError, match="must be 1-128 letters"):
            world.own.save_state(name).result()
    for route in (f"training_runs/{vm}/checkpoints/weights/%252e%252e",
                  f"training_runs/{vm}/checkpoints/%2e%2e/%2e%2e",
                  "training_runs/..%5c..%5c/checkpoints/weights/private",
                  f"training_runs/{vm}/checkpoints/weights/..%2f..%2foutside"):
        answer = httpx.delete(f"{url}/api/v1/{route}", headers={"X-API-Key": KEY})
        assert answer.status_code in (400, 404), (route, answer.text)
    assert sorted(p.name for p in world.root.parent.iterdir()) == before
    assert (outside / "secret.txt").read_text() == "TOP-SECRET CONTENT"
    assert checkpoint_dir(world.root, world.paths.state).is_dir()
    still_serving(world)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_symbolic_links_placed_in_the_root_lead_nowhere(world):
    """A link in the root (put there by someone with access to the machine) neither exposes
    another key's checkpoint nor a file outside the root."""
    own, rest, root = world.own, world.rest, world.root
    own_dir = root / "runs" / own.model_id
    # a link to the victim's checkpoint inside the attacker's own run
    (own_dir / "weights").mkdir(exist_ok=True)
    os.symlink(checkpoint_dir(root, world.paths.state), own_dir / "weights" / "stolen")
    stolen = f"tinker://{own.model_id}/weights/stolen"
    assert "weights/stolen" not in [c.checkpoint_id for c in
                                    rest.list_checkpoints(own.model_id).result().checkpoints]
    with pytest.raises(tinker.BadRequestError, match="symbolic link"):
        world.attacker.create_sampling_client(model_path=stolen).result()
    with pytest.raises(tinker.BadRequestError, match="symbolic link"):
        own.load_state(stolen).result()
    with pytest.raises(tinker.BadRequestError, match="symbolic link"):
        rest.get_weights_info_by_tinker_path(stolen).result()

    # a file of the attacker's own external weights swapped for a link to a file outside
    secret = root.parent / "secret.json"
    secret.write_text('{"secret": "outside the root"}')
    external = own.save_weights_external("swap").result().path
    urls = rest.get_external_weights_urls(external).result().urls
    target = checkpoint_dir(root, external) / "adapter_config.json"
    target.unlink()
    os.symlink(secret, target)
    answer = httpx.get(urls["adapter_config.json"])
    assert answer.status_code == 404 and "outside the root" not in answer.text
    assert "external_weights/swap" not in [
        c.checkpoint_id for c in rest.list_checkpoints(own.model_id).result().checkpoints]
    with pytest.raises(tinker.NotFoundError):
        rest.get_external_weights_urls(external).result()

    # a run directory that is a link to a directory outside, claiming the attacker as owner
    elsewhere = root.parent / "elsewhere"
    elsewhere.mkdir()
    fake_id = own.model_id.replace(":train:0", ":train:77")
    run = json.loads((own_dir / "run.json").read_text())
    assert run["owner"] == owner_id(OTHER_KEY)
    (elsewhere / "run.json").write_text(json.dumps({**run, "model_id": fake_id}))
    os.symlink(elsewhere, root / "runs" / fake_id)
    assert fake_id not in [r.training_run_id for r in
                           rest.list_training_runs(limit=100).result().training_runs]
    with pytest.raises(tinker.BadRequestError, match="symbolic link"):
        rest.get_training_run(fake_id).result()
    still_serving(world)
