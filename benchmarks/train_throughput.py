"""Training throughput: tinkerkit's local engine vs TRL's ``SFTTrainer``, alternating, same data.

Both engines train a LoRA adapter (rank 16, alpha 32, no dropout, on all linear layers of the
decoder: q/k/v/o and gate/up/down projections) on ``smollm2-135m-instruct`` in float32 on the CPU,
on the same examples in the same order: the first ``--examples`` (200) GSM8K training records,
rendered once by :class:`tinkerkit.render.Renderer` with the model's chat template (maximum
length 512, loss on the assistant answer only), in batches of 4 in file order (no shuffling),
with the same optimizer (AdamW, learning rate 1e-4 constant, betas 0.9/0.999, eps 1e-8, no weight
decay, gradient norm clipped to 1.0) and the same LoRA initialization (seed 42).

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
"""

from __future__ import annotations

import argparse
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


def bench_config(data_file: Path, model: str, precision: str = "float32"):
    """The shared settings as a ``TrainConfig`` (ours reads it; TRL's settings mirror it).

    ``precision``: ``"float32"``, or ``"bf16"`` for bf16 autocast over float32 weights.
    """
    from tinkerkit.config import build_config

    return build_config({
        "data_files": [str(data_file)], "base_model": model, "lora_rank": RANK,
        "lora_alpha": ALPHA, "lora_dropout": 0.0, "lora_targets": "all-linear",
        "max_sequence_length": MAX_LENGTH, "batch_size": BATCH_SIZE, "device": "cpu",
        "dtype": "float32", "learning_rate": LEARNING_RATE, "lr_schedule": "constant",
        "adam_beta1": BETA1, "adam_beta2": BETA2, "adam_eps": EPS, "weight_decay": 0.0,
        "grad_clip_norm": CLIP, "seed": SEED,
        "mixed_precision": "bf16" if precision == "bf16" else "no"})


def rendered_examples(data_file: Path, model: str, precision: str = "float32"):
    """The config, tokenizer and rendered examples, exactly as ``tinkerkit train`` renders."""
    from rich.console import Console

    from tinkerkit.models import load_tokenizer
    from tinkerkit.train import load_examples

    config = bench_config(data_file, model, precision)
    tokenizer = load_tokenizer(model)
    examples = load_examples(config, tokenizer, Console(stderr=True, quiet=True))
    return config, tokenizer, examples


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


def run_trl(args: argparse.Namespace, channel: Channel) -> None:
    """Worker: TRL's SFTTrainer on the same rendered examples, pausing between rounds."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from tinkerkit.engines.local.model import ATTENTION_MODULES, MLP_MODULES
    from tinkerkit.models import resolve_model

    _, tokenizer, examples = rendered_examples(args.data_file, args.model)
    rows = {"input_ids": [], "completion_mask": []}
    for example in examples:
        inputs = example.datum.loss_fn_inputs
        targets = inputs["target_tokens"].to_numpy().tolist()
        weights = inputs["weights"].to_numpy().tolist()
        rows["input_ids"].append(example.datum.model_input.to_ints() + targets[-1:])
        rows["completion_mask"].append([0] + [int(w > 0) for w in weights])
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
        trl_args = SFTConfig(
            output_dir=scratch, per_device_train_batch_size=BATCH_SIZE,
            gradient_accumulation_steps=1, max_length=MAX_LENGTH, completion_only_loss=True,
            train_sampling_strategy="sequential", num_train_epochs=1, max_steps=steps,
            learning_rate=LEARNING_RATE, lr_scheduler_type="constant", warmup_steps=0,
            adam_beta1=BETA1, adam_beta2=BETA2, adam_epsilon=EPS, weight_decay=0.0,
            max_grad_norm=CLIP, seed=SEED, data_seed=SEED, bf16=args.precision == "bf16",
            fp16=False,
            gradient_checkpointing=False, use_cpu=True, logging_steps=1, save_strategy="no",
            report_to="none", disable_tqdm=True, dataloader_num_workers=0,
            model_init_kwargs={"dtype": torch.float32})
        lora = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, bias="none",
                          target_modules=list(ATTENTION_MODULES + MLP_MODULES),
                          task_type="CAUSAL_LM")
        trainer = SFTTrainer(model=str(resolve_model(args.model)), args=trl_args,
                             train_dataset=Dataset.from_dict(rows), processing_class=tokenizer,
                             peft_config=lora, callbacks=[Rounds()])
        trainer.train()
        channel.receive()  # the parent's stop
    channel.send(peak_rss_gib=peak_rss_gib())


def worker(args: argparse.Namespace) -> None:
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=200, help="first N GSM8K training records")
    parser.add_argument("--rounds", type=int, default=10, help="alternations per engine")
    parser.add_argument("--data", type=Path, default=DATA / "gsm8k" / "train.jsonl")
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--precision", choices=["float32", "bf16"], default="float32",
                        help="bf16: both engines under bf16 autocast (TRL's bf16=True), "
                             "FLOP/s against the bfloat16 matmul peak")
    parser.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    parser.add_argument("--data-file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)

    import importlib.util

    if importlib.util.find_spec("trl") is None:
        raise SystemExit("TRL is not installed; install the benchmark extra: "
                         "pip install -e '.[bench]' (trl==1.16.0)")
    if not args.data.is_file():
        raise SystemExit(f"{args.data}: no such file (set --data or TINKERKIT_SHARED_DATA)")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"load average at start: {load()}; torch threads {torch.get_num_threads()}; "
          f"{os.cpu_count()} CPUs")
    peak = peak_matmul_flops(args.precision)
    with tempfile.TemporaryDirectory() as scratch:
        args.log_dir = Path(scratch)
        lines = args.data.read_text(encoding="utf-8").splitlines(keepends=True)[:args.examples]
        args.data_file = Path(scratch) / "train.jsonl"
        args.data_file.write_text("".join(lines), encoding="utf-8")
        workers = {engine: Worker(engine, args) for engine in ENGINES}
        ready = {engine: w.ask() for engine, w in workers.items()}
        steps = math.ceil(len(lines) / BATCH_SIZE)
        per_round = math.ceil(steps / args.rounds)
        results = {engine: {"seconds": 0.0, "tokens": 0, "flops": 0.0, "losses": []}
                   for engine in ENGINES}
        print(f"{len(lines)} examples, {steps} steps of {BATCH_SIZE}, {per_round} steps per round")
        print(f"{'round':>5} {'engine':>6} {'steps':>5} {'tokens':>7} {'seconds':>8} "
              f"{'tokens/s':>9} {'faults/step':>11}  load average")
        for round_ in range(math.ceil(steps / per_round)):
            for engine, w in workers.items():
                reply = w.ask(steps=per_round)
                total = results[engine]
                total["seconds"] += reply["seconds"]
                tokens = sum(reply["lengths"])
                total["tokens"] += tokens
                total["flops"] += sum(sequence_flops(n, ready[engine]["shape"])
                                      for n in reply["lengths"])
                total["losses"] += reply["losses"]
                print(f"{round_ + 1:>5} {engine:>6} {len(reply['losses']):>5} "
                      f"{tokens:>7} {reply['seconds']:>8.1f} "
                      f"{tokens / reply['seconds']:>9.1f} "
                      f"{reply['faults'] / max(len(reply['losses']), 1):>11.0f}  {load()}",
                      flush=True)
        for engine, w in workers.items():
            results[engine].update(w.stop(), rss_gib=ready[engine]["rss_gib"])
    peak = max(peak, peak_matmul_flops(args.precision))
    report(results, peak, args.precision)


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
