"""Training throughput: tinkerkit's local engine vs TRL's ``SFTTrainer``, alternating, same data.

Two modes: ``--mode rounds`` (the default; issue 7) keeps one worker process per engine and
alternates them in rounds of steps; ``--mode users`` (issue 19) runs ``tinkerkit train`` and
``SFTTrainer.train()`` as users do, a fresh process per run. ``--busy K`` adds, in either mode,
segments with K competing busy processes. The settings below are shared by all of them.

Both engines train a LoRA adapter (rank 16, alpha 32, no dropout, on all linear layers of the
decoder: q/k/v/o and gate/up/down projections) on ``smollm2-135m-instruct`` in float32 on the CPU,
on the same examples in the same order: the first ``--examples`` (200) GSM8K training records,
rendered once by :class:`tinkerkit.render.Renderer` with the model's chat template (maximum
length 512, loss on the assistant answer only), in batches of 4 in file order (no shuffling),
with the same optimizer (AdamW, learning rate 1e-4 constant, betas 0.9/0.999, eps 1e-8, no weight
decay, gradient norm clipped to 1.0) and the same LoRA initialization (seed 42).

Mode ``rounds`` (the default):

* **ours**: the path ``tinkerkit train`` takes — a ``TrainConfig``, ``load_examples`` (the
  renderer), ``create_training_client`` (:class:`~tinkerkit.engines.local.LocalTrainingClient`),
  ``normalize_batch`` and pipelined ``forward_backward`` + ``optim_step`` calls (the next step is
  submitted before the previous one is awaited). Only the data order differs from ``tinkerkit
  train`` (file order here, a seeded permutation there).
* **TRL**: ``trl.SFTTrainer`` with a ``peft.LoraConfig`` and ``completion_only_loss=True``, given
  the same rendered token ids with a ``completion_mask`` (1 on the tokens ours weights), so both
  see identical batches; ``train_sampling_strategy="sequential"``. TRL defaults changed, each
  to make the comparison like for like: ``bf16=False`` (ours runs float32), ``gradient_checkpointing
  =False`` (ours does not recompute activations at these lengths; TRL's default would make it
  slower and smaller), the optimizer settings above, ``logging_steps=1`` (for the loss curve),
  no saving, no reporting. Everything else (padding collator, fused AdamW, its per-step entropy
  and accuracy metrics) is TRL's default behaviour.

Alternation. Each engine lives in its own worker subprocess for the whole run and keeps its
state (weights, optimizer, data position) across rounds; the parent tells one worker at a time
to run the next ``ceil(steps / rounds)`` optimizer steps (ours, TRL, ours, TRL, ...), while the
other waits on a pipe without using the CPU. Persistent workers, rather than a fresh subprocess
per round, keep each training run one continuous run (TRL's ``Trainer.train`` cannot be paused
and resumed across processes without its checkpoint machinery, which would itself be timed or
change the run), pay model loading once, and still give each engine its own process, so the
peak resident memory (``ru_maxrss``) of each is its own. Alternating in rounds spreads the load
of a shared machine over both engines; the load average is printed per round.

Figures:

* real tokens/s: the tokens of the rendered sequences (no padding) of the steps of a round,
  divided by the round's wall time (from the go signal to the last step's loss). The same count
  for both engines, so the ratio is the ratio of wall times.
* peak memory: ``ru_maxrss`` of each worker (model loading included), and its RSS before the
  first step.
* faults/step (per round): minor page faults of each worker per optimizer step (``ru_minflt``),
  i.e. pages the kernel had to map and zero: in the first steps memory the process touches for
  the first time, after that mostly memory it handed back after an earlier step and allocates
  again. Not a goal; it shows how much of an engine's time depends on the machine's page-fault
  cost, which varies on a shared virtual machine.
* achieved FLOP/s: model FLOPs per sequence of ``L`` tokens, for LoRA training with a frozen
  base model, ``4 * N * L + 6 * N_lora * L + 12 * n_layer * n_head * d_head * L**2``: the forward
  pass costs 2 FLOPs per weight per token and the backward pass twice that (Kaplan et al. 2020,
  "Scaling Laws for Neural Language Models", Table 1 and section 2.1), of which the frozen base
  needs only the half that propagates gradients to the activations (no weight gradients), so
  ``2N + 2N``; the LoRA weights ``N_lora`` need all ``6 N_lora``; attention (no weights) costs
  ``12 * n_layer * n_head * d_head * L`` per token, forward and backward, counting the full
  ``L x L`` score matrices as in PaLM's model-FLOPs utilization (Chowdhery et al. 2022, appendix
  B, "6N + 12LHQT"). ``N`` counts the base model's parameters once (SmolLM2's tied embedding is
  counted as the output projection it also is). Divided by the machine's measured peak: the best
  time of a float32 ``torch.mm`` of two 2,048 x 2,048 matrices (``2 * 2048**3`` FLOPs) over
  several repetitions, in the parent process with the workers' thread count, before and after the
  run (the larger is kept).

Goals (issue 7): ours >= 2.0x TRL's real tokens/s at equal or lower peak memory; the same losses
within noise; >= 40% of the measured peak matrix-multiply FLOP/s.

Mode ``users`` (``--mode users``): each engine as a user runs it, each run a fresh process,
``--runs`` (3) runs per engine in turn (ours, TRL, ours, TRL, ...), on the first ``--examples``
(80 here: 20 steps of 4) records.

* **ours**: ``python -m tinkerkit.cli train --config config.yaml --run-dir DIR`` (the
  ``tinkerkit train`` command) with a generated config: the settings above, one epoch in
  ``tinkerkit train``'s own seeded order, ``MIXED_PRECISION = "no"`` (``--precision bf16``:
  ``"bf16"``), and nothing but training: no held-out loss or sampled evaluation, no checkpoint
  before the final one, no export, no trackers. Figures from the run's ``metrics.jsonl``: a
  step's ``seconds`` is the wall time from the previous step's completion (its optimizer step
  awaited) to this one's; the first step's from the start of the loop, i.e. after the model is
  loaded, the data rendered and the engine's client built. Its ``total_tokens`` counts the input
  positions T of the batch's datums (``normalize_batch``: one fewer per sequence than the rounds
  mode's count, which adds the final target token).
* **TRL**: a fresh process (``--worker TRL-users``) reads the same config file, renders the same
  examples, lays them out in the batches ``tinkerkit.train.batch_indices`` gives each step (the
  function the loop itself calls) and trains them in that order (sequential sampler) with
  ``SFTTrainer.train()`` and the TRL settings of the rounds mode. A step's seconds: from the
  previous step's ``on_step_end`` callback (the first step's: from the call of ``train()``) to its
  own ``on_step_end`` (after the optimizer step; the previous step's logging falls in it, as
  ours' logging does). Model loading and dataset preparation (the ``SFTTrainer`` constructor) are
  left out, as they are for ours. Tokens: ``normalize_batch``'s count of the same batches, which
  must equal ours' ``total_tokens`` step by step (the benchmark stops if they differ), so every
  ratio is a ratio of wall times.

Figures, per run and over all runs of an engine: **cold** tokens/s (all steps' tokens / all
steps' seconds), **steady-state** tokens/s (the same over the steps after the first
``--warmup-steps``, 5, of each run), the first step's seconds against the mean steady-state step
(the cold overhead), the process's peak resident memory (``ru_maxrss`` from ``wait4``, model
loading included), and the load average before and after each run; the ratios ours/TRL; the
loss per step of ours against TRL (run 1) and the largest difference over all runs.
``--threads N`` sets ``OMP_NUM_THREADS`` of both processes (the setting a user has).

The same loss: ours logs the step's ``loss:sum`` with weights 1 / (the batch's weighted tokens),
the mean NLL per weighted token of the batch. TRL 1.16 with ``completion_only_loss`` divides the
summed NLL of the completion tokens by ``num_items_in_batch``, the batch's count of unmasked
target tokens (``SFTTrainer.compute_loss``; transformers 5.24 ``Trainer._get_num_items_in_batch``),
and with ``logging_steps=1`` and no gradient accumulation logs that step's value unrounded: the
same quantity on the same tokens.

Goals (issue 19): ours >= 2.0x TRL's cold tokens/s and >= 2.5x its steady-state tokens/s; losses
within 1e-5 at every step.

Busy machine (``--busy K``, either mode): each engine is measured idle and while K competing busy
processes run, interleaved in one run. Each busy process is a separate ``python -c "while True:
pass"``, started just before that engine's segment and killed just after it. Rounds mode: each
round becomes ours idle, TRL idle, ours busy, TRL busy (``ceil(steps / (2 * rounds))`` steps a
segment; the summary's tokens/s, FLOP/s and ratio are the idle segments', the loss curve all
steps). Users mode: each run becomes ours idle, TRL idle, ours busy, TRL busy (a whole run each;
the busy processes also run through its model loading). Reported per engine: idle and busy
tokens/s and busy/idle (users mode: cold and steady). Goal (issue 19): with one busy process
(``--busy 1``) ours keeps >= 45% of its idle tokens/s.

Reading the ratio: it depends on what page faults cost on the machine at the time, because
TRL's speed does (it allocates and frees its padded logits every step) and the local engine's
hardly does; the faults/step figures show it. Results, what each change to the local engine
bought and what was tried and left out: ``docs/PERFORMANCE.md``.

Needs TRL (``pip install -e '.[bench]'``, which pins ``trl==1.16.0``; it changes no pinned
dependency). The machine may be shared: run it when it is quiet, and compare only the ratio
measured in one run.

Example::

    .venv/bin/python benchmarks/train_throughput.py                        # 200 examples, 10 rounds
    .venv/bin/python benchmarks/train_throughput.py --examples 16 --rounds 2   # a quick check
    .venv/bin/python benchmarks/train_throughput.py --precision bf16       # both under bf16 autocast
    .venv/bin/python benchmarks/train_throughput.py --mode users           # 80 examples, 3 runs each
    .venv/bin/python benchmarks/train_throughput.py --mode users --busy 1  # idle and 1 busy process
    .venv/bin/python benchmarks/train_throughput.py --busy 1 --rounds 5    # rounds, idle and busy
    .venv/bin/python benchmarks/train_throughput.py --mode users --examples 8 --runs 1 \
        --warmup-steps 1                                                   # a quick check
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DATA = Path(os.environ.get("TINKERKIT_SHARED_DATA",
                           Path(__file__).resolve().parents[2] / "shared" / "data"))
MODEL = "smollm2-135m-instruct"
RANK, ALPHA, MAX_LENGTH, BATCH_SIZE, SEED = 16, 32, 512, 4, 42
LEARNING_RATE, BETA1, BETA2, EPS, CLIP = 1e-4, 0.9, 0.999, 1e-8, 1.0
PEAK_MATMUL_SIZE = 2048
ENGINES = ("ours", "TRL")
SPINNER = "while True: pass"  # one busy process: a core's worth of pure-Python load


# ------------------------------------------------------------------------------ worker side


class Channel:
    """JSON lines with the parent: commands on stdin, replies on a private copy of stdout.

    Whatever the libraries print goes to stderr: fd 1 is pointed there once the private copy
    is taken, so TRL's log lines cannot corrupt the replies.
    """

    def __init__(self) -> None:
        self.replies = os.fdopen(os.dup(1), "w")
        os.dup2(2, 1)
        sys.stdout = sys.stderr

    def receive(self) -> dict:
        line = sys.stdin.readline()
        if not line:
            raise SystemExit("the parent closed the pipe")
        return json.loads(line)

    def send(self, **message) -> None:
        self.replies.write(json.dumps(message) + "\n")
        self.replies.flush()


def current_rss_gib() -> float:
    """Resident memory of this process now (``/proc/self/statm``), GiB."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**30


def minor_faults() -> int:
    """Minor page faults of this process so far (``ru_minflt``): pages the kernel had to map."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def peak_rss_gib() -> float:
    """Peak resident memory of this process (``ru_maxrss``, KiB on Linux), GiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def bench_settings(data_file: Path, model: str, precision: str = "float32") -> dict:
    """The shared settings as lower-case ``TrainConfig`` fields (TRL's settings mirror them).

    ``precision``: ``"float32"``, or ``"bf16"`` for bf16 autocast over float32 weights.
    """
    return {
        "data_files": [str(data_file)], "base_model": model, "lora_rank": RANK,
        "lora_alpha": ALPHA, "lora_dropout": 0.0, "lora_targets": "all-linear",
        "max_sequence_length": MAX_LENGTH, "batch_size": BATCH_SIZE, "device": "cpu",
        "dtype": "float32", "learning_rate": LEARNING_RATE, "lr_schedule": "constant",
        "adam_beta1": BETA1, "adam_beta2": BETA2, "adam_eps": EPS, "weight_decay": 0.0,
        "grad_clip_norm": CLIP, "seed": SEED,
        "mixed_precision": "bf16" if precision == "bf16" else "no"}


def bench_config(data_file: Path, model: str, precision: str = "float32"):
    """The shared settings as a ``TrainConfig`` (ours reads it; TRL's settings mirror it)."""
    from tinkerkit.config import build_config

    return build_config(bench_settings(data_file, model, precision))


def write_users_config(path: Path, data_file: Path, model: str, precision: str) -> None:
    """Write the users'-path run's config file (YAML, the keys ``tinkerkit train --config``
    reads): the shared settings, one epoch, and nothing besides training — no held-out loss
    or sampled evaluation, no checkpoint before the final one, no export, no trackers."""
    import yaml

    from tinkerkit.files import atomic_write_text

    settings = {**bench_settings(data_file, model, precision), "num_epochs": 1,
                "max_steps": None, "eval_every": 0, "sample_eval_every": 0, "save_every": 0,
                "export_after_training": False, "report_to": []}
    atomic_write_text(path, yaml.safe_dump({k.upper(): v for k, v in settings.items()},
                                           sort_keys=False))


def render_config(config):
    """The tokenizer and rendered examples of ``config``, as ``tinkerkit train`` makes them
    (the engine's tokenizer, :func:`tinkerkit.train.load_examples`)."""
    from rich.console import Console

    from tinkerkit.engines import load_engine_tokenizer
    from tinkerkit.train import load_examples

    tokenizer = load_engine_tokenizer(config)
    return tokenizer, load_examples(config, tokenizer, Console(stderr=True, quiet=True))


def rendered_examples(data_file: Path, model: str, precision: str = "float32"):
    """The config, tokenizer and rendered examples, exactly as ``tinkerkit train`` renders."""
    config = bench_config(data_file, model, precision)
    return config, *render_config(config)


def sequence_tokens(example) -> int:
    """Tokens of a rendered sequence: the model input plus the final target token."""
    return example.n_tokens + 1


def model_shape(model) -> dict:
    """Parameter counts and attention shape for the FLOP estimate (of a ``PeftModel``)."""
    from tinkerkit.engines.local.model import causal_lm

    config = causal_lm(model).config
    params = {id(p): p for p in model.parameters()}.values()  # tied weights once
    return {"base_params": sum(p.numel() for p in params if not p.requires_grad),
            "lora_params": sum(p.numel() for p in params if p.requires_grad),
            "layers": config.num_hidden_layers, "heads": config.num_attention_heads,
            "head_dim": getattr(config, "head_dim", None)
            or config.hidden_size // config.num_attention_heads}


def run_ours(args: argparse.Namespace, channel: Channel) -> None:
    """Worker: the local engine, stepping when told."""
    from tinkerkit.engines import create_training_client
    from tinkerkit.train import adam_params, normalize_batch

    config, _, examples = rendered_examples(args.data_file, args.model, args.precision)
    with tempfile.TemporaryDirectory() as scratch:
        client = create_training_client(config, Path(scratch) / "checkpoints")
        channel.send(ready=True, rss_gib=current_rss_gib(), shape=model_shape(client.model))
        step, batches = 0, math.ceil(len(examples) / BATCH_SIZE)
        while (command := channel.receive()).get("steps"):
            started, losses, lengths, pending = time.perf_counter(), [], [], None
            faults = minor_faults()
            for _ in range(min(command["steps"], batches - step)):
                batch = examples[step * BATCH_SIZE:(step + 1) * BATCH_SIZE]
                datums, _, _ = normalize_batch(batch)
                lengths += [sequence_tokens(e) for e in batch]
                submitted = (client.forward_backward(datums, "cross_entropy"),
                             client.optim_step(adam_params(config, config.learning_rate)))
                if pending is not None:
                    losses.append(pending[0].result().metrics["loss:sum"])
                    pending[1].result()
                pending, step = submitted, step + 1
            if pending is not None:
                losses.append(pending[0].result().metrics["loss:sum"])
                pending[1].result()
            channel.send(seconds=time.perf_counter() - started, lengths=lengths, losses=losses,
                         faults=minor_faults() - faults)
        client.close()
    channel.send(peak_rss_gib=peak_rss_gib())


def trl_rows(examples) -> dict[str, list[list[int]]]:
    """TRL's dataset columns of rendered examples, in their order: ``input_ids`` (the model
    input plus the final target token, T + 1 ids) and ``completion_mask`` (1 where ours puts
    a non-zero weight on the token as a target, 0 on the first token, which is never one)."""
    rows = {"input_ids": [], "completion_mask": []}
    for example in examples:
        inputs = example.datum.loss_fn_inputs
        targets = inputs["target_tokens"].to_numpy().tolist()
        weights = inputs["weights"].to_numpy().tolist()
        rows["input_ids"].append(example.datum.model_input.to_ints() + targets[-1:])
        rows["completion_mask"].append([0] + [int(w > 0) for w in weights])
    return rows


def trl_trainer(rows: dict, tokenizer, model: str, precision: str, steps: int, output_dir: str,
                callbacks: list):
    """TRL's ``SFTTrainer`` over ``rows`` in their order with the shared settings (see above);
    constructing it loads the model and prepares the dataset."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from tinkerkit.engines.local.model import ATTENTION_MODULES, MLP_MODULES
    from tinkerkit.models import resolve_model

    trl_args = SFTConfig(
        output_dir=output_dir, per_device_train_batch_size=BATCH_SIZE,
        gradient_accumulation_steps=1, max_length=MAX_LENGTH, completion_only_loss=True,
        train_sampling_strategy="sequential", num_train_epochs=1, max_steps=steps,
        learning_rate=LEARNING_RATE, lr_scheduler_type="constant", warmup_steps=0,
        adam_beta1=BETA1, adam_beta2=BETA2, adam_epsilon=EPS, weight_decay=0.0,
        max_grad_norm=CLIP, seed=SEED, data_seed=SEED, bf16=precision == "bf16",
        fp16=False,
        gradient_checkpointing=False, use_cpu=True, logging_steps=1, save_strategy="no",
        report_to="none", disable_tqdm=True, dataloader_num_workers=0,
        model_init_kwargs={"dtype": torch.float32})
    lora = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, bias="none",
                      target_modules=list(ATTENTION_MODULES + MLP_MODULES),
                      task_type="CAUSAL_LM")
    return SFTTrainer(model=str(resolve_model(model)), args=trl_args,
                      train_dataset=Dataset.from_dict(rows), processing_class=tokenizer,
                      peft_config=lora, callbacks=callbacks)


def run_trl(args: argparse.Namespace, channel: Channel) -> None:
    """Worker: TRL's SFTTrainer on the same rendered examples, pausing between rounds."""
    from transformers import TrainerCallback

    _, tokenizer, examples = rendered_examples(args.data_file, args.model)
    rows = trl_rows(examples)
    steps = math.ceil(len(examples) / BATCH_SIZE)

    class Rounds(TrainerCallback):
        """Runs ``steps`` optimizer steps per go signal; times them up to the last step's log."""

        def __init__(self) -> None:
            self.left, self.started, self.losses, self.lengths, self.step = 0, 0.0, [], [], 0
            self.faults = 0

        def wait(self) -> None:
            command = channel.receive()
            if not command.get("steps"):
                raise SystemExit("stopped before the end of the data")
            self.left, self.losses, self.lengths = command["steps"], [], []
            self.started, self.faults = time.perf_counter(), minor_faults()

        def on_train_begin(self, args, state, control, **kwargs):
            channel.send(ready=True, rss_gib=current_rss_gib(),
                         shape=model_shape(kwargs["model"]))
            self.wait()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "loss" not in logs:
                return
            self.losses.append(logs["loss"])
            self.lengths += [len(ids) for ids in rows["input_ids"][
                self.step * BATCH_SIZE:(self.step + 1) * BATCH_SIZE]]
            self.step, self.left = self.step + 1, self.left - 1
            if self.left == 0 or self.step == steps:
                channel.send(seconds=time.perf_counter() - self.started,
                             lengths=self.lengths, losses=self.losses,
                             faults=minor_faults() - self.faults)
                if self.step < steps:
                    self.wait()

    with tempfile.TemporaryDirectory() as scratch:
        trainer = trl_trainer(rows, tokenizer, args.model, args.precision, steps, scratch,
                              [Rounds()])
        trainer.train()
        channel.receive()  # the parent's stop
    channel.send(peak_rss_gib=peak_rss_gib())


def run_trl_users(args: argparse.Namespace) -> None:
    """Worker of ``--mode users``: one ``SFTTrainer.train()`` on the rows ``tinkerkit train``
    trains with the config file ``args.config``, in its order; writes ``args.result``.

    The rows: the config's examples rendered as ``tinkerkit train`` renders them, in the batches
    of :func:`tinkerkit.train.batch_indices` for each of the run's steps (:func:`plan_steps`),
    laid end to end for TRL's sequential sampler, so TRL's step ``i`` is ours' step ``i``. The
    result (JSON): per step the wall ``seconds`` (the first from the call of ``train()``, each
    next one from the previous ``on_step_end``), ``tokens`` (:func:`normalize_batch`'s count,
    ours' ``total_tokens``) and ``losses`` (TRL's logged ``loss``); ``peak_rss_gib``.
    """
    from transformers import TrainerCallback

    from tinkerkit.config import load_config
    from tinkerkit.files import atomic_write_json
    from tinkerkit.train import batch_indices, normalize_batch, plan_steps

    config = load_config(args.config)
    tokenizer, examples = render_config(config)
    _, steps = plan_steps(len(examples), config)
    batches = [[examples[i] for i in batch_indices(step, len(examples), config.batch_size,
                                                   config.seed)[1]] for step in range(steps)]

    class StepTimes(TrainerCallback):
        """Wall-clock time at the end of each optimizer step, and each logged loss."""

        def __init__(self) -> None:
            self.ends, self.losses = [], []

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(logs["loss"])

    times = StepTimes()
    with tempfile.TemporaryDirectory() as scratch:
        trainer = trl_trainer(trl_rows([e for batch in batches for e in batch]), tokenizer,
                              config.base_model, config.mixed_precision, steps, scratch, [times])
        started = time.perf_counter()
        trainer.train()
    marks = [started, *times.ends]
    atomic_write_json(args.result, {
        "seconds": [b - a for a, b in zip(marks, marks[1:])],
        "tokens": [normalize_batch(batch)[2] for batch in batches], "losses": times.losses,
        "peak_rss_gib": peak_rss_gib()})


def worker(args: argparse.Namespace) -> None:
    if args.worker == "TRL-users":  # threads: OMP_NUM_THREADS, as for `tinkerkit train`
        return run_trl_users(args)
    import torch

    channel = Channel()
    if args.threads:
        torch.set_num_threads(args.threads)
    {"ours": run_ours, "TRL": run_trl}[args.worker](args, channel)


# ------------------------------------------------------------------------------ parent side


def peak_matmul_flops(precision: str = "float32", size: int = PEAK_MATMUL_SIZE,
                      repeats: int = 5) -> float:
    """Best ``torch.mm`` FLOP/s of two ``size x size`` matrices (``2 size^3`` FLOPs) in the
    training's matrix-multiply dtype (float32, or bfloat16 for bf16 autocast)."""
    import torch

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    torch.mm(a, b)  # warm-up (thread pool, MKL)
    best = math.inf
    for _ in range(repeats):
        started = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - started)
    return 2 * size ** 3 / best


def sequence_flops(length: int, shape: dict) -> float:
    """Model FLOPs of one LoRA training pass over a sequence of ``length`` tokens (see above)."""
    attention = 12 * shape["layers"] * shape["heads"] * shape["head_dim"] * length ** 2
    return (4 * shape["base_params"] + 6 * shape["lora_params"]) * length + attention


def load() -> str:
    return "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


class Worker:
    """A worker subprocess and its pipes."""

    def __init__(self, engine: str, args: argparse.Namespace) -> None:
        command = [sys.executable, __file__, "--worker", engine, "--data-file",
                   str(args.data_file), "--model", args.model, "--threads", str(args.threads),
                   "--precision", args.precision]
        self.engine = engine
        self.log = open(args.log_dir / f"{engine}.log", "w")  # noqa: SIM115 (closed in stop)
        env = {**os.environ, "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=self.log, text=True, env=env)

    def ask(self, **command) -> dict:
        if command:
            self.process.stdin.write(json.dumps(command) + "\n")
            self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            self.process.wait()
            self.log.close()
            tail = Path(self.log.name).read_text(errors="replace").splitlines()[-15:]
            raise SystemExit(f"the {self.engine} worker stopped (exit code "
                             f"{self.process.returncode}); the end of its log:\n"
                             + "\n".join(tail))
        return json.loads(line)

    def stop(self) -> dict:
        reply = self.ask(steps=0)
        self.process.wait(timeout=120)
        self.log.close()
        return reply


def check_counts(parser: argparse.ArgumentParser, args: argparse.Namespace,
                 least: dict[str, int]) -> None:
    """Exit through ``parser.error`` when an option in ``least`` (name: smallest value) is
    smaller; unset (None) options are skipped."""
    for name, smallest in least.items():
        value = getattr(args, name)
        if value is not None and value < smallest:
            parser.error(f"--{name.replace('_', '-')} {value}: must be at least {smallest}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["rounds", "users"], default="rounds",
                        help="rounds: persistent workers alternating in rounds; users: "
                             "`tinkerkit train` and SFTTrainer.train(), a fresh process per run")
    parser.add_argument("--examples", type=int, default=None,
                        help="first N GSM8K training records (default 200 in rounds mode, "
                             "80 in users mode)")
    parser.add_argument("--rounds", type=int, default=10,
                        help="rounds mode: alternations per engine")
    parser.add_argument("--runs", type=int, default=3,
                        help="users mode: runs per engine (ours, TRL, ours, TRL, ...)")
    parser.add_argument("--warmup-steps", type=int, default=5,
                        help="users mode: first steps left out of the steady state")
    parser.add_argument("--busy", type=int, default=0,
                        help="also measure each engine with this many busy processes "
                             "(idle and busy segments interleaved); 0: idle only")
    parser.add_argument("--data", type=Path, default=DATA / "gsm8k" / "train.jsonl")
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads (0: default; users mode: OMP_NUM_THREADS of both)")
    parser.add_argument("--precision", choices=["float32", "bf16"], default="float32",
                        help="bf16: both engines under bf16 autocast (TRL's bf16=True; "
                             "MIXED_PRECISION=bf16), FLOP/s against the bfloat16 matmul peak")
    parser.add_argument("--worker", choices=[*ENGINES, "TRL-users"], help=argparse.SUPPRESS)
    parser.add_argument("--data-file", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--config", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    check_counts(parser, args, {"rounds": 1, "runs": 1, "examples": 1, "busy": 0,
                                "warmup_steps": 0, "threads": 0})
    if args.examples is None:
        args.examples = 80 if args.mode == "users" else 200
    steps = math.ceil(args.examples / BATCH_SIZE)
    if args.mode == "users" and args.warmup_steps >= steps:
        parser.error(f"--warmup-steps {args.warmup_steps} leaves no steady-state step of the "
                     f"{steps} steps of --examples {args.examples}")

    import importlib.util

    if importlib.util.find_spec("trl") is None:
        raise SystemExit("TRL is not installed; install the benchmark extra: "
                         "pip install -e '.[bench]' (trl==1.16.0)")
    if not args.data.is_file():
        raise SystemExit(f"{args.data}: no such file (set --data or TINKERKIT_SHARED_DATA)")
    (run_users if args.mode == "users" else run_rounds)(args)


@contextlib.contextmanager
def busy_processes(count: int):
    """``count`` competing busy processes for the duration of the ``with`` block.

    Each is a separate Python process spinning in ``while True: pass`` (one core's worth of
    load, no memory traffic), started on entry and killed (by its own process id) on exit.
    Yields the processes (``subprocess.Popen``).
    """
    spinners = [subprocess.Popen([sys.executable, "-c", SPINNER]) for _ in range(count)]
    try:
        yield spinners
    finally:
        for spinner in spinners:
            spinner.kill()
        for spinner in spinners:
            spinner.wait()


def conditions(busy: int) -> tuple[str, ...]:
    """The segments of an alternation: ``idle``, and ``busy`` when there are busy processes."""
    return ("idle", "busy") if busy else ("idle",)


def run_rounds(args: argparse.Namespace) -> None:
    """``--mode rounds``: persistent workers, alternating in rounds (see the module docstring)."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"load average at start: {load()}; torch threads {torch.get_num_threads()}; "
          f"{os.cpu_count()} CPUs")
    peak = peak_matmul_flops(args.precision)
    segments_per_round = len(conditions(args.busy))
    with tempfile.TemporaryDirectory() as scratch:
        args.log_dir = Path(scratch)
        lines = args.data.read_text(encoding="utf-8").splitlines(keepends=True)[:args.examples]
        args.data_file = Path(scratch) / "train.jsonl"
        args.data_file.write_text("".join(lines), encoding="utf-8")
        workers = {engine: Worker(engine, args) for engine in ENGINES}
        ready = {engine: w.ask() for engine, w in workers.items()}
        steps = math.ceil(len(lines) / BATCH_SIZE)
        per_round = math.ceil(steps / (args.rounds * segments_per_round))
        results = {engine: {"seconds": 0.0, "tokens": 0, "flops": 0.0, "losses": []}
                   for engine in ENGINES}
        busy = {engine: {"seconds": 0.0, "tokens": 0} for engine in ENGINES}
        if args.busy:
            print(f"{len(lines)} examples, {steps} steps of {BATCH_SIZE}, {per_round} steps per "
                  f"segment; each round: ours idle, TRL idle, ours and TRL each with "
                  f"{args.busy} busy process(es)")
        else:
            print(f"{len(lines)} examples, {steps} steps of {BATCH_SIZE}, {per_round} steps "
                  "per round")
        print(f"{'round':>5} {'engine':>6} {'steps':>5} {'tokens':>7} {'seconds':>8} "
              f"{'tokens/s':>9} {'faults/step':>11}  load average"
              + ("           segment" if args.busy else ""))
        for segment in range(math.ceil(steps / per_round)):
            condition = conditions(args.busy)[segment % segments_per_round]
            for engine, w in workers.items():
                with busy_processes(args.busy if condition == "busy" else 0):
                    reply = w.ask(steps=per_round)
                total = results[engine]
                tokens = sum(reply["lengths"])
                total["losses"] += reply["losses"]
                if condition == "busy":
                    busy[engine]["seconds"] += reply["seconds"]
                    busy[engine]["tokens"] += tokens
                else:
                    total["seconds"] += reply["seconds"]
                    total["tokens"] += tokens
                    total["flops"] += sum(sequence_flops(n, ready[engine]["shape"])
                                          for n in reply["lengths"])
                print(f"{segment // segments_per_round + 1:>5} {engine:>6} "
                      f"{len(reply['losses']):>5} {tokens:>7} {reply['seconds']:>8.1f} "
                      f"{tokens / reply['seconds']:>9.1f} "
                      f"{reply['faults'] / max(len(reply['losses']), 1):>11.0f}  {load()}"
                      + (f"  {condition}" if args.busy else ""), flush=True)
        for engine, w in workers.items():
            results[engine].update(w.stop(), rss_gib=ready[engine]["rss_gib"])
    peak = max(peak, peak_matmul_flops(args.precision))
    report(results, peak, args.precision)
    if args.busy:
        print()
        busy_report({engine: (results[engine]["tokens"] / results[engine]["seconds"],
                              busy[engine]["tokens"] / busy[engine]["seconds"])
                     for engine in ENGINES}, args.busy, "tokens/s")


def busy_report(speeds: dict[str, tuple[float, float]], count: int, what: str) -> None:
    """Print each engine's idle and busy throughput and their ratio, and the goal.

    ``speeds``: per engine (idle, busy) tokens/s; ``count``: the busy processes; ``what``: the
    figure's name in the header.
    """
    print(f"{'engine':>6} {'idle ' + what:>18} {'busy ' + what:>18} {'busy/idle':>9}   "
          f"(with {count} busy process{'es' if count > 1 else ''})")
    for engine, (idle, busy) in speeds.items():
        print(f"{engine:>6} {idle:>18.1f} {busy:>18.1f} {busy / idle:>9.1%}")
    ours_idle, ours_busy = speeds["ours"]
    print(f"goal (issue 19, with one busy process): ours busy >= 45% of ours idle: "
          f"{ours_busy / ours_idle:.1%}" + ("" if count == 1 else f" (measured with {count})"))


def run_process(command: list[str], log: Path, env: dict) -> float:
    """Run ``command`` to its end, its output to ``log``; its peak resident memory, GiB.

    Raises:
        SystemExit: It failed (the message ends with the end of its log).
    """
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out,
                                   stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(process.pid, 0)  # ru_maxrss: KiB, this child alone
        process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        tail = log.read_text(errors="replace").splitlines()[-15:]
        raise SystemExit(f"{' '.join(command[:4])} ... failed (exit code {process.returncode});"
                         " the end of its log:\n" + "\n".join(tail))
    return usage.ru_maxrss / 2**20


def users_run(engine: str, config_file: Path, work: Path, env: dict) -> dict:
    """One fresh-process training run of ``engine`` as a user runs it (see the module
    docstring); per step ``seconds``, ``tokens`` and ``losses``, and ``peak_rss_gib``."""
    from tinkerkit.files import read_json, read_jsonl
    from tinkerkit.train import METRICS_FILE

    if engine == "ours":
        run_dir = work / "run"
        rss = run_process([sys.executable, "-m", "tinkerkit.cli", "train", "--config",
                           str(config_file), "--run-dir", str(run_dir)], work / "log", env)
        steps = [r for r in read_jsonl(run_dir / METRICS_FILE) if "total_tokens" in r]
        return {"seconds": [r["seconds"] for r in steps],
                "tokens": [r["total_tokens"] for r in steps],
                "losses": [r["loss"] for r in steps], "peak_rss_gib": rss}
    result = work / "result.json"
    rss = run_process([sys.executable, __file__, "--worker", "TRL-users", "--config",
                       str(config_file), "--result", str(result)], work / "log", env)
    return {**read_json(result), "peak_rss_gib": rss}


def step_figures(runs: list[dict], warmup: int) -> dict:
    """Throughput of one or more runs of an engine, from their per-step seconds and tokens.

    ``cold``: all steps' tokens / all steps' seconds; ``steady``: the same over the steps after
    the first ``warmup`` of each run (NaN when no step is left); ``first``: the mean first-step
    seconds; ``first_speed``: the first steps' tokens / their seconds; ``step``: the mean seconds
    of a steady-state step; ``overhead``: ``first - step`` (batches differ in length: compare
    ``first_speed`` with ``steady`` too).
    """
    def total(key: str, skip: int = 0) -> float:
        return sum(sum(run[key][skip:]) for run in runs)

    steady_steps = sum(len(run["seconds"][warmup:]) for run in runs)
    steady_seconds = total("seconds", warmup)
    figures = {"cold": total("tokens") / total("seconds"),
               "steady": total("tokens", warmup) / steady_seconds if steady_steps else math.nan,
               "first": sum(run["seconds"][0] for run in runs) / len(runs),
               "first_speed": sum(run["tokens"][0] for run in runs)
               / sum(run["seconds"][0] for run in runs),
               "step": steady_seconds / steady_steps if steady_steps else math.nan,
               "tokens": total("tokens"), "seconds": total("seconds"),
               "peak_rss_gib": max(run["peak_rss_gib"] for run in runs)}
    figures["overhead"] = figures["first"] - figures["step"]
    return figures


def run_users(args: argparse.Namespace) -> None:
    """``--mode users``: fresh ``tinkerkit train`` and ``SFTTrainer.train()`` processes,
    alternating (see the module docstring)."""
    import tinkerkit.train  # noqa: F401 (users_run's imports: torch loads here, not in a segment)

    print(f"load average at start: {load()}; OMP_NUM_THREADS "
          f"{args.threads or os.environ.get('OMP_NUM_THREADS', 'unset')}; {os.cpu_count()} CPUs")
    env = {**os.environ, "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false"}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    segments = conditions(args.busy)
    runs = {(engine, c): [] for c in segments for engine in ENGINES}
    with tempfile.TemporaryDirectory() as scratch:
        lines = args.data.read_text(encoding="utf-8").splitlines(keepends=True)[:args.examples]
        data_file, config_file = Path(scratch) / "train.jsonl", Path(scratch) / "config.yaml"
        data_file.write_text("".join(lines), encoding="utf-8")
        write_users_config(config_file, data_file, args.model, args.precision)
        print(f"{len(lines)} examples, {math.ceil(len(lines) / BATCH_SIZE)} steps of "
              f"{BATCH_SIZE}, {args.precision}, {args.runs} run(s) per engine"
              + (f", each idle and with {args.busy} busy process(es)" if args.busy else "")
              + f"; steady state after {args.warmup_steps} step(s)")
        print(f"{'run':>3} {'engine':>6} {'segment':>7} {'steps':>5} {'tokens':>7} "
              f"{'first s':>7} {'step s':>7} {'cold tok/s':>10} {'steady tok/s':>12} "
              f"{'peak RSS':>8}  load average before -> after")
        for run in range(args.runs):
            for condition in segments:
                for engine in ENGINES:
                    work = Path(scratch) / f"{engine}-{run + 1}-{condition}"
                    work.mkdir()
                    before = load()
                    with busy_processes(args.busy if condition == "busy" else 0):
                        result = users_run(engine, config_file, work, env)
                    runs[(engine, condition)].append(result)
                    f = step_figures([result], args.warmup_steps)
                    print(f"{run + 1:>3} {engine:>6} {condition:>7} {len(result['seconds']):>5} "
                          f"{f['tokens']:>7} {f['first']:>7.2f} {f['step']:>7.2f} "
                          f"{f['cold']:>10.1f} {f['steady']:>12.1f} "
                          f"{f['peak_rss_gib']:>6.2f} G  {before} -> {load()}", flush=True)
                ours, trl = runs[("ours", condition)][-1], runs[("TRL", condition)][-1]
                if ours["tokens"] != trl["tokens"]:
                    raise SystemExit(f"run {run + 1}: the engines trained different batches "
                                     f"(tokens per step: ours {ours['tokens']}, TRL "
                                     f"{trl['tokens']})")
    users_report(runs, args)


def users_report(runs: dict, args: argparse.Namespace) -> None:
    """Print the totals over the runs, the ratios, the busy/idle figures and the loss curves."""
    print(f"\nload average at end: {load()}")
    figures = {key: step_figures(value, args.warmup_steps) for key, value in runs.items()}
    print(f"totals over {args.runs} run(s) per engine")
    print(f"{'engine':>6} {'segment':>7} {'tokens':>7} {'seconds':>8} {'cold tok/s':>10} "
          f"{'steady tok/s':>12} {'first tok/s':>11} {'first step s':>12} {'steady step s':>13} "
          f"{'overhead s':>10}")
    for (engine, condition), f in figures.items():
        print(f"{engine:>6} {condition:>7} {f['tokens']:>7} {f['seconds']:>8.1f} "
              f"{f['cold']:>10.1f} {f['steady']:>12.1f} {f['first_speed']:>11.1f} "
              f"{f['first']:>12.2f} {f['step']:>13.2f} {f['overhead']:>10.2f}")
    for condition in conditions(args.busy):
        ours, trl = figures[("ours", condition)], figures[("TRL", condition)]
        print(f"ratio ours/TRL ({condition}): cold {ours['cold'] / trl['cold']:.2f}x "
              f"(goal >= 2.0), steady state {ours['steady'] / trl['steady']:.2f}x "
              "(goal >= 2.5)")
    if args.busy:
        for what in ("cold", "steady"):
            print()
            busy_report({engine: (figures[(engine, "idle")][what],
                                  figures[(engine, "busy")][what]) for engine in ENGINES},
                        args.busy, f"{what} tok/s")
    print("\nloss per step, run 1 idle (mean NLL per weighted token)")
    ours, trl = runs[("ours", "idle")][0]["losses"], runs[("TRL", "idle")][0]["losses"]
    print(f"{'step':>4} {'ours':>8} {'TRL':>8} {'diff':>9}")
    for i, (a, b) in enumerate(zip(ours, trl)):
        print(f"{i + 1:>4} {a:>8.4f} {b:>8.4f} {a - b:>+9.2e}")
    pairs = [(a, b) for condition in conditions(args.busy)
             for ours_run, trl_run in zip(runs[("ours", condition)], runs[("TRL", condition)])
             for a, b in zip(ours_run["losses"], trl_run["losses"])]
    print(f"max |diff| over all runs' steps: {max(abs(a - b) for a, b in pairs):.2e} "
          + ("(goal <= 1e-5)" if args.precision == "float32"
             else "(the 1e-5 goal is float32's: bf16 autocast differs between the engines)"))


def report(results: dict, peak: float, precision: str = "float32") -> None:
    """Print the summary table, the ratio, FLOP/s and both loss curves."""
    print(f"\nload average at end: {load()}")
    dtype = "bfloat16" if precision == "bf16" else "float32"
    print(f"peak {dtype} matmul ({PEAK_MATMUL_SIZE}x{PEAK_MATMUL_SIZE}, "
          f"{os.cpu_count()} CPUs): {peak / 1e9:.1f} GFLOP/s")
    print(f"{'engine':>6} {'tokens':>7} {'seconds':>8} {'tokens/s':>9} {'peak RSS':>9} "
          f"{'RSS loaded':>10} {'GFLOP/s':>8} {'of peak':>7}")
    speed = {}
    for engine, r in results.items():
        speed[engine] = r["tokens"] / r["seconds"]
        flops = r["flops"] / r["seconds"]
        print(f"{engine:>6} {r['tokens']:>7} {r['seconds']:>8.1f} {speed[engine]:>9.1f} "
              f"{r['peak_rss_gib']:>7.2f} G {r['rss_gib']:>8.2f} G {flops / 1e9:>8.1f} "
              f"{flops / peak:>6.1%}")
    ours, trl = results["ours"], results["TRL"]
    print(f"ratio ours/TRL: {speed['ours'] / speed['TRL']:.2f}x tokens/s (goal >= 2.0), "
          f"peak memory {ours['peak_rss_gib']:.2f} vs {trl['peak_rss_gib']:.2f} GiB "
          f"(goal: ours <= TRL)")
    print("\nloss per step (mean NLL per weighted token)")
    print(f"{'step':>4} {'ours':>8} {'TRL':>8} {'diff':>9}")
    for i, (a, b) in enumerate(zip(ours["losses"], trl["losses"])):
        print(f"{i + 1:>4} {a:>8.4f} {b:>8.4f} {a - b:>+9.2e}")
    diffs = [abs(a - b) for a, b in zip(ours["losses"], trl["losses"])]
    print(f"max |diff| {max(diffs):.2e}; mean loss ours {sum(ours['losses']) / len(diffs):.4f}, "
          f"TRL {sum(trl['losses']) / len(diffs):.4f}")


if __name__ == "__main__":
    main()
