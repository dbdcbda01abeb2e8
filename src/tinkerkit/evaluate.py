"""Evaluation: sample answers for held-out conversations, grade them, write and compare results.

The flow (``tinkerkit evaluate`` wires it to a config, a checkpoint and a data file)::

    result = evaluate(conversations, sampling_client, build_prompt, tokenizer, EvalSettings())
    write_results(result, run_dir / "evaluation_results.json", config=public_config)
    write_report(result, run_dir / "evaluation_report.md")
    compare_results(load_results(before_path), load_results(after_path), Console())

Every prompt is submitted before any result is awaited, so a sampling client that batches pending
requests (the local engine's, or Tinker's) sees them all at once. Outputs are graded by a
:class:`~tinkerkit.grader.Grader`: :mod:`tinkerkit.grading`'s three criteria (exact match,
contains, mathematical equivalence), any of whose functions a ``GRADER`` file may replace, plus
its ``score`` when it defines one; with several samples per prompt, pass@k is reported for the
equivalence criterion.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import tinker
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from tinkerkit.checkpoint import resolve_checkpoint
from tinkerkit.config import TrainConfig
from tinkerkit.data.conversation import Conversation
from tinkerkit.data.formats import load_conversations
from tinkerkit.engines import check_engine, create_sampling_client
from tinkerkit.errors import ConfigError, DataError, EngineError, plural
from tinkerkit.files import atomic_write_json, atomic_write_text
from tinkerkit.grader import Grader, GraderConfig, grading_example
from tinkerkit.grading import Grade
from tinkerkit.models import max_positions
from tinkerkit.render import Renderer, end_of_turn_ids
from tinkerkit.sampling_rules import sampling_problems

__all__ = [
    "CRITERIA",
    "EvalResult",
    "EvalSettings",
    "compare_results",
    "evaluate",
    "grade_sequence",
    "load_results",
    "pass_at_k",
    "print_summary",
    "run_evaluation",
    "settings_from_config",
    "write_report",
    "write_results",
]

CRITERIA = ("exact_match", "contains", "equivalent")
RESULTS_FORMAT_VERSION = 1


def _config_default(name: str) -> Any:
    """The default of :class:`~tinkerkit.config.TrainConfig` field ``name``."""
    return TrainConfig.model_fields[name].default


@dataclass
class EvalSettings:
    """How to sample during evaluation (the CLI fills it from the config's evaluation section).

    The defaults of the fields the config also has (all but ``num_samples`` and ``seed``) are
    :class:`~tinkerkit.config.TrainConfig`'s.

    Attributes:
        max_tokens: Most tokens generated per sample; a sample that reaches it is counted as
            truncated (stop reason ``"length"``).
        temperature: Sampling temperature; 0 is greedy.
        top_p: Nucleus sampling probability mass; 1 disables it.
        top_k: Sample among the k most likely tokens; -1 disables it.
        stop: Stop strings; None keeps the model's end-of-sequence tokens, ``[]`` disables even
            those (tinker's ``SamplingParams.stop`` semantics).
        num_samples: Samples per prompt (K); K > 1 adds pass@k metrics.
        seed: Base seed; prompt i is sampled with seed ``seed + i``, so results do not depend on
            batching or order.
        limit: Evaluate only the first ``limit`` conversations; None for all.
    """

    max_tokens: int = _config_default("max_tokens")
    temperature: float = _config_default("temperature")
    top_p: float = _config_default("top_p")
    top_k: int = _config_default("top_k")
    stop: list[str] | None = _config_default("stop")
    num_samples: int = 1
    seed: int = 0
    limit: int | None = _config_default("eval_limit")

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming every field with an impossible value.

        The sampling settings follow :func:`tinkerkit.sampling_rules.sampling_problems`;
        ``num_samples`` must be at least 1 and ``limit`` None or at least 1.
        """
        problems = sampling_problems(self.temperature, self.top_p, self.top_k, self.max_tokens)
        if self.num_samples < 1:
            problems.append(f"num_samples = {self.num_samples!r}: must be at least 1")
        if self.limit is not None and self.limit < 1:
            problems.append(f"limit = {self.limit!r}: must be None or at least 1")
        if problems:
            raise ConfigError(f"evaluation settings: {'; '.join(problems)}")


@dataclass
class EvalResult:
    """The outcome of :func:`evaluate`.

    Attributes:
        metrics: Flat ``{name: number or None}``; see :func:`evaluate` for the names.
        examples: One dict per evaluated conversation (see :func:`evaluate`).
        settings: The settings used.
        warnings: What a reader of the metrics must know (shown with them and in the report).
        grader: The grader that graded the outputs (:meth:`tinkerkit.grader.Grader.describe`:
            its file, SHA-256 and the functions it defines; ``file`` None for the built-ins).
    """

    metrics: dict
    examples: list[dict]
    settings: EvalSettings
    warnings: list[str] = field(default_factory=list)
    grader: dict = field(default_factory=lambda: Grader().describe())


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k estimator: the chance that k of n samples include a correct one.

    ``1 - C(n - c, k) / C(n, k)`` (Chen et al. 2021, "Evaluating Large Language Models Trained on
    Code", arXiv 2107.03374, eq. 1), computed as the product ``1 - prod_{i=n-c+1}^{n} (1 - k/i)``,
    which avoids the huge binomials.

    Args:
        n: Samples drawn for the problem.
        c: How many of them are correct.
        k: The k of pass@k.

    Returns:
        A probability in [0, 1].

    Raises:
        ConfigError: unless ``0 <= c <= n`` and ``1 <= k <= n``.
    """
    if not (0 <= c <= n and 1 <= k <= n):
        raise ConfigError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def _pass_at_k_values(num_samples: int) -> list[int]:
    """The k values reported for K samples: 1, the powers of 2 below K, and K."""
    return sorted({num_samples} | {2**j for j in range(num_samples.bit_length())})


def _sampling_params(settings: EvalSettings, index: int) -> tinker.types.SamplingParams:
    return tinker.types.SamplingParams(
        max_tokens=settings.max_tokens, temperature=settings.temperature, top_p=settings.top_p,
        top_k=settings.top_k, stop=settings.stop, seed=settings.seed + index)


def _progress(console: Console, enabled: bool) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console, disable=not enabled)


def _sample_all(sampling_client, prompts: list, sources: list, settings: EvalSettings,
                console: Console, progress: bool) -> list:
    """Submit every request, then await the responses in order.

    Raises:
        EngineError: The client refused a request (say, a prompt longer than the model's
            positions), naming the example (index from 0, and its source).
    """
    futures = []
    for i, (prompt, source) in enumerate(zip(prompts, sources)):
        try:
            futures.append(sampling_client.sample(
                prompt=prompt, num_samples=settings.num_samples,
                sampling_params=_sampling_params(settings, i)))
        except EngineError as e:
            raise EngineError(f"example {i} ({source}): {e}") from e
    responses = []
    with _progress(console, progress) as bar:
        task = bar.add_task("Sampling", total=len(futures))
        for future in futures:
            responses.append(future.result())
            bar.advance(task)
    return responses


def grade_sequence(sequence: tinker.types.SampledSequence, reference: str | None,
                   example: dict | None, tokenizer, grader: Grader
                   ) -> tuple[list[int], str, Grade]:
    """Decode one sampled sequence (without special tokens) and grade it, as ``tinkerkit eval``
    does (also the reward of ``tinkerkit rl``).

    Args:
        sequence: The sampled sequence.
        reference: The reference answer (None: extraction only).
        example: What a grader file's ``score(output, example)`` receives, or None.
        tokenizer: Decodes the tokens.
        grader: Grades the text.

    Returns:
        The sequence's tokens, its text and the :class:`~tinkerkit.grading.Grade`.
    """
    tokens = list(sequence.tokens)
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    return tokens, text, grader.grade(text, reference, example)


def _grade_example(index: int, conversation: Conversation, prompt_text: str, response,
                   tokenizer, num_samples: int, grader: Grader) -> dict:
    """The per-example record: prompt, reference, each output with its verdicts."""
    if len(response.sequences) != num_samples:
        raise EngineError(f"the sampling client returned {len(response.sequences)} sequences for "
                          f"example {index}, {num_samples} were requested")
    reference = conversation.reference_answer
    example = grading_example(conversation) if grader.scores else None
    outputs = []
    for sequence in response.sequences:
        tokens, text, verdict = grade_sequence(sequence, reference, example, tokenizer, grader)
        outputs.append({
            "text": text, "num_tokens": len(tokens), "stop_reason": sequence.stop_reason,
            "extracted": verdict.extracted, "exact_match": verdict.exact_match,
            "contains": verdict.contains, "equivalent": verdict.equivalent,
            "timed_out": verdict.timed_out, "grading_error": verdict.error,
            **({"score": verdict.score} if grader.scores else {}),
        })
    num_correct = None if reference is None else sum(o["equivalent"] for o in outputs)
    return {"index": index, "source": conversation.source, "prompt": prompt_text,
            "question": conversation.prompt_messages()[-1].content, "reference": reference,
            "num_correct": num_correct, "outputs": outputs}


def _metrics(examples: list[dict], num_samples: int, wall_seconds: float,
             grading_seconds: float) -> dict:
    """The flat metrics dict of :func:`evaluate` (accuracies are None without graded examples)."""
    outputs = [o for e in examples for o in e["outputs"]]
    graded = [e for e in examples if e["reference"] is not None]
    graded_outputs = [o for e in graded for o in e["outputs"]]
    generated = sum(o["num_tokens"] for o in outputs)
    metrics: dict[str, Any] = {
        "num_examples": len(examples),
        "num_graded": len(graded),
        "num_without_reference": len(examples) - len(graded),
        "num_samples": num_samples,
    }
    for criterion in CRITERIA:
        hits = sum(bool(o[criterion]) for o in graded_outputs)
        metrics[f"accuracy_{criterion}"] = hits / len(graded_outputs) if graded_outputs else None
    if any("score" in o for o in outputs):  # the grader file's score; an error scores 0
        total = sum(o.get("score") or 0.0 for o in graded_outputs)
        metrics["mean_score"] = total / len(graded_outputs) if graded_outputs else None
    if num_samples > 1:
        for k in _pass_at_k_values(num_samples):
            values = [pass_at_k(num_samples, e["num_correct"], k) for e in graded]
            metrics[f"pass@{k}"] = sum(values) / len(values) if values else None
    metrics.update({
        "no_answer": sum(o["extracted"] is None and not o.get("grading_error") for o in outputs),
        "truncated": sum(o["stop_reason"] == "length" for o in outputs),
        "equivalence_timeouts": sum(o["timed_out"] for o in outputs),
        "grading_errors": sum(bool(o.get("grading_error")) for o in outputs),
        "mean_output_tokens": generated / len(outputs) if outputs else None,
        "generated_tokens": generated,
        "wall_seconds": wall_seconds,
        "tokens_per_second": generated / wall_seconds if wall_seconds > 0 else None,
        "grading_seconds": grading_seconds,
    })
    return metrics


def evaluate(conversations: Sequence[Conversation], sampling_client,
             build_prompt: Callable[[Conversation], tinker.types.ModelInput], tokenizer,
             settings: EvalSettings, progress: bool = True,
             console: Console | None = None, grader: Grader | None = None,
             max_prompt_tokens: int | None = None) -> EvalResult:
    """Sample answers for ``conversations`` and grade them against their reference answers.

    Every request is submitted first (``sampling_client.sample`` returns futures), then the
    responses are awaited in order and graded by ``grader`` (:meth:`Grader.grade`: the built-in
    :func:`tinkerkit.grading.grade`, or a ``GRADER`` file's functions). Conversations without a
    reference answer are sampled and reported but excluded from accuracy and pass@k.

    Metrics (flat dict): ``num_examples``, ``num_graded``, ``num_without_reference``,
    ``num_samples``; ``accuracy_exact_match``, ``accuracy_contains``, ``accuracy_equivalent``
    (fraction of graded outputs; with K samples this equals pass@1); ``mean_score`` (the mean of
    the grader file's ``score`` over graded outputs; only when it defines one); with K > 1
    ``pass@k`` for k in 1, the powers of 2 below K, and K (equivalence criterion, unbiased
    estimator averaged over examples); ``no_answer`` and ``truncated`` (outputs without an
    extractable answer / stopped by ``max_tokens``), ``equivalence_timeouts``,
    ``grading_errors`` (outputs the grader file failed on: an exception, a wrong return type or
    a timeout; they count as wrong in every accuracy and as 0 in ``mean_score``);
    ``mean_output_tokens``, ``generated_tokens``;
    ``wall_seconds`` (submission of the first request to the last response), ``tokens_per_second``
    (generated tokens / wall_seconds) and ``grading_seconds``.

    Each example dict holds ``index``, ``source``, ``prompt`` (the prompt tokens decoded with
    special tokens: exactly what the model saw), ``question`` (the last prompt message's text),
    ``reference``, ``num_correct`` (outputs judged
    equivalent; None without a reference) and ``outputs``: per sample ``text`` (decoded without
    special tokens), ``num_tokens``, ``stop_reason``, ``extracted``, the verdicts
    ``exact_match``, ``contains``, ``equivalent`` and ``timed_out``, ``grading_error`` (the
    message, or None) and, when the grader file defines it, ``score``.

    Args:
        conversations: The evaluation set; each conversation's prompt messages are sent.
        sampling_client: Anything with tinker's ``sample(prompt=, num_samples=, sampling_params=)``
            returning a future whose ``.result()`` is a ``tinker.types.SampleResponse``.
        build_prompt: Conversation -> ``ModelInput``; must be the training renderer's generation
            prompt, so that the model sees the format it was trained on.
        tokenizer: Decodes token ids (``decode(ids, skip_special_tokens=...)``).
        settings: Sampling settings; validated first.
        progress: Show a progress bar and print the summary table; False is silent.
        console: Where to print; a new ``rich.console.Console()`` by default.
        grader: Grades each output; None: the built-in grader. The caller closes it.
        max_prompt_tokens: Longest prompt the model can sample from (its positions less one);
            a longer one is skipped, not sent, and counted in ``skipped_too_long`` and a
            warning. None sends every prompt.

    Returns:
        The :class:`EvalResult`.

    Raises:
        ConfigError: an invalid setting.
        EngineError: the client refused a request (naming the example) or returned a different
            number of sequences than requested.
    """
    settings.validate()
    console = console or Console()
    grader = grader or Grader()
    selected = list(conversations)[:settings.limit]
    prompts = [build_prompt(c) for c in selected]
    too_long = [c.source for c, p in zip(selected, prompts)
                if max_prompt_tokens is not None and p.length > max_prompt_tokens]
    if too_long:  # skipped, counted and named: one long prompt does not stop the evaluation
        kept = [(c, p) for c, p in zip(selected, prompts) if p.length <= max_prompt_tokens]
        selected, prompts = [c for c, _ in kept], [p for _, p in kept]
    start = time.perf_counter()
    responses = _sample_all(sampling_client, prompts, [c.source for c in selected], settings,
                            console, progress)
    wall_seconds = time.perf_counter() - start

    examples = []
    with _progress(console, progress) as bar:
        task = bar.add_task("Grading", total=len(selected))
        for i, (conversation, prompt, response) in enumerate(zip(selected, prompts, responses)):
            prompt_text = tokenizer.decode(prompt.to_ints(), skip_special_tokens=False)
            examples.append(_grade_example(i, conversation, prompt_text, response, tokenizer,
                                           settings.num_samples, grader))
            bar.advance(task)
    grading_seconds = time.perf_counter() - start - wall_seconds

    metrics = _metrics(examples, settings.num_samples, wall_seconds, grading_seconds)
    metrics = {"num_examples": metrics.pop("num_examples"), "skipped_too_long": len(too_long),
               **metrics}
    warnings = _warnings(settings, examples)
    if too_long:
        warnings.append(f"{len(too_long)} example(s) skipped: the prompt is longer than the "
                        f"{max_prompt_tokens} tokens the model's positions leave to sample from "
                        f"({', '.join(map(str, too_long[:3]))}{', ...' if len(too_long) > 3 else ''})")
    result = EvalResult(metrics, examples, settings, warnings, grader.describe())
    if progress:
        print_summary(result, console)
    return result


def _warnings(settings: EvalSettings, examples: list[dict]) -> list[str]:
    warnings = []
    if settings.num_samples > 1 and (settings.temperature == 0 or settings.top_k == 1):
        why = "at temperature 0" if settings.temperature == 0 else "with top_k 1"
        warnings.append(f"{settings.num_samples} samples {why} are greedy, so identical: pass@k "
                        "equals pass@1 (sample at a temperature above 0, top_k not 1, for "
                        "pass@k)")
    errors = [(e["index"], o["grading_error"]) for e in examples for o in e["outputs"]
              if o.get("grading_error")]
    if errors:
        total = sum(len(e["outputs"]) for e in examples)
        index, message = errors[0]
        warnings.append(f"the grader failed on {len(errors)} of {total} outputs (counted as "
                        f"wrong); the first, example {index}: {message}")
    return warnings


def _grader_line(grader: dict) -> str:
    """``Grader: /abs/my.py (sha256 <64 hex>; defines score; the rest built in)``, or
    ``Grader: built-in``."""
    if not grader or not grader.get("file"):
        return "Grader: built-in"
    return (f"Grader: {grader['file']} (sha256 {grader['sha256']}; defines "
            f"{', '.join(grader['defines'])}; the rest built in)")


def _format(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 100 else f"{value:,.1f}"
    return str(value)


def print_summary(result: EvalResult, console: Console) -> None:
    """Print the metrics as a rich table, and how many examples lacked a reference answer."""
    table = Table(title="Evaluation")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in result.metrics.items():
        table.add_row(name, _format(value))
    console.print(table)
    if result.grader.get("file"):
        console.print(_grader_line(result.grader), soft_wrap=True)
    for warning in result.warnings:
        console.print(f"[yellow]Warning: {warning}[/yellow]")
    missing = result.metrics["num_without_reference"]
    if missing:
        console.print(f"[yellow]{missing} example(s) have no reference answer: sampled, but "
                      f"excluded from accuracy and pass@k.[/yellow]")


def write_results(result: EvalResult, path: str | Path, config: dict | None = None) -> None:
    """Write ``evaluation_results.json`` atomically.

    The file holds ``format_version``, ``config`` (as given: the caller removes secrets such as
    API keys first), ``settings``, ``grader`` (the grader file, its SHA-256 and the functions
    it defines; ``file`` None for the built-in grader), ``metrics``, ``warnings`` and
    ``examples`` (see :func:`evaluate`).

    Args:
        result: What :func:`evaluate` returned.
        path: The JSON file to write.
        config: The run's configuration, or None.
    """
    atomic_write_json(path, {
        "format_version": RESULTS_FORMAT_VERSION,
        "config": config,
        "settings": asdict(result.settings),
        "grader": result.grader,
        "metrics": result.metrics,
        "warnings": result.warnings,
        "examples": result.examples,
    })


def load_results(path: str | Path) -> dict:
    """Read an ``evaluation_results.json`` written by :func:`write_results`.

    Args:
        path: The file.

    Returns:
        The parsed dict (``metrics`` a dict, ``examples`` a list of dicts with a ``prompt``).

    Raises:
        DataError: the file is missing, is not JSON, or lacks ``metrics``/``examples``.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError("no such evaluation results file", path=str(path))
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise DataError(f"invalid JSON: {error.msg}", path=str(path), line=error.lineno) from None
    except UnicodeDecodeError:
        raise DataError("not a UTF-8 text file", path=str(path)) from None
    if not isinstance(data, dict) or not isinstance(data.get("metrics"), dict):
        raise DataError("not an evaluation results file (no 'metrics' object)", path=str(path),
                        field="metrics")
    examples = data.get("examples")
    if not isinstance(examples, list) or not all(isinstance(e, dict) and "prompt" in e
                                                 for e in examples):
        raise DataError("'examples' must be a list of objects with a 'prompt'", path=str(path),
                        field="examples")
    return data


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + " …"


def _fenced(text: str) -> str:
    """A Markdown code block that stays closed whatever backticks ``text`` contains."""
    longest = max((len(run) for run in re.findall("`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n{text}\n{fence}"


def _example_markdown(example: dict) -> str:
    first = example["outputs"][0]
    source = f" ({example['source']})" if example["source"] else ""
    error = [f"Grading error: {first['grading_error']}"] if first.get("grading_error") else []
    score = [f" · score: {_format(first['score'])}"] if "score" in first else []
    return "\n".join([
        f"### Example {example['index']}{source}",
        "", "Question (last prompt message):", "", _fenced(_clip(example["question"], 1500)), "",
        f"Output ({first['num_tokens']} tokens, stop reason {first['stop_reason']}):", "",
        _fenced(_clip(first["text"], 1500)), "",
        f"Extracted: `{first['extracted']}` · reference: `{example['reference']}` · "
        f"correct samples: {example['num_correct']}/{len(example['outputs'])}" + "".join(score),
        *error,
    ])


def _grading_errors_markdown(examples: list[dict], limit: int) -> list[str]:
    """The report's section listing the outputs the grader failed on (the first ``limit``)."""
    errors = [(e, j, o["grading_error"]) for e in examples
              for j, o in enumerate(e["outputs"]) if o.get("grading_error")]
    if not errors:
        return []
    lines = ["", f"## Grading errors ({len(errors)} outputs, counted as wrong)", ""]
    for example, j, message in errors[:limit]:
        source = f" ({example['source']})" if example["source"] else ""
        lines.append(f"- Example {example['index']}{source}, sample {j}: {message}")
    if len(errors) > limit:
        lines.append(f"- … and {len(errors) - limit} more in the results JSON")
    return lines


def write_report(result: EvalResult, path: str | Path, n_examples: int = 5) -> None:
    """Write a short Markdown report: the grader, the metrics table, the grading errors and a few
    correct and incorrect examples.

    An example is "correct" when its first sample is judged equivalent to the reference; examples
    without a reference are not shown. Grading errors (outputs a ``GRADER`` file failed on) are
    listed with their messages, the first 20.

    Args:
        result: What :func:`evaluate` returned.
        path: The Markdown file to write (atomically).
        n_examples: How many correct and how many incorrect examples to show (each).
    """
    lines = ["# Evaluation report", "", _grader_line(result.grader), "",
             "| metric | value |", "|---|---|"]
    lines += [f"| {name} | {_format(value)} |" for name, value in result.metrics.items()]
    lines += [f"\n**Warning:** {warning}" for warning in result.warnings]
    if result.metrics["num_without_reference"]:
        lines += ["", f"{result.metrics['num_without_reference']} example(s) have no reference "
                      "answer: sampled, but excluded from accuracy and pass@k."]
    lines += _grading_errors_markdown(result.examples, 20)
    graded = [e for e in result.examples if e["reference"] is not None]
    for title, wanted in (("Correct examples", True), ("Incorrect examples", False)):
        chosen = [e for e in graded if bool(e["outputs"][0]["equivalent"]) == wanted][:n_examples]
        lines += ["", f"## {title} ({len(chosen)} shown)"]
        for example in chosen:
            lines += ["", _example_markdown(example)]
        if not chosen:
            lines += ["", "None."]
    atomic_write_text(path, "\n".join(lines).rstrip() + "\n")


def _compare_metrics(a: dict, b: dict) -> dict:
    names = list(dict.fromkeys([*a, *b]))
    rows = {}
    for name in names:
        before, after = a.get(name), b.get(name)
        numeric = all(type(v) in (int, float) for v in (before, after))
        rows[name] = {"before": before, "after": after,
                      "delta": after - before if numeric else None}
    return rows


def _keyed(examples: list[dict]) -> dict[tuple[str, int], dict]:
    """Examples keyed by ``(prompt, n)``, the n-th example of that prompt in the file: a test set
    may repeat a prompt, and its repeats pair with the other file's in order."""
    seen: dict[str, int] = {}
    keyed = {}
    for example in examples:
        n = seen[example["prompt"]] = seen.get(example["prompt"], -1) + 1
        keyed[(example["prompt"], n)] = example
    return keyed


def _shared_metrics(results: dict, keys: set[tuple[str, int]]) -> dict:
    """The metrics of a results file's examples whose key (:func:`_keyed`) is in ``keys``, without
    timings."""
    examples = [e for key, e in _keyed(results["examples"]).items() if key in keys]
    metrics = _metrics(examples, results["metrics"]["num_samples"], 0.0, 0.0)
    for timing in ("wall_seconds", "tokens_per_second", "grading_seconds"):
        metrics.pop(timing)
    return metrics


def _verdict(example: dict) -> dict:
    outputs = example.get("outputs") or [{}]
    return {"num_correct": example.get("num_correct"), "extracted": outputs[0].get("extracted")}


def _changed_examples(a: list[dict], b: list[dict]) -> tuple[int, list[dict]]:
    """(number of examples paired by :func:`_keyed`, the pairs whose num_correct differs)."""
    after_by_key = _keyed(b)
    matched, changed = 0, []
    for key, before in _keyed(a).items():
        after = after_by_key.get(key)
        if after is None:
            continue
        matched += 1
        if before.get("num_correct") != after.get("num_correct"):
            changed.append({
                "prompt": before["prompt"], "question": before.get("question", before["prompt"]),
                "reference": before.get("reference"),
                "before": _verdict(before), "after": _verdict(after),
            })
    return matched, changed


def compare_results(a: dict, b: dict, console: Console,
                    names: tuple[str, str] = ("before", "after")) -> dict:
    """Compare two evaluation results (before = ``a``, after = ``b``) and print the comparison.

    Examples are matched by their exact ``prompt`` text (a prompt repeated in a test set pairs with
    its repeats in order), so both runs must have used the same prompt format; only the examples
    both files hold are compared. Metrics are compared name by
    name (delta = after - before for numbers): the files' own metrics when they hold the same
    prompts, else those of the shared examples recomputed (timings left out), under a warning
    that says how many prompts each file holds. An example has changed when its number of correct
    samples (equivalence criterion) differs. Files graded by different graders (another
    ``GRADER`` file, or another version of it) are compared under a warning.

    Args:
        a: The earlier results, as returned by :func:`load_results`.
        b: The later results.
        console: Where to print the two tables.
        names: How the two are named in messages (their file names).

    Returns:
        ``{"metrics": {name: {"before", "after", "delta"}}, "matched": int, "improved": int,
        "regressed": int, "changed": [{"prompt", "question", "reference", "before", "after"}]}``
        where ``before``/``after`` hold ``num_correct`` and the first sample's ``extracted`` answer.

    Raises:
        DataError: The two files share no prompt (results of different test sets).
    """
    shared = _keyed(a["examples"]).keys() & _keyed(b["examples"]).keys()
    if not shared:
        raise DataError(f"{names[0]} and {names[1]} share no prompt ({len(a['examples'])} and "
                        f"{len(b['examples'])} examples): results of different test sets "
                        "cannot be compared")
    graders = [(r.get("grader") or {}).get("sha256") for r in (a, b)]
    if graders[0] != graders[1]:  # results before the grader was recorded count as built-in
        console.print(f"[yellow]Warning: {names[0]} and {names[1]} were graded by different "
                      f"graders ({', '.join(_grader_line(r.get('grader') or {}) for r in (a, b))}"
                      "): a changed verdict may be the grader's, not the model's[/yellow]",
                      soft_wrap=True)
    same = all(len(r["examples"]) == len(shared) for r in (a, b))
    if not same:
        console.print(f"[yellow]Warning: only {len(shared)} examples' prompts are in both files "
                      f"({names[0]}: {len(a['examples'])}, {names[1]}: {len(b['examples'])}); "
                      f"comparing those {len(shared)} (metrics recomputed on them, without "
                      "timings)[/yellow]")
    metrics = _compare_metrics(*(r["metrics"] if same else _shared_metrics(r, shared)
                                 for r in (a, b)))
    matched, changed = _changed_examples(a["examples"], b["examples"])
    improved = sum((c["after"]["num_correct"] or 0) > (c["before"]["num_correct"] or 0)
                   for c in changed)

    table = Table(title="Metrics: before -> after")
    for column in ("metric", "before", "after", "delta"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for name, row in metrics.items():
        delta = row["delta"]
        shown = "" if delta is None else (f"[green]{_format(delta)}[/green]" if delta > 0 else
                                          f"[red]{_format(delta)}[/red]" if delta < 0 else "0")
        table.add_row(name, _format(row["before"]), _format(row["after"]), shown)
    console.print(table)

    examples = Table(title=f"Changed examples ({len(changed)} of {matched} matched by prompt)")
    for column in ("question", "reference", "before", "after"):
        examples.add_column(column)
    for change in changed:
        examples.add_row(_clip(change["question"].replace("\n", " "), 80), str(change["reference"]),
                         f"{change['before']['num_correct']} ({change['before']['extracted']})",
                         f"{change['after']['num_correct']} ({change['after']['extracted']})")
    console.print(examples)
    return {"metrics": metrics, "matched": matched, "improved": improved,
            "regressed": len(changed) - improved, "changed": changed}


def settings_from_config(config, num_samples: int = 1) -> EvalSettings:
    """The evaluation settings of a :class:`~tinkerkit.config.TrainConfig`."""
    return EvalSettings(max_tokens=config.max_tokens, temperature=config.temperature,
                        top_p=config.top_p, top_k=config.top_k, stop=config.stop,
                        num_samples=num_samples, seed=config.seed, limit=config.eval_limit)


def _check_writable(path: Path, inputs: Sequence[str | Path] = ()) -> None:
    """Fail before hours of sampling, not after, when ``path`` (or its ``.md`` report beside it)
    cannot be written, or would overwrite one of ``inputs`` or a file inside one of them."""
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if path.is_dir() or not parent.is_dir():
        raise ConfigError(f"--output {path}: cannot be written (a directory, or a file stands "
                          "where a directory should be)")
    if path.suffix == ".md":
        raise ConfigError(f"--output {path}: the Markdown report goes beside the results as "
                          f"{path.name}; give the results a .json name")
    for target in (path.resolve(), path.with_suffix(".md").resolve()):
        for given in map(Path, inputs):
            if target == given.resolve() or target.is_relative_to(given.resolve()):
                raise ConfigError(f"--output {path}: writing {target.name} would overwrite the "
                                  f"input {given}; choose another --output")


def run_evaluation(config, data: Sequence[str], checkpoint: str | None = None,
                   output: str | Path = "evaluation_results.json", num_samples: int = 1,
                   console: Console | None = None, base_model: str | None = None) -> EvalResult:
    """Evaluate a base model, or a checkpoint on it, on test files; write results and a report.

    Prompts are rendered by the training :class:`~tinkerkit.render.Renderer` (same chat template,
    same generation prompt), and outputs graded by the config's ``GRADER`` (the built-in grader
    without one), which is loaded and checked before the data and the model. Results go to
    ``output`` (JSON) and ``output`` with suffix ``.md``; both name the grader file and its
    SHA-256.

    Args:
        config: Sampling settings and the base model (``BASE_MODEL``) come from it.
        data: Test files in any format the loader knows.
        checkpoint: A tinkerkit checkpoint, a run directory (its latest checkpoint), an
            exported adapter directory, or a ``tinker://`` checkpoint; None = the base model.
            The engine is :func:`tinkerkit.engines.backend_of`'s: a ``tinker://`` checkpoint,
            or any model with ``BACKEND = "tinker"``, is sampled on the server at
            ``TINKER_BASE_URL`` through the SDK.
        output: Where ``evaluation_results.json`` goes.
        num_samples: Samples per problem (pass@k with the unbiased estimator).
        console: Where to print.
        base_model: Overrides both the config and the checkpoint's recorded base model
            (:func:`tinkerkit.engines.create_sampling_client`).

    Raises:
        DataError, ModelError, CheckpointError, ConfigError: Bad data, model, checkpoint or
            grader file.
    """
    console = console or Console()
    check_engine(config, checkpoint)  # a bad BACKEND or DEVICE stops here, before any work
    if checkpoint is not None:
        checkpoint = resolve_checkpoint(checkpoint)
    _check_writable(Path(output), [*data, *([checkpoint] if checkpoint else [])])
    settings = settings_from_config(config, num_samples)
    settings.validate()
    with GraderConfig.from_config(config).build() as grader:  # a broken grader stops here
        loaded = load_conversations(data, format=config.data_format, on_error=config.on_error)
        client = create_sampling_client(config, checkpoint, base_model)
        base = client.base_model
        tokenizer = client.get_tokenizer()
        settings.stop = with_end_of_turn(settings.stop, tokenizer)
        renderer = Renderer(tokenizer, config.train_on)
        console.print(f"Evaluating {checkpoint or base} on {plural(len(loaded.conversations), 'example')} "
                      f"from {', '.join(map(str, data))}"
                      + (f" (first {settings.limit})" if settings.limit else ""))
        positions = max_positions(base)
        try:
            result = evaluate(loaded.conversations, client, renderer.build_prompt, tokenizer,
                              settings, console=console, grader=grader,
                              max_prompt_tokens=None if positions is None else positions - 1)
        finally:
            client.close()
    if loaded.skipped:  # ON_ERROR=skip: counted and named, as stats, split and train do
        where, reason = loaded.skipped[0]
        result.metrics["skipped_records"] = len(loaded.skipped)
        result.warnings.append(f"{len(loaded.skipped)} record(s) skipped (ON_ERROR=skip); the "
                               f"first, {where}: {reason}")
        console.print(f"[yellow]Warning: {result.warnings[-1]}[/yellow]", soft_wrap=True)
    run_config = {**config.dump(), "BASE_MODEL": base, "CHECKPOINT": checkpoint,
                  "DATA": [str(d) for d in data]}
    write_results(result, output, config=run_config)
    write_report(result, Path(output).with_suffix(".md"))
    console.print(f"Results: {output}  Report: {Path(output).with_suffix('.md')}")
    return result


def training_eval_settings(config, tokenizer, limit: int) -> EvalSettings:
    """The settings of :func:`run_evaluation` for ``config``, on the first ``limit`` examples.

    Used by evaluation during training (``SAMPLE_EVAL_EVERY``) so that it samples and grades
    exactly as ``tinkerkit eval`` does: the config's sampling settings, and explicit stop strings
    extended with the end-of-turn tokens.
    """
    settings = settings_from_config(config)
    settings.limit = limit
    settings.stop = with_end_of_turn(settings.stop, tokenizer)
    return settings


def with_end_of_turn(stop: list[str] | None, tokenizer) -> list[str] | None:
    """Explicit stop strings replace the sampler's default stops (Tinker's ``SamplingParams.stop``
    semantics), so add the end-of-turn tokens back; None keeps the defaults."""
    if not stop:
        return stop
    return [*stop, *tokenizer.convert_ids_to_tokens(end_of_turn_ids(tokenizer))]
