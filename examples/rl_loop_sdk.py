"""An RL loop written against the unmodified ``tinker`` SDK, run on ``tinkerkit serve``.

The loop is the one Tinker's documentation describes for RL with verifiable rewards, in plain SDK
calls: each iteration takes a sampler on the current weights
(``save_weights_and_get_sampling_client``), samples a group of answers per problem with their
log-probabilities, rewards each answer with tinkerkit's grader (1 for a correct final answer,
0.1 for a wrong one that still states a final answer, 0 otherwise), takes advantage = reward
minus the group's mean, and trains on the groups whose rewards differ with
``forward_backward(..., "importance_sampling")`` and ``optim_step``. Problems are tinkerkit's
generated demo arithmetic (:func:`tinkerkit.data.demo.generate_demo_problems`).

Without ``--base-url`` a ``tinkerkit serve`` starts in this process on a loopback port (CPU); with
it, the loop runs against that server (or the hosted Tinker service, given
``TINKER_API_KEY``). Each iteration prints one JSON line: reward mean, accuracy, groups with
signal, mean answer length, ``logprob_gap`` (``mean(sampler_logprob - learner_logprob)`` over
the trained answer tokens: the plain estimate of KL(sampler || learner), unbiased but of either
sign; ``tinkerkit rl`` logs the never-negative k3 estimate as ``kl_sampler_learner``, so the two
are not the same number), and the seconds of the iteration and of
``save_weights_and_get_sampling_client``.

Run::

    .venv/bin/python examples/rl_loop_sdk.py                          # smollm2-135m-instruct
    .venv/bin/python examples/rl_loop_sdk.py --iterations 20 --base-url http://127.0.0.1:8000
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import tinker
from tinker import types

from tinkerkit.data.demo import generate_demo_problems
from tinkerkit.grading import grade
from tinkerkit.models import load_tokenizer

INSTRUCTION = "Solve the problem. End your answer with 'The answer is N.'"


@contextlib.contextmanager
def local_server() -> Iterator[str]:
    """A ``tinkerkit serve`` in a thread on a free loopback port; yields its URL."""
    from tinkerkit.serve import make_server

    with tempfile.TemporaryDirectory() as root:
        server = make_server("127.0.0.1", 0, root=Path(root))
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{server.server_port}"
        finally:
            server.shutdown()


def reward(text: str, reference: str) -> tuple[float, bool]:
    """1 for a correct final answer, 0.1 for a wrong one that states one, else 0; and whether
    the answer is correct (tinkerkit's grader, the rules of ``tinkerkit eval``)."""
    verdict = grade(text, reference)
    if verdict.equivalent:
        return 1.0, True
    return (0.0 if verdict.no_answer else 0.1), False


def rl_datum(prompt: list[int], sequence: types.SampledSequence,
             advantage: float) -> types.Datum:
    """Prompt + answer as one datum: targets shifted by one, the sampler's log-probabilities and
    the advantage on the answer's tokens, 0 on the prompt's."""
    tokens = prompt + list(sequence.tokens)
    n_prompt = len(prompt) - 1
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": tokens[1:],
            "logprobs": [0.0] * n_prompt + list(sequence.logprobs),
            "advantages": [0.0] * n_prompt + [advantage] * len(sequence.tokens)})


def train(base_url: str, args: argparse.Namespace) -> list[dict]:
    """Run the loop; returns the per-iteration records it printed."""
    tokenizer = load_tokenizer(args.model)
    problems = generate_demo_problems(args.iterations * args.problems, seed=args.seed)
    params = types.SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                                  stop=[tokenizer.eos_token_id])
    records = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        service = tinker.ServiceClient(base_url=base_url,
                                       api_key=os.environ.get("TINKER_API_KEY", "tml-local"))
        training = service.create_lora_training_client(args.model, rank=args.rank).result()
        for iteration in range(args.iterations):
            start = time.perf_counter()
            sampler = training.save_weights_and_get_sampling_client().result()
            snapshot_seconds = time.perf_counter() - start
            batch = problems[iteration * args.problems:(iteration + 1) * args.problems]
            prompts = [tokenizer.encode(tokenizer.apply_chat_template(
                [{"role": "user", "content": f"{INSTRUCTION}\n\n{p['question']}"}],
                add_generation_prompt=True, tokenize=False), add_special_tokens=False)
                for p in batch]
            futures = [sampler.sample(types.ModelInput.from_ints(prompt), args.group, params)
                       for prompt in prompts]
            data, rewards, correct, lengths, with_signal = [], [], [], [], 0
            for prompt, problem, future in zip(prompts, batch, futures):
                sequences = future.result().sequences
                reference = problem["answer"].rsplit("####", 1)[1].strip()
                scored = [reward(tokenizer.decode(s.tokens, skip_special_tokens=True), reference)
                          for s in sequences]
                group = [r for r, _ in scored]
                rewards += group
                correct += [ok for _, ok in scored]
                lengths += [len(s.tokens) for s in sequences]
                if max(group) == min(group):
                    continue  # equal rewards: no advantage, nothing to learn
                with_signal += 1
                mean = statistics.fmean(group)
                data += [rl_datum(prompt, s, r - mean) for s, r in zip(sequences, group)]
            gap = None
            if data:
                fwd_bwd = training.forward_backward(data, "importance_sampling")
                optim = training.optim_step(types.AdamParams(learning_rate=args.learning_rate))
                outputs = fwd_bwd.result().loss_fn_outputs
                optim.result()
                gaps = [q - p for d, out in zip(data, outputs)
                        for q, p, a in zip(d.loss_fn_inputs["logprobs"].tolist(),
                                           out["logprobs"].tolist(),
                                           d.loss_fn_inputs["advantages"].tolist()) if a != 0]
                gap = statistics.fmean(gaps) if gaps else None
            record = {"iteration": iteration + 1, "reward_mean": statistics.fmean(rewards),
                      "accuracy": statistics.fmean(correct), "groups_with_signal": with_signal,
                      "groups": len(batch), "mean_answer_tokens": statistics.fmean(lengths),
                      "logprob_gap": gap,
                      "seconds": round(time.perf_counter() - start, 3),
                      "sampler_seconds": round(snapshot_seconds, 3)}
            print(json.dumps(record), flush=True)
            records.append(record)
    return records


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", help="a running server; default: start tinkerkit serve")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--problems", type=int, default=4, help="problems per iteration")
    parser.add_argument("--group", type=int, default=4, help="answers sampled per problem")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--learning-rate", type=float, default=4e-5)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.base_url:
        return train(args.base_url, args)
    with local_server() as url:
        return train(url, args)


if __name__ == "__main__":
    main()
