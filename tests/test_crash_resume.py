"""Crashes lose nothing: SIGKILL a training run at chosen points, resume it, compare.

Each run trains the tiny random Llama (LoRA rank 4, dropout 0.1, cosine schedule with warmup)
for 6 steps (15 training examples, batch 4: 4 steps an epoch, so step 5 starts the second epoch),
checkpoints every 2 steps and evaluates the 5 held-out examples (two ``forward`` chunks) every 3
steps. The killed run is a child process, ``python tests/kill_points.py POINT STEP
tinkerkit-args``, that SIGKILLs itself when the training reaches POINT at step STEP.

Why self-SIGKILL from a wrapped function rather than a timer or a sentinel file: the point is
exact (a timer lands anywhere, and a sentinel file needs a wait loop in the code under test);
it is a real SIGKILL, so no ``finally``, ``atexit`` or buffered write runs; and the hooks live in
the test's child process only (``kill_points.py`` wraps tinkerkit functions there), so production
code carries no fault-injection flag.

After each kill the run is resumed with ``tinkerkit train --resume RUN_DIR`` and must end exactly
as the uninterrupted run: the final adapter byte-identical, ``metrics.jsonl`` holding each step
once with the same values, ``checkpoints.jsonl`` listing steps 2, 4 and 6; and the resume must
start from the newest *complete* checkpoint listed (never the partial one the kill left).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tinkerkit import files
from tinkerkit.checkpoint import latest_checkpoint
from tinkerkit.cli import main
from tinkerkit.data.demo import write_demo_data

pytestmark = pytest.mark.slow  # about 60 s: five killed child processes, each importing torch

STEPS = 6
KILL_POINTS = [
    # point, step, the checkpoint the resume must start from, what the kill leaves behind
    ("between_steps", 3, 2, "metrics 1-3 logged, checkpoint 2"),
    ("during_save", 4, 2, "a staging directory with a half-written optimizer.safetensors"),
    ("after_save_before_listing", 4, 2, "checkpoints/step_000004 complete but not listed"),
    ("during_eval", 3, 2, "step 3's held-out forward half done, its line not logged"),
    ("during_metrics_append", 5, 4, "half of step 5's line in metrics.jsonl"),
]


@pytest.fixture(scope="module")
def setup(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("crash")
    data = write_demo_data(root / "train.jsonl", n=20, seed=0)
    config = root / "config.yaml"
    config.write_text("\n".join([
        f"DATA_FILES: [{data}]", f"BASE_MODEL: {tiny_model}", "LORA_RANK: 4",
        "LORA_DROPOUT: 0.1", "BATCH_SIZE: 4", "NUM_EPOCHS: 2", "MAX_STEPS: 6", "SAVE_EVERY: 2", "SEED: 0",
        "LEARNING_RATE: 1.0e-2", "WARMUP_STEPS: 1", "LR_SCHEDULE: cosine", "DEVICE: cpu",
        "MAX_SEQUENCE_LENGTH: 128", "EVAL_SPLIT_RATIO: 0.25", "EVAL_EVERY: 3"]) + "\n")
    assert main(["train", "--config", str(config), "--run-dir", str(root / "reference")]) == 0
    return config, root / "reference"


def kill_run(config: Path, run_dir: Path, point: str, step: int) -> subprocess.CompletedProcess:
    tests = Path(__file__).parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tests.parent / "src"), str(tests)])}
    return subprocess.run([sys.executable, str(tests / "kill_points.py"), point, str(step),
                           "train", "--config", str(config), "--run-dir", str(run_dir)],
                          capture_output=True, text=True, env=env, timeout=300)


def logged(run_dir: Path, name: str) -> list[dict]:
    """The lines of a run log without the wall-clock ``seconds``."""
    return [{k: v for k, v in r.items() if k != "seconds"} for r in files.read_jsonl(run_dir / name)]


@pytest.mark.parametrize("point, step, resume_from, leftover", KILL_POINTS,
                         ids=[p[0] for p in KILL_POINTS])
def test_killed_run_resumes_to_the_uninterrupted_result(setup, tmp_path, capsys, point, step,
                                                        resume_from, leftover):
    config, reference = setup
    run_dir = tmp_path / "run"
    killed = kill_run(config, run_dir, point, step)
    assert killed.returncode == -9, killed.stderr  # SIGKILL, not a clean exit
    capsys.readouterr()

    # What the kill left: the newest complete checkpoint listed is the one to resume from.
    assert latest_checkpoint(run_dir)["step"] == resume_from
    checkpoints = run_dir / "checkpoints"
    if point == "during_save":
        staging = [p for p in checkpoints.iterdir() if p.name.startswith(".step_000004.")]
        assert len(staging) == 1 and not (checkpoints / "step_000004").exists()
        torn = staging[0] / "optimizer.safetensors"
        assert torn.is_file() and not (staging[0] / "tinkerkit_state.json").exists()
    if point == "after_save_before_listing":
        assert (checkpoints / "step_000004" / "tinkerkit_state.json").is_file()
    if point == "during_metrics_append":
        assert not (run_dir / "metrics.jsonl").read_text().endswith("\n")

    assert main(["train", "--resume", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert f"from step {resume_from} " in " ".join(out.split())

    # metrics.jsonl: each step exactly once, with the uninterrupted run's values.
    assert [r["step"] for r in logged(run_dir, "metrics.jsonl")] == list(range(1, STEPS + 1))
    assert logged(run_dir, "metrics.jsonl") == logged(reference, "metrics.jsonl")
    assert [r["step"] for r in logged(run_dir, "checkpoints.jsonl")] == [2, 4, 6]
    # The final adapter (and optimizer state) equal the uninterrupted run's, byte for byte.
    for name in ("adapter_model.safetensors", "optimizer.safetensors"):
        final = (checkpoints / "step_000006" / name).read_bytes()
        assert final == (reference / "checkpoints" / "step_000006" / name).read_bytes(), name
    assert "eval_loss" in logged(run_dir, "metrics.jsonl")[2]  # step 3 was evaluated once
