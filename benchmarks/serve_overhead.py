"""Overhead of ``tinkerkit serve``: a training step through the tinker SDK vs the engine in process.

Runs the same steps (``forward_backward`` + ``optim_step`` on a batch of random token sequences,
the next step submitted only after the previous result is read) on ``LocalTrainingClient`` in
this process and through the real ``tinker`` SDK against a ``tinkerkit serve`` started in a
thread on a loopback port, alternating one step of each so that both see the same machine load.
Prints the median time per step, tokens per second and the difference, plus the same for a step
that computes almost nothing (one 8-token datum), whose difference is the cost of the HTTP,
protobuf and future round trips alone.
Results go to ``docs/PERFORMANCE.md``.

Usage::

    python benchmarks/serve_overhead.py                              # tiny random Llama (seconds)
    python benchmarks/serve_overhead.py --model smollm2-135m-instruct --batch 8 --length 256
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import tinker
from tinker import types

from tinkerkit.engines.local import LocalTrainingClient
from tinkerkit.serve import make_server

ADAM = types.AdamParams(learning_rate=1e-4)


def batch(size: int, length: int, vocab: int, seed: int) -> list[types.Datum]:
    """``size`` datums of ``length`` random tokens, loss on the second half."""
    rng = np.random.default_rng(seed)
    data = []
    for _ in range(size):
        tokens = rng.integers(3, vocab, length + 1).tolist()
        weights = [0.0] * (length // 2) + [1.0] * (length - length // 2)
        data.append(types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                                loss_fn_inputs={"target_tokens": tokens[1:], "weights": weights}))
    return data


def step_seconds(client, data: list[types.Datum]) -> float:
    """Seconds of one step: forward_backward + optim_step submitted, both results read."""
    start = time.perf_counter()
    fwd_bwd = client.forward_backward(data, "cross_entropy")
    optim = client.optim_step(ADAM)
    fwd_bwd.result(), optim.result()
    return time.perf_counter() - start


def alternate(clients: dict, data: list[types.Datum], steps: int, warmup: int = 2) -> dict:
    """Seconds per step of each client, one step of each in turn, after warm-up steps."""
    times = {name: [] for name in clients}
    for step in range(warmup + steps):
        for name, client in clients.items():
            seconds = step_seconds(client, data)
            if step >= warmup:
                times[name].append(seconds)
    return times


def report(name: str, times: list[float], tokens: int) -> float:
    median = statistics.median(times)
    print(f"{name:<28} {1000 * median:9.1f} ms/step  {tokens / median:11.0f} tokens/s  "
          f"(min {1000 * min(times):.1f}, max {1000 * max(times):.1f})")
    return median


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="'tiny' (random 2-layer Llama) or a "
                        "model tinkerkit serves (registry name, model directory)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    model = args.model
    if model == "tiny":
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from helpers import save_tiny_llama  # the test suite's tiny model builder

        model = save_tiny_llama(work / "tiny")
    lora = {"rank": args.rank, "seed": 0, "train_unembed": False}
    local = LocalTrainingClient(model, args.rank, seed=0, checkpoint_root=work / "local")
    vocab = local.model.get_output_embeddings().out_features
    data = batch(args.batch, args.length, vocab, seed=0)
    near_empty = batch(1, 8, vocab, seed=1)
    tokens = args.batch * args.length
    print(f"model {args.model}, batch {args.batch} x {args.length} tokens, LoRA rank "
          f"{args.rank}, {args.steps} steps each (median)")
    server = make_server("127.0.0.1", 0, root=work / "root")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            with tinker.ServiceClient(base_url=f"http://127.0.0.1:{server.server_port}",
                                      api_key="tml-benchmark") as service:
                remote = service.create_lora_training_client(model, **lora).result()
                clients = {"in process": local, "through SDK + server": remote}
                full = alternate(clients, data, args.steps)
                small = alternate(clients, near_empty, args.steps)
    finally:
        server.shutdown()
        server.server_close()
        local.close()
    medians = {}
    for label, times, count in (("", full, tokens), (", 8 tokens", small, 8)):
        for name, values in times.items():
            medians[name + label] = report(name + label, values, count)
    overhead = medians["through SDK + server"] - medians["in process"]
    print(f"overhead per step: {1000 * overhead:.1f} ms "
          f"({100 * overhead / medians['in process']:.1f}%); near-empty step: "
          f"{1000 * (medians['through SDK + server, 8 tokens'] - medians['in process, 8 tokens']):.1f}"
          " ms")

if __name__ == "__main__":
    main()
