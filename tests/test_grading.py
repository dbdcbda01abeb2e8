"""Answer extraction, normalization and the three grading criteria, with known values."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from helpers import SHARED_DATA
from tinkerkit import grading
from tinkerkit.data.formats import normalize_record
from tinkerkit.errors import ConfigError
from tinkerkit.grading import (
    Grade,
    check_answer_contains,
    check_answer_equivalent,
    check_answer_exact_match,
    extract_final_answer,
    grade,
    gsm8k_final_answer,
    normalize_answer,
)

DATA = SHARED_DATA

# (test id, text, expected extracted answer)
EXTRACT_CASES = [
    ("boxed-frac", r"So $x = \boxed{\frac{3}{4}}$.", r"\frac{3}{4}"),
    ("boxed-nested", r"\boxed{2^{10}}", "2^{10}"),
    ("boxed-deeply-nested", r"\boxed{\sqrt{\frac{1}{2^{3}}}}", r"\sqrt{\frac{1}{2^{3}}}"),
    ("boxed-last-wins", r"first \boxed{1}, then \boxed{2}", "2"),
    ("boxed-escaped-braces", r"\boxed{\{1,2\}}", r"\{1,2\}"),
    ("boxed-no-braces", r"so the result is \boxed 5", "5"),
    ("boxed-no-braces-period", r"\boxed 5.", "5"),
    ("fbox", r"\fbox{x+1}", "x+1"),
    ("boxed-unbalanced-falls-back", r"\boxed{7} and then \boxed{8", "7"),
    ("boxed-beats-gsm8k", "#### 3\n" + r"\boxed{4}", "4"),
    ("boxed-beats-answer-is", r"The answer is 3. Check: \boxed{4}", "4"),
    ("gsm8k", "She pays 9 * 2 = 18.\n#### 18", "18"),
    ("gsm8k-comma", "#### 1,234", "1234"),
    ("gsm8k-millions", "#### 1,234,567", "1234567"),
    ("gsm8k-last", "#### 5\nwait\n#### 6.", "6"),
    ("gsm8k-beats-answer-is", "The answer is 3.\n#### 4", "4"),
    ("answer-is-dollars", "The answer is $42$.", "42"),
    ("final-answer-bold", "So the final answer is **7**.", "7"),
    ("answer-is-colon", "the answer is: 12", "12"),
    ("answer-is-case", "THE ANSWER IS 9", "9"),
    ("answer-is-decimal", "The answer is 3.5. I hope it helps.", "3.5"),
    ("answer-is-last", "The answer is 1.\nNo, the answer is 2.", "2"),
    ("none-plain", "I think it is about five or so", None),
    ("none-empty", "", None),
    ("none-empty-boxed", r"\boxed{}", None),
    ("none-answer-is-empty", "The answer is", None),
]


@pytest.mark.parametrize("text, expected", [c[1:] for c in EXTRACT_CASES],
                         ids=[c[0] for c in EXTRACT_CASES])
def test_extract_final_answer(text, expected):
    assert extract_final_answer(text) == expected


NORMALIZE_CASES = [
    ("27.0", "27"),
    ("0.50", "0.5"),
    (".5", "0.5"),
    ("-0.0", "0"),
    ("100", "100"),
    ("1,234", "1234"),
    ("$1,234.50.", "1234.5"),
    (r"\$18", "18"),
    ("  42 ", "42"),
    (r"\text{Monday}", "Monday"),
    (r"\textbf{(B)}", "(B)"),
    (r"x = \dfrac{1}{2}", r"\frac{1}{2}"),
    (r"\tfrac12", r"\frac12"),
    (r"\left( 3, \frac{\pi}{2} \right)", r"( 3, \frac{\pi}{2} )"),
    (r"10\!000", "10000"),
    (r"1\,000", "1000"),
    (r"x \rightarrow 0", r"x \rightarrow 0"),  # \right inside \rightarrow is kept
    ("(1, 2)", "(1, 2)"),  # a tuple is not a number with a thousands comma
    ("a  b", "a b"),
]


@pytest.mark.parametrize("raw, expected", NORMALIZE_CASES)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


EXACT_CASES = [
    ("27.0", "27", True),
    (r"\dfrac{1}{2}", r"\frac{1}{2}", True),
    ("1,234", "1234", True),
    ("x=5", "5", True),
    ("0.5", r"\frac{1}{2}", False),  # equal in value, but that is the equivalence criterion
    ("12", "123", False),
    (None, "5", False),
    ("", "", False),
]


@pytest.mark.parametrize("pred, ref, expected", EXACT_CASES)
def test_check_answer_exact_match(pred, ref, expected):
    assert check_answer_exact_match(pred, ref) is expected


CONTAINS_CASES = [
    ("The total is 12 apples.", "12", True),
    ("The total is 123 apples.", "12", False),
    ("The total is 12.5 apples.", "12", False),
    ("It costs $1,234.", "1234", True),
    ("It costs 18.00 dollars", "18", True),
    ("x = -5", "-5", True),
    ("x = 5", "-5", False),
    ("5-12 = -7", "12", True),
    (r"so it is \dfrac{1}{2} of them", r"\frac{1}{2}", True),
    ("the day is Monday", r"\text{Monday}", True),
    ("the day is Tuesday", "Monday", False),
    ("anything", "", False),
]


@pytest.mark.parametrize("output, ref, expected", CONTAINS_CASES)
def test_check_answer_contains(output, ref, expected):
    assert check_answer_contains(output, ref) is expected


EQUIVALENT_CASES = [
    (r"\frac{1}{2}", "0.5", True),
    ("0.5", r"\frac{1}{2}", True),
    (r"\frac{1}{2}", "1/2", True),
    ("3", "3.0", True),
    (r"\frac{3}{4}", "0.75", True),
    (r"\sqrt{2}/2", r"\frac{\sqrt{2}}{2}", True),
    ("(1,2)", "(1, 2)", True),
    (r"(-\infty, 3]", r"(-\infty,3]", True),
    (r"\{1,2\}", r"\{2,1\}", True),
    ("1,234", "1234", True),
    (r"\text{Monday}", "monday", True),
    ("even", "veen", False),  # as math, e*v*e*n == v*e*e*n; plain words are compared as text
    ("2", "3", False),
    ("10", "10.5", False),
    (None, "3", False),
]


@pytest.mark.parametrize("pred, ref, expected", EQUIVALENT_CASES)
def test_check_answer_equivalent(pred, ref, expected):
    assert check_answer_equivalent(pred, ref) is expected


def _in_thread(function):
    """Run ``function`` in a new (non-main) thread and return its result."""
    results = []
    worker = threading.Thread(target=lambda: results.append(function()))
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive()
    return results[0]


def test_equivalence_works_from_a_non_main_thread():
    # math_verify's own signal.alarm timeouts raise ValueError outside the main thread.
    assert _in_thread(lambda: check_answer_equivalent(r"\frac{5}{8}", "0.625")) is True


@pytest.fixture
def stuck_worker(monkeypatch):
    """A verifier whose worker says "ready" and then never answers (a pathological input)."""
    monkeypatch.setattr(grading, "_WORKER_CODE",
                        "import time; print('\"ready\"', flush=True); time.sleep(600)")
    monkeypatch.setattr(grading, "_VERIFIER", grading._Verifier())
    return grading._VERIFIER


def test_slow_verification_is_killed_and_counted(stuck_worker):
    start = time.monotonic()
    result = grade(r"\boxed{0.5}", r"\frac{1}{2}", timeout_seconds=0.5)
    assert time.monotonic() - start < 10
    assert result == Grade(extracted="0.5", exact_match=False, contains=False, equivalent=False,
                           no_answer=False, timed_out=True)
    assert stuck_worker._process is None  # the stuck worker was killed


def test_slow_verification_times_out_in_a_non_main_thread(stuck_worker):
    assert _in_thread(lambda: check_answer_equivalent("0.5", r"\frac{1}{2}", 0.3)) is False
    # Exact match never reaches the worker.
    assert _in_thread(lambda: check_answer_equivalent("0.50", "0.5", 0.3)) is True


def test_equivalence_rejects_nonpositive_timeout():
    with pytest.raises(ConfigError, match="timeout_seconds"):
        check_answer_equivalent("1", "2", timeout_seconds=0)


def test_grade_known_verdicts():
    assert grade(r"Half of them: \boxed{\dfrac{1}{2}}.", "0.5") == Grade(
        extracted=r"\dfrac{1}{2}", exact_match=False, contains=False, equivalent=True,
        no_answer=False, timed_out=False)
    assert grade("She has 1,234 apples.\n#### 1,234", "1234") == Grade(
        extracted="1234", exact_match=True, contains=True, equivalent=True, no_answer=False)
    assert grade("I am not sure, maybe 7?", "7") == Grade(
        extracted=None, exact_match=False, contains=True, equivalent=False, no_answer=True)
    assert grade("The answer is 8.", None) == Grade(
        extracted="8", exact_match=None, contains=None, equivalent=None, no_answer=False)


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.skipif(not (DATA / "math500").is_dir(), reason="shared data not available")
def test_math500_boxed_solution_matches_answer():
    # Every MATH-500 solution ends in \boxed{answer}; extraction + normalization recover it.
    rows = _jsonl(DATA / "math500" / "test.jsonl")
    assert len(rows) == 500
    mismatches = [r["unique_id"] for r in rows
                  if not check_answer_exact_match(extract_final_answer(r["solution"]), r["answer"])]
    assert mismatches == []


@pytest.mark.skipif(not (DATA / "gsm8k").is_dir(), reason="shared data not available")
def test_gsm8k_reference_extraction():
    rows = _jsonl(DATA / "gsm8k" / "test.jsonl")
    extracted = [extract_final_answer(r["answer"]) for r in rows]
    assert extracted[0] == "18"  # "Janet's ducks": #### 18
    assert all(a is not None and a.lstrip("-").replace(".", "").isdigit() for a in extracted)


# (test id, GSM8K file, 0-based row, text appended to the row's answer, expected final answer).
# The rows are real; the appended text is what a model writes after its own "#### N" line.
GSM8K_CASES = [
    ("plain", "test", 0, "", "18"),  # "Janet's ducks": #### 18
    ("thousands-comma", "test", 146, "", "2125"),  # #### 2,125
    ("two-commas", "test", 611, "", "1450000"),  # #### 1,450,000
    ("negative", "test", 489, "", "-10"),  # #### -10
    ("millions", "train", 644, "", "109200000"),  # #### 109,200,000
    ("trailing-period", "test", 0, ".", "18"),
    ("crlf", "test", 146, "\r\n", "2125"),
    ("text-on-later-lines", "test", 146, "\n\nSo he picked up 2,125 blocks.", "2125"),
    ("a-later-marker-wins", "test", 0, "\nWait, recount.\n#### 20", "20"),
    ("empty-last-marker", "test", 0, "\n####", None),
]


@pytest.mark.skipif(not (DATA / "gsm8k").is_dir(), reason="shared data not available")
@pytest.mark.parametrize(("split", "row", "appended", "expected"),
                         [case[1:] for case in GSM8K_CASES], ids=[case[0] for case in GSM8K_CASES])
def test_gsm8k_final_answer_is_one_rule_for_references_and_outputs(split, row, appended, expected):
    # The reference a GSM8K record loads with (data.formats), the answer graded in an output
    # (extract_final_answer) and gsm8k_final_answer itself agree on every row.
    line = (DATA / "gsm8k" / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()[row]
    record = json.loads(line)
    answer = record["answer"] + appended
    assert gsm8k_final_answer(answer) == expected
    assert extract_final_answer(answer) == expected
    loaded = normalize_record({**record, "answer": answer}, "question_answer", f"{split}:{row + 1}")
    assert loaded.reference_answer == expected


def test_gsm8k_final_answer_without_a_marker():
    assert gsm8k_final_answer("She makes 9 * 2 = 18 every day.") is None
    assert gsm8k_final_answer("#### ") is None
