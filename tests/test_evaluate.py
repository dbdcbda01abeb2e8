"""The evaluation pipeline with a fake sampling client and the real SmolLM2 tokenizer."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import tinker
from rich.console import Console

from tinkerkit.config import load_config
from tinkerkit.data.conversation import Conversation, Message
from tinkerkit.errors import ConfigError, DataError, EngineError
from tinkerkit.evaluate import (
    EvalSettings,
    _pass_at_k_values,
    compare_results,
    evaluate,
    load_results,
    pass_at_k,
    print_summary,
    run_evaluation,
    write_report,
    write_results,
)
from tinkerkit.models import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("smollm2-135m-instruct")


class FakeFuture:
    def __init__(self, client: FakeSamplingClient, response):
        self.client, self.response = client, response

    def result(self):
        self.client.log.append("result")
        return self.response


class FakeSamplingClient:
    """Answers each prompt (keyed by its text) with canned (text, stop_reason) samples."""

    def __init__(self, tokenizer, answers: dict[str, list[tuple[str, str]]]):
        self.tokenizer, self.answers = tokenizer, answers
        self.log: list[str] = []
        self.params: list[tinker.types.SamplingParams] = []

    def sample(self, prompt, num_samples, sampling_params):
        self.log.append("sample")
        self.params.append(sampling_params)
        canned = self.answers[self.tokenizer.decode(prompt.to_ints())]
        sequences = []
        for i, (text, stop_reason) in enumerate(canned[:num_samples]):
            tokens = self.tokenizer.encode(text, add_special_tokens=False)
            if stop_reason == "stop":
                tokens.append(self.tokenizer.eos_token_id)  # decoded without special tokens
            sequences.append(tinker.types.SampledSequence(
                stop_reason=stop_reason, sequence_id=f"{len(self.log)}-{i}",
                tokens_np=np.array(tokens, dtype=np.int32)))
        return FakeFuture(self, tinker.types.SampleResponse(sequences=sequences))


def conversation(question: str, reference: str | None) -> Conversation:
    return Conversation(messages=(Message(role="user", content=question),),
                        reference_answer=reference, source=f"test:{question[:8]}")


QUESTIONS = [  # question, reference, canned output, stop reason
    ("What is 2+3?", "5", r"2+3 = 5. The answer is \boxed{5}.", "stop"),
    ("What is half of 1?", "0.5", r"Half of one is \boxed{\frac{1}{2}}", "stop"),
    ("What is 3+4?", "7", "I am not sure, maybe 7", "stop"),
    ("What is 3*4?", "12", "First, 3 * 4 = 1", "length"),  # cut by max_tokens
]


def build_prompt_for(tokenizer):
    return lambda c: tinker.types.ModelInput.from_ints(
        tokenizer.encode(c.messages[-1].content, add_special_tokens=False))


def run_four(tokenizer, answers=None, **settings):
    answers = answers or {q: [(out, stop)] for q, _, out, stop in QUESTIONS}
    client = FakeSamplingClient(tokenizer, answers)
    result = evaluate([conversation(q, ref) for q, ref, _, _ in QUESTIONS], client,
                      build_prompt_for(tokenizer), tokenizer, EvalSettings(**settings),
                      console=Console(record=True, width=120))
    return client, result


def test_pass_at_k_known_values():
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(5, 0, 2) == 0
    assert pass_at_k(4, 4, 2) == 1
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - math.comb(7, 5) / math.comb(10, 5))
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2) = 1 - 3/6


def test_pass_at_k_rejects_impossible_arguments():
    with pytest.raises(ConfigError, match="k=5"):
        pass_at_k(4, 1, 5)
    with pytest.raises(ConfigError, match="c=5"):
        pass_at_k(4, 5, 1)


def test_pass_at_k_values_are_one_powers_of_two_and_k():
    assert _pass_at_k_values(1) == [1]
    assert _pass_at_k_values(4) == [1, 2, 4]
    assert _pass_at_k_values(6) == [1, 2, 4, 6]
    assert _pass_at_k_values(16) == [1, 2, 4, 8, 16]


def test_evaluate_four_examples_exact_metrics(tokenizer):
    client, result = run_four(tokenizer, max_tokens=64, seed=7)
    # Every request is submitted before the first result is awaited.
    assert client.log == ["sample"] * 4 + ["result"] * 4
    assert [p.seed for p in client.params] == [7, 8, 9, 10]
    assert {(p.max_tokens, p.temperature, p.top_p, p.top_k, p.stop) for p in client.params} == {
        (64, 0.0, 1.0, -1, None)}

    generated = [len(tokenizer.encode(out, add_special_tokens=False)) + (stop == "stop")
                 for _, _, out, stop in QUESTIONS]
    m = result.metrics
    assert m["num_examples"] == 4 and m["num_graded"] == 4 and m["num_without_reference"] == 0
    assert m["accuracy_exact_match"] == 0.25  # only \boxed{5}
    assert m["accuracy_equivalent"] == 0.5  # \boxed{5} and \frac{1}{2} ~ 0.5
    assert m["accuracy_contains"] == 0.5  # "5" and "maybe 7"
    assert m["no_answer"] == 2 and m["truncated"] == 1 and m["equivalence_timeouts"] == 0
    assert m["generated_tokens"] == sum(generated)
    assert m["mean_output_tokens"] == sum(generated) / 4
    assert m["tokens_per_second"] == pytest.approx(sum(generated) / m["wall_seconds"])
    assert not any(name.startswith("pass@") for name in m)

    first, second, third, fourth = result.examples
    assert first["outputs"][0]["text"] == QUESTIONS[0][2]  # EOS skipped when decoding
    assert first["prompt"] == "What is 2+3?" and first["question"] == "What is 2+3?"
    assert (first["num_correct"], second["num_correct"], third["num_correct"]) == (1, 1, 0)
    assert second["outputs"][0]["extracted"] == r"\frac{1}{2}"
    assert third["outputs"][0]["extracted"] is None and third["outputs"][0]["contains"] is True
    assert fourth["outputs"][0]["stop_reason"] == "length"


def test_evaluate_pass_at_k_and_missing_reference(tokenizer):
    conversations = [conversation("A?", "1"), conversation("B?", "2"), conversation("C?", None)]
    answers = {
        "A?": [(r"\boxed{1}", "stop")] + [(r"\boxed{9}", "stop")] * 3,  # 1 of 4 correct
        "B?": [(r"\boxed{2}", "stop"), (r"\boxed{2.0}", "stop")] + [("no idea", "stop")] * 2,
        "C?": [("#### 3", "stop")] * 4,
    }
    client = FakeSamplingClient(tokenizer, answers)
    console = Console(record=True, width=120)
    result = evaluate(conversations, client, build_prompt_for(tokenizer), tokenizer,
                      EvalSettings(num_samples=4), console=console)
    m = result.metrics
    assert (m["num_examples"], m["num_graded"], m["num_without_reference"]) == (3, 2, 1)
    assert m["accuracy_equivalent"] == 3 / 8
    assert m["pass@1"] == pytest.approx(3 / 8)  # mean(1/4, 2/4)
    assert m["pass@2"] == pytest.approx((0.5 + 5 / 6) / 2)  # A: 1 - 3/6, B: 1 - 1/6
    assert m["pass@4"] == 1.0
    assert m["no_answer"] == 2  # the two "no idea"; C's "#### 3" is extracted
    assert result.examples[2]["num_correct"] is None
    assert result.examples[2]["outputs"][0]["equivalent"] is None
    assert "excluded from accuracy" in console.export_text()


def test_evaluate_limit(tokenizer):
    client, result = run_four(tokenizer, limit=2)
    assert result.metrics["num_examples"] == 2 and len(client.params) == 2


def test_evaluate_rejects_bad_settings_and_short_responses(tokenizer):
    with pytest.raises(ConfigError, match="num_samples = 0"):
        run_four(tokenizer, num_samples=0)
    with pytest.raises(EngineError, match="returned 1 sequences"):
        run_four(tokenizer, num_samples=2)  # the canned answers hold one sample each


def test_a_refused_request_names_its_example(tokenizer):
    class Refusing(FakeSamplingClient):
        def sample(self, prompt, num_samples, sampling_params):
            if self.tokenizer.decode(prompt.to_ints()) == QUESTIONS[2][0]:
                raise EngineError("prompt of 9 tokens is too long: the model has 8 positions")
            return super().sample(prompt, num_samples, sampling_params)

    client = Refusing(tokenizer, {q: [(out, stop)] for q, _, out, stop in QUESTIONS})
    with pytest.raises(EngineError) as caught:
        evaluate([conversation(q, ref) for q, ref, _, _ in QUESTIONS], client,
                 build_prompt_for(tokenizer), tokenizer, EvalSettings(),
                 console=Console(record=True, width=120))
    assert str(caught.value) == ("example 2 (test:What is ): prompt of 9 tokens is too long: "
                                 "the model has 8 positions")
    assert client.log == ["sample", "sample"]  # nothing awaited before the refusal


def test_results_round_trip_and_report(tokenizer, tmp_path):
    _, result = run_four(tokenizer)
    path = tmp_path / "evaluation_results.json"
    write_results(result, path, config={"model": "smollm2-135m-instruct"})
    data = load_results(path)
    assert data["metrics"] == result.metrics
    assert data["examples"] == result.examples
    assert data["config"] == {"model": "smollm2-135m-instruct"}
    assert data["settings"]["max_tokens"] == 512

    report_path = tmp_path / "evaluation_report.md"
    write_report(result, report_path, n_examples=1)
    report = report_path.read_text(encoding="utf-8")
    assert "| accuracy_equivalent | 0.5000 |" in report
    correct, incorrect = report.split("## Incorrect examples")
    assert "What is 2+3?" in correct and r"Extracted: `5`" in correct
    assert "What is half of 1?" not in report  # n_examples=1: only the first of each kind
    assert "What is 3+4?" in incorrect and "Extracted: `None`" in incorrect


def test_load_results_errors(tmp_path):
    with pytest.raises(DataError, match="no such evaluation results file"):
        load_results(tmp_path / "missing.json")
    broken = tmp_path / "broken.json"
    broken.write_text('{\n  "metrics": {,\n}', encoding="utf-8")
    with pytest.raises(DataError, match=r"broken.json:2: invalid JSON"):
        load_results(broken)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"examples": []}), encoding="utf-8")
    with pytest.raises(DataError, match="field 'metrics'"):
        load_results(other)


def test_compare_shows_changed_example(tokenizer, tmp_path):
    _, before = run_four(tokenizer)
    answers = {q: [(out, stop)] for q, _, out, stop in QUESTIONS}
    answers["What is 3+4?"] = [(r"3+4 = \boxed{7}", "stop")]  # now correct
    _, after = run_four(tokenizer, answers=answers)
    write_results(before, tmp_path / "before.json")
    write_results(after, tmp_path / "after.json")

    console = Console(record=True, width=160)
    comparison = compare_results(load_results(tmp_path / "before.json"),
                                 load_results(tmp_path / "after.json"), console)
    assert comparison["matched"] == 4
    assert (comparison["improved"], comparison["regressed"]) == (1, 0)
    [change] = comparison["changed"]
    assert change["question"] == "What is 3+4?"
    assert change["before"] == {"num_correct": 0, "extracted": None}
    assert change["after"] == {"num_correct": 1, "extracted": "7"}
    assert comparison["metrics"]["accuracy_equivalent"]["before"] == 0.5
    assert comparison["metrics"]["accuracy_equivalent"]["delta"] == pytest.approx(0.25)
    assert comparison["metrics"]["no_answer"]["delta"] == -1
    printed = console.export_text()
    assert "What is 3+4?" in printed and "1 of 4 matched" in printed


def test_compare_only_what_the_files_share(tokenizer, tmp_path):
    _, before = run_four(tokenizer)  # accuracy 0.5: 2+3 and half of 1 right
    answers = {q: [(out, stop)] for q, _, out, stop in QUESTIONS}
    answers["What is 3+4?"] = [(r"3+4 = \boxed{7}", "stop")]
    _, after = run_four(tokenizer, answers=answers, limit=3)  # the first three only
    other = evaluate([conversation("What is 9+9?", "18")],
                     FakeSamplingClient(tokenizer, {"What is 9+9?": [("18", "stop")]}),
                     build_prompt_for(tokenizer), tokenizer, EvalSettings(), progress=False)
    for name, result in (("before", before), ("after", after), ("other", other)):
        write_results(result, tmp_path / f"{name}.json")
    load = lambda name: load_results(tmp_path / f"{name}.json")  # noqa: E731

    console = Console(record=True, width=200)
    comparison = compare_results(load("before"), load("after"), console,
                                 names=("before.json", "after.json"))
    printed = console.export_text()
    assert ("Warning: only 3 examples' prompts are in both files (before.json: 4, after.json: 3); "
            "comparing those 3") in printed
    accuracy = comparison["metrics"]["accuracy_equivalent"]  # on the three shared prompts
    assert (accuracy["before"], accuracy["after"]) == (pytest.approx(2 / 3), 1.0)
    assert comparison["metrics"]["num_examples"]["before"] == 3
    assert "wall_seconds" not in comparison["metrics"]
    assert comparison["matched"] == 3

    with pytest.raises(DataError) as error:
        compare_results(load("before"), load("other"), Console(record=True),
                        names=("before.json", "other.json"))
    assert str(error.value) == ("before.json and other.json share no prompt (4 and 1 examples): "
                                "results of different test sets cannot be compared")


def test_compare_pairs_a_repeated_prompt_with_its_repeat(tokenizer, tmp_path):
    """A test set may hold one prompt twice (the demo's does): the same test set is no partial
    overlap, and each repeat pairs with the other file's repeat."""
    answers = {"What is 2+3?": [(r"\boxed{5}", "stop")], "What is 3+4?": [("7", "stop")]}
    conversations = [conversation("What is 2+3?", "5"), conversation("What is 2+3?", "5"),
                     conversation("What is 3+4?", "7")]
    for name in ("before", "after"):
        result = evaluate(conversations, FakeSamplingClient(tokenizer, answers),
                          build_prompt_for(tokenizer), tokenizer, EvalSettings(), progress=False)
        write_results(result, tmp_path / f"{name}.json")
    console = Console(record=True, width=200)
    comparison = compare_results(load_results(tmp_path / "before.json"),
                                 load_results(tmp_path / "after.json"), console)
    assert comparison["matched"] == 3 and comparison["changed"] == []
    assert "Warning" not in console.export_text()
    assert comparison["metrics"]["num_examples"] == {"before": 3, "after": 3, "delta": 0}


def test_greedy_samples_warn_that_pass_at_k_is_pass_at_1(tokenizer, tmp_path):
    answers = {q: [(out, stop)] * 3 for q, _, out, stop in QUESTIONS}
    _, greedy = run_four(tokenizer, answers=answers, num_samples=3, temperature=0.0)
    warning = ("3 samples at temperature 0 are greedy, so identical: pass@k equals pass@1 "
               "(sample at a temperature above 0, top_k not 1, for pass@k)")
    assert greedy.warnings == [warning]
    console = Console(record=True, width=300)
    print_summary(greedy, console)
    assert f"Warning: {warning}" in console.export_text()
    write_report(greedy, tmp_path / "report.md")
    assert f"**Warning:** {warning}" in (tmp_path / "report.md").read_text()
    write_results(greedy, tmp_path / "results.json")
    assert load_results(tmp_path / "results.json")["warnings"] == [warning]
    _, sampled = run_four(tokenizer, answers=answers, num_samples=3, temperature=0.7)
    _, single = run_four(tokenizer, temperature=0.0)
    assert sampled.warnings == [] and single.warnings == []
    _, top_1 = run_four(tokenizer, answers=answers, num_samples=3, temperature=0.7, top_k=1)
    assert top_1.warnings == [warning.replace("at temperature 0", "with top_k 1")]


def test_output_named_md_and_limit_zero_are_refused(tmp_path):
    from tinkerkit.evaluate import EvalSettings, _check_writable

    with pytest.raises(ConfigError, match="give the results a .json name"):
        _check_writable(tmp_path / "results.md")  # the report would overwrite the results
    with pytest.raises(ConfigError, match="limit"):
        EvalSettings(limit=0).validate()


def test_eval_settings_follow_the_sampling_rules():
    with pytest.raises(ConfigError) as error:
        EvalSettings(top_k=0).validate()
    assert str(error.value) == "evaluation settings: top_k = 0: must be -1 (off) or at least 1"
    with pytest.raises(ConfigError) as error:
        EvalSettings(top_p=0.0, num_samples=0).validate()  # every problem at once
    assert str(error.value) == ("evaluation settings: top_p = 0.0: must be in (0, 1] (1 is off); "
                                "num_samples = 0: must be at least 1")
    EvalSettings(top_k=-1).validate()
    EvalSettings(top_k=1, temperature=0.7, top_p=0.9, max_tokens=1).validate()


def test_eval_settings_defaults_are_the_configs():
    from tinkerkit.config import TrainConfig

    settings, config = EvalSettings(), TrainConfig()
    assert (settings.max_tokens, settings.temperature, settings.top_p, settings.top_k,
            settings.stop, settings.limit) == (512, 0.0, 1.0, -1, None, None)
    assert (settings.max_tokens, settings.temperature, settings.top_p, settings.top_k,
            settings.stop, settings.limit) == (config.max_tokens, config.temperature,
                                               config.top_p, config.top_k, config.stop,
                                               config.eval_limit)
    assert (settings.num_samples, settings.seed) == (1, 0)  # evaluation's own


def test_a_prompt_longer_than_the_models_positions_is_skipped_counted_and_reported(tiny_model,
                                                                                  tmp_path):
    data = tmp_path / "test.jsonl"
    long_question = "What is " + " plus ".join(["1"] * 400) + "?"  # > 512 tokens
    rows = [{"question": "What is 2 + 2?", "answer": "#### 4"},
            {"question": long_question, "answer": "#### 400"},
            {"question": "What is 3 + 3?", "answer": "#### 6"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = load_config(None, [f"BASE_MODEL={tiny_model}", "MAX_TOKENS=4", "DEVICE=cpu"])
    output = tmp_path / "eval.json"
    result = run_evaluation(config, [str(data)], output=output, console=Console(file=io.StringIO()))
    assert result.metrics["skipped_too_long"] == 1
    assert result.metrics["num_examples"] == 2
    assert [e["source"] for e in result.examples] == [f"{data}:1", f"{data}:3"]
    warning = (f"1 example(s) skipped: the prompt is longer than the 511 tokens the model's "
               f"positions leave to sample from ({data}:2)")
    assert result.warnings == [warning]
    saved = json.loads(output.read_text())
    assert saved["metrics"]["skipped_too_long"] == 1 and saved["warnings"] == [warning]
    report = output.with_suffix(".md").read_text()
    assert "| skipped_too_long | 1 |" in report and warning in report
