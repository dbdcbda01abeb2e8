"""Accuracy on a generated multiple-choice set: the built-in grader vs ``multiple_choice_grader.py``.

Writes 20 four-option arithmetic questions (reference: the letter) to a temporary directory as
JSON Lines, and evaluates them twice with :func:`tinkerkit.evaluate.evaluate`: with the built-in
grader and with ``examples/multiple_choice_grader.py`` as ``GRADER``. By default the "model" is
canned: answers in the formats models use ("(C)", "C)", "The answer is C", ``\\text{(C)}``,
"**C**", lowercase, "Answer: C", ...), 16 of the 20 naming the right letter, so the true
accuracy is 0.80. With ``--model NAME`` a real model answers instead (sampled through
``tinkerkit eval``'s :func:`~tinkerkit.evaluate.run_evaluation`; slow on a CPU).

Run::

    .venv/bin/python examples/multiple_choice_eval.py            # canned answers, seconds
    .venv/bin/python examples/multiple_choice_eval.py --model smollm2-135m-instruct
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import tinker
from rich.console import Console
from rich.table import Table

from tinkerkit.config import load_config
from tinkerkit.data.formats import load_conversations
from tinkerkit.evaluate import EvalSettings, evaluate, run_evaluation
from tinkerkit.grader import Grader
from tinkerkit.models import load_tokenizer
from tinkerkit.render import Renderer

GRADER_FILE = Path(__file__).resolve().parent / "multiple_choice_grader.py"
LETTERS = "ABCD"
# How the canned model writes its choice; {L} the letter, {l} in lower case, {v} the option's value.
FORMATS = [
    "The answer is {L}.",
    "({L})",
    "{L})",
    r"So the result is $\boxed{{\text{{({L})}}}}$.",
    "**{L}**",
    "the answer is ({l}).",
    "Answer: {L}",
    "{L}) {v}, since the sum works out.",
    r"\boxed{{{L}}}",
    "The answer is {L} because {v} is the value.",
    "{l}",
    "**Answer:** ({L}) {v}",
    "I compute {v}, which is option ({L}).",
    "Final answer: {L}",
    "The correct option is {L}.",
    "{L}. {v}",
    "After checking each option, I choose {L}",
    "Option {L} is right: {v}.",
    r"The answer is $\text{{({L})}}$",
    "The answer is {L}",
]
WRONG = {8, 13, 15, 19}  # the canned model names a wrong letter on these questions


def write_questions(path: Path, n: int = 20, seed: int = 0) -> list[dict]:
    """Write ``n`` multiple-choice sums to ``path`` (messages records with a reference letter)."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        a, b = rng.randint(10, 60), rng.randint(10, 60)
        options = rng.sample([a + b + d for d in range(-6, 7) if d], 3) + [a + b]
        rng.shuffle(options)
        letter = LETTERS[options.index(a + b)]
        listing = "\n".join(f"({L}) {v}" for L, v in zip(LETTERS, options))
        records.append({"messages": [
            {"role": "user", "content": f"What is {a} + {b}?\n{listing}\n"
                                        "Answer with the letter of the correct option."},
            {"role": "assistant", "content": f"{a} + {b} = {a + b}. The answer is ({letter})."}],
            "reference_answer": letter, "options": options})
    path.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "options"}) + "\n"
                            for r in records), encoding="utf-8")
    return records


def canned_answers(records: list[dict]) -> list[str]:
    """One answer per question in the varied formats, wrong on the questions in :data:`WRONG`."""
    answers = []
    for i, record in enumerate(records):
        letter = record["reference_answer"]
        if i in WRONG:
            letter = LETTERS[(LETTERS.index(letter) + 1) % len(LETTERS)]
        value = record["options"][LETTERS.index(letter)]
        answers.append(FORMATS[i % len(FORMATS)].format(L=letter, l=letter.lower(), v=value))
    return answers


class CannedSampler:
    """A sampling client whose i-th request is answered with the i-th canned text."""

    def __init__(self, tokenizer, answers: list[str]):
        self.tokenizer, self.answers, self.calls = tokenizer, answers, 0

    def sample(self, prompt, num_samples, sampling_params):
        tokens = self.tokenizer.encode(self.answers[self.calls], add_special_tokens=False)
        self.calls += 1
        future: Future = Future()
        future.set_result(tinker.types.SampleResponse(sequences=[tinker.types.SampledSequence(
            stop_reason="stop", sequence_id=str(self.calls),
            tokens_np=np.array(tokens + [self.tokenizer.eos_token_id], dtype=np.int32))]))
        return future


def evaluate_canned(data: Path, records: list[dict]) -> dict:
    """``{grader name: EvalResult}`` of the canned answers under both graders."""
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    conversations = load_conversations([data]).conversations
    renderer = Renderer(tokenizer)
    results = {}
    for name, grader in (("built-in", Grader()), (GRADER_FILE.name, Grader(GRADER_FILE))):
        with grader:
            results[name] = evaluate(conversations, CannedSampler(tokenizer, canned_answers(records)),
                                     renderer.build_prompt, tokenizer, EvalSettings(),
                                     progress=False, grader=grader)
    return results


def evaluate_model(data: Path, model: str, directory: Path) -> dict:
    """``{grader name: EvalResult}`` of ``model``'s greedy answers under both graders."""
    results = {}
    for name, grader in (("built-in", None), (GRADER_FILE.name, str(GRADER_FILE))):
        config = load_config(None, [f"BASE_MODEL={model}", "MAX_TOKENS=64"], grader=grader)
        results[name] = run_evaluation(config, [str(data)], output=directory / f"{name}.json",
                                       console=Console(quiet=True))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="sample this model instead of the canned answers")
    args = parser.parse_args()
    console = Console()
    with tempfile.TemporaryDirectory() as directory:
        data = Path(directory) / "multiple_choice.jsonl"
        records = write_questions(data)
        if args.model:
            results = evaluate_model(data, args.model, Path(directory))
        else:
            results = evaluate_canned(data, records)
    names = list(results)
    table = Table(title=f"{len(records)} multiple-choice questions, "
                        f"{'model ' + args.model if args.model else 'canned answers (true accuracy 0.80)'}")
    table.add_column("metric")
    for name in names:
        table.add_column(name, justify="right")
    for metric in ("accuracy_exact_match", "accuracy_contains", "accuracy_equivalent",
                   "no_answer", "grading_errors"):
        table.add_row(metric, *(f"{results[n].metrics[metric]:.2f}" if "accuracy" in metric
                                else str(results[n].metrics[metric]) for n in names))
    console.print(table)
    verdicts = Table(title="Per answer: extracted (equivalent?)")
    verdicts.add_column("reference")
    verdicts.add_column("output")
    for name in names:
        verdicts.add_column(name)
    for i, record in enumerate(records):
        outputs = [results[n].examples[i]["outputs"][0] for n in names]
        verdicts.add_row(record["reference_answer"], outputs[0]["text"][:60].replace("\n", " "),
                         *(f"{o['extracted']} ({'yes' if o['equivalent'] else 'no'})"
                           for o in outputs))
    console.print(verdicts)


if __name__ == "__main__":
    main()
