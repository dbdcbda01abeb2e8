"""The training loop with a fake engine: loss normalization, schedules, data order, run files."""

import json
from concurrent.futures import Future

import numpy as np
import pytest
import tinker

from tinkerkit import files
from tinkerkit.cli import main
from tinkerkit.config import load_config
from tinkerkit.errors import ConfigError
from tinkerkit.render import RenderedExample
from tinkerkit.train import batch_indices, learning_rate_at, train
from tinkerkit.train import loop as train_loop


def done(value):
    future = Future()
    future.set_result(value)
    return future


class FakeClient:
    """A stand-in engine whose NLL per weighted token is 2.0 in single-token answers, else 1.0."""

    def __init__(self, tokenizer, root):
        self.tokenizer, self.root, self.calls = tokenizer, root, []

    def get_tokenizer(self):
        return self.tokenizer

    def forward_backward(self, data, loss_fn):
        total = 0.0
        for datum in data:
            weights = datum.loss_fn_inputs["weights"].to_numpy()
            nll = 2.0 if np.count_nonzero(weights) == 1 else 1.0
            total += float(np.sum(weights * nll))
        self.calls.append(("forward_backward", len(data)))
        return done(tinker.types.ForwardBackwardOutput(
            loss_fn_output_type="fake", loss_fn_outputs=[], metrics={"loss:sum": total}))

    def optim_step(self, params):
        self.calls.append(("optim_step", params.learning_rate))
        return done(None)

    def save_state(self, name):
        path = self.root / name
        path.mkdir(parents=True)
        for file in ("adapter_config.json", "adapter_model.safetensors"):
            (path / file).write_text("{}")  # present, as read_checkpoint_meta checks
        (path / "tinkerkit_state.json").write_text('{"format": 1}')
        return done(type("Saved", (), {"path": str(path)})())


def write_chat(path, answers):
    lines = [json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                      {"role": "assistant", "content": a}]})
             for i, a in enumerate(answers)]
    path.write_text("\n".join(lines) + "\n")


def example(weights):
    n = len(weights)
    datum = tinker.types.Datum(
        model_input=tinker.types.ModelInput.from_ints(list(range(1, n + 1))),
        loss_fn_inputs={"target_tokens": np.arange(2, n + 2, dtype=np.int64),
                        "weights": np.asarray(weights, dtype=np.float32)})
    return RenderedExample(datum, n + 1, False, False, "test")


def test_step_loss_is_normalized_by_weighted_tokens_of_the_whole_step(fake_engine, tmp_path,
                                                                       monkeypatch):
    # One example trains 1 token at NLL 2.0, the other 3 tokens at NLL 1.0 each.
    monkeypatch.setattr(train_loop, "load_examples",
                        lambda config, tokenizer, console: [example([0, 1]), example([0, 1, 1, 1])])
    data = tmp_path / "train.jsonl"
    write_chat(data, ["a", "b"])
    config = load_config(None, [f"DATA_FILES={data}", "BATCH_SIZE=2", "NUM_EPOCHS=1"])
    result = train(config, run_dir=tmp_path / "run")
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert result.losses == [1.25]  # (2.0 + 3 * 1.0) / 4, not the per-example mean 1.5
    assert metrics[0]["loss"] == 1.25 and metrics[0]["weighted_tokens"] == 4
    assert set(metrics[0]) == {"step", "epoch", "loss", "lr", "weighted_tokens", "total_tokens",
                               "seconds"}
    checkpoints = [json.loads(line) for line in (tmp_path / "run" / "checkpoints.jsonl").open()]
    assert checkpoints == [{"step": 1, "epoch": 1, "path": "checkpoints/step_000001", "kind": "state"}]
    assert result.final_checkpoint == str(tmp_path / "run" / "checkpoints" / "step_000001")
    assert (tmp_path / "run" / "loss_curve.png").stat().st_size > 1000
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["BATCH_SIZE"] == 2


def test_steps_epochs_and_save_every(fake_engine, tmp_path):
    data = tmp_path / "train.jsonl"
    write_chat(data, ["a", "b", "c", "d", "e"])
    config = load_config(None, [f"DATA_FILES={data}", "BATCH_SIZE=2", "NUM_EPOCHS=2",
                                "SAVE_EVERY=2", "LEARNING_RATE=1e-3", "LR_SCHEDULE=constant"])
    result = train(config, run_dir=tmp_path / "run")
    assert result.steps == 6  # ceil(5 / 2) = 3 per epoch
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "checkpoints.jsonl").open()]
    assert steps == [2, 4, 6]
    optim = [c for c in fake_engine[0].calls if c[0] == "optim_step"]
    assert [lr for _, lr in optim] == [1e-3] * 6


def test_learning_rate_schedules():
    config = load_config(None, ["LEARNING_RATE=1.0", "WARMUP_STEPS=2", "LR_SCHEDULE=linear"])
    assert [learning_rate_at(s, 6, config) for s in range(6)] == [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]
    cosine = load_config(None, ["LEARNING_RATE=1.0", "LR_SCHEDULE=cosine"])
    assert [round(learning_rate_at(s, 4, cosine), 6) for s in range(4)] == [1.0, 0.853553, 0.5,
                                                                           0.146447]


def test_batch_order_is_a_seeded_permutation_per_epoch():
    epoch0 = [batch_indices(s, 5, 2, seed=3) for s in range(3)]
    assert all(e == 0 for e, _ in epoch0)
    assert sorted(i for _, batch in epoch0 for i in batch) == [0, 1, 2, 3, 4]
    assert [len(b) for _, b in epoch0] == [2, 2, 1]
    assert batch_indices(4, 5, 2, seed=3) == batch_indices(4, 5, 2, seed=3)
    assert batch_indices(3, 5, 2, seed=3)[0] == 1
    assert batch_indices(0, 5, 2, seed=3) != batch_indices(0, 5, 2, seed=4)


def test_a_fresh_run_refuses_a_used_run_dir_and_a_finished_run_has_nothing_to_do(
        fake_engine, tmp_path):
    from tinkerkit.errors import ConfigError

    data = tmp_path / "train.jsonl"
    write_chat(data, ["a", "b"])
    config = load_config(None, [f"DATA_FILES={data}", "BATCH_SIZE=2"])
    train(config, run_dir=tmp_path / "run")
    with pytest.raises(ConfigError, match="already holds a run; continue it with --resume"):
        train(config, run_dir=tmp_path / "run")
    summary = (tmp_path / "run" / "summary.json").read_text()
    again = train(config, resume=str(tmp_path / "run"))
    assert again.losses == [] and again.steps == 1
    assert (tmp_path / "run" / "summary.json").read_text() == summary  # untouched


def test_run_dir_with_resume_is_refused_unless_it_is_the_run(fake_engine, tmp_path):
    data = tmp_path / "train.jsonl"
    write_chat(data, ["a", "b", "c", "d"])
    config = load_config(None, [f"DATA_FILES={data}", "BATCH_SIZE=2", "SAVE_EVERY=1",
                                "MAX_STEPS=1"])
    run = tmp_path / "run"
    train(config, run_dir=run)
    longer = config.model_copy(update={"max_steps": 2})
    with pytest.raises(ConfigError) as info:
        train(longer, run_dir=tmp_path / "elsewhere", resume=str(run))
    assert str(info.value) == (f"--run-dir {tmp_path / 'elsewhere'}: --resume continues the run in "
                               f"its own directory {run}; drop --run-dir, or start a new run from "
                               f"its weights with --init-from {run} --run-dir "
                               f"{tmp_path / 'elsewhere'}")
    assert not (tmp_path / "elsewhere").exists()
    assert train(longer, run_dir=run, resume=str(run)).steps == 2  # its own directory: fine


def test_run_dir_setting_with_resume_is_refused_unless_it_is_the_run(fake_engine, tmp_path,
                                                                     capsys):
    data = tmp_path / "train.jsonl"
    write_chat(data, ["a", "b", "c", "d", "e", "f"])
    run, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    settings = [f"DATA_FILES={data}", "BATCH_SIZE=2", "SAVE_EVERY=1", "MAX_STEPS=1"]
    train(load_config(None, settings), run_dir=run)
    config_file = tmp_path / "config.toml"
    config_file.write_text(f'DATA_FILES = ["{data}"]\nBATCH_SIZE = 2\nMAX_STEPS = 3\n'
                           f'RUN_DIR = "{elsewhere}"\n')
    refused = (f"error: RUN_DIR={elsewhere}: --resume continues the run in its own directory "
               f"{run}; drop RUN_DIR, or start a new run from its weights with --init-from {run} "
               f"--run-dir {elsewhere}\n")
    for argv in (["--set", f"RUN_DIR={elsewhere}", "--set", "MAX_STEPS=2"], ["--config", str(config_file)]):
        assert main(["train", "--resume", str(run), *argv]) == 1
        assert capsys.readouterr().err == refused
        assert not elsewhere.exists() and len(files.read_jsonl(run / "metrics.jsonl")) == 1
    # RUN_DIR naming the run itself is its own directory; a moved run resumes where it is now
    assert main(["train", "--resume", str(run), "--set", f"RUN_DIR={run}", "--set",
                 "MAX_STEPS=2"]) == 0
    run.rename(tmp_path / "moved")  # its config.json still says RUN_DIR = run
    assert main(["train", "--resume", str(tmp_path / "moved"), "--set", "MAX_STEPS=3"]) == 0
    assert [r["step"] for r in files.read_jsonl(tmp_path / "moved" / "metrics.jsonl")] == [1, 2, 3]


def test_counts_of_one_are_singular_in_messages(fake_engine, tmp_path):
    import io

    from rich.console import Console

    from tinkerkit.errors import plural
    from tinkerkit.train.run_dir import stopped_message

    data = tmp_path / "train.jsonl"
    write_chat(data, ["a", "b"])
    out = io.StringIO()
    config = load_config(None, [f"DATA_FILES={data}", "BATCH_SIZE=2", "SAVE_EVERY=1"])
    train(config, run_dir=tmp_path / "run", console=Console(file=out, width=200))
    assert f"Training 1 step (1 per epoch, batch 2) in {tmp_path / 'run'}" in out.getvalue()
    (tmp_path / "run" / "checkpoints.jsonl").write_text("")  # as if killed before its save
    assert stopped_message(tmp_path / "run", "").startswith(
        "training stopped; the run stopped before its first checkpoint, so there is nothing to "
        "resume (it saves every step: SAVE_EVERY=1)")
    assert [plural(n, "example") for n in (0, 1, 2)] == ["0 examples", "1 example", "2 examples"]


def test_the_one_screen_script_prints_its_help_and_trains_nothing(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parent.parent / "tinker_finetune.py"
    done = subprocess.run([sys.executable, str(script), "-h"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0
    assert done.stdout.startswith("usage: tinker_finetune.py [-h]\n\nFine-tune a LoRA adapter in "
                                  "one screen")
    assert list(tmp_path.iterdir()) == []  # no runs/ directory: nothing trained
