"""Run ``tinkerkit`` and SIGKILL it at one chosen point: ``python kill_points.py POINT STEP ARGS...``.

Test-only fault injection for ``test_crash_resume.py``. The hook wraps one function of tinkerkit
(or of safetensors) in this child process only and sends SIGKILL to the process when the chosen
point is reached at optimizer step ``STEP``; the wrapped functions are otherwise unchanged, and
nothing in ``src/`` reads a flag for it. Points:

* ``between_steps``: right after step STEP's line is appended to ``metrics.jsonl`` (the next
  step is already queued in the engine, as the loop pipelines).
* ``during_save``: inside the checkpoint of step STEP, after its ``adapter_model.safetensors``
  is written and while ``optimizer.safetensors`` is half written (a torn file in the staging
  directory).
* ``after_save_before_listing``: the checkpoint directory of step STEP is complete and renamed
  into place, but its line is not yet in ``checkpoints.jsonl``.
* ``during_eval``: in the held-out ``forward`` after step STEP, after its first chunk.
* ``during_metrics_append``: half of step STEP's line is in ``metrics.jsonl`` (a torn append).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def install(point: str, step: int) -> None:
    import safetensors.torch

    from tinkerkit import files
    from tinkerkit.engines.local import LocalTrainingClient, training
    from tinkerkit.train.metrics import StepLog

    if point == "between_steps":
        write = StepLog.write

        def write_then_die(self, record):
            write(self, record)
            if record.step == step:
                die()

        StepLog.write = write_then_die
    elif point == "during_save":
        save_file = safetensors.torch.save_file

        def save_then_die(tensors, filename, *args, **kwargs):
            save_file(tensors, filename, *args, **kwargs)
            if Path(filename).name == "optimizer.safetensors" \
                    and f".step_{step:06d}." in Path(filename).parent.name:
                data = Path(filename).read_bytes()
                Path(filename).write_bytes(data[: len(data) // 2])
                die()

        safetensors.torch.save_file = save_then_die
        training.save_file = save_then_die  # the engine's own reference, bound at import
    elif point in ("after_save_before_listing", "during_metrics_append"):
        append = files.append_jsonl
        target = "checkpoints.jsonl" if point == "after_save_before_listing" else "metrics.jsonl"

        def append_or_die(path, obj):
            if Path(path).name == target and obj.get("step") == step:
                if target == "metrics.jsonl":
                    line = json.dumps(obj)
                    with open(path, "a", encoding="utf-8") as f:
                        f.write(line[: len(line) // 2])
                die()
            append(path, obj)

        files.append_jsonl = append_or_die
    elif point == "during_eval":
        run = LocalTrainingClient._run
        held_out_calls = []

        def run_or_die(self, examples, loss, config, backward):
            if not backward:
                held_out_calls.append(self._step)
                if held_out_calls.count(step) == 2:  # the second chunk, after the first one ran
                    die()
            return run(self, examples, loss, config, backward)

        LocalTrainingClient._run = run_or_die
    else:
        raise SystemExit(f"unknown kill point {point!r}")


if __name__ == "__main__":
    from tinkerkit.cli import main

    install(sys.argv[1], int(sys.argv[2]))
    sys.exit(main(sys.argv[3:]))
