"""The demo data: deterministic, varied, arithmetically correct, short, loadable as GSM8K."""

from __future__ import annotations

import re

import pytest

from tinkerkit.data.demo import (
    TEMPLATES,
    generate_demo_problems,
    generate_long_reasoning_records,
    write_demo_data,
    write_long_demo_data,
)
from tinkerkit.data.formats import load_conversations
from tinkerkit.errors import ConfigError

STEP = re.compile(r"([\d ()+\-*/]+) = (\d+)\b")


def test_deterministic_by_seed():
    assert generate_demo_problems(50, seed=3) == generate_demo_problems(50, seed=3)
    assert generate_demo_problems(50, seed=3) != generate_demo_problems(50, seed=4)
    assert len(generate_demo_problems(17, seed=0)) == 17


def test_first_record_pinned():
    assert generate_demo_problems(1, seed=0) == [{
        "question": "A baker makes 32 pies, sells 9 and gives away 17. How many pies are left?",
        "answer": "After selling: 32 - 9 = 23.\nAfter giving away: 23 - 17 = 6.\n#### 6"}]


def test_every_step_is_correct_and_ends_in_the_answer():
    for record in generate_demo_problems(300, seed=1):
        *steps, final = record["answer"].split("\n")
        assert 1 <= len(steps) <= 3 and final.startswith("#### ")
        results = []
        for step in steps:
            expression, result = STEP.search(step).groups()
            # eval is safe here: STEP admits only digits, spaces, parentheses and + - * /
            assert eval(expression.strip()) == int(result), step
            results.append(int(result))
        assert final == f"#### {results[-1]}"
        assert len(record["answer"]) < 160  # about 50 tokens at most


def test_templates_are_varied():
    assert len(TEMPLATES) >= 6
    openings = {" ".join(r["question"].split()[1:3]) for r in generate_demo_problems(400, seed=2)}
    assert len(openings) >= 6
    step_counts = {r["answer"].count("\n") for r in generate_demo_problems(400, seed=2)}
    assert step_counts == {1, 2, 3}


def test_write_and_load_as_gsm8k(tmp_path):
    path = write_demo_data(tmp_path / "demo.jsonl", n=20, seed=5)
    result = load_conversations([path])
    assert result.formats == {str(path): "question_answer"} and result.counts == {str(path): 20}
    expected = [r["answer"].rsplit("#### ", 1)[1] for r in generate_demo_problems(20, seed=5)]
    assert [c.reference_answer for c in result.conversations] == expected
    with pytest.raises(ConfigError, match="at least 1, got 0"):
        write_demo_data(tmp_path / "none.jsonl", n=0, seed=5)


def test_long_reasoning_records_load_with_thinking(tmp_path):
    records = generate_long_reasoning_records(3, seed=0, min_chars=5000)
    assert records == generate_long_reasoning_records(3, seed=0, min_chars=5000)
    loaded = load_conversations([write_long_demo_data(tmp_path / "long.jsonl", 3, 0, 5000)])
    assert len(loaded.conversations) == 3
    for record, conversation in zip(records, loaded.conversations):
        user, assistant = conversation.messages
        assert 5000 <= len(assistant.thinking) < 5400
        assert assistant.thinking.startswith("Let me solve this step by step.\n")
        assert assistant.content.endswith(f"#### {record['reference_answer']}")
        assert conversation.reference_answer == record["reference_answer"]
    first = records[0]["messages"]
    assert first[0]["content"] == generate_demo_problems(1, seed=0)[0]["question"]
    assert first[1]["content"] == "After selling: 32 - 9 = 23.\nAfter giving away: 23 - 17 = 6.\n#### 6"
