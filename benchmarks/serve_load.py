"""Load test of ``tinkerkit serve``: concurrent SDK clients, each replayed alone afterwards.

Starts ``tinkerkit serve`` (the CLI, in its own process, on the CPU, a free loopback port and a
fresh root) with a tiny random Llama, and runs ``--clients`` threads for ``--seconds``. Each
client is the real ``tinker`` SDK with its own API key (so no client sees another's runs), its
own session and its own LoRA model (seed = its index), and loops over rounds:

* ``forward_backward`` on a batch of random token sequences and ``optim_step``, both submitted
  before either result is read; the previous round's results are read after the next round is
  submitted, so every client keeps several requests in flight;
* every 3rd round: ``save_state``, ``save_weights_for_sampler``, a sampling client on that
  checkpoint and a greedy ``sample`` from it, and a ``sample`` from
  ``save_weights_and_get_sampling_client`` (a snapshot of the weights at that point);
* every 5th round, a request that must fail with a clear error, in turn: a target token outside
  the vocabulary (400), a ``save_state`` name already taken (400), another client's checkpoint
  (404).

Checks (the verdict):

* every submitted future resolves (none lost), with a result or the expected error; the SDK
  never sees one request id for two requests (the server answered nothing twice);
* each client's requests, replayed one after another on an in-process ``LocalTrainingClient``
  with the same seed, give the same losses, logprobs and optimizer metrics, and every checkpoint
  the server wrote (LoRA and AdamW tensors) equals the replay's, bitwise: the server runs each
  model's requests in ``seq_id`` order on its own engine client, with the same CPU kernels as the
  replay. Samples give the same tokens and logprobs up to :data:`SAMPLE_LOGPROB_TOLERANCE` (see
  there why not bitwise);
* each key lists exactly its own run and checkpoints; the server logged no internal error.

Prints requests served, failures by kind, p50/p99 latency per request type (from submission to
the resolved future, as the client sees it) and the verdict.
Results go to ``docs/PERFORMANCE.md``.

Usage::

    python benchmarks/serve_load.py                      # 8 clients x 60 s
    python benchmarks/serve_load.py --clients 4 --seconds 10
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import tinker
import torch
from safetensors.torch import load_file
from tinker import types

from tinkerkit.checkpoint import ADAPTER_WEIGHTS, OPTIMIZER_STATE, read_checkpoint_meta
from tinkerkit.engines.local import LocalSamplingClient, LocalTrainingClient
from tinkerkit.engines.local.model import load_model

RANK = 4
ADAM = types.AdamParams(learning_rate=5e-3)
GREEDY = types.SamplingParams(max_tokens=6, temperature=0.0, stop=[])
EXPECTED_FAILURES = {
    "vocab": (tinker.BadRequestError, r"target_tokens holds a token id outside \[0, \d+\)"),
    "taken": (tinker.BadRequestError, r"checkpoint 'weights/r\d+' of .* exists"),
    "other key": (tinker.NotFoundError, r"training run '.*' not found"),
}
"""Deliberate failures: the SDK exception and the message it must carry."""
SAMPLE_LOGPROB_TOLERANCE = 1e-5
"""Samples are compared token for token, logprobs up to this absolute difference. Samplers of
all clients run at once on the same cores, and MKL's float32 matrix products are only bitwise
reproducible across concurrent calls with ``MKL_CBWR=AUTO,STRICT`` (seen: 1 ulp, 4.8e-7, in one
sample of 128 at 8 clients; none with that setting). Training runs one model's step at a time,
and its losses, logprobs, metrics and checkpoints are compared bitwise."""


# -- one client ------------------------------------------------------------------------------


@dataclasses.dataclass
class Op:
    """One request of a client, in submission order, and its outcome."""

    kind: str  # forward_backward, optim_step, save_state, save_sampler, sampling_client,
    #            snapshot, sample_checkpoint, sample_snapshot, or failure:<expected kind>
    args: dict[str, Any]
    submitted: float
    done: float | None = None
    result: Any = None
    error: BaseException | None = None


@dataclasses.dataclass
class ClientLog:
    """Everything one client did."""

    index: int
    key: str
    seed: int
    model_id: str = ""
    ops: list[Op] = dataclasses.field(default_factory=list)
    crashed: str | None = None


def random_batch(rng: np.random.Generator, vocab: int, size: int = 4,
                 bad_target: bool = False) -> list[types.Datum]:
    """``size`` datums of 16-64 random tokens, loss on the second half; with ``bad_target``,
    the last target is ``vocab`` (outside the vocabulary)."""
    data = []
    for _ in range(size):
        length = int(rng.integers(16, 65))
        tokens = rng.integers(3, vocab, length + 1).tolist()
        targets = tokens[1:]
        if bad_target:
            targets[-1] = vocab
        weights = [0.0] * (length // 2) + [1.0] * (length - length // 2)
        data.append(types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                                loss_fn_inputs={"target_tokens": targets, "weights": weights}))
    return data


class Client:
    """One load-test client: a thread with its own key, session and model."""

    def __init__(self, index: int, url: str, model: str, vocab: int, start: threading.Barrier,
                 seconds: float, shared_paths: dict[int, str], clients: int) -> None:
        self.log = ClientLog(index, f"tml-load-{index}", seed=index)
        self.url, self.model, self.vocab = url, model, vocab
        self.start, self.seconds = start, seconds
        self.shared_paths, self.clients = shared_paths, clients
        self.rng = np.random.default_rng(1000 + index)

    def submit(self, kind: str, call, **args) -> Op:
        """Record an op and start ``call()`` (returning an SDK future); its outcome is filled
        in when the future resolves."""
        op = Op(kind, args, time.perf_counter())
        self.log.ops.append(op)
        try:
            future = call().future()
        except Exception as e:  # refused before a future existed
            op.error, op.done = e, time.perf_counter()
            return op

        def resolved(done) -> None:
            try:
                op.result = done.result()
            except BaseException as e:  # the expected failures and any other
                op.error = e
            op.done = time.perf_counter()

        future.add_done_callback(resolved)
        return op

    def wait(self, ops: list[Op], timeout: float = 300.0) -> None:
        """Wait for ``ops`` to resolve (those still open after ``timeout`` count as lost)."""
        end = time.monotonic() + timeout
        while any(op.done is None for op in ops) and time.monotonic() < end:
            time.sleep(0.01)

    def run(self) -> None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                with tinker.ServiceClient(base_url=self.url, api_key=self.log.key) as service:
                    self._rounds(service)
        except Exception as e:  # reported, never silent
            self.log.crashed = f"{type(e).__name__}: {e}"
            self.start.abort()

    def _rounds(self, service) -> None:
        created = self.submit("create_model", lambda: service.create_lora_training_client(
            self.model, rank=RANK, seed=self.log.seed, train_unembed=False))
        self.wait([created])
        if created.error is not None:
            raise created.error
        training = created.result
        self.log.model_id = training.model_id
        self.start.wait()  # the clocked mix starts when every client has its model
        deadline = time.monotonic() + self.seconds
        previous: list[Op] = []
        prompt = types.ModelInput.from_ints(self.rng.integers(3, self.vocab, 8).tolist())
        last_state, number = None, 0
        while time.monotonic() < deadline:
            number += 1
            current = []
            data = random_batch(self.rng, self.vocab)
            current.append(self.submit("forward_backward", lambda d=data: training.forward_backward(
                d, "cross_entropy"), data=data))
            current.append(self.submit("optim_step", lambda: training.optim_step(ADAM)))
            if number % 3 == 0:
                name = f"r{number}"
                current.append(self.submit("save_state", lambda n=name: training.save_state(n),
                                           name=name))
                saved = self.submit("save_sampler",
                                    lambda n=name: training.save_weights_for_sampler(n + "-s"),
                                    name=name + "-s")
                self.wait([saved])
                if saved.error is None:
                    last_state = name
                    self.shared_paths.setdefault(self.log.index, saved.result.path)
                    sampler = self.submit("sampling_client", lambda p=saved.result.path:
                                          service.create_sampling_client(model_path=p))
                    self.wait([sampler])
                    if sampler.error is None:
                        current.append(self.submit(
                            "sample_checkpoint", lambda s=sampler.result: s.sample(
                                prompt, 2, GREEDY), name=name + "-s", prompt=prompt))
                snapshot = self.submit("snapshot",
                                       lambda: training.save_weights_and_get_sampling_client())
                self.wait([snapshot])
                if snapshot.error is None:
                    current.append(self.submit(
                        "sample_snapshot", lambda s=snapshot.result: s.sample(prompt, 2, GREEDY),
                        prompt=prompt))
            if number % 5 == 0:
                current.append(self._failure(number // 5 - 1, training, service, last_state))
            self.wait(previous)
            previous = current
        self.wait(previous)
        self.wait([self.submit("save_state", lambda: training.save_state("final"),
                               name="final")])

    def _failure(self, turn: int, training, service, last_state: str | None) -> Op:
        """A request that must fail: the ``turn``-th of the expected kinds that applies."""
        other = self.shared_paths.get((self.log.index + 1) % self.clients)
        kinds = ["vocab"] + (["taken"] if last_state else []) + \
            (["other key"] if other and self.clients > 1 else [])
        kind = kinds[turn % len(kinds)]
        if kind == "vocab":
            data = random_batch(self.rng, self.vocab, size=2, bad_target=True)
            return self.submit("failure:vocab", lambda: training.forward_backward(
                data, "cross_entropy"), data=data)
        if kind == "taken":
            return self.submit("failure:taken", lambda: training.save_state(last_state))
        return self.submit("failure:other key",
                           lambda: service.create_sampling_client(model_path=other))


# -- the server ------------------------------------------------------------------------------


def start_server(root: Path, log_file: Path) -> tuple[subprocess.Popen, str]:
    """``tinkerkit serve`` on a free loopback port (CPU), its URL read from its first line."""
    command = [sys.executable, "-m", "tinkerkit.cli", "serve", "--port", "0", "--root", str(root),
               "--device", "cpu"]
    with open(log_file, "wb") as log:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log,
                                   env={**os.environ, "COLUMNS": "200"})
    for line in process.stdout:
        match = re.search(rb"tinkerkit serve on (http://127\.0\.0\.1:\d+)", line)
        if match:
            threading.Thread(target=process.stdout.read, daemon=True).start()  # keep draining
            return process, match[1].decode()
    raise RuntimeError(f"tinkerkit serve did not start; see {log_file}")


def stop_server(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# -- the replay ------------------------------------------------------------------------------


@dataclasses.dataclass
class Replay:
    """What a sequential replay of one client found."""

    compared: Counter = dataclasses.field(default_factory=Counter)
    mismatches: list[str] = dataclasses.field(default_factory=list)
    max_difference: float = 0.0
    rounded_samples: int = 0  # samples whose logprobs differ within SAMPLE_LOGPROB_TOLERANCE
    max_sample_difference: float = 0.0


def _same(replay: Replay, what: str, served, replayed) -> None:
    """Bitwise comparison of arrays/tensors/numbers; the largest difference is kept."""
    a = np.asarray(served, dtype=np.float64)
    b = np.asarray(replayed, dtype=np.float64)
    if a.shape != b.shape:
        replay.mismatches.append(f"{what}: shape {a.shape} != {b.shape}")
        return
    if not np.array_equal(a, b, equal_nan=True):
        difference = float(np.nanmax(np.abs(a - b))) if a.size else math.inf
        replay.max_difference = max(replay.max_difference, difference)
        replay.mismatches.append(f"{what}: differs by up to {difference:.3g}")


def _same_checkpoint(replay: Replay, what: str, served: Path, replayed: Path) -> None:
    for file in (ADAPTER_WEIGHTS, OPTIMIZER_STATE):
        if not (replayed / file).is_file():
            continue
        if not (served / file).is_file():
            replay.mismatches.append(f"{what}: {file} missing on the server")
            continue
        ours, theirs = load_file(replayed / file), load_file(served / file)
        if ours.keys() != theirs.keys():
            replay.mismatches.append(f"{what}: {file} holds other tensors")
            continue
        for key in ours:
            _same(replay, f"{what}: {file}: {key}", theirs[key].numpy(), ours[key].numpy())
    if (read_checkpoint_meta(served)["optimizer_step"]
            != read_checkpoint_meta(replayed)["optimizer_step"]):
        replay.mismatches.append(f"{what}: optimizer step differs")
    replay.compared["checkpoints"] += 1


def _same_sample(replay: Replay, what: str, served: types.SampleResponse,
                 replayed: types.SampleResponse) -> None:
    """The same tokens, and logprobs equal up to :data:`SAMPLE_LOGPROB_TOLERANCE`."""
    rounded = False
    for i, (a, b) in enumerate(zip(served.sequences, replayed.sequences, strict=True)):
        if a.tokens != b.tokens:
            replay.mismatches.append(f"{what}: sequence {i} tokens {a.tokens} != {b.tokens}")
            continue
        difference = float(np.max(np.abs(np.subtract(a.logprobs, b.logprobs)), initial=0.0))
        if difference > SAMPLE_LOGPROB_TOLERANCE:
            replay.mismatches.append(f"{what}: sequence {i} logprobs differ by {difference:.3g}")
        elif difference > 0:
            rounded = True
            replay.max_sample_difference = max(replay.max_sample_difference, difference)
    replay.rounded_samples += rounded
    replay.compared["samples"] += 1


def replay_client(log: ClientLog, model: str, root: Path, work: Path, base) -> Replay:
    """Replay ``log``'s successful requests in order on an in-process engine and compare."""
    replay = Replay()
    run_dir = root / "runs" / log.model_id
    client = LocalTrainingClient(model, RANK, seed=log.seed, target_modules="all-linear",
                                 train_unembed=False, device="cpu", checkpoint_root=work)
    snapshot = None
    try:
        for number, op in enumerate(log.ops):
            what = f"client {log.index} request {number} ({op.kind})"
            if op.kind.startswith("failure:") or op.kind in ("create_model", "sampling_client"):
                continue  # refused requests change nothing; the others are not model requests
            if op.error is not None:
                replay.mismatches.append(f"{what}: failed unexpectedly on the server")
                continue
            if op.kind == "forward_backward":
                out = client.forward_backward(op.args["data"], "cross_entropy").result()
                _same(replay, what + " loss", op.result.metrics["loss:sum"],
                      out.metrics["loss:sum"])
                for i, (a, b) in enumerate(zip(op.result.loss_fn_outputs, out.loss_fn_outputs)):
                    _same(replay, f"{what} logprobs {i}", a["logprobs"].to_numpy(),
                          b["logprobs"].to_numpy())
                replay.compared["forward_backward"] += 1
            elif op.kind == "optim_step":
                out = client.optim_step(ADAM).result()
                if set(out.metrics) != set(op.result.metrics):
                    replay.mismatches.append(f"{what}: metrics {sorted(op.result.metrics)}")
                for key, value in out.metrics.items():
                    _same(replay, f"{what} {key}", op.result.metrics.get(key, math.nan), value)
                replay.compared["optim_step"] += 1
            elif op.kind in ("save_state", "save_sampler"):
                kind, segment = (("state", "weights") if op.kind == "save_state"
                                 else ("sampler", "sampler_weights"))
                client.save_checkpoint(work / op.args["name"], kind).result()
                _same_checkpoint(replay, what, run_dir / segment / op.args["name"],
                                 work / op.args["name"])
            elif op.kind == "snapshot":
                snapshot = client.sampling_snapshot().result()
            elif op.kind == "sample_checkpoint":
                sampler = LocalSamplingClient(model, str(work / op.args["name"]), model=base,
                                              tokenizer=client.get_tokenizer(), device="cpu")
                _same_sample(replay, what, op.result,
                             sampler.sample(op.args["prompt"], 2, GREEDY).result())
                sampler.close()
            elif op.kind == "sample_snapshot":
                _same_sample(replay, what, op.result,
                             snapshot.sample(op.args["prompt"], 2, GREEDY).result())
    finally:
        client.close()
    return replay


# -- the run ---------------------------------------------------------------------------------


@dataclasses.dataclass
class Report:
    """The load test's figures and verdict."""

    clients: int
    seconds: float
    logs: list[ClientLog]
    replays: list[Replay]
    listing_errors: list[str]
    server_errors: list[str]
    duplicate_request_ids: int
    sdk_request_ids: int

    @property
    def ops(self) -> list[Op]:
        return [op for log in self.logs for op in log.ops]

    @property
    def lost(self) -> int:
        return sum(op.done is None for op in self.ops)

    def unexpected_failures(self) -> list[str]:
        """Failures that are not the deliberate ones (or deliberate ones that did not fail
        as expected)."""
        found = []
        for log in self.logs:
            if log.crashed:
                found.append(f"client {log.index} crashed: {log.crashed}")
            for op in log.ops:
                if op.done is None:
                    continue
                if op.kind.startswith("failure:"):
                    error_type, pattern = EXPECTED_FAILURES[op.kind.removeprefix("failure:")]
                    if not (isinstance(op.error, error_type) and re.search(pattern,
                                                                           str(op.error))):
                        found.append(f"client {log.index} {op.kind}: got {op.error!r}")
                elif op.error is not None:
                    found.append(f"client {log.index} {op.kind}: {op.error!r}")
        return found

    @property
    def passed(self) -> bool:
        return (self.lost == 0 and self.duplicate_request_ids == 0
                and not self.unexpected_failures() and not self.listing_errors
                and not self.server_errors
                and all(not r.mismatches for r in self.replays)
                and len(self.replays) == self.clients)

    def print(self) -> None:
        ops = self.ops
        ok = [op for op in ops if op.done is not None and op.error is None]
        failed = [op for op in ops if op.error is not None]
        print(f"requests: {len(ops)} submitted, {len(ops) - self.lost} resolved, {self.lost} "
              f"lost; {self.sdk_request_ids} server request ids seen by the SDK, "
              f"{self.duplicate_request_ids} of them answering two requests")
        print(f"served: {len(ok)} succeeded, {len(failed)} failed "
              f"({len(ops) / max(self.seconds, 1e-9):.1f} requests/s over {self.seconds:.0f} s)")
        kinds = Counter((op.kind, type(op.error).__name__, _short(op.error)) for op in failed)
        if kinds:
            print("failures by kind:")
            for (kind, error, message), count in sorted(kinds.items()):
                expected = "expected" if kind.startswith("failure:") else "UNEXPECTED"
                print(f"  {count:5d}  {kind:<20} {error:<18} {expected}: {message}")
        print(f"{'latency (ms)':<26} {'n':>6} {'p50':>9} {'p99':>9} {'max':>9}")
        by_kind = defaultdict(list)
        for op in ops:
            if op.done is not None:
                by_kind[op.kind].append(1000 * (op.done - op.submitted))
        for kind, values in sorted(by_kind.items()):
            p50, p99 = np.percentile(values, [50, 99])
            print(f"  {kind:<24} {len(values):6d} {p50:9.1f} {p99:9.1f} {max(values):9.1f}")
        compared = sum((r.compared for r in self.replays), Counter())
        mismatches = [m for r in self.replays for m in r.mismatches]
        print(f"replay: {len(self.replays)} of {self.clients} clients replayed alone in process; "
              f"compared {compared['forward_backward']} forward_backward (loss and logprobs), "
              f"{compared['optim_step']} optim_step (metrics), {compared['checkpoints']} "
              f"checkpoints (LoRA and AdamW tensors): {len(mismatches)} differences"
              + (" (bitwise equal)" if not mismatches else
                 f", largest {max(r.max_difference for r in self.replays):.3g}"))
        rounded = sum(r.rounded_samples for r in self.replays)
        print(f"        {compared['samples']} samples: tokens equal, logprobs bitwise in "
              f"{compared['samples'] - rounded}, within {SAMPLE_LOGPROB_TOLERANCE:g} in {rounded}"
              + (f" (largest {max(r.max_sample_difference for r in self.replays):.3g})"
                 if rounded else ""))
        for message in mismatches[:10]:
            print("  " + message)
        listings = "; ".join(self.listing_errors) or "each key lists exactly its own run and " \
            "checkpoints"
        print(f"listings: {listings}")
        print(f"server log: {len(self.server_errors)} internal errors")
        for line in self.server_errors[:5]:
            print("  " + line)
        for line in self.unexpected_failures()[:10]:
            print("  unexpected: " + line)
        print(f"verdict: {'PASS' if self.passed else 'FAIL'}")


def _short(error: BaseException | None) -> str:
    text = re.sub(r"[0-9a-f]{8}-[0-9a-f-]{27}:train:\d+", "<model>", str(error))
    text = re.sub(r"'r\d+'|r\d+-s", "<name>", text)
    text = re.sub(r"request_id='?[0-9a-f]+'?", "", text)
    return text.splitlines()[0][:110] if text else ""


def check_listings(url: str, logs: list[ClientLog]) -> list[str]:
    """Each key's run list is its own model; its checkpoints are the names it saved."""
    errors = []
    for log in logs:
        if not log.model_id:
            continue
        rest = tinker.RestClient(base_url=url, api_key=log.key)
        runs = [r.training_run_id for r in rest.list_training_runs(limit=100).result()
                .training_runs]
        if runs != [log.model_id]:
            errors.append(f"key {log.index} lists runs {runs}")
        saved = {("weights/" if op.kind == "save_state" else "sampler_weights/")
                 + op.args["name"] for op in log.ops
                 if op.kind in ("save_state", "save_sampler") and op.error is None}
        listed = {c.checkpoint_id for c in rest.list_checkpoints(log.model_id).result()
                  .checkpoints}
        if listed != saved:
            errors.append(f"key {log.index}: listed {len(listed)} checkpoints, saved "
                          f"{len(saved)}; differ in {sorted(listed ^ saved)[:3]}")
    return errors


@contextlib.contextmanager
def tracked_request_ids():
    """Yield a list that receives the server request id of every future the SDK creates."""
    from tinker.lib import api_future_impl

    seen: list[str] = []
    original = api_future_impl._APIFuture.__init__

    def init(self, *args, **kwargs) -> None:
        original(self, *args, **kwargs)
        seen.append(self.untyped_future.request_id)

    api_future_impl._APIFuture.__init__ = init
    try:
        yield seen
    finally:
        api_future_impl._APIFuture.__init__ = original


def run(clients: int, seconds: float, work: Path, model: str | None = None) -> Report:
    """Run the load test in ``work`` (a tiny random Llama is built there unless ``model``)."""
    if model is None:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from helpers import save_tiny_llama  # the test suite's tiny model builder

        model = save_tiny_llama(work / "tiny")
    base = load_model(model)
    vocab = base.get_output_embeddings().out_features
    process, url = start_server(work / "root", work / "server.log")
    try:
        with tracked_request_ids() as request_ids:
            started: list[float] = []
            start = threading.Barrier(clients, action=lambda: started.append(time.monotonic()))
            shared: dict[int, str] = {}
            workers = [Client(i, url, model, vocab, start, seconds, shared, clients)
                       for i in range(clients)]
            threads = [threading.Thread(target=w.run, name=f"load-client-{i}")
                       for i, w in enumerate(workers)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        elapsed = time.monotonic() - started[0] if started else 0.0
        logs = [w.log for w in workers]
        listing_errors = check_listings(url, logs)
    finally:
        stop_server(process)
    server_errors = [line for line in (work / "server.log").read_text().splitlines()
                     if "unexpected error" in line or "Traceback" in line]
    replays = [replay_client(log, model, work / "root", work / f"replay-{log.index}", base)
               for log in logs if log.model_id]
    ids = Counter(request_ids)
    return Report(clients, elapsed, logs, replays, listing_errors, server_errors,
                  sum(count > 1 for count in ids.values()), len(ids))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--model", help="a model directory (default: a tiny random Llama)")
    parser.add_argument("--work", help="working directory (default: a new temporary one)")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="serve-load-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"tinkerkit serve load test: {args.clients} clients x {args.seconds:.0f} s, "
          f"{args.model or 'tiny random Llama (2 layers, width 64, vocabulary 49,152)'}, LoRA "
          f"rank {RANK}, batches of 4 x 16-64 tokens, CPU ({torch.get_num_threads()} torch "
          f"threads); work dir {work}")
    report = run(args.clients, args.seconds, work, args.model)
    report.print()
    sys.exit(0 if report.passed else 1)


if __name__ == "__main__":
    main()
