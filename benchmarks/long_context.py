"""Long-sequence LoRA training: peak memory and speed, naive transformers + PEFT vs tinkerkit.

Trains a few LoRA steps on one example of each length (2,048 / 8,192 / 16,384 tokens by default)
on ``qwen3-tiny-random`` (Qwen3 architecture, hidden 256, 4 layers, the real 151,936-entry
vocabulary), once per path, each case in its own subprocess:

* ``naive``: plain transformers + PEFT: ``model(input_ids).logits`` (the full ``[T, vocab]``
  float32 logits), weighted cross-entropy, ``backward``, AdamW.
* ``ours``: tinkerkit's ``LocalTrainingClient`` (chunked vocabulary projection of the weighted
  positions, activation checkpointing, SDPA without a mask) with the same LoRA init, data and
  AdamW settings.

It prints, side by side, each case's peak resident memory (``ru_maxrss`` of its process; the
model and torch included), its resident memory after loading, tokens/s (steps after the first),
and the largest difference of the per-step losses (mean NLL per weighted token) between the two
paths where both ran. Goals (issue 6): ours at 16,384 tokens <= 4 GiB peak; at 8,192 tokens at
least 5x less peak memory than naive; losses equal within 1e-4.

The machine may be shared: before each case the expected need is compared with ``MemAvailable``
and a case that does not fit is skipped ("does not fit"); a running case is stopped if the
machine's available memory falls below 1 GiB.

Results: ``docs/QUICK_START_LONG_TEXT.md`` ("Memory and speed (measured)") and
``docs/PERFORMANCE.md``.

Example::

    .venv/bin/python benchmarks/long_context.py --memory-margin 1.0      # everything, idle machine (naive 8,192: ~21 GiB)
    .venv/bin/python benchmarks/long_context.py --lengths 2048,4096      # both paths, short
    .venv/bin/python benchmarks/long_context.py --paths ours --lengths 16384 --steps 5
"""

from __future__ import annotations

import argparse
import json
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GIB = 1024 ** 3
VOCAB = 151936
MIN_AVAILABLE_GIB = 1.0  # stop a running case when the machine has less than this left


def expected_gib(path: str, length: int) -> float:
    """Expected peak resident memory of a case on qwen3-tiny-random (GiB), fitted on this
    benchmark's measurements (CPU, float32).

    naive: torch and the model (0.7 GiB) plus 4.3 float32 copies of the ``[T, vocab]`` logits
    (the logits, their log-softmax and both gradients): 5.6 GiB at 2,048 tokens, 10.7 GiB at
    4,096, 20.6 GiB at 8,192. ours: 1.2 GiB (torch, the model, the logit chunks) plus 0.06 GiB
    per 1,024 tokens (checkpointed layer inputs, attention buffers).
    """
    if path == "naive":
        return 0.7 + 4.3 * length * VOCAB * 4 / GIB
    return 1.2 + 0.06 * length / 1024


def available_gib() -> float:
    """``MemAvailable`` of ``/proc/meminfo`` in GiB (inf where there is no /proc)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 / GIB
    except OSError:
        pass
    return float("inf")


# ------------------------------------------------------------------------------ one case


def example(model: str, length: int, seed: int) -> dict:
    """One rendered long reasoning conversation, truncated to ``length`` input tokens.

    Returns:
        ``{"tokens", "targets", "weights"}`` lists of ``length`` items (weight 0 on the prompt).
    """
    from tinkerkit.data.conversation import Conversation, Message
    from tinkerkit.data.demo import generate_long_reasoning_records
    from tinkerkit.models import load_tokenizer
    from tinkerkit.render import Renderer

    record = generate_long_reasoning_records(1, seed, min_chars=3 * length)[0]
    messages = tuple(Message(**m) for m in record["messages"])
    renderer = Renderer(load_tokenizer(model), max_length=length + 1)
    datum = renderer.render(Conversation(messages=messages)).datum
    return {"tokens": datum.model_input.to_ints(),
            "targets": datum.loss_fn_inputs["target_tokens"].to_numpy().tolist(),
            "weights": datum.loss_fn_inputs["weights"].to_numpy().tolist()}


def run_naive(args, data: dict, rss_loaded: list[int]) -> tuple[list[float], list[float]]:
    import torch
    from peft import LoraConfig, get_peft_model

    from tinkerkit.engines.local.model import load_model

    base = load_model(args.model)
    targets = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    config = LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=targets,
                        lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
    torch.manual_seed(args.seed)
    model = get_peft_model(base, config)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
                                  weight_decay=0.0, foreach=False)
    ids = torch.tensor([data["tokens"]])
    target = torch.tensor(data["targets"])
    weights = torch.tensor(data["weights"])
    rss_loaded.append(_rss())
    losses, seconds = [], []
    for _ in range(args.steps):
        start = time.perf_counter()
        logits = model(input_ids=ids).logits[0].float()  # [T, vocab]
        nll = torch.nn.functional.cross_entropy(logits, target, reduction="none")
        loss = (nll * weights).sum() / weights.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=False)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        seconds.append(time.perf_counter() - start)
        del logits, nll, loss
    return losses, seconds


def run_ours(args, data: dict, rss_loaded: list[int]) -> tuple[list[float], list[float]]:
    from tinker import types

    from tinkerkit.engines.local import LocalTrainingClient

    checkpointing = {"auto": "auto", "on": True, "off": False}[args.checkpointing]
    with tempfile.TemporaryDirectory() as tmp:
        client = LocalTrainingClient(args.model, args.rank, seed=args.seed, device=args.device,
                                     checkpoint_root=tmp, activation_checkpointing=checkpointing,
                                     mixed_precision=args.mixed_precision)
        datum = types.Datum(model_input=types.ModelInput.from_ints(data["tokens"]),
                            loss_fn_inputs={"target_tokens": data["targets"],
                                            "weights": data["weights"]})
        adam = types.AdamParams(learning_rate=args.lr, beta1=0.9, beta2=0.95, eps=1e-8,
                                weight_decay=0.0, grad_clip_norm=1.0)
        total_weight = sum(data["weights"])
        rss_loaded.append(_rss())
        losses, seconds = [], []
        for _ in range(args.steps):
            start = time.perf_counter()
            out = client.forward_backward([datum], "cross_entropy").result()
            client.optim_step(adam).result()
            losses.append(out.metrics["loss:sum"] / total_weight)
            seconds.append(time.perf_counter() - start)
        client.close()
    return losses, seconds


def _rss() -> int:
    """Peak resident memory of this process so far, bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(args) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    data = json.loads(Path(args.data).read_text())
    rss_loaded: list[int] = []
    run = run_naive if args.path == "naive" else run_ours
    losses, seconds = run(args, data, rss_loaded)
    timed = seconds[1:] or seconds
    print(json.dumps({"peak_gib": _rss() / GIB, "loaded_gib": rss_loaded[0] / GIB,
                      "tokens_per_s": len(data["tokens"]) * len(timed) / sum(timed),
                      "losses": losses, "seconds": seconds}))


# ---------------------------------------------------------------------------------- driver


def run_case(args, path: str, length: int, data_file: Path) -> dict:
    """Run one (path, length) case in a subprocess, guarded by the machine's free memory."""
    need, free = expected_gib(path, length), available_gib()
    if need * args.memory_margin > free:
        return {"status": f"does not fit (needs ~{need:.1f} GiB, {free:.1f} GiB available)"}
    command = [sys.executable, __file__, "--worker", path, "--data", str(data_file),
               "--model", args.model, "--rank", str(args.rank), "--steps", str(args.steps),
               "--lr", str(args.lr), "--seed", str(args.seed), "--device", args.device,
               "--checkpointing", args.checkpointing, "--mixed-precision", args.mixed_precision,
               "--threads", str(args.threads)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while process.poll() is None:
            if available_gib() < MIN_AVAILABLE_GIB:
                return {"status": f"stopped: the machine had < {MIN_AVAILABLE_GIB} GiB available"}
            time.sleep(0.2)
    finally:  # also on Ctrl-C or SIGTERM (timeout): never leave a worker behind
        if process.poll() is None:
            process.kill()
            process.wait()
    out, err = process.communicate()
    if process.returncode != 0:
        last = (err.strip().splitlines() or ["?"])[-1]
        return {"status": f"failed (exit {process.returncode}): {last}"}
    return {"status": "ok", **json.loads(out.strip().splitlines()[-1])}


def _cell(result: dict | None, key: str, fmt: str) -> str:
    if result is None:
        return "-"
    if result["status"] != "ok":
        return result["status"] if key == "peak_gib" else ""
    return format(result[key], fmt)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="2048,8192,16384",
                        help="comma-separated example lengths in tokens")
    parser.add_argument("--paths", default="naive,ours", help="naive, ours, or both")
    parser.add_argument("--model", default="qwen3-tiny-random")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per case")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--checkpointing", choices=["auto", "on", "off"], default="auto",
                        help="activation checkpointing of our path")
    parser.add_argument("--mixed-precision", choices=["auto", "bf16", "no"], default="no",
                        help="our path's mixed precision (no: float32, comparable with naive)")
    parser.add_argument("--memory-margin", type=float, default=1.1,
                        help="run a case only if its expected peak times this fits in the "
                             "available memory (1.0 on an idle machine: naive 8,192 needs ~21 GiB)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--worker", choices=["naive", "ours"], help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        args.path = args.worker
        return worker(args)

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the workers' cleanup
    lengths = [int(n) for n in args.lengths.split(",")]
    paths = [p.strip() for p in args.paths.split(",")]
    if not set(paths) <= {"naive", "ours"}:
        parser.error(f"--paths: use naive, ours or naive,ours (got {args.paths})")
    import torch

    print(f"model {args.model}, LoRA rank {args.rank} (all linear layers), {args.steps} steps per "
          f"case, torch {torch.__version__}, {torch.get_num_threads()} threads, device "
          f"{args.device}; ours: checkpointing {args.checkpointing}, mixed precision "
          f"{args.mixed_precision}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for length in lengths:
            data_file = Path(tmp) / f"example_{length}.json"
            data_file.write_text(json.dumps(example(args.model, length, args.seed)))
            results = {}
            for path in paths:
                results[path] = run_case(args, path, length, data_file)
                print(f"  {length} tokens, {path}: {json.dumps(results[path])}", flush=True)
            rows.append((length, results))

    header = (f"{'tokens':>7} | {'naive peak GiB':>14} | {'naive tok/s':>11} | "
              f"{'ours peak GiB':>13} | {'ours tok/s':>10} | {'memory ratio':>12} | "
              f"{'max |loss diff|':>15}")
    print("\n" + header + "\n" + "-" * len(header))
    for length, results in rows:
        naive, ours = results.get("naive"), results.get("ours")
        ratio = diff = ""
        if naive and ours and naive["status"] == ours["status"] == "ok":
            ratio = f"{naive['peak_gib'] / ours['peak_gib']:.1f}x"
            diff = f"{max(abs(a - b) for a, b in zip(naive['losses'], ours['losses'])):.2e}"
        print(f"{length:>7} | {_cell(naive, 'peak_gib', '.2f'):>14} | "
              f"{_cell(naive, 'tokens_per_s', '.0f'):>11} | {_cell(ours, 'peak_gib', '.2f'):>13} | "
              f"{_cell(ours, 'tokens_per_s', '.0f'):>10} | {ratio:>12} | {diff:>15}")


if __name__ == "__main__":
    main()
