"""bf16 autocast against float32 in the local engine on the CPU: tokens/s and the loss curve.

The same run twice, side by side: the local engine as ``benchmarks/train_throughput.py``'s
rounds mode runs it (``smollm2-135m-instruct``, LoRA rank 16 alpha 32 on all linear layers, the
first ``--examples`` GSM8K records in batches of 4 in file order, length 512, AdamW at 1e-4
constant, seed 42), once with ``MIXED_PRECISION = "no"`` (float32) and once with ``"bf16"``
(bf16 autocast; LoRA weights, loss and optimizer float32). Each lives in its own worker process
(train_throughput's ``Worker``) for the whole run; the parent lets them take turns for
``ceil(steps / rounds)`` optimizer steps each, so that a shared machine's load falls on both.

Printed: each precision's real tokens/s (tokens of the rendered sequences / wall seconds of its
steps), the ratio, the peak resident memory of each worker, and the loss of every step (mean NLL
per weighted token) with the relative difference ``|bf16 - float32| / float32`` and its largest
value. Goals (issue 19): bf16 >= 1.8x float32's tokens/s, every step's loss within 2%.

Whether the CPU multiplies bf16 natively (``avx512_bf16`` or ``amx_bf16`` in ``/proc/cpuinfo``)
is printed with the figures: without it PyTorch emulates bf16 and it is slower than float32.

Example::

    .venv/bin/python benchmarks/cpu_bf16.py                   # 200 examples (50 steps), 5 rounds
    .venv/bin/python benchmarks/cpu_bf16.py --examples 16 --rounds 2   # a quick check

Results: ``docs/PERFORMANCE.md``.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from pathlib import Path

from train_throughput import BATCH_SIZE, DATA, MODEL, Worker, check_counts, load

PRECISIONS = ("float32", "bf16")
LOSS_TOLERANCE = 0.02
SPEED_GOAL = 1.8


def native_bf16() -> str:
    """The CPU's native bf16 instructions named in ``/proc/cpuinfo`` (``"none"`` if none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown (no /proc/cpuinfo)"
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines()
                  if line.startswith("flags")), [])
    found = [flag for flag in ("avx512_bf16", "amx_bf16") if flag in flags]
    return ", ".join(found) or "none"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=200, help="first N GSM8K training records")
    parser.add_argument("--rounds", type=int, default=5, help="turns per precision")
    parser.add_argument("--data", type=Path, default=DATA / "gsm8k" / "train.jsonl")
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args(argv)
    check_counts(parser, args, {"examples": 1, "rounds": 1, "threads": 0})
    if not args.data.is_file():
        raise SystemExit(f"{args.data}: no such file (set --data or TINKERKIT_SHARED_DATA)")
    print(f"load average at start: {load()}; {os.cpu_count()} CPUs; native bf16: "
          f"{native_bf16()}")
    with tempfile.TemporaryDirectory() as scratch:
        lines = args.data.read_text(encoding="utf-8").splitlines(keepends=True)[:args.examples]
        data_file = Path(scratch) / "train.jsonl"
        data_file.write_text("".join(lines), encoding="utf-8")
        workers = {}
        for precision in PRECISIONS:
            log_dir = Path(scratch) / precision
            log_dir.mkdir()
            workers[precision] = Worker("ours", argparse.Namespace(
                data_file=data_file, model=args.model, threads=args.threads,
                precision=precision, log_dir=log_dir))
        ready = {precision: w.ask() for precision, w in workers.items()}
        steps = math.ceil(len(lines) / BATCH_SIZE)
        per_round = math.ceil(steps / args.rounds)
        results = {p: {"seconds": 0.0, "tokens": 0, "losses": []} for p in PRECISIONS}
        print(f"{len(lines)} examples, {steps} steps of {BATCH_SIZE}, {per_round} steps per round")
        print(f"{'round':>5} {'precision':>9} {'steps':>5} {'tokens':>7} {'seconds':>8} "
              f"{'tokens/s':>9}  load average")
        for round_ in range(math.ceil(steps / per_round)):
            for precision, w in workers.items():
                reply = w.ask(steps=per_round)
                tokens = sum(reply["lengths"])
                total = results[precision]
                total["seconds"] += reply["seconds"]
                total["tokens"] += tokens
                total["losses"] += reply["losses"]
                print(f"{round_ + 1:>5} {precision:>9} {len(reply['losses']):>5} {tokens:>7} "
                      f"{reply['seconds']:>8.1f} {tokens / reply['seconds']:>9.1f}  {load()}",
                      flush=True)
        for precision, w in workers.items():
            results[precision].update(w.stop(), rss_gib=ready[precision]["rss_gib"])
    report(results)


def report(results: dict) -> None:
    """Print tokens/s, the ratio, peak memory and the two loss curves with their differences."""
    print(f"\nload average at end: {load()}")
    speed = {p: r["tokens"] / r["seconds"] for p, r in results.items()}
    for precision, r in results.items():
        print(f"{precision:>9}: {r['tokens']} tokens in {r['seconds']:.1f} s, "
              f"{speed[precision]:.1f} tokens/s, peak RSS {r['peak_rss_gib']:.2f} GiB")
    ratio = speed["bf16"] / speed["float32"]
    print(f"bf16 / float32: {ratio:.2f}x tokens/s (goal >= {SPEED_GOAL})")
    full, half = results["float32"]["losses"], results["bf16"]["losses"]
    print(f"\n{'step':>4} {'float32':>8} {'bf16':>8} {'rel diff':>9}")
    diffs = []
    for i, (a, b) in enumerate(zip(full, half)):
        diffs.append(abs(b - a) / abs(a))
        print(f"{i + 1:>4} {a:>8.4f} {b:>8.4f} {diffs[-1]:>9.2%}")
    worst = max(range(len(diffs)), key=diffs.__getitem__)
    print(f"largest relative difference {diffs[worst]:.2%} at step {worst + 1} (goal <= "
          f"{LOSS_TOLERANCE:.0%} at every step); mean loss float32 {sum(full) / len(full):.4f}, "
          f"bf16 {sum(half) / len(half):.4f}")


if __name__ == "__main__":
    main()
