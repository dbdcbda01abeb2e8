"""Answer grading: extract a model's final answer, normalize it, and judge it against a reference.

Three criteria, from strict to lenient in what they accept as the same answer:

- **exact match**: the normalized extracted answer equals the normalized reference;
- **equivalent**: the two are mathematically equal according to HuggingFace's ``math_verify``
  (``0.5`` ~ ``\\frac{1}{2}``, ``(1,2)`` as an interval, sets in any order, ...);
- **contains**: the reference appears anywhere in the output (a number only as a whole number, so
  ``12`` is not contained in ``123``). It needs no extractable answer and over-counts; it is an
  upper bound, useful when a model answers in prose.

``math_verify`` bounds its own work with ``signal.alarm``, which only works in the main thread.
Here every equivalence check instead runs in one worker process (math-verify's own timeouts off)
that the caller waits on with a hard timeout, and which is killed and replaced when a check
overruns it. That works from any thread and also stops work that a signal cannot interrupt (a huge
integer power computed inside GMP). A timed-out check counts as not equivalent and is reported in
:attr:`Grade.timed_out`.

These are the built-in graders. A user's ``GRADER`` file may replace any of them (and add a
``score``) without editing this module: :mod:`tinkerkit.grader` loads it, and a file can import
the functions here to wrap them.

Example::

    grade("... so the total is \\boxed{\\dfrac{1}{2}}.", "0.5")
    # Grade(extracted='\\dfrac{1}{2}', exact_match=False, contains=False, equivalent=True, ...)
"""

from __future__ import annotations

import json
import logging
import os
import re
import select
import subprocess
import sys
import threading
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

from tinkerkit.errors import ConfigError, EngineError

__all__ = [
    "Grade",
    "check_answer_contains",
    "check_answer_equivalent",
    "check_answer_exact_match",
    "equivalence",
    "extract_final_answer",
    "grade",
    "gsm8k_final_answer",
    "normalize_answer",
]

# ---------------------------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------------------------

_BOXED = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_BARE_BOXED_ARG = re.compile(r"\s+([^\s$]+)")  # `\boxed 5`: the argument is the next word
_ANSWER_IS = re.compile(r"\bthe\s+(?:final\s+)?answer\s+is\s*:?[ \t]*([^\n]*)", re.IGNORECASE)
_SENTENCE_END = re.compile(r"\.(?:\s|$)")
_DIGIT_GROUP_COMMA = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")


def _braced_argument(text: str, start: int) -> str | None:
    """The content of the ``{...}`` group opening at ``text[start]``, or None if unbalanced.

    Escaped braces (``\\{``, ``\\}``, as in a LaTeX set) do not count as grouping braces.
    """
    depth, i = 0, start
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1:i]
        i += 1
    return None


def _boxed_argument(text: str, end_of_command: int) -> str | None:
    """The argument of the ``\\boxed``/``\\fbox`` command ending at ``end_of_command``."""
    rest = text[end_of_command:].lstrip()
    if rest.startswith("{"):
        content = _braced_argument(rest, 0)
        return content.strip() if content and content.strip() else None
    bare = _BARE_BOXED_ARG.match(text, end_of_command)
    if bare is None:
        return None
    return bare.group(1).rstrip(".") or None


def _last_boxed(text: str) -> str | None:
    for command in reversed(list(_BOXED.finditer(text))):
        content = _boxed_argument(text, command.end())
        if content is not None:
            return content
    return None


def gsm8k_final_answer(text: str) -> str | None:
    """The final answer of a GSM8K solution: the rest of the line after the last ``####``.

    GSM8K (Cobbe et al. 2021, ``grade_school_math/data/*.jsonl``) ends each reference solution
    with a line ``#### N``. The answer is the text after the last ``####`` up to the end of its
    line (later lines, as a model may write, are not part of it), with surrounding whitespace and
    a trailing period stripped and digit-group commas removed (``#### 1,234.`` -> ``"1234"``).
    Used for reference solutions and model outputs alike.

    Args:
        text: A solution or model output.

    Returns:
        The answer, or None when the text has no ``####`` or nothing follows the last one on its
        line.
    """
    _, marker, rest = text.rpartition("####")
    if not marker:
        return None
    answer = rest.split("\n", 1)[0].strip().rstrip(".").strip()
    return _DIGIT_GROUP_COMMA.sub("", answer) or None


def _last_answer_is(text: str) -> str | None:
    matches = _ANSWER_IS.findall(text)
    if not matches:
        return None
    answer = _SENTENCE_END.split(matches[-1], maxsplit=1)[0].strip()
    answer = answer.rstrip(".").strip().strip("*").strip().strip("$").strip()
    return answer or None


def extract_final_answer(text: str) -> str | None:
    """Extract the final answer from a model output or a reference solution.

    In order of preference:

    1. the last ``\\boxed{...}`` (or ``\\fbox{...}``) whose braces balance, nested braces kept
       (``\\boxed{2^{10}}`` -> ``2^{10}``); also the brace-less ``\\boxed 5`` -> ``5``. An
       unbalanced last box (an output cut by the token limit) falls back to the one before;
    2. GSM8K's ``#### N``, as :func:`gsm8k_final_answer` reads it (the last one, to the end of
       its line; digit-group commas removed: ``#### 1,234`` -> ``1234``; trailing period and
       whitespace stripped);
    3. "the answer is ..." or "the final answer is ..." (case-insensitive, the last occurrence, up
       to the end of its sentence or line; ``$``, ``**`` and a trailing period stripped):
       ``The answer is $42$.`` -> ``42``.

    Args:
        text: The full generated (or reference) text.

    Returns:
        The answer as written (not normalized, see :func:`normalize_answer`), or None when the
        text contains none of the forms above.
    """
    for extract in (_last_boxed, gsm8k_final_answer, _last_answer_is):
        answer = extract(text)
        if answer is not None:
            return answer
    return None


# ---------------------------------------------------------------------------------------------
# Normalization and the string criteria
# ---------------------------------------------------------------------------------------------

_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|textrm|textit|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")
_LATEX_NOISE = re.compile(r"\\left(?![A-Za-z])|\\right(?![A-Za-z])|\\[!,;:]")
_FRAC_VARIANT = re.compile(r"\\[dt]frac(?![A-Za-z])")
_DOLLAR = re.compile(r"\\?\$")
_ASSIGNMENT = re.compile(r"^[A-Za-z]\s*=(?!=)\s*(?=\S)")
_WHITESPACE = re.compile(r"\s+")
_NUMBER = re.compile(r"[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[+-]?\.\d+")
# A number token in free text: digits with optional digit-group commas and decimals, unsigned.
_NUMBER_TOKEN = re.compile(r"(?<![\d.])(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?")


def _canonical_number(text: str) -> str:
    """``'1,234.50'`` -> ``'1234.5'``, ``'27.0'`` -> ``'27'``, ``'-0'`` -> ``'0'`` (exact)."""
    value = Decimal(text.replace(",", ""))
    if value == 0:
        return "0"
    return format(value.normalize(), "f")


def normalize_answer(ans: str) -> str:
    """Normalize an answer string so that equal answers written differently compare equal.

    Only rewrites that never change the value are applied, in this order:

    1. ``\\text{...}``-style wrappers (``\\text``, ``\\textbf``, ``\\textrm``, ``\\textit``,
       ``\\mathrm``, ``\\mathbf``, ``\\mbox``) are replaced by their content;
    2. sizing and spacing commands are removed: ``\\left``, ``\\right``, ``\\!``, ``\\,``, ``\\;``,
       ``\\:``; ``\\dfrac`` and ``\\tfrac`` become ``\\frac``;
    3. ``$`` and ``\\$`` signs are removed (math delimiters and currency alike);
    4. a leading one-letter assignment is dropped: ``x = 5`` -> ``5``;
    5. surrounding whitespace and trailing periods are stripped, inner whitespace runs become one
       space;
    6. a plain number loses its digit-group commas and is written canonically (exactly, through
       ``Decimal``): ``1,234`` -> ``1234``, ``27.0`` -> ``27``, ``0.50`` -> ``0.5``,
       ``.5`` -> ``0.5``.

    Mathematical equivalence beyond this (``0.5`` vs ``\\frac{1}{2}``) is
    :func:`check_answer_equivalent`'s job.

    Args:
        ans: An extracted or reference answer.

    Returns:
        The normalized answer; ``""`` for an answer that is only whitespace and delimiters.
    """
    text = _TEXT_WRAPPER.sub(r"\1", ans)
    text = _LATEX_NOISE.sub("", text)
    text = _FRAC_VARIANT.sub(r"\\frac", text)
    text = _DOLLAR.sub("", text).strip()
    text = _ASSIGNMENT.sub("", text)
    text = _WHITESPACE.sub(" ", text).strip().rstrip(".").strip()
    if _NUMBER.fullmatch(text):
        return _canonical_number(text)
    return text


def check_answer_exact_match(pred: str | None, ref: str) -> bool:
    """Whether the extracted answer equals the reference after :func:`normalize_answer`.

    Args:
        pred: The extracted answer; None (no answer found) is never a match.
        ref: The reference answer.

    Returns:
        True when both normalize to the same non-empty string.
    """
    if pred is None:
        return False
    normalized_ref = normalize_answer(ref)
    return bool(normalized_ref) and normalize_answer(pred) == normalized_ref


def check_answer_contains(output: str, ref: str) -> bool:
    """Whether the normalized reference appears anywhere in the output.

    A numeric reference must appear as a whole number token, compared by value after
    normalization: ``12`` is not in ``123`` nor in ``12.5``, but is in ``12.0`` and in ``$12.``,
    and ``1234`` is in ``1,234``. A negative reference needs a minus sign (``-`` or ``−``) right
    before the number; a positive one also matches a negated number (the criterion is lenient by
    design). Any other reference is a substring test against the normalized output.

    Args:
        output: The full generated text.
        ref: The reference answer.

    Returns:
        True when the reference is found; False for an empty reference.
    """
    normalized_ref = normalize_answer(ref)
    if not normalized_ref:
        return False
    if not _NUMBER.fullmatch(normalized_ref):
        return normalized_ref in normalize_answer(output)
    negative = normalized_ref.startswith("-")
    magnitude = normalized_ref.lstrip("-")
    for token in _NUMBER_TOKEN.finditer(output):
        signed = token.start() > 0 and output[token.start() - 1] in "-−"
        if _canonical_number(token.group()) == magnitude and (signed or not negative):
            return True
    return False


# ---------------------------------------------------------------------------------------------
# Mathematical equivalence (math_verify in a worker process with a hard timeout)
# ---------------------------------------------------------------------------------------------


def _serve_verifier() -> None:
    """The worker's main loop: one JSON ``[pred, ref]`` per stdin line -> one JSON bool per line.

    Prints ``"ready"`` once math_verify is imported. Anything else that writes to ``sys.stdout``
    is sent to stderr so that it cannot corrupt the replies.
    """
    import math_verify  # noqa: F401  (imported before "ready": start-up is not timed)

    logging.getLogger("math_verify").setLevel(logging.ERROR)  # its "timeout disabled" warning
    replies, sys.stdout = sys.stdout, sys.stderr
    print(json.dumps("ready"), file=replies, flush=True)
    for line in sys.stdin:
        pred, ref = json.loads(line)
        print(json.dumps(_verify(pred, ref)), file=replies, flush=True)


def _verify(pred: str, ref: str) -> bool:
    """Parse both answers with math_verify and compare them (runs in the worker process).

    Each answer is wrapped in ``\\boxed{}`` so that math_verify's LaTeX extraction takes the whole
    answer; its plain-expression extraction (``1/2``) is tried too. math_verify's own signal-based
    timeouts are off (the parent enforces one). ``verify`` is not symmetric: the reference is its
    ``gold`` argument.
    """
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    configs = [LatexExtractionConfig(), ExprExtractionConfig()]
    gold = parse(f"\\boxed{{{ref}}}", configs, parsing_timeout=None)
    target = parse(f"\\boxed{{{pred}}}", configs, parsing_timeout=None)
    return bool(gold and target and verify(gold, target, timeout_seconds=None))


# Plain words are text, not math: math_verify reads "even" as the product e*v*e*n (= "veen").
_WORDS = re.compile(r"[A-Za-z]{2,}(?: [A-Za-z]+)*")
_WORKER_CODE = "from tinkerkit.grading import _serve_verifier; _serve_verifier()"
_WORKER_START_SECONDS = 120.0  # importing sympy + math_verify; generous for a loaded machine


class _Verifier:
    """One worker process (``python -c _WORKER_CODE``) running :func:`_verify`, killed on timeout.

    A plain subprocess rather than ``multiprocessing``: spawning re-imports the caller's main
    script, which would rerun a script that lacks an ``if __name__ == "__main__"`` guard. Calls
    are serialized by a lock, so a timeout kills only the overrunning check; the next call starts
    a fresh worker. Start-up (about a second) happens outside the timed window. A worker that dies
    mid-check is treated like one that timed out. Waiting uses ``select`` on a pipe (POSIX).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._process: subprocess.Popen | None = None

    def check(self, pred: str, ref: str, timeout_seconds: float) -> bool | None:
        """True/False as math_verify decides, or None when the check ran out of time."""
        with self._lock:
            process = self._process if self._process and self._process.poll() is None else None
            process = process or self._start()
            process.stdin.write(json.dumps([pred, ref]) + "\n")
            process.stdin.flush()
            reply = self._read_reply(timeout_seconds)
            if reply is None:
                self._stop()
            return reply

    def _start(self) -> subprocess.Popen:
        package_root = str(Path(__file__).resolve().parents[1])  # so the worker imports this copy
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [package_root, *filter(None, [os.environ.get("PYTHONPATH")])])}
        self._process = subprocess.Popen(
            [sys.executable, "-c", _WORKER_CODE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            text=True, encoding="utf-8", env=env)
        if self._read_reply(_WORKER_START_SECONDS) != "ready":
            self._stop()
            raise EngineError(f"the math_verify worker process did not start within "
                              f"{_WORKER_START_SECONDS:.0f} s (its errors are on stderr above)")
        return self._process

    def _read_reply(self, timeout_seconds: float):
        """The worker's next JSON reply, or None when none arrives in time (or it died)."""
        readable, _, _ = select.select([self._process.stdout], [], [], timeout_seconds)
        line = self._process.stdout.readline() if readable else ""
        return json.loads(line) if line else None

    def _stop(self) -> None:
        self._process.kill()
        self._process.wait()
        self._process = None


_VERIFIER = _Verifier()


def equivalence(pred: str, ref: str, timeout_seconds: float) -> tuple[bool, bool]:
    """:func:`check_answer_equivalent` with its timeout reported: ``(equivalent, timed_out)``.

    Exact match short-circuits to ``(True, False)``; a check that overruns ``timeout_seconds``
    is ``(False, True)``.

    Args:
        pred: The extracted answer.
        ref: The reference answer.
        timeout_seconds: Wall-clock limit of the math_verify check, in seconds.

    Returns:
        ``(equivalent, timed_out)``.

    Raises:
        ConfigError: ``timeout_seconds`` is not positive.
    """
    if timeout_seconds <= 0:
        raise ConfigError(f"timeout_seconds must be positive, got {timeout_seconds!r}")
    if check_answer_exact_match(pred, ref):
        return True, False
    normalized_pred, normalized_ref = normalize_answer(pred), normalize_answer(ref)
    if not normalized_pred or not normalized_ref:
        return False, False
    if _WORDS.fullmatch(normalized_pred) or _WORDS.fullmatch(normalized_ref):
        return normalized_pred.lower() == normalized_ref.lower(), False
    verdict = _VERIFIER.check(normalized_pred, normalized_ref, timeout_seconds)
    return bool(verdict), verdict is None


def check_answer_equivalent(pred: str | None, ref: str, timeout_seconds: float = 5.0) -> bool:
    """Whether the extracted answer is mathematically equal to the reference (``math_verify``).

    Both answers are normalized (:func:`normalize_answer`) and parsed to SymPy by
    ``math_verify.parse``, then compared by ``math_verify.verify`` (numeric values to 6 decimals,
    symbolic simplification, intervals, sets, tuples, matrices, equations). Examples that hold:
    ``0.5`` ~ ``\\frac{1}{2}`` ~ ``1/2``, ``3`` ~ ``3.0``, ``\\sqrt{2}/2`` ~
    ``\\frac{\\sqrt{2}}{2}``, ``(1, 2)`` ~ ``(1,2)``, ``\\{1,2\\}`` ~ ``\\{2,1\\}``.
    Plain words (letters and spaces, such as ``\\text{Monday}``) are compared as text,
    case-insensitively, since math_verify would read them as products of one-letter variables and
    match anagrams.

    Safe to call from any thread: the check runs in a worker process with a hard timeout.

    Args:
        pred: The extracted answer; None is never equivalent.
        ref: The reference answer.
        timeout_seconds: Wall-clock limit of the check, in seconds. A check that overruns it is
            killed and counts as not equivalent.

    Returns:
        True when exact match holds or math_verify finds the two equal within the time limit.

    Raises:
        ConfigError: ``timeout_seconds`` is not positive.
    """
    return pred is not None and equivalence(pred, ref, timeout_seconds)[0]


@dataclass(frozen=True)
class Grade:
    """The verdicts on one output.

    Attributes:
        extracted: The final answer found by :func:`extract_final_answer`, or None.
        exact_match: :func:`check_answer_exact_match` of ``extracted``; None without a reference.
        contains: :func:`check_answer_contains` of the whole output; None without a reference.
        equivalent: :func:`check_answer_equivalent` of ``extracted``; None without a reference.
        no_answer: True when no final answer could be extracted.
        timed_out: True when the equivalence check ran out of time (and so counts as False).
        score: What a ``GRADER`` file's ``score(output, example)`` returned, in [0, 1]; None when
            the grader defines no score (see :mod:`tinkerkit.grader`).
        error: Why the output could not be graded (a ``GRADER`` function raised, returned the
            wrong type or overran its time limit), naming the file and the function; the
            verdicts are then False (counted as wrong). None when grading succeeded.
    """

    extracted: str | None
    exact_match: bool | None
    contains: bool | None
    equivalent: bool | None
    no_answer: bool
    timed_out: bool = False
    score: float | None = None
    error: str | None = None


def grade(output: str, reference: str | None, timeout_seconds: float = 5.0) -> Grade:
    """Extract the final answer of ``output`` and judge it against ``reference`` by every criterion.

    ``equivalent`` is ``exact_match``, or else math-verify's equivalence of the extracted answer
    (:func:`equivalence`): the rule a ``GRADER`` file's functions combine by as well
    (:mod:`tinkerkit.grader`).

    Args:
        output: The generated text.
        reference: The reference answer, or None when the record has none (then only the
            extraction is reported and every verdict is None).
        timeout_seconds: Limit of the equivalence check, see :func:`check_answer_equivalent`.

    Returns:
        The :class:`Grade`.
    """
    extracted = extract_final_answer(output)
    if reference is None:
        return Grade(extracted, None, None, None, no_answer=extracted is None)
    exact_match = check_answer_exact_match(extracted, reference)
    equivalent, timed_out = exact_match, False  # an exact match is equivalent (grader.py too)
    if not exact_match and extracted is not None:
        equivalent, timed_out = equivalence(extracted, reference, timeout_seconds)
    return Grade(
        extracted=extracted,
        exact_match=exact_match,
        contains=check_answer_contains(output, reference),
        equivalent=equivalent,
        no_answer=extracted is None,
        timed_out=timed_out,
    )
