"""Experiment trackers (REPORT_TO): the values of a run read back with each library's own reader.

TensorBoard through its ``EventAccumulator``, MLflow through ``MlflowClient`` on the run's local
``file:`` store, W&B through the offline run file (``WANDB_MODE=offline``: no network) read with
wandb's own ``DataStore`` and ``Record`` protobuf. A tracker whose package is missing skips.
"""

from __future__ import annotations

import glob
import importlib.util
import json

import pytest

from test_train_loop import write_chat
from tinkerkit import files
from tinkerkit.config import load_config
from tinkerkit.errors import ConfigError
from tinkerkit.train import report_evaluation, train
from tinkerkit.train.trackers import TRACKERS_FILE, check_trackers


def needs(package: str):
    return pytest.mark.skipif(importlib.util.find_spec(package) is None,
                              reason=f"{package} is not installed: pip install 'tinkerkit[{package}]'")


def run(tmp_path, report_to: str, *extra: str):
    data = tmp_path / "train.jsonl"
    write_chat(data, ["a", "bb cc", "d", "ee ff gg", "h", "ii"])
    config = load_config(None, [f"DATA_FILES={data}", "BATCH_SIZE=2", "NUM_EPOCHS=1",
                                f"REPORT_TO={report_to}", "LEARNING_RATE=1e-3", *extra])
    result = train(config, run_dir=tmp_path / "my-run")
    return result, files.read_jsonl(result.run_dir / "metrics.jsonl")


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
    from wandb.proto import wandb_internal_pb2
    from wandb.sdk.internal import datastore

    for name in ("WANDB_PROJECT", "WANDB_DIR", "WANDB_ENTITY", "WANDB_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")  # no network, no account
    monkeypatch.setenv("WANDB_SILENT", "true")
    result, lines = run(tmp_path, "wandb")
    (path,) = glob.glob(str(result.run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    store = datastore.DataStore()
    store.open_for_scan(path)
    history, config, name = [], {}, None
    while (data := store.scan_data()) is not None:
        record = wandb_internal_pb2.Record.FromString(data)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                            for i in record.history.item})
        elif kind == "run":
            name = record.run.display_name
            config.update({i.key: json.loads(i.value_json) for i in record.run.config.update})
        elif kind == "summary":
            pass
    assert name == "my-run"
    assert config["BATCH_SIZE"] == 2 and config["REPORT_TO"] == ["wandb"]
    assert [(h["_step"], h["loss"], h["lr"]) for h in history] == [
        (line["step"], line["loss"], line["lr"]) for line in lines]
    run_id = json.loads((result.run_dir / TRACKERS_FILE).read_text())["wandb"]
    assert path.endswith(f"run-{run_id}.wandb")


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
