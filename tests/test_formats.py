"""Loading and normalizing data files: every record shape, every error, and the real data sets."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from helpers import SHARED_DATA
from tinkerkit.data.conversation import Conversation, Message
from tinkerkit.data.formats import FORMATS, detect_format, load_conversations, normalize_record
from tinkerkit.errors import ConfigError, DataError

DATA = SHARED_DATA
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"shared data not found at {DATA}")

BOM = b"\xef\xbb\xbf"
GOOD_1 = '{"question": "Q1?", "answer": "2 + 2 = <<2+2=4>>4\\n#### 4"}'
MALFORMED = '{"question": "Q2?", "answer": }'
NO_ANSWER = '{"question": "Q3?"}'
GOOD_4 = '{"question": "Q4?", "answer": "So 1000 + 234 = <<1000+234=1234>>1,234\\n#### 1,234"}'


def write(tmp_path: Path, name: str, lines: list[str], bom: bool = True) -> Path:
    path = tmp_path / name
    path.write_bytes((BOM if bom else b"") + "\r\n".join(lines).encode("utf-8") + b"\r\n")
    return path


def user(text: str) -> Message:
    return Message(role="user", content=text)


def assistant(text: str, thinking: str | None = None) -> Message:
    return Message(role="assistant", content=text, thinking=thinking)


# ------------------------------------------- a BOM + CRLF file: a malformed line, a missing field

def test_bom_crlf_file_raises_at_malformed_line(tmp_path):
    path = write(tmp_path, "mixed.jsonl", [GOOD_1, MALFORMED, NO_ANSWER, GOOD_4])
    with pytest.raises(DataError) as info:
        load_conversations([path])
    assert str(info.value) == f"{path}:2: invalid JSON: Expecting value (column 31)"
    assert (info.value.path, info.value.line) == (str(path), 2)


def test_bom_crlf_file_raises_at_missing_answer(tmp_path):
    path = write(tmp_path, "gap.jsonl", [GOOD_1, NO_ANSWER, GOOD_4])
    with pytest.raises(DataError) as info:
        load_conversations([path])
    assert str(info.value) == f"{path}:2: field 'answer': required field is missing"
    assert (info.value.line, info.value.field) == (2, "answer")


def test_bom_crlf_file_skip_mode_counts(tmp_path):
    path = write(tmp_path, "mixed.jsonl", [GOOD_1, MALFORMED, NO_ANSWER, GOOD_4])
    result = load_conversations([path], on_error="skip")
    assert result.skipped == [(f"{path}:2", "invalid JSON: Expecting value (column 31)"),
                              (f"{path}:3", "field 'answer': required field is missing")]
    assert result.counts == {str(path): 2}
    assert result.formats == {str(path): "question_answer"}
    first, last = result.conversations
    assert first == Conversation(messages=(user("Q1?"), assistant("2 + 2 = 4\n#### 4")),
                                 reference_answer="4", source=f"{path}:1")
    assert last.reference_answer == "1234" and last.source == f"{path}:4"


def test_format_detected_from_first_recognizable_record(tmp_path):
    # The first record matches no shape; the file is still GSM8K, so it gets a precise reason.
    path = write(tmp_path, "late.jsonl", [NO_ANSWER, GOOD_1], bom=False)
    result = load_conversations([path], on_error="skip")
    assert result.formats == {str(path): "question_answer"}
    assert result.skipped == [(f"{path}:1", "field 'answer': required field is missing")]


def test_record_of_another_shape_in_a_file_is_an_error(tmp_path):
    path = write(tmp_path, "two.jsonl", [GOOD_1, '{"instruction": "Hi", "output": "Hello"}'])
    with pytest.raises(DataError, match="two.jsonl:2: field 'question': required field is missing"):
        load_conversations([path])


# --------------------------------------------------------------------------- one case per format

def test_messages_with_system_thinking_and_boxed_reference():
    record = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 6 * 7?"},
        {"role": "assistant", "content": "It is \\boxed{42}.", "reasoning_content": "6*7=42"}]}
    assert normalize_record(record, None, "f.jsonl:1") == Conversation(
        messages=(Message(role="system", content="Be brief."), user("What is 6 * 7?"),
                  assistant("It is \\boxed{42}.", thinking="6*7=42")),
        reference_answer="42", source="f.jsonl:1")


def test_messages_multi_turn_gsm8k_style_reference():
    record = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                           {"role": "user", "content": "c"},
                           {"role": "assistant", "content": "d\n#### 25", "thinking": "t"}]}
    conversation = normalize_record(record, "messages", "f.jsonl:1")
    assert [m.role for m in conversation.messages] == ["user", "assistant", "user", "assistant"]
    assert conversation.messages[-1].thinking == "t"
    assert conversation.reference_answer == "25"


@pytest.mark.parametrize("fields, expected", [
    ({"thinking": None, "reasoning_content": "2+2=4"}, "2+2=4"),   # a null one is absent
    ({"thinking": "2+2=4", "reasoning_content": None}, "2+2=4"),
    ({"thinking": "2+2=4", "reasoning_content": "2+2=4"}, "2+2=4"),  # the same text twice
    ({"thinking": "  \n", "reasoning_content": "2+2=4"}, "2+2=4"),
    ({"thinking": ""}, None),
    ({"reasoning_content": " \n "}, None),                           # whitespace: no reasoning
])
def test_thinking_from_either_field(fields, expected):
    record = {"messages": [{"role": "user", "content": "What is 2+2?"},
                           {"role": "assistant", "content": "4", **fields}]}
    assert normalize_record(record, None, "f:3").messages[-1] == assistant("4", thinking=expected)


@pytest.mark.parametrize("content, thinking, answer", [
    ("<think>\nstep 1\n</think>\n\n4", "step 1", "4"),
    ("\n<think>step 1</think>4", "step 1", "4"),
    ("<think>\n\n</think>\n\n4", None, "4"),               # empty block: no reasoning
    ("<think>\nonly reasoning\n</think>", "only reasoning", ""),
    ("4 <think>x</think>", None, "4 <think>x</think>"),       # not at the start: left as it is
    ("<think>unclosed", None, "<think>unclosed"),
])
def test_reasoning_written_in_the_answer_is_taken_out(content, thinking, answer):
    record = {"messages": [{"role": "user", "content": "q"},
                           {"role": "assistant", "content": content}]}
    assert normalize_record(record, None, "f:3").messages[-1] == assistant(answer, thinking)
    completion = normalize_record({"prompt": "q", "completion": content}, None, "f:3")
    assert completion.messages[-1] == assistant(answer, thinking)


def test_reasoning_in_a_field_and_inline_is_read_once_when_equal():
    for thinking in ("b", "\nb\n"):
        record = {"messages": [{"role": "user", "content": "hi"},
                               {"role": "assistant", "content": "<think>b</think>yo",
                                "thinking": thinking}]}
        assert normalize_record(record, None, "f:3").messages[-1] == assistant("yo", thinking)
    empty_block = {"messages": [{"role": "user", "content": "hi"},
                                {"role": "assistant", "content": "<think></think>",
                                 "thinking": "b"}]}
    assert normalize_record(empty_block, None, "f:3").messages[-1] == assistant("", "b")


@pytest.mark.parametrize("turns, message", [
    ([{"role": "user", "content": "q"},
      {"role": "assistant", "content": "4", "thinking": "A", "reasoning_content": "B"}],
     "f:3: field 'messages[1].reasoning_content': differs from the same message's 'thinking'; "
     "keep one of the two fields"),
    ([{"role": "user", "content": "q", "thinking": "mine"}, {"role": "assistant", "content": "4"}],
     "f:3: field 'messages[0].thinking': reasoning on a user message; only assistant messages "
     "carry reasoning"),
    ([{"role": "user", "content": "q"},
      {"role": "assistant", "content": "", "reasoning_content": "   "}],
     "f:3: field 'messages[1].content': is empty"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "<think></think>"}],
     "f:3: field 'messages[1].content': holds only an empty <think></think> block, no answer"),
    ([{"role": "user", "content": "hi"},
      {"role": "assistant", "content": "<think>a</think>yo", "thinking": "b"}],
     "f:3: field 'messages[1].content': holds <think> reasoning that differs from the same "
     "message's 'thinking'; keep one of the two"),
    ([{"role": "user", "content": "hi"},
      {"role": "assistant", "content": "<think>a</think>yo", "reasoning_content": "b"}],
     "f:3: field 'messages[1].content': holds <think> reasoning that differs from the same "
     "message's 'reasoning_content'; keep one of the two"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "4", "thinking": 5}],
     "f:3: field 'messages[1].thinking': expected a string, got number"),
    ([{"role": "user", "content": "q"},
      {"role": "assistant", "content": "4", "thinking": None, "reasoning_content": ["x"]}],
     "f:3: field 'messages[1].reasoning_content': expected a string, got array"),
])
def test_invalid_thinking(turns, message):
    with pytest.raises(DataError) as info:
        normalize_record({"messages": turns}, None, "f:3")
    assert str(info.value) == message


def test_split_output_round_trips():
    original = Conversation(messages=(user("Q"), assistant("A\n#### 7")), reference_answer="7")
    record = json.loads(json.dumps(original.to_record()))
    assert detect_format(record) == "messages"
    assert normalize_record(record, None, "train_set.json:3") == original.model_copy(
        update={"source": "train_set.json:3"})
    eval_only = {"messages": [{"role": "user", "content": "Q"}], "reference_answer": "x"}
    assert normalize_record(eval_only, None, "w:1").messages == (user("Q"),)


def test_prompt_completion_strings_and_conversational():
    assert normalize_record({"prompt": "P", "completion": "C"}, None, "w:1") == Conversation(
        messages=(user("P"), assistant("C")), reference_answer=None, source="w:1")
    record = {"prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "P"}],
              "completion": [{"role": "assistant", "content": "so \\boxed{\\frac{1}{2}}"}]}
    conversation = normalize_record(record, None, "w:2")
    assert conversation.messages == (Message(role="system", content="S"), user("P"),
                                     assistant("so \\boxed{\\frac{1}{2}}"))
    assert conversation.reference_answer == "\\frac{1}{2}"


def test_gsm8k_annotations_removed_and_thousands_commas():
    record = {"question": "How much?",
              "answer": "He pays 2 * $617 = $<<2*617=1234>>1,234.\n#### 1,234"}
    assert normalize_record(record, None, "g:1") == Conversation(
        messages=(user("How much?"), assistant("He pays 2 * $617 = $1,234.\n#### 1,234")),
        reference_answer="1234", source="g:1")
    no_marker = normalize_record({"question": "q", "answer": "just text"}, None, "g:2")
    assert no_marker.reference_answer is None


def test_math_with_solution():
    record = {"problem": "Find x.", "solution": "So $x=\\boxed{5}$.", "answer": "5",
              "subject": "Algebra", "level": 1}
    assert normalize_record(record, None, "m:1") == Conversation(
        messages=(user("Find x."), assistant("So $x=\\boxed{5}$.")), reference_answer="5",
        source="m:1")


def test_amc_number_answer_is_evaluation_only():
    record = {"id": 0, "problem": "How many miles?", "answer": 27.0, "url": "u", "question": "?"}
    assert detect_format(record) == "math"
    assert normalize_record(record, None, "a:1") == Conversation(
        messages=(user("How many miles?"),), reference_answer="27", source="a:1")
    assert normalize_record({"problem": "p", "answer": 2.5}, None, "a:2").reference_answer == "2.5"


def test_s1k():
    record = {"question": "Q", "thinking_trajectories": ["step 1", "step 2"], "attempt": "A = 3",
              "solution": "3", "cot_type": "math"}
    assert normalize_record(record, None, "s:1") == Conversation(
        messages=(user("Q"), assistant("A = 3", thinking="step 1\nstep 2")), reference_answer="3",
        source="s:1")


def test_alpaca_with_and_without_input():
    with_input = {"instruction": "Translate.", "input": "Bonjour", "output": "Hello"}
    assert normalize_record(with_input, None, "p:1") == Conversation(
        messages=(user("Translate.\n\nBonjour"), assistant("Hello")), source="p:1")
    without = {"instruction": "Say hi.", "input": "", "output": "Hi"}
    assert normalize_record(without, "alpaca", "p:2").messages == (user("Say hi."), assistant("Hi"))


# ------------------------------------------------------------------------------ record validation

@pytest.mark.parametrize("record, fmt, message", [
    ({"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}, None,
     "f:7: field 'messages[1].role': unknown role 'bot' (expected system, user, assistant)"),
    ({"messages": []}, None, "f:7: field 'messages': empty conversation"),
    ({"messages": [{"role": "user"}]}, None,
     "f:7: field 'messages[0].content': required field is missing"),
    ({"question": "q", "answer": 12}, None, "f:7: field 'answer': expected a string, got number"),
    ({"question": None, "answer": "a"}, None, "f:7: field 'question': expected a string, got null"),
    ({"problem": "p", "answer": None}, None, "f:7: field 'answer': expected a string, got null"),
    ({"problem": "p"}, None, "f:7: field 'answer': required field is missing"),
    ({"question": "q", "thinking_trajectories": "t", "attempt": "a"}, None,
     "f:7: field 'thinking_trajectories': expected a non-empty array of strings, got string"),
    ({"prompt": "  ", "completion": "c"}, None, "f:7: field 'prompt': is empty"),
    ({"question": "q", "answer": "a"}, "alpaca",
     "f:7: field 'instruction': required field is missing"),
    ([1, 2], None, "f:7: expected a JSON object, got array"),
])
def test_invalid_records(record, fmt, message):
    with pytest.raises(DataError) as info:
        normalize_record(record, fmt, "f:7")
    assert str(info.value) == message
    assert info.value.line == 7


def test_unknown_shape_lists_known_shapes():
    with pytest.raises(DataError) as info:
        detect_format({"text": "x"})
    message = str(info.value)
    assert message.startswith("unknown record shape with fields ['text']; known shapes: messages")
    assert all(name in message for name in FORMATS) and "--format" in message


def test_forced_unknown_format_lists_formats(tmp_path):
    with pytest.raises(DataError, match="unknown format 'sharegpt'; choose one of messages, "
                                        "prompt_completion, question_answer, math, s1k, alpaca"):
        load_conversations([write(tmp_path, "a.jsonl", [GOOD_1])], format="sharegpt")
    with pytest.raises(ConfigError, match="--on-error"):
        load_conversations([write(tmp_path, "a.jsonl", [GOOD_1])], on_error="ignore")


# ------------------------------------------------------------------------------ file-level errors

def test_file_level_errors(tmp_path):
    with pytest.raises(DataError, match="missing.jsonl: file not found"):
        load_conversations([tmp_path / "missing.jsonl"])
    with pytest.raises(DataError, match="is a directory"):
        load_conversations([tmp_path])
    (tmp_path / "empty.jsonl").write_bytes(BOM + b"\r\n  \n")
    with pytest.raises(DataError, match="empty.jsonl: file is empty"):
        load_conversations([tmp_path / "empty.jsonl"])
    (tmp_path / "none.json").write_text("[]")
    with pytest.raises(DataError, match="none.json: file holds no records"):
        load_conversations([tmp_path / "none.json"])
    (tmp_path / "x.parquet").write_bytes(b"PAR1")
    have_pyarrow = importlib.util.find_spec("pyarrow") is not None  # the bench extra brings it
    expected = "not a readable Parquet file" if have_pyarrow else "reading Parquet needs pyarrow"
    with pytest.raises(DataError, match=f"x.parquet: {expected}"):
        load_conversations([tmp_path / "x.parquet"])


def test_invalid_utf8_names_offset_and_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(GOOD_1.encode() + b'\n{"question": "caf\xe9", "answer": "#### 1"}\n')
    with pytest.raises(DataError) as info:
        load_conversations([path])
    offset = len(GOOD_1) + 1 + len('{"question": "caf')
    assert str(info.value) == (f"{path}:2: invalid UTF-8 at byte offset {offset}; "
                               f"save the file as UTF-8")


def test_json_array_trailing_comma_names_line_and_column(tmp_path):
    path = tmp_path / "train.json"
    path.write_text('[\n  {"prompt": "a", "completion": "b"},\n]\n')
    with pytest.raises(DataError) as info:
        load_conversations([path])
    assert str(info.value) == f"{path}:3: invalid JSON at column 1: trailing comma before ']'"


def test_json_array_records_are_located_by_line(tmp_path):
    path = tmp_path / "train.json"
    records = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": 3}]
    path.write_bytes(BOM + json.dumps(records, indent=1).encode())  # record 2 starts on line 6
    with pytest.raises(DataError) as info:
        load_conversations([path])
    assert str(info.value) == f"{path}:6: field 'completion': expected a string, got number"
    path.write_bytes(BOM + json.dumps(records).encode())  # one line: both records on line 1
    with pytest.raises(DataError, match=r"train.json:1 \(record 2\): field 'completion'"):
        load_conversations([path])
    result = load_conversations([path], on_error="skip")
    assert [c.source for c in result.conversations] == [f"{path}:1 (record 1)"]
    with pytest.raises(DataError, match=r"no valid records in .*bad.jsonl \(1 skipped; first: "):
        load_conversations([write(tmp_path, "bad.jsonl", [MALFORMED])], on_error="skip")


def test_several_files_merge_in_order(tmp_path):
    a = write(tmp_path, "a.jsonl", [GOOD_1])
    b = tmp_path / "b.json"
    b.write_text(json.dumps([{"instruction": "i", "output": "o"}] * 2))
    result = load_conversations([a, b])
    assert result.counts == {str(a): 1, str(b): 2}
    assert result.formats == {str(a): "question_answer", str(b): "alpaca"}
    assert [c.source for c in result.conversations] == [f"{a}:1", f"{b}:1 (record 1)",
                                                         f"{b}:1 (record 2)"]


# ------------------------------------------------------------------------------------- real data

@needs_data
@pytest.mark.parametrize("name, count, fmt, first_reference", [
    ("math500/test.jsonl", 500, "math", "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ("aime24/test.jsonl", 30, "math", "204"),
    ("amc23/test.jsonl", 40, "math", "27"),
    ("gsm8k/test.jsonl", 1319, "question_answer", "18"),
])
def test_real_files_load_with_reference_answers(name, count, fmt, first_reference):
    path = DATA / name
    result = load_conversations([path])
    assert result.counts == {str(path): count} and result.formats == {str(path): fmt}
    assert result.skipped == []
    assert all(c.reference_answer for c in result.conversations)
    assert result.conversations[0].reference_answer == first_reference
    raw = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    if fmt == "math" and name != "amc23/test.jsonl":
        assert [c.reference_answer for c in result.conversations] == [r["answer"] for r in raw]


@needs_data
def test_gsm8k_test_references_match_the_marker():
    conversations = load_conversations([DATA / "gsm8k/test.jsonl"]).conversations
    assert all(c.reference_answer.lstrip("-").isdigit() for c in conversations)
    assert not any("<<" in c.messages[1].content for c in conversations)
    with_commas = [c for c in conversations if "," in c.messages[1].content.rsplit("####", 1)[1]]
    assert with_commas and all("," not in c.reference_answer for c in with_commas)


# ------------------------------------------------------------- OpenAI content parts (issue 20)

def parts(*texts: str) -> list[dict]:
    return [{"type": "text", "text": text} for text in texts]


def test_content_parts_are_joined_for_every_role():
    record = {"messages": [{"role": "system", "content": parts("Be brief.", "Be exact.")},
                           {"role": "user", "content": parts("What is 2 + 2?")},
                           {"role": "assistant", "content": parts("2 + 2 = 4.", "\\boxed{4}")}]}
    conversation = normalize_record(record, None, "w:1")
    assert conversation.messages == (Message(role="system", content="Be brief.\nBe exact."),
                                     user("What is 2 + 2?"), assistant("2 + 2 = 4.\n\\boxed{4}"))
    assert conversation.reference_answer == "4"


def test_content_parts_in_conversational_prompt_completion():
    record = {"prompt": [{"role": "user", "content": parts("P1", "P2")}],
              "completion": [{"role": "assistant", "content": parts("<think>t</think>C")}]}
    assert normalize_record(record, None, "w:1").messages == (user("P1\nP2"),
                                                              assistant("C", thinking="t"))


def test_content_parts_equal_the_string_form():
    as_parts = {"messages": [{"role": "user", "content": parts("Q")},
                             {"role": "assistant", "content": parts("A")}]}
    as_strings = {"messages": [{"role": "user", "content": "Q"},
                               {"role": "assistant", "content": "A"}]}
    assert normalize_record(as_parts, None, "w:1") == normalize_record(as_strings, None, "w:1")


@pytest.mark.parametrize("content,field,message", [
    ([{"type": "image_url", "image_url": {"url": "https://x/cat.png"}}], "messages[1].content[0]",
     "a 'image_url' content part; only text parts can be trained on here"),
    (parts("see:") + [{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}],
     "messages[1].content[1]", "a 'input_audio' content part"),
    ([{"type": "file", "file": {"file_id": "f"}}], "messages[1].content[0]", "a 'file' content part"),
    (["text"], "messages[1].content[0]", "expected a content part {type, text}, got string"),
    ([{"text": "no type"}], "messages[1].content[0]", "a content part needs a string 'type', got null"),
    ([{"type": "text", "text": 3}], "messages[1].content[0].text", "expected a string, got number"),
    ([], "messages[1].content", "empty list of parts"),
    (parts(" ", ""), "messages[1].content", "is empty"),
])
def test_invalid_content_parts_name_file_line_and_part(tmp_path, content, field, message):
    good = {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}
    bad = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": content},
                        {"role": "assistant", "content": "A"}]}
    path = tmp_path / "parts.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(DataError) as info:
        load_conversations([path])
    assert str(info.value).startswith(f"{path}:2: field '{field}': {message}")
    assert (info.value.path, info.value.line, info.value.field) == (str(path), 2, field)


def test_non_text_part_is_a_counted_skip(tmp_path):
    image = {"messages": [{"role": "user", "content": parts("What is in") + [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]},
        {"role": "assistant", "content": "a cat"}]}
    good = {"messages": [{"role": "user", "content": parts("Q")},
                         {"role": "assistant", "content": parts("A")}]}
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in (good, image, good)))
    result = load_conversations([path], on_error="skip")
    assert [c.source for c in result.conversations] == [f"{path}:1", f"{path}:3"]
    assert result.skipped == [(f"{path}:2", "field 'messages[0].content[1]': a 'image_url' "
                               "content part; only text parts can be trained on here (remove the "
                               "part, or skip such records: ON_ERROR = \"skip\" in the config, "
                               "--set ON_ERROR=skip, or --on-error skip for split and stats)")]
    assert result.counts == {str(path): 2}


def test_question_answer_takes_an_explicit_reference_answer():
    """Multiple-choice data in GSM8K's shape: the answer has no ``####`` line, so the reference
    comes from ``reference_answer`` when the record has one (as for ``messages``)."""
    record = {"question": "2+2? (A) 3 (B) 4", "answer": "B", "reference_answer": "B"}
    assert normalize_record(record, None, "f:1").reference_answer == "B"
    assert normalize_record({"question": "2+2?", "answer": "4\n#### 4"}, None,
                            "f:1").reference_answer == "4"
    assert normalize_record({"question": "2+2?", "answer": "B"}, None, "f:1").reference_answer \
        is None
