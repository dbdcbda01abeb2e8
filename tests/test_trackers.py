"""Experiment trackers (REPORT_TO): the values of a run read back with each library's own reader.

TensorBoard through its ``EventAccumulator``, MLflow through ``MlflowClient`` on the run's local
``file:`` store, W&B through the offline run file (``WANDB_MODE=offline``: no network) read with
wandb's own ``DataStore`` and ``Record`` protobuf. A tracker whose package is missing skips.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import time

import pytest

import test_train_loop
from test_train_loop import write_chat
from tinkerkit import files
from tinkerkit.config import load_config
from tinkerkit.errors import ConfigError, EngineError, TrackerError
from tinkerkit.train import report_evaluation, train
from tinkerkit.train.trackers import (
    TRACKERS_FILE,
    check_evaluation_trackers,
    check_trackers,
)


def needs(package: str):
    return pytest.mark.skipif(importlib.util.find_spec(package) is None,
                              reason=f"{package} is not installed: pip install 'tinkerkit[{package}]'")


def run(tmp_path, report_to: str, *extra: str, answers=("a", "bb cc", "d", "ee ff gg", "h", "ii"),
        resume: bool = False):
    data = tmp_path / "train.jsonl"
    write_chat(data, answers)
    config = load_config(None, [f"DATA_FILES={data}", "BATCH_SIZE=2", "NUM_EPOCHS=1",
                                f"REPORT_TO={report_to}", "LEARNING_RATE=1e-3", *extra])
    if resume:
        result = train(config, resume=str(tmp_path / "my-run"))
    else:
        result = train(config, run_dir=tmp_path / "my-run")
    return result, files.read_jsonl(result.run_dir / "metrics.jsonl")


def offline_wandb(monkeypatch, **variables: str):
    """W&B in offline mode (no network, no account), its other variables unset or
    ``variables``."""
    import wandb

    for name in ("WANDB_PROJECT", "WANDB_DIR", "WANDB_ENTITY", "WANDB_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    wandb.teardown()  # W&B keeps the settings it read first in a process; read them again


def local_mlflow(monkeypatch, run_dir):
    """MLflow's default store (RUN_DIR/mlruns) and a client of it."""
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # as the tracker sets it by default
    return MlflowClient(tracking_uri=(run_dir / "mlruns").resolve().as_uri())


def wandb_records(path: str) -> list:
    """``(kind, value)`` of a finished offline W&B run file: ``history`` rows as dicts, ``run``
    names and configs, ``exit`` codes, read with wandb's own ``DataStore`` and ``Record``
    protobuf. W&B's service process may still be writing the file when ``finish`` returns: read
    it until it holds the ``exit`` record (30 s at most)."""
    deadline = time.monotonic() + 30
    records = _wandb_records(path)
    while "exit" not in [kind for kind, _ in records] and time.monotonic() < deadline:
        time.sleep(0.2)
        records = _wandb_records(path)
    return records


def _wandb_records(path: str) -> list:
    from wandb.proto import wandb_internal_pb2
    from wandb.sdk.internal import datastore

    store = datastore.DataStore()
    store.open_for_scan(path)
    records = []
    while (data := store.scan_data()) is not None:
        record = wandb_internal_pb2.Record.FromString(data)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            records.append((kind, {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                   for i in record.history.item}))
        elif kind == "run":
            records.append((kind, (record.run.display_name,
                                   {i.key: json.loads(i.value_json)
                                    for i in record.run.config.update})))
        elif kind == "exit":
            records.append((kind, record.exit.exit_code))
    return records


@needs("tensorboard")
def test_tensorboard_holds_every_metric_line_and_the_config(fake_engine, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    result, lines = run(tmp_path, "tensorboard")
    events = EventAccumulator(str(result.run_dir / "tensorboard"))
    events.Reload()
    assert len(lines) == 3
    for key in ("loss", "lr", "weighted_tokens", "total_tokens", "epoch", "seconds"):
        scalars = events.Scalars(key)
        assert [s.step for s in scalars[:3]] == [1, 2, 3]
        assert [s.value for s in scalars[:3]] == pytest.approx([line[key] for line in lines],
                                                               rel=1e-6)
    assert events.Scalars("last_10_mean_loss")[0].value == pytest.approx(
        sum(line["loss"] for line in lines) / 3, rel=1e-6)
    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert hparams["BATCH_SIZE"].number_value == 2
    assert hparams["LEARNING_RATE"].number_value == pytest.approx(1e-3)
    assert hparams["REPORT_TO"].string_value == '["tensorboard"]'
    assert json.loads((result.run_dir / TRACKERS_FILE).read_text()) == {
        "tensorboard": str(result.run_dir / "tensorboard")}


@needs("mlflow")
def test_mlflow_run_holds_metrics_params_and_the_evaluation(fake_engine, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # as the tracker sets it by default
    result, lines = run(tmp_path, "mlflow", "SAVE_EVERY=2")
    client = MlflowClient(tracking_uri=(result.run_dir / "mlruns").resolve().as_uri())
    (experiment,) = [e for e in client.search_experiments() if e.name == "tinkerkit"]
    (mlrun,) = client.search_runs([experiment.experiment_id])
    assert mlrun.info.run_name == "my-run" and mlrun.info.status == "FINISHED"
    history = client.get_metric_history(mlrun.info.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(line["step"], line["loss"]) for line in lines]
    assert [m.value for m in client.get_metric_history(mlrun.info.run_id, "lr")] == \
        pytest.approx([line["lr"] for line in lines])
    assert mlrun.data.params["BATCH_SIZE"] == "2"
    assert mlrun.data.params["DATA_FILES"] == json.dumps([str(tmp_path / "train.jsonl")])
    assert mlrun.data.params["RUN_DIR"] == str(result.run_dir)
    summary = files.read_json(result.run_dir / "summary.json")
    assert mlrun.data.metrics["tokens_per_second"] == pytest.approx(summary["tokens_per_second"])
    # tinkerkit eval on the run's step-2 checkpoint adds its metrics at step 2
    reported = report_evaluation(result.run_dir / "checkpoints" / "step_000002",
                                 {"accuracy_equivalent": 0.75, "num_examples": 8, "note": "x"})
    assert reported == ["mlflow"]
    accuracy = client.get_metric_history(mlrun.info.run_id, "eval/accuracy_equivalent")
    assert [(m.step, m.value) for m in accuracy] == [(2, 0.75)]
    assert report_evaluation(None, {"accuracy_equivalent": 1.0}) == []


@needs("wandb")
def test_wandb_offline_run_holds_metrics_and_config(fake_engine, tmp_path, monkeypatch):
    offline_wandb(monkeypatch)  # no network, no account
    result, lines = run(tmp_path, "wandb")
    (path,) = glob.glob(str(result.run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    records = wandb_records(path)
    ((name, config),) = [value for kind, value in records if kind == "run"]
    assert name == "my-run"
    assert config["BATCH_SIZE"] == 2 and config["REPORT_TO"] == ["wandb"]
    history = [value for kind, value in records if kind == "history"]
    assert [(h["_step"], h["loss"], h["lr"]) for h in history] == [
        (line["step"], line["loss"], line["lr"]) for line in lines]
    assert [value for kind, value in records if kind == "exit"] == [0]
    run_id = json.loads((result.run_dir / TRACKERS_FILE).read_text())["wandb"]
    assert path.endswith(f"run-{run_id}.wandb")


def _fail_step(monkeypatch, step: int) -> None:
    """The fake engine's ``forward_backward`` fails (a lost server) at 1-based ``step``."""
    from concurrent.futures import Future

    real = test_train_loop.FakeClient.forward_backward

    def forward_backward(self, data, loss_fn):
        if sum(call[0] == "forward_backward" for call in self.calls) == step - 1:
            self.calls.append(("forward_backward", len(data)))
            failed = Future()
            failed.set_exception(EngineError("Tinker forward_backward: the server went away"))
            return failed
        return real(self, data, loss_fn)

    monkeypatch.setattr(test_train_loop.FakeClient, "forward_backward", forward_backward)


@needs("tensorboard")
@needs("mlflow")
@needs("wandb")
def test_a_failed_run_ends_its_tracker_runs_failed_and_resume_continues_them(
        fake_engine, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    offline_wandb(monkeypatch)
    client = local_mlflow(monkeypatch, tmp_path / "my-run")
    answers = ("a", "bb cc", "d", "ee ff gg", "h", "ii", "jj", "k")  # 4 steps of 2
    # Step 4 fails after step 3 was logged; the checkpoint is at step 2.
    with monkeypatch.context() as patched:
        _fail_step(patched, 4)
        with pytest.raises(EngineError, match="step 4: .*the server went away"):
            run(tmp_path, "[tensorboard, mlflow, wandb]", "SAVE_EVERY=2", answers=answers)
    run_dir = tmp_path / "my-run"
    ids = json.loads((run_dir / TRACKERS_FILE).read_text())
    assert client.get_run(ids["mlflow"]).info.status == "FAILED"  # not left RUNNING
    (first,) = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert [value for kind, value in wandb_records(first) if kind == "exit"] == [1]
    assert [value["_step"] for kind, value in wandb_records(first) if kind == "history"] == [1, 2, 3]

    # --resume: steps 3 and 4 are trained again; each tracker run goes on, each step once.
    result, lines = run(tmp_path, "[tensorboard, mlflow, wandb]", "SAVE_EVERY=2",
                        answers=answers, resume=True)
    assert [line["step"] for line in lines] == [1, 2, 3, 4]
    assert json.loads((run_dir / TRACKERS_FILE).read_text()) == ids
    mlrun = client.get_run(ids["mlflow"])
    assert mlrun.info.status == "FINISHED"
    assert [e.name for e in client.search_experiments()].count("tinkerkit") == 1
    assert len(client.search_runs([mlrun.info.experiment_id])) == 1
    history = client.get_metric_history(ids["mlflow"], "loss")
    assert [(m.step, m.value) for m in history] == [(line["step"], line["loss"]) for line in lines]
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3, 4]  # TensorBoard's reader
    assert [e.value for e in events.Scalars("loss")] == pytest.approx([line["loss"]
                                                                      for line in lines])
    (second,) = set(glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))) - {first}
    assert second.endswith(f"run-{ids['wandb']}.wandb")  # the same W&B run, resumed
    records = wandb_records(second)
    assert [value["_step"] for kind, value in records if kind == "history"] == [4]
    assert [value for kind, value in records if kind == "exit"] == [0]


@needs("mlflow")
@needs("wandb")
def test_a_tracker_that_fails_to_start_ends_the_runs_started_before_it(fake_engine, tmp_path,
                                                                        monkeypatch):
    offline_wandb(monkeypatch, WANDB_RUN_ID="my/run")  # W&B refuses a '/' in a run id
    client = local_mlflow(monkeypatch, tmp_path / "my-run")
    with pytest.raises(TrackerError) as info:
        run(tmp_path, "[mlflow, wandb]")
    assert str(info.value) == ("REPORT_TO: wandb could not start its run: UsageError: Run ID "
                               "cannot contain the characters: :;,#?/'")
    (mlrun,) = client.search_runs([client.get_experiment_by_name("tinkerkit").experiment_id])
    assert mlrun.info.run_name == "my-run" and mlrun.info.status == "FAILED"


@needs("wandb")
@needs("mlflow")
def test_wandb_without_a_key_or_offline_mode_fails_before_the_model_loads(fake_engine, tmp_path,
                                                                         monkeypatch):
    import wandb

    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DISABLED", "NETRC"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))  # no W&B settings
    wandb.teardown()  # W&B keeps the settings it read first in a process; read them again
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the default: RUN_DIR/mlruns
    with pytest.raises(ConfigError) as info:
        run(tmp_path, "[mlflow, wandb]")
    assert str(info.value) == (
        "REPORT_TO includes 'wandb' but W&B has no usable API key (No API key configured. Use "
        "`wandb login` to log in.): set WANDB_API_KEY or run `wandb login`, or set "
        "WANDB_MODE=offline to log without an account")
    assert fake_engine == []  # before the model loads
    assert not (tmp_path / "my-run" / "mlruns").exists()  # and before any tracker run started
    wandb.teardown()


@needs("mlflow")
def test_an_mlflow_server_that_does_not_answer_fails_before_the_model_loads(fake_engine, tmp_path,
                                                                           monkeypatch):
    import socket

    with socket.socket() as sock:  # a port that nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://user:secret@127.0.0.1:{port}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # MLflow's own retries, off
    with pytest.raises(ConfigError) as info:
        run(tmp_path, "mlflow")
    message = str(info.value)
    assert message.startswith("REPORT_TO includes 'mlflow' but MLflow's store at "
                              f"MLFLOW_TRACKING_URI=http://***@127.0.0.1:{port} does not answer: "
                              "API request to ")
    assert message.endswith("; start its server, or unset MLFLOW_TRACKING_URI to log into "
                            "RUN_DIR/mlruns")
    assert "\n" not in message and "secret" not in message
    assert fake_engine == []
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    run(tmp_path, "mlflow", "SAVE_EVERY=1")
    check_evaluation_trackers(tmp_path / "my-run")  # its own store answers
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    with pytest.raises(ConfigError, match="^REPORT_TO includes 'mlflow' but MLflow's store at "):
        check_evaluation_trackers(tmp_path / "my-run" / "checkpoints" / "step_000001")  # eval


def test_a_missing_tracker_package_is_one_line_before_the_model_loads(fake_engine, tmp_path,
                                                                     monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(ConfigError) as info:
        run(tmp_path, "[tensorboard, mlflow]")
    assert str(info.value) == ("REPORT_TO includes 'mlflow' but the mlflow package is not "
                               "installed: pip install 'tinkerkit[mlflow]'")
    assert fake_engine == []  # no engine was created
    check_trackers([])


def test_report_to_is_validated():
    assert load_config(None, ["REPORT_TO=tensorboard"]).report_to == ["tensorboard"]
    assert load_config(None, ["REPORT_TO=[mlflow, mlflow, wandb]"]).report_to == ["mlflow", "wandb"]
    assert load_config(None).report_to == []
    with pytest.raises(ConfigError, match=r"REPORT_TO=\['comet'\]: .*'tensorboard', 'wandb' or "
                                          r"'mlflow'"):
        load_config(None, ["REPORT_TO=[comet]"])
