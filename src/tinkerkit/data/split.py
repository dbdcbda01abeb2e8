"""``tinkerkit split``: merge data files, split them into train and test sets, print statistics.

The split is seeded and leak-free: records with the same prompt (:attr:`Conversation.prompt_key`)
always land on the same side, so a test prompt is never seen in training. Outputs are JSON arrays
of :meth:`Conversation.to_record` (the ``messages`` format), byte-identical for the same inputs and
seed.

Example::

    result = run_split(["gsm8k/train.jsonl"], "data/", test_ratio=0.1, seed=42)
    result.train_path   # data/train_set.json
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from rich.console import Console
from rich.table import Table

from tinkerkit.data.conversation import Conversation
from tinkerkit.data.formats import LoadResult, load_conversations
from tinkerkit.data.stats import LengthStats, length_stats, stats_table
from tinkerkit.errors import ConfigError, DataError
from tinkerkit.files import atomic_write_files, json_bytes

TRAIN_FILE = "train_set.json"
TEST_FILE = "test_set.json"
SHOWN_SKIP_REASONS = 5


@dataclass
class SplitResult:
    """What :func:`run_split` wrote.

    Attributes:
        train: The training conversations, in file order.
        test: The test conversations, in file order.
        train_path: ``output_dir/train_set.json``.
        test_path: ``output_dir/test_set.json``.
        load: The loading result (per-file counts and formats, skipped records).
    """

    train: list[Conversation]
    test: list[Conversation]
    train_path: Path
    test_path: Path
    load: LoadResult


def split_conversations(conversations: list[Conversation], test_ratio: float | None,
                        test_size: int | None, seed: int,
                        inputs: Sequence[str | Path] = ()) -> tuple[list[Conversation],
                                                                    list[Conversation]]:
    """Split conversations into train and test sets without prompt leakage.

    Conversations are grouped by :attr:`Conversation.prompt_key`; the groups are shuffled with
    ``random.Random(seed)`` and given to the test set until it holds the target number of records
    (``test_size``, else ``round(test_ratio * n)`` clamped to ``[1, n - 1]``), the rest to train.
    A group is never divided, so the test set may exceed the target by less than one group; the
    last group goes to train if train would otherwise be empty. Each side is then shuffled.

    Args:
        conversations: All records, ``n`` of them.
        test_ratio: Fraction of records for the test set, in (0, 1); used if ``test_size`` is None.
        test_size: Number of records for the test set, in ``[1, n - 1]``; wins over ``test_ratio``.
        seed: Seed of the shuffles.
        inputs: The files the conversations came from, named in errors about the whole input.

    Returns:
        ``(train, test)``.

    Raises:
        ConfigError: ``test_ratio`` or ``test_size`` out of range (or both None).
        DataError: Fewer than two distinct prompts.
    """
    groups: dict[str, list[Conversation]] = {}
    for conversation in conversations:
        groups.setdefault(conversation.prompt_key, []).append(conversation)
    if len(groups) < 2:
        raise DataError(f"need at least 2 distinct prompts to split, found {len(groups)} "
                        f"among {len(conversations)} records{_of_files(inputs)}")
    target = _test_target(len(conversations), test_ratio, test_size)
    rng = random.Random(seed)
    ordered = list(groups.values())
    rng.shuffle(ordered)
    train: list[Conversation] = []
    test: list[Conversation] = []
    for i, group in enumerate(ordered):
        last = i == len(ordered) - 1
        if len(test) < target and not (last and not train):
            test.extend(group)
        else:
            train.extend(group)
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


def _of_files(inputs: Sequence[str | Path]) -> str:
    """`` of a.jsonl, b.jsonl`` for errors about the whole input; empty without files."""
    return f" of {', '.join(map(str, inputs))}" if inputs else ""


def _test_target(n: int, test_ratio: float | None, test_size: int | None) -> int:
    """The wanted number of test records out of ``n >= 2``; validates the arguments."""
    if test_size is not None:
        if isinstance(test_size, bool) or not isinstance(test_size, int) \
                or not 1 <= test_size <= n - 1:
            raise ConfigError(f"--test-size must be an integer in [1, {n - 1}] for {n} records, "
                              f"got {test_size!r}")
        return test_size
    if test_ratio is None:
        raise ConfigError("give --test-ratio or --test-size")
    if isinstance(test_ratio, bool) or not isinstance(test_ratio, (int, float)) \
            or not 0 < test_ratio < 1:
        raise ConfigError(f"--test-ratio must be in (0, 1) exclusive, got {test_ratio!r}")
    return min(max(round(test_ratio * n), 1), n - 1)


def run_split(paths: Sequence[str | Path], output_dir: str | Path, test_ratio: float | None = 0.2,
              test_size: int | None = None, seed: int = 42, format: str | None = None,
              on_error: Literal["raise", "skip"] = "raise", tokenizer: Any = None,
              console: Console | None = None) -> SplitResult:
    """Load, split and write ``train_set.json`` / ``test_set.json``, printing a report.

    Args:
        paths: Data files, merged in order (see :func:`tinkerkit.data.formats.load_conversations`).
        output_dir: Directory for the two JSON arrays (created if missing).
        test_ratio: Fraction of records for the test set, in (0, 1).
        test_size: Number of test records, in ``[1, n - 1]``; wins over ``test_ratio``.
        seed: Seed of the shuffles.
        format: Force one record format for all files; ``None`` detects it per file.
        on_error: ``"raise"`` or ``"skip"`` bad records.
        tokenizer: Optional HF tokenizer; adds token-length statistics (``len(input_ids)`` of the
            plain prompt and completion text, no chat template).
        console: Where the report goes; a default ``rich.console.Console()`` if None.

    Returns:
        The split and the paths written.

    Raises:
        ConfigError: Bad ``test_ratio``/``test_size``/``on_error``.
        DataError: Unreadable files, bad records (``on_error="raise"``), fewer than 2 prompts.
    """
    console = console or Console()
    output_dir = Path(output_dir)
    train_path, test_path = output_dir / TRAIN_FILE, output_dir / TEST_FILE
    inputs = {Path(p).resolve() for p in paths}
    for target in (train_path, test_path):
        if target.resolve() in inputs:
            raise ConfigError(f"--output-dir {output_dir}: writing {target.name} there would "
                              f"overwrite the input file {target}; choose another --output-dir")
    load = load_conversations(paths, format=format, on_error=on_error)
    train, test = split_conversations(load.conversations, test_ratio, test_size, seed, paths)
    # Both files at once: a crash never pairs a new train set with an old test set (a leak).
    atomic_write_files({train_path: json_bytes([c.to_record() for c in train]),
                        test_path: json_bytes([c.to_record() for c in test])})
    result = SplitResult(train=train, test=test, train_path=train_path, test_path=test_path,
                         load=load)
    _print_report(console, result, tokenizer)
    return result


def _print_report(console: Console, result: SplitResult, tokenizer: Any) -> None:
    load = result.load
    files = Table(title="Input files")
    for column in ("file", "format", "records"):
        files.add_column(column, justify="right" if column == "records" else "left")
    for path, count in load.counts.items():
        files.add_row(path, load.formats.get(path, "-"), f"{count:,}")
    console.print(files)
    console.print(f"skipped: {len(load.skipped):,} bad records")
    for where, reason in load.skipped[:SHOWN_SKIP_REASONS]:
        console.print(f"  {where}: {reason}", markup=False)
    repeated = len(load.conversations) - len({c.prompt_key for c in load.conversations})
    console.print(f"duplicate prompts: {repeated:,} records repeat an earlier prompt "
                  f"(kept on the same side of the split)")
    console.print(f"train: {len(result.train):,} records -> {result.train_path}", markup=False)
    console.print(f"test:  {len(result.test):,} records -> {result.test_path}", markup=False)
    texts = [_prompt_completion_text(c) for c in load.conversations]
    console.print(stats_table("Lengths (characters)", _text_stats(texts, len)))
    if tokenizer is not None:
        console.print(stats_table("Lengths (tokens, no chat template)",
                                  _text_stats(texts, _token_counter(tokenizer))))


def _prompt_completion_text(conversation: Conversation) -> tuple[str, str]:
    """Plain prompt text (turn contents joined by newlines) and final assistant reply text."""
    prompt = "\n".join(m.content for m in conversation.prompt_messages())
    last = conversation.messages[-1]
    if last.role != "assistant":
        return prompt, ""
    return prompt, "\n".join(part for part in (last.thinking, last.content) if part)


def _token_counter(tokenizer: Any) -> Callable[[str], int]:
    return lambda text: len(tokenizer(text).input_ids)


def _text_stats(texts: list[tuple[str, str]],
                measure: Callable[[str], int]) -> dict[str, LengthStats]:
    prompts = [measure(p) for p, _ in texts]
    completions = [measure(c) if c else 0 for _, c in texts]
    return {"prompt": length_stats(prompts), "completion": length_stats(completions),
            "total": length_stats([p + c for p, c in zip(prompts, completions)])}
