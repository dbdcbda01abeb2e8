"""BACKEND=tinker: the one training loop, evaluation and export through the real ``tinker`` SDK.

The SDK talks HTTP to ``tinkerkit serve`` (a thread on a free loopback port), which runs the local
engine; every result is compared with BACKEND=local run in process on the same data and seed.

Tolerance: both paths run the same float32 code on the same CPU in the same process, and the
datums, weights (float32) and losses cross the wire without rounding, so the losses are expected
to be identical; the tests allow 1e-5 (the issue's bound) for a server in another process, where
torch's thread count, and so the order of float32 reductions, may differ.
"""

from __future__ import annotations

import io as _io
import json
import logging
import math

import pytest
from rich.console import Console
from safetensors.torch import load_file

from helpers import running_server, service
from tinkerkit import files
from tinkerkit.cli import main
from tinkerkit.config import load_config
from tinkerkit.data.demo import write_demo_data
from tinkerkit.engines import tinker as tinker_engine
from tinkerkit.engines.tinker import TinkerTrainingClient
from tinkerkit.evaluate import run_evaluation
from tinkerkit.train import loop as train_loop
from tinkerkit.train import train

CANARY = "tml-canary-5b1e0c3d9a7f4e21"
TOLERANCE = 1e-5
# 10 examples, 2 of them held out: 8 in batches of 4 -> 2 steps per epoch, 2 epochs = 4 steps;
# eval_loss after steps 2 and 4, eval_accuracy after step 4, checkpoints after steps 2 and 4.
SETTINGS = ["LORA_RANK=4", "BATCH_SIZE=4", "NUM_EPOCHS=2", "SEED=3", "LEARNING_RATE=1e-2",
            "WARMUP_STEPS=1", "LR_SCHEDULE=cosine", "MAX_SEQUENCE_LENGTH=128", "SAVE_EVERY=2",
            "EVAL_SPLIT_RATIO=0.2", "EVAL_EVERY=2", "SAMPLE_EVAL_EVERY=4", "SAMPLE_EVAL_LIMIT=2",
            "MAX_TOKENS=6", "EXPORT_AFTER_TRAINING=true"]


def quiet() -> Console:
    return Console(file=_io.StringIO(), width=200)


def metrics(run_dir) -> list[dict]:
    return files.read_jsonl(run_dir / "metrics.jsonl")


def assert_same_steps(got: list[dict], expected: list[dict]) -> float:
    """Same steps, learning rates and evaluations; losses within TOLERANCE. Returns the max diff."""
    assert [r["step"] for r in got] == [r["step"] for r in expected]
    assert [r["lr"] for r in got] == [r["lr"] for r in expected]
    worst = 0.0
    for a, b in zip(got, expected):
        for key in ("loss", "eval_loss"):
            assert (key in a) == (key in b)
            if key in a:
                worst = max(worst, abs(a[key] - b[key]))
                assert math.isclose(a[key], b[key], rel_tol=0, abs_tol=TOLERANCE), (key, a, b)
        assert a.get("eval_accuracy") == b.get("eval_accuracy")
    return worst


def assert_same_adapter(a_dir, b_dir) -> None:
    a, b = load_file(f"{a_dir}/adapter_model.safetensors"), load_file(f"{b_dir}/adapter_model.safetensors")
    assert a.keys() == b.keys() and len(a) > 0
    for key in a:
        assert (a[key] - b[key]).abs().max().item() <= TOLERANCE, key


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("serve-root")) as running:
        yield running


@pytest.fixture
def tinker_env(server, monkeypatch):
    monkeypatch.setenv("TINKER_API_KEY", CANARY)
    monkeypatch.setenv("TINKER_BASE_URL", server.url)
    return server


@pytest.fixture(scope="module")
def runs(server, tiny_model, tmp_path_factory):
    """The same run on both engines (held-out loss and accuracy, export at the end)."""
    root = tmp_path_factory.mktemp("backend-runs")
    data = write_demo_data(root / "train.jsonl", n=10, seed=0)
    common = [f"DATA_FILES={data}", f"BASE_MODEL={tiny_model}", *SETTINGS]
    submitted, previous_done = [], []
    forward_backward = TinkerTrainingClient.forward_backward

    def recording(self, *args, **kwargs):  # was the previous step still running on the server?
        previous_done.append(submitted[-1].done() if submitted else None)
        submitted.append(forward_backward(self, *args, **kwargs))
        return submitted[-1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TINKER_API_KEY", CANARY)
        local = train(load_config(None, [*common, "BACKEND=local", "DEVICE=cpu"]),
                      run_dir=root / "local", console=quiet())
        config = load_config(None, [*common, "BACKEND=tinker", f"TINKER_BASE_URL={server.url}"])
        patch.setattr(TinkerTrainingClient, "forward_backward", recording)
        tinker = train(config, run_dir=root / "tinker", console=quiet())
    return {"root": root, "local": local, "tinker": tinker, "config": config, "data": data,
            "common": common, "previous_done": previous_done}


def test_the_loop_on_tinker_gives_the_local_losses_and_adapter(runs):
    local, tinker = runs["local"], runs["tinker"]
    assert tinker.steps == local.steps == 4
    worst = assert_same_steps(metrics(tinker.run_dir), metrics(local.run_dir))
    print(f"\nlosses local {local.losses}\n       tinker {tinker.losses}\nmax |diff| {worst:.3g}")
    assert [r["step"] for r in metrics(local.run_dir) if "eval_loss" in r] == [2, 4]
    assert [r["step"] for r in metrics(local.run_dir) if "eval_accuracy" in r] == [4]
    entries = files.read_jsonl(tinker.run_dir / "checkpoints.jsonl")
    assert [e["step"] for e in entries] == [2, 4]
    assert all(e["path"].startswith("tinker://") and e["path"].endswith(f"/weights/step_{e['step']:06d}")
               for e in entries)
    assert tinker.final_checkpoint == entries[-1]["path"]
    # Pipelining: each step was submitted before the previous result was awaited, and at least
    # once while the previous forward_backward was still running on the server.
    assert len(runs["previous_done"]) == 4 and False in runs["previous_done"][1:]
    # The export of the tinker:// checkpoint (downloaded through the SDK) equals the local export.
    local_export, tinker_export = local.run_dir / "export/adapter", tinker.run_dir / "export/adapter"
    assert_same_adapter(tinker_export, local_export)
    assert json.loads((tinker_export / "adapter_config.json").read_text()) == \
        json.loads((local_export / "adapter_config.json").read_text())
    assert sorted(p.name for p in tinker_export.iterdir()) == \
        sorted(p.name for p in local_export.iterdir())
    assert not list((tinker.run_dir / "export").glob(".download-*"))  # the download is removed
    # peak_memory_gib is this process's; with BACKEND=tinker the summary says it is the client's
    tinker_summary = files.read_json(tinker.run_dir / "summary.json")
    assert tinker_summary["peak_memory_of"] == ("this client process only; the model trains on "
                                                "the Tinker server, whose memory is not "
                                                "measured here")
    assert tinker_summary["peak_memory_gib"] > 0
    assert "peak_memory_of" not in files.read_json(local.run_dir / "summary.json")


def test_resume_from_a_tinker_checkpoint_is_exact(runs, tinker_env, monkeypatch):
    real_await_step, calls = train_loop.await_step, []

    def crash_after_three_steps(*args):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(1)
        return real_await_step(*args)

    monkeypatch.setattr(train_loop, "await_step", crash_after_three_steps)
    crashed = runs["root"] / "tinker-crashed"
    with pytest.raises(KeyboardInterrupt):
        train(runs["config"], run_dir=crashed, console=quiet())
    monkeypatch.setattr(train_loop, "await_step", real_await_step)
    assert [e["step"] for e in files.read_jsonl(crashed / "checkpoints.jsonl")] == [2]

    resumed = train(runs["config"], resume=str(crashed), console=quiet())  # from tinker://.../step_2
    assert resumed.steps == 4 and len(resumed.losses) == 2
    assert_same_steps(metrics(crashed), metrics(runs["tinker"].run_dir))
    assert_same_adapter(crashed / "export/adapter", runs["local"].run_dir / "export/adapter")


def test_init_from_a_tinker_checkpoint_starts_a_new_stage(runs, tinker_env):
    step2 = files.read_jsonl(runs["tinker"].run_dir / "checkpoints.jsonl")[0]["path"]
    short = ["MAX_STEPS=2", "EVAL_EVERY=0", "SAMPLE_EVAL_EVERY=0", "EXPORT_AFTER_TRAINING=false"]
    stage = train(runs["config"].model_copy(update={"max_steps": 2, "eval_every": 0,
                                                    "sample_eval_every": 0,
                                                    "export_after_training": False}),
                  run_dir=runs["root"] / "tinker-stage2", init_from=step2, console=quiet())
    local_step2 = runs["local"].run_dir / "checkpoints/step_000002"
    local_config = load_config(None, [*runs["common"], *short, "BACKEND=local", "DEVICE=cpu"])
    local_stage = train(local_config, run_dir=runs["root"] / "local-stage2",
                        init_from=str(local_step2), console=quiet())
    assert_same_steps(metrics(stage.run_dir), metrics(local_stage.run_dir))
    assert metrics(stage.run_dir)[0]["lr"] == metrics(runs["tinker"].run_dir)[0]["lr"]  # new schedule
    assert stage.losses[0] < runs["tinker"].losses[0]  # but the trained weights


def test_eval_samples_a_tinker_checkpoint_like_the_local_one(runs, tinker_env, tmp_path):
    test_file = write_demo_data(tmp_path / "test.jsonl", n=3, seed=5)
    config = load_config(None, [*runs["common"], "MAX_TOKENS=8"])
    results = {}
    for name, checkpoint in (("local", runs["local"].run_dir),
                             ("tinker", runs["tinker"].final_checkpoint)):
        output = tmp_path / f"{name}.json"
        run_evaluation(config, [str(test_file)], checkpoint=str(checkpoint), output=output,
                       console=quiet())
        results[name] = json.loads(output.read_text())
    texts = {name: [[o["text"] for o in e["outputs"]] for e in r["examples"]]
             for name, r in results.items()}
    assert texts["tinker"] == texts["local"] and len(texts["local"]) == 3
    assert [e["outputs"][0]["num_tokens"] for e in results["tinker"]["examples"]] == \
        [e["outputs"][0]["num_tokens"] for e in results["local"]["examples"]]
    assert results["tinker"]["config"]["CHECKPOINT"].startswith("tinker://")


def test_eval_of_a_base_model_with_backend_tinker_samples_through_the_server(
        tinker_env, tiny_model, tmp_path, monkeypatch):
    """One rule chooses the engine (tinkerkit.engines.backend_of): BACKEND=tinker samples a base
    model on the server too, as it trains there; the answers are the local engine's."""
    test_file = write_demo_data(tmp_path / "test.jsonl", n=3, seed=5)
    created = []
    create = tinker_engine.create_sampling_client

    def spy(model_path, base_url, base_model=None):
        created.append((model_path, base_url, base_model))
        return create(model_path, base_url, base_model=base_model)

    monkeypatch.setattr(tinker_engine, "create_sampling_client", spy)
    results = {}
    for backend in ("local", "tinker"):
        output = tmp_path / f"{backend}.json"
        assert main(["eval", "--model", tiny_model, "--data", str(test_file), "--output",
                     str(output), "--set", f"BACKEND={backend}", "--set", "MAX_TOKENS=6",
                     "--set", "DEVICE=cpu"]) == 0
        results[backend] = json.loads(output.read_text())
    assert created == [(None, tinker_env.url, tiny_model)]
    texts = {backend: [[o["text"] for o in e["outputs"]] for e in r["examples"]]
             for backend, r in results.items()}
    assert texts["tinker"] == texts["local"] and len(texts["local"]) == 3
    assert results["tinker"]["config"]["BASE_MODEL"] == tiny_model


def test_the_api_key_appears_in_no_output_or_file(runs, server, tiny_model, tmp_path, capfd,
                                                  caplog, monkeypatch):
    monkeypatch.setenv("TINKER_API_KEY", CANARY)
    monkeypatch.setenv("TINKER_BASE_URL", server.url)
    caplog.set_level(logging.DEBUG)
    data = runs["data"]
    base = ["--set", "BACKEND=tinker", "--set", "LORA_RANK=4", "--set", "BATCH_SIZE=4",
            "--set", "MAX_STEPS=1", "--set", "MAX_SEQUENCE_LENGTH=128", "--data", str(data)]
    good = tmp_path / "good"
    assert main(["train", "--model", tiny_model, "--run-dir", str(good), *base]) == 0
    checkpoint = files.read_jsonl(good / "checkpoints.jsonl")[-1]["path"]
    assert main(["eval", "--checkpoint", checkpoint, "--data", str(data), "--limit", "1",
                 "--max-tokens", "4", "--output", str(tmp_path / "eval.json")]) == 0
    assert main(["export", checkpoint, "--output", str(tmp_path / "exported")]) == 0
    # Failing runs: a model the server does not serve, a stage from a checkpoint it does not
    # have, a sampler path (cannot be exported), an unknown checkpoint to evaluate.
    missing = checkpoint.replace("step_", "nostep_")
    assert main(["train", "--model", "Nobody/NoModel-1B", "--run-dir", str(tmp_path / "bad"),
                 *base]) == 1
    assert main(["train", "--model", tiny_model, "--run-dir", str(tmp_path / "bad2"),
                 "--init-from", missing, *base]) == 1
    sampler = checkpoint.replace("/weights/", "/sampler_weights/")
    assert main(["export", sampler, "--output", str(tmp_path / "bad-export")]) == 1
    assert main(["eval", "--checkpoint", missing, "--data", str(data), "--limit", "1",
                 "--output", str(tmp_path / "bad-eval.json")]) == 1
    captured = capfd.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 4, captured.err
    assert "Nobody/NoModel-1B" in errors[0]
    assert errors[1].startswith("error: Tinker create_training_client_from_state: the Tinker "
                                "server answered 404")
    assert "sampler weights cannot be downloaded" in errors[2]
    assert errors[3].startswith("error: Tinker create_sampling_client: the Tinker server "
                                "answered 404")
    assert CANARY not in captured.out + captured.err and CANARY not in caplog.text
    scanned = 0
    for root in (tmp_path, server.root):
        for path in root.rglob("*"):
            if path.is_file():
                scanned += 1
                assert CANARY.encode() not in path.read_bytes(), path
    assert scanned > 20


def test_a_non_finite_gradient_is_divergence_on_both_engines(tinker_env, tiny_model, tmp_path):
    """Loss weights of 3e38 (finite float32) overflow the loss and the gradients: both engines
    skip the optimizer step with NonFiniteGradientError (through the SDK: the server's failed
    future, recognized by the Tinker engine), and the next step trains normally."""
    from tinker import types

    from tinkerkit.engines import create_training_client
    from tinkerkit.errors import NonFiniteGradientError

    tokens = [1, 17, 305, 4431, 9, 28]

    def datum(weight):
        return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                           loss_fn_inputs={"target_tokens": tokens[1:],
                                           "weights": [weight] * (len(tokens) - 1)})

    adam = types.AdamParams(learning_rate=1e-2)
    for backend in ("tinker", "local"):
        config = load_config(None, [f"BASE_MODEL={tiny_model}", "LORA_RANK=4", "DEVICE=cpu",
                                    f"BACKEND={backend}"])
        client = create_training_client(config, tmp_path / backend)
        try:
            loss = client.forward_backward([datum(3e38)], "cross_entropy").result()
            assert math.isinf(loss.metrics["loss:sum"])
            with pytest.raises(NonFiniteGradientError, match=r"gradient norm is (nan|inf) at "
                                                             r"step 1; step skipped"):
                client.optim_step(adam).result()
            client.forward_backward([datum(1.0)], "cross_entropy")
            step = client.optim_step(adam).result()
            assert step.metrics["step"] == 1.0 and math.isfinite(step.metrics["grad_norm"])
        finally:
            client.close()


def test_a_tinker_dry_run_opens_no_session(tinker_env, tiny_model, tmp_path, capfd, monkeypatch):
    data = write_demo_data(tmp_path / "train.jsonl", n=10, seed=0)
    sessions = []
    create_session = tinker_env.state.create_session

    def recording(owner, request):
        sessions.append(owner)
        return create_session(owner, request)

    monkeypatch.setattr(tinker_env.state, "create_session", recording)
    with service(tinker_env.url) as client:  # the recording sees a session the SDK opens
        client.holder.get_session_id()  # (the SDK opens it with its first client or this)
    assert len(sessions) == 1
    monkeypatch.setattr("tinkerkit.engines.create_training_client",
                        lambda *a, **k: pytest.fail("the engine factory was called"))
    monkeypatch.setattr("tinker.ServiceClient",
                        lambda *a, **k: pytest.fail("a tinker.ServiceClient was created"))
    assert main(["train", "--backend", "tinker", "--model", tiny_model, "--data", str(data),
                 "--rank", "4", "--batch-size", "4", "--max-length", "128",
                 "--run-dir", str(tmp_path / "run"), "--dry-run"]) == 0
    out = " ".join(capfd.readouterr().out.split())
    assert ("Dry run: 10 examples, 3 steps (3 per epoch, batch 4); BACKEND=tinker: no session "
            "was opened on the Tinker server") in out
    assert len(sessions) == 1 and not (tmp_path / "run").exists()
    # The LoRA settings a run would refuse are refused by the dry run too, still offline.
    assert main(["train", "--backend", "tinker", "--model", tiny_model, "--data", str(data),
                 "--batch-size", "4", "--set", "LORA_DROPOUT=0.1", "--dry-run"]) == 1
    assert "BACKEND=tinker does not support LORA_DROPOUT=0.1" in capfd.readouterr().err
    assert len(sessions) == 1


def test_a_server_that_stops_between_steps_fails_the_next_step_in_seconds(tiny_model, tmp_path,
                                                                           monkeypatch):
    """Through the real SDK: the server stops after step 1; the SDK retries step 2 for as long
    as it is waited on, and the Tinker engine fails it once the server has accepted no
    connection for UNREACHABLE_SECONDS (the run used to wait forever)."""
    import time

    from tinker import types

    from tinkerkit.engines import create_training_client
    from tinkerkit.engines import tinker as engine
    from tinkerkit.errors import EngineError

    for name in ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "https_proxy", "http_proxy",
                 "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(engine, "UNREACHABLE_SECONDS", 1.0)
    monkeypatch.setattr(engine, "POLL_SECONDS", 0.2)
    monkeypatch.setenv("TINKER_API_KEY", CANARY)
    tokens = [1, 17, 305, 4431, 9, 28]
    batch = [types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                         loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * 5})]
    adam = types.AdamParams(learning_rate=1e-2)
    with running_server(tmp_path / "root") as running:
        config = load_config(None, [f"BASE_MODEL={tiny_model}", "LORA_RANK=4", "BACKEND=tinker",
                                    f"TINKER_BASE_URL={running.url}"])
        client = create_training_client(config, tmp_path / "run")
        client.forward_backward(batch, "cross_entropy")
        assert client.optim_step(adam).result().metrics["step"] == 1.0
    start = time.monotonic()
    forward_backward = client.forward_backward(batch, "cross_entropy")
    with pytest.raises(EngineError) as info:
        forward_backward.result()
    assert str(info.value) == (f"Tinker forward_backward: cannot reach the Tinker server at "
                               f"{running.url} for 1 s (Connection refused); it stopped, or the "
                               "network is down")
    client.close()  # no wait for a server that is gone
    assert time.monotonic() - start < 15
