"""tinkerkit's own demo data: small arithmetic word problems with short worked solutions.

The records are GSM8K-shaped (``{"question", "answer"}`` with a final ``#### N`` line, loaded by the
``question_answer`` format) so the demo exercises the same path as real data. Solutions are one to
three short steps (well under 60 tokens) with integer answers, so a 135M model learns the format
in a few CPU steps. Everything here is generated; no third-party data.

Example::

    write_demo_data("data/demo.jsonl", n=200, seed=0)
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from pathlib import Path

from tinkerkit.errors import ConfigError
from tinkerkit.files import atomic_write_text

NAMES = ("Ava", "Ben", "Chloe", "Dan", "Ella", "Finn", "Grace", "Hugo", "Iris", "Jack", "Lena",
         "Max", "Nora", "Omar", "Priya", "Sam")
ITEMS = ("notebooks", "pencils", "apples", "stickers", "cupcakes", "marbles", "books", "tickets")

Problem = tuple[str, list[str], int]  # question, worked steps, final answer


def _shopping(rng: random.Random) -> Problem:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    count, price, extra = rng.randint(2, 9), rng.randint(2, 12), rng.randint(1, 10)
    cost = count * price
    question = (f"{name} buys {count} {item} at ${price} each and a bag for ${extra}. "
                f"How many dollars does {name} spend?")
    return question, [f"The {item} cost {count} * {price} = {cost}.",
                      f"With the bag: {cost} + {extra} = {cost + extra}."], cost + extra


def _change(rng: random.Random) -> Problem:
    name = rng.choice(NAMES)
    pens, pen_price, books, book_price = (rng.randint(2, 5), rng.randint(1, 4), rng.randint(1, 4),
                                          rng.randint(3, 9))
    cost_pens, cost_books = pens * pen_price, books * book_price
    paid = (cost_pens + cost_books) // 10 * 10 + 10
    change = paid - cost_pens - cost_books
    question = (f"{name} buys {pens} pens at ${pen_price} each and {books} notebooks at "
                f"${book_price} each, and pays with ${paid}. How many dollars of change does "
                f"{name} get?")
    return question, [f"Pens: {pens} * {pen_price} = {cost_pens}.",
                      f"Notebooks: {books} * {book_price} = {cost_books}.",
                      f"Change: {paid} - {cost_pens} - {cost_books} = {change}."], change


def _sharing(rng: random.Random) -> Problem:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    friends, each = rng.randint(2, 8), rng.randint(2, 12)
    total = friends * each
    question = (f"{name} has {total} {item} and shares them equally among {friends} friends. "
                f"How many {item} does each friend get?")
    return question, [f"Each friend gets {total} / {friends} = {each}."], each


def _speed(rng: random.Random) -> Problem:
    speed, hours = rng.choice((30, 40, 45, 50, 60, 70, 80)), rng.randint(2, 6)
    vehicle = rng.choice(("train", "bus", "car"))
    question = (f"A {vehicle} travels at {speed} km per hour for {hours} hours. "
                f"How many km does it travel?")
    return question, [f"Distance is speed times time: {speed} * {hours} = {speed * hours}."], \
        speed * hours


def _ages(rng: random.Random) -> Problem:
    name, other = rng.sample(NAMES, 2)
    age, gap, years = rng.randint(4, 15), rng.randint(2, 9), rng.randint(2, 10)
    question = (f"{name} is {age} years old. {other} is {gap} years older than {name}. "
                f"How old will {other} be in {years} years?")
    return question, [f"{other} is {age} + {gap} = {age + gap} now.",
                      f"In {years} years: {age + gap} + {years} = {age + gap + years}."], \
        age + gap + years


def _savings(rng: random.Random) -> Problem:
    name = rng.choice(NAMES)
    weekly, weeks = rng.randint(3, 15), rng.randint(2, 8)
    saved = weekly * weeks
    spent = rng.randint(1, saved - 1)
    question = (f"{name} saves ${weekly} every week for {weeks} weeks, then spends ${spent}. "
                f"How many dollars are left?")
    return question, [f"Saved: {weekly} * {weeks} = {saved}.",
                      f"Left: {saved} - {spent} = {saved - spent}."], saved - spent


def _leftovers(rng: random.Random) -> Problem:
    item = rng.choice(("cookies", "muffins", "rolls", "pies"))
    made = rng.randint(30, 90)
    sold = rng.randint(5, made // 2)
    given = rng.randint(1, made - sold - 1)
    left = made - sold - given
    question = (f"A baker makes {made} {item}, sells {sold} and gives away {given}. "
                f"How many {item} are left?")
    return question, [f"After selling: {made} - {sold} = {made - sold}.",
                      f"After giving away: {made - sold} - {given} = {left}."], left


def _perimeter(rng: random.Random) -> Problem:
    length, width = rng.randint(3, 20), rng.randint(2, 15)
    question = (f"A garden is {length} meters long and {width} meters wide. "
                f"What is its perimeter in meters?")
    return question, [f"Perimeter: 2 * ({length} + {width}) = {2 * (length + width)}."], \
        2 * (length + width)


def _reading(rng: random.Random) -> Problem:
    name = rng.choice(NAMES)
    per_day, days = rng.randint(5, 25), rng.randint(3, 12)
    done = rng.randint(2, days - 1)
    pages = per_day * days
    question = (f"{name} reads {per_day} pages a day. The book has {pages} pages and "
                f"{name} has read for {done} days. How many more days until {name} finishes?")
    return question, [f"Days for the book: {pages} / {per_day} = {days}.",
                      f"Days left: {days} - {done} = {days - done}."], days - done


TEMPLATES: tuple[Callable[[random.Random], Problem], ...] = (
    _shopping, _change, _sharing, _speed, _ages, _savings, _leftovers, _perimeter, _reading)


def generate_demo_problems(n: int, seed: int) -> list[dict]:
    """``n`` arithmetic word problems as GSM8K-shaped records, deterministic for a seed.

    Args:
        n: Number of records (at least 1).
        seed: Seed of ``random.Random``; the same seed gives the same records.

    Returns:
        Records ``{"question": str, "answer": "step\\nstep\\n#### N"}`` with integer ``N``, drawn
        from :data:`TEMPLATES` (shopping, change, sharing, speed, ages, savings, leftovers,
        perimeter, reading; 1-3 steps each).

    Raises:
        ConfigError: ``n < 1``.
    """
    return [{"question": question, "answer": "\n".join(steps) + f"\n#### {answer}"}
            for (question, steps, answer), _ in _draw(n, seed)]


def _draw(n: int, seed: int) -> Iterator[tuple[Problem, random.Random]]:
    """``n`` problems from :data:`TEMPLATES`, each with the generator (to draw more from)."""
    if n < 1:
        raise ConfigError(f"the number of demo problems must be at least 1, got {n}")
    rng = random.Random(seed)
    for _ in range(n):
        yield rng.choice(TEMPLATES)(rng), rng


def write_demo_data(path: str | Path, n: int, seed: int) -> Path:
    """Write :func:`generate_demo_problems` as JSON Lines to ``path``, atomically.

    Returns:
        The path written.

    Raises:
        ConfigError: ``n < 1``.
    """
    return _write_jsonl(path, generate_demo_problems(n, seed))


def _write_jsonl(path: str | Path, records: list[dict]) -> Path:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return Path(path)


def generate_long_reasoning_records(n: int, seed: int, min_chars: int) -> list[dict]:
    """``n`` long reasoning conversations (chat ``messages`` with ``thinking``), for long-text runs.

    Each record asks one arithmetic word problem; the assistant's ``thinking`` solves it and then
    checks the method on further generated problems until it is at least ``min_chars`` characters
    long (about 2.7 characters per Qwen token, 2.5 per SmolLM2 token); its ``content`` is the
    worked answer ending in ``#### N``. Deterministic for a seed; generated, no third-party data.

    Args:
        n: Number of records (at least 1).
        seed: Seed of ``random.Random``.
        min_chars: Least length of each ``thinking`` text, in characters.

    Returns:
        Records ``{"messages": [{"role": "user", ...}, {"role": "assistant", "content": ...,
        "thinking": ...}], "reference_answer": "N"}``.

    Raises:
        ConfigError: ``n < 1``.
    """
    records = []
    for (question, steps, answer), rng in _draw(n, seed):
        thinking = [f"Let me solve this step by step.\n{' '.join(steps)}\nSo the answer should "
                    f"be {answer}. Let me check the method on similar problems."]
        size = len(thinking[0])
        while size < min_chars:
            other, other_steps, other_answer = rng.choice(TEMPLATES)(rng)
            part = f"\nProblem: {other}\n" + "\n".join(other_steps) + f"\nAnswer: {other_answer}."
            thinking.append(part)
            size += len(part)
        thinking.append(f"\nThe method holds, so the answer to the question is {answer}.")
        records.append({"messages": [
            {"role": "user", "content": question},
            {"role": "assistant", "thinking": "".join(thinking),
             "content": "\n".join(steps) + f"\n#### {answer}"}],
            "reference_answer": str(answer)})
    return records


def write_long_demo_data(path: str | Path, n: int, seed: int, min_chars: int) -> Path:
    """Write :func:`generate_long_reasoning_records` as JSON Lines to ``path``, atomically.

    Example::

        write_long_demo_data("data/long.jsonl", n=8, seed=0, min_chars=43000)  # ~16,200 Qwen tokens

    Returns:
        The path written.
    """
    return _write_jsonl(path, generate_long_reasoning_records(n, seed, min_chars))
