"""``tinkerkit split``: no prompt on both sides, byte-identical reruns, argument checks, report."""

from __future__ import annotations

import io
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from rich.console import Console

from tinkerkit.data.conversation import Conversation, Message
from tinkerkit.data.formats import load_conversations
from tinkerkit.data.split import run_split, split_conversations
from tinkerkit.errors import ConfigError, DataError


def gsm8k_file(tmp_path: Path) -> Path:
    """10 distinct questions, Q0 3 times and Q1 twice (other answers): 13 records, 1 broken line."""
    rows = [{"question": f"Q{i} how many?",
             "answer": f"{i} + 1 = <<{i}+1={i + 1}>>{i + 1}\n#### {i + 1}"} for i in range(10)]
    rows += [{"question": "Q0 how many?", "answer": "another way\n#### 1"},
             {"question": "Q1 how many?", "answer": "again\n#### 2"},
             {"question": "Q0 how many?", "answer": "third\n#### 1"}]
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"question": "broken"\n')
    return path


def quiet() -> Console:
    return Console(file=io.StringIO(), width=200)


def convo(prompt: str) -> Conversation:
    return Conversation(messages=(Message(role="user", content=prompt),
                                  Message(role="assistant", content="a")))


def test_no_prompt_on_both_sides_and_nothing_lost(tmp_path):
    result = run_split([gsm8k_file(tmp_path)], tmp_path / "out", test_ratio=0.25, seed=42,
                       on_error="skip", console=quiet())
    train_keys = {c.prompt_key for c in result.train}
    test_keys = {c.prompt_key for c in result.test}
    assert not train_keys & test_keys
    assert len(result.train) + len(result.test) == 13
    assert len(train_keys | test_keys) == 10
    assert len(result.test) >= 3  # round(0.25 * 13) = 3; more only if a duplicated group comes last


def test_pinned_assignment_for_seed(tmp_path):
    result = run_split([gsm8k_file(tmp_path)], tmp_path / "out", test_ratio=0.25, seed=42,
                       on_error="skip", console=quiet())
    # random.Random(42).shuffle(list(range(10))) == [7, 3, 2, 8, ...]: the first three groups
    # (single records) fill the test target round(0.25 * 13) = 3.
    assert sorted(c.messages[0].content for c in result.test) == [
        "Q2 how many?", "Q3 how many?", "Q7 how many?"]


def test_byte_identical_reruns(tmp_path):
    data = gsm8k_file(tmp_path)
    first = run_split([data], tmp_path / "a", seed=7, on_error="skip", console=quiet())
    second = run_split([data], tmp_path / "b", seed=7, on_error="skip", console=quiet())
    assert first.train_path.read_bytes() == second.train_path.read_bytes()
    assert first.test_path.read_bytes() == second.test_path.read_bytes()
    other = run_split([data], tmp_path / "c", seed=8, on_error="skip", console=quiet())
    assert other.train_path.read_bytes() != first.train_path.read_bytes()


def test_outputs_load_back_as_messages(tmp_path):
    result = run_split([gsm8k_file(tmp_path)], tmp_path / "out", test_size=4, on_error="skip",
                       console=quiet())
    assert result.train_path == tmp_path / "out" / "train_set.json"
    text = result.test_path.read_text(encoding="utf-8")
    assert text.startswith('[\n  {\n    "messages": [') and text.endswith("]\n")
    loaded = load_conversations([result.train_path, result.test_path])
    assert set(loaded.formats.values()) == {"messages"}
    strip = [c.model_copy(update={"source": None}) for c in loaded.conversations]
    assert strip == [c.model_copy(update={"source": None}) for c in result.train + result.test]
    assert all(c.reference_answer for c in loaded.conversations)


@pytest.mark.parametrize("ratio", [0, 1, 0.0, 1.0, -0.2, 1.5])
def test_bad_test_ratio_rejected(ratio):
    conversations = [convo(f"p{i}") for i in range(5)]
    with pytest.raises(ConfigError,
                       match=rf"--test-ratio must be in \(0, 1\) exclusive, got {ratio}"):
        split_conversations(conversations, ratio, None, seed=0)


@pytest.mark.parametrize("size", [0, 5, -1])
def test_bad_test_size_rejected(size):
    conversations = [convo(f"p{i}") for i in range(5)]
    with pytest.raises(ConfigError, match=rf"--test-size must be an integer in \[1, 4\] for 5 "
                                          rf"records, got {size}"):
        split_conversations(conversations, None, size, seed=0)


def test_fewer_than_two_prompts_rejected():
    with pytest.raises(DataError, match="need at least 2 distinct prompts to split, found 1 among"):
        split_conversations([convo("same")] * 3, 0.5, None, seed=0)


def test_sides_never_empty_with_a_large_group():
    conversations = [convo("big")] * 5 + [convo("b"), convo("c")]
    for seed in range(30):
        train, test = split_conversations(conversations, None, 6, seed)
        assert train and test and len(train) + len(test) == 7


def test_report(tmp_path):
    console = quiet()
    tokenizer = lambda text: SimpleNamespace(input_ids=text.split())  # noqa: E731  one token a word
    run_split([gsm8k_file(tmp_path)], tmp_path / "out", test_ratio=0.25, seed=42, on_error="skip",
              tokenizer=tokenizer, console=console)
    text = console.file.getvalue()
    assert "question_answer" in text and "data.jsonl" in text
    assert "skipped: 1 bad records" in text and "data.jsonl:14: invalid JSON" in text
    assert "duplicate prompts: 3 records repeat an earlier prompt" in text
    assert "train: 10 records" in text and "test:  3 records" in text
    assert "Lengths (characters)" in text and "Lengths (tokens, no chat template)" in text
    # Every prompt is 3 words; completions are 6 words ("0 + 1 = 1\n#### 1") or 4 / 3 words.
    token_prompt_row = text.split("Lengths (tokens")[1].split("prompt")[1].splitlines()[0]
    assert [c.strip() for c in token_prompt_row.split("│")[1:-1]] == [
        "13", "3", "3.0", "3.0", "3.0", "3"]


def test_split_refuses_to_overwrite_its_input(tmp_path):
    from tinkerkit.data.split import run_split
    from tinkerkit.errors import ConfigError

    data = tmp_path / "train_set.json"
    data.write_text('[{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}]')
    before = data.read_bytes()
    with pytest.raises(ConfigError, match="would overwrite the input file"):
        run_split([data], tmp_path)
    assert data.read_bytes() == before


def test_fewer_than_two_prompts_names_the_input_files(tmp_path):
    paths = []
    for name in ("a.jsonl", "b.jsonl"):
        path = tmp_path / name
        path.write_text('{"question": "Same?", "answer": "#### 1"}\n')
        paths.append(path)
    with pytest.raises(DataError) as info:
        run_split(paths, tmp_path / "out", console=quiet())
    assert str(info.value) == (f"need at least 2 distinct prompts to split, found 1 among 2 "
                               f"records of {paths[0]}, {paths[1]}")
