"""Load test of the OpenAI-compatible routes of ``tinkerkit serve`` with the ``openai`` client.

Starts ``tinkerkit serve`` (the CLI, in its own process, on the CPU, a free loopback port and a
fresh root; :func:`serve_load.start_server`) and runs ``--clients`` threads for ``--seconds``,
each an ``openai.OpenAI`` client with its own API key asking ``--model`` short chat questions
(greedy, ``--max-tokens`` tokens at most), every other request streamed. All requests on the
model share one sampling client, so concurrent ones are generated in the same batches.

Checks (the verdict): every request is answered (none lost: a non-streamed answer has its
choice and finish reason, a stream ends with its finish reason), none fails, and the greedy
answers to one question are the same text however the requests were batched and whether they
were streamed (up to the rare tie that batch-shape rounding can flip, counted separately).

Prints requests answered, failures, p50/p99 latency (whole answer; for streams also the first
token) and requests per second. Figures go to ``docs/PERFORMANCE.md``.

Usage::

    python benchmarks/openai_load.py                         # 8 clients x 30 s, smollm2-135m-instruct
    python benchmarks/openai_load.py --clients 2 --seconds 5 --model /path/to/hf_model
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import openai

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import start_server, stop_server  # noqa: E402  (the same server start-up)

QUESTIONS = [f"What is {a} plus {b}? Answer with the number." for a, b in
             [(3, 4), (12, 30), (7, 8), (25, 17), (9, 9), (40, 2), (11, 13), (6, 50)]]


@dataclass
class Result:
    """One request as the client saw it."""

    question: int
    streamed: bool
    seconds: float
    first_token_seconds: float | None = None
    text: str | None = None
    finish_reason: str | None = None
    error: str | None = None


@dataclass
class Report:
    results: list[Result] = field(default_factory=list)
    seconds: float = 0.0

    def print(self) -> None:
        done = [r for r in self.results if r.error is None]
        lost = [r for r in done if r.finish_reason not in ("stop", "length")]
        failed = Counter(r.error for r in self.results if r.error is not None)
        answers: dict[int, Counter] = defaultdict(Counter)
        for r in done:
            answers[r.question][r.text] += 1
        disagreeing = sum(sum(c.values()) - max(c.values()) for c in answers.values())
        print(f"requests: {len(self.results)} sent, {len(done)} answered, {len(lost)} lost "
              f"(no finish reason), {sum(failed.values())} failed "
              f"in {self.seconds:.1f} s ({len(done) / self.seconds:.2f} answered/s)")
        for reason, count in failed.most_common(5):
            print(f"  failed x{count}: {reason}")
        for streamed in (False, True):
            rows = [r for r in done if r.streamed == streamed]
            if not rows:
                continue
            latency = np.array([r.seconds for r in rows]) * 1000
            line = (f"{'streamed' if streamed else 'whole   '} x{len(rows)}: latency p50 "
                    f"{np.percentile(latency, 50):.0f} ms, p99 {np.percentile(latency, 99):.0f} ms")
            if streamed:
                first = np.array([r.first_token_seconds for r in rows
                                  if r.first_token_seconds is not None]) * 1000
                if len(first):
                    line += (f"; first token p50 {np.percentile(first, 50):.0f} ms, "
                             f"p99 {np.percentile(first, 99):.0f} ms")
            print(line)
        print(f"answers differing from their question's most common greedy answer: "
              f"{disagreeing} of {len(done)}")
        verdict = not lost and not failed and disagreeing <= len(done) // 100
        print("verdict:", "PASS" if verdict else "FAIL")


def ask(client: openai.OpenAI, model: str, question: int, streamed: bool,
        max_tokens: int) -> Result:
    """One greedy chat request, timed."""
    messages = [{"role": "user", "content": QUESTIONS[question]}]
    start = time.perf_counter()
    try:
        if not streamed:
            answer = client.chat.completions.create(model=model, messages=messages,
                                                    temperature=0, max_tokens=max_tokens)
            choice = answer.choices[0]
            return Result(question, False, time.perf_counter() - start,
                          text=choice.message.content, finish_reason=choice.finish_reason)
        first, pieces, reason = None, [], None
        for chunk in client.chat.completions.create(model=model, messages=messages,
                                                    temperature=0, max_tokens=max_tokens,
                                                    stream=True):
            if not chunk.choices:
                continue
            delta = chunk.choices[0].delta.content
            if delta:
                first = first if first is not None else time.perf_counter() - start
                pieces.append(delta)
            reason = chunk.choices[0].finish_reason or reason
        return Result(question, True, time.perf_counter() - start, first, "".join(pieces),
                      reason)
    except openai.OpenAIError as e:
        return Result(question, streamed, time.perf_counter() - start,
                      error=f"{type(e).__name__}: {str(e)[:120]}")


def run(clients: int, seconds: float, model: str, max_tokens: int, work: Path) -> Report:
    process, url = start_server(work / "root", work / "serve.log")
    report = Report()
    lock = threading.Lock()
    try:
        warm = openai.OpenAI(base_url=url + "/v1", api_key="tml-warm-up", max_retries=0)
        ask(warm, model, 0, False, 2)  # loads the model once, outside the timed window
        start = time.perf_counter()
        deadline = start + seconds

        def client_loop(index: int) -> None:
            client = openai.OpenAI(base_url=url + "/v1", api_key=f"tml-load-{index}",
                                   max_retries=0, timeout=600)
            turn = 0
            while time.perf_counter() < deadline:
                result = ask(client, model, (index + turn) % len(QUESTIONS), turn % 2 == 1,
                             max_tokens)
                with lock:
                    report.results.append(result)
                turn += 1

        threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        report.seconds = time.perf_counter() - start
    finally:
        stop_server(process)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--model", default="smollm2-135m-instruct",
                        help="a served model: registry name or model directory")
    parser.add_argument("--max-tokens", type=int, default=16, help="most tokens per answer")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tinkerkit-openai-load-") as work:
        report = run(args.clients, args.seconds, args.model, args.max_tokens, Path(work))
    print(f"{args.clients} clients x {args.seconds:.0f} s, model {args.model}, "
          f"max_tokens {args.max_tokens}")
    report.print()


if __name__ == "__main__":
    main()
