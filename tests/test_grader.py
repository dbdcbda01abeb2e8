"""GRADER files: loading and checking, the verdicts they change, and every way they can break.

Each grader is a small file written into ``tmp_path``; it runs in its worker process, as in a
run. The evaluation cases reuse ``test_evaluate``'s fake sampling client and four questions.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from rich.console import Console

from test_evaluate import QUESTIONS, FakeSamplingClient, build_prompt_for, conversation
from tinkerkit import cli
from tinkerkit.config import TrainConfig, load_config
from tinkerkit.data.conversation import Message
from tinkerkit.errors import ConfigError
from tinkerkit.evaluate import (
    EvalSettings,
    compare_results,
    evaluate,
    load_results,
    run_evaluation,
    write_report,
    write_results,
)
from tinkerkit.grader import Grader, GraderConfig, grading_example
from tinkerkit.grading import Grade
from tinkerkit.models import load_tokenizer
from tinkerkit.train import held_out as held_out_module
from tinkerkit.train import train
from tinkerkit.train.held_out import HeldOut, sample_evaluations

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
MULTIPLE_CHOICE = EXAMPLES / "multiple_choice_grader.py"

# A grader that reads the last number when the built-in extractor finds nothing: it turns
# "I am not sure, maybe 7" (built-in: no answer, wrong) into a correct answer.
LAST_NUMBER = '''
import re
from tinkerkit.grading import extract_final_answer as builtin_extract


def extract_final_answer(text):
    numbers = re.findall(r"\\d+", text)
    return builtin_extract(text) or (numbers[-1] if numbers else None)
'''


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("smollm2-135m-instruct")


def grader_file(directory: Path, source: str, name: str = "my_grading.py") -> Path:
    path = directory / name
    path.write_text(source, encoding="utf-8")
    return path


def run_questions(tokenizer, grader: Grader | None, answers: dict | None = None):
    """``evaluate`` on test_evaluate's four questions with their canned outputs."""
    answers = answers or {q: [(out, stop)] for q, _, out, stop in QUESTIONS}
    return evaluate([conversation(q, ref) for q, ref, _, _ in QUESTIONS],
                    FakeSamplingClient(tokenizer, answers), build_prompt_for(tokenizer), tokenizer,
                    EvalSettings(), progress=False, grader=grader)


# -- the built-in grader and an extractor-only grader ------------------------------------------------

def test_the_builtin_grader_is_grading_grade():
    grader = Grader()
    assert grader.grade(r"so \boxed{\dfrac{1}{2}}", "0.5") == Grade(
        extracted=r"\dfrac{1}{2}", exact_match=False, contains=False, equivalent=True,
        no_answer=False)
    assert grader.describe() == {"file": None, "sha256": None, "defines": [],
                                 "timeout_seconds": None}
    assert grader.reward(r"\boxed{5}", "5") == 1.0 and grader.reward(r"\boxed{4}", "5") == 0.0


def test_a_grader_defining_only_extract_keeps_the_builtin_comparisons(tmp_path):
    with Grader(grader_file(tmp_path, LAST_NUMBER)) as grader:
        assert grader.defines == ("extract_final_answer",)
        # Built-in exact match: normalization (digit-group commas, trailing zeros) still applies.
        assert grader.grade("I count 1,234 apples, or maybe 1,234", "1234.0") == Grade(
            extracted="234", exact_match=False, contains=True, equivalent=False, no_answer=False)
        assert grader.grade("maybe 7", "7") == Grade(
            extracted="7", exact_match=True, contains=True, equivalent=True, no_answer=False)
        # Built-in contains: a number only as a whole number (12 is not in 123).
        assert grader.grade("it is 123", "12").contains is False
        # Built-in equivalence (math-verify) on the custom extract: \frac{1}{2} ~ 0.5.
        assert grader.grade(r"half: \boxed{\frac{1}{2}}", "0.5") == Grade(
            extracted=r"\frac{1}{2}", exact_match=False, contains=False, equivalent=True,
            no_answer=False)
        # No reference: extraction only, as the built-in grader does.
        assert grader.grade("maybe 7", None) == Grade("7", None, None, None, no_answer=False)


def test_a_custom_exact_match_raises_equivalence_and_a_custom_equivalence_replaces_math_verify(
        tmp_path):
    lenient = grader_file(tmp_path, "def check_answer_exact_match(pred, ref):\n"
                                    "    return pred.strip('()').upper() == ref.upper()\n")
    with Grader(lenient) as grader:
        verdict = grader.grade("The answer is (c).", "C")
        assert (verdict.extracted, verdict.exact_match, verdict.equivalent) == ("(c)", True, True)
    strict = grader_file(tmp_path, "def check_answer_equivalent(pred, ref):\n"
                                   "    return False\n", "strict.py")
    with Grader(strict) as grader:
        # Exact match still implies equivalence; math-verify's 0.5 ~ 1/2 is not asked.
        assert grader.grade(r"\boxed{5}", "5").equivalent is True
        assert grader.grade(r"\boxed{\frac{1}{2}}", "0.5").equivalent is False


def test_a_grader_changes_a_known_verdict_in_eval_and_in_training_alike(tokenizer, tmp_path):
    builtin = run_questions(tokenizer, None)
    assert builtin.examples[2]["outputs"][0]["equivalent"] is False  # "I am not sure, maybe 7"
    assert builtin.metrics["accuracy_equivalent"] == 0.5
    with Grader(grader_file(tmp_path, LAST_NUMBER)) as grader:
        custom = run_questions(tokenizer, grader)
        third = custom.examples[2]["outputs"][0]
        assert (third["extracted"], third["equivalent"], third["grading_error"]) == \
            ("7", True, None)
        assert custom.metrics["accuracy_equivalent"] == 0.75
        assert custom.metrics["accuracy_exact_match"] == 0.5  # \boxed{5} and 7
        assert custom.metrics["no_answer"] == 0 and custom.metrics["grading_errors"] == 0

        # Evaluation during training: the same questions, answers and grader object.
        answers = {q: [(out, stop)] for q, _, out, stop in QUESTIONS}
        config = TrainConfig(sample_eval_limit=4)
        evaluations = {}
        for name, used in (("built-in", Grader()), ("grader", grader)):
            held_out = HeldOut([conversation(q, ref) for q, ref, _, _ in QUESTIONS], [],
                               SimpleNamespace(build_prompt=build_prompt_for(tokenizer)), used)
            evaluations[name] = sample_evaluations(FakeTrainingClient(tokenizer, answers),
                                                   held_out, config, Console(quiet=True))
    assert evaluations["built-in"] == {"eval_accuracy": 0.5}
    assert evaluations["grader"] == {"eval_accuracy": 0.75, "eval_grading_errors": 0}


class ClosingSampler(FakeSamplingClient):
    def close(self):
        self.log.append("close")


class FakeTrainingClient:
    """What sample_evaluations needs of a training client: a tokenizer and a sampler."""

    def __init__(self, tokenizer, answers):
        self.tokenizer, self.sampler = tokenizer, ClosingSampler(tokenizer, answers)

    def get_tokenizer(self):
        return self.tokenizer

    def save_weights_and_get_sampling_client(self):
        return self.sampler


def test_score_is_mean_score_in_eval_the_reward_and_eval_score_in_training(tokenizer, tmp_path):
    source = ("def score(output, example):\n"
              "    assert example['reference_answer'] is not None\n"
              "    return 1.0 if example['reference_answer'] in output else 0.25\n")
    with Grader(grader_file(tmp_path, source)) as grader:
        result = run_questions(tokenizer, grader)
        assert [e["outputs"][0]["score"] for e in result.examples] == [1.0, 0.25, 1.0, 0.25]
        assert result.metrics["mean_score"] == pytest.approx(0.625)
        assert result.metrics["accuracy_equivalent"] == 0.5  # the built-in criteria stay
        assert grader.reward("it is 5", "5", {"reference_answer": "5"}) == 1.0
        assert grader.reward("it is 4", "5", {"reference_answer": "5"}) == 0.25
        answers = {q: [(out, stop)] for q, _, out, stop in QUESTIONS}
        held_out = HeldOut([conversation(q, ref) for q, ref, _, _ in QUESTIONS], [],
                           SimpleNamespace(build_prompt=build_prompt_for(tokenizer)), grader)
        assert sample_evaluations(FakeTrainingClient(tokenizer, answers), held_out,
                                  TrainConfig(sample_eval_limit=4)) == {
            "eval_accuracy": 0.5, "eval_score": pytest.approx(0.625), "eval_grading_errors": 0}


def test_grading_example_is_json_data():
    example = grading_example(conversation("What is 2+3?", "5").model_copy(update={
        "messages": (Message(role="user", content="What is 2+3?"),
                     Message(role="assistant", content="5"))}))
    assert example == {"messages": [{"role": "user", "content": "What is 2+3?"},
                                    {"role": "assistant", "content": "5"}],
                       "question": "What is 2+3?", "reference_answer": "5",
                       "source": "test:What is "}
    json.dumps(example)


# -- broken graders: caught when loading ------------------------------------------------------------

LOAD_ERRORS = [
    ("syntax_error", "def extract_final_answer(text)\n    return text\n",
     "line 1: expected ':' (SyntaxError)"),
    ("import_error", "import not_a_module_anywhere\n",
     "could not be loaded: ModuleNotFoundError: No module named 'not_a_module_anywhere' (line 1)"),
    ("raises_at_import", "x = 1\nraise RuntimeError('no config')\n",
     "could not be loaded: RuntimeError: no config (line 2)"),
    ("too_few_parameters", "def check_answer_exact_match(pred):\n    return True\n",
     "check_answer_exact_match(pred) takes at most 1 positional argument; it is called with 2: "
     "check_answer_exact_match(pred, ref)"),
    ("too_many_parameters", "def extract_final_answer(text, strict):\n    return text\n",
     "extract_final_answer(text, strict) takes 2 required positional arguments; it is called "
     "with 1: extract_final_answer(text)"),
    ("keyword_only", "def score(output, example, *, scale):\n    return 1.0\n",
     "score(output, example, *, scale) has required keyword-only arguments (scale); it is called "
     "as score(output, example)"),
    ("async", "async def score(output, example):\n    return 1.0\n",
     "score is async; it must be a plain function: def score(output, example)"),
    ("not_a_function", "score = 0.5\n",
     "score is float, not a function: def score(output, example)"),
    ("defines_nothing", "def extract_answer(text):\n    return text\n",
     "defines none of extract_final_answer, check_answer_exact_match, check_answer_contains, "
     "check_answer_equivalent, score; did you mean extract_final_answer?"),
]


@pytest.mark.parametrize("source, message", [c[1:] for c in LOAD_ERRORS],
                         ids=[c[0] for c in LOAD_ERRORS])
def test_a_broken_grader_is_one_line_naming_file_and_function(tmp_path, source, message):
    path = grader_file(tmp_path, source)
    with pytest.raises(ConfigError) as error:
        Grader(path)
    assert str(error.value) == f"GRADER {path}: {message}"


def test_defaults_varargs_and_lambdas_are_accepted(tmp_path):
    source = ("def extract_final_answer(text, strict=False):\n    return text.strip()\n"
              "def check_answer_contains(*args):\n    return False\n"
              "check_answer_exact_match = lambda pred, ref: pred.lower() == ref.lower()\n")
    with Grader(grader_file(tmp_path, source)) as grader:
        assert grader.defines == ("check_answer_contains", "check_answer_exact_match",
                                  "extract_final_answer")
        assert grader.grade(" Paris ", "paris") == Grade("Paris", True, False, True,
                                                         no_answer=False)


def test_missing_and_non_python_files(tmp_path):
    with pytest.raises(ConfigError, match="nope.py: file not found"):
        Grader(tmp_path / "nope.py")
    text = grader_file(tmp_path, "x", "grader.txt")
    with pytest.raises(ConfigError, match=r"grader.txt: must be a Python file \(.py\)"):
        Grader(text)
    with pytest.raises(ConfigError, match="GRADER_TIMEOUT_SECONDS=0: must be positive"):
        Grader(None, timeout_seconds=0)


# -- broken graders: caught on one output, and the run goes on ----------------------------------------

RUN_ERRORS = [
    ("raises", "def extract_final_answer(text):\n    x = 1\n    raise ValueError('bad  input\\n')\n",
     "extract_final_answer raised ValueError: bad input (line 3)"),
    ("extract_returns_int", "def extract_final_answer(text):\n    return 3\n",
     "extract_final_answer returned int 3; it must return a str or None"),
    ("check_returns_str", "def check_answer_exact_match(pred, ref):\n    return 'yes'\n",
     "check_answer_exact_match returned str 'yes'; it must return a bool"),
    ("contains_returns_int", "def check_answer_contains(output, ref):\n    return 1\n",
     "check_answer_contains returned int 1; it must return a bool"),
    ("score_above_one", "def score(output, example):\n    return 1.5\n",
     "score returned float 1.5; it must return a number in [0, 1]"),
    ("score_nan", "def score(output, example):\n    return float('nan')\n",
     "score returned float nan; it must return a number in [0, 1]"),
    ("score_none", "def score(output, example):\n    pass\n",
     "score returned NoneType None; it must return a number in [0, 1]"),
    ("exits", "import sys\ndef score(output, example):\n    sys.exit(2)\n",
     "score raised SystemExit: 2 (line 3)"),
    ("dies", "import os\ndef score(output, example):\n    os._exit(3)\n",
     "the grader's process exited (code 3) in score"),
    ("interrupts", "def extract_final_answer(text):\n    raise KeyboardInterrupt\n",
     "extract_final_answer raised KeyboardInterrupt:  (line 2)"),
    ("unprintable_error", "class Bad(Exception):\n    def __str__(self):\n        raise "
     "RuntimeError\ndef extract_final_answer(text):\n    raise Bad()\n",
     "extract_final_answer raised Bad: <Bad that cannot be shown> (line 5)"),
    ("lone_surrogate", "def extract_final_answer(text):\n    return '\\ud800'\n",
     "extract_final_answer returned a str that is not valid Unicode ('\\ud800')"),
]


@pytest.mark.parametrize("source, message", [c[1:] for c in RUN_ERRORS],
                         ids=[c[0] for c in RUN_ERRORS])
def test_a_failing_grader_function_is_a_grading_error_on_that_output(tmp_path, source, message):
    with Grader(grader_file(tmp_path, source)) as grader:
        for _ in range(2):  # and again: the worker survives, or is restarted
            assert grader.grade(r"\boxed{5}", "5", {}) == Grade(
                extracted=None, exact_match=False, contains=False, equivalent=False,
                no_answer=False, error=f"my_grading.py: {message}")
        assert grader.reward(r"\boxed{5}", "5", {}) == 0.0


def test_a_hung_grader_times_out_is_stopped_and_the_next_output_is_graded(tmp_path):
    source = ("def extract_final_answer(text):\n"
              "    while text == 'hang':\n        pass\n"
              "    return text.strip()\n")
    with Grader(grader_file(tmp_path, source), timeout_seconds=0.5) as grader:
        first_worker = grader._worker.process
        start = time.monotonic()
        verdict = grader.grade("hang", "5")
        assert time.monotonic() - start < 5
        assert verdict.error == ("my_grading.py: extract_final_answer did not return within "
                                 "0.5 s (GRADER_TIMEOUT_SECONDS); stopped")
        assert first_worker.poll() is not None  # killed
        assert grader.grade(" 5 ", "5") == Grade("5", True, True, True, no_answer=False)


def test_writing_to_descriptor_1_or_closing_it_cannot_break_the_replies(tmp_path):
    """The worker's replies travel on a descriptor of their own: a file that writes to stdout by
    any route is graded as usual, and one that closes it and hangs times out."""
    noisy = ("import os, sys\ndef extract_final_answer(text):\n    os.write(1, b'debug\\n')\n"
             "    os.system('echo from-shell')\n    print('x', file=sys.__stdout__)\n"
             "    return text.strip()\n")
    with Grader(grader_file(tmp_path, noisy)) as grader:
        assert grader.grade(" 5 ", "5") == Grade("5", True, True, True, no_answer=False)
    closes = "import os, time\ndef extract_final_answer(text):\n    os.close(1)\n    time.sleep(600)\n"
    with Grader(grader_file(tmp_path, closes), timeout_seconds=0.5) as grader:
        start = time.monotonic()
        assert grader.grade("5", "5").error == (
            "my_grading.py: extract_final_answer did not return within 0.5 s "
            "(GRADER_TIMEOUT_SECONDS); stopped")
        assert time.monotonic() - start < 5


def test_a_stopped_grader_takes_what_it_started_with_it(tmp_path):
    marker = tmp_path / "child.pid"
    source = ("import os, subprocess, sys\n"
              "def extract_final_answer(text):\n"
              "    child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
              f"    open({str(marker)!r}, 'w').write(str(child.pid))\n"
              "    child.wait()\n")
    with Grader(grader_file(tmp_path, source), timeout_seconds=1.0) as grader:
        assert "did not return within 1 s" in grader.grade("5", "5").error
    child = int(marker.read_text())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and Path(f"/proc/{child}").exists() \
            and "Z" not in Path(f"/proc/{child}/stat").read_text().split()[2]:
        time.sleep(0.05)
    assert not Path(f"/proc/{child}").exists() or \
        Path(f"/proc/{child}/stat").read_text().split()[2] == "Z"  # killed (a zombie until reaped)


def test_a_grader_changed_during_the_run_is_not_silently_mixed_in(tmp_path):
    path = grader_file(tmp_path, "def extract_final_answer(text):\n"
                                 "    while text == 'hang':\n        pass\n    return text\n")
    with Grader(path, timeout_seconds=0.5) as grader:
        assert grader.grade("hang", "5").error.endswith("stopped")
        path.write_text("def extract_final_answer(text):\n    return '5'\n")
        assert grader.grade("4", "5").error == (
            f"GRADER {path}: the file changed since the run started (sha256 differs); restart "
            "the run to grade with the new version")


def test_evaluation_goes_on_counts_and_reports_grading_errors(tokenizer, tmp_path):
    source = ("def extract_final_answer(text):\n"
              "    if 'not sure' in text:\n        raise KeyError('unsure')\n"
              "    return None\n")
    path = grader_file(tmp_path, source)
    with Grader(path) as grader:
        result = run_questions(tokenizer, grader)
    outputs = [e["outputs"][0] for e in result.examples]
    assert [o["grading_error"] for o in outputs] == [
        None, None, "my_grading.py: extract_final_answer raised KeyError: 'unsure' (line 3)", None]
    m = result.metrics
    assert (m["grading_errors"], m["no_answer"], m["accuracy_equivalent"]) == (1, 3, 0.0)
    assert m["accuracy_contains"] == 0.25  # "5" in the first output: built in, still judged
    assert result.warnings == [
        "the grader failed on 1 of 4 outputs (counted as wrong); the first, example 2: "
        "my_grading.py: extract_final_answer raised KeyError: 'unsure' (line 3)"]

    sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
    write_results(result, tmp_path / "results.json")
    assert load_results(tmp_path / "results.json")["grader"] == {
        "file": str(path), "sha256": sha256, "defines": ["extract_final_answer"],
        "timeout_seconds": 10.0}
    write_report(result, tmp_path / "results.md")
    report = (tmp_path / "results.md").read_text()
    assert (f"Grader: {path} (sha256 {sha256}; defines extract_final_answer; the rest built in)"
            in report)
    assert "| grading_errors | 1 |" in report
    assert ("## Grading errors (1 outputs, counted as wrong)\n\n- Example 2 (test:What is ), "
            "sample 0: my_grading.py: extract_final_answer raised KeyError: 'unsure' (line 3)"
            in report)
    assert "Grading error: my_grading.py: extract_final_answer raised KeyError" in report


def test_compare_warns_when_the_graders_differ(tokenizer, tmp_path):
    write_results(run_questions(tokenizer, None), tmp_path / "before.json")
    path = grader_file(tmp_path, LAST_NUMBER)
    with Grader(path) as grader:
        write_results(run_questions(tokenizer, grader), tmp_path / "after.json")
    console = Console(record=True, width=400)
    comparison = compare_results(load_results(tmp_path / "before.json"),
                                 load_results(tmp_path / "after.json"), console,
                                 names=("before.json", "after.json"))
    printed = console.export_text()
    assert ("Warning: before.json and after.json were graded by different graders (Grader: "
            "built-in, Grader: " + str(path)) in printed
    assert "a changed verdict may be the grader's, not the model's" in printed
    assert (comparison["improved"], comparison["regressed"]) == (1, 0)


# -- config and command line ----------------------------------------------------------------------

def test_grader_in_config_files_and_on_the_command_line(tmp_path, monkeypatch):
    path = grader_file(tmp_path, LAST_NUMBER)
    config_file = tmp_path / "cfg.toml"
    config_file.write_text(f'GRADER = "{path}"\nGRADER_TIMEOUT_SECONDS = 2.5\n')
    config = load_config(config_file)
    assert (config.grader, config.grader_timeout_seconds) == (str(path), 2.5)
    assert GraderConfig.from_config(config) == GraderConfig(str(path), 2.5)
    assert config.dump()["GRADER"] == str(path)
    assert TrainConfig().grader is None and GraderConfig().timeout_seconds == 10.0
    # A relative path is from the working directory, as DATA_FILES.
    monkeypatch.chdir(tmp_path)
    assert load_config(None, grader="my_grading.py").grader == "my_grading.py"
    monkeypatch.chdir(tmp_path.parent)
    with pytest.raises(ConfigError) as error:
        load_config(None, grader="my_grading.py")
    assert str(error.value) == (f"invalid config: the command line: GRADER='my_grading.py': file "
                                f"not found (relative to the working directory {tmp_path.parent})")
    with pytest.raises(ConfigError, match="GRADER_TIMEOUT_SECONDS=0"):
        load_config(None, ["GRADER_TIMEOUT_SECONDS=0"])
    parser = cli.build_parser()
    assert parser.parse_args(["eval", "--grader", "g.py"]).grader == "g.py"
    assert parser.parse_args(["train", "--grader", "g.py"]).grader == "g.py"


def test_a_broken_grader_stops_eval_before_the_model_loads(tmp_path, monkeypatch, capsys):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("tinkerkit.evaluate.create_sampling_client", no_model)
    monkeypatch.setattr("tinkerkit.evaluate.load_conversations", no_model)
    path = grader_file(tmp_path, "def score(output):\n    return 1.0\n")
    data = tmp_path / "test.jsonl"
    data.write_text(json.dumps({"question": "1+1?", "answer": "#### 2"}) + "\n")
    assert cli.main(["eval", "--data", str(data), "--grader", str(path),
                     "--output", str(tmp_path / "out.json")]) == 1
    assert capsys.readouterr().err == (
        f"error: GRADER {path}: score(output) takes at most 1 positional argument; it is called "
        "with 2: score(output, example)\n")
    with pytest.raises(ConfigError, match="takes at most 1"):
        run_evaluation(load_config(None, grader=str(path)), [str(data)],
                       output=tmp_path / "out.json")
    assert not (tmp_path / "out.json").exists()


def test_a_broken_grader_stops_training_before_the_model_loads(tmp_path, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("tinkerkit.train.loop.engines.create_training_client", no_model)
    path = grader_file(tmp_path, "def extract_final_answer(text)\n")
    with pytest.raises(ConfigError) as error:
        train(TrainConfig(grader=str(path)), run_dir=tmp_path / "run", console=Console(quiet=True))
    assert str(error.value) == f"GRADER {path}: line 1: expected ':' (SyntaxError)"
    assert not (tmp_path / "run").exists()


def test_a_grader_nothing_uses_in_training_is_checked_and_noted(tmp_path, smol_tokenizer):
    path = grader_file(tmp_path, LAST_NUMBER)
    console = Console(record=True, width=300)
    assert held_out_module.load_held_out(TrainConfig(grader=str(path)), smol_tokenizer,
                                         console) is None
    assert (f"Note: GRADER={path} grades `tinkerkit eval` and SAMPLE_EVAL_EVERY; "
            "SAMPLE_EVAL_EVERY is 0, so nothing is graded during training") in console.export_text()


# -- the example multiple-choice grader --------------------------------------------------------------

MULTIPLE_CHOICE_CASES = [  # output, reference, extracted, correct
    ("The answer is C", "C", "C", True),
    ("the answer is (c).", "C", "C", True),
    ("The answer is C because 42 is larger.", "C", "C", True),
    ("The correct option is C.", "C", "C", True),
    (r"\boxed{C}", "C", "C", True),
    (r"So it is $\boxed{\text{(C)}}$.", "(C)", "C", True),
    (r"The answer is $\text{(C)}$", "C", "C", True),
    ("Answer: C", "C", "C", True),
    ("**Answer:** (C) 42", "C) 42", "C", True),
    ("**C**", "C", "C", True),
    ("(C)", "C", "C", True),
    ("C)", "C", "C", True),
    ("C.", "C", "C", True),
    ("c", "C", "C", True),
    ("C) 42, since 6 * 7 = 42", "C", "C", True),
    ("I compute 42, which is option (C).", "C", "C", True),
    ("After checking each option, I choose B", "C", "B", False),
    ("The answer is C. Option D is wrong because it is odd.", "C", "C", True),
    ("Between (A) and (C), the answer is (A).", "C", "A", False),
    ("#### D", "D", "D", True),
    ("The answer is a number between 1 and 5", "A", None, False),
    ("A man walked into the room.", "A", None, False),
    ("I think it is 42", "C", None, False),
    ("", "C", None, False),
]


@pytest.fixture(scope="module")
def multiple_choice():
    with Grader(MULTIPLE_CHOICE) as grader:
        yield grader


@pytest.mark.parametrize("output, reference, extracted, correct", MULTIPLE_CHOICE_CASES)
def test_the_multiple_choice_grader(multiple_choice, output, reference, extracted, correct):
    verdict = multiple_choice.grade(output, reference)
    assert (verdict.extracted, verdict.exact_match, verdict.equivalent, verdict.error) == \
        (extracted, correct, correct, None)


def test_the_multiple_choice_grader_contains_only_option_labels(multiple_choice):
    assert multiple_choice.grade("Carol picks (C).", "C").contains is True
    assert multiple_choice.grade("Carol picks B", "C").contains is False  # not the C of Carol
    assert multiple_choice.defines == ("check_answer_contains", "check_answer_equivalent",
                                       "check_answer_exact_match", "extract_final_answer")


def test_the_side_by_side_example_prints_both_accuracies(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    monkeypatch.setattr(sys, "argv", ["multiple_choice_eval.py"])
    import multiple_choice_eval

    data = tmp_path / "mc.jsonl"
    records = multiple_choice_eval.write_questions(data)
    results = multiple_choice_eval.evaluate_canned(data, records)
    builtin, example = (results[name].metrics for name in ("built-in", MULTIPLE_CHOICE.name))
    assert (builtin["accuracy_exact_match"], builtin["accuracy_equivalent"],
            builtin["no_answer"]) == (0.05, 0.2, 13)
    assert (example["accuracy_exact_match"], example["accuracy_equivalent"],
            example["no_answer"], example["grading_errors"]) == (0.8, 0.8, 0, 0)
