"""Exact resume through the training loop on the local engine and a tiny random model."""


import pytest
from safetensors.torch import load_file

from tinkerkit import files
from tinkerkit.config import load_config
from tinkerkit.data.demo import write_demo_data
from tinkerkit.errors import CheckpointError
from tinkerkit.train import loop as train_loop
from tinkerkit.train import train


@pytest.fixture
def config(tiny_model, tmp_path):
    data = write_demo_data(tmp_path / "train.jsonl", n=12, seed=0)
    return load_config(None, [f"DATA_FILES={data}", f"BASE_MODEL={tiny_model}", "LORA_RANK=4",
                              "BATCH_SIZE=4", "NUM_EPOCHS=2", "SAVE_EVERY=2", "SEED=0",
                              "LORA_DROPOUT=0.1", "LEARNING_RATE=1e-2", "WARMUP_STEPS=1",
                              "LR_SCHEDULE=cosine", "DEVICE=cpu", "MAX_SEQUENCE_LENGTH=128"])


def adapter(path):
    return load_file(f"{path}/adapter_model.safetensors")


def metrics(run_dir):
    return files.read_jsonl(run_dir / "metrics.jsonl")


class Crash(Exception):
    pass


def test_resume_after_a_crash_matches_the_uninterrupted_run(config, tmp_path, monkeypatch):
    full = train(config, run_dir=tmp_path / "full")
    assert full.steps == 6

    real_await_step = train_loop.await_step
    calls = []

    def crash_after_three_steps(*args):
        if len(calls) == 3:
            raise Crash("killed")
        calls.append(1)
        return real_await_step(*args)

    monkeypatch.setattr(train_loop, "await_step", crash_after_three_steps)
    with pytest.raises(Crash):
        train(config, run_dir=tmp_path / "crashed")
    assert [r["step"] for r in metrics(tmp_path / "crashed")] == [1, 2, 3]
    monkeypatch.setattr(train_loop, "await_step", real_await_step)

    resumed = train(config, resume=str(tmp_path / "crashed"))  # latest checkpoint: step 2
    crashed, reference = metrics(tmp_path / "crashed"), metrics(tmp_path / "full")
    assert [r["step"] for r in crashed] == [1, 2, 3, 4, 5, 6]  # step 3 logged once, not twice
    assert [r["loss"] for r in crashed] == [r["loss"] for r in reference]
    assert [r["lr"] for r in crashed] == [r["lr"] for r in reference]
    final, expected = adapter(resumed.final_checkpoint), adapter(full.final_checkpoint)
    assert final.keys() == expected.keys()
    for key in final:  # bitwise on CPU
        assert (final[key] == expected[key]).all(), key
    steps = [e["step"] for e in files.read_jsonl(tmp_path / "crashed" / "checkpoints.jsonl")]
    assert steps == [2, 4, 6]


def test_a_run_killed_before_its_first_checkpoint_says_so_and_can_start_again(
        config, tmp_path, monkeypatch):
    # SAVE_EVERY=2: a crash awaiting step 2 leaves step 1 logged and nothing saved.
    from tinkerkit.errors import ConfigError

    real_await_step, calls = train_loop.await_step, []

    def crash_at_step_two(*args):
        if calls:
            raise Crash("killed")
        calls.append(1)
        return real_await_step(*args)

    monkeypatch.setattr(train_loop, "await_step", crash_at_step_two)
    run = tmp_path / "stage2"
    with pytest.raises(Crash):
        train(config, run_dir=run)
    monkeypatch.setattr(train_loop, "await_step", real_await_step)
    assert [r["step"] for r in metrics(run)] == [1] and not (run / "checkpoints.jsonl").exists()
    with pytest.raises(CheckpointError) as resume:
        train(config, resume=str(run))
    assert str(resume.value) == (
        f"--resume {run}: the run stopped before its first checkpoint, so there is nothing to "
        f"resume (it saves every 2 steps: SAVE_EVERY=2); start it again: remove {run}, or "
        "choose another --run-dir")
    with pytest.raises(ConfigError) as again:  # no longer "continue it with --resume"
        train(config, run_dir=run)
    assert str(again.value) == (
        f"--run-dir {run} holds a run that stopped before its first checkpoint, so there is "
        f"nothing to resume; remove {run} to start it again there, or choose another --run-dir")
    assert [r["step"] for r in metrics(run)] == [1]  # neither attempt touched the run


def test_resume_from_a_checkpoint_path_and_init_from(config, tmp_path):
    full = train(config, run_dir=tmp_path / "full")
    step4 = tmp_path / "full" / "checkpoints" / "step_000004"
    resumed = train(config, resume=str(step4))
    assert resumed.losses == [r["loss"] for r in metrics(tmp_path / "full")][4:]
    # A new stage: weights from step 4, fresh optimizer and schedule, its own run directory.
    stage = train(config, run_dir=tmp_path / "stage2", init_from=str(step4))
    assert stage.steps == 6 and len(metrics(tmp_path / "stage2")) == 6
    assert metrics(tmp_path / "stage2")[0]["lr"] == metrics(tmp_path / "full")[0]["lr"]
    assert full.final_checkpoint != stage.final_checkpoint
    # --init-from a run directory takes its latest checkpoint (step 6), as eval and export do.
    one = config.model_copy(update={"max_steps": 1})
    by_dir = train(one, run_dir=tmp_path / "from-dir", init_from=str(tmp_path / "full"))
    by_path = train(one, run_dir=tmp_path / "from-path", init_from=full.final_checkpoint)
    assert by_dir.losses == by_path.losses != stage.losses[:1]


def test_resume_refuses_a_path_that_is_not_a_checkpoint(config, tmp_path):
    with pytest.raises(CheckpointError, match="not a run directory or a checkpoint"):
        train(config, resume=str(tmp_path))


def test_a_moved_run_directory_resumes_from_its_own_checkpoints(config, tmp_path):
    import shutil

    train(config.model_copy(update={"max_steps": 4}), run_dir=tmp_path / "a")
    shutil.move(tmp_path / "a", tmp_path / "b")
    entries = files.read_jsonl(tmp_path / "b" / "checkpoints.jsonl")
    assert [e["path"] for e in entries] == ["checkpoints/step_000002", "checkpoints/step_000004"]
    resumed = train(config, resume=str(tmp_path / "b"))  # MAX_STEPS from the config: 6
    assert resumed.final_checkpoint == str(tmp_path / "b" / "checkpoints" / "step_000006")


def test_resume_says_which_newer_checkpoint_it_passes_over_and_why(config, tmp_path):
    """The latest checkpoint lost a file (a crash while it was written, or damage): --resume
    used to go back to the one before without a word, then train over the damaged one."""
    import io as _io

    from rich.console import Console

    full = train(config, run_dir=tmp_path / "full")
    run_dir = tmp_path / "damaged"
    train(config, run_dir=run_dir)
    damaged, before = run_dir / "checkpoints" / "step_000006", run_dir / "checkpoints" / "step_000004"
    (damaged / "adapter_config.json").unlink()
    out = Console(file=_io.StringIO(), width=400)
    resumed = train(config, resume=str(run_dir), console=out)
    lines = out.file.getvalue().splitlines()
    start = lines.index(f"Resuming {run_dir} from step 4 ({before})")
    assert lines[start + 1] == (f"skipped the newer checkpoint {damaged}: adapter_config.json is "
                                "missing (incomplete checkpoint?); the steps after 4 are trained "
                                "and saved again")
    assert [r["step"] for r in metrics(run_dir)] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in metrics(run_dir)] == [r["loss"] for r in metrics(tmp_path / "full")]
    assert (damaged / "adapter_config.json").is_file()
    final, expected = adapter(resumed.final_checkpoint), adapter(full.final_checkpoint)
    assert final.keys() == expected.keys()
    assert all((final[k] - expected[k]).abs().max().item() == 0 for k in expected)
