"""The loop's guards: too many long examples, --strict, NaN/inf, a loss that stops falling, --dry-run."""

import io as _io
import json
import math
from concurrent.futures import Future

import httpx
import numpy as np
import pytest
import tinker
import torch
from rich.console import Console

from tinkerkit import files
from tinkerkit.cli import main
from tinkerkit.config import load_config
from tinkerkit.data.formats import load_conversations
from tinkerkit.engines import tinker as tinker_engine
from tinkerkit.errors import (
    EngineError,
    NonFiniteGradientError,
    TinkerkitError,
    TrainingInterrupted,
    non_finite_gradient_message,
)
from tinkerkit.render import Renderer
from tinkerkit.train import (
    TrainingDivergedError,
    batch_indices,
    dry_run,
    length_covering,
    load_examples,
    plateau_warning,
    train,
)


def write_chat(path, answers):
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                                     {"role": "assistant", "content": a}]}) + "\n"
                            for i, a in enumerate(answers)))
    return path


@pytest.fixture
def long_data(tmp_path):
    """20 chats, 8 of them (40%) longer than 64 tokens: answers of 40 to 180 words."""
    answers = ["a"] * 12 + ["word " * k for k in range(40, 200, 20)]
    return write_chat(tmp_path / "long.jsonl", answers)


def recording_console():
    return Console(file=_io.StringIO(), width=400, color_system=None)


def full_lengths(path, tokenizer):
    renderer = Renderer(tokenizer)
    return [len(renderer.render_tokens(c)[0]) for c in load_conversations([path]).conversations]


# -- too many long examples --------------------------------------------------------------------

@pytest.mark.parametrize("truncate, fate", [(True, "8 truncated, 0 skipped"),
                                             (False, "0 truncated, 8 skipped")])
def test_forty_percent_too_long_warns_with_percentage_and_suggested_length(
        long_data, smol_tokenizer, truncate, fate):
    lengths = full_lengths(long_data, smol_tokenizer)
    assert sum(n > 64 for n in lengths) == 8 and len(lengths) == 20
    # The 95% nearest rank of 20 lengths is the 19th smallest, rounded up to a multiple of 64.
    expected = math.ceil(sorted(lengths)[18] / 64) * 64
    assert expected == 256
    config = load_config(None, [f"DATA_FILES={long_data}", "MAX_SEQUENCE_LENGTH=64",
                                f"TRUNCATE_LONG_SEQUENCES={truncate}", "BATCH_SIZE=2"])
    console = recording_console()
    examples = load_examples(config, smol_tokenizer, console)
    assert len(examples) == (20 if truncate else 12)
    out = " ".join(console.file.getvalue().split())
    assert (f"Warning: 40.0% of the training examples (8 of 20) are longer than "
            f"MAX_SEQUENCE_LENGTH=64 ({fate}); MAX_SEQUENCE_LENGTH=256 would keep 95% of "
            f"them whole") in out


def test_no_warning_at_or_below_the_threshold(long_data, smol_tokenizer):
    config = load_config(None, [f"DATA_FILES={long_data}", "MAX_SEQUENCE_LENGTH=64",
                                "TRUNCATION_WARN_RATIO=0.4", "STRICT=true"])
    console = recording_console()
    assert len(load_examples(config, smol_tokenizer, console)) == 20  # 40% is not above 40%
    assert "Warning" not in console.file.getvalue()


def model_config_dir(path, **config):
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


def test_examples_past_the_models_positions_warn(long_data, smol_tokenizer, tmp_path):
    # Kept lengths 35 (x10), 36 (x2), 76, 96, ..., 196, 200: eight feed more than 64 positions.
    model = model_config_dir(tmp_path / "m64", max_position_embeddings=64)
    config = load_config(None, [f"DATA_FILES={long_data}", f"BASE_MODEL={model}",
                                "MAX_SEQUENCE_LENGTH=200"])
    console = recording_console()
    assert len(load_examples(config, smol_tokenizer, console)) == 20
    out = " ".join(console.file.getvalue().split())
    assert (f"Warning: 8 of the 20 training examples are longer than the 64 positions {model} "
            "was trained for (max_position_embeddings in its config.json; the longest has 200 "
            "tokens); the model has never seen the positions past them: lower "
            "MAX_SEQUENCE_LENGTH to 64 or use a longer-context model") in out
    # 65 tokens feed 64 positions (the last token is only a target): within the model.
    config = config.model_copy(update={"max_sequence_length": 65, "truncation_warn_ratio": 1.0})
    console = recording_console()
    load_examples(config, smol_tokenizer, console)
    assert "positions" not in console.file.getvalue()


def test_stats_warns_past_the_models_positions(tiny_model, tmp_path, capsys):
    # tiny_model has 512 positions; 600 words render to 635 tokens with its template.
    data = write_chat(tmp_path / "d.jsonl", ["word " * 600, "short"])
    assert main(["stats", str(data), "--model", tiny_model, "--max-length", "100000"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert (f"Warning: 1 of the 2 training examples are longer than the 512 positions "
            f"{tiny_model} was trained for (max_position_embeddings in its config.json; the "
            "longest has 635 tokens)") in out
    assert main(["stats", str(data), "--model", tiny_model, "--max-length", "513"]) == 0
    assert "positions" not in capsys.readouterr().out


def test_max_positions(tmp_path):
    from tinkerkit.models import max_positions

    assert max_positions("smollm2-135m-instruct") == 8192
    assert max_positions("qwen3-tiny-random") == 40960
    assert max_positions("qwen3-tokenizer") is None      # a tokenizer only: no config.json
    assert max_positions("Org/not-on-disk") is None      # a hub id: unknown offline
    assert max_positions(str(tmp_path / "missing")) is None
    yarn = {"max_position_embeddings": 32768,
            "rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                             "original_max_position_embeddings": 32768}}
    assert max_positions(model_config_dir(tmp_path / "yarn", **yarn)) == 131072
    assert max_positions(model_config_dir(
        tmp_path / "vlm", text_config={"max_position_embeddings": 4096})) == 4096
    assert max_positions(model_config_dir(tmp_path / "none", hidden_size=8)) is None


def test_length_covering_uses_the_nearest_rank():
    assert length_covering([10] * 19 + [1000]) == 64        # 19th of 20 is 10 -> 64
    assert length_covering([10] * 18 + [100, 1000]) == 128  # 19th of 20 is 100 -> 128
    assert length_covering([65]) == 128


def test_strict_exits_non_zero_before_any_compute(long_data, tmp_path, monkeypatch, capsys):
    def no_engine(*args, **kwargs):
        raise AssertionError("the engine must not be created")

    monkeypatch.setattr("tinkerkit.engines.create_training_client", no_engine)
    run_dir = tmp_path / "run"
    code = main(["train", "--data", str(long_data), "--max-length", "64", "--batch-size", "2",
                 "--run-dir", str(run_dir), "--strict"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("error: 40.0% of the training examples (8 of 20)") and "STRICT" in err
    assert len(err.strip().splitlines()) == 1
    assert not run_dir.exists()


# -- NaN/inf and plateaus, on a scripted engine -----------------------------------------------

def done(value):
    future = Future()
    future.set_result(value)
    return future


def failed(error):
    future = Future()
    future.set_exception(error)
    return future


class ScriptedClient:
    """An engine whose step n (1-based) has loss ``losses[n - 1]``; ``optim`` maps a step to what
    its optimizer step gives instead of success: an exception (the future fails with it) or an
    ``OptimStepResponse``."""

    def __init__(self, root, losses, optim=None):
        self.root, self.losses, self.optim, self.steps = root, losses, optim or {}, 0

    def forward_backward(self, data, loss_fn):
        loss = self.losses[self.steps]
        return done(tinker.types.ForwardBackwardOutput(
            loss_fn_output_type="fake", loss_fn_outputs=[], metrics={"loss:sum": loss}))

    def optim_step(self, params):
        self.steps += 1
        outcome = self.optim.get(self.steps)
        if isinstance(outcome, BaseException):
            return failed(outcome)
        return done(outcome or tinker.types.OptimStepResponse(metrics={"grad_norm": 0.5}))

    def save_state(self, name):
        path = self.root / name
        path.mkdir(parents=True)
        return done(type("Saved", (), {"path": str(path)})())


def scripted_run(tmp_path, monkeypatch, losses, optim=None, extra=()):
    monkeypatch.setattr("tinkerkit.engines.create_training_client",
                        lambda config, root, state=None, with_optimizer=False:
                        ScriptedClient(root, losses, optim))
    data = write_chat(tmp_path / "train.jsonl", [f"answer {i}" for i in range(len(losses))])
    config = load_config(None, [f"DATA_FILES={data}", "BATCH_SIZE=1", "LR_SCHEDULE=constant",
                                *extra])
    console = recording_console()
    return tmp_path / "run", console, lambda: train(config, run_dir=tmp_path / "run",
                                                    console=console)


LOSSES = [2.0, 1.9, 1.8, 1.7, 1.6]


@pytest.mark.parametrize("losses, optim, what", [
    ([2.0, 1.9, float("nan"), 1.7, 1.6], None, "the training loss is nan"),
    (LOSSES, {3: NonFiniteGradientError(non_finite_gradient_message(math.inf, 3))},
     "the optimizer step was refused (gradient norm is inf at step 3; step skipped)"),
    (LOSSES, {3: tinker.types.OptimStepResponse(metrics={"grad_norm": math.nan})},
     "the gradient norm is nan"),
])
def test_nan_or_inf_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, losses,
                                                             optim, what):
    run_dir, _, run = scripted_run(tmp_path, monkeypatch, losses, optim, ["SAVE_EVERY=2"])
    with pytest.raises(TrainingDivergedError) as caught:
        run()
    message = str(caught.value)
    assert isinstance(caught.value, TinkerkitError) and "\n" not in message
    good = run_dir / "checkpoints" / "step_000002"
    assert message.startswith(f"step 3: {what}; training stopped, the last good checkpoint, "
                              f"{good} (step 2), is the latest in {run_dir / 'checkpoints.jsonl'}")
    assert [e["step"] for e in files.read_jsonl(run_dir / "checkpoints.jsonl")] == [2]
    assert [r["step"] for r in files.read_jsonl(run_dir / "metrics.jsonl")] == [1, 2]


def test_an_engine_failure_is_not_reported_as_divergence(tmp_path, monkeypatch):
    """A lost connection to the Tinker server fails the optimizer step with an EngineError: the
    run stops with that error and the step, not as a NaN/inf divergence."""
    request = httpx.Request("POST", "http://127.0.0.1:8000/api/v1/retrieve_future")
    lost = tinker_engine.engine_error(tinker.APIConnectionError(request=request), "optim_step")
    run_dir, _, run = scripted_run(tmp_path, monkeypatch, LOSSES, {3: lost}, ["SAVE_EVERY=2"])
    with pytest.raises(EngineError) as caught:
        run()
    assert not isinstance(caught.value, TrainingDivergedError)
    assert not isinstance(caught.value, NonFiniteGradientError)
    good = run_dir / "checkpoints" / "step_000002"
    assert str(caught.value) == (
        "step 3: Tinker optim_step: cannot reach the Tinker server (Connection error.); "
        f"training stopped, the last good checkpoint, {good} (step 2), is the latest in "
        f"{run_dir / 'checkpoints.jsonl'}: once the cause is fixed, continue with --resume "
        f"{run_dir}")
    assert "NaN" not in str(caught.value) and "nan" not in str(caught.value)
    assert [e["step"] for e in files.read_jsonl(run_dir / "checkpoints.jsonl")] == [2]
    assert [r["step"] for r in files.read_jsonl(run_dir / "metrics.jsonl")] == [1, 2]


def test_ctrl_c_during_training_names_the_checkpoint_to_resume_from(tmp_path, monkeypatch,
                                                                    capfd):
    run_dir, _, run = scripted_run(tmp_path, monkeypatch, LOSSES, {3: KeyboardInterrupt()},
                                   ["SAVE_EVERY=2"])
    with pytest.raises(TrainingInterrupted) as caught:
        run()
    good = run_dir / "checkpoints" / "step_000002"
    message = (f"training stopped, the last good checkpoint, {good} (step 2), is the latest in "
               f"{run_dir / 'checkpoints.jsonl'}: continue with --resume {run_dir}")
    assert str(caught.value) == message
    assert isinstance(caught.value, KeyboardInterrupt)

    (tmp_path / "early").mkdir()
    early_dir, _, early = scripted_run(tmp_path / "early", monkeypatch, LOSSES,
                                       {1: KeyboardInterrupt()}, ["SAVE_EVERY=3"])
    with pytest.raises(TrainingInterrupted) as before_any:
        early()
    assert str(before_any.value) == (
        "training stopped; the run stopped before its first checkpoint, so there is nothing to "
        f"resume (it saves every 3 steps: SAVE_EVERY=3): start it again: remove {early_dir}, or "
        "choose another --run-dir")

    def interrupted(*args, **kwargs):
        raise caught.value

    monkeypatch.setattr("tinkerkit.train.train", interrupted)
    data = write_chat(tmp_path / "more.jsonl", ["answer"])
    assert main(["train", "--data", str(data), "--run-dir", str(tmp_path / "other")]) == 130
    assert capfd.readouterr().err == f"interrupted: {message}\n"


def test_a_loss_that_stops_falling_is_reported_once_per_window(tmp_path, monkeypatch):
    run_dir, console, run = scripted_run(tmp_path, monkeypatch, [4.0, 3.0, 2.0, 1.0, 1.0, 2.0],
                                         extra=["LOSS_PLATEAU_WINDOW=2"])
    run()
    out = " ".join(console.file.getvalue().split())
    # Step 4: the mean of steps 3-4 (1.5) is below steps 1-2 (3.5): fine. Step 6: 1.5 vs 1.5.
    assert out.count("has not fallen") == 1
    assert ("Warning (step 6): the training loss has not fallen over the last 2 steps "
            "(mean 1.5000, the 2 before 1.5000)") in out
    assert plateau_warning([4.0, 3.0, 2.0, 1.0], 2) is None
    assert plateau_warning([1.0, 1.0, 2.0], 2) is None  # not at a window boundary
    assert plateau_warning([1.0] * 6, 0) is None


# -- dry run ------------------------------------------------------------------------------------

def test_dry_run_times_one_batch_and_writes_nothing(tiny_model, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from tinkerkit.data.demo import write_demo_data
    from tinkerkit.models import load_tokenizer

    monkeypatch.chdir(tmp_path)
    data = write_demo_data(tmp_path / "train.jsonl", n=10, seed=0)
    config = load_config(None, [f"DATA_FILES={data}", f"BASE_MODEL={tiny_model}", "LORA_RANK=4",
                                "BATCH_SIZE=4", "NUM_EPOCHS=2", "SEED=3", "DEVICE=cpu",
                                "MAX_SEQUENCE_LENGTH=128"])
    report = dry_run(config, recording_console())
    assert (report.examples, report.steps) == (10, 6)  # ceil(10 / 4) = 3 steps per epoch
    assert report.seconds_per_step > 0
    # LoRA's B starts at zero, so the first loss is the base model's mean NLL per weighted token
    # on the first batch of the seeded order.
    renderer = Renderer(load_tokenizer(tiny_model), max_length=128)
    examples = [renderer.render(c) for c in load_conversations([data]).conversations]
    _, indices = batch_indices(0, 10, 4, seed=3)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    nll, weight = 0.0, 0.0
    with torch.no_grad():
        for i in indices:
            inputs = examples[i].datum.loss_fn_inputs
            tokens = torch.tensor([examples[i].datum.model_input.to_ints()])
            logprobs = torch.log_softmax(model(tokens).logits[0].float(), -1)
            targets = torch.as_tensor(inputs["target_tokens"].to_numpy())
            weights = torch.as_tensor(inputs["weights"].to_numpy())
            nll -= float((logprobs[torch.arange(len(targets)), targets] * weights).sum())
            weight += float(weights.sum())
    assert report.first_loss == pytest.approx(nll / weight, rel=1e-5)
    assert np.isfinite(report.first_loss) and not (tmp_path / "runs").exists()


def test_cli_dry_run_calls_dry_run_instead_of_train(tmp_path, monkeypatch):
    data = write_chat(tmp_path / "train.jsonl", ["a", "b"])
    calls = []
    monkeypatch.setattr("tinkerkit.train.dry_run", lambda config, console: calls.append(config))
    monkeypatch.setattr("tinkerkit.train.train", lambda *a, **k: pytest.fail("train was called"))
    assert main(["train", "--data", str(data), "--batch-size", "2", "--dry-run"]) == 0
    assert [(c.data_files, c.batch_size, c.strict) for c in calls] == [([str(data)], 2, False)]


def test_two_quick_ctrl_c_end_the_command_at_once_with_one_line(tmp_path, tiny_model):
    """The console script: the first Ctrl-C names the checkpoint, a second one right after it is
    ignored (it used to abort the interpreter's shutdown with a traceback), exit code 130."""
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    data = write_chat(tmp_path / "train.jsonl", [f"answer {i}" for i in range(400)])
    run_dir = tmp_path / "run"
    script = Path(sys.executable).with_name("tinkerkit")
    child = subprocess.Popen(
        [str(script), "train", "--data", str(data), "--model", tiny_model, "--batch-size", "1",
         "--run-dir", str(run_dir), "--set", "SAVE_EVERY=2", "--set", "DEVICE=cpu"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not (run_dir / "checkpoints.jsonl").exists() and child.poll() is None \
            and time.monotonic() < deadline:
        time.sleep(0.1)
    child.send_signal(signal.SIGINT)
    time.sleep(0.05)
    child.send_signal(signal.SIGINT)
    err = child.communicate(timeout=60)[1]
    assert child.returncode == 130, err
    lines = err.strip().splitlines()
    assert lines[-1].startswith("interrupted: training stopped, the last good checkpoint, ")
    assert lines[-1].endswith(f"continue with --resume {run_dir}")
    assert "Traceback" not in err
