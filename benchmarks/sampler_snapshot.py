"""Cost of a new sampler every RL step: ``save_weights_and_get_sampling_client``.

An RL loop takes a sampling client on the current weights after every optimizer step. This
script runs ``steps`` RL-shaped steps (``forward_backward`` with ``importance_sampling`` on one
short datum, ``optim_step``, a new sampler, one 8-token sample from it) on the local engine in
process and through the real ``tinker`` SDK against a ``tinkerkit serve`` in a thread, and prints
per engine the seconds of the first ``save_weights_and_get_sampling_client`` (until the client
is returned) and, in the steady state (after the first ``SNAPSHOT_SAMPLERS_KEPT + 1`` steps,
when the server releases old samplers), the median seconds of one and of the first sample on
the new sampler, and the process's resident memory growth per step (samplers that the loop
dropped should not pile up).

Usage::

    python benchmarks/sampler_snapshot.py                                  # smollm2-135m-instruct
    python benchmarks/sampler_snapshot.py --model /path/to/tiny --steps 5
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import tinker
from tinker import types

from tinkerkit.engines.local import LocalTrainingClient
from tinkerkit.models import load_tokenizer
from tinkerkit.serve import make_server
from tinkerkit.serve.state import SNAPSHOT_SAMPLERS_KEPT

ADAM = types.AdamParams(learning_rate=1e-5)
SAMPLING = types.SamplingParams(max_tokens=8, temperature=1.0, seed=0)


def rl_datum(tokens: list[int]) -> types.Datum:
    """One RL datum: the last half of ``tokens`` sampled, advantage 1, sampler logprob -1."""
    n = len(tokens) - 1
    half = n // 2
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                       loss_fn_inputs={"target_tokens": tokens[1:],
                                       "logprobs": [0.0] * half + [-1.0] * (n - half),
                                       "advantages": [0.0] * half + [1.0] * (n - half)})


def rss_mib() -> float:
    """This process's resident memory in MiB (Linux ``/proc/self/statm``)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def run(training, prompt: types.ModelInput, datum: types.Datum, steps: int) -> dict[str, float]:
    """Median seconds of the snapshot and of the first sample, and RSS MiB growth per step."""
    snapshot, first_sample, rss = [], [], []
    for _ in range(steps):
        training.forward_backward([datum], "importance_sampling").result()
        training.optim_step(ADAM).result()
        start = time.perf_counter()
        sampler = training.save_weights_and_get_sampling_client()
        if hasattr(sampler, "result"):  # the SDK returns a future of the client
            sampler = sampler.result()
        snapshot.append(time.perf_counter() - start)
        start = time.perf_counter()
        response = sampler.sample(prompt, 1, SAMPLING).result()
        first_sample.append(time.perf_counter() - start)
        sequence = response.sequences[0]
        assert sequence.logprobs is not None and len(sequence.logprobs) == len(sequence.tokens)
        del sampler
        gc.collect()
        rss.append(rss_mib())
    warm = min(SNAPSHOT_SAMPLERS_KEPT + 1, steps - 2)  # steady state: the server releases
    growth = (rss[-1] - rss[warm]) / (steps - 1 - warm)
    return {"snapshot_s": statistics.median(snapshot[warm:]),
            "first_snapshot_s": snapshot[0],
            "first_sample_s": statistics.median(first_sample[warm:]), "rss_mib_per_step": growth}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rank", type=int, default=32)
    args = parser.parse_args()
    tokenizer = load_tokenizer(args.model)
    tokens = tokenizer.encode("Question: what is 17 + 25? Answer: 17 + 25 = 42. The answer is 42.")
    prompt = types.ModelInput.from_ints(tokenizer.encode("Question: what is 3 + 4? Answer:"))
    datum = rl_datum(tokens)
    results = {}
    with tempfile.TemporaryDirectory() as root:
        local = LocalTrainingClient(args.model, args.rank, device="cpu",
                                    checkpoint_root=Path(root) / "local")
        results["in process"] = run(local, prompt, datum, args.steps)
        local.close()
        del local
        gc.collect()
        server = make_server("127.0.0.1", 0, root=Path(root) / "serve")
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                url = f"http://127.0.0.1:{server.server_port}"
                with tinker.ServiceClient(base_url=url, api_key="tml-benchmark") as client:
                    training = client.create_lora_training_client(args.model,
                                                                  rank=args.rank).result()
                    results["tinkerkit serve"] = run(training, prompt, datum, args.steps)
        finally:
            server.shutdown()
    print(f"model {args.model}, LoRA rank {args.rank}, {args.steps} steps, "
          f"{os.cpu_count()} CPUs")
    print(f"{'engine':<16} {'first snapshot s':>17} {'snapshot s':>11} {'first sample s':>15} "
          f"{'RSS MiB/step':>13}")
    for name, r in results.items():
        print(f"{name:<16} {r['first_snapshot_s']:>17.3f} {r['snapshot_s']:>11.3f} "
              f"{r['first_sample_s']:>15.3f} {r['rss_mib_per_step']:>13.1f}")


if __name__ == "__main__":
    sys.exit(main())
