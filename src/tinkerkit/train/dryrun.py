"""``tinkerkit train --dry-run``: the data, the guards and one timed step, with nothing trained.

(The module is ``dryrun`` so that ``tinkerkit.train.dry_run`` stays the function.)
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from rich.console import Console

from tinkerkit import engines
from tinkerkit.config import TrainConfig
from tinkerkit.engines.tinker import lora_options
from tinkerkit.errors import plural
from tinkerkit.train.examples import load_examples, normalize_batch
from tinkerkit.train.held_out import load_held_out
from tinkerkit.train.run_dir import default_run_dir
from tinkerkit.train.schedule import batch_indices, plan_steps


@dataclass(frozen=True)
class DryRunReport:
    """What ``tinkerkit train --dry-run`` measured.

    Attributes:
        examples: Training examples after rendering.
        steps: Optimizer steps a run would take.
        seconds_per_step: Wall seconds of one ``forward_backward`` on the first batch (no
            optimizer step; the first call also pays one-time warm-up costs); None with
            ``BACKEND=tinker``, where nothing runs on the server.
        first_loss: That batch's loss (mean NLL per weighted token) at the start weights; None
            with ``BACKEND=tinker``.
    """

    examples: int
    steps: int
    seconds_per_step: float | None
    first_loss: float | None


def dry_run(config: TrainConfig, console: Console | None = None) -> DryRunReport:
    """Render the whole dataset, print the statistics, the steps and a time per step; no training.

    The seed's "test small first": the data and length guards run as in
    :func:`~tinkerkit.train.train`, the model loads, and one ``forward_backward`` on the first
    batch of ``BATCH_SIZE`` examples is timed and discarded (no ``optim_step``, no checkpoint,
    nothing written).

    With ``BACKEND=tinker`` no service client is created and no session opened (on the hosted
    service a session is billed): the data, the length guards and the LoRA settings are checked
    as a run checks them, and nothing is timed.

    Raises:
        ConfigError, DataError, ModelError: As :func:`~tinkerkit.train.train` before its first
            step.
    """
    console = console or Console()
    tokenizer = engines.load_engine_tokenizer(config)
    load_held_out(config, tokenizer, console)  # checks GRADER first, as a run does
    examples = load_examples(config, tokenizer, console)
    per_epoch, total_steps = plan_steps(len(examples), config)
    planned = (f"Dry run: {plural(len(examples), 'example')}, {plural(total_steps, 'step')} "
               f"({per_epoch} per epoch, batch {config.batch_size})")
    if config.backend == "tinker":
        lora_options(config)  # the LoRA settings Tinker lacks are refused here, as in a run
        console.print(f"{planned}; BACKEND=tinker: no session was opened on the Tinker server "
                      "(a session on the hosted service is billed), so no step was timed. "
                      "Nothing was trained or written.")
        return DryRunReport(len(examples), total_steps, None, None)
    client = engines.create_training_client(config, default_run_dir() / "checkpoints")  # never written
    _, indices = batch_indices(0, len(examples), config.batch_size, config.seed)
    datums, _, tokens = normalize_batch([examples[i] for i in indices])
    started = time.perf_counter()
    loss = float(client.forward_backward(datums, "cross_entropy").result().metrics["loss:sum"])
    seconds = time.perf_counter() - started
    console.print(f"{planned}; one forward_backward on the first batch "
                  f"({tokens} tokens) took {seconds:.2f} s, so about {seconds * total_steps:.0f} s "
                  f"for the run; its loss {loss:.4f}. Nothing was trained or written.")
    return DryRunReport(len(examples), total_steps, seconds, loss)
